"""``edgebundle export``: a site's images as one archive its runtime loads without edgebundle.

Resolved exactly as ``pack`` resolves them (``PackerSession``: the manifest list, the site's
images and platform, the registry client or offline sources, the verified blob cache),
then every layer is fetched and the archive streams from the cache into ``-o``: a k3s
airgap tarball, a docker-archive or an OCI archive (``archive``), compressed as the file
name says where its consumers read that (``archive.compression_for``). Each blob is
hashed again as it streams, so a cache blob damaged since it was fetched never ships.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import zstandard

from .. import archive
from ..archive import ArchiveImage, ArchiveLayer
from ..cache import BlobCache
from ..compression import MAGIC_BYTES, ZSTD, classify, decompress_stream
from ..errors import UsageError
from ..files import IO_CHUNK, Sink, check_output, is_stream_target, open_output, read_pieces
from ..image import ResolvedImage
from ..manifest import load_manifest
from ..naming import comparable_name
from ..progress import NULL_BAR, Bar, close_bar
from ..resolve import DEFAULT_JOBS, ProgressFactory
from ..space import check_packer
from .packer import PackerSession

log = logging.getLogger(__name__)

#: zstd level when none is given: fast, and within a few percent of level 19 on layers
#: that are gzip already (the bulk of an archive).
DEFAULT_ZSTD_LEVEL = 3
DEFAULT_GZIP_LEVEL = 6


@dataclass(frozen=True)
class ExportOutcome:
    """A written archive: what it holds and what it cost."""

    output: str
    format: str
    compression: str
    site: str
    platform: str
    images: Tuple[ArchiveImage, ...]
    content_bytes: int  # blob bytes in the archive (before compression)
    file_bytes: int  # bytes written to the output
    #: index.json names each image's platform manifest rather than the registry's top
    #: (k3s-airgap: k3s imports every platform an index names, see ``archive.write_oci``)
    platform_manifests: bool


def archive_image(image: ResolvedImage, cache: BlobCache) -> ArchiveImage:
    """The archive's view of a resolved image whose layers are in ``cache``."""
    layers = []
    for layer in image.layers:
        with cache.open(layer.digest) as fh:
            head = fh.read(MAGIC_BYTES)
        layers.append(ArchiveLayer(layer.media_type, layer.digest, layer.size, layer.diff_id,
                                   layer.tar_size,
                                   docker_readable=classify(layer.media_type, head) != ZSTD))
    return ArchiveImage(image.name, image.top, image.manifest, image.config, tuple(layers),
                        str(image.platform))


class CacheSource:
    """``archive.BlobSource`` over the packer's cache, checking every byte it hands out."""

    def __init__(self, cache: BlobCache) -> None:
        self.cache = cache

    def blob(self, digest: str) -> Iterator[bytes]:
        hasher = hashlib.sha256()
        with self.cache.open(digest) as fh:
            for piece in read_pieces(fh):
                hasher.update(piece)
                yield piece
        if "sha256:" + hasher.hexdigest() != digest:
            raise self.cache.damaged(digest)

    def layer_tar(self, layer: ArchiveLayer) -> Iterator[bytes]:
        hasher = hashlib.sha256()
        with self.cache.open(layer.digest) as fh:
            kind = classify(layer.media_type, fh.read(MAGIC_BYTES))
            fh.seek(0)
            try:
                for piece in decompress_stream(fh, kind):
                    hasher.update(piece)
                    yield piece
            except (OSError, EOFError, zlib.error, zstandard.ZstdError):
                raise self.cache.damaged(layer.digest) from None
        if "sha256:" + hasher.hexdigest() != layer.diff_id:
            raise self.cache.damaged(layer.digest)


