"""Plan + blob cache -> bundle bytes, only through ``edgebundle.format``.

Entry encoding, decided per entry from what it is:

* index/manifest/config JSON: zstd (JSON shrinks 3-5x);
* a layer shipped as its registry blob that is already gzip/zstd-compressed: stored as
  is, since recompressing compressed bytes gains ~2% and costs a lot of CPU (see BENCHMARKS.md);
* an uncompressed layer (tar form for Docker, or an uncompressed registry blob): zstd.

``write_bundle`` writes to any sink, front to back; where the bytes go (a file replaced
atomically, a pipe, stdout) is the caller's business (``files.open_output``).
"""

from __future__ import annotations

import functools
import logging
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterable, Iterator, List, Optional, Sequence, Set, Tuple, Union

import zstandard

from . import __version__
from .cache import BlobCache
from .compression import MAGIC_BYTES, NONE, classify, decompress_stream
from .encoded import EncodedCache
from .errors import CacheError
from .files import read_pieces
from .format import (CODEC_STORED, CODEC_ZSTD, FEATURE_SIGNATURE, LAYER_FORM_TAR, BundleWriter,
                     Commitments, EntryHead, Header, ImageRecord, ImageSummary, LayerRecord, Signer)
from .format.signature import entry_commitment, images_commitment
from .format.writer import EncodedRefused, EntryHeads, EntryMismatch, Sink, Tee
from .image import Layer, ResolvedImage
from .oci import MT_OCI_LAYER, Descriptor
from .plan import LayerPlan, Plan
from .report import now_rfc3339

log = logging.getLogger(__name__)

Progress = Callable[[int], None]


@dataclass(frozen=True)
class PackStats:
    """What a written bundle holds and cost."""

    bundle_bytes: int
    entries: int
    images: int
    ship_registry_bytes: int  # registry size of what ships (the plan's estimate)
    full_registry_bytes: int  # registry size of every image in full


def image_record(image: ResolvedImage, form: str) -> ImageRecord:
    """The index's record for one image (FORMAT.md, "Image record")."""
    return ImageRecord(
        name=image.name, ref=str(image.ref), platform=str(image.platform), top=image.top,
        manifest=image.manifest, config=image.config,
        layers=tuple(LayerRecord(l.media_type, l.digest, l.size, l.diff_id, l.tar_size, form)
                     for l in image.layers))


def bundle_header(plan: Plan, created: Optional[str] = None,
                  commitments: Optional[Commitments] = None, signed: bool = False) -> Header:
    """The header for ``plan``'s bundle; ``created`` defaults to now."""
    features = plan.required_features + ((FEATURE_SIGNATURE,) if signed else ())
    return Header(
        site=plan.site, runtime=plan.runtime, namespace=plan.namespace, platform=plan.platform,
        layer_form=plan.layer_form, prerequisites=plan.prerequisites,
        images=tuple(ImageSummary(p.image.name, p.image.top.digest, p.image.config.digest)
                     for p in plan.to_ship),
        content_bytes=content_bytes(plan), created=created or now_rfc3339(),
        tool=f"edgebundle {__version__}", required_features=features, commitments=commitments,
        unpacked_bytes=unpacked_bytes(plan))


def content_bytes(plan: Plan) -> int:
    """Decoded bytes of every entry the bundle will carry (the importer's progress total)."""
    total = 0
    for lp, size in plan.shipped().values():
        if lp is None:
            total += size
        elif lp.delta is not None:
            total += lp.delta.head.target_size  # the device counts the rebuilt tar
        elif plan.layer_form == LAYER_FORM_TAR and classify(lp.layer.media_type) != NONE:
            total += lp.layer.tar_size
        else:
            total += lp.layer.size
    return total


def unpacked_bytes(plan: Plan) -> Optional[int]:
    """The shipped layers' tar sizes (what unpacking adds on the device); None if unknown."""
    total = 0
    for lp, _ in plan.shipped().values():
        if lp is None:
            continue
        tar = lp.delta.head.target_size if lp.delta is not None else lp.layer.tar_size
        if tar < 0:
            return None  # a layer never decompressed: the device estimates instead
        total += tar
    return total


#: The op stream of a planned delta, by its entry digest (``deltas.DeltaStore.ops``).
DeltaOps = Callable[[str], Iterator[bytes]]


