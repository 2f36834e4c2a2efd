"""What a Podman store holds, from its own records: pure parsers, no I/O. Device-safe.

Inputs are c/storage's ``layers.json`` and ``images.json`` (``<graphRoot>/<driver>-layers``
and ``-images``, rewritten atomically by Podman) and ``podman image inspect`` objects;
``importer.podman`` reads them. The rules for what counts as held are in ``holdings``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Set, Tuple

from ..errors import LoadError, UsageError
from ..holdings import HeldImage, HeldLayer
from ..oci import Platform
from ..reference import parse_reference

SPOOL_PREFIX = "edgebundle-import-"
#: A name podman gives an image loaded from one of our spool directories.
TEMP_MARK = "/" + SPOOL_PREFIX


def is_temp_name(name: str) -> bool:
    return name.startswith("localhost/") and TEMP_MARK in name


@dataclass(frozen=True)
class StoredLayer:
    """One layer record of c/storage's ``layers.json``."""

    id: str
    parent: str
    diff_id: str  # "diff-digest": the uncompressed tar's digest
    blob: Optional[str]  # "compressed-diff-digest": the blob it was made from, if compressed
    blob_size: Optional[int]
    complete: bool  # c/storage flags a layer "incomplete" while it is written


def parse_layers(text: str) -> Dict[str, StoredLayer]:
    """``layers.json`` -> {layer id: record}; records we cannot read are left out."""
    try:
        items = json.loads(text) if text.strip() else []
    except ValueError:
        raise LoadError("podman's layer store (layers.json) is not JSON",
                        "check podman's storage with `podman images`") from None
    out: Dict[str, StoredLayer] = {}
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        diff = item.get("diff-digest")
        if not isinstance(diff, str) or not diff.startswith("sha256:"):
            continue  # never applied: unusable as a layer
        blob = item.get("compressed-diff-digest")
        size = item.get("compressed-size")
        flags = item.get("flags")
        out[item["id"]] = StoredLayer(
            id=item["id"], parent=str(item.get("parent") or ""), diff_id=diff,
            blob=blob if isinstance(blob, str) and blob.startswith("sha256:") else None,
            blob_size=size if isinstance(size, int) and not isinstance(size, bool) else None,
            complete=not (isinstance(flags, dict) and flags.get("incomplete")))
    return out


def parse_images_store(text: str) -> Dict[str, str]:
    """``images.json`` -> {image id: top layer id}."""
    try:
        items = json.loads(text) if text.strip() else []
    except ValueError:
        raise LoadError("podman's image store (images.json) is not JSON",
                        "check podman's storage with `podman images`") from None
    return {str(i["id"]): str(i.get("layer") or "") for i in items if isinstance(items, list)
            and isinstance(i, dict) and isinstance(i.get("id"), str)}


def layer_chain(top: str, layers: Mapping[str, StoredLayer]) -> Optional[List[StoredLayer]]:
    """The layers from the base up to ``top``; None if one is missing or incomplete."""
    chain: List[StoredLayer] = []
    seen: Set[str] = set()
    current = top
    while current:
        layer = layers.get(current)
        if layer is None or not layer.complete or current in seen:
            return None
        seen.add(current)
        chain.append(layer)
        current = layer.parent
    chain.reverse()
    return chain


def layer_blobs(layers: Mapping[str, StoredLayer]) -> FrozenSet[str]:
    """The blob digests Podman would reuse a layer for: compressed digests and diff_ids."""
    out: Set[str] = set()
    for layer in layers.values():
        if layer.complete:
            out.add(layer.diff_id)
            if layer.blob:
                out.add(layer.blob)
    return frozenset(out)


@dataclass(frozen=True)
class StoredImage:
    """One image as Podman holds it: ``podman image inspect`` and the store's layers."""

    config: str  # the image ID, as a digest
    names: Tuple[str, ...]  # temporary names included
    digests: Tuple[str, ...]  # every manifest digest recorded for it (Digest, RepoDigests)
    platform: str
    diff_ids: Tuple[str, ...]  # from its config
    layers: Optional[Tuple[StoredLayer, ...]]  # base first; None when one is missing

    @property
    def complete(self) -> bool:
        return self.layers is not None and tuple(l.diff_id for l in self.layers) == self.diff_ids


def stored_image(detail: Mapping[str, Any], chain: Optional[List[StoredLayer]]) -> Optional[StoredImage]:
    image_id = detail.get("Id")
    if not isinstance(image_id, str) or not image_id:
        return None
    root = detail.get("RootFS")
    diff_ids = tuple(str(d) for d in (root.get("Layers") or [])) if isinstance(root, dict) else ()
    plat = str(Platform(str(detail.get("Os") or ""), str(detail.get("Architecture") or ""),
                        str(detail.get("Variant") or "")).normalized())
    digests: List[str] = []
    for d in [detail.get("Digest"), *[str(r).partition("@")[2] for r in
                                      detail.get("RepoDigests") or []]]:
        if isinstance(d, str) and d.startswith("sha256:") and d not in digests:
            digests.append(d)
    names = tuple(n for n in (_name(t) for t in detail.get("RepoTags") or []) if n is not None)
    return StoredImage(config=image_id if image_id.startswith("sha256:") else "sha256:" + image_id,
                       names=names, digests=tuple(digests), platform=plat, diff_ids=diff_ids,
                       layers=tuple(chain) if chain is not None else None)


def held_images(image: StoredImage) -> List[HeldImage]:
    """One HeldImage per (real name, recorded digest).

    Podman records several manifest digests for one image (a platform manifest, the
    index it was chosen from, another one of the same config loaded later): a bundle's
    top digest may be any of them, so each is a line of its own in the report.
    """
    if image.complete and image.layers is not None:
        layers = tuple(HeldLayer(diff_id=l.diff_id, digest=l.blob or l.diff_id,
                                 size=l.blob_size if l.blob else None, blob=True, unpacked=True)
                       for l in image.layers)
    else:
        layers = tuple(HeldLayer(diff_id=d) for d in image.diff_ids)
    out = []
    for name in image.names:
        if is_temp_name(name):
            continue  # an import in progress (or one that died): never reported
        for digest in image.digests or (None,):
            out.append(HeldImage(name=name, config=image.config, manifest=digest,
                                 platform=image.platform,
                                 complete=image.complete and digest is not None, layers=layers))
    return out


def _name(tag: object) -> Optional[str]:
    if not isinstance(tag, str) or not tag or tag.startswith("<none>"):
        return None
    if is_temp_name(tag):
        return tag
    try:
        return str(parse_reference(tag))
    except UsageError:
        return None
