"""Packer side of deltas: a layer tar as ops against the files a site already holds.

``encode`` walks the target tar once. Everything that is not a regular file's contents
(headers of any tar dialect, padding, links, whiteouts) goes out as literal bytes. For
each file's contents it picks the nearest base among *all* the site's layers:

1. the same contents anywhere (a copy: a few bytes on the wire);
2. the same path, a changed file (zstd patches, one per window);
3. the same file name elsewhere with a similar size (a moved or renamed directory,
   python3.11 -> python3.12): patches too;
4. else the bytes themselves.

Patches are cut into windows (``WINDOW`` of target against at most ``WINDOW + 2 *
MARGIN`` of base at the matching position), so a 300 MB file costs the device no more
memory than a small one. Each window's patch is kept only when clearly smaller than the
window; the whole delta only when clearly smaller than the layer (the caller decides).

Every delta is rebuilt here, with the device's own ``rebuild``, against the base tars,
and checked against the target diff_id before it may ship.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import zstandard

from .format import MAX_LITERAL, MAX_PATCH_WINDOW, MAX_PATCH_WINDOW_LOG, BaseLayer, DeltaHead
from .format.delta import BaseFile, Copy, Literal, Op, Patch, Range, encode as encode_op
from .rebuild import rebuild
from .tarscan import Member, Region, TarScan, read_range

log = logging.getLogger(__name__)

WINDOW = 4 * 1024 * 1024  # target bytes per patch
MARGIN = 1024 * 1024  # base bytes either side of the matching position
MIN_FILE = 128  # smaller contents go literal: a reference would cost about as much
MIN_RANGE = 512  # a member region copied from a base tar (one header block at least)
MIN_RANGE_SHARE = 0.25  # ranges from a base's tar only if they cover this much of it
PATCH_LEVEL = 12  # measured: level 9 and below lose most matches in 6 MiB windows
SMALL_FILE_LEVEL = 19  # files under SMALL_FILE: ~10% smaller patches, time that small files can spend
SMALL_FILE = 8 * 1024 * 1024
SURE_PATCH = 0.1  # a patch below this fraction of its window ships without comparing
FILE_OP_COST = 40  # about what a file op costs in the bundle (a path, a digest, framing)
assert WINDOW + 2 * MARGIN <= MAX_PATCH_WINDOW


@dataclass(frozen=True)
class Base:
    """A layer the site holds, with its tar on the packer."""

    layer: BaseLayer
    scan: TarScan
    open: Callable[[], BinaryIO]  # the uncompressed tar


@dataclass(frozen=True)
class DeltaStats:
    copied: int  # target bytes taken whole from base files
    patched: int  # target bytes rebuilt from patches
    literal: int  # target bytes shipped as they are
    files_copied: int
    files_patched: int


@dataclass(frozen=True)
class Encoded:
    head: DeltaHead
    digest: str  # of the op stream
    size: int
    stats: DeltaStats


class _Candidates:
    """Where to look for each target file: by contents, by path, by file name."""

    def __init__(self, bases: Sequence[Base]) -> None:
        self.by_digest: Dict[str, Tuple[int, Member]] = {}
        self.by_path: Dict[str, List[Tuple[int, Member]]] = {}
        self.by_name: Dict[str, List[Tuple[int, Member]]] = {}
        for i, base in enumerate(bases):
            for path, m in base.scan.last_by_path().items():
                self.by_digest.setdefault(m.digest, (i, m))
                self.by_path.setdefault(path, []).append((i, m))
                self.by_name.setdefault(PurePosixPath(path).name, []).append((i, m))

    def similar(self, m: Member) -> Optional[Tuple[int, Member]]:
        """Same path (closest size) first, then same file name with a size within 2x."""
        def closest(found: List[Tuple[int, Member]]) -> Tuple[int, Member]:
            return min(found, key=lambda c: (abs(c[1].size - m.size), -c[0]))
        if m.path is None:
            return None
        same = self.by_path.get(m.path)
        if same:
            return closest(same)
        named = [c for c in self.by_name.get(PurePosixPath(m.path).name, ())
                 if m.size / 2 <= c[1].size <= m.size * 2]
        return closest(named) if named else None


class _Writer:
    """Ops to ``out``, hashed; base files numbered in first-use order."""

    def __init__(self, out: BinaryIO, bases: Sequence[Base]) -> None:
        self.out = out
        self.bases = bases
        self.hasher = hashlib.sha256()
        self.size = 0
        self.layers: Dict[int, int] = {}  # index in bases -> index in the head's bases
        self.files: Dict[Tuple[int, str], int] = {}
        self.tar_bases: Set[int] = set()

    def op(self, op: Op) -> None:
        data = encode_op(op)
        self.hasher.update(data)
        self.size += len(data)
        self.out.write(data)

    def literal(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_LITERAL):
            self.op(Literal(data[i:i + MAX_LITERAL]))

    def file(self, base: int, m: Member) -> int:
        assert m.path is not None
        key = (base, m.path)
        if key not in self.files:
            layer = self.layers.setdefault(base, len(self.layers))
            self.files[key] = len(self.files)
            self.op(BaseFile(layer, m.path, m.size, m.digest))  # defined before its first use
        return self.files[key]

    def range(self, base: int, offset: int, length: int) -> None:
        self.tar_bases.add(base)
        self.op(Range(self.layers.setdefault(base, len(self.layers)), offset, length))

    def head(self, target: str, target_size: int) -> DeltaHead:
        order = sorted(self.layers, key=self.layers.__getitem__)
        # A base is a tar base only if a range op reads its tar: the device then rebuilds
        # that tar; for the others it reads files alone.
        return DeltaHead(target, target_size,
                         tuple(replace(self.bases[i].layer, tar=i in self.tar_bases)
                               for i in order))


def encode(target: BinaryIO, scan: TarScan, diff_id: str, bases: Sequence[Base],
           out: BinaryIO, *, progress: Optional[Callable[[int], None]] = None) -> Encoded:
    """Write the op stream rebuilding ``target`` (its ``scan``, its ``diff_id``) to ``out``.

    Members whose bytes (headers, contents, padding) a tar base holds unchanged are
    copied as ranges of that base's tar, consecutive ones as one range; the others go
    header by header and file by file.
    """
    cands = _Candidates(bases)
    regions: Dict[str, Tuple[int, Region]] = {}
    for i, base in enumerate(bases):
        if base.layer.tar:
            for region in base.scan.regions:
                regions.setdefault(region.digest, (i, region))
    # A range op makes the device rebuild and verify that base's whole tar first (one
    # pass over it, spooled to disk): worth it only when ranges cover much of that tar.
    # A 300 MB layer whose only unchanged members are a directory or two is read by file.
    covered: Dict[int, int] = {}
    for region in scan.regions:
        hit = regions.get(region.digest)
        if hit is not None:
            covered[hit[0]] = covered.get(hit[0], 0) + region.end - region.offset
    worth = {i for i, n in covered.items() if n >= bases[i].scan.size * MIN_RANGE_SHARE}
    regions = {k: v for k, v in regions.items() if v[0] in worth}
    w = _Writer(out, bases)
    copied = patched = files_copied = files_patched = 0
    pos = 0
    handles: Dict[int, BinaryIO] = {}
    pending: List[int] = []  # [base, offset, length] of the range being extended

    def base_fh(i: int) -> BinaryIO:
        if i not in handles:
            handles[i] = bases[i].open()
        return handles[i]

    def literal_range(start: int, end: int) -> None:
        while start < end:
            n = min(MAX_LITERAL, end - start)
            w.literal(read_range(target, start, n))
            start += n
            if progress is not None:
                progress(n)

    def flush() -> None:
        if pending:
            w.range(*pending)
            pending.clear()

    try:
        for region in scan.regions:
            hit = regions.get(region.digest)
            length = region.end - region.offset
            if hit is not None and length >= MIN_RANGE:
                if pending and pending[0] == hit[0] and pending[1] + pending[2] == hit[1].offset \
                        and pos == region.offset:
                    pending[2] += length
                else:
                    flush()
                    literal_range(pos, region.offset)
                    pending.extend((hit[0], hit[1].offset, length))
                pos = region.end
                copied += length
                if progress is not None:
                    progress(length)
                continue
            flush()
            m = region.file
            if m is None or m.size < MIN_FILE:
                continue  # literal, with the headers around it
            literal_range(pos, m.data_offset)
            pos = m.data_offset + m.size
            exact = cands.by_digest.get(m.digest)
            if exact is not None and exact[1].path is not None:
                w.op(Copy(w.file(exact[0], exact[1])))
                copied += m.size
                files_copied += 1
                if progress is not None:
                    progress(m.size)
                continue
            near = cands.similar(m)
            if near is None:
                literal_range(m.data_offset, pos)
                continue
            done = _patch_file(w, target, m, near[0], near[1], base_fh(near[0]), progress)
            patched += done
            files_patched += 1 if done else 0
        flush()
        literal_range(pos, scan.size)
    finally:
        for fh in handles.values():
            fh.close()
    literal = scan.size - copied - patched
    head = w.head(diff_id, scan.size)
    return Encoded(head, "sha256:" + w.hasher.hexdigest(), w.size,
                   DeltaStats(copied, patched, literal, files_copied, files_patched))


def _patch_file(w: _Writer, target: BinaryIO, m: Member, base: int, bm: Member, bfh: BinaryIO,
                progress: Optional[Callable[[int], None]]) -> int:
    """Patch ops (or literals, window by window) for one file; returns bytes patched."""
    patched = 0
    file_index: Optional[int] = None
    for start in range(0, m.size, WINDOW):
        chunk = read_range(target, m.data_offset + start, min(WINDOW, m.size - start))
        # The base window sits where this one would in a file stretched to the base's size.
        centre = start * bm.size // max(1, m.size)
        lo = max(0, centre - MARGIN)
        hi = min(bm.size, centre + len(chunk) + MARGIN)
        window = read_range(bfh, bm.data_offset + lo, hi - lo) if hi > lo else b""
        level = SMALL_FILE_LEVEL if m.size < SMALL_FILE else PATCH_LEVEL
        frame = _compress(chunk, window, level) if window else None
        # Ship the patch only if it beats the window's bytes as the entry's zstd would
        # carry them (binaries and compressed files often patch little better).
        cost = len(frame) + 12 + (FILE_OP_COST if file_index is None else 0) if frame else 0
        if frame is not None and (cost < len(chunk) * SURE_PATCH or cost < _compressed_size(chunk)):
            if file_index is None:
                file_index = w.file(base, bm)
            w.op(Patch(file_index, lo, len(window), len(chunk), frame))
            patched += len(chunk)
        else:
            w.literal(chunk)
        if progress is not None:
            progress(len(chunk))
    return patched


def _compressed_size(chunk: bytes) -> int:
    """About what ``chunk`` costs as literal bytes in the zstd-coded entry."""
    return len(zstandard.ZstdCompressor(level=PATCH_LEVEL, write_checksum=False).compress(chunk))


def _compress(chunk: bytes, window: bytes, level: int = 0) -> bytes:
    dictionary = zstandard.ZstdCompressionDict(window, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    params = zstandard.ZstdCompressionParameters.from_level(
        level or PATCH_LEVEL, window_log=MAX_PATCH_WINDOW_LOG, source_size=len(chunk),
        dict_size=len(window), write_content_size=1, write_checksum=0)
    frame: bytes = zstandard.ZstdCompressor(dict_data=dictionary,
                                            compression_params=params).compress(chunk)
    return frame


class TarTree:
    """A base layer's files read from its tar: the packer's stand-in for the device."""

    def __init__(self, base: Base) -> None:
        self.describe = f"the packer's copy of layer {base.layer.diff_id}"
        self._base = base
        self._by_path = base.scan.last_by_path()

    def open(self, path: str) -> BinaryIO:
        m = self._by_path.get(path)
        if m is None:
            raise FileNotFoundError(path)
        return _Range(self._base.open(), m.data_offset, m.size)  # type: ignore[return-value]


class _Range:
    """One member's contents inside an open tar, as a read-only file."""

    def __init__(self, fh: BinaryIO, offset: int, size: int) -> None:
        self._fh, self._offset, self._size, self._pos = fh, offset, size, 0

    def read(self, n: int = -1) -> bytes:
        left = self._size - self._pos
        n = left if n < 0 else min(n, left)
        self._fh.seek(self._offset + self._pos)
        data = self._fh.read(n)
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = max(0, min(self._size, pos if whence == 0 else self._pos + pos))
        return self._pos

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "_Range":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check(encoded: Encoded, ops: Callable[[], Iterator[bytes]], bases: Sequence[Base]) -> None:
    """Rebuild the target from the op stream with the device's code; raise if not exact."""
    by_chain = {b.layer.chain_id: b for b in bases}
    used = [by_chain[layer.chain_id] for layer in encoded.head.bases]
    tars = [b.open() if layer.tar else None for b, layer in zip(used, encoded.head.bases)]
    try:
        for _ in rebuild(encoded.head, ops(), [TarTree(b) for b in used],
                         f"delta for {encoded.head.target}", tars):
            pass
    finally:
        for fh in tars:
            if fh is not None:
                fh.close()
