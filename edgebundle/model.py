"""Values that flow between stages: platforms, descriptors, resolved images, inventories.

Frozen dataclasses and pure functions only; no I/O. Shared by packer and device.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple

from .errors import UsageError
from .reference import SHA256_RE, Reference

# Media types we understand. Docker schema2 and OCI are treated alike.
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

MANIFEST_TYPES = frozenset({MT_DOCKER_MANIFEST, MT_OCI_MANIFEST})
INDEX_TYPES = frozenset({MT_DOCKER_LIST, MT_OCI_INDEX})
LAYER_TYPES = frozenset({
    MT_DOCKER_LAYER_GZIP, MT_OCI_LAYER, MT_OCI_LAYER_GZIP, MT_OCI_LAYER_ZSTD,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
})

RUNTIMES = ("containerd", "docker")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str, what: str = "digest") -> str:
    """Return ``digest`` if it is ``sha256:<64 hex>``; other algorithms are refused."""
    if not isinstance(digest, str) or not SHA256_RE.match(digest):
        raise ValueError(f"{what} {digest!r} is not sha256:<64 lowercase hex>")
    return digest


def chain_ids(diff_ids: Iterable[str]) -> Tuple[str, ...]:
    """OCI ChainIDs: ChainID(L0)=DiffID(L0); ChainID(Ln)=sha256(ChainID(Ln-1) + " " + DiffID(Ln)).

    Docker's layer store and containerd's snapshots are both keyed by these.
    """
    out: List[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append(sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return tuple(out)


@functools.lru_cache(maxsize=16384)
def _chain_ids_cached(diff_ids: Tuple[str, ...]) -> Tuple[str, ...]:
    # Planning a fleet asks for the same images' chains once per site.
    return chain_ids(diff_ids)


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm"}


@dataclass(frozen=True, order=True)
class Platform:
    """``os/architecture[/variant]``, normalised as containerd's platforms package does."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"invalid platform {text!r}", "write it as os/arch[/variant], e.g. linux/arm64")
        os_, arch = parts[0], _ARCH_ALIASES.get(parts[1], parts[1])
        variant = parts[2] if len(parts) == 3 else ""
        return cls(os_, arch, variant).normalized()

    @classmethod
    def from_json(cls, obj: Dict[str, object]) -> "Platform":
        return cls(str(obj.get("os", "")), _ARCH_ALIASES.get(str(obj.get("architecture", "")),
                   str(obj.get("architecture", ""))), str(obj.get("variant", "") or "")).normalized()

    def normalized(self) -> "Platform":
        variant = self.variant
        # arm64's only variant is v8, and arm defaults to v7: containerd treats them as equal.
        if self.architecture == "arm64" and variant == "v8":
            variant = ""
        if self.architecture == "arm" and variant == "":
            variant = "v7"
        return Platform(self.os, self.architecture, variant)

    def matches(self, other: "Platform") -> bool:
        return self.normalized() == other.normalized()

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor (the subset we keep)."""

    media_type: str
    digest: str
    size: int

    def to_json(self) -> Dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    @classmethod
    def from_json(cls, obj: Dict[str, object]) -> "Descriptor":
        return cls(str(obj.get("mediaType", "")), check_digest(str(obj.get("digest"))), int(obj["size"]))  # type: ignore[call-overload]


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
        """The name the image gets on the device (see ``device_name``)."""
        return device_name(self.ref)

    @property
    def chain_ids(self) -> Tuple[str, ...]:
        return _chain_ids_cached(tuple(layer.diff_id for layer in self.layers))

    @property
    def json_blobs(self) -> Tuple[Descriptor, ...]:
        """Index (if any), manifest and config: the small blobs that describe the image."""
        blobs = [self.top] if self.top.digest != self.manifest.digest else []
        return tuple(blobs + [self.manifest, self.config])


def device_name(ref: Reference) -> str:
    """Name an image gets in the runtime: ``repo:tag``, or ``repo@digest`` when pinned.

    This is what ``ctr pull``/CRI name a pull by tag or by digest.
    """
    if ref.digest:
        return f"{ref.repository}@{ref.digest}"
    return f"{ref.repository}:{ref.tag or 'latest'}"


@functools.lru_cache(maxsize=65536)
def docker_tag(name: str) -> str:
    """The tag an image named ``name`` gets in Docker.

    ``docker load`` can only tag, not record a registry digest, so ``repo@sha256:hex``
    becomes ``repo:sha256-hex`` (a tag keeps it safe from ``docker image prune``).
    """
    from .reference import parse_reference

    ref = parse_reference(name)
    if ref.digest:
        return f"{ref.repository}:{ref.digest.replace(':', '-')}"
    return f"{ref.repository}:{ref.tag}"


# ---------------------------------------------------------------------------
# Inventory: what a device holds, as its runtime reports it.


@dataclass(frozen=True)
class HeldLayer:
    diff_id: str
    digest: Optional[str] = None  # compressed blob digest, when the runtime knows it
    size: Optional[int] = None
    blob: bool = False  # the compressed blob is in the content store (containerd)
    unpacked: bool = False  # the layer's chain is applied (containerd snapshot / docker layer)


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
    blobs: FrozenSet[str] = frozenset()  # content-store digests (containerd)
    chains: FrozenSet[str] = frozenset()  # applied layer chains (snapshots / docker layers)
    generated_at: str = ""
    host: str = ""
    extra: Dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def empty(cls, runtime: str, namespace: Optional[str] = None) -> "Inventory":
        return cls(runtime=runtime, namespace=namespace)


# ---------------------------------------------------------------------------
# The manifest list, as loaded from YAML by ``manifest.py`` (packer side).


@dataclass(frozen=True)
class RegistryConfig:
    """Per-registry settings. Plain HTTP only where ``insecure`` is declared."""

    host: str
    insecure: bool = False
    mirrors: Tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageSpec:
    """One entry of ``images:``.

    ``reference`` is the normalised name the image gets on the device. ``source`` is
    ``None`` for a registry, or ``docker-archive:PATH`` / ``oci-layout:PATH`` for offline
    sources (then ``reference`` still names the image on the device).
    """

    ref: str
    reference: Reference
    source: Optional[str] = None
    platform: Optional[Platform] = None  # overrides the site's platform
    sites: Tuple[str, ...] = ()  # empty: every site
    line: int = 0  # line in the manifest file, for error messages


@dataclass(frozen=True)
class SiteSpec:
    name: str
    runtime: str  # "containerd" | "docker"
    platform: Platform
    namespace: Optional[str] = None  # containerd only; default "default"
    ssh: Optional[str] = None  # [user@]host[:port] or a ~/.ssh/config Host alias
    report_command: Optional[str] = None  # run over SSH by `inventory pull`
    line: int = 0


@dataclass(frozen=True)
class ManifestList:
    path: str
    images: Tuple[ImageSpec, ...]
    sites: Dict[str, SiteSpec]
    registries: Dict[str, RegistryConfig]

    def images_for(self, site: str) -> Tuple[ImageSpec, ...]:
        return tuple(i for i in self.images if not i.sites or site in i.sites)

    def registry(self, host: str) -> RegistryConfig:
        return self.registries.get(host) or RegistryConfig(host)
