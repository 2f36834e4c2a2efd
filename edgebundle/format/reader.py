"""Streaming bundle reader: one forward pass, verifying as it goes.

Checks, in the order bytes arrive:
  magic and version -> header record xxh3 -> per entry: record xxh3, each chunk's
  xxh3 before it is decompressed, decoded length never above the announced size,
  sha256 of the decoded bytes == the entry's digest -> index record xxh3, index
  agrees with the entries seen -> footer: whole-bundle xxh3-128 and end magic.

Any failure raises ``BundleFormatError`` naming what and where. Memory stays bounded
by one chunk plus the zstd window (capped by ``MAX_WINDOW_LOG``), whatever the size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Optional, Set, Tuple

import xxhash
import zstandard

from ..errors import BundleFormatError
from . import (CODEC_STORED, END_MAGIC, FEATURE_SIGNATURE, FOOTER_SIZE, FORMAT_VERSION, MAGIC,
               MAX_CHUNK_SIZE, MAX_ENTRIES, MAX_WINDOW_LOG, SUPPORTED_VERSIONS, TAG_ENTRY,
               TAG_FOOTER, TAG_HEADER, TAG_INDEX, TAG_SIGNATURE)
from .framing import U32, U64, record_limit, unpack_body
from .records import (EntryHead, Header, Index, IndexEntry, check_entry, check_index,
                      parse_entry_head, parse_header, parse_index)
from .signature import (Signature, check_entry_commitment, check_index_commitment,
                        parse_signature_record, signed_message)
from .zstdframe import FrameWalker

_HINT = "the file is damaged or incomplete: copy it again, or check it with `edgebundle verify`"
class _In:
    """Exact reads from the source, counting offset and hashing for the footer."""

    def __init__(self, raw: BinaryIO, name: str) -> None:
        self.raw = raw
        self.name = name
        self.offset = 0
        self.hasher = xxhash.xxh3_128()

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.raw.read(n)
        while len(data) < n:  # pipes and sockets return short reads
            more = self.raw.read(n - len(data))
            if not more:
                raise BundleFormatError(
                    f"bundle {self.name} is truncated at byte {self.offset + len(data)} "
                    f"(while reading {what})", _HINT)
            data += more
        self.hasher.update(data)
        self.offset += n
        return data


def _read_record(src: _In, tag: int, what: str) -> Dict[str, Any]:
    return _read_record_raw(src, tag, what)[0]


def _read_record_raw(src: _In, tag: int, what: str) -> Tuple[Dict[str, Any], bytes]:
    """A record of kind ``tag``: its decoded body and the body's bytes."""
    (got_tag,) = src.read_exact(1, what)
    if got_tag != tag:
        raise BundleFormatError(
            f"bundle {src.name}: expected {what} at byte {src.offset - 1}, "
            f"found tag 0x{got_tag:02x}", _HINT)
    return _read_record_body_raw(src, what, tag)


def _read_record_body(src: _In, what: str, tag: int) -> Dict[str, Any]:
    return _read_record_body_raw(src, what, tag)[0]


def _read_record_body_raw(src: _In, what: str, tag: int) -> Tuple[Dict[str, Any], bytes]:
    """The rest of a record once its tag byte has been read."""
    (length,) = U32.unpack(src.read_exact(4, what))
    limit = record_limit(tag)
    if length > limit:  # refused before a byte of it is read or held
        raise BundleFormatError(f"bundle {src.name}: {what} claims {length} bytes "
                                f"(limit {limit})", _HINT)
    body = src.read_exact(length, what)
    (check,) = U64.unpack(src.read_exact(8, what))
    if xxhash.xxh3_64_intdigest(body) != check:
        raise BundleFormatError(f"bundle {src.name}: {what} checksum mismatch "
                                f"at byte {src.offset - length - 8}", _HINT)
    return unpack_body(body, f"{src.name} {what}"), body


