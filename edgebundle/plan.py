"""What a site lacks: ResolvedImage x Inventory -> Plan. Pure set arithmetic, no I/O.

A layer counts as held only in the form the site's runtime can use:

* containerd: the compressed blob is in the content store (it can be unpacked onto any
  parent), or the layer's chain is already unpacked as a snapshot;
* Docker: the layer's chain is in the layer store (``docker load`` skips a layer whose
  chainID exists without opening its file, and has no other use for blobs).

Every layer not shipped becomes a *prerequisite* that the importer checks before it
touches the runtime.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from .format import LAYER_FORM_BLOB, LAYER_FORM_TAR
from .model import HeldImage, Inventory, Layer, ResolvedImage, docker_tag
from .reference import normalize_name


def default_layer_form(runtime: str) -> str:
    """containerd needs the original blob (to keep manifest digests); Docker only the tar."""
    return LAYER_FORM_TAR if runtime == "docker" else LAYER_FORM_BLOB


@dataclass(frozen=True)
class LayerPlan:
    layer: Layer
    chain_id: str
    ship: bool  # False: the site holds it (a prerequisite), or an earlier image ships it
    entry: str  # bundle entry digest carrying it: the blob digest or, as a tar, the diff_id


@dataclass(frozen=True)
class ImagePlan:
    image: ResolvedImage
    up_to_date: bool
    layers: Tuple[LayerPlan, ...]

    @property
    def full_bytes(self) -> int:
        """What a full transfer of this image costs at registry sizes."""
        return sum(d.size for d in self.image.json_blobs) + sum(l.size for l in self.image.layers)

    @property
    def ship_bytes(self) -> int:
        if self.up_to_date:
            return 0
        return sum(d.size for d in self.image.json_blobs) + sum(
            lp.layer.size for lp in self.layers if lp.ship)


@dataclass(frozen=True)
class Prerequisite:
    """A layer the site must already hold: satisfied by the blob or by the chain."""

    chain_id: str
    diff_id: str
    digest: str

    def to_json(self) -> Dict[str, str]:
        return {"chain_id": self.chain_id, "diff_id": self.diff_id, "digest": self.digest}


@dataclass(frozen=True)
class Plan:
    site: str
    runtime: str
    namespace: Optional[str]
    platform: str
    layer_form: str
    images: Tuple[ImagePlan, ...]
    prerequisites: Tuple[Prerequisite, ...]

    @property
    def to_ship(self) -> Tuple[ImagePlan, ...]:
        return tuple(p for p in self.images if not p.up_to_date)

    def shipped(self) -> Dict[str, Tuple[Optional[Layer], int]]:
        """Each entry the bundle carries, once: digest -> (layer or None for JSON, registry size)."""
        out: Dict[str, Tuple[Optional[Layer], int]] = {}
        for p in self.to_ship:
            for d in p.image.json_blobs:
                out[d.digest] = (None, d.size)
            for lp in p.layers:
                if lp.ship:
                    out[lp.entry] = (lp.layer, lp.layer.size)
        return out

    @property
    def ship_bytes(self) -> int:
        """Registry bytes of what ships, each blob counted once (as pack writes it)."""
        return sum(size for _, size in self.shipped().values())

    @property
    def full_bytes(self) -> int:
        """Registry bytes of every image, each blob counted once (a full pull)."""
        seen = {d.digest: d.size for p in self.images for d in p.image.json_blobs}
        seen.update((l.digest, l.size) for p in self.images for l in p.image.layers)
        return sum(seen.values())


def held_layer(inv: Inventory, runtime: str, digest: str, chain_id: str) -> bool:
    if runtime == "docker":
        return chain_id in inv.chains
    return digest in inv.blobs or chain_id in inv.chains


def held_by_name(inv: Inventory) -> Dict[str, List[HeldImage]]:
    """The site's complete images by normalised name (built once per site)."""
    out: Dict[str, List[HeldImage]] = {}
    for held in inv.images:
        if held.complete:
            out.setdefault(_safe_normalize(held.name), []).append(held)
    return out


def find_held(inv: Inventory, name: str, top: str, config: str,
              by_name: Optional[Dict[str, List[HeldImage]]] = None) -> Optional[HeldImage]:
    """The site's complete image named ``name`` holding this content, if any.

    containerd: same name and same target (top) digest. Docker: same tag (a pinned
    name maps to ``repo:sha256-hex``) and same config digest, i.e. same image ID.
    """
    index = held_by_name(inv) if by_name is None else by_name
    want = _safe_normalize(docker_tag(name) if inv.runtime == "docker" else name)
    for held in index.get(want, ()):
        if inv.runtime == "docker":
            if held.config == config:
                return held
        elif held.target is not None and held.target.digest == top:
            return held
    return None


def image_present(inv: Inventory, image: ResolvedImage,
                  by_name: Optional[Dict[str, List[HeldImage]]] = None) -> Optional[HeldImage]:
    return find_held(inv, image.name, image.top.digest, image.config.digest, by_name)


@functools.lru_cache(maxsize=65536)
def _safe_normalize(name: str) -> str:
    # Cached: a fleet's inventories repeat the same few names thousands of times.
    try:
        return normalize_name(name)
    except Exception:  # a runtime may hold names we would not write
        return name


def plan_bundle(site: str, images: Sequence[ResolvedImage], inv: Inventory, *, runtime: str,
                namespace: Optional[str], platform: str,
                layer_form: Optional[str] = None) -> Plan:
    """Decide, per image and layer, what ships and what the site must already hold."""
    form = layer_form or default_layer_form(runtime)
    if runtime == "containerd" and form != LAYER_FORM_BLOB:
        raise ValueError("containerd sites need layers as original blobs")
    shipped: Set[str] = set()
    prereqs: Dict[str, Prerequisite] = {}
    plans: List[ImagePlan] = []
    by_name = held_by_name(inv)
    for image in images:
        up_to_date = image_present(inv, image, by_name) is not None
        layer_plans = []
        for layer, chain in zip(image.layers, image.chain_ids):
            entry = layer.diff_id if form == LAYER_FORM_TAR else layer.digest
            if up_to_date:
                layer_plans.append(LayerPlan(layer, chain, False, entry))
            elif held_layer(inv, runtime, layer.digest, chain):
                if chain not in prereqs:  # shared base layers recur in every image
                    prereqs[chain] = Prerequisite(chain, layer.diff_id, layer.digest)
                layer_plans.append(LayerPlan(layer, chain, False, entry))
            else:
                layer_plans.append(LayerPlan(layer, chain, entry not in shipped, entry))
                shipped.add(entry)
        plans.append(ImagePlan(image, up_to_date, tuple(layer_plans)))
    return Plan(site, runtime, namespace, platform, form, tuple(plans),
                tuple(prereqs.values()))


def missing_prerequisites(prereqs: Sequence[Dict[str, str]], inv: Inventory,
                          runtime: str) -> List[Dict[str, str]]:
    """The device-side check: which prerequisites the runtime does not satisfy."""
    return [p for p in prereqs
            if not held_layer(inv, runtime, str(p.get("digest")), str(p.get("chain_id")))]


def shipped_entries(plan: Plan) -> FrozenSet[str]:
    return frozenset(lp.entry for p in plan.images for lp in p.layers if lp.ship)