def write_bundle(plan: Plan, cache: BlobCache, out: Sink, *, level: int = 16, threads: int = 1,
                 created: Optional[str] = None, progress: Optional[Progress] = None,
                 delta_ops: Optional[DeltaOps] = None, signers: Sequence[Signer] = (),
                 encoded: Union[EncodedCache, bool] = True) -> PackStats:
    """Write the bundle for ``plan`` to ``out``; ``signers`` sign its header.

    ``encoded``: the cache of encoded layers and deltas (True: ``cache/encoded`` beside
    the blobs; False: none). A layer encoded before at the same level is written from it,
    checked, not compressed again; the bundle's bytes are the same either way.

    Every blob the plan ships must be in ``cache`` (``resolve.fetch_layers``); a missing
    or damaged one raises ``CacheError`` (a damaged one is removed, so a rerun refetches).
    A layer planned as a delta is written from ``delta_ops``. Every entry record is
    decided before the header is written, because the header commits to them all.
    """
    records = [image_record(p.image, plan.layer_form) for p in plan.to_ship]
    planned = _planned_entries(plan, cache, level, delta_ops, progress)
    commitments = Commitments(tuple(entry_commitment(e.head) for e in planned),
                              images_commitment(records))
    writer = BundleWriter(out, bundle_header(plan, created, commitments, bool(signers)),
                          level=level, threads=threads, signers=signers)
    store = EncodedCache(cache.root / "encoded") if encoded is True else encoded or None
    for entry in planned:
        _write_entry(writer, entry, store, progress)
    total = writer.finish(records)
    return PackStats(total, len(writer.entries), len(plan.to_ship), plan.ship_bytes,
                     plan.full_bytes)


@dataclass(frozen=True)
class _Planned:
    """One entry to write: its record (known before any byte) and how to write it."""

    head: EntryHead
    write: Callable[[BundleWriter, Optional[Tee]], object]  # the tee sees its stored chunks
    units: int = 0  # progress units writing it reports (the layer's registry bytes)
    cacheable: bool = False  # worth keeping encoded (layers and deltas, not small JSON)


def _write_entry(writer: BundleWriter, entry: _Planned, store: Optional[EncodedCache],
                 progress: Optional[Progress]) -> None:
    """Write one entry: from the encoded cache when it holds it intact, else encoded
    (and, when worth it, kept there for the next pack)."""
    head = entry.head
    if store is None or not entry.cacheable or not store.wanted(head):
        entry.write(writer, None)
        return
    chunks = store.lookup(head, writer.encoding)
    if chunks is not None:
        try:
            writer.add_encoded(head, chunks)
        except EncodedRefused as exc:  # nothing written yet: encode it afresh below
            store.discard(head, writer.encoding, str(exc))
        except EntryMismatch:
            store.discard(head, writer.encoding, "it changed while being written")
            raise CacheError(f"encoded entry {head.digest} in the packer cache changed while "
                             "it was being packed", "run the command again; if this recurs, "
                             "check that nothing else writes the packer cache") from None
        else:
            log.debug("pack: entry %s from the encoded cache", head.digest)
            if progress is not None and entry.units:
                progress(entry.units)
            return
    with store.recording(head, writer.encoding) as tee:
        entry.write(writer, tee)


def _planned_entries(plan: Plan, cache: BlobCache, level: int, delta_ops: Optional[DeltaOps],
                     progress: Optional[Progress]) -> List[_Planned]:
    """The bundle's entries in order: each image's JSON (config, manifest, index), then its
    layers (whole or as deltas), each digest once."""
    heads = BundleWriter.heads(level)
    out: List[_Planned] = []
    written: Set[str] = set()
    for ip in plan.to_ship:
        for desc in reversed(ip.image.json_blobs):  # config, manifest, index
            if desc.digest not in written:
                out.append(_Planned(heads.blob(desc.digest, desc.size, codec=CODEC_ZSTD,
                                               media_type=desc.media_type),
                                    functools.partial(_add_json, cache=cache, desc=desc)))
                written.add(desc.digest)
        for lp in ip.layers:
            if lp.ship and lp.delta is not None and lp.delta.entry not in written:
                if delta_ops is None:
                    raise ValueError("the plan has deltas but no delta_ops was given")
                out.append(_Planned(heads.delta(lp.delta.head, lp.delta.entry, lp.delta.size),
                                    functools.partial(_add_delta, lp=lp, delta_ops=delta_ops,
                                                      progress=progress),
                                    units=lp.layer.size, cacheable=True))
                written.add(lp.delta.entry)
            elif lp.ship and lp.delta is None and lp.entry not in written:
                head, kind = _layer_head(heads, cache, lp.layer, plan.layer_form)
                out.append(_Planned(head, functools.partial(
                    _add_layer, cache=cache, layer=lp.layer, head=head, kind=kind,
                    progress=progress), units=lp.layer.size, cacheable=True))
                written.add(lp.entry)
    return out


