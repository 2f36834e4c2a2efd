"""Property tests of the bundle format: round trips, and garbage in -> BundleFormatError only."""

from __future__ import annotations

import hashlib
import io
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgebundle.errors import BundleFormatError
from edgebundle.format import (
    CODEC_STORED,
    CODEC_ZSTD,
    END_MAGIC,
    FORMAT_VERSION,
    MAGIC,
    TAG_ENTRY,
    TAG_FOOTER,
    TAG_HEADER,
    TAG_INDEX,
    BundleReader,
    BundleWriter,
)
from edgebundle.format.framing import CHUNK_HEAD, U32, U64, pack_record
from edgebundle.format.records import Header, parse_header


def header_of(fields: Dict[str, Any]) -> Header:
    """A typed header from wire fields (the writer fills nothing in any more)."""
    wire = {"created": "2026-01-01T00:00:00Z", "tool": "test", "required_features": [],
            "volume": None, "content_bytes": 0}
    wire.update(fields)
    return parse_header(wire, "test")

# Fixed examples (derandomize) and no example database: the same cases on every run.
BASE_SETTINGS = settings(derandomize=True, database=None, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])


def prop(examples: int) -> settings:
    return settings(BASE_SETTINGS, max_examples=examples)

HEADER = {"site": "gw-01", "runtime": "docker", "namespace": None, "platform": "linux/amd64",
          "layer_form": "tar", "prerequisites": [], "images": [], "content_bytes": 0}


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write(blobs: Sequence[Tuple[bytes, int]], chunk_size: int, piece: int, level: int = 1) -> bytes:
    out = io.BytesIO()
    w = BundleWriter(out, header_of(HEADER), level=level, chunk_size=chunk_size)
    for data, codec in blobs:
        w.add_blob(sha(data), len(data), (data[i:i + piece] for i in range(0, len(data), piece)),
                   codec=codec)
    w.finish([])
    return out.getvalue()


def read(data: bytes) -> Tuple[Any, List[Tuple[str, bytes]], Any]:
    reader = BundleReader(io.BytesIO(data), "prop.ebundle")
    got = [(e.digest, b"".join(e.chunks())) for e in reader.entries()]
    assert reader.index is not None
    return reader.header, got, reader.index


def read_expecting_only_format_errors(data: bytes) -> bool:
    """True if the bundle read fine, False on BundleFormatError; anything else fails."""
    try:
        read(data)
    except BundleFormatError as exc:
        assert str(exc)  # always says something
        return False
    return True


# ---------------------------------------------------------------------------
# Round trips

blob = st.one_of(
    st.binary(max_size=3000),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=20), st.integers(1, 400)),
)
blobs_st = st.lists(st.tuples(blob, st.sampled_from([CODEC_STORED, CODEC_ZSTD])),
                    max_size=8, unique_by=lambda t: t[0])


@prop(150)
@given(blobs=blobs_st, chunk_size=st.integers(1, 2048), piece=st.integers(1, 700))
def test_round_trip(blobs: List[Tuple[bytes, int]], chunk_size: int, piece: int) -> None:
    raw = write(blobs, chunk_size, piece)
    header, got, index = read(raw)
    assert got == [(sha(d), d) for d, _ in blobs]
    assert header.runtime == "docker"
    assert [(e.digest, e.size, e.codec) for e in index.entries] == \
        [(sha(d), len(d), c) for d, c in blobs]
    for e, (d, c) in zip(index.entries, blobs):
        if c == CODEC_STORED:
            assert e.stored_size == len(d)
    assert index.images == ()


# ---------------------------------------------------------------------------
# Mutations of one valid bundle

BASE_BLOBS = [(b'{"config": true}' * 3, CODEC_ZSTD), (bytes(range(256)), CODEC_STORED),
              (b"", CODEC_STORED), (b"tar " * 60, CODEC_ZSTD)]
BASE = write(BASE_BLOBS, chunk_size=40, piece=13)
BASE_CONTENT = [(sha(d), d) for d, _ in BASE_BLOBS]


def test_base_bundle_is_valid() -> None:
    assert read(BASE)[1] == BASE_CONTENT


position = st.integers(0, len(BASE) + 4)
mutation = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(1, 255)),
    st.tuples(st.just("truncate"), position, st.just(0)),
    st.tuples(st.just("insert"), position, st.binary(max_size=16)),
    st.tuples(st.just("delete"), position, st.integers(0, 64)),
    st.tuples(st.just("overwrite"), position, st.binary(max_size=16)),
)


def apply(data: bytes, ops: Sequence[Tuple[str, int, Any]]) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        pos = min(pos, len(b))
        if op == "flip":
            if pos < len(b):
                b[pos] ^= arg
        elif op == "truncate":
            del b[pos:]
        elif op == "insert":
            b[pos:pos] = arg
        elif op == "delete":
            del b[pos:pos + arg]
        else:
            b[pos:pos + len(arg)] = arg
    return bytes(b)


