"""Streaming bundle writer.

Writes front to back with no seeking, so the output may be a pipe or an SSH channel.
Every entry is hashed while it is written and must match the digest and size it was
announced with; the writer never emits an entry it has not verified.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Protocol, Sequence, Set

import xxhash
import zstandard

from ..errors import BundleFormatError
from ..oci import check_digest
from . import (CODEC_STORED, CODEC_ZSTD, CODECS, DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW_LOG,
               END_MAGIC, FEATURE_SIGNATURE, FORMAT_VERSION, KIND_BLOB, KIND_DELTA, MAGIC,
               MAX_CHUNK_SIZE, SIGNATURE_ALGORITHM, TAG_ENTRY, TAG_FOOTER, TAG_HEADER, TAG_INDEX,
               TAG_SIGNATURE)
from .framing import CHUNK_HEAD, RECORD_HEAD, U32, U64, pack_record, unpack_body
from .reader import zstd_decoded
from .records import (DeltaHead, EntryHead, Header, ImageRecord, Index, IndexEntry, check_entry,
                      check_index, parse_header, parse_index)
from .signature import (Signature, Signer, check_entry_commitment, check_index_commitment,
                        signature_record, signed_message)


class Sink(Protocol):
    def write(self, data: bytes) -> Any: ...


#: Called with each stored chunk of an entry as it is written (``add_blob(tee=...)``).
Tee = Callable[[bytes], None]


@dataclass(frozen=True)
class Encoding:
    """Everything besides an entry's content that decides its stored bytes: a cache of
    encoded entries keys on this (with digest and codec), so reused bytes are the bytes this
    writer would have made. zstd's version is in it: another libzstd may encode differently."""

    level: int
    chunk_size: int
    window_log: int
    zstd: str = ".".join(map(str, zstandard.ZSTD_VERSION)) + "/" + zstandard.__version__


class _Out:
    """Counts and hashes everything written (the footer's whole-bundle xxh3-128)."""

    def __init__(self, raw: Sink) -> None:
        self.raw = raw
        self.offset = 0
        self.hasher = xxhash.xxh3_128()

    def write(self, data: bytes) -> None:
        self.raw.write(data)
        self.hasher.update(data)
        self.offset += len(data)


