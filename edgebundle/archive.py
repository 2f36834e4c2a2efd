"""Image archives for runtimes that never run edgebundle: OCI layout and docker-archive tars.

One home for what such an archive holds and how it is laid out:

- **OCI image layout** (``oci-layout``, ``blobs/sha256/…``, ``index.json``): what
  ``ctr images import``, k3s's images directory and ``podman load`` read. Every blob is
  the registry's own bytes, so every digest (index, manifest, config, layers) survives.
- **docker-archive** (``manifest.json`` naming a config and layer files per image): what
  ``docker load`` and ``podman load`` read. Docker keys on the config digest (the image
  ID) and the diff_ids; a manifest or index means nothing to it and is left out.

Standard library only (plus the device-safe ``oci``/``naming`` vocabulary): the device
side may write these too. Blobs stream through ``TarStream`` piece by piece (the size
each tar header needs is known from the descriptors), nothing is buffered whole, and
each blob is written once however many images share it. The caller supplies the bytes
(``BlobSource``) and the sink; compressing the whole file is the caller's business.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple

from .errors import UsageError
from .naming import docker_tag
from .oci import MT_OCI_INDEX, Descriptor
from .tarstream import TarStream, blob_path

#: ``ctr images import`` (and k3s, through containerd's importer) names an image after this
#: annotation of its index.json entry.
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
#: The OCI annotation; podman names what it loads from an OCI archive after it.
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


@dataclass(frozen=True)
class ArchiveLayer:
    """A layer as the registry serves it (``digest``/``size``) and as a tar (diff_id)."""

    media_type: str
    digest: str
    size: int
    diff_id: str
    tar_size: int
    #: whether docker-archive consumers read the blob as it is (gzip or a plain tar); a
    #: zstd blob goes into a docker-archive as its tar (dockerd before 23 reads no zstd)
    docker_readable: bool = True


@dataclass(frozen=True)
class ArchiveImage:
    """One image of the archive: the name it gets, and its content for one platform.

    ``top`` is what the registry's reference names (an index or a manifest); ``manifest``
    is the platform's manifest (the same as ``top`` for a single-platform image).
    """

    name: str
    top: Descriptor
    manifest: Descriptor
    config: Descriptor
    layers: Tuple[ArchiveLayer, ...]
    platform: str


class BlobSource(Protocol):
    """Where the archive's bytes come from (the packer: its verified blob cache)."""

    def blob(self, digest: str) -> Iterable[bytes]:
        """The blob ``digest`` as the registry serves it, in pieces."""

    def layer_tar(self, layer: ArchiveLayer) -> Iterable[bytes]:
        """The uncompressed tar of ``layer`` (``layer.tar_size`` bytes), in pieces."""


#: Called with the byte count of each piece of blob data written (a progress bar).
Progress = Callable[[int], object]


@dataclass(frozen=True)
class Member:
    """One file of the archive: its path, size, and what fills it."""

    path: str
    size: int
    digest: str  # the blob it holds (a layer tar: its diff_id)
    tar_of: Optional[ArchiveLayer] = None  # set: the member is this layer's uncompressed tar


# ---------------------------------------------------------------------------
# Formats, and the compression each one's consumers read (pure)

K3S_AIRGAP = "k3s-airgap"
DOCKER_ARCHIVE = "docker-archive"
OCI_ARCHIVE = "oci-archive"
FORMATS = (K3S_AIRGAP, DOCKER_ARCHIVE, OCI_ARCHIVE)

NONE, GZIP, ZSTD = "none", "gzip", "zstd"

#: What k3s imports from /var/lib/rancher/k3s/agent/images/ (its watcher matches these
#: endings case-sensitively; it also reads .tar.lz4 and .tar.bz2, which we do not write).
#: Any other file there is ignored without a word, so such a name is refused.
K3S_SUFFIXES = ((".tar", NONE), (".tar.gz", GZIP), (".tgz", GZIP), (".tar.zst", ZSTD),
                (".tzst", ZSTD))

#: The largest zstd window k3s decodes (its decoder's memory limit, 32 MiB): a frame with a
#: bigger window fails there with "window size exceeded".
K3S_MAX_WINDOW_LOG = 25


def compression_for(fmt: str, path: str) -> str:
    """How ``path`` (``-`` for standard output) is compressed: by its ending, as the format's
    consumers accept it; an ending they would not read is a ``UsageError``.

    Measured (README, "Exports"): ``ctr images import`` (containerd 1.6) reads only a plain
    tar; k3s decompresses by file name; ``docker load`` (dockerd 20.10) reads gzip but not
    zstd; ``podman load`` (4.3) reads a zstd docker-archive but not a gzip one, and both
    for an OCI archive.
    """
    if path == "-":
        return NONE
    name = path.rsplit("/", 1)[-1]
    lower = name.lower()
    kind = ZSTD if lower.endswith((".zst", ".tzst")) else \
        GZIP if lower.endswith((".gz", ".tgz")) else NONE
    if fmt == K3S_AIRGAP:
        for suffix, how in K3S_SUFFIXES:
            if name.endswith(suffix):
                return how
        raise UsageError(f"k3s ignores {name} in its images directory: it imports only "
                         "files ending in " + ", ".join(s for s, _ in K3S_SUFFIXES),
                         f"name the output e.g. {_stem(name)}.tar.zst")
    if fmt == DOCKER_ARCHIVE and kind == ZSTD:
        raise UsageError(f"docker load cannot read {name}: dockerd before 23.0 (Debian 12 ships "
                         "20.10) reads no zstd archive",
                         f"write {_stem(name)}.tar (or .tar.gz for docker load only)")
    if fmt == OCI_ARCHIVE and kind != NONE:
        raise UsageError(f"ctr images import cannot read {name}: it reads only a plain tar",
                         f"write {_stem(name)}.tar, or use --format k3s-airgap (k3s decompresses "
                         "by file name)")
    return kind


