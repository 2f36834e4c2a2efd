"""docs/FORMAT.md and the code must agree: constants, header keys, record keys."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

import pytest

import edgebundle.format as fmt
from edgebundle.cache import BlobCache
from edgebundle.format import BundleReader
from edgebundle.format import RUNTIMES
from edgebundle.holdings import Inventory
from edgebundle.image import Layer, ResolvedImage
from edgebundle.oci import Descriptor, MT_DOCKER_CONFIG, MT_DOCKER_LAYER_GZIP, MT_DOCKER_MANIFEST, MT_OCI_INDEX, Platform
from edgebundle.pack import image_record, write_bundle
from edgebundle.plan import plan_bundle
from edgebundle.reference import parse_reference

ROOT = Path(__file__).resolve().parents[2]
SPEC = (ROOT / "docs" / "FORMAT.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the markdown section whose heading is exactly ``title``."""
    lines = SPEC.splitlines()
    start = next(i for i, l in enumerate(lines) if l.strip() == title)
    level = len(title) - len(title.lstrip("#"))
    out = []
    for line in lines[start + 1:]:
        m = re.match(r"^(#+) ", line)
        if m and len(m.group(1)) <= level:
            break
        out.append(line)
    return "\n".join(out)


def table(text: str) -> List[List[str]]:
    """Rows (without header and separator) of the first markdown table in ``text``."""
    rows: List[List[str]] = []
    started = False
    for line in text.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows.append(cells)
        elif started:
            break
    assert len(rows) >= 3, "no table found"
    assert set("".join(rows[1])) <= set("-: "), "second row is not a separator"
    return rows[2:]


def unquote(cell: str) -> str:
    m = re.fullmatch(r"`([^`]*)`", cell)
    assert m, f"expected a `code` cell, got {cell!r}"
    return m.group(1)


def parse_value(name: str, cell: str, current: Any) -> Any:
    if isinstance(current, bytes):
        inner = unquote(cell)
        if re.fullmatch(r"(?:[0-9A-Fa-f]{2} )*[0-9A-Fa-f]{2}", inner):
            return bytes.fromhex(inner)
        return inner.encode("latin-1").decode("unicode_escape").encode("latin-1")
    m = re.fullmatch(r"(0x[0-9A-Fa-f]+|\d+)(?:\s*\(`(.)`\))?", cell)
    assert m, f"{name}: cannot parse value {cell!r}"
    value = int(m.group(1), 0)
    if m.group(2) is not None:
        assert chr(value) == m.group(2), f"{name}: {cell!r} names the wrong character"
    return value


CONSTANT_ROWS = table(section("### Constants"))


def test_constants_table_is_not_empty() -> None:
    names = [unquote(r[0]) for r in CONSTANT_ROWS]
    assert len(names) == len(set(names)) >= 15
    assert "MAGIC" in names and "MAX_WINDOW_LOG" in names


@pytest.mark.parametrize("row", CONSTANT_ROWS, ids=[r[0].strip("`") for r in CONSTANT_ROWS])
def test_constant_row_matches_module(row: List[str]) -> None:
    name = unquote(row[0])
    assert hasattr(fmt, name), f"FORMAT.md lists {name}, edgebundle.format does not define it"
    current = getattr(fmt, name)
    assert parse_value(name, row[1], current) == current


def test_module_constants_are_all_in_the_table() -> None:
    """Every int/bytes constant of edgebundle.format is specified in the table."""
    listed = {unquote(r[0]) for r in CONSTANT_ROWS}
    module = {n for n, v in vars(fmt).items()
              if n.isupper() and not n.startswith("_") and isinstance(v, (int, bytes))
              and not isinstance(v, bool)}
    assert module == listed