class Entry:
    """One entry being read. Iterate ``chunks()`` once for the decoded, verified bytes."""

    def __init__(self, reader: "BundleReader", head: EntryHead, offset: int) -> None:
        self._reader = reader
        self.head = head
        self.offset = offset
        self.stored_size = 0
        self.consumed = False

    @property
    def digest(self) -> str:
        return self.head.digest

    @property
    def size(self) -> int:
        return self.head.size

    @property
    def codec(self) -> int:
        return self.head.codec

    @property
    def media_type(self) -> Optional[str]:
        return self.head.media_type

    def _raw_chunks(self) -> Iterator[bytes]:
        src = self._reader._src
        while True:
            (length,) = U32.unpack(src.read_exact(4, f"entry {self.digest}"))
            if length == 0:
                return
            if length > MAX_CHUNK_SIZE:
                raise BundleFormatError(f"bundle entry {self.digest}: chunk of {length} bytes "
                                        f"exceeds {MAX_CHUNK_SIZE}", _HINT)
            (check,) = U64.unpack(src.read_exact(8, f"entry {self.digest}"))
            data = src.read_exact(length, f"entry {self.digest}")
            if xxhash.xxh3_64_intdigest(data) != check:
                raise BundleFormatError(
                    f"bundle entry {self.digest} is corrupt (chunk checksum mismatch at byte "
                    f"{src.offset - length})", _HINT)
            self.stored_size += length
            yield data

    def chunks(self) -> Iterator[bytes]:
        """Yield decoded bytes; raise ``BundleFormatError`` if they are not the entry."""
        if self.consumed:
            raise RuntimeError("entry already read")
        self.consumed = True
        hasher = hashlib.sha256()
        total = 0
        if self.codec == CODEC_STORED:
            decoded: Iterator[bytes] = self._raw_chunks()
        else:
            decoded = self._zstd(self._raw_chunks())
        for piece in decoded:
            total += len(piece)
            if total > self.size:
                raise BundleFormatError(f"bundle entry {self.digest} decodes to more than its "
                                        f"{self.size} bytes", _HINT)
            hasher.update(piece)
            yield piece
        actual = "sha256:" + hasher.hexdigest()
        if total != self.size or actual != self.digest:
            raise BundleFormatError(f"bundle entry {self.digest} is corrupt: content hashes to "
                                    f"{actual} ({total} of {self.size} bytes)", _HINT)
        self._reader._seen.append(IndexEntry.of(self.head, self.stored_size, self.offset))

    def _zstd(self, raw: Iterator[bytes]) -> Iterator[bytes]:
        return zstd_decoded(raw, f"bundle entry {self.digest}")

    def skip(self) -> None:
        """Consume (and still verify) the entry without using its bytes."""
        for _ in self.chunks():
            pass


def zstd_decoded(raw: Iterator[bytes], what: str) -> Iterator[bytes]:
    """The decoded bytes of an entry's stored chunks ``raw``: exactly one zstd frame within
    the window bound, or ``BundleFormatError``. The writer checks cached entries with it too."""
    dctx = zstandard.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG)
    walker = FrameWalker(what)

    def framed() -> Iterator[bytes]:
        for chunk in raw:
            walker.feed(chunk)  # refuses anything but exactly one frame, early
            yield chunk
        walker.finish()

    # A stream reader hands back bounded pieces, so a small chunk that inflates
    # hugely cannot blow up memory.
    # read_size >= any chunk: the source hands over whole chunks, never slices.
    source: Any = _ChunkStream(framed())  # zstandard calls only read(); its stub wants IO
    reader = dctx.stream_reader(source, read_size=MAX_CHUNK_SIZE, read_across_frames=False)
    try:
        while True:
            piece = reader.read(256 * 1024)
            if not piece:
                break
            yield piece
    except zstandard.ZstdError as exc:
        raise BundleFormatError(f"{what} does not decompress: {exc}", _HINT) from None
    # The decompressor stops at the frame's end; make the walker see every byte.
    for chunk in framed():
        pass


