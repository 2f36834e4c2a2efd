"""The device's record of the images edgebundle imported: what ``prune`` may remove.

``prune`` removes only images an import published, so every successful import records,
per runtime target (one containerd address and namespace, or one Docker host), each name
it set and the digest that name then pointed at (containerd: the image's target; Docker:
the image ID). An image is "ours" only while its name still points at that digest: one
someone re-pulled or retagged under the same name is not, and an image that was on the
device before this record existed is never in it.

The record lives in the state directory (``state.StateDir``), one file per target,
``imported/<kind>-<hash of the target>.json``, written atomically and fsynced, always
under the device lock (``import`` and ``prune`` both hold it)::

    {"version": 1, "runtime": "containerd", "target": "containerd:/run/...sock#k8s.io",
     "seq": 7,
     "images": [{"name": "reg/shop/app:v2", "digest": "sha256:...", "image": "reg/shop/app:v2",
                 "imported_at": "2026-12-01T21:00:00Z", "seq": 7, "bundle": "gw-01.ebundle"}]}

``name`` is the runtime's name (for containerd in ``k8s.io`` also the ``repo@digest``
alias the import set, with ``image`` the bundle's name it belongs to). ``seq`` orders
imports: gateways without a real-time clock boot in 1970, so wall times may go back,
while the sequence only grows. A record that cannot be read counts as empty (nothing is
ours, so nothing is removed). The list is bounded (``MAX_ENTRIES``, oldest dropped), and
``prune`` drops entries whose image is gone. A name that an import points elsewhere
keeps its old entry too: Docker keeps the old image, untagged, and it is still ours.

Device-safe: standard library only.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Tuple

from .state import StateDir

log = logging.getLogger(__name__)

VERSION = 1
#: Entries kept per target; the oldest go first (a device imports a few images a day).
MAX_ENTRIES = 1000


@dataclass(frozen=True)
class Imported:
    """One name an import published, and the digest it then pointed at."""

    name: str  # the runtime's name (containerd image name, Docker tag as reported)
    digest: str  # containerd: target (top) digest; Docker: image ID (config digest)
    image: str  # the bundle's image name this entry belongs to
    imported_at: str  # RFC 3339, for people
    seq: int  # import order, for the policy
    bundle: str = ""

    def to_json(self) -> Any:
        return {"name": self.name, "digest": self.digest, "image": self.image,
                "imported_at": self.imported_at, "seq": self.seq, "bundle": self.bundle}


@dataclass(frozen=True)
class History:
    runtime: str
    target: str
    seq: int
    images: Tuple[Imported, ...]


def record_name(runtime: str, target: str) -> str:
    return f"imported/{runtime}-{hashlib.sha256(target.encode()).hexdigest()[:16]}.json"


def _entry(obj: Any) -> Optional[Imported]:
    if not isinstance(obj, dict):
        return None
    name, digest, seq = obj.get("name"), obj.get("digest"), obj.get("seq")
    if not isinstance(name, str) or not isinstance(digest, str) or not digest.startswith("sha256:") \
            or not isinstance(seq, int) or isinstance(seq, bool):
        return None
    image, at, bundle = obj.get("image"), obj.get("imported_at"), obj.get("bundle")
    return Imported(name, digest, image if isinstance(image, str) else name,
                    at if isinstance(at, str) else "", seq, bundle if isinstance(bundle, str) else "")


def load(state: StateDir, runtime: str, target: str) -> History:
    """The record for this target; empty when absent, unreadable or someone else's."""
    obj = state.read_json(record_name(runtime, target))
    empty = History(runtime, target, 0, ())
    if obj is None:
        return empty
    if not isinstance(obj, dict) or obj.get("version") != VERSION or obj.get("target") != target:
        log.info("import history %s is unreadable or not this target's: treated as empty",
                 record_name(runtime, target))
        return empty
    raw = obj.get("images")
    entries = [e for e in (_entry(o) for o in (raw if isinstance(raw, list) else [])) if e is not None]
    seq = obj.get("seq")
    top = max([e.seq for e in entries] + [seq if isinstance(seq, int) else 0])
    return History(runtime, target, top, tuple(entries))


def save(state: StateDir, history: History) -> None:
    images = sorted(history.images, key=lambda e: e.seq)[-MAX_ENTRIES:]
    state.write_json(record_name(history.runtime, history.target),
                     {"version": VERSION, "runtime": history.runtime, "target": history.target,
                      "seq": history.seq, "images": [e.to_json() for e in images]})


def record(state: StateDir, runtime: str, target: str, published: Iterable[Tuple[str, str, str]],
           when: str, bundle: str) -> None:
    """Add what one import published: ``(runtime name, digest, bundle image name)``.

    One sequence number per import. The same name and digest recorded again replaces its
    older entry; a name now pointing elsewhere keeps the old one, for the image it named
    may still be there (Docker keeps it, untagged) and is ours to remove.
    """
    published = list(published)
    if not published:
        return
    old = load(state, runtime, target)
    seq = old.seq + 1
    pairs = {(name, digest) for name, digest, _ in published}
    kept: List[Imported] = [e for e in old.images if (e.name, e.digest) not in pairs]
    kept += [Imported(name, digest, image, when, seq, bundle) for name, digest, image in published]
    save(state, History(runtime, target, seq, tuple(kept)))


def forget(state: StateDir, history: History, keep: Iterable[Imported]) -> None:
    """Keep only ``keep`` (what is still on the device); the sequence never goes back."""
    keep = tuple(keep)
    if keep != history.images:
        save(state, History(history.runtime, history.target, history.seq, keep))
