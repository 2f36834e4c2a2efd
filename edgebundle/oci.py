"""The OCI image-spec vocabulary: digests, chain IDs, platforms, descriptors, media types.

Frozen values and pure functions only; no I/O. Shared by packer and device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Tuple

from .errors import UsageError
from .reference import SHA256_RE

# Media types we understand. Docker schema2 and OCI are treated alike.
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MT_DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"

MANIFEST_TYPES = frozenset({MT_DOCKER_MANIFEST, MT_OCI_MANIFEST})
INDEX_TYPES = frozenset({MT_DOCKER_LIST, MT_OCI_INDEX})


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: object, what: str = "digest") -> str:
    """Return ``digest`` if it is ``sha256:<64 hex>``; anything else raises ValueError."""
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


def describing_blobs(top: "Descriptor", manifest: "Descriptor",
                     config: "Descriptor") -> Tuple["Descriptor", ...]:
    """Index (if the top is one), manifest and config, each once: what describes an image."""
    return ((top,) if top.digest != manifest.digest else ()) + (manifest, config)


def is_manifest_or_index(media_type: str) -> bool:
    """A manifest or index media type (Docker or OCI, or an unknown one shaped like it)."""
    return media_type in MANIFEST_TYPES or media_type in INDEX_TYPES or \
        "manifest" in media_type or "index" in media_type


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
    def from_json(cls, obj: Mapping[str, object]) -> "Platform":
        """From an index entry's ``platform`` or an image config (os, architecture, variant)."""
        arch = str(obj.get("architecture", "") or "")
        return cls(str(obj.get("os", "") or ""), _ARCH_ALIASES.get(arch, arch),
                   str(obj.get("variant", "") or "")).normalized()

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
    def from_json(cls, obj: object) -> "Descriptor":
        """Parse ``{mediaType, digest, size}``; raise ValueError naming what is wrong."""
        if not isinstance(obj, Mapping):
            raise ValueError("a descriptor must be an object")
        media_type = obj.get("mediaType", "")
        size = obj.get("size")
        if not isinstance(media_type, str):
            raise ValueError(f"descriptor mediaType {media_type!r} is not a string")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"descriptor size {size!r} is not a non-negative integer")
        return cls(media_type, check_digest(obj.get("digest"), "descriptor digest"), size)