def _stem(name: str) -> str:
    for suffix in (".tar.gz", ".tar.zst", ".tgz", ".tzst", ".gz", ".zst", ".tar"):
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


# ---------------------------------------------------------------------------
# What goes in (pure)


def oci_index(images: Sequence[ArchiveImage], *, platform_manifests: bool = False) -> bytes:
    """``index.json``: one entry per image, named for containerd and for podman.

    ``platform_manifests`` names each image's platform manifest instead of the registry's
    top (an index whose other platforms the archive does not hold). Both annotations carry
    the full name: containerd reads its own, podman the OCI one.
    """
    entries = []
    for img in images:
        desc = img.manifest if platform_manifests else img.top
        entries.append(dict(desc.to_json(), annotations={
            ANNOTATION_CONTAINERD_NAME: img.name, ANNOTATION_REF_NAME: img.name}))
    return json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": entries},
                      sort_keys=True).encode()


def oci_members(images: Sequence[ArchiveImage], *, platform_manifests: bool = False) -> List[Member]:
    """Every blob of an OCI layout, once each: describing blobs first, then layers."""
    seen: Dict[str, Member] = {}
    for img in images:
        descs: List[Descriptor] = []
        if not platform_manifests and img.top.digest != img.manifest.digest:
            descs.append(img.top)
        descs += [img.manifest, img.config]
        for desc in descs:
            seen.setdefault(desc.digest, Member(blob_path(desc.digest), desc.size, desc.digest))
    for img in images:
        for layer in img.layers:
            seen.setdefault(layer.digest, Member(blob_path(layer.digest), layer.size, layer.digest))
    return list(seen.values())


def docker_layer_member(layer: ArchiveLayer) -> Member:
    """A layer's file in a docker-archive: the registry blob, or its tar when unreadable."""
    if layer.docker_readable:
        return Member(blob_path(layer.digest), layer.size, layer.digest)
    return Member(blob_path(layer.diff_id), layer.tar_size, layer.diff_id, tar_of=layer)


def docker_members(images: Sequence[ArchiveImage]) -> List[Member]:
    """Configs and layer files of a docker-archive, once each."""
    seen: Dict[str, Member] = {}
    for img in images:
        path = blob_path(img.config.digest)
        seen.setdefault(path, Member(path, img.config.size, img.config.digest))
    for img in images:
        for layer in img.layers:
            member = docker_layer_member(layer)
            seen.setdefault(member.path, member)
    return list(seen.values())


def docker_manifest(images: Sequence[ArchiveImage]) -> bytes:
    """``manifest.json`` of a docker-archive: config, tag and layer files per image.

    Docker can only tag, so a digest-pinned name becomes ``repo:sha256-<hex>``
    (``naming.docker_tag``, as ``edgebundle import`` does).
    """
    return json.dumps([{"Config": blob_path(img.config.digest), "RepoTags": [docker_tag(img.name)],
                        "Layers": [docker_layer_member(layer).path for layer in img.layers]}
                       for img in images]).encode()


def content_bytes(members: Iterable[Member]) -> int:
    """The blob bytes an archive of ``members`` carries (what progress counts to)."""
    return sum(m.size for m in members)


# ---------------------------------------------------------------------------
# Writing (streams)


def _pieces(member: Member, source: BlobSource, progress: Optional[Progress]) -> Iterator[bytes]:
    pieces = source.layer_tar(member.tar_of) if member.tar_of is not None else source.blob(member.digest)
    for piece in pieces:
        if progress is not None:
            progress(len(piece))
        yield piece


def write_oci(images: Sequence[ArchiveImage], source: BlobSource, sink: object, *,
              platform_manifests: bool = False, progress: Optional[Progress] = None) -> None:
    """Write an OCI image layout tar of ``images`` to ``sink`` (anything with ``write``).

    ``platform_manifests`` is the k3s flavour. k3s imports with all platforms, so an index
    whose other platforms' blobs are absent fails the whole file ("content digest … not
    found", measured with ``ctr images import --all-platforms`` on containerd 1.6; k3s
    skips missing content only since containerd 2); naming the platform's manifest imports
    everywhere, at the cost of the index digest.

    ``oci-layout`` comes first and ``index.json`` last, as ``edgebundle import`` sends them:
    a consumer reading the stream sees the names only once every blob is there.
    """
    tar = TarStream(sink)
    tar.add_bytes("oci-layout", OCI_LAYOUT)
    for member in oci_members(images, platform_manifests=platform_manifests):
        tar.add(member.path, member.size, _pieces(member, source, progress))
    tar.add_bytes("index.json", oci_index(images, platform_manifests=platform_manifests))
    tar.close()


def write_docker(images: Sequence[ArchiveImage], source: BlobSource, sink: object, *,
                 progress: Optional[Progress] = None) -> None:
    """Write a docker-archive tar of ``images`` to ``sink``; ``manifest.json`` comes last."""
    tar = TarStream(sink)
    for member in docker_members(images):
        tar.add(member.path, member.size, _pieces(member, source, progress))
    tar.add_bytes("manifest.json", docker_manifest(images))
    tar.close()