class BundleWriter:
    """Write one bundle: header, then ``add_blob`` per entry, then ``finish``.

    Args:
        out: binary sink, written sequentially (a file, a pipe, a socket).
        header: the header record, complete.
        level: zstd level for ``CODEC_ZSTD`` entries.
        threads: zstd worker threads; below 1 counts as 1. zstd's multi-threaded mode
            writes the same bytes whatever the number of workers (its single-threaded
            mode does not), so a bundle packed on any machine is byte-identical.
        signers: keys that sign the header, when it requires ``signature-v1``. The
            header's ``commitments`` must then name, in order, the entry heads the
            caller will add (``blob_head``/``delta_head`` build them) and the image records
            it will finish with; the writer refuses anything else.
    """

    def __init__(self, out: Sink, header: Header, *, level: int = 16,
                 threads: int = 1, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 window_log: int = DEFAULT_WINDOW_LOG, signers: Sequence[Signer] = ()) -> None:
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be 1..{MAX_CHUNK_SIZE}")
        self._out = _Out(out)
        self._chunk_size = chunk_size
        self._entries: List[IndexEntry] = []
        self._digests: Set[str] = set()
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=window_log, threads=max(1, threads), write_checksum=0,
            write_content_size=1)
        self._cctx = zstandard.ZstdCompressor(compression_params=params)
        self.level = level
        self.encoding = Encoding(level, chunk_size, window_log)
        self._heads = EntryHeads(level)
        self.header = header
        signed = FEATURE_SIGNATURE in header.required_features
        if signed != bool(signers):
            raise ValueError("a header requiring signature-v1 needs signers, and only it")
        self._out.write(MAGIC + FORMAT_VERSION.to_bytes(2, "big"))
        record = pack_record(TAG_HEADER, header.to_wire())
        try:  # the reader's own bounds (objects, counts, names), so verify never refuses it
            parse_header(unpack_body(record[RECORD_HEAD.size:-U64.size], "header being written"),
                         "being written")
        except BundleFormatError as exc:
            raise ValueError(f"refusing to write a header that breaks the format: {exc.message}") from None
        self._out.write(record)
        if signed:
            message = signed_message(record[RECORD_HEAD.size:-U64.size])
            self._out.write(pack_record(TAG_SIGNATURE, signature_record(
                [Signature(SIGNATURE_ALGORITHM, s.key_id, s.sign(message)) for s in signers])))
        self._finished = False

    @property
    def entries(self) -> List[IndexEntry]:
        return list(self._entries)

    def add_blob(self, digest: str, size: int, data: Iterable[bytes], *, codec: int,
                 media_type: Optional[str] = None, tee: Optional[Tee] = None) -> IndexEntry:
        """Append one content-addressed blob.

        ``data`` yields the decoded bytes; they must hash to ``digest`` and total
        ``size`` or ``ValueError`` is raised (the bundle is then unusable: write to a
        temporary file and discard it on error). ``tee`` sees each stored chunk as it is
        written (to cache the encoded entry: ``add_encoded`` writes it again later); it has
        seen a good entry only if this returns.
        """
        return self._add(self._heads.blob(digest, size, codec=codec, media_type=media_type), data,
                         tee)

    def add_encoded(self, head: EntryHead, chunks: Callable[[], Iterable[bytes]]) -> IndexEntry:
        """Append an entry from its stored bytes (as a ``tee`` saw them), not encoding again.

        ``chunks()`` is called twice and must yield the same chunks each time: first they
        are decoded and checked against ``head`` (one zstd frame, or stored bytes, of
        exactly ``head.size`` bytes hashing to ``head.digest``; each chunk 1..MAX_CHUNK_SIZE)
        with nothing written, so ``EncodedRefused`` leaves the writer as it was and the caller
        may encode the entry afresh; then they are written, and if they differ from what was
        checked (sha256 of the stored bytes) ``EntryMismatch`` is raised and the bundle is
        unusable. ``head`` must be what ``add_blob``/``add_delta`` would have written.
        """
        self._admit(head)
        if head.level != (self.level if head.codec == CODEC_ZSTD else None):
            raise ValueError(f"entry {head.digest} is at level {head.level}, the writer at {self.level}")
        try:
            check_entry(head, self.header, f"entry {head.digest}")
        except BundleFormatError as exc:
            raise ValueError(f"refusing an entry the header does not allow: {exc.message}") from None
        stored = _check_encoded(head, chunks())
        return self._emit(head, _same_as(chunks(), stored, head), None)

    @staticmethod
    def heads(level: int) -> "EntryHeads":
        """The records this writer's ``add_*`` write (to compute commitments up front)."""
        return EntryHeads(level)

    def add_delta(self, delta: DeltaHead, digest: str, size: int, data: Iterable[bytes],
                  tee: Optional[Tee] = None) -> IndexEntry:
        """Append a delta entry: ``data`` is its op stream (``digest``, ``size``), zstd-coded."""
        check_digest(delta.target)
        head = self._heads.delta(delta, digest, size)
        try:
            check_entry(head, self.header, f"delta entry {digest}")
        except BundleFormatError as exc:
            raise ValueError(f"refusing a delta the header does not allow: {exc.message}") from None
        return self._add(head, data, tee)

    def _admit(self, head: EntryHead) -> None:
        """The checks on an entry's record before any of it is written."""
        digest, codec = head.digest, head.codec
        check_digest(digest)
        if codec not in CODECS:
            raise ValueError(f"unknown codec {codec}")
        if digest in self._digests:
            raise ValueError(f"entry {digest} written twice")
        try:
            check_entry_commitment(head, self.header, len(self._entries), f"entry {digest}", False)
        except BundleFormatError as exc:
            raise ValueError(f"refusing an entry the header does not commit to: {exc.message}") from None

    def _add(self, head: EntryHead, data: Iterable[bytes], tee: Optional[Tee] = None) -> IndexEntry:
        digest, size, codec = head.digest, head.size, head.codec
        self._admit(head)
        hasher = hashlib.sha256()
        seen = 0

        def counted() -> Iterable[bytes]:
            # Checked as the bytes pass, so a wrong blob is named before zstd (which was
            # promised ``size`` bytes) fails on it with a message of its own.
            nonlocal seen
            for piece in data:
                hasher.update(piece)
                seen += len(piece)
                if seen > size:
                    raise EntryMismatch(digest, size, "(more bytes)", seen)
                yield piece
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest or seen != size:
                raise EntryMismatch(digest, size, actual, seen)

        if codec == CODEC_STORED:
            chunks = _rechunk(counted(), self._chunk_size)
        else:
            chunks = _zstd_chunks(self._cctx, counted(), self._chunk_size, size)
        return self._emit(head, chunks, tee)

    def _emit(self, head: EntryHead, chunks: Iterable[bytes], tee: Optional[Tee]) -> IndexEntry:
        """Write the record, then the chunks (whose source checks them as they pass)."""
        offset = self._out.offset
        self._out.write(pack_record(TAG_ENTRY, head.to_wire()))
        stored = 0
        for chunk in chunks:
            self._out.write(CHUNK_HEAD.pack(len(chunk), xxhash.xxh3_64_intdigest(chunk)))
            self._out.write(chunk)
            if tee is not None:
                tee(chunk)
            stored += len(chunk)
        self._out.write(U32.pack(0))
        info = IndexEntry.of(head, stored, offset)
        self._entries.append(info)
        self._digests.add(head.digest)
        return info

    def finish(self, images: Sequence[ImageRecord]) -> int:
        """Write the index (image records + entry table) and the footer; return total bytes.

        The index is held to the same rules a reader checks: a writer never emits a
        bundle that ``edgebundle verify`` would refuse.
        """
        if self._finished:
            raise ValueError("bundle already finished")
        index = Index(tuple(self._entries), tuple(images))
        try:
            check_index(index, self.header, "being written", self._entries)
            check_index_commitment(index.images, len(self._entries), self.header,
                                   "being written", False)
        except BundleFormatError as exc:
            raise ValueError(f"refusing to finish a bundle that breaks the format: {exc.message}") from None
        record = pack_record(TAG_INDEX, index.to_wire())
        try:
            parse_index(unpack_body(record[5:-8], "index being written"), "being written")
        except BundleFormatError as exc:
            raise ValueError(f"refusing to finish a bundle that breaks the format: {exc.message}") from None
        index_offset = self._out.offset
        self._out.write(record)
        tail = bytes([TAG_FOOTER]) + U64.pack(index_offset)
        self._out.write(tail)
        # The footer digest covers every byte before it, including its own tag+offset.
        self._out.raw.write(self._out.hasher.digest() + END_MAGIC)
        self._out.offset += 24
        self._finished = True
        return self._out.offset


