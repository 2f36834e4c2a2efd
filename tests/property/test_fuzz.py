"""A fuzz target that runs in the suite: fixed seeds, fixed case counts (~15 s in all).

Mutations of valid inputs must give only ``EdgebundleError`` subclasses (a one-line
message and an exit code), never IndexError, KeyError, RecursionError, MemoryError, a
zstd or msgpack error, or a hang:

* bundles (the golden base, and a bundle with a delta entry): raw damage (bit flips,
  truncation, splices, inserted and deleted bytes) and record damage that is
  re-checksummed (field values replaced by values of every type, keys dropped or added,
  chunk bytes changed with their xxh3 recomputed), read by ``BundleReader`` to the end
  as ``verify`` does, and some by ``read_index`` as ``inspect`` does;
* delta op streams, rebuilt against in-memory base files and a base tar;
* inventory reports, parsed and validated as ``inventory record`` does.

A failure prints the seed and the case number; rerun one case with FUZZ_CASE=N.
"""

from __future__ import annotations

import copy
import io
import json
import os
import random
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import msgpack
import pytest

from edgebundle.errors import EdgebundleError
from edgebundle.format import BaseLayer, BundleReader, read_index
from edgebundle.format.records import DeltaHead
from edgebundle.oci import chain_ids
from edgebundle.rebuild import rebuild
from edgebundle.report import inventory_from_json, parse_json_object

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "golden"))
import make  # noqa: E402  (the golden bundle and its framing-level assembler)

SEED = 20261201
ONLY = int(os.environ["FUZZ_CASE"]) if os.environ.get("FUZZ_CASE") else None


def cases(count: int) -> Iterator[tuple[int, random.Random]]:
    for i in range(count):
        if ONLY is None or ONLY == i:
            yield i, random.Random(SEED * 1_000_003 + i)


def only_edgebundle_errors(i: int, action: Callable[[], object], data: object = None) -> bool:
    """Run ``action``; True if it raised an EdgebundleError, False if it succeeded."""
    started = time.monotonic()
    try:
        action()
    except EdgebundleError as exc:
        assert "\n" not in exc.message, f"case {i}: a multi-line message: {exc.message!r}"
        return True
    except Exception as exc:  # the fuzz finding: say how to replay it
        raise AssertionError(f"case {i} (FUZZ_CASE={i}): {type(exc).__name__}: {exc!r:.300}; "
                             f"input {data!r:.200}") from exc
    finally:
        assert time.monotonic() - started < 10, f"case {i} took too long"
    return False


# ---------------------------------------------------------------------------
# Values of every type msgpack and JSON can carry, and the hostile ones


def hostile_value(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, -1, 1, 2 ** 63 - 1, 2 ** 64 - 1, -2 ** 63, 1.5, float("inf"),
        "", "x", "a" * 5000, "sha256:" + "0" * 64, "sha256:" + "A" * 64, "example.test/a:v1",
        "example.test/a\n:v1", "import.edgebundle.invalid/x:v1", "\u00e9", b"", b"\x00" * 16,
        [], [None], [[]] * 50, {}, {"a": 1}, {"digest": "sha256:" + "1" * 64},
        rng.randrange(-2 ** 40, 2 ** 40), rng.randbytes(rng.randrange(0, 40)).hex(),
    ])


def mutate_tree(obj: Any, rng: random.Random, may_stay_valid: bool = True) -> Any:
    """A copy of a msgpack/JSON tree with one random node replaced, dropped or added to.

    ``may_stay_valid``: may also add a key the spec does not define (readers ignore it) or
    repeat a list item (a second copy of a valid signature is still valid)."""
    obj = copy.deepcopy(obj)
    paths: List[List[Any]] = []

    def walk(node: Any, path: List[Any]) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for j, v in enumerate(node):
                walk(v, path + [j])

    walk(obj, [])
    path = rng.choice(paths[1:] or paths)
    if not path:
        return hostile_value(rng)
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    roll = rng.random()
    if roll < 0.6:
        parent[key] = hostile_value(rng)
    elif roll < 0.75:
        del parent[key]
    elif roll < 0.85 and isinstance(parent, dict) and may_stay_valid:
        parent["unknown-" + str(rng.randrange(9))] = hostile_value(rng)
    elif isinstance(parent[key], list) and parent[key] and may_stay_valid:
        parent[key].append(copy.deepcopy(rng.choice(parent[key])))  # a duplicate item
    else:
        parent[key] = [parent[key]]
    return obj