def test_derived_constants_agree() -> None:
    assert fmt.FOOTER_SIZE == 1 + 8 + 16 + len(fmt.END_MAGIC)
    assert len(fmt.MAGIC) == 8
    assert fmt.FORMAT_VERSION in fmt.SUPPORTED_VERSIONS
    codecs = {getattr(fmt, unquote(r[0])) for r in CONSTANT_ROWS if unquote(r[0]).startswith("CODEC_")}
    assert set(fmt.CODECS) == codecs
    assert fmt.DEFAULT_CHUNK_SIZE <= fmt.MAX_CHUNK_SIZE
    assert fmt.DEFAULT_WINDOW_LOG <= fmt.MAX_WINDOW_LOG
    assert "`SUPPORTED_VERSIONS`" in SPEC


def test_layout_block_matches_constants() -> None:
    layout = section("## Layout")
    magic_hex = " ".join(f"{b:02X}" for b in fmt.MAGIC)
    assert f"Magic    := {magic_hex}" in layout
    assert repr(fmt.MAGIC)[2:-1] in layout.replace('"', "")  # the escaped form
    assert "EBDEND\\r\\n" in layout
    for tag in ("TAG_HEADER", "TAG_ENTRY", "TAG_INDEX"):
        assert f"Record('{chr(getattr(fmt, tag))}')" in layout
    assert f"'{chr(fmt.TAG_FOOTER)}' || u64 index_offset" in layout
    assert f"The footer is {fmt.FOOTER_SIZE} bytes" in layout


def _quoted_alternatives(cell: str) -> Set[str]:
    return set(re.findall(r'`"([^"`]+)"`', cell))


def header_table() -> Dict[str, Tuple[str, str]]:
    return {unquote(r[0]): (r[1], r[2]) for r in table(section("### Header (`H`)"))}


def test_header_enumerations_match_code() -> None:
    rows = header_table()
    assert _quoted_alternatives(rows["layer_form"][0]) == set(fmt.LAYER_FORMS)
    assert _quoted_alternatives(rows["runtime"][0]) == set(RUNTIMES)
    assert fmt.ENTRY_KINDS == (fmt.KIND_BLOB, fmt.KIND_DELTA)
    assert f'`kind` (`"{fmt.KIND_BLOB}"` or `"{fmt.KIND_DELTA}"`)' in section("### Entry (`E`)")
    assert fmt.KNOWN_FEATURES == {fmt.FEATURE_DELTA, fmt.FEATURE_SIGNATURE}
    assert f'`"{fmt.FEATURE_SIGNATURE}"`' in rows["required_features"][1]
    assert f"### Signatures (feature `{fmt.FEATURE_SIGNATURE}`)" in SPEC
    assert f'`"{fmt.FEATURE_DELTA}"`' in rows["required_features"][1]
    assert f"### Delta entries (feature `{fmt.FEATURE_DELTA}`)" in SPEC


def test_delta_grammar_matches_op_codes() -> None:
    grammar = section("### Delta entries (feature `tar-delta-v1`)")
    for name in ("literal", "copy", "patch", "range", "file"):
        code = getattr(fmt, f"OP_{name.upper()}")
        assert re.search(rf"^{name}\s+= \[{code}, ", grammar, re.M), name
    keys = {unquote(r[0]) for r in table(grammar)}
    from edgebundle.format.records import DeltaHead
    assert keys == set(DeltaHead("sha256:" + "0" * 64, 0, ()).to_wire())


# ---------------------------------------------------------------------------
# What the code emits, from a real pack


