"""Which state a site is in, as far as its bundle is concerned. Pure: no I/O.

Two sites get the same bundle when everything the bundle's bytes depend on is equal:
the resolved images (by content), the runtime form (runtime, namespace, platform),
what each device holds (the inventory, minus what says *when* or *where* it was read)
and how the packer encodes (level, deltas, signers, this edgebundle's version). The
state key is a digest of exactly that, so 1,000 gateways in one state cost one pack,
and a second run finds the very file the first one packed (``bundles``), so an
interrupted upload resumes. (Packed again it would differ: ``created``, and layer
sizes the packer's cache learnt meanwhile.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple

from .. import __version__
from ..holdings import Inventory
from ..image import ResolvedImage
from ..plan import Plan, plan_bundle
from ..report import inventory_to_json
from ..specs import SiteSpec

# What a report says that does not change the bundle: when and where it was read, the
# device's free-form extras, and its trust policy (checked per site, not packed).
_VOLATILE = ("generated_at", "host", "site", "extra", "signatures")


@dataclass(frozen=True)
class PackSettings:
    """How the packer encodes: part of the state, since the bytes depend on it."""

    level: int = 16
    deltas: bool = True
    signer_ids: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Holding:
    """How many of the manifest's images a site holds, complete and current."""

    current: int
    images: int

    @property
    def done(self) -> bool:
        return self.current == self.images

    def __str__(self) -> str:
        return f"{self.current}/{self.images}"


def site_plan(site: SiteSpec, images: Sequence[ResolvedImage], inventory: Inventory) -> Plan:
    """Layer-level plan of ``site`` against ``inventory`` (no deltas: those need the cache)."""
    return plan_bundle(site.name, images, inventory, runtime=site.runtime, namespace=site.namespace,
                       platform=str(site.platform))


def holding(site: SiteSpec, images: Sequence[ResolvedImage], inventory: Inventory) -> Holding:
    """The planner's own answer (``holdings``): an image counts when nothing of it ships."""
    plan = site_plan(site, images, inventory)
    return Holding(sum(1 for ip in plan.images if ip.up_to_date), len(plan.images))


def inventory_fingerprint(inventory: Inventory) -> Dict[str, Any]:
    """The parts of an inventory a bundle depends on, in a canonical order."""
    obj = inventory_to_json(inventory)
    for key in _VOLATILE:
        obj.pop(key, None)
    obj["images"] = sorted(obj["images"], key=lambda i: json.dumps(i, sort_keys=True))
    return obj


def state_key(site: SiteSpec, images: Sequence[ResolvedImage], inventory: Inventory,
              settings: PackSettings) -> str:
    """32 hex digits naming the bundle ``site`` needs in this state (see the module doc)."""
    state = {
        "edgebundle": __version__,
        "runtime": site.runtime, "namespace": site.namespace, "platform": str(site.platform),
        "deltas": settings.deltas and site.deltas, "level": settings.level,
        "signers": sorted(settings.signer_ids),
        "images": [[i.name, i.top.digest, str(i.platform)] for i in images],
        "inventory": inventory_fingerprint(inventory),
    }
    text = json.dumps(state, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
