"""An image as the packer resolved it: one platform's manifest, config and layers.

Frozen values only; no I/O.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

from .naming import device_name
from .oci import Descriptor, Platform, chain_ids, describing_blobs
from .reference import Reference


@functools.lru_cache(maxsize=16384)
def _chain_ids_cached(diff_ids: Tuple[str, ...]) -> Tuple[str, ...]:
    # Planning a fleet asks for the same images' chains once per site.
    return chain_ids(diff_ids)


@dataclass(frozen=True)
class Layer:
    """One filesystem layer, with both identities.

    ``digest``/``size``: the registry blob (usually gzip); containerd keys content on it.
    ``diff_id``/``tar_size``: sha256 and length of the uncompressed tar; Docker keys on it.
    """

    media_type: str
    digest: str
    size: int
    diff_id: str
    tar_size: int = -1  # -1 until the packer has decompressed the blob once


@dataclass(frozen=True)
class ResolvedImage:
    """One image of the manifest list, pinned to content for one platform.

    ``top`` is what the reference names in the registry (an index or a manifest):
    containerd's image record points at it, so its digest must survive the trip.
    """

    ref: Reference
    top: Descriptor
    platform: Platform
    manifest: Descriptor
    config: Descriptor
    layers: Tuple[Layer, ...]

    @property
    def name(self) -> str:
        """The name the image gets on the device (see ``naming.device_name``)."""
        return device_name(self.ref)

    @property
    def chain_ids(self) -> Tuple[str, ...]:
        return _chain_ids_cached(tuple(layer.diff_id for layer in self.layers))

    @property
    def json_blobs(self) -> Tuple[Descriptor, ...]:
        """Index (if any), manifest and config: the small blobs that describe the image."""
        return describing_blobs(self.top, self.manifest, self.config)