def _add_delta(writer: BundleWriter, tee: Optional[Tee], lp: LayerPlan, delta_ops: DeltaOps,
               progress: Optional[Progress]) -> None:
    assert lp.delta is not None
    log.debug("pack: layer %s as a delta (%d bytes of ops)", lp.layer.digest, lp.delta.size)
    writer.add_delta(lp.delta.head, lp.delta.entry, lp.delta.size,
                     _counting(delta_ops(lp.delta.entry), lp.layer.size, lp.delta.size, progress),
                     tee)


def _add_json(writer: BundleWriter, tee: Optional[Tee], *, cache: BlobCache,
              desc: Descriptor) -> None:
    data = cache.read_bytes(desc.digest)
    writer.add_blob(desc.digest, desc.size, [data], codec=CODEC_ZSTD, media_type=desc.media_type,
                    tee=tee)


def _layer_head(heads: EntryHeads, cache: BlobCache, layer: Layer,
                form: str) -> Tuple[EntryHead, str]:
    """How a layer is carried (FORMAT.md, "How writers choose a codec"), from its first
    bytes; and the blob's compression."""
    with cache.open(layer.digest) as fh:
        kind = classify(layer.media_type, fh.read(MAGIC_BYTES))
    if form == LAYER_FORM_TAR and kind != NONE:
        if layer.tar_size < 0:
            raise ValueError(f"layer {layer.digest} has no recorded tar size; fetch it first")
        return heads.blob(layer.diff_id, layer.tar_size, codec=CODEC_ZSTD,
                          media_type=MT_OCI_LAYER), kind
    if kind == NONE:  # already an uncompressed tar: its blob digest is its diff_id
        return heads.blob(layer.digest, layer.size, codec=CODEC_ZSTD,
                          media_type=layer.media_type), kind
    return heads.blob(layer.digest, layer.size, codec=CODEC_STORED,
                      media_type=layer.media_type), kind


def _add_layer(writer: BundleWriter, tee: Optional[Tee], *, cache: BlobCache, layer: Layer, head: EntryHead,
               kind: str, progress: Optional[Progress]) -> None:
    log.debug("pack: layer %s as %s (%d bytes)", layer.digest,
              "a tar" if head.digest != layer.digest else "its blob", layer.size)
    with cache.open(layer.digest) as fh:
        try:
            if head.digest != layer.digest:  # tar form of a compressed blob
                pieces: Iterable[bytes] = _decompressed(fh, kind, layer.digest, cache, progress)
            else:
                pieces = read_pieces(fh, progress)
            writer.add_blob(head.digest, head.size, pieces, codec=head.codec,
                            media_type=head.media_type, tee=tee)
        except EntryMismatch:
            # The writer hashes what it packs: a cache blob that is not its digest is caught.
            raise cache.damaged(layer.digest) from None


def _decompressed(fh: BinaryIO, kind: str, digest: str, cache: BlobCache,
                  progress: Optional[Progress]) -> Iterator[bytes]:
    """The layer's tar, streamed; progress counts blob bytes read."""
    try:
        yield from decompress_stream(_Counted(fh, progress), kind)
    except (zlib.error, zstandard.ZstdError, EOFError):
        raise cache.damaged(digest) from None
    except OSError as exc:
        raise CacheError(f"cannot read layer {digest} from the packer cache: {exc.strerror or exc}",
                         "check the disk the cache is on") from None


def _counting(pieces: Iterator[bytes], whole: int, size: int,
              progress: Optional[Progress]) -> Iterator[bytes]:
    """Progress for a delta in the bar's units (registry bytes of the layer it replaces)."""
    done = 0
    for piece in pieces:
        if progress is not None and size:
            step = (done + len(piece)) * whole // size - done * whole // size
            progress(step)
        done += len(piece)
        yield piece


class _Counted:
    """A reader that reports how many bytes pass through it."""

    def __init__(self, fh: BinaryIO, progress: Optional[Progress]) -> None:
        self._fh = fh
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        if self._progress is not None:
            self._progress(len(data))
        return data
