"""ImageSpec x Platform -> ResolvedImage, and getting the layers a plan needs.

Resolving reads only the small JSON blobs (index, manifest, config) and keeps their raw
bytes in the ``BlobCache``: planning needs nothing else, and a spec pinned by digest
whose blobs are cached resolves without touching the network. ``fetch_layers`` later
fetches just the layer blobs a bundle ships, and decompresses each once to learn its
diff_id and tar size (recorded in the cache, so never twice).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import zlib
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import replace
from typing import AbstractSet, Any, BinaryIO, Callable, Dict, Iterable, List, Mapping, \
    Optional, Protocol, Sequence, Set, Tuple, TypeVar

import zstandard

from .cache import BlobCache
from .compression import MAGIC_BYTES, classify, decompress_stream
from .errors import CacheError, EdgebundleError, ResolveError, UsageError
from .image import Layer, ResolvedImage
from .progress import NULL_BAR, Bar, close_bar
from .oci import INDEX_TYPES, MANIFEST_TYPES, Descriptor, Platform, check_digest
from .reference import Reference, parse_reference
from .specs import ImageSpec
from .registry.client import RegistryClient, guess_media_type
from .sources import OfflineSource, open_source

log = logging.getLogger(__name__)



#: Layer downloads at once by default: Docker's ``max-concurrent-downloads``.
DEFAULT_JOBS = 3

#: ``progress_factory(total_bytes, description)`` -> a bar with ``update(n)``
#: (``tqdm`` fits; ``close()`` is called when it exists).
ProgressFactory = Callable[[int, str], Bar]


def _no_progress(total: int, desc: str) -> Bar:
    return NULL_BAR


# ---------------------------------------------------------------------------
# Where an image's blobs come from.


class _Origin(Protocol):
    def manifest(self, digest: str) -> bytes:
        """Verified bytes of the manifest ``digest``."""

    def blob_into_cache(self, digest: str, size: int, cache: BlobCache,
                        progress: Optional[Callable[[int], None]],
                        layer_media_type: Optional[str] = None) -> None:
        """Put the blob ``digest`` into ``cache`` (verified); a layer (``layer_media_type``)
        has its diff_id and tar size recorded on the way."""


class _RegistryOrigin:
    def __init__(self, client: RegistryClient, ref: Reference) -> None:
        self._client = client
        self._ref = ref

    def manifest(self, digest: str) -> bytes:
        return self._client.get_manifest(self._ref.with_digest(digest))[0]

    def blob_into_cache(self, digest: str, size: int, cache: BlobCache,
                        progress: Optional[Callable[[int], None]],
                        layer_media_type: Optional[str] = None) -> None:
        self._client.fetch_blob(self._ref, digest, size, cache, progress, layer_media_type)


class _SourceOrigin:
    def __init__(self, source: OfflineSource) -> None:
        self._source = source

    def manifest(self, digest: str) -> bytes:
        return self._source.read_blob(digest)

    def blob_into_cache(self, digest: str, size: int, cache: BlobCache,
                        progress: Optional[Callable[[int], None]],
                        layer_media_type: Optional[str] = None) -> None:
        self._source.copy_blob(digest, size, cache, progress, layer_media_type)


class _NoRegistry:
    """Stands in for a registry when the resolver has no client: fails, naming the image."""

    def __init__(self, ref: Reference) -> None:
        self._ref = ref

    def _fail(self) -> ResolveError:
        return ResolveError(f"image {self._ref} is not fully cached and no registry client is configured",
                            "resolve it once with registry access, or pin it by digest after caching it")

    def manifest(self, digest: str) -> bytes:
        raise self._fail()

    def blob_into_cache(self, digest: str, size: int, cache: BlobCache,
                        progress: Optional[Callable[[int], None]],
                        layer_media_type: Optional[str] = None) -> None:
        raise self._fail()


# ---------------------------------------------------------------------------


class Resolver:
    """Resolves image specs against registries or offline sources, through a BlobCache."""

    def __init__(self, cache: BlobCache, client: Optional[RegistryClient] = None, *,
                 jobs: int = DEFAULT_JOBS) -> None:
        """Args:
            cache: where index/manifest/config/layer blobs are kept.
            client: registry access; None resolves only offline sources and images
                pinned by digest whose blobs are all cached.
            jobs: layer blobs downloaded at once (``fetch_layers``); at least 1.
        """
        if jobs < 1:
            raise UsageError(f"--jobs {jobs}: at least one download must run",
                             f"pass --jobs 1 or more (default {DEFAULT_JOBS}, as Docker's)")
        self.cache = cache
        self.client = client
        self.jobs = jobs
        self._sources: Dict[str, OfflineSource] = {}
        # One answer per reference per run: every platform of a tag sees the same index.
        self._tops: Dict[Tuple[str, str], Tuple[bytes, str, str]] = {}
        self._origins: Dict[str, _Origin] = {}  # layer digest -> where to fetch it

    def close(self) -> None:
        """Close offline sources (the registry client belongs to the caller)."""
        for source in self._sources.values():
            source.close()
        self._sources.clear()

    def __enter__(self) -> "Resolver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resolve ---------------------------------------------------------------

    def resolve(self, spec: ImageSpec, platform: Platform) -> ResolvedImage:
        """Pin ``spec`` to content for ``platform`` (``spec.platform`` wins over it).

        Raises:
            ResolveError: unreachable/unknown image, no such platform, malformed image.
        """
        wanted = (spec.platform or platform).normalized()
        ref = spec.reference
        origin = self._origin(spec)
        top_bytes, top_type, top_digest = self._top(spec)
        top = Descriptor(top_type, top_digest, len(top_bytes))
        top_obj = _json_object(top_bytes, f"manifest {top_digest} of {ref}")
        if top_type in INDEX_TYPES:
            manifest = _select_platform(ref, top_obj, wanted)
            manifest_obj = _json_object(self._small_blob(manifest, origin, ref, is_manifest=True),
                                        f"manifest {manifest.digest} of {ref}")
        elif top_type in MANIFEST_TYPES:
            manifest, manifest_obj = top, top_obj
        else:
            raise ResolveError(f"{ref} is not a container image (media type {top_type or 'unknown'})",
                               "point the image at a container image manifest or index")
        config = _descriptor(manifest_obj.get("config"), f"config of manifest {manifest.digest} of {ref}")
        config_obj = _json_object(self._small_blob(config, origin, ref, is_manifest=False),
                                  f"config {config.digest} of {ref}")
        if top_type in MANIFEST_TYPES:
            _check_platform(ref, config_obj, wanted)
        layers = self._layers(ref, manifest, manifest_obj, config_obj)
        for layer in layers:
            self._origins.setdefault(layer.digest, origin)
        return ResolvedImage(ref, top, wanted, manifest, config, layers)

    def _origin(self, spec: ImageSpec) -> _Origin:
        if spec.source:
            if spec.source not in self._sources:
                self._sources[spec.source] = open_source(spec.source)
            return _SourceOrigin(self._sources[spec.source])
        if self.client is None:
            return _NoRegistry(spec.reference)
        return _RegistryOrigin(self.client, spec.reference)

    def _top(self, spec: ImageSpec) -> Tuple[bytes, str, str]:
        key = (spec.source or "", str(spec.reference))
        if key not in self._tops:
            self._tops[key] = self._fetch_top(spec)
        return self._tops[key]

    def _fetch_top(self, spec: ImageSpec) -> Tuple[bytes, str, str]:
        ref = spec.reference
        if spec.source:
            data, media_type, digest = self._sources[spec.source].top(ref)
            if ref.digest and digest != ref.digest:
                raise ResolveError(f"{spec.source} holds {digest} for {ref.repository}, not the pinned "
                                   f"{ref.digest}", "update the digest in ref:, or use the matching archive")
        elif ref.digest and self._cached(ref.digest) is not None:
            # Content addressed: a cached pinned manifest is the answer, no network needed.
            data, digest = self.cache.read_bytes(ref.digest), ref.digest
            media_type = guess_media_type(_json_object(data, f"manifest {digest} of {ref}"))
        elif self.client is None:
            raise _NoRegistry(ref)._fail()
        else:
            data, media_type, digest = self.client.get_manifest(ref)
        self.cache.put_bytes(data, digest)
        return data, media_type, digest

    def _small_blob(self, desc: Descriptor, origin: _Origin, ref: Reference, *, is_manifest: bool) -> bytes:
        """A manifest or config: from the cache, else from ``origin`` into the cache."""
        data = self._cached(desc.digest)
        if data is None:
            if is_manifest:
                self.cache.put_bytes(origin.manifest(desc.digest), desc.digest)
            else:
                origin.blob_into_cache(desc.digest, desc.size, self.cache, None)
            data = self.cache.read_bytes(desc.digest)
        if len(data) != desc.size:
            raise ResolveError(f"blob {desc.digest} of {ref} is {len(data)} bytes, but its descriptor says "
                               f"{desc.size}", "the image is malformed; rebuild and re-push it")
        return data

    def _cached(self, digest: str) -> Optional[bytes]:
        """A cached small blob, or None when absent or damaged (a damaged one is dropped)."""
        if not self.cache.has(digest):
            return None
        try:
            return self.cache.read_bytes(digest)
        except CacheError:
            return None  # removed by the cache: fetch it again

    def _layers(self, ref: Reference, manifest: Descriptor, manifest_obj: Mapping[str, Any],
                config_obj: Mapping[str, Any]) -> Tuple[Layer, ...]:
        raw_layers = manifest_obj.get("layers")
        if not isinstance(raw_layers, list):
            raise ResolveError(f"manifest {manifest.digest} of {ref} has no layers list",
                               "the image is malformed; rebuild and re-push it")
        descs = [_descriptor(obj, f"layer {i} of manifest {manifest.digest} of {ref}")
                 for i, obj in enumerate(raw_layers)]
        diff_ids = _diff_ids(config_obj, ref)
        if len(descs) != len(diff_ids):
            raise ResolveError(f"image {ref}: manifest {manifest.digest} lists {len(descs)} layers but its "
                               f"config has {len(diff_ids)} diff_ids", "the image is malformed; rebuild and re-push it")
        return tuple(Layer(d.media_type, d.digest, d.size, diff_id, self._tar_size(d.digest, diff_id))
                     for d, diff_id in zip(descs, diff_ids))

    def _tar_size(self, digest: str, diff_id: str) -> int:
        info = self.cache.layer_info(digest)
        return info[1] if info is not None and info[0] == diff_id else -1

    # -- layers ------------------------------------------------------------------

    def fetch_layers(self, images: Iterable[ResolvedImage], digests_needed: AbstractSet[str],
                     progress_factory: Optional[ProgressFactory] = None) -> List[ResolvedImage]:
        """Make sure the layer blobs ``digests_needed`` are cached, and know their tar form.

        Only those blobs are fetched, ``self.jobs`` at once (largest first), behind one
        progress bar; each is decompressed as it streams in, to check its diff_id and
        record its tar size in the cache. A cached layer whose tar form is unknown (cached
        by an older edgebundle) is read and decompressed once more for it.

        Returns:
            ``images`` with ``tar_size`` filled in for every layer whose size is known.

        Raises:
            ResolveError: a fetch failed, a needed digest is no layer of ``images``, or a
                layer does not decompress to the diff_id its config claims.
        """
        images = list(images)
        factory = progress_factory or _no_progress
        needed = self._needed_layers(images, digests_needed)
        missing = [(layer, ref) for layer, ref in needed if not self.cache.has(layer.digest)]
        if missing:
            self._download(missing, factory)
        unchecked = [(layer, ref) for layer, ref in needed if self.cache.layer_info(layer.digest) is None]
        if unchecked:
            self._inspect(unchecked, factory)
        for layer, ref in needed:
            _check_layer_info(self.cache, layer, ref)
        return [replace(img, layers=tuple(replace(la, tar_size=self._tar_size(la.digest, la.diff_id))
                                          for la in img.layers)) for img in images]

    def _needed_layers(self, images: List[ResolvedImage], digests: AbstractSet[str]) -> List[Tuple[Layer, Reference]]:
        found: Dict[str, Tuple[Layer, Reference]] = {}
        for img in images:
            for layer in img.layers:
                if layer.digest in digests and layer.digest not in found:
                    found[layer.digest] = (layer, img.ref)
        unknown = sorted(d for d in digests if d not in found and not self.cache.has(d))
        if unknown:
            raise ResolveError(f"blob {unknown[0]} is needed but no resolved image has it as a layer",
                               "resolve the images again; the plan and the images disagree")
        return list(found.values())

    def _download(self, missing: List[Tuple[Layer, Reference]], factory: ProgressFactory) -> None:
        """Fetch ``missing`` into the cache, ``self.jobs`` at a time, behind one bar.

        The first failure stops the rest (see ``_in_parallel``) and is raised; blobs
        already complete stay cached.
        """
        def fetch(item: Tuple[Layer, Reference], progress: Callable[[int], None]) -> None:
            layer, ref = item
            origin = self._origins.get(layer.digest) or self._origin(ImageSpec(str(ref), ref))
            log.info("fetching layer %s of %s (%d bytes)", layer.digest, ref, layer.size)
            origin.blob_into_cache(layer.digest, layer.size, self.cache, progress, layer.media_type)

        _in_parallel(self.jobs, missing, lambda item: item[0].size, fetch,
                     factory(sum(layer.size for layer, _ in missing), "fetching layers"))

    def fetch_blobs(self, wanted: Sequence[Tuple[str, str, Optional[int]]],
                    progress_factory: Optional[ProgressFactory] = None) -> Set[str]:
        """Best effort: fetch the blobs ``(image name, digest, size)`` from each image's
        registry into the cache, ``self.jobs`` at once behind one bar.

        A blob that cannot be had (not found, unreachable, refused) is logged and left
        out, the others still fetched: what it was wanted for goes without it (a delta
        base). Returns the digests now cached.
        """
        client = self.client
        todo = [w for w in dict.fromkeys(wanted) if not self.cache.has(w[1])]
        if todo and client is not None:
            def fetch(item: Tuple[str, str, Optional[int]], progress: Callable[[int], None]) -> None:
                image, digest, size = item
                log.info("fetching %s of %s (%s bytes)", digest, image, size if size is not None else "?")
                try:
                    client.fetch_blob(parse_reference(image), digest, size, self.cache, progress)
                except EdgebundleError as exc:
                    log.info("%s of %s not fetched: %s", digest, image, exc.message)

            factory = progress_factory or _no_progress
            _in_parallel(self.jobs, todo, lambda item: item[2] or 0, fetch,
                         factory(sum(size or 0 for _, _, size in todo), "fetching bases"))
        return {digest for _, digest, _ in wanted if self.cache.has(digest)}

    def _inspect(self, layers: List[Tuple[Layer, Reference]], factory: ProgressFactory) -> None:
        bar = factory(sum(layer.size for layer, _ in layers), "checking layers")
        try:
            for layer, ref in layers:
                with self.cache.open(layer.digest) as fh:
                    diff_id, tar_size = uncompressed_digest(fh, layer.media_type, f"layer {layer.digest} of {ref}")
                if diff_id != layer.diff_id:
                    raise _diff_mismatch(layer, ref, diff_id)
                log.debug("layer %s decompresses to %s (%d bytes)", layer.digest, diff_id, tar_size)
                self.cache.set_layer_info(layer.digest, diff_id, tar_size)
                bar.update(layer.size)
        finally:
            close_bar(bar)


_Item = TypeVar("_Item")


def _in_parallel(jobs: int, items: Sequence[_Item], size: Callable[[_Item], int],
                 fetch: Callable[[_Item, Callable[[int], None]], None], bar: Bar) -> None:
    """``fetch(item, progress)`` for each item, ``jobs`` at a time, largest first, one bar.

    The first exception stops the rest: fetches in flight are abandoned at their next
    chunk (``progress`` raises; ``BlobCache.writer`` removes their temp files), queued
    ones never start, and that exception is raised. A fetch that must not stop the
    others catches its own errors.
    """
    shared = _SharedBar(bar)
    stop = threading.Event()

    def progress(n: int) -> None:
        if stop.is_set():
            raise _Abandoned()
        shared.update(n)

    def run(item: _Item) -> None:
        if not stop.is_set():
            fetch(item, progress)

    # Largest first: with fewer workers than items, the big one does not start last.
    order = sorted(items, key=lambda item: -size(item))
    pool = ThreadPoolExecutor(max_workers=max(1, min(jobs, len(order))), thread_name_prefix="fetch")
    try:
        futures = [pool.submit(run, item) for item in order]
        wait(futures, return_when=FIRST_EXCEPTION)
    finally:
        stop.set()  # also on KeyboardInterrupt: the workers leave at their next chunk
        pool.shutdown(wait=True, cancel_futures=True)
        close_bar(shared)
    for future in futures:
        exc = future.exception() if future.done() and not future.cancelled() else None
        if exc is not None and not isinstance(exc, _Abandoned):
            raise exc


class _Abandoned(Exception):
    """Raised inside a download when another one failed (never a ResolveError, so no
    mirror fallback or retry takes it for the download's own failure)."""


class _SharedBar:
    """One bar for all parallel downloads: updates serialised (tqdm's are not atomic)."""

    def __init__(self, bar: Bar) -> None:
        self._bar = bar
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        close_bar(self._bar)


# ---------------------------------------------------------------------------
# Pure helpers


def _select_platform(ref: Reference, index: Mapping[str, Any], wanted: Platform) -> Descriptor:
    """The index entry for ``wanted``: exact os/arch/variant after normalisation."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise ResolveError(f"index of {ref} has no manifests list", "the image is malformed; re-push it")
    available: List[str] = []
    for entry in entries:
        plat = entry.get("platform") if isinstance(entry, dict) else None
        if not isinstance(plat, dict):
            continue  # e.g. nested indexes or artifacts: not something a runtime would pick
        candidate = Platform.from_json(plat)
        if candidate.os == "unknown" or candidate.architecture == "unknown":
            continue  # buildx attestation manifests
        if candidate.matches(wanted) and entry.get("mediaType", MANIFEST_TYPES_DEFAULT) in MANIFEST_TYPES:
            return _descriptor(entry, f"{wanted} entry of the index of {ref}")
        available.append(str(candidate))
    listing = ", ".join(sorted(set(available))) or "none"
    raise ResolveError(f"image {ref} has no {wanted} variant (available: {listing})",
                       f"set platform: on the image (or its site) to one of these, or use an image built "
                       f"for {wanted}")


# Docker manifest lists always carry mediaType on entries; OCI may omit it for manifests.
MANIFEST_TYPES_DEFAULT = "application/vnd.oci.image.manifest.v1+json"


def _check_platform(ref: Reference, config: Mapping[str, Any], wanted: Platform) -> None:
    actual = Platform.from_json(dict(config))
    if not actual.os or not actual.architecture:
        raise ResolveError(f"config of {ref} names no os/architecture",
                           "this is not a container image; check the reference")
    if not actual.matches(wanted):
        raise ResolveError(f"image {ref} is built for {actual}, not {wanted}",
                           f"use a tag built for {wanted} (or a multi-platform image), or set "
                           f"platform: {actual} on the image if the site can run it")


def _diff_ids(config: Mapping[str, Any], ref: Reference) -> List[str]:
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        raise ResolveError(f"config of {ref} has no rootfs.diff_ids",
                           "this is not a container image; check the reference")
    try:
        return [check_digest(str(i), "diff_id") for i in ids]
    except ValueError as exc:
        raise ResolveError(f"config of {ref}: {exc}", "only sha256 images are supported") from None


def _descriptor(obj: object, what: str) -> Descriptor:
    try:
        return Descriptor.from_json(obj)
    except ValueError as exc:
        raise ResolveError(f"{what} is not a valid descriptor: {exc}",
                           "the image is malformed; rebuild and re-push it") from None


def _json_object(data: bytes, what: str) -> Dict[str, Any]:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise ResolveError(f"{what} is not JSON: {exc}", "the image is malformed; rebuild and re-push it") from None
    if not isinstance(obj, dict):
        raise ResolveError(f"{what} is not a JSON object", "the image is malformed; rebuild and re-push it")
    return obj


def _check_layer_info(cache: BlobCache, layer: Layer, ref: Reference) -> None:
    info = cache.layer_info(layer.digest)
    if info is not None and info[0] != layer.diff_id:
        raise _diff_mismatch(layer, ref, info[0])


def _diff_mismatch(layer: Layer, ref: Reference, actual: str) -> ResolveError:
    return ResolveError(f"layer {layer.digest} of {ref} decompresses to {actual}, but its config says "
                        f"{layer.diff_id}", "the image is corrupt; rebuild and re-push it")


def uncompressed_digest(fh: BinaryIO, media_type: str, what: str = "layer") -> Tuple[str, int]:
    """``(sha256 digest, length)`` of the tar inside a layer blob, streamed.

    Raises:
        ResolveError: the blob does not decompress as its media type says.
    """
    head = fh.read(MAGIC_BYTES)
    fh.seek(0)
    kind = classify(media_type, head)
    hasher = hashlib.sha256()
    total = 0
    try:
        for chunk in decompress_stream(fh, kind):
            hasher.update(chunk)
            total += len(chunk)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise ResolveError(f"{what} does not decompress as {kind}: {exc}",
                           "the image is corrupt; rebuild and re-push it") from None
    return "sha256:" + hasher.hexdigest(), total