class _Counting:
    """Counts what reaches the output (the file's size, compressed or not)."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return self._sink.write(data)


class _Compressing:
    """A sink that compresses into another: zlib (gzip container) or zstd, streamed.

    zstd's window is held to what k3s decodes (``archive.K3S_MAX_WINDOW_LOG``); writes are
    gathered into about 1 MiB per call so the compressor sees no tiny pieces.
    """

    def __init__(self, sink: _Counting, kind: str, level: int, threads: int) -> None:
        self._sink = sink
        self._buf = bytearray()
        if kind == archive.GZIP:
            self._z: "zlib._Compress | zstandard.ZstdCompressionObj" = \
                zlib.compressobj(level, zlib.DEFLATED, 31)
        else:
            params = zstandard.ZstdCompressionParameters.from_level(level, threads=threads)
            if params.window_log > archive.K3S_MAX_WINDOW_LOG:
                params = zstandard.ZstdCompressionParameters.from_level(
                    level, threads=threads, window_log=archive.K3S_MAX_WINDOW_LOG)
            self._z = zstandard.ZstdCompressor(compression_params=params).compressobj()

    def write(self, data: bytes) -> int:
        self._buf += data
        if len(self._buf) >= IO_CHUNK:
            self._push()
        return len(data)

    def _push(self) -> None:
        out = self._z.compress(bytes(self._buf))
        self._buf.clear()
        if out:
            self._sink.write(out)

    def close(self) -> None:
        self._push()
        self._sink.write(self._z.flush())


def write_archive(fmt: str, images: Sequence[ArchiveImage], source: archive.BlobSource,
                  sink: object, progress: Optional[archive.Progress] = None) -> None:
    """The one switch from a format to its writer."""
    if fmt == archive.DOCKER_ARCHIVE:
        archive.write_docker(images, source, sink, progress=progress)
    else:
        archive.write_oci(images, source, sink, progress=progress,
                          platform_manifests=fmt == archive.K3S_AIRGAP)


def members(fmt: str, images: Sequence[ArchiveImage]) -> List[archive.Member]:
    if fmt == archive.DOCKER_ARCHIVE:
        return archive.docker_members(images)
    return archive.oci_members(images, platform_manifests=fmt == archive.K3S_AIRGAP)


def export_site(home: Path, manifest_path: str, site_name: str, fmt: str, output: str, *,
                level: Optional[int] = None, threads: int = 0, only: Sequence[str] = (),
                progress: Optional[ProgressFactory] = None, jobs: int = DEFAULT_JOBS) -> ExportOutcome:
    """Write ``site_name``'s images, for its platform, as a ``fmt`` archive to ``output``.

    ``only``: just these of the site's images (as the manifest names them), e.g. one per
    archive for ``podman load``, which reads one image from an OCI archive. ``jobs``:
    layer downloads at once (``Resolver.fetch_layers``).

    The output's name and directory are checked before anything is fetched; a regular
    file is replaced atomically, so a failed export leaves no partial archive behind.
    """
    compression = archive.compression_for(fmt, output)  # a wrong name fails before any work
    clevel = _level(compression, level)
    what = f"{fmt} archive " + ("to standard output" if output == "-" else output)
    check_output(output, what)
    factory = progress or _no_bar
    with PackerSession(home, load_manifest(manifest_path), progress=progress, jobs=jobs) as session:
        site = session.site(site_name)
        resolved = select(session.resolve(site), only, site.name)
        digests = {layer.digest for img in resolved for layer in img.layers}
        fetch = sum({la.digest: la.size for img in resolved for la in img.layers
                     if not session.cache.has(la.digest)}.values())
        estimate = sum({la.digest: la.size for img in resolved for la in img.layers}.values())
        check_packer(str(session.cache.root), fetch,
                     None if is_stream_target(output) else output, estimate,
                     output_what="archive output", doing="this export")
        fetched = session.resolver.fetch_layers(resolved, digests, progress_factory=progress)
        images = tuple(archive_image(img, session.cache) for img in fetched)
        content = archive.content_bytes(members(fmt, images))
        log.info("export %s for site %s (%s): %d image(s), %d bytes of blobs, %s", fmt,
                 site.name, site.platform, len(images), content,
                 "uncompressed" if compression == archive.NONE else compression)
        workers = threads if threads > 0 else (os.cpu_count() or 1)
        bar = factory(content, "export")
        try:
            with open_output(output, what) as out:
                counted = _Counting(out)
                if compression == archive.NONE:
                    write_archive(fmt, images, CacheSource(session.cache), counted, bar.update)
                else:
                    comp = _Compressing(counted, compression, clevel, workers)
                    write_archive(fmt, images, CacheSource(session.cache), comp, bar.update)
                    comp.close()
        finally:
            close_bar(bar)
    log.info("wrote %s: %d bytes", what, counted.count)
    return ExportOutcome(output, fmt, compression, site.name, str(site.platform), images,
                         content, counted.count, fmt == archive.K3S_AIRGAP)


def select(images: Sequence[ResolvedImage], only: Sequence[str], site: str) -> List[ResolvedImage]:
    """The images named in ``only`` (all when empty); a name the site lacks is an error."""
    if not only:
        return list(images)
    by_name = {comparable_name(img.name): img for img in images}
    for img in images:  # the manifest's own spelling too (``busybox`` for docker.io/library/…)
        by_name.setdefault(str(img.ref), img)
    picked: List[ResolvedImage] = []
    for name in only:
        found = by_name.get(comparable_name(name)) or by_name.get(name)
        if found is None:
            raise UsageError(f"site {site} has no image {name}",
                             "pick one of: " + ", ".join(i.name for i in images))
        if found not in picked:
            picked.append(found)
    return picked


def _level(kind: str, level: Optional[int]) -> int:
    if level is None:
        return DEFAULT_GZIP_LEVEL if kind == archive.GZIP else DEFAULT_ZSTD_LEVEL
    if kind == archive.GZIP and level > 9:
        raise UsageError(f"--level {level} is not a gzip level", "gzip levels are 1-9")
    return level


def _no_bar(total: int, desc: str) -> Bar:
    return NULL_BAR
