"""The encoded-entry cache: a layer is compressed once across packs, the bundles stay
byte-identical to uncached ones, and a cached entry is checked before it ships."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List

import pytest
import zstandard

from edgebundle.cache import BlobCache
from edgebundle.encoded import EncodedCache
from edgebundle.errors import CacheError
from edgebundle.format import CODEC_STORED, CODEC_ZSTD, MAX_CHUNK_SIZE, BundleWriter
from edgebundle.format import writer as writer_mod
from edgebundle.format.writer import EncodedRefused, EntryMismatch, Encoding
from edgebundle.image import ResolvedImage
from edgebundle.pack import write_bundle
from edgebundle.plan import Plan
from edgebundle.trust import generate_key, load_public_key, load_signing_key, TrustPolicy
from edgebundle.usecases.device import verify_bundle
from test_pack_import import make_plan
from tiny_images import APP, BASE, TOOL, Images, sha

CREATED = "2026-12-01T10:00:00Z"


def big_files(seed: int, size: int = 2_600_000) -> Dict[str, bytes]:
    """A layer whose zstd frame spans several 1 MiB chunks (random, so it barely shrinks)."""
    return {f"data/blob{seed}.bin": random.Random(seed).randbytes(size)}


@pytest.fixture
def built(tmp_path: Path) -> Images:
    return Images(BlobCache(tmp_path / "cache"))


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> List[int]:
    """Sizes of the entries zstd-encoded (the writer's one compressor entry point)."""
    seen: List[int] = []
    real = writer_mod._zstd_chunks

    def counting(cctx: Any, pieces: Iterable[bytes], chunk_size: int, size: int) -> Iterable[bytes]:
        seen.append(size)
        return real(cctx, pieces, chunk_size, size)

    monkeypatch.setattr(writer_mod, "_zstd_chunks", counting)
    return seen


def images(built: Images) -> List[ResolvedImage]:
    return [built.image("example.test/shop/app:v1", [BASE, big_files(1), APP]),
            built.image("example.test/shop/tool:v2", [BASE, TOOL])]


def pack_bytes(plan: Plan, cache: BlobCache, **kw: Any) -> bytes:
    out = io.BytesIO()
    kw.setdefault("level", 3)
    write_bundle(plan, cache, out, created=CREATED, **kw)
    return out.getvalue()


def layer_sizes(imgs: List[ResolvedImage]) -> List[int]:
    """The tar size of each distinct layer (what the writer zstd-encodes for Docker)."""
    return sorted({l.diff_id: l.tar_size for img in imgs for l in img.layers}.values())


def cached_files(cache: BlobCache) -> List[Path]:
    return sorted((cache.root / "encoded").glob("*.zst"))


def test_second_pack_reuses_every_layer_and_is_byte_identical(built: Images,
                                                              encodes: List[int]) -> None:
    imgs = images(built)
    plan = make_plan(imgs, "docker")
    plain = pack_bytes(plan, built.cache, encoded=False)
    assert sorted(s for s in encodes if s in layer_sizes(imgs)) == layer_sizes(imgs)
    encodes.clear()
    first = pack_bytes(plan, built.cache)
    assert len(cached_files(built.cache)) == len(layer_sizes(imgs))  # layers only, not JSON
    encodes.clear()
    second = pack_bytes(plan, built.cache)
    assert not [s for s in encodes if s in layer_sizes(imgs)]  # no layer compressed again
    assert plain == first == second
    assert verify_bundle_bytes(second, built.cache.root)


def verify_bundle_bytes(data: bytes, where: Path) -> bool:
    path = where / "check.ebundle"
    path.write_bytes(data)
    verify_bundle(str(path))  # raises on any fault
    return True


def test_another_state_reuses_the_layers_it_shares(built: Images, encodes: List[int]) -> None:
    app = built.image("example.test/shop/app:v1", [BASE, big_files(1), APP])
    tool = built.image("example.test/shop/tool:v2", [BASE, TOOL])
    pack_bytes(make_plan([app], "docker"), built.cache)
    encodes.clear()
    data = pack_bytes(make_plan([app, tool], "docker"), built.cache)
    tool_only = [l.tar_size for l in tool.layers if l.diff_id not in {a.diff_id for a in app.layers}]
    assert tool_only and sorted(s for s in encodes if s in layer_sizes([app, tool])) == tool_only
    assert data == pack_bytes(make_plan([app, tool], "docker"), built.cache, encoded=False)


def test_another_level_is_another_key(built: Images, encodes: List[int]) -> None:
    imgs = images(built)
    plan = make_plan(imgs, "docker")
    pack_bytes(plan, built.cache, level=3)
    encodes.clear()
    at4 = pack_bytes(plan, built.cache, level=4)
    assert sorted(s for s in encodes if s in layer_sizes(imgs)) == layer_sizes(imgs)
    assert len(cached_files(built.cache)) == 2 * len(layer_sizes(imgs))
    assert at4 == pack_bytes(plan, built.cache, level=4, encoded=False)
    head = BundleWriter.heads(3).blob(sha(b"x"), 1, codec=CODEC_ZSTD)
    store = EncodedCache(built.cache.root / "encoded")
    base = Encoding(3, 1 << 20, 23)
    assert len({store.path(head, e) for e in (base, Encoding(4, 1 << 20, 23),
                                              Encoding(3, 1 << 19, 23), Encoding(3, 1 << 20, 22),
                                              Encoding(3, 1 << 20, 23, "other-zstd"))}) == 5


def damage_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def damage_append_frame(path: Path) -> None:
    path.write_bytes(path.read_bytes() + zstandard.ZstdCompressor().compress(b""))


def damage_other_content(path: Path) -> None:
    path.write_bytes(zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 5000))


