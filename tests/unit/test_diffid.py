"""The diff_id learnt while a layer streams in (``diffid``, ``BlobCache.writer``), and
parallel downloads that stop at the first failure (``Resolver.fetch_layers``)."""

from __future__ import annotations

import gzip
import os
import threading
import time
from pathlib import Path
from typing import Iterator, List

import httpx
import pytest
import zstandard

from edgebundle.cache import BlobCache, DigestMismatch
from edgebundle.diffid import BackgroundDiffId, DiffIdStream, TarDigest
from edgebundle.errors import ResolveError
from edgebundle.oci import MT_OCI_LAYER, MT_OCI_LAYER_GZIP, MT_OCI_LAYER_ZSTD, sha256_digest
from edgebundle.registry import RegistryClient
from edgebundle.resolve import Resolver

from test_resolve import AMD64, Image, Registry, build_image, layer_tar, spec

TAR = os.urandom(300_000) + b"text " * 400_000  # 2.3 MB: several IO_CHUNKs out of one chunk in


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _stream(blob: bytes, media_type: str, piece: int, background: bool = False) -> object:
    if background:
        with BackgroundDiffId(media_type, depth=2) as b:
            for p in _pieces(blob, piece):
                b.feed(p)
            return b.result()
    s = DiffIdStream(media_type)
    for p in _pieces(blob, piece):
        s.feed(p)
    return s.result()


def _diffid_threads() -> List[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "diffid"]


EXPECTED = TarDigest(sha256_digest(TAR), len(TAR))
GZ = gzip.compress(TAR, mtime=0)
ZST = zstandard.ZstdCompressor().compress(TAR)


@pytest.mark.parametrize("piece", [7, 4096, 1 << 20, 1 << 24])  # 7: every header split
@pytest.mark.parametrize("blob,media_type", [
    (GZ, MT_OCI_LAYER_GZIP),
    (gzip.compress(TAR[:1000], mtime=0) + gzip.compress(TAR[1000:], mtime=0), MT_OCI_LAYER_GZIP),  # multi-member
    (ZST, MT_OCI_LAYER_ZSTD),
    (zstandard.ZstdCompressor().compress(TAR[:5]) + zstandard.ZstdCompressor().compress(TAR[5:]),
     MT_OCI_LAYER_ZSTD),  # two frames
    (TAR, MT_OCI_LAYER),
    (GZ, "application/octet-stream"),  # media type says nothing: the magic bytes decide
])
def test_any_split_gives_the_tar_digest(blob: bytes, media_type: str, piece: int) -> None:
    assert _stream(blob, media_type, piece) == EXPECTED


