"""Tests for edgebundle.format: writer/reader round trips and every failure mode.

Hostile or damaged bytes are crafted by hand from the spec (docs/FORMAT.md, "Layout")
with ``records.pack_record`` and explicit chunk framing, so the tests do not depend on
the writer to produce the bad cases.
"""

from __future__ import annotations

import hashlib
import io
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import msgpack
import pytest
import xxhash
import zstandard

from edgebundle.errors import BundleFormatError
from edgebundle.format import (
    CODEC_STORED,
    CODEC_ZSTD,
    END_MAGIC,
    FOOTER_SIZE,
    FORMAT_VERSION,
    MAGIC,
    MAX_CHUNK_SIZE,
    DEFAULT_WINDOW_LOG,
    MAX_RECORD_SIZE,
    MAX_WINDOW_LOG,
    TAG_ENTRY,
    TAG_FOOTER,
    TAG_HEADER,
    TAG_INDEX,
    BundleReader,
    BundleWriter,
    read_index,
)
from edgebundle.format.framing import CHUNK_HEAD, U32, U64, pack_record
from edgebundle.format.records import Header, parse_header


def header_of(fields: Dict[str, Any]) -> Header:
    """A typed header from wire fields (the writer fills nothing in any more)."""
    wire = {"created": "2026-01-01T00:00:00Z", "tool": "test", "required_features": [],
            "volume": None, "content_bytes": 0}
    wire.update(fields)
    return parse_header(wire, "test")

HEADER = {"site": "gw-01", "runtime": "containerd", "namespace": "k8s.io",
          "platform": "linux/arm64", "layer_form": "blob", "prerequisites": [], "images": [], "content_bytes": 0}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# Helpers: write with the real writer, read with the real reader.


def write_bundle(blobs: Sequence[Tuple[bytes, int]], *, chunk_size: int = 64, level: int = 3,
                 header: Optional[Dict[str, Any]] = None, images: Optional[List[Any]] = None,
                 piece: int = 17, threads: int = 1) -> bytes:
    """A bundle of ``blobs`` [(data, codec)], data fed to the writer in ``piece``-byte pieces."""
    out = io.BytesIO()
    w = BundleWriter(out, header_of(HEADER if header is None else header), level=level,
                     chunk_size=chunk_size, threads=threads)
    for data, codec in blobs:
        pieces = [data[i:i + piece] for i in range(0, len(data), piece)]
        w.add_blob(sha(data), len(data), pieces, codec=codec, media_type="application/x-test")
    total = w.finish(images or [])
    raw = out.getvalue()
    assert total == len(raw)
    return raw


def read_all(stream: Any, name: str = "t.ebundle") -> Tuple[BundleReader, List[Tuple[str, bytes]]]:
    reader = BundleReader(stream, name)
    got = []
    for entry in reader.entries():
        got.append((entry.digest, b"".join(entry.chunks())))
    return reader, got


def read_bytes(data: bytes) -> Tuple[BundleReader, List[Tuple[str, bytes]]]:
    return read_all(io.BytesIO(data))


def expect_error(data: bytes, *fragments: str) -> BundleFormatError:
    with pytest.raises(BundleFormatError) as info:
        read_bytes(data)
    text = str(info.value)
    for frag in fragments:
        assert frag in text, f"{frag!r} not in {text!r}"
    return info.value


class Pipe:
    """A non-seekable source (like a pipe or SSH channel), optionally with short reads."""

    def __init__(self, data: bytes, short: bool = False, seed: int = 7) -> None:
        self._data = data
        self._pos = 0
        self._short = short
        self._rng = random.Random(seed)
        self.max_pos = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = len(self._data) - self._pos
        if self._short:
            n = min(n, self._rng.randint(1, 7))
        out = self._data[self._pos:self._pos + n]
        self._pos += len(out)
        self.max_pos = max(self.max_pos, self._pos)
        return out

    def seek(self, *args: Any) -> int:
        raise io.UnsupportedOperation("not seekable")

    def tell(self) -> int:
        raise io.UnsupportedOperation("not seekable")


# ---------------------------------------------------------------------------
# Spec-level parser and crafter, written from FORMAT.md alone.


def chunk_frame(data: bytes) -> bytes:
    return CHUNK_HEAD.pack(len(data), xxhash.xxh3_64_intdigest(data)) + data