@pytest.mark.parametrize("damage", [damage_flip, damage_truncate, damage_append_frame,
                                    damage_other_content])
def test_damaged_cached_entry_is_discarded_and_encoded_again(built: Images, encodes: List[int],
                                                             damage: Any) -> None:
    imgs = images(built)
    plan = make_plan(imgs, "docker")
    plain = pack_bytes(plan, built.cache, encoded=False)
    pack_bytes(plan, built.cache)
    big = max(cached_files(built.cache), key=lambda p: p.stat().st_size)
    good = big.read_bytes()
    damage(big)
    encodes.clear()
    data = pack_bytes(plan, built.cache)
    assert [s for s in encodes if s in layer_sizes(imgs)] == [max(layer_sizes(imgs))]
    assert data == plain and verify_bundle_bytes(data, built.cache.root)
    assert big.read_bytes() == good  # encoded afresh and kept again


def test_signed_bundles_cached_and_not_are_identical_and_verify(tmp_path: Path, built: Images) -> None:
    gen = generate_key(str(tmp_path / "fleet"))
    signer = load_signing_key(gen.private_path)
    plan = make_plan(images(built), "docker")
    plain = pack_bytes(plan, built.cache, signers=[signer], encoded=False)
    pack_bytes(plan, built.cache, signers=[signer])
    cached = pack_bytes(plan, built.cache, signers=[signer])
    assert cached == plain  # ed25519 signatures are deterministic
    path = tmp_path / "signed.ebundle"
    path.write_bytes(cached)
    trust = TrustPolicy((load_public_key(gen.public_path),), "/nonexistent")
    assert verify_bundle(str(path), trust).signed_by == signer.key_id