class EntryHeads:
    """Entry records as a writer at ``level`` writes them."""

    def __init__(self, level: int) -> None:
        self.level = level

    def blob(self, digest: str, size: int, *, codec: int,
             media_type: Optional[str] = None) -> EntryHead:
        return EntryHead(KIND_BLOB, digest, size, codec,
                         level=self.level if codec == CODEC_ZSTD else None, media_type=media_type)

    def delta(self, delta: DeltaHead, digest: str, size: int) -> EntryHead:
        return EntryHead(KIND_DELTA, digest, size, CODEC_ZSTD, level=self.level, delta=delta)


class EntryMismatch(ValueError):
    """The bytes handed to ``add_blob`` are not the blob they were announced as."""

    def __init__(self, digest: str, size: int, actual: str, seen: int) -> None:
        super().__init__(f"entry {digest} ({size} bytes) got content {actual} ({seen} bytes)")
        self.digest = digest


class EncodedRefused(ValueError):
    """Stored bytes handed to ``add_encoded`` are not the entry; nothing was written."""


def _check_encoded(head: EntryHead, chunks: Iterable[bytes]) -> str:
    """Decode ``chunks`` as a reader will and hold them to ``head``; the sha256 of the
    stored bytes, so the second pass can be held to what was checked."""
    what = f"cached entry {head.digest}"
    stored = hashlib.sha256()

    def raw() -> Iterator[bytes]:
        for chunk in chunks:
            if not 0 < len(chunk) <= MAX_CHUNK_SIZE:  # 0 would end the entry early
                raise EncodedRefused(f"{what} has a chunk of {len(chunk)} bytes, not "
                                     f"1..{MAX_CHUNK_SIZE}")
            stored.update(chunk)
            yield chunk

    hasher = hashlib.sha256()
    seen = 0
    try:
        decoded = raw() if head.codec == CODEC_STORED else zstd_decoded(raw(), what)
        for piece in decoded:
            seen += len(piece)
            if seen > head.size:
                raise EncodedRefused(f"{what} decodes to more than its {head.size} bytes")
            hasher.update(piece)
    except BundleFormatError as exc:
        raise EncodedRefused(exc.message) from None
    except OSError as exc:  # e.g. removed meanwhile: nothing was written, encode afresh
        raise EncodedRefused(f"{what} cannot be read: {exc.strerror or exc}") from None
    actual = "sha256:" + hasher.hexdigest()
    if actual != head.digest or seen != head.size:
        raise EncodedRefused(f"{what} ({head.size} bytes) decodes to {actual} ({seen} bytes)")
    return stored.hexdigest()


def _same_as(chunks: Iterable[bytes], stored: str, head: EntryHead) -> Iterator[bytes]:
    """``chunks`` as written, held to the sha256 of the stored bytes checked before."""
    hasher = hashlib.sha256()
    for chunk in chunks:
        if not 0 < len(chunk) <= MAX_CHUNK_SIZE:
            raise EntryMismatch(head.digest, head.size, "(a chunk out of bounds)", 0)
        hasher.update(chunk)
        yield chunk
    if hasher.hexdigest() != stored:  # raised before the entry's end marker is written
        raise EntryMismatch(head.digest, head.size, "(stored bytes changed after the check)", 0)


def _rechunk(pieces: Iterable[bytes], size: int) -> Iterable[bytes]:
    buf = bytearray()
    for piece in pieces:
        if not buf and len(piece) == size:
            yield piece  # the common case (1 MiB reads, 1 MiB chunks): no copy
            continue
        buf += piece
        if len(buf) >= size:
            with memoryview(buf) as view:
                start = 0
                while len(buf) - start >= size:
                    yield bytes(view[start:start + size])
                    start += size
            del buf[:start]
    if buf:
        yield bytes(buf)


def _zstd_chunks(cctx: zstandard.ZstdCompressor, pieces: Iterable[bytes], chunk_size: int,
                 size: int) -> Iterable[bytes]:
    # One zstd frame per entry (better ratio than a frame per chunk); the chunker
    # hands back compressed output in exact chunk_size pieces.
    chunker = cctx.chunker(size=size, chunk_size=chunk_size)
    for piece in pieces:
        yield from chunker.compress(piece)
    yield from chunker.finish()  # type: ignore[no-untyped-call]  # zstandard's stub lacks it
