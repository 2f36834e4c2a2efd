"""What a site lacks: ResolvedImage x Inventory -> Plan. Pure set arithmetic, no I/O.

What counts as held is ``holdings``'s rule, shared with the importer. Every layer not
shipped because the site holds it becomes a *prerequisite* that the importer checks
before it touches the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .format import (FEATURE_DELTA, LAYER_FORM_BLOB, LAYER_FORM_TAR, RUNTIME_CONTAINERD,
                     RUNTIME_DOCKER, DeltaHead, Prerequisite)
from .holdings import Holdings, Inventory
from .image import Layer, ResolvedImage


def default_layer_form(runtime: str) -> str:
    """containerd needs the original blob (to keep manifest digests); Docker only the tar."""
    return LAYER_FORM_TAR if runtime == RUNTIME_DOCKER else LAYER_FORM_BLOB


@dataclass(frozen=True)
class DeltaChoice:
    """A layer shipped as a delta against files the site holds (``delta.encode``)."""

    head: DeltaHead
    entry: str  # digest of the op stream: the bundle entry
    size: int  # op stream bytes
    stored: int  # its size zstd-compressed, as the bundle will carry it (estimate)
    bases: Tuple[Prerequisite, ...]  # the layers it reads files from
    copied: int = 0  # target tar bytes taken whole from base files
    patched: int = 0  # target tar bytes rebuilt from patches
    literal: int = 0  # target tar bytes shipped as they are (headers, new contents)


@dataclass(frozen=True)
class LayerPlan:
    layer: Layer
    chain_id: str
    ship: bool  # False: the site holds it (a prerequisite), or an earlier image ships it
    entry: str  # bundle entry digest carrying it: the blob digest or, as a tar, the diff_id
    delta: Optional[DeltaChoice] = None  # shipped as a delta instead of whole
    note: str = ""  # why a shipped layer goes whole, when deltas were considered

    @property
    def ship_bytes(self) -> int:
        """What shipping this layer costs in the bundle (registry size when whole)."""
        if not self.ship:
            return 0
        return self.delta.stored if self.delta is not None else self.layer.size


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
        return sum(d.size for d in self.image.json_blobs) + sum(lp.ship_bytes for lp in self.layers)


@dataclass(frozen=True)
class Plan:
    site: Optional[str]  # None: a fleet bundle, for every site in one state (``sync``)
    runtime: str
    namespace: Optional[str]
    platform: str
    layer_form: str
    images: Tuple[ImagePlan, ...]
    prerequisites: Tuple[Prerequisite, ...]
    # (digest, source) for what a registry or mirror served in this run: which one it
    # was, for the plan/pack output. Not part of what ships, so not compared.
    sources: Tuple[Tuple[str, str], ...] = field(default=(), compare=False)

    def source_of(self, digest: str) -> Optional[str]:
        """The registry/mirror (``host[/prefix]``) that served ``digest`` this run, if one did."""
        return dict(self.sources).get(digest)

    @property
    def required_features(self) -> Tuple[str, ...]:
        return (FEATURE_DELTA,) if any(lp.delta for lp in self.shipped_layers()) else ()

    def shipped_layers(self) -> Tuple[LayerPlan, ...]:
        return tuple(lp for p in self.to_ship for lp in p.layers if lp.ship)

    @property
    def to_ship(self) -> Tuple[ImagePlan, ...]:
        return tuple(p for p in self.images if not p.up_to_date)

    def shipped(self) -> Dict[str, Tuple[Optional[LayerPlan], int]]:
        """Each entry the bundle carries, once: digest -> (layer plan or None for JSON, bytes).

        Bytes are registry sizes, or for a delta its estimated size in the bundle.
        """
        out: Dict[str, Tuple[Optional[LayerPlan], int]] = {}
        for p in self.to_ship:
            for d in p.image.json_blobs:
                out[d.digest] = (None, d.size)
            for lp in p.layers:
                if lp.ship:
                    out[lp.delta.entry if lp.delta else lp.entry] = (lp, lp.ship_bytes)
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


def plan_bundle(site: str, images: Sequence[ResolvedImage], inv: Inventory, *, runtime: str,
                namespace: Optional[str], platform: str,
                layer_form: Optional[str] = None) -> Plan:
    """Decide, per image and layer, what ships and what the site must already hold."""
    form = layer_form or default_layer_form(runtime)
    if runtime == RUNTIME_CONTAINERD and form != LAYER_FORM_BLOB:
        raise ValueError("containerd sites need layers as original blobs")
    holdings = Holdings(inv)
    shipped: Set[str] = set()
    # Keyed by (chain, blob): shared base layers recur in every image, but the same
    # chain may come as two different blobs (gzip here, zstd there).
    prereqs: Dict[Tuple[str, str], Prerequisite] = {}
    plans: List[ImagePlan] = []
    for image in images:
        up_to_date = holdings.image(image.name, image.top.digest, image.config.digest) is not None
        layer_plans = []
        for layer, chain in zip(image.layers, image.chain_ids):
            entry = layer.diff_id if form == LAYER_FORM_TAR else layer.digest
            if up_to_date:
                layer_plans.append(LayerPlan(layer, chain, False, entry))
            elif holdings.layer(layer.digest, chain):
                key = (chain, layer.digest)
                if key not in prereqs:  # no object built per held layer: fleets hit this a lot
                    prereqs[key] = Prerequisite(chain, layer.diff_id, layer.digest)
                layer_plans.append(LayerPlan(layer, chain, False, entry))
            else:
                layer_plans.append(LayerPlan(layer, chain, entry not in shipped, entry))
                shipped.add(entry)
        plans.append(ImagePlan(image, up_to_date, tuple(layer_plans)))
    return Plan(site, runtime, namespace, platform, form, tuple(plans),
                tuple(prereqs.values()))


def with_deltas(plan: Plan, choices: Dict[str, DeltaChoice], notes: Dict[str, str]) -> Plan:
    """``plan`` with the layers in ``choices`` (by diff_id) shipped as deltas.

    Each delta's bases become prerequisites, so a device that lacks one refuses the
    bundle before it touches the runtime. ``notes`` say why other layers go whole.
    """
    prereqs: Dict[Tuple[str, str], Prerequisite] = {(p.chain_id, p.digest): p
                                                    for p in plan.prerequisites}
    out = []
    for ip in plan.images:
        layer_plans = []
        for lp in ip.layers:
            choice = choices.get(lp.layer.diff_id) if lp.ship else None
            if choice is not None:
                for base in choice.bases:
                    prereqs.setdefault((base.chain_id, base.digest), base)
                lp = replace(lp, delta=choice)
            elif lp.ship and lp.layer.diff_id in notes:
                lp = replace(lp, note=notes[lp.layer.diff_id])
            layer_plans.append(lp)
        out.append(replace(ip, layers=tuple(layer_plans)))
    return replace(plan, images=tuple(out), prerequisites=tuple(prereqs.values()))


def with_layer_info(plan: Plan, images: Iterable[ResolvedImage]) -> Plan:
    """``plan`` with its images' layers replaced by the same layers from ``images``.

    Fetching fills in what resolving could not know (each layer's tar size); the
    decisions stay exactly as planned, so nothing is planned twice.
    """
    known: Dict[str, Layer] = {l.digest: l for img in images for l in img.layers}

    def refined(lp: LayerPlan) -> LayerPlan:
        layer = known.get(lp.layer.digest)
        return lp if layer is None or layer.diff_id != lp.layer.diff_id else replace(lp, layer=layer)

    out = []
    for ip in plan.images:
        layer_plans = tuple(refined(lp) for lp in ip.layers)
        image = replace(ip.image, layers=tuple(lp.layer for lp in layer_plans))
        out.append(replace(ip, image=image, layers=layer_plans))
    return replace(plan, images=tuple(out))