@prop(600)
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_bundle_raises_only_format_errors(ops: List[Tuple[str, int, Any]]) -> None:
    data = apply(BASE, ops)
    ok = read_expecting_only_format_errors(data)
    if ok:
        assert data == BASE, "a changed bundle was accepted"
        assert read(data)[1] == BASE_CONTENT
    else:
        assert data != BASE


@prop(300)
@given(tail=st.binary(max_size=2000))
def test_random_bytes_after_magic_and_version(tail: bytes) -> None:
    data = MAGIC + FORMAT_VERSION.to_bytes(2, "big") + tail
    with pytest.raises(BundleFormatError):
        read(data)


@prop(300)
@given(tail=st.binary(max_size=2000), tag=st.sampled_from([TAG_HEADER, TAG_ENTRY, TAG_INDEX]))
def test_random_record_bodies_with_valid_framing(tail: bytes, tag: int) -> None:
    """Framing and checksum right, body random: the msgpack layer must fail cleanly."""
    rec = bytes([tag]) + U32.pack(len(tail)) + tail + U64.pack(xxhash.xxh3_64_intdigest(tail))
    data = MAGIC + FORMAT_VERSION.to_bytes(2, "big") + rec
    with pytest.raises(BundleFormatError):
        read(data)


# ---------------------------------------------------------------------------
# Hostile but well-framed records (right checksums, wrong contents)

scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1),
                   st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=20))
value = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
hashable = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=12),
                     st.binary(max_size=12))

WIRE = header_of(HEADER).to_wire()
ENTRY_KEYS = ["kind", "digest", "size", "codec", "level", "media_type"]
INDEX_KEYS = ["entries", "images"]


def framed(entries: Sequence[Tuple[Dict[str, Any], Sequence[bytes]]],
           index: Optional[Dict[str, Any]], header: Dict[str, Any],
           images: Sequence[Any] = ()) -> bytes:
    """A well-framed bundle; ``index=None`` lists the entries correctly."""
    out = bytearray(MAGIC + FORMAT_VERSION.to_bytes(2, "big"))
    out += pack_record(TAG_HEADER, header)
    listed = []
    for head, chunks in entries:
        listed.append({"digest": head.get("digest"), "kind": head.get("kind"),
                       "size": head.get("size"), "codec": head.get("codec"),
                       "stored_size": sum(len(c) for c in chunks), "offset": len(out)})
        out += pack_record(TAG_ENTRY, head)
        for c in chunks:
            out += CHUNK_HEAD.pack(len(c), xxhash.xxh3_64_intdigest(c)) + c
        out += U32.pack(0)
    if index is None:
        index = {"entries": listed, "images": list(images)}
    index_offset = len(out)
    out += pack_record(TAG_INDEX, index)
    out += bytes([TAG_FOOTER]) + U64.pack(index_offset)
    out += xxhash.xxh3_128_digest(bytes(out)) + END_MAGIC
    return bytes(out)


def hostile_map(keys: List[str]) -> st.SearchStrategy[Dict[str, Any]]:
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=6)), value,
                           max_size=len(keys) + 2)


entry_head = st.one_of(
    hostile_map(ENTRY_KEYS),
    # mostly valid heads with one field replaced, to get past the first checks
    st.builds(lambda data, k, v: ({"kind": "blob", "digest": sha(data), "size": len(data),
                                   "codec": 0, k: v}, data),
              st.binary(max_size=30), st.sampled_from(ENTRY_KEYS), value).map(lambda t: t[0]),
)


@prop(400)
@given(heads=st.lists(st.tuples(entry_head, st.lists(st.binary(min_size=1, max_size=40),
                                                     max_size=3)), max_size=3),
       index=hostile_map(INDEX_KEYS),
       features=st.lists(hashable, max_size=3))
def test_hostile_entries_and_index_raise_only_format_errors(
        heads: List[Tuple[Dict[str, Any], List[bytes]]], index: Dict[str, Any],
        features: List[Any]) -> None:
    header = dict(HEADER, required_features=features)
    read_expecting_only_format_errors(framed(heads, index, header))


@prop(300)
@given(entries=st.lists(st.dictionaries(
    st.sampled_from(["digest", "kind", "size", "codec", "stored_size", "offset"]), value),
    min_size=1, max_size=2), images=value)
def test_hostile_index_for_valid_entries(entries: List[Dict[str, Any]], images: Any) -> None:
    data = b"entry"
    raw = framed([({"kind": "blob", "digest": sha(data), "size": 5, "codec": 0}, [data])],
                 {"entries": entries, "images": images}, WIRE)
    ok = read_expecting_only_format_errors(raw)
    if ok:
        assert isinstance(images, list)
        assert len(entries) == 1 and entries[0].get("digest") == sha(data)


@prop(300)
@given(header=st.fixed_dictionaries({"required_features": st.lists(value, max_size=4)},
                                    optional={k: value for k in WIRE if k != "required_features"}))
