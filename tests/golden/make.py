#!/usr/bin/env python3
"""Rebuild the golden corrupted bundles of ``tests/golden/cases.json``, byte for byte.

    python tests/golden/make.py            # (re)write tests/golden/cases/*.ebundle
    python tests/golden/make.py --errors   # print each case's current verify exit/error

Every file derives from one fixed tiny bundle (``base.ebundle``: one containerd image of
one layer, three entries, one of them split over two chunks), built here at the framing
level so that no library version can change a byte: the layer is a USTAR tar in a gzip
of *stored* deflate blocks, the JSON entries are zstd frames of *raw* blocks, both
written by hand below. A case is either a damage to the base's bytes ("raw": truncation,
a flipped bit, garbage) or a change to its records that is re-checksummed ("model": the
chunk and record xxh3s and the footer are recomputed, so the damage gets past the
checksums and the record rules must catch it).

Adding a case: one row in cases.json (its file, exit code and exact error line) and one
function here registered with ``@case("file-name")``. A file made by other means (e.g. a
signed bundle made with a test key) can be committed as is: give its row
``"generated": false`` and the generator leaves it alone. ``verify_args`` in a row are
passed to ``edgebundle verify`` before the file (e.g. ``["--trust", "keys/test.pub"]``).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import struct
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import msgpack
import xxhash

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"
sys.path.insert(0, str(HERE.parents[1]))

from edgebundle.format import (CODEC_STORED, CODEC_ZSTD, END_MAGIC, MAGIC, TAG_ENTRY,  # noqa: E402
                               TAG_FOOTER, TAG_HEADER, TAG_INDEX, TAG_SIGNATURE)

U32, U64 = struct.Struct(">I"), struct.Struct(">Q")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# Hand-made codecs: valid, and the same bytes on every machine forever


def stored_gzip(data: bytes) -> bytes:
    """gzip (RFC 1952) of stored deflate blocks (RFC 1951, BTYPE 00): no compressor involved."""
    out = bytearray(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
    pieces = [data[i:i + 65535] for i in range(0, len(data), 65535)] or [b""]
    for i, piece in enumerate(pieces):
        out += bytes([1 if i == len(pieces) - 1 else 0])
        out += struct.pack("<HH", len(piece), len(piece) ^ 0xFFFF) + piece
    out += struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return bytes(out)


def raw_zstd(data: bytes) -> bytes:
    """One zstd frame (RFC 8878) of raw blocks, single segment, content size declared."""
    if len(data) < 256:
        head = bytes([0x20, len(data)])  # single segment, 1-byte content size
    else:
        assert len(data) < 256 + (1 << 16)
        head = bytes([0x60]) + struct.pack("<H", len(data) - 256)  # 2-byte size, minus 256
    out = bytearray(b"\x28\xb5\x2f\xfd" + head)
    blocks = [data[i:i + (1 << 17)] for i in range(0, len(data), 1 << 17)] or [b""]
    for i, block in enumerate(blocks):
        value = (len(block) << 3) | (1 if i == len(blocks) - 1 else 0)  # block type 0: raw
        out += value.to_bytes(3, "little") + block
    return bytes(out)


def layer_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        data = b"hello from a golden bundle\n"
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
        tf.addfile(info, io.BytesIO(data))
    # header + one data block + the two-block end marker, without tarfile's padding of
    # the archive to 10 KiB (a valid tar: readers stop at the end marker)
    return buf.getvalue()[:4 * 512]


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------
# The base bundle as a model, and its assembly


@dataclass
class Entry:
    head: Dict[str, Any]
    chunks: List[bytes]


@dataclass
class Model:
    version: int
    header: Dict[str, Any]
    entries: List[Entry]
    index: Dict[str, Any]
    magic: bytes = MAGIC


NAME = "example.test/shop/app:v1"


def base_model() -> Model:
    tar = layer_tar()
    blob = stored_gzip(tar)
    config = dumps({"architecture": "amd64", "os": "linux",
                    "rootfs": {"type": "layers", "diff_ids": [sha(tar)]}})
    layer = {"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
             "digest": sha(blob), "size": len(blob)}
    cdesc = {"mediaType": "application/vnd.docker.container.image.v1+json",
             "digest": sha(config), "size": len(config)}
    manifest = dumps({"schemaVersion": 2,
                      "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                      "config": cdesc, "layers": [layer]})
    mdesc = {"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
             "digest": sha(manifest), "size": len(manifest)}
    mframe = raw_zstd(manifest)
    entries = [
        Entry({"kind": "blob", "digest": sha(blob), "size": len(blob), "codec": CODEC_STORED,
               "media_type": layer["mediaType"]}, [blob]),
        Entry({"kind": "blob", "digest": sha(config), "size": len(config), "codec": CODEC_ZSTD,
               "level": 16, "media_type": cdesc["mediaType"]}, [raw_zstd(config)]),
        Entry({"kind": "blob", "digest": sha(manifest), "size": len(manifest), "codec": CODEC_ZSTD,
               "level": 16, "media_type": mdesc["mediaType"]}, [mframe[:100], mframe[100:]]),
    ]
    header = {"content_bytes": len(blob) + len(config) + len(manifest), "site": "gw-01",
              "runtime": "containerd", "namespace": "default", "platform": "linux/amd64",
              "layer_form": "blob", "prerequisites": [],
              "images": [{"name": NAME, "top": mdesc["digest"], "config": cdesc["digest"]}],
              "created": "2026-01-01T00:00:00Z", "tool": "edgebundle golden",
              "required_features": [], "volume": None}
    record = {"name": NAME, "ref": NAME, "platform": "linux/amd64", "top": mdesc,
              "manifest": mdesc, "config": cdesc,
              "layers": [dict(layer, diff_id=sha(tar), tar_size=len(tar), form="blob")]}
    return Model(1, header, entries, {"entries": [], "images": [record]})


def record(tag: int, obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return bytes([tag]) + U32.pack(len(body)) + body + U64.pack(xxhash.xxh3_64_intdigest(body))


def assemble(m: Model, signature: Any = None) -> bytes:
    """The model's bytes, every checksum right; the index's entry table from the stream.

    ``signature``: the body of a signature record to put after the header.
    """
    out = bytearray(m.magic + m.version.to_bytes(2, "big"))
    out += record(TAG_HEADER, m.header)
    if signature is not None:
        out += record(TAG_SIGNATURE, signature)
    listed = []
    for e in m.entries:
        offset = len(out)
        out += record(TAG_ENTRY, e.head)
        for c in e.chunks:
            out += U32.pack(len(c)) + U64.pack(xxhash.xxh3_64_intdigest(c)) + c
        out += U32.pack(0)
        listed.append({"digest": e.head["digest"], "kind": e.head["kind"], "size": e.head["size"],
                       "codec": e.head["codec"], "stored_size": sum(map(len, e.chunks)),
                       "offset": offset})
        if "target" in e.head:  # a delta entry
            listed[-1]["target"] = e.head["target"]
    index = dict(m.index, entries=listed)
    index_offset = len(out)
    out += record(TAG_INDEX, index)
    out += bytes([TAG_FOOTER]) + U64.pack(index_offset)
    out += xxhash.xxh3_128_digest(bytes(out)) + END_MAGIC
    return bytes(out)


BASE = assemble(base_model())


def regions(raw: bytes) -> Dict[str, int]:
    """Byte offsets in the base: header body, each entry record, chunk data, index, footer."""
    pos = 10
    out = {"header": pos + 5}
    pos += 5 + U32.unpack(raw[pos + 1:pos + 5])[0] + 8
    i = 0
    while raw[pos] == TAG_ENTRY:
        out[f"entry{i}"] = pos
        pos += 5 + U32.unpack(raw[pos + 1:pos + 5])[0] + 8
        out[f"entry{i}.chunk"] = pos
        while True:
            n = U32.unpack(raw[pos:pos + 4])[0]
            pos += 4
            if n == 0:
                break
            pos += 8 + n
        i += 1
    out["index"] = pos
    out["footer"] = len(raw) - 33
    return out


AT = regions(BASE)


def flip(raw: bytes, pos: int, mask: int = 0x10) -> bytes:
    b = bytearray(raw)
    b[pos] ^= mask
    return bytes(b)


# ---------------------------------------------------------------------------
# The cases (names are the files; rows in cases.json say what each must give)

CASES: Dict[str, Callable[[], bytes]] = {}


def case(name: str) -> Callable[[Callable[[], bytes]], Callable[[], bytes]]:
    def register(fn: Callable[[], bytes]) -> Callable[[], bytes]:
        assert name not in CASES, name
        CASES[name] = fn
        return fn
    return register


def model_case(name: str, change: Callable[[Model], None]) -> None:
    def build() -> bytes:
        m = base_model()
        change(m)
        return assemble(m)
    case(name)(build)


case("base.ebundle")(lambda: BASE)
case("empty.ebundle")(lambda: b"")
case("not-a-bundle.ebundle")(lambda: b"#!/bin/sh\necho this is a shell script\n")
case("wrong-magic.ebundle")(lambda: b"\x89EBX" + BASE[4:])
case("future-version.ebundle")(lambda: BASE[:8] + b"\x00\x02" + BASE[10:])
case("version-zero.ebundle")(lambda: BASE[:8] + b"\x00\x00" + BASE[10:])
case("truncated-in-magic.ebundle")(lambda: BASE[:5])
case("truncated-in-header.ebundle")(lambda: BASE[:AT["header"] + 20])
case("truncated-in-entry-chunk.ebundle")(lambda: BASE[:AT["entry0.chunk"] + 40])
case("truncated-before-index.ebundle")(lambda: BASE[:AT["index"]])
case("truncated-in-footer.ebundle")(lambda: BASE[:-10])
case("flipped-bit-in-header.ebundle")(lambda: flip(BASE, AT["header"] + 30))
case("flipped-bit-in-entry-record.ebundle")(lambda: flip(BASE, AT["entry1"] + 12))
case("flipped-bit-in-entry-chunk.ebundle")(lambda: flip(BASE, AT["entry0.chunk"] + 12 + 100))
case("flipped-bit-in-second-chunk.ebundle")(lambda: flip(BASE, AT["entry2.chunk"] + 12 + 100 + 12 + 5))
case("flipped-bit-in-index.ebundle")(lambda: flip(BASE, AT["index"] + 40))
case("flipped-bit-in-footer-checksum.ebundle")(lambda: flip(BASE, AT["footer"] + 12))
case("flipped-bit-in-footer-offset.ebundle")(lambda: flip(BASE, AT["footer"] + 8))
case("flipped-bit-in-end-magic.ebundle")(lambda: flip(BASE, len(BASE) - 3))
case("appended-garbage.ebundle")(lambda: BASE + b"garbage\n")
case("appended-zeros.ebundle")(lambda: BASE + bytes(4096))
case("two-bundles-concatenated.ebundle")(lambda: BASE + BASE)
case("header-length-over-limit.ebundle")(
    lambda: BASE[:11] + U32.pack((8 << 20) + 1) + BASE[15:])
case("entry-record-length-over-limit.ebundle")(
    lambda: BASE[:AT["entry0"] + 1] + U32.pack((1 << 20) + 1) + BASE[AT["entry0"] + 5:])
case("chunk-length-over-limit.ebundle")(
    lambda: BASE[:AT["entry0.chunk"]] + U32.pack((4 << 20) + 1) + BASE[AT["entry0.chunk"] + 4:])
case("unexpected-tag.ebundle")(lambda: BASE[:AT["entry1"]] + b"X" + BASE[AT["entry1"] + 1:])


def _feature(m: Model) -> None:
    m.header["required_features"] = ["teleport-v1"]


def _volume(m: Model) -> None:
    m.header["volume"] = {"index": 1, "count": 2}


def _newline_name(m: Model) -> None:
    m.header["images"][0]["name"] = m.index["images"][0]["name"] = "example.test/shop/app\n:v1"


def _unicode_tag(m: Model) -> None:
    m.header["images"][0]["name"] = m.index["images"][0]["name"] = "example.test/shop/app:v\u00e9"


def _reserved_name(m: Model) -> None:
    m.header["images"][0]["name"] = m.index["images"][0]["name"] = \
        "import.edgebundle.invalid/0123abcd/0:pending"


def _name_twice(m: Model) -> None:
    first = m.header["images"][0]
    m.header["images"].append(dict(first))


def _two_spellings(m: Model) -> None:
    m.header["images"][0]["name"] = "docker.io/library/app:v1"
    m.header["images"].append(dict(m.header["images"][0], name="app:v1"))


def _docker_tag_clash(m: Model) -> None:
    top = m.header["images"][0]["top"]
    m.header.update(runtime="docker", layer_form="tar", namespace=None)
    m.header["images"] = [{"name": "example.test/shop/app@" + top, "top": top, "config": sha(b"a")},
                          {"name": "example.test/shop/app:" + top.replace(":", "-"),
                           "top": sha(b"b"), "config": sha(b"c")}]


def _too_many_objects(m: Model) -> None:
    m.header["x-padding"] = [[]] * (256 * 1024)  # an empty list costs 2: itself, and as an item


def _size_too_small(m: Model) -> None:
    m.entries[1].head["size"] -= 1


def _content_mismatch(m: Model) -> None:
    blob = bytearray(m.entries[0].chunks[0])
    blob[-20] ^= 0x01  # inside the gzip trailer: a different blob, same length
    m.entries[0].chunks[0] = bytes(blob)


def _not_zstd(m: Model) -> None:
    m.entries[1].chunks[0] = b"\x00" * len(m.entries[1].chunks[0])


def _two_frames(m: Model) -> None:
    m.entries[1].chunks.append(raw_zstd(b""))


def _duplicate_entry(m: Model) -> None:
    m.entries.insert(1, copy.deepcopy(m.entries[0]))


def _missing_manifest(m: Model) -> None:
    del m.entries[2]
    m.header["content_bytes"] = 0


def _index_names_another_image(m: Model) -> None:
    m.index["images"][0]["name"] = "example.test/shop/app:v2"


def _layer_neither_entry_nor_prerequisite(m: Model) -> None:
    del m.entries[0]


def _bad_digest(m: Model) -> None:
    m.entries[0].head["digest"] = m.entries[0].head["digest"].upper().replace("SHA256", "sha256")


def _header_not_a_map(m: Model) -> None:
    m.header = [1, 2, 3]  # type: ignore[assignment]


model_case("unknown-required-feature.ebundle", _feature)
model_case("volume-not-nil.ebundle", _volume)
model_case("header-not-a-map.ebundle", _header_not_a_map)
model_case("name-with-newline.ebundle", _newline_name)
model_case("name-with-unicode-tag.ebundle", _unicode_tag)
model_case("name-under-reserved-prefix.ebundle", _reserved_name)
model_case("same-name-twice.ebundle", _name_twice)
model_case("two-spellings-of-one-name.ebundle", _two_spellings)
model_case("docker-tag-clash.ebundle", _docker_tag_clash)
model_case("header-over-object-budget.ebundle", _too_many_objects)
model_case("entry-decodes-beyond-its-size.ebundle", _size_too_small)
model_case("entry-content-mismatch-rechecksummed.ebundle", _content_mismatch)
model_case("entry-not-zstd-rechecksummed.ebundle", _not_zstd)
model_case("entry-two-zstd-frames.ebundle", _two_frames)
model_case("entry-digest-uppercase.ebundle", _bad_digest)
model_case("duplicate-entry.ebundle", _duplicate_entry)
model_case("index-missing-manifest-entry.ebundle", _missing_manifest)
model_case("index-image-not-the-headers.ebundle", _index_names_another_image)
model_case("layer-neither-entry-nor-prerequisite.ebundle", _layer_neither_entry_nor_prerequisite)


@case("index-disagrees-with-stream.ebundle")
def _index_disagrees_case() -> bytes:
    m = base_model()
    raw = assemble(m)
    # rebuild with the entry table taken from the stream, then one field changed
    at = regions(raw)
    body = msgpack.unpackb(raw[at["index"] + 5:at["footer"] - 8], raw=False)
    body["entries"][0]["stored_size"] += 1
    out = raw[:at["index"]] + record(TAG_INDEX, body)
    out += bytes([TAG_FOOTER]) + U64.pack(at["index"])
    return out + xxhash.xxh3_128_digest(out) + END_MAGIC


# ---------------------------------------------------------------------------
# Signed cases: two fixed test keys (Ed25519 signatures are deterministic, so these files
# regenerate byte for byte too). keys/*.pub are written by this script as well.

KEYS_DIR = HERE / "keys"
SEEDS = {name: hashlib.sha256(f"edgebundle golden test key {name}".encode()).digest()
         for name in ("test", "other")}


def _private(name: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    return ed25519.Ed25519PrivateKey.from_private_bytes(SEEDS[name])


def public_pems() -> Dict[str, bytes]:
    from cryptography.hazmat.primitives import serialization as ser
    return {f"{name}.pub": _private(name).public_key().public_bytes(
        ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo) for name in SEEDS}


def _key_id(name: str) -> str:
    from cryptography.hazmat.primitives import serialization as ser
    from edgebundle.trust import key_id
    return key_id(_private(name).public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))


def committed(m: Model) -> None:
    """Give the model's header the commitments and feature of a signed bundle."""
    from edgebundle.format.records import parse_entry_head, parse_index
    from edgebundle.format.signature import entry_commitment, images_commitment
    heads = [parse_entry_head(e.head, "golden") for e in m.entries]
    images = parse_index({"entries": [], "images": m.index["images"]}, "golden").images
    m.header["required_features"] = ["signature-v1"]
    m.header["commitments"] = {"entries": [entry_commitment(h) for h in heads],
                               "images": images_commitment(images)}