def mutate_bytes(data: bytes, rng: random.Random, donor: bytes = b"") -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        roll = rng.random()
        if not b:
            b += rng.randbytes(rng.randrange(1, 30))
        elif roll < 0.35:
            p = rng.randrange(len(b))
            b[p] ^= 1 << rng.randrange(8)
        elif roll < 0.45:
            b[rng.randrange(len(b))] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        elif roll < 0.6:
            del b[rng.randrange(len(b)):]
        elif roll < 0.7:
            p = rng.randrange(len(b))
            b[p:p] = rng.randbytes(rng.randrange(1, 20))
        elif roll < 0.8:
            p = rng.randrange(len(b))
            del b[p:p + rng.randrange(1, 40)]
        else:  # a splice: a slice of this or another input, somewhere else
            src = donor or bytes(b)
            s = rng.randrange(len(src))
            piece = src[s:s + rng.randrange(1, 200)]
            p = rng.randrange(len(b))
            b[p:p + (len(piece) if rng.random() < 0.5 else 0)] = piece
    return bytes(b)


# ---------------------------------------------------------------------------
# Bundles


def read_to_end(data: bytes) -> None:
    reader = BundleReader(io.BytesIO(data), "fuzz.ebundle")
    for entry in reader.entries():
        if entry.codec and len(data) % 2:
            entry.skip()
        else:
            for _ in entry.chunks():
                pass
    assert reader.index is not None


def delta_model() -> make.Model:
    """The golden base with its layer replaced by one a delta entry rebuilds from a prerequisite."""
    m = make.base_model()
    base_tar, target_tar, ops = DELTA["base_tar"], DELTA["target_tar"], DELTA["ops"]
    head: DeltaHead = DELTA["head"]
    chains = chain_ids([make.sha(base_tar), make.sha(target_tar)])
    m.header["required_features"] = ["tar-delta-v1"]
    m.header["prerequisites"] = [{"chain_id": chains[0], "diff_id": make.sha(base_tar),
                                  "digest": make.sha(b"base blob")}]
    layer = m.index["images"][0]["layers"][0]
    m.index["images"][0]["layers"] = [
        dict(layer, digest=make.sha(b"base blob"), diff_id=make.sha(base_tar)),
        dict(layer, digest=make.sha(b"target blob"), diff_id=make.sha(target_tar))]
    m.entries[0] = make.Entry(
        {"kind": "delta", "digest": make.sha(ops), "size": len(ops), "codec": 0,
         "target": head.target, "target_size": head.target_size,
         "bases": [{"chain_id": chains[0], "diff_id": make.sha(base_tar), "tar": True}]},
        [ops[i:i + 300] for i in range(0, len(ops), 300)])
    return m