@pytest.mark.parametrize("piece", [7, 65536, 1 << 24])
@pytest.mark.parametrize("blob,media_type", [(GZ, MT_OCI_LAYER_GZIP), (ZST, MT_OCI_LAYER_ZSTD), (TAR, MT_OCI_LAYER)])
def test_on_its_own_thread_the_same_digest(blob: bytes, media_type: str, piece: int) -> None:
    assert _stream(blob, media_type, piece, background=True) == EXPECTED
    assert _stream(GZ[:len(GZ) // 2], MT_OCI_LAYER_GZIP, piece, background=True) is None
    assert _diffid_threads() == []


def test_abandoned_background_stops_even_with_a_full_queue() -> None:
    """A download failing mid-blob leaves without result(): the thread skips what is
    queued and ends, rather than inflating the rest or blocking the caller."""
    b = BackgroundDiffId(MT_OCI_LAYER_GZIP, depth=4)
    real = b._stream.feed
    fed: List[int] = []

    def slow(data: bytes) -> None:
        fed.append(len(data))
        time.sleep(0.2)
        real(data)

    b._stream.feed = slow  # type: ignore[method-assign]
    for p in list(_pieces(GZ, 4096))[:6]:  # 1 being inflated, 4 queued, the 6th waits for room
        b.feed(p)
    started = time.monotonic()
    b.close()
    assert time.monotonic() - started < 0.6  # not the 5 x 0.2 s still queued
    assert len(fed) <= 3 and _diffid_threads() == []


def test_background_error_is_raised_by_result() -> None:
    b = BackgroundDiffId(MT_OCI_LAYER_GZIP)

    def boom(data: bytes) -> None:
        raise MemoryError("no room")

    b._stream.feed = boom  # type: ignore[method-assign]
    b.feed(GZ[:4096])
    b.feed(GZ[4096:8192])
    with pytest.raises(MemoryError):
        b.result()
    b.close()
    assert _diffid_threads() == []


@pytest.mark.parametrize("blob", [
    GZ[:len(GZ) // 2],  # cut inside the member
    GZ[:10] + b"\xff" * 50 + GZ[60:],  # garbage in the deflate stream
    b"\x1f\x8b",  # a gzip magic and nothing else
])
def test_undecompressible_gives_none(blob: bytes) -> None:
    assert _stream(blob, MT_OCI_LAYER_GZIP, 4096) is None


def test_tiny_uncompressed_blob() -> None:
    assert _stream(b"ab", MT_OCI_LAYER, 1) == TarDigest(sha256_digest(b"ab"), 2)


def test_writer_records_layer_info_only_for_a_verified_blob(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digest = sha256_digest(GZ)
    with pytest.raises(DigestMismatch):
        with cache.writer(digest, len(GZ), MT_OCI_LAYER_GZIP) as out:
            out.write(GZ[:-1] + bytes([GZ[-1] ^ 1]))
    assert not cache.has(digest) and cache.layer_info(digest) is None
    assert list((tmp_path / "tmp").iterdir()) == []
    assert _diffid_threads() == []  # the inflate thread ended with the failed write
    with cache.writer(digest, len(GZ), MT_OCI_LAYER_GZIP) as out:
        for p in _pieces(GZ, 65536):
            out.write(p)
    assert cache.layer_info(digest) == (EXPECTED.diff_id, EXPECTED.tar_size)
    # without a media type it is just a blob
    other = sha256_digest(ZST)
    with cache.writer(other, len(ZST)) as out:
        out.write(ZST)
    assert cache.has(other) and cache.layer_info(other) is None


def test_jobs_must_be_positive(tmp_path: Path) -> None:
    from edgebundle.errors import UsageError
    with pytest.raises(UsageError, match="--jobs 0"):
        Resolver(BlobCache(tmp_path), None, jobs=0)


def _with_layer(img: Image, i: int, tar: bytes, blob: bytes) -> Image:
    """``img`` with layer ``i`` replaced (config diff_ids and manifest rewritten)."""
    import json
    config = json.loads(img.config)
    config["rootfs"]["diff_ids"][i] = sha256_digest(tar)
    config_bytes = json.dumps(config).encode()
    manifest = json.loads(img.manifest)
    manifest["config"].update(digest=sha256_digest(config_bytes), size=len(config_bytes))
    manifest["layers"][i].update(digest=sha256_digest(blob), size=len(blob))
    layers, tars = list(img.layers), list(img.tars)
    layers[i], tars[i] = blob, tar
    return Image(json.dumps(manifest).encode(), config_bytes, layers, tars)


def test_a_failed_download_abandons_those_in_flight(tmp_path: Path) -> None:
    """One layer 404s while another is still streaming: the pack fails at once with the
    404's error; the streaming one stops at its next chunk and leaves no temp file."""
    reg = Registry()
    img = build_image(marker="abandon")
    # the first layer: 4 MB of noise, so that it streams in several 1 MiB chunks
    noise = layer_tar("noise", os.urandom(4_000_000))
    img = _with_layer(img, 0, noise, gzip.compress(noise, mtime=0))
    reg.push("v1", img)
    slow_digest = sha256_digest(img.layers[0])
    gone_digest = sha256_digest(img.layers[1])
    sent: List[int] = []
    first_chunk = threading.Event()
    base = reg.handle

    def slow_body() -> Iterator[bytes]:
        data = img.layers[0]
        for i in range(0, len(data), 65536):  # 64 KiB per 50 ms: 3 s if never stopped
            sent.append(i)
            if i >= 1 << 20:
                first_chunk.set()  # a first 1 MiB chunk has reached the cache writer
            yield data[i:i + 65536]
            time.sleep(0.05)

    def handler(request: httpx.Request) -> httpx.Response:
        last = request.url.path.split("/")[-1]
        if last == slow_digest:
            return httpx.Response(200, content=slow_body())
        if last == gone_digest:
            first_chunk.wait(10)  # fail while the other is mid-stream
            return httpx.Response(404, json={"errors": [{"code": "BLOB_UNKNOWN", "message": "gone"}]})
        return base(request)

    client = RegistryClient(transport=httpx.MockTransport(handler), retries=0, sleep=lambda s: None)
    cache = BlobCache(tmp_path)
    resolver = Resolver(cache, client, jobs=3)
    resolved = resolver.resolve(spec("reg.test/shop/app:v1"), AMD64)
    started = time.monotonic()
    with pytest.raises(ResolveError) as err:
        resolver.fetch_layers([resolved], {la.digest for la in resolved.layers})
    assert gone_digest in err.value.message and "not found" in err.value.message
    assert time.monotonic() - started < 10
    assert len(sent) < len(img.layers[0]) // 65536  # stopped, not finished
    assert not cache.has(slow_digest) and not cache.has(gone_digest)
    assert list((tmp_path / "tmp").iterdir()) == []
