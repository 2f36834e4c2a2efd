"""Packer: which layers a site can serve as delta bases, and the deltas against them.

``DeltaPlanner.apply(plan, inventory)`` turns a plan's shipped layers into deltas where
that is clearly smaller. Its inputs are the site's report (what it holds, and whether
its edgebundle reads deltas) and the packer's blob cache (the bases' bytes). Its work
is kept in the cache, keyed by what decides the result, so a second plan, the pack
after it, and every other site in the same state reuse it:

    cache/scans/sha256/<diff_id hex>.json   a layer tar's regular files (tarscan)
    cache/deltas/<key>.ops, <key>.json       an op stream and its head, checked

A base must be a layer whose chain the device has applied (a containerd snapshot or a
Docker layer): that is what the device reads base files from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import zstandard

from .cache import BlobCache
from .compression import MAGIC_BYTES, NONE, classify, decompress_stream
from .delta import MARGIN, MIN_FILE, MIN_RANGE, MIN_RANGE_SHARE, PATCH_LEVEL, SMALL_FILE, SMALL_FILE_LEVEL, WINDOW, Base, DeltaStats, Encoded, check, encode
from .errors import CacheError, UsageError
from .files import IO_CHUNK, atomic_file, atomic_write, read_pieces
from .format import FEATURE_DELTA, BaseLayer, DeltaHead, Prerequisite
from .holdings import Inventory
from .image import Layer
from .oci import chain_ids, check_digest
from .plan import DeltaChoice, Plan, with_deltas
from .progress import NULL_BAR, Bar, close_bar
from .reference import parse_reference
from .tarscan import XXH3, Member, Region, TarScan, scan

log = logging.getLogger(__name__)

DELTA_VERSION = 4  # bump when the encoder's output for the same inputs changes
SCAN_VERSION = 3  # bump when tarscan's output changes
SHIP_DELTA_BELOW = 0.75  # a delta ships only below this fraction of the whole layer

ProgressFactory = Callable[[int, str], Bar]


@dataclass(frozen=True)
class SiteBase:
    """A layer the site holds that a delta could read from."""

    layer: BaseLayer  # tar: the device can rebuild the layer's exact tar (report key "tar")
    digest: Optional[str]  # its registry blob, where the runtime knows it (containerd)
    size: Optional[int]
    image: str  # a held image it belongs to (where the packer can fetch the blob from)


def site_bases(inv: Inventory) -> List[SiteBase]:
    """Each applied layer of a complete image the site holds, once."""
    out: Dict[str, SiteBase] = {}
    for image in inv.images:
        if not image.complete:
            continue
        chains = chain_ids(layer.diff_id for layer in image.layers)
        for layer, chain in zip(image.layers, chains):
            if chain in inv.chains and chain not in out:
                out[chain] = SiteBase(BaseLayer(chain, layer.diff_id, layer.tar), layer.digest,
                                      layer.size, image.name)
    return list(out.values())


#: ``fetch([(image name, blob digest, size), ...])`` puts what it can of those blobs
#: into the packer cache (all at once: they are downloads) and returns the digests it
#: has; one the registry lacks or that cannot be reached is left out.
Fetch = Callable[[Sequence[Tuple[str, str, Optional[int]]]], AbstractSet[str]]


class DeltaPlanner:
    """Deltas for one packer session (use as a context manager: it owns a work dir)."""

    def __init__(self, cache: BlobCache, *, progress: Optional[ProgressFactory] = None,
                 fetch: Optional[Fetch] = None) -> None:
        self.cache = cache
        self._progress = progress
        self._fetch = fetch
        self._work = Path(tempfile.mkdtemp(prefix="deltas-", dir=cache.root / "tmp"))
        self._tars: Dict[str, Path] = {}  # diff_id -> its tar in the work dir
        self._by_diff_id: Optional[Dict[str, str]] = None
        self._ops: Dict[str, Path] = {}  # op stream digest -> its file in the cache
        self._base_blobs: Dict[BaseLayer, str] = {}  # the cached blob each base was read from
        for sub in ("scans/sha256", "deltas"):
            (cache.root / sub).mkdir(parents=True, exist_ok=True)

    def close(self) -> None:
        shutil.rmtree(self._work, ignore_errors=True)

    def __enter__(self) -> "DeltaPlanner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the decision ---------------------------------------------------------------

    def apply(self, plan: Plan, inv: Inventory) -> Plan:
        """``plan`` with each shipped layer a delta where that is clearly smaller."""
        layers: Dict[str, Layer] = {}
        for lp in plan.shipped_layers():
            layers.setdefault(lp.layer.diff_id, lp.layer)
        if not layers:
            return plan
        if FEATURE_DELTA not in inv.features:
            why = ("whole: the site holds nothing yet" if not inv.images else
                   "whole: the site's edgebundle does not read deltas (its report lists no "
                   f"{FEATURE_DELTA!r}); update it and send a fresh report")
            return with_deltas(plan, {}, {d: why for d in layers})
        repos = {_repository(ip.image.name) for ip in plan.to_ship}
        bases, missing = self._bases(inv, repos)
        if not bases:
            why = ("whole: the site holds no layer to build on" if not missing else
                   "whole: no base layer of the site is in the packer cache")
            return with_deltas(plan, {}, {d: why for d in layers})
        choices: Dict[str, DeltaChoice] = {}
        notes: Dict[str, str] = {}
        held = {b.layer.diff_id for b in bases}
        todo = [l for d, l in layers.items() if d not in held]
        bar = (self._progress or _no_bar)(sum(max(0, l.tar_size) for l in todo), "delta")
        try:
            for layer in todo:
                choice, note = self._choose(layer, bases, bar)
                if choice is not None:
                    choices[layer.diff_id] = choice
                else:
                    notes[layer.diff_id] = note
        finally:
            close_bar(bar)
        return with_deltas(plan, choices, notes)

    def _choose(self, layer: Layer, bases: List[Base],
                bar: Bar) -> Tuple[Optional[DeltaChoice], str]:
        try:
            enc, stored = self._delta(layer, bases, bar)
        except (tarfile.TarError, ValueError) as exc:
            log.info("layer %s: no delta (%s)", layer.digest, exc)
            return None, f"whole: its tar could not be read for a delta ({exc})"
        if stored > layer.size * SHIP_DELTA_BELOW:
            return None, (f"whole: a delta would be {stored} bytes, not clearly smaller than "
                          f"{layer.size}")
        by_chain = {b.layer.chain_id: b for b in bases}
        prereqs = tuple(self._prerequisite(by_chain[b.chain_id]) for b in enc.head.bases)
        log.info("layer %s: delta of %d bytes against %d base layer(s) (whole: %d)",
                 layer.digest, stored, len(prereqs), layer.size)
        st = enc.stats
        return DeltaChoice(enc.head, enc.digest, enc.size, stored, prereqs, st.copied, st.patched,
                           st.literal), ""

    def _prerequisite(self, base: Base) -> Prerequisite:
        return Prerequisite(base.layer.chain_id, base.layer.diff_id, self._base_blobs[base.layer])

    # -- bases ------------------------------------------------------------------------

    def _bases(self, inv: Inventory, repos: Set[str]) -> Tuple[List[Base], List[str]]:
        """The site's layers the packer can read; the diff_ids of those it cannot.

        A base blob missing from the cache is fetched from its registry when the runtime
        named its digest and it belongs to a repository this plan ships an image of
        (the previous version of the same app: the base that pays; fetching every layer
        a site holds could cost more than the deltas save). They are asked for in one
        batch, so that they download in parallel.
        """
        bases: List[Base] = []
        missing: List[str] = []
        found: List[Tuple[SiteBase, Optional[str]]] = []
        wanted: List[Tuple[str, str, Optional[int]]] = []
        for sb in site_bases(inv):
            blob = sb.digest if sb.digest is not None and self.cache.has(sb.digest) else \
                self._blob_for(sb.layer.diff_id)
            found.append((sb, blob))
            if blob is None and sb.digest is not None and _repository(sb.image) in repos:
                wanted.append((sb.image, sb.digest, sb.size))
        fetched: AbstractSet[str] = set()
        if wanted and self._fetch is not None:
            log.info("%d base layer(s) of the site are not in the packer cache: fetching them", len(wanted))
            fetched = self._fetch(wanted)
        for sb, blob in found:
            layer, diff_id = sb.layer, sb.layer.diff_id
            if blob is None and sb.digest in fetched:
                blob = sb.digest
            if blob is None:
                missing.append(diff_id)
                continue
            try:
                scan_ = self._scan(diff_id, blob)
            except (CacheError, tarfile.TarError, ValueError) as exc:
                log.info("base %s unusable: %s", diff_id, exc)
                missing.append(diff_id)
                continue
            self._base_blobs[layer] = blob
            bases.append(Base(layer, scan_, self._opener(diff_id, blob)))
        if missing:
            log.info("%d layer(s) the site holds are not in the packer cache; deltas cannot "
                     "build on them", len(missing))
        return bases, missing

    def _opener(self, diff_id: str, blob: str) -> Callable[[], BinaryIO]:
        """Opens the layer's tar, decompressing it on first use only (most bases are only
        ever consulted through their cached scan)."""
        return lambda: open(self._tar(diff_id, blob), "rb")

    def _blob_for(self, diff_id: str) -> Optional[str]:
        """The cached blob whose tar is ``diff_id`` (the cache records it per blob)."""
        if self._by_diff_id is None:
            self._by_diff_id = {}
            for info in (self.cache.root / "layers" / "sha256").glob("*.json"):
                digest = "sha256:" + info.stem
                known = self.cache.layer_info(digest)
                if known is not None and self.cache.has(digest):
                    self._by_diff_id[known[0]] = digest
        return self._by_diff_id.get(diff_id)

    def _tar(self, diff_id: str, blob: str) -> Path:
        """The uncompressed tar of a cached blob, in the work dir, checked against diff_id."""
        if diff_id in self._tars:
            return self._tars[diff_id]
        path = self._work / (diff_id[7:] + ".tar")
        hasher = hashlib.sha256()
        with self.cache.open(blob) as fh, open(path, "wb") as out:
            kind = classify("", fh.read(MAGIC_BYTES))
            fh.seek(0)
            try:
                for piece in (decompress_stream(fh, kind) if kind != NONE else read_pieces(fh)):
                    hasher.update(piece)
                    out.write(piece)
            except (zlib.error, zstandard.ZstdError, EOFError):
                raise self.cache.damaged(blob) from None
        if "sha256:" + hasher.hexdigest() != diff_id:
            raise ValueError(f"blob {blob} does not decompress to {diff_id}")
        self._tars[diff_id] = path
        return path

    def _scan(self, diff_id: str, blob: str) -> TarScan:
        """The layer's scan: from the cache, else made (which decompresses the blob once)."""
        cached = self.cache.root / "scans" / "sha256" / (diff_id[7:] + ".json")
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            obj = json.loads(cached.read_text())
            if obj.get("version") == SCAN_VERSION:
                return TarScan(int(obj["size"]), tuple(_region(r) for r in obj["regions"]))
        with open(self._tar(diff_id, blob), "rb") as fh:
            result = scan(fh)
        atomic_write(cached, json.dumps({"version": SCAN_VERSION, "size": result.size, "regions": [
            [r.offset, r.end, r.digest] + ([f.path, f.data_offset, f.size, f.digest] if f else [])
            for r in result.regions for f in [r.file]]}).encode())
        return result

    # -- deltas ---------------------------------------------------------------------

    def _key(self, layer: Layer, bases: List[Base]) -> str:
        ident = json.dumps([DELTA_VERSION, WINDOW, MARGIN, PATCH_LEVEL, SMALL_FILE, SMALL_FILE_LEVEL,
                            MIN_FILE, MIN_RANGE, MIN_RANGE_SHARE,
                            layer.diff_id,
                            sorted([b.layer.chain_id, b.layer.diff_id, b.layer.tar] for b in bases)])
        return hashlib.sha256(ident.encode()).hexdigest()

    def _delta(self, layer: Layer, bases: List[Base], bar: Bar) -> Tuple[Encoded, int]:
        key = self._key(layer, bases)
        meta_path = self.cache.root / "deltas" / (key + ".json")
        ops_path = self.cache.root / "deltas" / (key + ".ops")
        cached = _load_meta(meta_path, ops_path)
        if cached is not None:
            bar.update(max(0, layer.tar_size))
            self._ops[cached[0].digest] = ops_path
            return cached
        target_scan = self._scan(layer.diff_id, layer.digest)
        with open(self._tar(layer.diff_id, layer.digest), "rb") as target, \
                atomic_file(ops_path) as out:
            enc = encode(target, target_scan, layer.diff_id, bases, out, progress=bar.update)
            out.flush()
            # Rebuilt with the device's code against the bases: only an exact delta is kept.
            check(enc, lambda: _pieces_at(out), bases)
            stored = _zstd_size(_pieces_at(out))
        atomic_write(meta_path, json.dumps({
            "digest": enc.digest, "size": enc.size, "stored": stored,
            "stats": dataclasses.asdict(enc.stats), "head": enc.head.to_wire()}).encode())
        self._ops[enc.digest] = ops_path
        return enc, stored

    def ops(self, digest: str) -> Iterator[bytes]:
        """The op stream of a delta this planner chose, for the bundle writer."""
        path = self._ops.get(digest)
        if path is not None and path.is_file():
            return _pieces_of(path)  # the bundle writer checks its digest as it writes it
        raise CacheError(f"delta {digest} is missing from the packer cache",
                         "something removed it while edgebundle ran; run the command again")