def _delta_fixture() -> Dict[str, Any]:
    def tar_of(files: Dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tf.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    from edgebundle.delta import Base, encode
    from edgebundle.tarscan import scan
    rng = random.Random(SEED)
    old = {f"d/f{i}": rng.randbytes(rng.choice((10, 700, 3000))) for i in range(6)}
    new = dict(old)
    new["d/f1"] = old["d/f1"][:300] + b"changed" + old["d/f1"][300:]
    new["d/new"] = b"new file\n" * 20
    base_tar, target_tar = tar_of(old), tar_of(new)
    base = Base(BaseLayer(chain_ids([make.sha(base_tar)])[0], make.sha(base_tar), True),
                scan(io.BytesIO(base_tar)), lambda: io.BytesIO(base_tar))
    out = io.BytesIO()
    enc = encode(io.BytesIO(target_tar), scan(io.BytesIO(target_tar)), make.sha(target_tar), [base], out)
    return {"base_tar": base_tar, "target_tar": target_tar, "files": old, "ops": out.getvalue(),
            "head": enc.head}


DELTA = _delta_fixture()
BUNDLES = {"blob": make.BASE, "delta": make.assemble(delta_model())}


def test_the_fuzz_bases_are_valid() -> None:
    for data in BUNDLES.values():
        read_to_end(data)
    assert b"".join(rebuild_delta(DELTA["ops"], DELTA["head"])) == DELTA["target_tar"]


@pytest.mark.parametrize("kind", sorted(BUNDLES))
def test_fuzz_bundle_bytes(kind: str, tmp_path: Path) -> None:
    base = BUNDLES[kind]
    refused = 0
    for i, rng in cases(5000):
        data = mutate_bytes(base, rng, donor=BUNDLES["blob"])
        if data == base:
            continue
        refused += only_edgebundle_errors(i, lambda: read_to_end(data), data)
        if i % 50 == 0:  # inspect's seeking reader, on a file
            path = tmp_path / "f.ebundle"
            path.write_bytes(data)
            only_edgebundle_errors(i, lambda: read_index(path), data)
    assert ONLY is not None or refused > 4000  # damage is refused, not waved through


@pytest.mark.parametrize("kind", sorted(BUNDLES))
def test_fuzz_bundle_records(kind: str) -> None:
    """Records mutated and re-checksummed, so the record rules (not the xxh3s) must refuse."""
    for i, rng in cases(2000):
        m = delta_model() if kind == "delta" else make.base_model()
        target = rng.choice(("header", "index", "entry", "entry", "chunks"))
        if target == "header":
            m.header = mutate_tree(m.header, rng)
        elif target == "index":
            m.index = mutate_tree(m.index, rng)
        elif target == "entry":
            e = rng.choice(m.entries)
            e.head = mutate_tree(e.head, rng)
        else:
            e = rng.choice(m.entries)
            j = rng.randrange(len(e.chunks))
            e.chunks[j] = mutate_bytes(e.chunks[j], rng) or b"\x00"
        try:
            data = make.assemble(m)
        except (TypeError, ValueError, KeyError, OverflowError):
            continue  # not even msgpack-serialisable (or the assembler needs the key)
        only_edgebundle_errors(i, lambda: read_to_end(data), m.header)


def test_fuzz_record_bodies_as_msgpack() -> None:
    """Random msgpack bodies under a valid frame: the decoder's bounds and the parsers."""
    m = make.base_model()
    for i, rng in cases(10000):
        body = mutate_bytes(msgpack.packb(m.header), rng)
        raw = (make.MAGIC + b"\x00\x01" + bytes([make.TAG_HEADER]) + make.U32.pack(len(body)) + body
               + make.U64.pack(make.xxhash.xxh3_64_intdigest(body)))
        only_edgebundle_errors(i, lambda: BundleReader(io.BytesIO(raw), "f"), body)


# ---------------------------------------------------------------------------
# Delta op streams on in-memory bases


class MemTree:
    describe = "memory"

    def __init__(self, files: Dict[str, bytes]) -> None:
        self.files = files

    def open(self, path: str) -> io.BytesIO:
        if path not in self.files:
            raise FileNotFoundError(2, "No such file or directory")
        return io.BytesIO(self.files[path])


def rebuild_delta(ops: bytes, head: DeltaHead) -> Iterator[bytes]:
    tars: List[Optional[io.BytesIO]] = [io.BytesIO(DELTA["base_tar"])]
    return rebuild(head, [ops[k:k + 777] for k in range(0, len(ops), 777)],
                   [MemTree(DELTA["files"])], "fuzz delta", tars)


def test_fuzz_delta_op_streams() -> None:
    ops, head = DELTA["ops"], DELTA["head"]
    decoded = list(msgpack.Unpacker(io.BytesIO(ops), raw=False))
    for i, rng in cases(10000):
        if rng.random() < 0.5:
            data = mutate_bytes(ops, rng)
        else:  # op-level: one op's field replaced, the stream re-encoded
            stream = copy.deepcopy(decoded)
            j = rng.randrange(len(stream))
            stream[j] = mutate_tree(stream[j], rng) if rng.random() < 0.8 else \
                rng.choice(stream)
            try:
                data = b"".join(msgpack.packb(o, use_bin_type=True) for o in stream)
            except (TypeError, ValueError, OverflowError):
                continue
        h = head if rng.random() < 0.8 else DeltaHead(head.target, rng.choice(
            (0, 1, head.target_size - 1, head.target_size + 1, 2 ** 40)), head.bases)
        only_edgebundle_errors(i, lambda: b"".join(rebuild_delta(data, h)), data)


# ---------------------------------------------------------------------------
# Inventory reports


def _report() -> Dict[str, Any]:
    diffs = [make.sha(b"layer %d" % j) for j in range(3)]
    chains = list(chain_ids(diffs))
    return {"version": 1, "kind": "edgebundle-inventory", "generated_at": "2026-11-22T12:00:00Z",
            "host": "gw-01", "site": "gw-01", "runtime": {"kind": "containerd", "namespace": "k8s.io"},
            "images": [{"name": "example.test/shop/app:v2", "config": make.sha(b"c"),
                        "target": {"mediaType": "m", "digest": make.sha(b"t"), "size": 12},
                        "manifest": make.sha(b"m"), "platform": "linux/arm64", "complete": True,
                        "layers": [{"diff_id": d, "digest": make.sha(d.encode()), "size": 1,
                                    "blob": True, "unpacked": True, "tar": True} for d in diffs]}],
            "blobs": sorted(make.sha(d.encode()) for d in diffs), "chains": chains,
            "features": ["tar-delta-v1"], "extra": {"snapshotter": "overlayfs"}}


def record(text: str) -> None:
    inventory_from_json(parse_json_object(text, "report", "hint"))


def test_fuzz_reports() -> None:
    base = _report()
    record(json.dumps(base))
    text = json.dumps(base)
    for i, rng in cases(5000):
        if rng.random() < 0.5:
            data = mutate_bytes(text.encode(), rng).decode("utf-8", "replace")
        else:
            try:
                data = json.dumps(mutate_tree(base, rng))
            except (TypeError, ValueError):
                continue
            if rng.random() < 0.05:
                data = "[" * rng.randrange(1000, 200_000) + data
        only_edgebundle_errors(i, lambda: record(data), data)


# ---------------------------------------------------------------------------
# Signed bundles, read under a trust policy (the verifier runs before any entry)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    sys.path.insert(0, str(ROOT / "unit"))
    from test_pack_import import make_plan, pack
    from tiny_images import APP, BASE as BASE_FILES, Images

    from edgebundle.cache import BlobCache
    from edgebundle.trust import TrustPolicy, generate_key, load_public_key, load_signing_key
    tmp = tmp_path_factory.mktemp("fuzz-signed")
    gen = generate_key(str(tmp / "fleet"))
    built = Images(BlobCache(tmp / "cache"))
    img = built.image("example.test/shop/app:v1", [BASE_FILES, APP])
    out = tmp / "s.ebundle"
    pack(make_plan([img], "containerd"), built.cache, out, signers=[load_signing_key(gen.private_path)])
    policy = TrustPolicy((load_public_key(gen.public_path),), "/nonexistent")
    return {"data": out.read_bytes(), "policy": policy}


def read_signed(data: bytes, policy: Any) -> None:
    reader = BundleReader(io.BytesIO(data), "fuzz.ebundle", verifier=policy.admit)
    for entry in reader.entries():
        entry.skip()


def reforged(data: bytes) -> bytes:
    """Index offsets and footer recomputed after a record changed length, as a forger would."""
    import forge
    try:
        recs = forge.records(data)
        tag, start, _, body = recs[-1]
        if tag != make.TAG_INDEX or not isinstance(body, dict) or not isinstance(body.get("entries"), list):
            return data
        offsets = [r[1] for r in recs if r[0] == make.TAG_ENTRY]
        for e, off in zip(body["entries"], offsets):
            if isinstance(e, dict):
                e["offset"] = off
        out = data[:start] + forge.record_bytes(make.TAG_INDEX, body)
        return forge.refooter(out + b"F" + bytes(32))
    except Exception:  # the forger's parser gave up on this damage: keep it as it is
        return data


def test_fuzz_signed_bundles(signed: Dict[str, Any]) -> None:
    """Raw damage, and records edited and re-checksummed as a forger would (not re-signed)."""
    import forge
    data, policy = signed["data"], signed["policy"]
    read_signed(data, policy)
    recs = forge.records(data)
    accepted: List[int] = []
    for i, rng in cases(2500):
        if rng.random() < 0.5:
            bad = mutate_bytes(data, rng)
        else:
            tag, start, end, body = rng.choice(recs)
            chunks = data[start + 5 + len(msgpack.packb(body, use_bin_type=True)) + 8:end]
            try:  # only damage: an unknown key or a repeated signature leaves it valid, by design
                new = forge.record_bytes(tag, mutate_tree(body, rng, may_stay_valid=False)) + chunks
            except (TypeError, ValueError, OverflowError):
                continue
            bad = reforged(data[:start] + new + data[end:])
        if bad != data and not only_edgebundle_errors(i, lambda: read_signed(bad, policy), bad[:64]):
            accepted.append(i)
    assert not accepted, f"damaged signed bundles were accepted: cases {accepted[:10]}"
