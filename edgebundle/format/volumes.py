"""Volumes: one bundle's bytes cut into consecutive slices, one file each (FORMAT.md, "Volumes").

    Volume  := VMagic || VHead || payload[length] || VTrailer
    VMagic  := "\\x89EBV\\r\\n\\x1a\\n"
    VHead   := u16 version || id[16] || u32 number || u32 count || u64 offset || u64 length
               || u64 total || u64 xxh3_64(VMagic || the fields before it)
    VTrailer:= xxh3_128(payload) || "EBVEND\\r\\n"

The payloads, joined in order, are exactly the bundle a single-file pack writes, so
everything the bundle reader checks (and signatures over the bundle) applies unchanged;
a volume only adds what it takes to name it (the set's id, its number, the count) and
to check it on its own (the header's xxh3 and the payload's xxh3-128).

This module is pure: it reads and writes file objects that its callers open.
``VolumeSplitter`` cuts a stream into volumes, ``JoinedVolumes`` reads them back as one
stream, checking each header as it arrives and each payload as it ends. Standard
library and xxhash only: it runs on the device.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable, Dict, Iterator, List, Optional

import xxhash

from ..errors import BundleFormatError
from . import (VOLUME_END_MAGIC, VOLUME_HEAD_SIZE, VOLUME_MAGIC, VOLUME_TRAILER_SIZE,
               VOLUME_VERSION)

# version, id, number, count, offset, length, total (after the magic; the check follows).
_FIELDS = struct.Struct(">H16sIIQQQ")
_CHECK = struct.Struct(">Q")
OVERHEAD = VOLUME_HEAD_SIZE + VOLUME_TRAILER_SIZE  # bytes a volume adds to its payload

_HINT = ("copy that volume again from the packer's output, then check the set with "
         "`edgebundle verify` on its first volume")
_ORDER_HINT = "pass the volumes in order (.001, .002, …), each once, all from one pack"


class VolumeError(BundleFormatError):
    """A volume, or the set of volumes, is damaged, incomplete or mixed up (exit 5)."""


@dataclass(frozen=True)
class VolumeHead:
    """A volume's header: which bundle (``bundle_id``), which slice of it, of how many."""

    bundle_id: bytes  # 16 bytes: xxh3-128 of the whole bundle, the same in every volume
    number: int  # 1-based
    count: int
    offset: int  # where the payload starts in the bundle
    length: int  # payload bytes
    total: int  # the bundle's size

    @property
    def id_hex(self) -> str:
        return self.bundle_id.hex()

    @property
    def file_size(self) -> int:
        return OVERHEAD + self.length

    def pack(self) -> bytes:
        body = VOLUME_MAGIC + _FIELDS.pack(VOLUME_VERSION, self.bundle_id, self.number,
                                           self.count, self.offset, self.length, self.total)
        return body + _CHECK.pack(xxhash.xxh3_64_intdigest(body))


assert len(VOLUME_MAGIC) + _FIELDS.size + _CHECK.size == VOLUME_HEAD_SIZE


def is_volume(prefix: bytes) -> bool:
    """Whether a file starting with ``prefix`` (at least 8 bytes) is a volume."""
    return prefix[:len(VOLUME_MAGIC)] == VOLUME_MAGIC


def parse_head(data: bytes, what: str) -> VolumeHead:
    """A volume header from its ``VOLUME_HEAD_SIZE`` bytes; ``what`` names it in errors."""
    if len(data) < VOLUME_HEAD_SIZE:
        raise VolumeError(f"{what} is truncated (a volume header needs {VOLUME_HEAD_SIZE} bytes, "
                          f"found {len(data)})", _HINT)
    if not is_volume(data):
        raise VolumeError(f"{what} is not an edgebundle volume (bad magic)",
                          "pass the files written by `edgebundle pack --volume-size`")
    body = data[:VOLUME_HEAD_SIZE - _CHECK.size]
    version = int.from_bytes(body[8:10], "big")
    if version != VOLUME_VERSION:
        raise VolumeError(f"{what} is volume format version {version}; this edgebundle reads "
                          f"{VOLUME_VERSION}",
                          "upgrade edgebundle on this device" if version > VOLUME_VERSION else None)
    (check,) = _CHECK.unpack(data[len(body):VOLUME_HEAD_SIZE])
    if xxhash.xxh3_64_intdigest(body) != check:
        raise VolumeError(f"{what} is damaged (header checksum mismatch)", _HINT)
    _, bid, number, count, offset, length, total = _FIELDS.unpack(body[len(VOLUME_MAGIC):])
    # A writer never emits these, and a checked header can hold them only if forged:
    # refuse them here so that every later rule can trust the fields' ranges.
    if not (1 <= number <= count and length >= 1 and offset + length <= total):
        raise VolumeError(f"{what} has an invalid header (volume {number} of {count}, bytes "
                          f"{offset}+{length} of {total})", _HINT)
    return VolumeHead(bid, number, count, offset, length, total)