def _region(row: List[Any]) -> Region:
    member = Member(row[3], int(row[4]), int(row[5]), _xxh3(row[6])) if len(row) > 3 else None
    return Region(int(row[0]), int(row[1]), _xxh3(row[2]), member)


def _xxh3(value: object) -> str:
    if not isinstance(value, str) or not value.startswith(XXH3) or len(value) != len(XXH3) + 32:
        raise ValueError(f"not an xxh3-128 digest: {value!r:.60}")
    return value


def _load_meta(meta_path: Path, ops_path: Path) -> Optional[Tuple[Encoded, int]]:
    try:
        obj = json.loads(meta_path.read_text())
        if ops_path.stat().st_size != obj["size"]:
            return None
        head = obj["head"]
        delta = DeltaHead(check_digest(head["target"]), int(head["target_size"]),
                          tuple(BaseLayer(check_digest(b["chain_id"]), check_digest(b["diff_id"]),
                                          bool(b["tar"])) for b in head["bases"]))
        stats = DeltaStats(**{k: int(v) for k, v in obj["stats"].items()})
        return Encoded(delta, check_digest(obj["digest"]), int(obj["size"]), stats), int(obj["stored"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _zstd_size(pieces: Iterator[bytes]) -> int:
    """The op stream's size zstd-compressed: a quick level, about what the bundle carries."""
    cobj = zstandard.ZstdCompressor(level=3, threads=-1).compressobj()
    total = sum(len(cobj.compress(piece)) for piece in pieces)
    return total + len(cobj.flush())


def _pieces_at(fh: BinaryIO) -> Iterator[bytes]:
    """A file's bytes by position, not disturbing its write offset."""
    offset = 0
    while True:
        piece = os.pread(fh.fileno(), IO_CHUNK, offset)
        if not piece:
            return
        offset += len(piece)
        yield piece


def _repository(name: str) -> str:
    try:
        return parse_reference(name).repository
    except UsageError:
        return name


def _pieces_of(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        yield from read_pieces(fh)


def _no_bar(total: int, desc: str) -> Bar:
    return NULL_BAR
