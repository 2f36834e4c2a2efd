"""Records decode in bounded memory (FORMAT.md, "Resource bounds").

edgebundle 0.2.0 accepted a 64 MiB header of empty maps at 4.7 GB of RSS: the byte limit
alone does not bound what msgpack builds. These tests hold the object budget, the list
and string limits and the per-kind record sizes to the code, and measure the peak RSS of
a real ``edgebundle verify`` on the worst 8 MiB header.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import msgpack
import pytest

import edgebundle.format as fmt
import edgebundle.format.reader as reader_mod
from edgebundle.errors import BundleFormatError
from edgebundle.format import BundleReader, BundleWriter
from edgebundle.format.delta import read_ops
from edgebundle.format.framing import unpack_body
from edgebundle.format.records import Header, ImageSummary, parse_entry_head, parse_header, parse_index

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_format import HEADER, craft, entry_head  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
D = "sha256:" + "a" * 64


def with_arrays(base: Dict[str, Any], count: int, item: bytes, per: int = 65536) -> bytes:
    """``base`` plus an unknown key holding ``count`` raw msgpack ``item``s in arrays of ``per``.

    Unknown keys are ignored by readers, so only the decoder's bounds can refuse this.
    """
    head = msgpack.packb(base)
    assert head[0] & 0xF0 == 0x80
    sizes = [per] * (count // per) + ([count % per] if count % per else [])
    body = bytearray([head[0] + 1]) + head[1:] + msgpack.packb("x")
    body += b"\xdd" + len(sizes).to_bytes(4, "big")
    for n in sizes:
        body += b"\xdd" + n.to_bytes(4, "big") + item * n
    return bytes(body)


def full_header(**over: Any) -> Dict[str, Any]:
    hdr = {"created": "2026-01-01T00:00:00Z", "tool": "test", "required_features": [],
           "volume": None, "content_bytes": 0}
    hdr.update(HEADER)
    hdr.update(over)
    return hdr


# ---------------------------------------------------------------------------
# The object budget


@pytest.mark.parametrize("item", [b"\xc0", b"\x80", b"\x90", b"\xa2ab", b"\xcd\x10\x00"],
                         ids=["nils", "empty maps", "empty arrays", "short strings", "uint16"])
def test_a_record_over_the_object_budget_is_refused(item: bytes) -> None:
    body = with_arrays(full_header(), fmt.MAX_RECORD_OBJECTS, item)
    with pytest.raises(BundleFormatError, match="more than 524288 msgpack objects"):
        unpack_body(body, "header")


def test_a_record_within_the_budget_decodes() -> None:
    body = with_arrays(full_header(), fmt.MAX_RECORD_OBJECTS - 1000, b"\xc0")
    assert parse_header(unpack_body(body, "header"), "b").platform == "linux/arm64"


def test_one_huge_array_is_refused_before_it_is_built() -> None:
    body = with_arrays(full_header(), fmt.MAX_RECORD_OBJECTS + 1, b"\xc0", per=fmt.MAX_RECORD_OBJECTS + 1)
    with pytest.raises(BundleFormatError, match="max_array_len"):
        unpack_body(body, "header")


@pytest.mark.parametrize("raw, fragment", [
    (b"\x81\xa1x" + b"\x91" * 5000 + b"\xc0", "not valid msgpack"),  # deeper than msgpack's stack
    (b"\x81\xa1x\xc7\x01\x01\x00", "not valid msgpack"),  # an ext type
    (b"\x81\xa1x\xdb" + (fmt.MAX_STRING + 1).to_bytes(4, "big") + b"a" * (fmt.MAX_STRING + 1),
     "max_str_len"),
])
def test_other_decoder_bounds(raw: bytes, fragment: str) -> None:
    with pytest.raises(BundleFormatError, match=fragment):
        unpack_body(raw, "header")


def test_the_reader_applies_the_budget() -> None:
    """Through the whole reader, as verify and import see it: a one-line error, exit 5."""
    raw = bytearray(craft([]))
    body = with_arrays(full_header(), fmt.MAX_RECORD_OBJECTS, b"\x80")
    bad = fmt.MAGIC + b"\x00\x01" + bytes([fmt.TAG_HEADER]) + len(body).to_bytes(4, "big") + body
    import xxhash
    bad += xxhash.xxh3_64_intdigest(body).to_bytes(8, "big")
    with pytest.raises(BundleFormatError, match="header decodes to more than"):
        BundleReader(io.BytesIO(bad + bytes(raw[len(raw) // 2:])), "b")


# ---------------------------------------------------------------------------
# Record sizes per kind


def test_an_entry_record_over_its_limit_is_refused_from_its_length() -> None:
    raw = craft([(entry_head(b"x", media_type="a" * 100), [b"x"])])
    at = raw.index(bytes([fmt.TAG_ENTRY]) + b"\x00")
    bad = raw[:at + 1] + (fmt.MAX_ENTRY_RECORD_SIZE + 1).to_bytes(4, "big") + raw[at + 5:]
    with pytest.raises(BundleFormatError, match=r"entry header claims 1048577 bytes \(limit 1048576\)"):
        reader = BundleReader(io.BytesIO(bad), "b")
        for entry in reader.entries():
            entry.skip()


def test_record_limits_are_smaller_than_0_2_0s() -> None:
    assert fmt.MAX_RECORD_SIZE == 8 << 20 and fmt.MAX_ENTRY_RECORD_SIZE == 1 << 20


# ---------------------------------------------------------------------------
# Structural limits, checked while parsing


@pytest.mark.parametrize("key, limit", [("prerequisites", fmt.MAX_PREREQUISITES),
                                        ("images", fmt.MAX_IMAGES),
                                        ("required_features", fmt.MAX_FEATURES)])
def test_header_lists_are_bounded(key: str, limit: int) -> None:
    with pytest.raises(BundleFormatError, match=f"header field '{key}' lists {limit + 1} items "
                                                f"\\(limit {limit}\\)"):
        parse_header(full_header(**{key: [None] * (limit + 1)}), "b")


@pytest.mark.parametrize("key, limit", [("entries", fmt.MAX_ENTRIES), ("images", fmt.MAX_IMAGES)])
def test_index_lists_are_bounded(key: str, limit: int) -> None:
    index: Dict[str, Any] = {"entries": [], "images": []}
    index[key] = [None] * (limit + 1)
    with pytest.raises(BundleFormatError, match=f"index field '{key}' lists {limit + 1} items"):
        parse_index(index, "b")


def test_layers_of_an_image_are_bounded() -> None:
    desc = {"mediaType": "m", "digest": D, "size": 1}
    image = {"name": "example.test/a:v1", "ref": "example.test/a:v1", "platform": "linux/amd64",
             "top": desc, "manifest": desc, "config": desc, "layers": [None] * (fmt.MAX_LAYERS + 1)}
    with pytest.raises(BundleFormatError, match="field 'layers' lists 1025 items"):
        parse_index({"entries": [], "images": [image]}, "b")


def test_delta_bases_are_bounded() -> None:
    head = {"kind": "delta", "digest": D, "size": 0, "codec": 0, "target": D, "target_size": 0,
            "bases": [None] * (fmt.MAX_PREREQUISITES + 1)}
    with pytest.raises(BundleFormatError, match="field 'bases' lists 32769 items"):
        parse_entry_head(head, "entry")


def test_string_fields_are_bounded() -> None:
    with pytest.raises(BundleFormatError, match="field 'tool' is 4097 characters long"):
        parse_header(full_header(tool="t" * 4097), "b")


def test_entries_in_the_stream_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader keeps a little per entry; a stream of millions of empty entries must end."""
    monkeypatch.setattr(reader_mod, "MAX_ENTRIES", 3)
    raw = craft([(entry_head(bytes([i])), [bytes([i])]) for i in range(4)])
    with pytest.raises(BundleFormatError, match="more than 3 entries"):
        for entry in BundleReader(io.BytesIO(raw), "b").entries():
            entry.skip()