def check_next(head: VolumeHead, what: str, position: int, first: Optional[VolumeHead],
               offset: int, seen: Dict[int, str]) -> None:
    """Hold the volume found at ``position`` (1-based) to the set so far.

    ``first`` is volume 1's header (None when ``head`` is the first), ``offset`` where
    its payload must start, ``seen`` the numbers already read and who carried them.
    """
    if first is None:
        if head.number != 1:
            raise VolumeError(f"{what} is volume {head.number} of {head.count}, not the first",
                              "start with volume 1 (the file ending in .001)")
        return
    if head.bundle_id != first.bundle_id:
        raise VolumeError(f"{what} belongs to another bundle (id {head.id_hex}; volume 1 has "
                          f"{first.id_hex})", _ORDER_HINT)
    if head.count != first.count:
        raise VolumeError(f"{what} says the bundle has {head.count} volumes; volume 1 says "
                          f"{first.count}", _ORDER_HINT)
    if head.total != first.total:
        raise VolumeError(f"{what} says the bundle is {head.total} bytes; volume 1 says "
                          f"{first.total}", _ORDER_HINT)
    if head.number != position:
        if head.number in seen:
            raise VolumeError(f"{what} is volume {head.number} again (duplicated; "
                              f"{seen[head.number]} was volume {head.number}), expected volume "
                              f"{position} of {head.count}", _ORDER_HINT)
        raise VolumeError(f"{what} is volume {head.number} of {head.count}, expected volume "
                          f"{position} (volumes swapped or out of order)", _ORDER_HINT)
    if head.offset != offset:
        raise VolumeError(f"{what} (volume {position} of {head.count}) starts at bundle byte "
                          f"{head.offset}, expected {offset}", _HINT)


def pack_trailer(payload_digest: bytes) -> bytes:
    return payload_digest + VOLUME_END_MAGIC


# ---------------------------------------------------------------------------
# Writing