def craft(entries: Sequence[Tuple[Dict[str, Any], Sequence[bytes]]], *,
          header: Optional[Dict[str, Any]] = None, images: Optional[List[Any]] = None,
          fix_index: Optional[Callable[[Dict[str, Any]], None]] = None,
          version: int = FORMAT_VERSION, magic: bytes = MAGIC) -> bytes:
    """Build a bundle byte for byte: entries are (record body, [chunk payloads])."""
    hdr = {"created": "2026-01-01T00:00:00Z", "tool": "test", "required_features": [],
           "volume": None}
    hdr.update(HEADER if header is None else header)
    out = bytearray(magic + version.to_bytes(2, "big"))
    out += pack_record(TAG_HEADER, hdr)
    listed = []
    for head, chunks in entries:
        offset = len(out)
        out += pack_record(TAG_ENTRY, head)
        for c in chunks:
            out += chunk_frame(c)
        out += U32.pack(0)
        listed.append({"digest": head.get("digest"), "kind": head.get("kind"),
                       "size": head.get("size"), "codec": head.get("codec"),
                       "stored_size": sum(len(c) for c in chunks), "offset": offset})
    index = {"entries": listed, "images": images or []}
    if fix_index is not None:
        fix_index(index)
    index_offset = len(out)
    out += pack_record(TAG_INDEX, index)
    out += bytes([TAG_FOOTER]) + U64.pack(index_offset)
    out += xxhash.xxh3_128_digest(bytes(out)) + END_MAGIC
    return bytes(out)


def entry_head(data: bytes, codec: int = CODEC_STORED, **over: Any) -> Dict[str, Any]:
    head = {"kind": "blob", "digest": sha(data), "size": len(data), "codec": codec}
    head.update(over)
    return head


def refooter(body: bytes) -> bytes:
    """Recompute the footer of ``body`` (which ends with tag + index offset)."""
    return body + xxhash.xxh3_128_digest(body) + END_MAGIC