def test_hostile_header_raises_only_format_errors(header: Dict[str, Any]) -> None:
    read_expecting_only_format_errors(framed([], {"entries": [], "images": []}, header))


@prop(300)
@given(key=st.sampled_from(sorted(WIRE)), new=value)
def test_one_hostile_header_field_raises_only_format_errors(key: str, new: Any) -> None:
    """A valid header with one field replaced: past the first checks, into each field's."""
    read_expecting_only_format_errors(framed([], {"entries": [], "images": []},
                                             dict(WIRE, **{key: new})))


JSON = b"{}"
DIGEST = sha(JSON)
RECORD = {"name": "example.test/app:v1", "ref": "example.test/app:v1", "platform": "linux/amd64",
          "top": {"mediaType": "m", "digest": DIGEST, "size": 1},
          "manifest": {"mediaType": "m", "digest": DIGEST, "size": 1},
          "config": {"mediaType": "c", "digest": DIGEST, "size": 1},
          "layers": [{"mediaType": "l", "digest": DIGEST, "size": 1, "diff_id": DIGEST,
                      "tar_size": 1, "form": "tar"}]}
RECORD_HEADER = dict(WIRE, images=[{"name": RECORD["name"], "top": DIGEST, "config": DIGEST}])
JSON_ENTRY = ({"kind": "blob", "digest": DIGEST, "size": len(JSON), "codec": 0}, [JSON])


def test_base_image_record_is_valid() -> None:
    header, _, index = read(framed([JSON_ENTRY], None, RECORD_HEADER, [RECORD]))
    assert index.images[0].name == RECORD["name"] and index.images[0].layers[0].form == "tar"


def _replace(obj: Any, path: List[Any], new: Any) -> Any:
    if not path:
        return new
    out = dict(obj) if isinstance(obj, dict) else list(obj)
    out[path[0]] = _replace(obj[path[0]], path[1:], new)
    return out


RECORD_PATHS = [[k] for k in RECORD] + [[k, f] for k in ("top", "manifest", "config")
                                         for f in ("mediaType", "digest", "size")] + \
    [["layers", 0, f] for f in RECORD["layers"][0]]


@prop(400)
@given(path=st.sampled_from(RECORD_PATHS), new=value)
def test_hostile_image_record_raises_only_format_errors(path: List[Any], new: Any) -> None:
    """An image record that agrees with the header except in one field."""
    record = _replace(RECORD, path, new)
    read_expecting_only_format_errors(framed([JSON_ENTRY], None, RECORD_HEADER, [record]))


# ---------------------------------------------------------------------------
# zstd entries: any one valid frame is accepted, damaged frames fail cleanly


def split(data: bytes, n: int) -> List[bytes]:
    return [data[i:i + n] for i in range(0, len(data), n)]


frame_params = st.fixed_dictionaries({
    "level": st.integers(-5, 19),
    "window_log": st.integers(10, 25),
    "write_checksum": st.integers(0, 1),
    "write_content_size": st.integers(0, 1),
    "streaming": st.booleans(),
})


def compress(data: bytes, p: Dict[str, Any]) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        p["level"], window_log=p["window_log"], write_checksum=p["write_checksum"],
        write_content_size=p["write_content_size"])
    cctx = zstandard.ZstdCompressor(compression_params=params)
    if p["streaming"]:
        cobj = cctx.compressobj()
        return cobj.compress(data) + cobj.flush()
    return cctx.compress(data)


zdata = st.one_of(
    st.binary(max_size=5000),  # mostly raw blocks
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=3), st.integers(1, 300_000)),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=200), st.integers(1, 2000)),
)


@prop(200)
@given(data=zdata, params=frame_params, piece=st.integers(1, 5000))
def test_any_single_valid_zstd_frame_is_accepted(data: bytes, params: Dict[str, Any],
                                                 piece: int) -> None:
    frame = compress(data, params)
    head = {"kind": "blob", "digest": sha(data), "size": len(data), "codec": CODEC_ZSTD}
    _, got, _ = read(framed([(head, split(frame, piece))], None, WIRE))
    assert got == [(sha(data), data)]


@prop(400)
@given(data=zdata, params=frame_params, piece=st.integers(1, 400),
       ops=st.lists(mutation, min_size=1, max_size=3))
def test_damaged_zstd_frame_with_valid_chunk_checksums(data: bytes, params: Dict[str, Any],
                                                       piece: int,
                                                       ops: List[Tuple[str, int, Any]]) -> None:
    """Chunk xxh3 is recomputed, so only the frame walker, zstd and sha256 stand guard."""
    frame = compress(data, params)
    bad = apply(frame, [(op, pos % (len(frame) + 1), arg) for op, pos, arg in ops])
    head = {"kind": "blob", "digest": sha(data), "size": len(data), "codec": CODEC_ZSTD}
    raw = framed([(head, split(bad, piece))], None, WIRE)
    if read_expecting_only_format_errors(raw):
        assert read(raw)[1] == [(sha(data), data)]