def test_an_unwritable_cache_only_costs_time(built: Images, encodes: List[int],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan(images(built), "docker")
    plain = pack_bytes(plan, built.cache, encoded=False)

    def no_space(*a: Any, **kw: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edgebundle.encoded.atomic_file", no_space)
    assert pack_bytes(plan, built.cache) == plain
    assert cached_files(built.cache) == []


# --- the writer's add_encoded / tee -------------------------------------------------------


class Captured:
    """One entry's record and stored chunks, as a writer's tee saw them."""

    def __init__(self, data: bytes, level: int = 3, codec: int = CODEC_ZSTD) -> None:
        self.head = BundleWriter.heads(level).blob(sha(data), len(data), codec=codec)
        self.chunks: List[bytes] = []
        writer = new_writer(level)
        writer.add_blob(self.head.digest, self.head.size, [data], codec=codec,
                        tee=self.chunks.append)
        self.bundle = writer_bytes(writer)


def new_writer(level: int = 3, chunk_size: int = 1 << 20) -> BundleWriter:
    from edgebundle.format import Header
    header = Header(site="gw", runtime="docker", namespace=None, platform="linux/amd64",
                    layer_form="tar", prerequisites=(), images=(), content_bytes=0,
                    created=CREATED, tool="test")
    return BundleWriter(io.BytesIO(), header, level=level, chunk_size=chunk_size)


def writer_bytes(writer: BundleWriter) -> bytes:
    writer.finish([])
    out: Any = writer._out.raw
    return bytes(out.getvalue())


DATA = random.Random(7).randbytes(4_500_000) + b"\0" * 1_000_000


def test_add_encoded_writes_what_add_blob_wrote() -> None:
    for codec in (CODEC_ZSTD, CODEC_STORED):
        cap = Captured(DATA, codec=codec)
        assert len(cap.chunks) > 1
        writer = new_writer()
        writer.add_encoded(cap.head, lambda: iter(cap.chunks))
        assert writer_bytes(writer) == cap.bundle


def refused(head: Any, chunks: List[bytes], match: str, level: int = 3) -> None:
    writer = new_writer(level)
    before = writer._out.offset
    with pytest.raises(EncodedRefused, match=match):
        writer.add_encoded(head, lambda: iter(chunks))
    assert writer._out.offset == before and writer.entries == []  # nothing written


def test_add_encoded_refuses_what_is_not_the_entry_before_writing_a_byte() -> None:
    cap = Captured(DATA)
    frame = b"".join(cap.chunks)
    refused(cap.head, cap.chunks[:-1], "ends inside its zstd frame")
    refused(cap.head, cap.chunks[:1] + [b""] + cap.chunks[1:], "chunk of 0 bytes")
    refused(cap.head, [frame], f"chunk of {len(frame)} bytes, not 1..{MAX_CHUNK_SIZE}")
    refused(cap.head, cap.chunks + [zstandard.ZstdCompressor().compress(b"")],
            "data after its zstd frame")
    other = Captured(DATA[:-1])
    refused(cap.head, other.chunks, "decodes to")
    longer = Captured(DATA + b"!")
    refused(cap.head, longer.chunks, "more than its")
    stored = Captured(DATA, codec=CODEC_STORED)
    refused(stored.head, stored.chunks[:-1], "decodes to")


def test_add_encoded_refuses_a_head_at_another_level() -> None:
    cap = Captured(DATA, level=3)
    with pytest.raises(ValueError, match="level 3, the writer at 5"):
        new_writer(5).add_encoded(cap.head, lambda: iter(cap.chunks))


def test_add_encoded_holds_the_second_pass_to_the_first() -> None:
    cap = Captured(DATA)
    passes: List[int] = []

    def changing() -> Iterator[bytes]:
        passes.append(1)
        if len(passes) == 1:
            return iter(cap.chunks)
        bad = list(cap.chunks)
        bad[1] = bytes([bad[1][0] ^ 1]) + bad[1][1:]
        return iter(bad)

    writer = new_writer()
    with pytest.raises(EntryMismatch, match="changed after the check"):
        writer.add_encoded(cap.head, changing)
    assert writer.entries == []  # the entry never completed


def test_a_failed_entry_leaves_nothing_cached(built: Images) -> None:
    imgs = images(built)
    big = max((l for l in imgs[0].layers), key=lambda l: l.tar_size)
    path = built.cache.path(big.digest)
    data = bytearray(path.read_bytes())
    data[-5000] ^= 0xFF  # inside the gzip stream: the tar it yields is not the diff_id
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError):
        pack_bytes(make_plan(imgs, "docker"), built.cache)
    assert not any(big.diff_id[7:] in p.name for p in cached_files(built.cache))
    assert not list((built.cache.root / "encoded").glob(".*.tmp"))


def test_deltas_are_cached_by_their_op_stream(built: Images, encodes: List[int]) -> None:
    from test_delta_plan import LIB_V1, LIB_V2, held
    from edgebundle.bases import DeltaPlanner
    v1 = built.image("example.test/app:v1", [BASE, LIB_V1])
    v2 = built.image("example.test/app:v2", [BASE, LIB_V2])
    plain = make_plan([v2], "containerd", held(v1))
    with DeltaPlanner(built.cache) as planner:
        plan = planner.apply(plain, held(v1))
        (delta,) = [lp.delta for lp in plan.images[0].layers if lp.delta is not None]
        uncached = pack_bytes(plan, built.cache, delta_ops=planner.ops, encoded=False)
        assert delta.size in encodes
        pack_bytes(plan, built.cache, delta_ops=planner.ops)
        encodes.clear()
        again = pack_bytes(plan, built.cache, delta_ops=planner.ops)
    assert delta.size not in encodes and again == uncached
    assert [p for p in cached_files(built.cache) if p.name.startswith(delta.entry[7:])]


def test_a_damaged_entry_is_removed_even_when_its_replacement_cannot_be_kept(
        built: Images, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan(images(built), "docker")
    pack_bytes(plan, built.cache)
    big = max(cached_files(built.cache), key=lambda p: p.stat().st_size)
    damage_flip(big)

    def no_space(*a: Any, **kw: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edgebundle.encoded.atomic_file", no_space)
    assert verify_bundle_bytes(pack_bytes(plan, built.cache), built.cache.root)
    assert not big.exists()  # not checked (and refused) again on every pack
