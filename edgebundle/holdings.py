"""What a device holds, and the one set of rules that decides what counts as held.

The packer's planner and the device's importer both ask these questions, and they must
get the same answers: if the planner thinks a layer is held and the importer does not,
a bundle is refused; the other way round, an image is left unrunnable.

A layer counts as held only in the form the site's runtime can use:

* containerd: the compressed blob is in the content store (it can be unpacked onto any
  parent), or the layer's chain is already unpacked as a committed snapshot;
* Docker: the layer's chain is in the layer store (``docker load`` skips a layer whose
  chainID exists without opening its file, and has no use for blobs);
* Podman: some layer in its store was made from that very blob (containers/image reuses
  a layer by its compressed digest, or by its diff_id for an uncompressed blob, on any
  parent); ``blobs`` lists those digests. A layer held only under another blob is not
  reused without its blob, so it is not held.

An image counts as held only when it is complete, under its own name, with the same
content: containerd by target (top) digest, Docker by image ID (config digest) under the
tag ``naming.docker_tag`` gives it, Podman by both the top digest it records for the image
(``manifest``) and the image ID, under that same tag.

Pure: no I/O. Device-safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple

from .format import RUNTIME_DOCKER, RUNTIME_PODMAN, Prerequisite
from .naming import comparable_name, docker_tag
from .oci import Descriptor


@dataclass(frozen=True)
class HeldLayer:
    diff_id: str
    digest: Optional[str] = None  # compressed blob digest, when the runtime knows it
    size: Optional[int] = None
    blob: bool = False  # the compressed blob is in the content store (containerd)
    unpacked: bool = False  # the layer's chain is applied (containerd snapshot / docker layer)
    # the device can rebuild the layer's exact tar (containerd: from its blob; Docker:
    # tar-split + layer dir), so a delta may copy byte ranges of it
    tar: bool = False


@dataclass(frozen=True)
class HeldImage:
    name: str
    config: str  # config digest == Docker image ID
    target: Optional[Descriptor] = None  # containerd image target (index or manifest)
    manifest: Optional[str] = None  # platform manifest digest, where known
    platform: Optional[str] = None
    complete: bool = True  # every layer usable by the runtime
    layers: Tuple[HeldLayer, ...] = ()


@dataclass(frozen=True)
class Inventory:
    """What one device holds, as read back from its runtime."""

    runtime: str
    namespace: Optional[str] = None
    images: Tuple[HeldImage, ...] = ()
    blobs: FrozenSet[str] = frozenset()  # content-store digests (containerd); Podman: the
    # blob digests its layers were made from (compressed, or the diff_id when uncompressed)
    chains: FrozenSet[str] = frozenset()  # applied layer chains (snapshots / docker layers)
    generated_at: str = ""
    host: str = ""
    # Bundle features the device's edgebundle reads (report key "features"); a packer
    # sends a delta only to a device that lists "tar-delta-v1".
    features: FrozenSet[str] = frozenset()
    # Key ids the device's trust policy accepts (report key "signatures"): empty when it
    # enforces none, None when the report predates signatures.
    trusted_keys: Optional[FrozenSet[str]] = None
    extra: Dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def empty(cls, runtime: str, namespace: Optional[str] = None) -> "Inventory":
        return cls(runtime=runtime, namespace=namespace)


class Holdings:
    """An inventory with the questions plan and import ask of it (indexed once)."""

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self.runtime = inventory.runtime
        self._by_name: Dict[str, List[HeldImage]] = {}
        for held in inventory.images:
            if held.complete:  # an incomplete image is not held, whatever its name says
                self._by_name.setdefault(comparable_name(held.name), []).append(held)

    def image(self, name: str, top: str, config: str) -> Optional[HeldImage]:
        """The complete image named ``name`` holding this content, if the site has it."""
        docker = self.runtime == RUNTIME_DOCKER
        podman = self.runtime == RUNTIME_PODMAN
        want = comparable_name(docker_tag(name) if docker or podman else name)
        for held in self._by_name.get(want, ()):
            if podman:
                if held.config == config and held.manifest == top:
                    return held
            elif docker:
                if held.config == config:
                    return held
            elif held.target is not None and held.target.digest == top:
                return held
        return None

    def layer(self, digest: str, chain_id: str) -> bool:
        """Whether the layer with blob ``digest`` at chain ``chain_id`` is usable here."""
        if self.runtime == RUNTIME_DOCKER:
            return chain_id in self.inventory.chains
        if self.runtime == RUNTIME_PODMAN:
            return digest in self.inventory.blobs
        return digest in self.inventory.blobs or chain_id in self.inventory.chains

    def satisfies(self, prerequisite: Prerequisite) -> bool:
        return self.layer(prerequisite.digest, prerequisite.chain_id)

    def missing(self, prerequisites: Iterable[Prerequisite]) -> List[Prerequisite]:
        """The prerequisites this site does not satisfy, in order."""
        return [p for p in prerequisites if not self.satisfies(p)]

    def missing_names(self, prerequisites: Iterable[Prerequisite]) -> List[str]:
        """What to name for each missing prerequisite: the blob (containerd) or diff_id."""
        docker = self.runtime == RUNTIME_DOCKER
        return [p.diff_id if docker else p.digest for p in self.missing(prerequisites)]