def parse_layout(data: bytes) -> Dict[str, Any]:
    """Walk a bundle by the spec, checking every checksum; return the regions found."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        assert pos + n <= len(data), "bundle shorter than its framing says"
        out = data[pos:pos + n]
        pos += n
        return out

    def record(tag: int) -> Tuple[int, Tuple[int, int], Dict[str, Any]]:
        start = pos
        t, n = take(1)[0], U32.unpack(take(4))[0]
        assert t == tag
        assert n <= MAX_RECORD_SIZE
        body_at = pos
        body = take(n)
        assert U64.unpack(take(8))[0] == xxhash.xxh3_64_intdigest(body)
        obj = msgpack.unpackb(body, raw=False)
        assert isinstance(obj, dict) and all(isinstance(k, str) for k in obj)
        return start, (body_at, n), obj

    assert take(8) == MAGIC
    assert int.from_bytes(take(2), "big") == FORMAT_VERSION
    _, header_body, header = record(TAG_HEADER)
    entries = []
    while data[pos] == TAG_ENTRY:
        start, body, head = record(TAG_ENTRY)
        chunks = []
        while True:
            n = U32.unpack(take(4))[0]
            if n == 0:
                break
            assert 1 <= n <= MAX_CHUNK_SIZE
            check_at = pos
            check = U64.unpack(take(8))[0]
            payload_at = pos
            payload = take(n)
            assert check == xxhash.xxh3_64_intdigest(payload)
            chunks.append((check_at, payload_at, n))
        entries.append({"offset": start, "body": body, "head": head, "chunks": chunks})
    index_offset, index_body, index = record(TAG_INDEX)
    footer_at = pos
    assert take(1)[0] == TAG_FOOTER
    assert U64.unpack(take(8))[0] == index_offset
    assert take(16) == xxhash.xxh3_128_digest(data[:footer_at + 9])
    assert take(8) == END_MAGIC
    assert pos == len(data)
    return {"header": header, "header_body": header_body, "entries": entries,
            "index": index, "index_offset": index_offset, "index_body": index_body,
            "footer": footer_at}


def flip(data: bytes, pos: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


BLOBS = [(b"config json " * 5, CODEC_ZSTD), (bytes(range(256)) * 3, CODEC_STORED),
         (b"", CODEC_STORED), (random.Random(2).randbytes(300), CODEC_ZSTD)]


@pytest.fixture(scope="module")
def small() -> bytes:
    return write_bundle(BLOBS, chunk_size=64)


# ---------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("codec", [CODEC_STORED, CODEC_ZSTD])
def test_round_trip_single_codec(codec: int) -> None:
    blobs = [(b"alpha" * 100, codec), (b"beta", codec), (bytes(range(200)), codec)]
    raw = write_bundle(blobs)
    reader, got = read_bytes(raw)
    assert got == [(sha(d), d) for d, _ in blobs]
    assert reader.index is not None and reader.total_size == len(raw)
    assert [e.codec for e in reader.index.entries] == [codec] * 3
    assert reader.header.site == "gw-01"
    assert reader.version == FORMAT_VERSION


def test_writer_output_follows_the_spec_layout(small: bytes) -> None:
    layout = parse_layout(small)
    assert layout["header"]["required_features"] == []
    assert layout["header"]["volume"] is None
    assert layout["header"]["tool"] == "test"
    assert [e["head"]["digest"] for e in layout["entries"]] == [sha(d) for d, _ in BLOBS]
    for entry, rec, (data, codec) in zip(layout["entries"], layout["index"]["entries"], BLOBS):
        assert rec["offset"] == entry["offset"]
        assert rec["stored_size"] == sum(n for _, _, n in entry["chunks"])
        assert rec["size"] == len(data) == entry["head"]["size"]
        assert rec["codec"] == codec == entry["head"]["codec"]
        assert rec["kind"] == entry["head"]["kind"] == "blob"
        assert all(n <= 64 for _, _, n in entry["chunks"])
        stored = b"".join(small[p:p + n] for _, p, n in entry["chunks"])
        if codec == CODEC_STORED:
            assert stored == data
        else:
            assert zstandard.ZstdDecompressor().decompress(stored) == data
            assert entry["head"]["level"] == 3
    # footer is exactly FOOTER_SIZE bytes and the index offset points at the 'I' tag
    assert len(small) - layout["footer"] == FOOTER_SIZE
    assert small[layout["index_offset"]] == TAG_INDEX


def test_empty_entry_both_codecs() -> None:
    raw = write_bundle([(b"", CODEC_STORED)])
    reader, got = read_bytes(raw)
    assert got == [(sha(b""), b"")]
    assert reader.index.entries[0].stored_size == 0
    raw = write_bundle([(b"", CODEC_ZSTD)])
    assert read_bytes(raw)[1] == [(sha(b""), b"")]


def test_many_entries() -> None:
    blobs = [(f"blob number {i}".encode() * (i % 7 + 1), (CODEC_STORED, CODEC_ZSTD)[i % 2])
             for i in range(300)]
    raw = write_bundle(blobs, chunk_size=16)
    reader, got = read_bytes(raw)
    assert got == [(sha(d), d) for d, _ in blobs]
    assert len(reader.index.entries) == 300
    offsets = [e.offset for e in reader.index.entries]
    assert offsets == sorted(offsets) and len(set(offsets)) == 300


@pytest.mark.parametrize("codec", [CODEC_STORED, CODEC_ZSTD])
def test_entry_spanning_many_chunks(codec: int) -> None:
    data = random.Random(1).randbytes(10_000)
    raw = write_bundle([(data, codec)], chunk_size=1000, piece=333)
    layout = parse_layout(raw)
    chunks = layout["entries"][0]["chunks"]
    assert len(chunks) >= 10
    assert all(n == 1000 for _, _, n in chunks[:-1])
    assert read_bytes(raw)[1] == [(sha(data), data)]


def test_writer_info_matches_index() -> None:
    out = io.BytesIO()
    w = BundleWriter(out, header_of(HEADER), chunk_size=32)
    a = w.add_blob(sha(b"x" * 100), 100, [b"x" * 100], codec=CODEC_STORED)
    b = w.add_blob(sha(b"y" * 100), 100, [b"y" * 50, b"y" * 50], codec=CODEC_ZSTD)
    assert a.stored_size == 100 and a.offset == 10 + len(pack_record(TAG_HEADER, w.header.to_wire()))
    assert b.offset > a.offset and b.stored_size < 100
    assert w.entries == [a, b]
    w.finish([])
    reader, _ = read_bytes(out.getvalue())
    assert [(e.digest, e.offset, e.stored_size) for e in reader.index.entries] == \
        [(a.digest, a.offset, a.stored_size), (b.digest, b.offset, b.stored_size)]


def test_non_seekable_stream() -> None:
    raw = write_bundle(BLOBS, chunk_size=64)
    reader, got = read_all(Pipe(raw))
    assert got == [(sha(d), d) for d, _ in BLOBS]
    assert reader.total_size == len(raw)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_non_seekable_stream_with_short_reads(seed: int) -> None:
    raw = write_bundle(BLOBS, chunk_size=64)
    reader, got = read_all(Pipe(raw, short=True, seed=seed))
    assert got == [(sha(d), d) for d, _ in BLOBS]
    assert reader.total_size == len(raw)


def test_large_compressible_entry_is_read_in_bounded_pieces() -> None:
    size = 64 * 1024 * 1024
    block = (b"edgebundle " * 100_000)[:1024 * 1024]
    hasher = hashlib.sha256()
    for _ in range(64):
        hasher.update(block)
    digest = "sha256:" + hasher.hexdigest()
    out = io.BytesIO()
    w = BundleWriter(out, header_of(HEADER), level=1, chunk_size=1024 * 1024)
    info = w.add_blob(digest, size, (block for _ in range(64)), codec=CODEC_ZSTD)
    w.finish([])
    assert info.stored_size < size // 20
    reader = BundleReader(io.BytesIO(out.getvalue()))
    longest = total = 0
    check = hashlib.sha256()
    for entry in reader.entries():
        for piece in entry.chunks():
            longest = max(longest, len(piece))
            total += len(piece)
            check.update(piece)
    assert total == size
    assert "sha256:" + check.hexdigest() == digest
    assert 0 < longest <= 1024 * 1024


def test_skipping_entries_still_verifies_them(small: bytes) -> None:
    layout = parse_layout(small)
    _, payload_at, _ = layout["entries"][1]["chunks"][0]
    bad = flip(small, payload_at)
    reader = BundleReader(io.BytesIO(bad))
    with pytest.raises(BundleFormatError, match="chunk checksum mismatch"):
        for _ in reader.entries():
            pass  # never read: the reader skips (and verifies) each entry itself
    reader = BundleReader(io.BytesIO(small))
    count = sum(1 for _ in reader.entries())
    assert count == len(BLOBS) and reader.index is not None


def test_index_only_after_full_iteration(small: bytes) -> None:
    reader = BundleReader(io.BytesIO(small))
    assert reader.index is None and reader.total_size is None
    for entry in reader.entries():
        entry.skip()
    assert reader.index is not None and reader.total_size == len(small)


# ---------------------------------------------------------------------------
# Writer refusals


def test_writer_refuses_content_not_matching_digest() -> None:
    w = BundleWriter(io.BytesIO(), header_of(HEADER))
    with pytest.raises(ValueError, match="got content"):
        w.add_blob(sha(b"expected"), 8, [b"actual!!"], codec=CODEC_STORED)
    w = BundleWriter(io.BytesIO(), header_of(HEADER))
    with pytest.raises(ValueError, match="got content"):
        w.add_blob(sha(b"expected"), 8, [b"actual!!"], codec=CODEC_ZSTD)


def test_writer_refuses_wrong_size() -> None:
    w = BundleWriter(io.BytesIO(), header_of(HEADER))
    with pytest.raises(ValueError):
        w.add_blob(sha(b"data"), 5, [b"data"], codec=CODEC_STORED)


def test_writer_refuses_duplicate_digest() -> None:
    w = BundleWriter(io.BytesIO(), header_of(HEADER))
    w.add_blob(sha(b"once"), 4, [b"once"], codec=CODEC_STORED)
    with pytest.raises(ValueError, match="twice"):
        w.add_blob(sha(b"once"), 4, [b"once"], codec=CODEC_ZSTD)
    assert len(w.entries) == 1


@pytest.mark.parametrize("digest", ["sha512:" + "0" * 128, "sha256:" + "A" * 64, "sha256:abc", ""])
def test_writer_refuses_bad_digest(digest: str) -> None:
    w = BundleWriter(io.BytesIO(), header_of(HEADER))
    with pytest.raises(ValueError):
        w.add_blob(digest, 0, [], codec=CODEC_STORED)


def test_writer_refuses_unknown_codec_and_bad_chunk_size() -> None:
    w = BundleWriter(io.BytesIO(), header_of(HEADER))
    with pytest.raises(ValueError, match="codec"):
        w.add_blob(sha(b""), 0, [], codec=2)
    with pytest.raises(ValueError):
        BundleWriter(io.BytesIO(), header_of(HEADER), chunk_size=0)
    with pytest.raises(ValueError):
        BundleWriter(io.BytesIO(), header_of(HEADER), chunk_size=MAX_CHUNK_SIZE + 1)


def test_writer_finish_twice_refused() -> None:
    w = BundleWriter(io.BytesIO(), header_of(HEADER))
    w.finish([])
    with pytest.raises(ValueError):
        w.finish([])


# ---------------------------------------------------------------------------
# Magic, version, header


def test_bad_magic() -> None:
    raw = write_bundle([(b"x", CODEC_STORED)])
    err = expect_error(b"GIF89a\x00\x00" + raw[8:], "not an edgebundle bundle", "bad magic")
    assert err.exit_code == 5


def test_empty_input() -> None:
    expect_error(b"", "truncated")


def test_future_version_says_upgrade() -> None:
    raw = craft([], version=2)
    expect_error(raw, "version 2", "upgrade")


def test_version_zero_refused() -> None:
    expect_error(craft([], version=0), "version 0")


def test_unknown_required_feature_refused_before_any_entry() -> None:
    data = b"would-be entry"
    raw = craft([(entry_head(data), [data])],
                header=dict(HEADER, required_features=["signature-v9", "delta-v9"]))
    pipe = Pipe(raw)
    with pytest.raises(BundleFormatError) as info:
        BundleReader(pipe, "future.ebundle")
    text = str(info.value)
    assert "signature-v9" in text and "delta-v9" in text and "upgrade" in text
    # Nothing past the header record was read.
    rec_len = U32.unpack(raw[11:15])[0]
    header_end = 10 + 5 + rec_len + 8
    assert raw[header_end] == TAG_ENTRY
    assert pipe.max_pos == header_end


def test_required_features_not_a_list() -> None:
    raw = craft([], header=dict(HEADER, required_features="signature-v1"))
    expect_error(raw, "required_features")


def test_required_features_with_unhashable_items() -> None:
    raw = craft([], header=dict(HEADER, required_features=[["nested"], {"a": 1}]))
    expect_error(raw, "required_features")
    expect_error(craft([], header=dict(HEADER, required_features=[7])), "required_features")


def test_header_not_a_map() -> None:
    body = msgpack.packb(["not", "a", "map"])
    rec = bytes([TAG_HEADER]) + U32.pack(len(body)) + body + U64.pack(xxhash.xxh3_64_intdigest(body))
    expect_error(MAGIC + b"\x00\x01" + rec, "not a map")


def test_header_invalid_msgpack() -> None:
    body = b"\xc1\xc1\xc1"  # 0xc1 is never used in msgpack
    rec = bytes([TAG_HEADER]) + U32.pack(len(body)) + body + U64.pack(xxhash.xxh3_64_intdigest(body))
    expect_error(MAGIC + b"\x00\x01" + rec, "msgpack")


def test_header_wrong_tag() -> None:
    raw = bytearray(craft([]))
    raw[10] = TAG_INDEX
    expect_error(bytes(raw), "expected header", "0x49")


def test_record_length_over_limit() -> None:
    raw = MAGIC + b"\x00\x01" + bytes([TAG_HEADER]) + U32.pack(MAX_RECORD_SIZE + 1)
    expect_error(raw, "limit")


def test_chunk_length_over_limit_refused_without_reading_it() -> None:
    data = b"abc"
    good = craft([(entry_head(data), [data])])
    layout = parse_layout(good)
    check_at, payload_at, n = layout["entries"][0]["chunks"][0]
    bad = good[:check_at - 4] + U32.pack(MAX_CHUNK_SIZE + 1) + good[check_at:]
    expect_error(bad, "exceeds", sha(data))


# ---------------------------------------------------------------------------
# Bit flips in every region


def region_offsets(raw: bytes) -> Dict[str, int]:
    lay = parse_layout(raw)
    entry = lay["entries"][3]  # the zstd layer entry, several chunks
    check_at, payload_at, _ = entry["chunks"][1]
    stored_entry = lay["entries"][1]
    s_check_at, s_payload_at, _ = stored_entry["chunks"][1]
    return {
        "header": lay["header_body"][0] + 3,
        "entry record": entry["body"][0] + 2,
        "zstd chunk payload": payload_at + 5,
        "zstd chunk checksum": check_at + 1,
        "stored chunk payload": s_payload_at + 5,
        "stored chunk checksum": s_check_at + 7,
        "index": lay["index_body"][0] + 4,
        "footer digest": lay["footer"] + 9 + 3,
        "footer offset": lay["footer"] + 8,
        "end magic": len(raw) - 2,
    }


EXPECT = {
    "header": "header checksum mismatch",
    "entry record": "entry header checksum mismatch",
    "zstd chunk payload": "chunk checksum mismatch",
    "zstd chunk checksum": "chunk checksum mismatch",
    "stored chunk payload": "chunk checksum mismatch",
    "stored chunk checksum": "chunk checksum mismatch",
    "index": "index checksum mismatch",
    "footer digest": "whole-bundle checksum mismatch",
    "footer offset": "wrong index",
    "end magic": "malformed footer",
}


@pytest.mark.parametrize("region", sorted(EXPECT))
@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_flipped_bit_in_region(small: bytes, region: str, mask: int) -> None:
    pos = region_offsets(small)[region]
    err = expect_error(flip(small, pos, mask), EXPECT[region])
    if "chunk" in region:
        digest = sha(BLOBS[3][0] if "zstd" in region else BLOBS[1][0])
        assert digest in str(err)
        assert "byte" in str(err)


def test_flipped_bit_anywhere_is_detected(small: bytes) -> None:
    for pos in range(len(small)):
        for mask in (0x01, 0x10, 0x80):
            with pytest.raises(BundleFormatError):
                read_bytes(flip(small, pos, mask))


def test_flip_in_header_is_found_before_entries(small: bytes) -> None:
    pos = region_offsets(small)["header"]
    pipe = Pipe(flip(small, pos))
    with pytest.raises(BundleFormatError, match="header checksum"):
        BundleReader(pipe)
    assert pipe.max_pos <= parse_layout(small)["entries"][0]["offset"]


# ---------------------------------------------------------------------------
# Truncation and trailing bytes


def test_truncation_at_every_byte(small: bytes) -> None:
    for cut in range(len(small)):
        err = expect_error(small[:cut])
        assert "truncated" in str(err), (cut, str(err))


def test_truncation_at_record_boundaries_names_the_offset(small: bytes) -> None:
    lay = parse_layout(small)
    cuts = [10, lay["entries"][0]["offset"], lay["index_offset"], lay["footer"]]
    cuts += [e["offset"] for e in lay["entries"]]
    cuts += [p for e in lay["entries"] for _, p, _ in e["chunks"]]  # mid-chunk-frame
    cuts += [p + 1 for e in lay["entries"] for _, p, n in e["chunks"] if n > 1]  # mid-payload
    for cut in cuts:
        err = expect_error(small[:cut], "truncated")
        if cut < lay["footer"]:
            assert f"byte {cut}" in str(err), (cut, str(err))


def test_truncated_bundle_yields_no_index(small: bytes) -> None:
    reader = BundleReader(io.BytesIO(small[:-1]))
    with pytest.raises(BundleFormatError):
        for entry in reader.entries():
            entry.skip()
    assert reader.index is None


@pytest.mark.parametrize("extra", [b"\x00", b"garbage after the footer", END_MAGIC])
def test_trailing_garbage(small: bytes, extra: bytes) -> None:
    expect_error(small + extra, "after its footer")


def test_concatenated_bundles_refused(small: bytes) -> None:
    expect_error(small + small, "after its footer")


# ---------------------------------------------------------------------------
# The index must agree with the entries


def tamper_index(raw: bytes, change: Callable[[Dict[str, Any]], None]) -> bytes:
    """Re-encode the index record (valid checksums, valid footer) after ``change``."""
    lay = parse_layout(raw)
    index = dict(lay["index"])
    change(index)
    body = raw[:lay["index_offset"]] + pack_record(TAG_INDEX, index)
    body += bytes([TAG_FOOTER]) + U64.pack(lay["index_offset"])
    return refooter(body)


def test_tamper_index_is_valid_when_unchanged(small: bytes) -> None:
    assert tamper_index(small, lambda ix: None) == small


@pytest.mark.parametrize("change, fragment", [
    (lambda ix: ix["entries"].pop(), "index lists 3 entries, the stream carried 4"),
    (lambda ix: ix["entries"].append(dict(ix["entries"][0])), "index lists 5 entries"),
    (lambda ix: ix["entries"].reverse(), "disagrees"),
    (lambda ix: ix["entries"][1].update(stored_size=ix["entries"][1]["stored_size"] + 1),
     "disagrees"),
    (lambda ix: ix["entries"][2].update(offset=ix["entries"][2]["offset"] + 1), "disagrees"),
    (lambda ix: ix["entries"][0].update(size=1), "disagrees"),
    (lambda ix: ix["entries"][3].update(digest=sha(b"other")), "disagrees"),
    (lambda ix: ix["entries"].__setitem__(0, "not a map"), "index entries[0] is a string, not a map"),
    (lambda ix: ix["entries"][0].update(kind="other"), "disagrees"),
    (lambda ix: ix["entries"][0].update(codec=1 - ix["entries"][0]["codec"]), "disagrees"),
    (lambda ix: ix.pop("entries"), "entries"),
    (lambda ix: ix.update(entries={}), "entries"),
    (lambda ix: ix.pop("images"), "images"),
])
def test_index_disagreeing_with_entries(small: bytes, change: Callable[[Dict[str, Any]], None],
                                        fragment: str) -> None:
    def apply(ix: Dict[str, Any]) -> None:
        ix["entries"] = [dict(e) for e in ix["entries"]]
        change(ix)

    expect_error(tamper_index(small, apply), fragment)


def test_footer_pointing_at_wrong_index(small: bytes) -> None:
    lay = parse_layout(small)
    body = small[:lay["footer"]] + bytes([TAG_FOOTER]) + U64.pack(lay["index_offset"] - 1)
    expect_error(refooter(body), "wrong index")


def test_crafted_bundle_reads_back() -> None:
    """Sanity check of the crafter used by the tests below."""
    data = b"hello world"
    raw = craft([(entry_head(data), [data[:4], data[4:]])])
    assert read_bytes(raw)[1] == [(sha(data), data)]


def test_duplicate_entry_digest_refused_by_reader() -> None:
    """FORMAT.md invariant 1, which readers check: an entry digest appears at most once."""
    data = b"twice"
    raw = craft([(entry_head(data), [data]), (entry_head(data), [data])])
    reader = BundleReader(io.BytesIO(raw))
    it = reader.entries()
    assert b"".join(next(it).chunks()) == data
    with pytest.raises(BundleFormatError) as info:
        next(it)
    assert sha(data) in str(info.value)
    assert f"byte {parse_layout(raw)['entries'][1]['offset']}" in str(info.value)
    assert reader.index is None


# ---------------------------------------------------------------------------
# Entry contents


def test_stored_entry_content_not_matching_digest() -> None:
    data = b"the real content"
    head = entry_head(data, digest=sha(b"something else"))
    err = expect_error(craft([(head, [data])]), "corrupt", sha(b"something else"))
    assert sha(data) in str(err)


def test_stored_entry_shorter_than_size() -> None:
    data = b"short"
    expect_error(craft([(entry_head(data, size=6), [data])]), "5 of 6 bytes")


def test_stored_entry_longer_than_size() -> None:
    data = b"longer"
    expect_error(craft([(entry_head(data, size=3), [data])]), "more than its 3 bytes")


def test_zstd_entry_decoding_to_more_than_its_size() -> None:
    """A 'bomb': tiny stored bytes, announced size 10, decodes to 8 MiB."""
    real = bytes(8 * 1024 * 1024)
    frame = zstandard.ZstdCompressor(level=1).compress(real)
    assert len(frame) < 2000
    head = entry_head(real[:10], codec=CODEC_ZSTD)
    reader = BundleReader(io.BytesIO(craft([(head, [frame[:100], frame[100:]])])))
    seen = 0
    with pytest.raises(BundleFormatError, match="decodes to more than its 10 bytes"):
        for entry in reader.entries():
            for piece in entry.chunks():
                seen += len(piece)
    assert seen <= 10


def test_zstd_entry_with_wrong_digest() -> None:
    data = b"zstd payload " * 10
    frame = zstandard.ZstdCompressor().compress(data)
    head = entry_head(data, codec=CODEC_ZSTD, digest=sha(b"nope"))
    expect_error(craft([(head, [frame])]), "corrupt")


def test_zstd_entry_that_is_not_zstd() -> None:
    data = b"plain bytes, not a frame"
    expect_error(craft([(entry_head(data, codec=CODEC_ZSTD), [data])]), sha(data))


def test_zstd_entry_truncated_frame() -> None:
    data = bytes(range(256)) * 8
    frame = zstandard.ZstdCompressor().compress(data)
    expect_error(craft([(entry_head(data, codec=CODEC_ZSTD), [frame[:-3]])]))


def test_zstd_entry_with_data_after_frame_in_next_chunk() -> None:
    data = b"payload" * 20
    frame = zstandard.ZstdCompressor().compress(data)
    expect_error(craft([(entry_head(data, codec=CODEC_ZSTD), [frame, b"junk"])]), sha(data))


def test_zstd_entry_with_data_after_frame_in_same_chunk() -> None:
    data = b"payload" * 20
    frame = zstandard.ZstdCompressor().compress(data)
    expect_error(craft([(entry_head(data, codec=CODEC_ZSTD), [frame + b"junk"])]), sha(data))


def test_zstd_entry_with_second_frame() -> None:
    data = b"payload" * 20
    frame = zstandard.ZstdCompressor().compress(data)
    expect_error(craft([(entry_head(data, codec=CODEC_ZSTD), [frame + frame])]), sha(data))


SKIPPABLE = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"extra"


@pytest.mark.parametrize("chunks", [
    pytest.param(lambda f: [f + SKIPPABLE], id="skippable-after"),
    pytest.param(lambda f: [f, SKIPPABLE], id="skippable-next-chunk"),
    pytest.param(lambda f: [SKIPPABLE + f], id="skippable-before"),
    pytest.param(lambda f: [f + zstandard.ZstdCompressor().compress(b"")], id="empty-frame-after"),
])
def test_zstd_entry_must_be_exactly_one_frame(chunks: Callable[[bytes], List[bytes]]) -> None:
    """FORMAT.md: the stored bytes of a CODEC_ZSTD entry are a single zstd frame."""
    data = b"payload" * 20
    frame = zstandard.ZstdCompressor().compress(data)
    expect_error(craft([(entry_head(data, codec=CODEC_ZSTD), chunks(frame))]), sha(data))


def _frame_with_window(window_log: int, data: bytes) -> bytes:
    # Streaming compression with no size known keeps the window the parameters ask for.
    params = zstandard.ZstdCompressionParameters(window_log=window_log, write_content_size=0)
    cobj = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = cobj.compress(data) + cobj.flush()
    assert zstandard.get_frame_parameters(frame).window_size == 1 << window_log
    return frame


def test_zstd_frame_needing_too_large_a_window() -> None:
    data = b"small data, big window " * 50
    frame = _frame_with_window(MAX_WINDOW_LOG + 2, data)
    expect_error(craft([(entry_head(data, codec=CODEC_ZSTD), [frame])]), "does not decompress",
                 sha(data))


def test_zstd_frame_at_max_window_is_accepted() -> None:
    data = b"small data, max window " * 50
    frame = _frame_with_window(MAX_WINDOW_LOG, data)
    raw = craft([(entry_head(data, codec=CODEC_ZSTD), [frame])])
    assert read_bytes(raw)[1] == [(sha(data), data)]


def test_writer_caps_window() -> None:
    data = random.Random(5).randbytes(200_000) * 60  # 12 MB: more than the default window
    raw = write_bundle([(data, CODEC_ZSTD)], chunk_size=1024 * 1024, level=1, piece=1 << 20)
    lay = parse_layout(raw)
    _, payload_at, n = lay["entries"][0]["chunks"][0]
    params = zstandard.get_frame_parameters(raw[payload_at:payload_at + n])
    assert params.window_size <= 1 << 23
    assert params.content_size == len(data)


@pytest.mark.parametrize("over, fragment", [
    ({"kind": "xdelta"}, "field 'kind' is 'xdelta', an entry kind this edgebundle does not know"),
    ({"codec": 2}, "field 'codec' is 2, not one of 0, 1"),
    ({"codec": True}, "codec"),
    ({"size": -1}, "field 'size' is -1, below the minimum 0"),
    ({"level": "9"}, "field 'level' is a string, not an integer"),
    ({"media_type": 5}, "field 'media_type' is an integer, not a string"),
    ({"size": "5"}, "size"),
    ({"digest": "sha512:" + "ab" * 64}, "sha256"),
    ({"digest": None}, "digest"),
])
def test_bad_entry_record_fields(over: Dict[str, Any], fragment: str) -> None:
    data = b"abcde"
    expect_error(craft([(entry_head(data, **over), [data])]), fragment)


def test_unknown_tag_between_entries() -> None:
    data = b"abc"
    good = craft([(entry_head(data), [data])])
    lay = parse_layout(good)
    body = bytearray(good[:lay["footer"] + 9])
    body[lay["index_offset"]] = ord("Z")
    expect_error(refooter(bytes(body)), "unexpected tag 0x5a", f"byte {lay['index_offset']}")


def test_unknown_header_keys_are_ignored() -> None:
    data = b"abc"
    raw = craft([(entry_head(data, future_key={"x": 1}), [data])],
                header=dict(HEADER, new_header_key=[1, 2, 3]),
                fix_index=lambda ix: ix.update(new_index_key="yes"))
    reader, got = read_bytes(raw)
    assert got == [(sha(data), data)]
    assert reader.header.site == "gw-01"  # read as usual, the unknown key ignored


# ---------------------------------------------------------------------------
# Random access


def test_read_index_returns_header_and_index(tmp_path: Any, small: bytes) -> None:
    path = tmp_path / "b.ebundle"
    path.write_bytes(small)
    info = read_index(path)
    full, _ = read_bytes(small)
    assert info.header == full.header
    assert info.index == full.index
    assert info.version == FORMAT_VERSION
    assert info.size == len(small)
    assert read_index(str(path)).index == full.index
    assert info.to_json()["index"] == parse_layout(small)["index"]


def test_read_index_does_not_read_entries(tmp_path: Any, small: bytes) -> None:
    lay = parse_layout(small)
    _, payload_at, _ = lay["entries"][1]["chunks"][0]
    path = tmp_path / "b.ebundle"
    path.write_bytes(flip(small, payload_at))
    assert read_index(path).index.to_wire() == lay["index"]


def test_read_index_refuses_damage(tmp_path: Any, small: bytes) -> None:
    lay = parse_layout(small)
    path = tmp_path / "b.ebundle"
    for bad in (flip(small, lay["index_body"][0] + 1), small[:-5], small[:lay["footer"]],
                flip(small, 0), flip(small, lay["header_body"][0])):
        path.write_bytes(bad)
        with pytest.raises(BundleFormatError):
            read_index(path)
    body = small[:lay["footer"]] + bytes([TAG_FOOTER]) + U64.pack(len(small) + 100)
    path.write_bytes(refooter(body))
    with pytest.raises(BundleFormatError, match="past the end"):
        read_index(path)


# ---------------------------------------------------------------------------
# Byte-identical on any machine


def _big_compressible() -> bytes:
    rng = random.Random(1)
    words = [bytes(rng.choice(b"abcdefghij") for _ in range(rng.randint(3, 9))) for _ in range(3000)]
    return b" ".join(rng.choice(words) for _ in range(2_600_000))  # ~18 MB: several zstd jobs


@pytest.fixture(scope="module")
def big() -> bytes:
    return _big_compressible()


def _entry_frame(raw: bytes) -> bytes:
    lay = parse_layout(raw)
    (entry,) = lay["entries"]
    return b"".join(raw[p:p + n] for _, p, n in entry["chunks"])


def test_writer_output_is_the_same_for_any_thread_count(big: bytes) -> None:
    outs = {t: write_bundle([(big, CODEC_ZSTD)], chunk_size=1 << 20, level=1, piece=1 << 20,
                            threads=t) for t in (0, 1, 3)}
    assert outs[0] == outs[1] == outs[3]


def test_writer_uses_zstd_multithreaded_mode(big: bytes) -> None:
    """FORMAT.md: multi-threaded mode (its output does not depend on the worker count;
    single-threaded mode writes other bytes, so a writer on one CPU must not use it)."""
    def streamed(threads: int) -> bytes:
        params = zstandard.ZstdCompressionParameters.from_level(
            1, window_log=DEFAULT_WINDOW_LOG, threads=threads, write_checksum=0, write_content_size=1)
        chunker = zstandard.ZstdCompressor(compression_params=params).chunker(size=len(big))
        out = [c for i in range(0, len(big), 65536) for c in chunker.compress(big[i:i + 65536])]
        return b"".join(out + list(chunker.finish()))

    reference = streamed(2)
    assert streamed(0) != reference  # the input is big enough to tell the modes apart
    frame = _entry_frame(write_bundle([(big, CODEC_ZSTD)], chunk_size=1 << 20, level=1,
                                      piece=1 << 20, threads=1))
    assert frame == reference
