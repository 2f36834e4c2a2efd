"""Property tests of volumes: split then join is the identity at every size and every edge;
any flipped byte of a set is refused, and one in a volume's payload names that volume."""

from __future__ import annotations

import io
import random
import sys
from pathlib import Path
from typing import BinaryIO, Iterator, List, Tuple, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgebundle import volumeset
from edgebundle.cache import BlobCache
from edgebundle.errors import BundleFormatError
from edgebundle.format import VOLUME_HEAD_SIZE, BundleReader
from edgebundle.format.framing import U32
from edgebundle.format.volumes import (OVERHEAD, JoinedVolumes, VolumeHead, VolumeSource,
                                       VolumeSplitter)
from edgebundle.holdings import Inventory
from edgebundle.pack import write_bundle
from edgebundle.plan import plan_bundle
from edgebundle.usecases.device import open_bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from tiny_images import Images  # noqa: E402

SETTINGS = settings(derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def split_bytes(data: bytes, volume_size: int) -> Tuple[List[bytes], List[VolumeHead]]:
    """The volume files ``VolumeSplitter`` writes, in memory, with their final headers."""
    files: List[io.BytesIO] = []
    closed: List[bytes] = []

    def create(number: int) -> BinaryIO:
        assert number == len(files) + 1
        files.append(io.BytesIO())
        return cast(BinaryIO, files[-1])

    def close(number: int, fh: BinaryIO) -> None:
        closed.append(cast(io.BytesIO, fh).getvalue())

    splitter = VolumeSplitter(volume_size, create, close)
    view = memoryview(data)
    rnd = random.Random(len(data) * 31 + volume_size)
    while view:  # writes of random sizes: the cut must not depend on them
        n = rnd.randint(1, 5000)
        splitter.write(bytes(view[:n]))
        view = view[n:]
    heads = splitter.finish()
    assert len(closed) == len(heads)
    return [h.pack() + c[VOLUME_HEAD_SIZE:] for h, c in zip(heads, closed)], heads


def join(volumes: List[bytes]) -> JoinedVolumes:
    stream = io.BytesIO(b"".join(volumes))
    sources = (VolumeSource(f"volume {i}", cast(BinaryIO, stream), alone=False, owned=False)
               for i in range(1, 1 << 30))
    return JoinedVolumes(sources, lambda n, c: f"volume {n} of {c} is missing")


def read_all(joined: JoinedVolumes, rnd: random.Random) -> bytes:
    out = []
    while True:
        piece = joined.read(rnd.choice([1, 7, 4096, 1 << 20]))
        if not piece:
            return b"".join(out)
        out.append(piece)


@SETTINGS
@given(st.binary(min_size=1, max_size=6000), st.integers(min_value=1, max_value=7000))
def test_split_then_join_is_the_identity(data: bytes, capacity: int) -> None:
    volumes, heads = split_bytes(data, capacity + OVERHEAD)
    assert len(volumes) == -(-len(data) // capacity)  # ceil: no empty volume, none too many
    assert all(len(v) == capacity + OVERHEAD for v in volumes[:-1])
    assert 0 < len(volumes[-1]) - OVERHEAD <= capacity
    assert [h.number for h in heads] == list(range(1, len(heads) + 1))
    assert read_all(join(volumes), random.Random(capacity)) == data


def test_one_byte_payloads() -> None:
    data = bytes(range(256)) * 2
    volumes, heads = split_bytes(data, OVERHEAD + 1)
    assert len(volumes) == 512 and all(h.length == 1 for h in heads)
    assert read_all(join(volumes), random.Random(1)) == data


def test_a_volume_size_without_room_is_refused() -> None:
    with pytest.raises(ValueError, match="leaves no room"):
        split_bytes(b"x", OVERHEAD)


def bundle(tmp: Path, layer_bytes: int) -> bytes:
    images = Images(BlobCache(tmp / f"cache-{layer_bytes}"))
    rnd = random.Random(layer_bytes)
    img = images.image("example.test/a:v1", [{"f": rnd.randbytes(layer_bytes)},
                                             {"g": b"g"}])
    plan = plan_bundle("s", [img], Inventory.empty("docker", None), runtime="docker",
                       namespace=None, platform="linux/amd64")
    out = io.BytesIO()
    write_bundle(plan, images.cache, out, level=1, created="2026-01-01T00:00:00Z")
    return out.getvalue()


def verify_joined(volumes: List[bytes]) -> int:
    reader = BundleReader(cast(BinaryIO, join(volumes)), "b")
    for entry in reader.entries():
        entry.skip()
    assert reader.total_size is not None
    return reader.total_size


def test_every_split_size_of_a_small_bundle(tmp_path: Path) -> None:
    data = bundle(tmp_path, 200)
    assert 1000 < len(data) < 4000
    for capacity in range(1, len(data) + 2):
        volumes, _ = split_bytes(data, capacity + OVERHEAD)
        assert verify_joined(volumes) == len(data), capacity


def edges(data: bytes) -> Iterator[int]:
    """Every record and chunk boundary of a bundle (walking the framing of FORMAT.md)."""
    pos = 10  # magic + version
    while True:
        yield pos
        tag = data[pos]
        if tag == 0x46:  # footer
            yield pos + 1
            yield pos + 9
            yield len(data) - 8
            return
        (n,) = U32.unpack(data[pos + 1:pos + 5])
        pos += 5 + n + 8
        if tag != 0x45:
            continue
        while True:  # the entry's chunks
            yield pos
            (n,) = U32.unpack(data[pos:pos + 4])
            pos += 4
            if n == 0:
                break
            yield pos + 8
            pos += 8 + n


def test_volume_boundaries_at_every_record_and_chunk_edge(tmp_path: Path) -> None:
    data = bundle(tmp_path, 1_300_000)  # its layer entry is two chunks
    found = sorted(set(edges(data)))
    assert len(found) > 15
    for edge in found:
        for capacity in {edge - 1, edge, edge + 1} - {0}:
            volumes, _ = split_bytes(data, capacity + OVERHEAD)
            assert verify_joined(volumes) == len(data), (edge, capacity)


@pytest.fixture(scope="module")
def volume_set(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, List[bytes]]:
    tmp = tmp_path_factory.mktemp("vprop")
    data = bundle(tmp, 60_000)
    volumes, _ = split_bytes(data, 25_000)
    assert len(volumes) >= 3
    return tmp, volumes


@settings(SETTINGS, max_examples=150)
@given(st.data())
def test_any_flipped_byte_is_refused_and_a_payload_flip_names_its_volume(
        volume_set: Tuple[Path, List[bytes]], data: st.DataObject) -> None:
    tmp, volumes = volume_set
    which = data.draw(st.integers(0, len(volumes) - 1))
    offset = data.draw(st.integers(0, len(volumes[which]) - 1))
    bit = data.draw(st.integers(0, 7))
    d = tmp / f"case-{which}-{offset}-{bit}"
    d.mkdir(exist_ok=True)
    paths = []
    for i, v in enumerate(volumes):
        raw = bytearray(v)
        if i == which:
            raw[offset] ^= 1 << bit
        paths.append(d / f"b.ebundle.{i + 1:03d}")
        paths[-1].write_bytes(bytes(raw))
    with pytest.raises(BundleFormatError) as caught:
        with open_bundle(str(paths[0])) as fh:
            reader = BundleReader(fh, str(paths[0]))
            for entry in reader.entries():
                entry.skip()
    if offset >= VOLUME_HEAD_SIZE:  # payload or trailer: the volume itself is named
        assert f"volume {paths[which]} (volume {which + 1} of {len(volumes)}) is damaged" \
            in str(caught.value)
    assert "\n" not in str(caught.value)