def _layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("hello.txt")
        data = b"hello\n"
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    tmp = tmp_path_factory.mktemp("spec")
    cache = BlobCache(tmp / "cache")
    tar = _layer_tar()
    gz = gzip.compress(tar, mtime=0)
    layer = Layer(MT_DOCKER_LAYER_GZIP, cache.put_bytes(gz), len(gz),
                  "sha256:" + hashlib.sha256(tar).hexdigest(), len(tar))
    config = json.dumps({"os": "linux", "architecture": "amd64",
                         "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}).encode()
    cdesc = Descriptor(MT_DOCKER_CONFIG, cache.put_bytes(config), len(config))
    manifest = json.dumps({"schemaVersion": 2, "config": cdesc.to_json(), "layers": [
        {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}]}).encode()
    mdesc = Descriptor(MT_DOCKER_MANIFEST, cache.put_bytes(manifest), len(manifest))
    index = json.dumps({"schemaVersion": 2, "manifests": [
        dict(mdesc.to_json(), platform={"os": "linux", "architecture": "amd64"})]}).encode()
    idesc = Descriptor(MT_OCI_INDEX, cache.put_bytes(index), len(index))
    image = ResolvedImage(parse_reference("example.test/shop/app:v1"), idesc,
                          Platform.parse("linux/amd64"), mdesc, cdesc, (layer,))
    # The site holds the layer blob, so the header carries one prerequisite.
    site = Inventory(runtime="containerd", namespace="k8s.io", blobs=frozenset({layer.digest}))
    plan = plan_bundle("gw-01", [image], site, runtime="containerd", namespace="k8s.io",
                       platform="linux/amd64")
    assert plan.prerequisites
    out = tmp / "b.ebundle"
    with open(out, "wb") as fh:
        write_bundle(plan, cache, fh, level=3)
    entries = []
    raw = out.read_bytes()
    with open(out, "rb") as fh:
        reader = BundleReader(fh)
        for entry in reader.entries():
            entry.skip()
    from edgebundle.format.framing import unpack_body

    def body(off: int) -> Dict[str, Any]:
        n = int.from_bytes(raw[off + 1:off + 5], "big")
        return unpack_body(raw[off + 5:off + 5 + n], "record")

    assert reader.index is not None
    for rec in reader.index.entries:
        entries.append(body(rec.offset))
    # The wire form, as the bytes say, not as the typed model re-serialises it.
    header = body(10)  # after magic (8) and version (2)
    index = body(int.from_bytes(raw[-33:][1:9], "big"))  # the footer points at it
    return {"header": header, "index": index, "entries": entries,
            "record": image_record(image, "blob").to_wire()}


def test_header_keys_emitted_are_specified(packed: Dict[str, Any]) -> None:
    specified = set(header_table())
    emitted = set(packed["header"])
    assert emitted == specified


def test_header_image_and_prerequisite_keys(packed: Dict[str, Any]) -> None:
    rows = header_table()

    def braced(cell: str) -> Set[str]:
        m = re.search(r"`\{([^}]*)\}`", cell)
        assert m, cell
        return {k.strip() for k in m.group(1).split(",")}

    (summary,) = packed["header"]["images"]
    assert set(summary) == braced(rows["images"][1])
    (prereq,) = packed["header"]["prerequisites"]
    assert set(prereq) == braced(rows["prerequisites"][1])
    assert packed["header"]["volume"] is None
    assert packed["header"]["required_features"] == []
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", packed["header"]["created"])
    assert packed["header"]["tool"].startswith("edgebundle ")


def test_index_keys(packed: Dict[str, Any]) -> None:
    rows = {unquote(r[0]): r for r in table(section("### Index (`I`)"))}
    assert set(packed["index"]) == set(rows)
    m = re.search(r"`\{([^}]*)\}`", rows["entries"][2])
    assert m
    spec_keys = {k.strip() for k in m.group(1).split(",")}
    for rec in packed["index"]["entries"]:
        assert set(rec) == spec_keys


def test_entry_record_keys(packed: Dict[str, Any]) -> None:
    text = section("### Entry (`E`)")
    para = text[text.index("Record keys:"):].split("\n\n")[0]
    spec_keys = set(re.findall(r"`([a-z_]+)`", para))
    assert {"kind", "digest", "size", "codec", "level", "media_type"} <= spec_keys
    for head in packed["entries"]:
        assert set(head) <= spec_keys
        assert {"kind", "digest", "size", "codec"} <= set(head)


def test_image_record_keys(packed: Dict[str, Any]) -> None:
    text = section("### Index (`I`)")
    para = text[text.index("**Image record**"):].split("\n\n")[0]
    record = packed["record"]
    assert packed["index"]["images"] == [record]
    top_keys = ["name", "ref", "platform", "top", "manifest", "config", "layers"]
    for key in top_keys:
        assert f"`{key}`" in para
    assert set(record) == set(top_keys)
    braces = [{k.strip() for k in b.split(",")} for b in re.findall(r"`\{([^}]*)\}`", para)]
    descriptor, layer = braces
    for key in ("top", "manifest", "config"):
        assert set(record[key]) == descriptor
    for rec_layer in record["layers"]:
        assert set(rec_layer) == layer
    assert {rec_layer["form"] for rec_layer in record["layers"]} <= set(fmt.LAYER_FORMS)


def _keys_of(table_title: str) -> Set[str]:
    text = section("## Inventory report (JSON, version 1)")
    part = text[text.index(table_title):]
    return {unquote(r[0]) for r in table(part)}


def test_inventory_report_keys_match_the_code() -> None:
    """FORMAT.md's report key tables are what inventory_to_json writes, key for key."""
    from edgebundle.holdings import HeldImage, HeldLayer
    from edgebundle.report import inventory_to_json
    inv = Inventory(runtime="containerd", namespace="k8s.io", images=(HeldImage(
        "example.test/a:v1", "sha256:" + "1" * 64,
        target=Descriptor(MT_OCI_INDEX, "sha256:" + "2" * 64, 10), manifest="sha256:" + "3" * 64,
        platform="linux/amd64", layers=(HeldLayer("sha256:" + "4" * 64, "sha256:" + "5" * 64, 3,
                                                  True, True),)),),
        blobs=frozenset({"sha256:" + "5" * 64}), chains=frozenset({"sha256:" + "4" * 64}),
        extra={"snapshotter": "overlayfs"}, trusted_keys=frozenset({"ed25519:" + "6" * 32}))
    obj = inventory_to_json(inv, "gw-01")
    assert set(obj) == _keys_of("Top-level keys:")
    assert set(obj["images"][0]) == _keys_of("Image keys:")
    assert set(obj["images"][0]["layers"][0]) == _keys_of("Layer keys:")
    runtime_row = next(r for r in table(section("## Inventory report (JSON, version 1)"))
                       if unquote(r[0]) == "runtime")
    m = re.search(r"`\{([^}]*)\}`", runtime_row[2])
    assert m and {k.strip() for k in m.group(1).split(",")} == set(obj["runtime"])


def test_inventory_report_example_keys() -> None:
    """The report example in FORMAT.md is valid JSON once the ellipses are filled in."""
    text = section("## Inventory report (JSON, version 1)")
    block = text.split("```json", 1)[1].split("```", 1)[0]
    obj = json.loads(block.replace("sha256:…", "sha256:" + "0" * 64).replace("…", "x"))
    assert obj["version"] == 1 and obj["kind"] == "edgebundle-inventory"
    from edgebundle.report import inventory_from_json
    inv = inventory_from_json(obj)
    assert inv.runtime == "containerd" and inv.namespace == "k8s.io"


def test_volume_grammar_matches_constants() -> None:
    from edgebundle.format.volumes import OVERHEAD, VolumeHead
    text = section("## Volumes")
    magic_hex = " ".join(f"{b:02X}" for b in fmt.VOLUME_MAGIC)
    assert f"VMagic   := {magic_hex}" in text
    assert repr(fmt.VOLUME_MAGIC)[2:-1] in text.replace('"', "")
    assert f'"{repr(fmt.VOLUME_END_MAGIC)[2:-1]}"' in text
    assert f"The magic and header are {fmt.VOLUME_HEAD_SIZE} bytes, the trailer " \
           f"{fmt.VOLUME_TRAILER_SIZE} bytes" in text
    assert f"`length + {OVERHEAD}`" in text
    assert len(VolumeHead(bytes(16), 1, 1, 0, 1, 1).pack()) == fmt.VOLUME_HEAD_SIZE
    fields = {unquote(r[0]) for r in table(text)}
    assert fields == {"version", "id", "number", "count", "offset", "length", "total"}