def signature_for(header: Dict[str, Any], *names: str, version: int = 1) -> Dict[str, Any]:
    from edgebundle.format.signature import signed_message
    body = msgpack.packb(header, use_bin_type=True)
    message = signed_message(body, version)
    return {"signatures": [{"algorithm": "ed25519", "key_id": _key_id(n),
                            "signature": _private(n).sign(message)} for n in names]}


def signed_model() -> Model:
    m = base_model()
    committed(m)
    return m


def signed_case(name: str, change: Callable[[Model, Dict[str, Any]], Any] = lambda m, s: s,
                signer: str = "test") -> None:
    """A signed base; ``change(model, signature)`` runs after signing and returns the
    signature record to write (None: none)."""
    def build() -> bytes:
        m = signed_model()
        sig = signature_for(m.header, signer)
        return assemble(m, change(m, sig))
    case(name)(build)


def _flip_signature(m: Model, sig: Dict[str, Any]) -> Dict[str, Any]:
    raw = bytearray(sig["signatures"][0]["signature"])
    raw[10] ^= 0x01
    sig["signatures"][0]["signature"] = bytes(raw)
    return sig


def _tamper_header(m: Model, sig: Dict[str, Any]) -> Dict[str, Any]:
    m.header["site"] = "gw-99"
    return sig