class VolumeSplitter:
    """Cut the stream written to it into volumes of at most ``volume_size`` bytes each.

    ``create(number)`` opens a new, seekable volume file; ``close(number, fh)`` is called
    when one is complete but for its header. Headers are written as placeholders: the
    count, the total and the id are known only at the end, so ``finish`` returns the
    final headers and the caller writes each over the first ``VOLUME_HEAD_SIZE`` bytes
    of its volume. A volume is opened only when a byte is written to it, so a stream
    that fills its last volume exactly leaves no empty volume behind.
    """

    def __init__(self, volume_size: int, create: Callable[[int], BinaryIO],
                 close: Callable[[int, BinaryIO], None]) -> None:
        if volume_size <= OVERHEAD:
            raise ValueError(f"volume size {volume_size} leaves no room for data "
                             f"(a volume adds {OVERHEAD} bytes)")
        self.capacity = volume_size - OVERHEAD
        self._create = create
        self._close = close
        self._fh: Optional[BinaryIO] = None
        self._room = 0
        self._payload = xxhash.xxh3_128()
        self._whole = xxhash.xxh3_128()
        self._lengths: List[int] = []
        self._finished = False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._room == 0:
                self._next_volume()
            assert self._fh is not None
            piece = view[:self._room]
            self._fh.write(piece)
            self._payload.update(piece)
            self._whole.update(piece)
            self._room -= len(piece)
            self._lengths[-1] += len(piece)
            view = view[len(piece):]
        return len(data)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def _next_volume(self) -> None:
        self._end_volume()
        number = len(self._lengths) + 1
        self._fh = self._create(number)
        self._fh.write(bytes(VOLUME_HEAD_SIZE))  # placeholder: see finish()
        self._lengths.append(0)
        self._room = self.capacity
        self._payload = xxhash.xxh3_128()

    def _end_volume(self) -> None:
        if self._fh is None:
            return
        self._fh.write(pack_trailer(self._payload.digest()))
        fh, self._fh = self._fh, None
        self._close(len(self._lengths), fh)

    def close(self) -> None:
        """Close the volume being written, if any, as it is (after an error)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()

    def finish(self) -> List[VolumeHead]:
        """End the last volume; the headers to write, in order (empty for no bytes)."""
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        self._end_volume()
        total = sum(self._lengths)
        bid = self._whole.digest()
        heads = []
        offset = 0
        for i, length in enumerate(self._lengths):
            heads.append(VolumeHead(bid, i + 1, len(self._lengths), offset, length, total))
            offset += length
        return heads


# ---------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class VolumeSource:
    """Where the next volume's bytes come from.

    ``what`` names it in errors ("volume b.ebundle.002", "volume 2 on standard input").
    ``alone``: the stream holds this volume only (a file), so it must end after it;
    otherwise (standard input) volumes follow each other in one stream. ``owned``: close
    ``fh`` once the volume has been read.
    """

    what: str
    fh: BinaryIO
    alone: bool
    owned: bool


class JoinedVolumes:
    """The bundle whose volumes ``sources`` yields, read as one stream (``read(n)``).

    Checks, as bytes arrive: each volume's header (its xxh3 and ``check_next`` against
    the set so far), that each payload hashes to its trailer's xxh3-128 (before the
    payload's last byte is handed out, so the bundle's last byte, and so its footer,
    is only read once every volume has been verified), that a file ends with its
    volume, that nothing follows the last one, and that the joined payloads hash to the
    set's id. ``sources`` running out before the count is a missing volume.
    """

    def __init__(self, sources: Iterator[VolumeSource], missing: Callable[[int, int], str]) -> None:
        self._sources = sources
        self._missing = missing  # (number, count) -> what the error says about it
        self._src: Optional[VolumeSource] = None
        self._head: Optional[VolumeHead] = None
        self._position = 0
        self._remaining = 0
        self._offset = 0
        self._payload = xxhash.xxh3_128()
        self._whole = xxhash.xxh3_128()
        self._seen: Dict[int, str] = {}
        self.first: Optional[VolumeHead] = None
        self.done = False

    @property
    def count(self) -> Optional[int]:
        return self.first.count if self.first is not None else None

    def read(self, n: int = -1) -> bytes:
        out: List[bytes] = []
        want = n if n >= 0 else 1 << 62
        while want > 0 and not self.done:
            if self._remaining == 0:
                self._open_next()
                continue
            src = self._src
            assert src is not None
            data = src.fh.read(min(want, self._remaining, 1 << 24))
            if not data:
                raise self._truncated()
            self._payload.update(data)
            self._whole.update(data)
            self._remaining -= len(data)
            self._offset += len(data)
            want -= len(data)
            out.append(data)
            if self._remaining == 0:
                self._end_volume()
        return b"".join(out)

    def _open_next(self) -> None:
        position = self._position + 1
        src = next(self._sources, None)
        if src is None:
            assert self.first is not None  # the caller's first source is volume 1
            raise VolumeError(self._missing(position, self.first.count),
                              "copy every volume of the set next to the first one")
        data = _read_upto(src.fh, VOLUME_HEAD_SIZE)
        if not data and not src.alone and self.first is not None:
            raise VolumeError(self._missing(position, self.first.count),
                              "send every volume, in order, e.g. `cat b.ebundle.0* | edgebundle import -`")
        head = parse_head(data, src.what)
        check_next(head, src.what, position, self.first, self._offset, self._seen)
        if self.first is None:
            self.first = head
        self._seen[head.number] = src.what
        self._src, self._head, self._position = src, head, position
        self._remaining = head.length
        self._payload = xxhash.xxh3_128()

    def _end_volume(self) -> None:
        src, head = self._src, self._head
        assert src is not None and head is not None
        trailer = _read_upto(src.fh, VOLUME_TRAILER_SIZE)
        if len(trailer) < VOLUME_TRAILER_SIZE:
            raise self._truncated()
        if trailer[16:] != VOLUME_END_MAGIC or trailer[:16] != self._payload.digest():
            raise VolumeError(f"{src.what} (volume {head.number} of {head.count}) is damaged: "
                              "payload checksum mismatch", _HINT)
        last = head.number == head.count
        if (src.alone or last) and src.fh.read(1):
            where = "its end" if src.alone else f"the last volume ({head.count} of {head.count})"
            raise VolumeError(f"{src.what} has data after {where}",
                              _HINT if src.alone else _ORDER_HINT)
        self._release()
        if last:
            if self._whole.digest() != head.bundle_id:
                raise VolumeError(f"the volumes of bundle {head.id_hex} do not join into it "
                                  "(mixed from different packs?)", _ORDER_HINT)
            self.done = True

    def _truncated(self) -> VolumeError:
        src, head = self._src, self._head
        assert src is not None and head is not None
        return VolumeError(f"{src.what} (volume {head.number} of {head.count}) is truncated",
                           _HINT)

    def _release(self) -> None:
        if self._src is not None and self._src.owned:
            self._src.fh.close()
        self._src = None

    def blame(self) -> Optional[VolumeError]:
        """After a bundle error: the volume to blame, if the one being read is damaged.

        Every earlier volume was verified when it ended; so if the bundle reader found
        damage, it lies in the current volume, or the bundle itself is bad. Reads the
        rest of the current volume (at most one volume) to tell which.
        """
        try:
            while self._remaining > 0:
                self.read(min(self._remaining, 1 << 20))
        except VolumeError as exc:
            return exc
        return None

    def close(self) -> None:
        self._release()


def _read_upto(fh: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the stream (pipes return short reads)."""
    data = fh.read(n)
    while data and len(data) < n:
        more = fh.read(n - len(data))
        if not more:
            break
        data += more
    return data