def test_the_writer_refuses_what_readers_would() -> None:
    images = tuple(ImageSummary(f"example.test/a:v{i}", D, D) for i in range(fmt.MAX_IMAGES + 1))
    header = Header(site=None, runtime="docker", namespace=None, platform="linux/amd64",
                    layer_form="tar", prerequisites=(), images=images, content_bytes=0,
                    created="2026-01-01T00:00:00Z", tool="t")
    with pytest.raises(ValueError, match="refusing to write a header.*lists 1025 items"):
        BundleWriter(io.BytesIO(), header)


# ---------------------------------------------------------------------------
# Delta op streams: one flat array per op


def test_nested_arrays_in_an_op_are_refused_as_they_decode() -> None:
    # [1, [[[[...]]]]]: each level a 1-item array, 100,000 deep but msgpack's stack ends it
    # earlier; a flat tree of 6-item arrays would otherwise be millions of lists.
    tree = b"\x96" + b"\x90" * 6
    op = b"\x92\x01" + b"\x96" + tree * 6
    with pytest.raises(BundleFormatError, match="nested arrays in an op"):
        list(read_ops([op], "delta"))


def test_flat_ops_still_decode() -> None:
    ops = list(read_ops([msgpack.packb([1, 0]), msgpack.packb([3, 0, 0, 5])], "delta"))
    assert len(ops) == 2


# ---------------------------------------------------------------------------
# Peak memory of a real verify


def _peak_rss_mb(path: Path) -> int:
    """VmHWM of a fresh ``edgebundle verify`` (VmHWM is per process image, unlike ru_maxrss)."""
    code = ("import sys\nfrom edgebundle.cli.main import main\n"
            "rc = main(['verify', sys.argv[1]])\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print(rc, int(hwm) // 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=str(ROOT), capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    rc, mb = proc.stdout.split()
    assert rc == "5", proc.stderr
    return int(mb)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_memory_of_verify_on_an_8_mib_header_of_empty_maps(tmp_path: Path) -> None:
    """0.2.0: 608 MB accepted. Now refused, at ~48 MB peak (FORMAT.md's table)."""
    import xxhash
    count = (fmt.MAX_RECORD_SIZE - 1000) // 1
    body = with_arrays(full_header(), count - count // 65536 * 5 - 10, b"\x80")
    assert len(body) <= fmt.MAX_RECORD_SIZE
    raw = (fmt.MAGIC + b"\x00\x01" + bytes([fmt.TAG_HEADER]) + len(body).to_bytes(4, "big") + body
           + xxhash.xxh3_64_intdigest(body).to_bytes(8, "big"))
    path = tmp_path / "maps.ebundle"
    path.write_bytes(raw)
    assert _peak_rss_mb(path) < 100