def _tamper_entry_record(m: Model, sig: Dict[str, Any]) -> Dict[str, Any]:
    m.entries[1].head["media_type"] = "application/x-evil"
    return sig


def _tamper_entry_bytes(m: Model, sig: Dict[str, Any]) -> Dict[str, Any]:
    blob = bytearray(m.entries[0].chunks[0])
    blob[-20] ^= 0x01  # the record kept: the content no longer hashes to its digest
    m.entries[0].chunks[0] = bytes(blob)
    return sig


def _tamper_index(m: Model, sig: Dict[str, Any]) -> Dict[str, Any]:
    m.index["images"][0]["ref"] = "example.test/shop/evil:v1"
    return sig


def _strip_signature(m: Model, sig: Dict[str, Any]) -> None:
    return None


def _strip_signature_and_feature(m: Model, sig: Dict[str, Any]) -> None:
    m.header["required_features"] = []
    return None


def _re_sign_with_a_stolen_key_id(m: Model, sig: Dict[str, Any]) -> Dict[str, Any]:
    sig["signatures"][0]["key_id"] = _key_id("test")  # made by "other", claims "test"
    return sig


signed_case("signed.ebundle")
signed_case("signed-by-an-untrusted-key.ebundle", signer="other")
case("unsigned-under-a-trust-policy.ebundle")(lambda: BASE)
signed_case("signed-signature-flipped.ebundle", _flip_signature)
signed_case("signed-header-tampered.ebundle", _tamper_header)
signed_case("signed-entry-record-tampered.ebundle", _tamper_entry_record)
signed_case("signed-entry-bytes-tampered.ebundle", _tamper_entry_bytes)
signed_case("signed-index-tampered.ebundle", _tamper_index)
signed_case("signed-signature-stripped.ebundle", _strip_signature)
signed_case("signed-signature-and-feature-stripped.ebundle", _strip_signature_and_feature)
signed_case("signed-key-id-claims-a-trusted-key.ebundle", _re_sign_with_a_stolen_key_id,
            signer="other")


