"""What an image is called inside each runtime.

Pure: no I/O, used on both the packer and the device.
"""

from __future__ import annotations

import functools
from typing import Optional

from .reference import Reference, normalize_name, parse_reference


def device_name(ref: Reference) -> str:
    """Name an image gets in the runtime: ``repo:tag``, or ``repo@digest`` when pinned.

    This is what ``ctr pull``/CRI name a pull by tag or by digest.
    """
    if ref.digest:
        return f"{ref.repository}@{ref.digest}"
    return f"{ref.repository}:{ref.tag or 'latest'}"


CRI_NAMESPACE = "k8s.io"  # where kubelet (and k3s) look for images


def cri_digest_name(name: str, top: str) -> Optional[str]:
    """The ``repo@sha256:...`` record CRI keeps beside ``repo:tag`` after a pull.

    CRI's ImageStatus finds an image by ``repo@digest`` only through a record of that
    exact name (measured on containerd 1.6), so a pod spec pinned by digest needs it.
    None when ``name`` is pinned already.
    """
    ref = parse_reference(name)
    return None if ref.digest else f"{ref.repository}@{top}"


@functools.lru_cache(maxsize=65536)
def docker_tag(name: str) -> str:
    """The tag an image named ``name`` gets in Docker.

    ``docker load`` can only tag, not record a registry digest, so ``repo@sha256:hex``
    becomes ``repo:sha256-hex`` (a tag keeps it safe from ``docker image prune``).
    """
    ref = parse_reference(name)
    if ref.digest:
        return f"{ref.repository}:{ref.digest.replace(':', '-')}"
    return f"{ref.repository}:{ref.tag}"


@functools.lru_cache(maxsize=65536)
def comparable_name(name: str) -> str:
    """``name`` normalised for comparison; a name we could not write is kept as it is.

    Cached: a fleet's inventories repeat the same few names thousands of times.
    """
    try:
        return normalize_name(name)
    except Exception:  # noqa: BLE001 - a runtime may hold names we would never write
        return name