class _ChunkStream:
    """File-like ``read(n)`` over an iterator of chunks (for zstd's read_to_iter)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def read(self, n: int = -1) -> bytes:
        if not self._buf:
            self._buf = next(self._chunks, b"")
        if n < 0 or n >= len(self._buf):
            out, self._buf = self._buf, b""
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return out



#: Decides on a signed (or unsigned) header before any entry is read: returns the id of
#: the trusted key whose signature it checked, None to read the bundle as unsigned, or
#: raises (``edgebundle.trust.TrustPolicy.admit``).
Verifier = Callable[["BundleReader"], Optional[str]]


class BundleReader:
    """Read a bundle front to back.

    ``header`` (a checked ``Header``) is available at once, with ``signatures`` (empty
    when unsigned) and ``signed_message``; ``verifier`` (if given) has decided on them
    before the constructor returns, and ``signed_by`` names the key it trusted. Iterate
    ``entries()`` (each
    entry must be read or skipped before the next arrives); ``index`` (a checked
    ``Index``) is available after the iteration ends, by which time the whole bundle has
    been verified: every chunk, every entry's sha256, the footer, and every rule of
    FORMAT.md about the records.
    """

    def __init__(self, stream: BinaryIO, name: str = "<stream>",
                 verifier: Optional[Verifier] = None) -> None:
        self._src = _In(stream, name)
        self.name = name
        self._seen: List[IndexEntry] = []
        self._digests: Set[str] = set()
        self.index: Optional[Index] = None
        self.total_size: Optional[int] = None
        self.version = _read_preamble(self._src, name)
        obj, body = _read_record_raw(self._src, TAG_HEADER, "header")
        self.header: Header = parse_header(obj, name)
        self.signed_message = signed_message(body, self.version)
        self.signatures: Tuple[Signature, ...] = ()
        if FEATURE_SIGNATURE in self.header.required_features:
            self.signatures = parse_signature_record(
                _read_record(self._src, TAG_SIGNATURE, "signature record"), name)
        self.signed_by: Optional[str] = verifier(self) if verifier is not None else None

    def entries(self) -> Iterator[Entry]:
        """Yield entries in bundle order, then read and check the index and footer."""
        src = self._src
        while True:
            offset = src.offset
            (tag,) = src.read_exact(1, "entry or index")
            if tag == TAG_INDEX:
                self._read_index_after_tag(offset)
                return
            if tag != TAG_ENTRY:
                raise BundleFormatError(f"bundle {self.name}: unexpected tag 0x{tag:02x} at "
                                        f"byte {offset}", _HINT)
            where = f"bundle {self.name} entry at byte {offset}"
            head = parse_entry_head(_read_record_body(src, "entry header", TAG_ENTRY), where)
            check_entry_commitment(head, self.header, len(self._digests), where,
                                   self.signed_by is not None)
            check_entry(head, self.header, where)
            if len(self._digests) >= MAX_ENTRIES:  # what the reader keeps per entry is bounded
                raise BundleFormatError(f"bundle {self.name}: more than {MAX_ENTRIES} entries "
                                        f"(the next at byte {offset})", _HINT)
            if head.digest in self._digests:
                raise BundleFormatError(f"bundle {self.name}: entry {head.digest} appears twice "
                                        f"(second at byte {offset})", _HINT)
            self._digests.add(head.digest)
            entry = Entry(self, head, offset)
            yield entry
            if not entry.consumed:
                entry.skip()

    def _read_index_after_tag(self, offset: int) -> None:
        src = self._src
        body = _read_record_body(src, "index", TAG_INDEX)
        tail = src.read_exact(9, "footer")
        expected = src.hasher.digest()
        rest = src.read_exact(24, "footer")
        if tail[0] != TAG_FOOTER or rest[16:] != END_MAGIC:
            raise BundleFormatError(f"bundle {self.name} has a malformed footer", _HINT)
        if U64.unpack(tail[1:])[0] != offset:
            raise BundleFormatError(f"bundle {self.name}: footer points at the wrong index", _HINT)
        if rest[:16] != expected:
            raise BundleFormatError(f"bundle {self.name}: whole-bundle checksum mismatch", _HINT)
        if src.raw.read(1):
            raise BundleFormatError(f"bundle {self.name} has data after its footer", _HINT)
        self.total_size = src.offset
        index = parse_index(body, self.name)
        check_index(index, self.header, self.name, self._seen)
        check_index_commitment(index.images, len(self._seen), self.header, self.name,
                               self.signed_by is not None)
        self.index = index


def _read_preamble(src: _In, name: str) -> int:
    """Magic and version; returns the version."""
    magic = src.read_exact(len(MAGIC), "magic")
    if magic != MAGIC:
        raise BundleFormatError(f"{name} is not an edgebundle bundle (bad magic)",
                                "pass a file written by `edgebundle pack`")
    version = int.from_bytes(src.read_exact(2, "version"), "big")
    if version not in SUPPORTED_VERSIONS:
        raise BundleFormatError(
            f"bundle {name} is format version {version}; this edgebundle reads "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}",
            "upgrade edgebundle on this device" if version > FORMAT_VERSION else None)
    return version


@dataclass(frozen=True)
class BundleInfo:
    """Header and index of a bundle file, read by seeking (``read_index``)."""

    path: str
    version: int
    header: Header
    index: Index
    size: int
    signatures: Tuple[Signature, ...] = ()

    def to_json(self) -> Dict[str, Any]:
        header = self.header.to_wire()
        if self.header.commitments is not None:  # binary: hex for JSON
            header["commitments"] = {"entries": [c.hex() for c in self.header.commitments.entries],
                                     "images": self.header.commitments.images.hex()}
        return {"header": header, "version": self.version,
                "index": self.index.to_wire(), "size": self.size,
                "signatures": [{"algorithm": s.algorithm, "key_id": s.key_id,
                                "signature": s.signature.hex()} for s in self.signatures]}


def read_index(path: "os.PathLike[str] | str") -> BundleInfo:
    """Random access: header and index of a bundle file without reading its entries.

    Checks structure, record checksums and every record rule that needs no entry bytes
    (the index against the header); ``BundleReader`` does the full check.
    """
    name = os.fspath(path)
    with open(path, "rb") as fh:
        return read_index_from(fh, name)


def read_index_from(fh: BinaryIO, name: str) -> BundleInfo:
    """``read_index`` of an open, seekable bundle (a file, or a volume set's joined view)."""
    reader = BundleReader(fh, name)
    fh.seek(0, os.SEEK_END)
    end = fh.tell()
    if end < FOOTER_SIZE:
        raise BundleFormatError(f"bundle {name} is truncated", _HINT)
    fh.seek(end - FOOTER_SIZE)
    footer = fh.read(FOOTER_SIZE)
    if footer[0] != TAG_FOOTER or footer[-len(END_MAGIC):] != END_MAGIC:
        raise BundleFormatError(f"bundle {name} is truncated (no footer)", _HINT)
    (index_offset,) = U64.unpack(footer[1:9])
    if index_offset >= end:
        raise BundleFormatError(f"bundle {name}: footer points past the end", _HINT)
    fh.seek(index_offset)
    src = _In(fh, name)
    index = parse_index(_read_record(src, TAG_INDEX, "index"), name)
    check_index(index, reader.header, name)
    check_index_commitment(index.images, len(index.entries), reader.header, name, False)
    return BundleInfo(name, reader.version, reader.header, index, end, reader.signatures)