# ---------------------------------------------------------------------------


def build_all() -> Dict[str, bytes]:
    return {name: fn() for name, fn in CASES.items()}


def load_table() -> List[Dict[str, Any]]:
    return json.loads((HERE / "cases.json").read_text(encoding="utf-8"))


def run_cli(args: List[str]) -> Tuple[int, str]:
    """``edgebundle ARGS`` in this process, from this directory: (exit code, stderr's last line)."""
    import contextlib
    import os

    from edgebundle.cli.main import main as cli
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(HERE)  # messages name the file as given: cases/NAME, on any machine
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli(args)
    finally:
        os.chdir(cwd)
    lines = err.getvalue().splitlines()
    return rc, lines[-1] if lines else ""


def main(argv: List[str]) -> int:
    if argv == ["--errors"]:
        for row in load_table():
            rc, line = run_cli(["verify", *row.get("verify_args", []), "cases/" + row["file"]])
            print(json.dumps({"file": row["file"], "exit": rc, "error": line}, ensure_ascii=False))
        return 0
    if argv:
        print(__doc__)
        return 2
    CASES_DIR.mkdir(exist_ok=True)
    generated = {r["file"] for r in load_table() if r.get("generated", True)}
    built = build_all()
    missing = generated - set(built)
    if missing:
        print(f"cases.json rows with no generator: {sorted(missing)}", file=sys.stderr)
        return 1
    for name, data in sorted(built.items()):
        (CASES_DIR / name).write_bytes(data)
    KEYS_DIR.mkdir(exist_ok=True)
    for name, pem in public_pems().items():
        (KEYS_DIR / name).write_bytes(pem)
    print(f"wrote {len(built)} files to {CASES_DIR}, {len(SEEDS)} public keys to {KEYS_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
