"""Raw speed of the stages a pack is made of, on the same layers, in the same run.

Each stage is timed alone over all layers of a data set, in 1 MiB pieces as the packer
streams them, on the calling thread (zstd with its worker threads, as ``pack`` runs it):

* ``fetch``    - HTTP GET of every layer blob from the local registry (loopback), read;
* ``sha256-gz`` - sha256 of the gzip blobs (cache verification, containerd entry digest);
* ``gunzip``   - zlib inflate of the blobs (diff_id check; Docker tar form);
* ``sha256-tar`` - sha256 of the uncompressed tars (diff_id; Docker entry digest);
* ``zstd-L``   - zstandard at the pack level with the writer's parameters
  (window_log 23, no checksum, content size, multi-threaded mode with one worker per
  CPU as ``pack`` uses by default), via the same chunker API; ``zstd-L, 1 worker``
  the same with one worker;
* ``xxh3``     - xxh3_64 of each 1 MiB stored chunk (what the writer checksums);
* ``zstd-L of the gzip blobs`` - not a pack stage: what recompressing the registry's
  gzip blobs would gain (FORMAT.md stores them as they are);
* ``write``    - writing the stored bytes to a file in the bundle directory + fsync.

Rates are given as MB/s of *image content* (uncompressed tar bytes of the layers), so
stages that process compressed bytes compare on the same scale as the pack itself.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import xxhash
import zstandard

PIECE = 1 << 20


def _pieces(data: bytes) -> List[memoryview]:
    mv = memoryview(data)
    return [mv[i:i + PIECE] for i in range(0, len(data), PIECE)]


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(blobs: Sequence[bytes], tars: Sequence[bytes], level: int, workdir: Path,
            registry: str = "", fetch_list: Sequence[Tuple[str, str]] = (),
            repeat: int = 1, threads: int = 1, extras: bool = True,
            one_worker: bool = True, zstd: bool = True) -> Dict[str, Dict[str, float]]:
    """Time each stage over ``blobs`` (gzip layers) / ``tars`` (their content).

    ``fetch_list``: ``(repository, digest)`` of each blob, to time registry reads.
    """
    content = sum(len(t) for t in tars)
    gz_bytes = sum(len(b) for b in blobs)
    out: Dict[str, Dict[str, float]] = {}

    def rec(name: str, seconds: float, input_bytes: int) -> None:
        out[name] = {"seconds": seconds, "input_mb": input_bytes / 1e6,
                     "input_mbps": input_bytes / 1e6 / seconds if seconds else 0.0,
                     "content_mbps": content / 1e6 / seconds if seconds else 0.0}

    if registry and fetch_list:
        host, _, port = registry.partition(":")

        def fetch() -> None:
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            for repo, d in fetch_list:
                conn.request("GET", f"/v2/{repo}/blobs/{d}")
                resp = conn.getresponse()
                if resp.status in (301, 302, 307):
                    resp.read()
                    conn.request("GET", resp.getheader("Location") or "")
                    resp = conn.getresponse()
                while resp.read(PIECE):
                    pass
            conn.close()
        rec("fetch", _best(fetch, repeat), gz_bytes)

    def sha_gz() -> None:
        for b in blobs:
            h = hashlib.sha256()
            for p in _pieces(b):
                h.update(p)
            h.hexdigest()
    rec("sha256-gz", _best(sha_gz, repeat), gz_bytes)

    def gunzip() -> None:
        for b in blobs:
            d = zlib.decompressobj(31)
            for p in _pieces(b):
                d.decompress(p)
            d.flush()
    rec("gunzip", _best(gunzip, repeat), gz_bytes)

    if extras:
        import gzip
        import io

        def gzipfile() -> None:
            for b in blobs:
                with gzip.GzipFile(fileobj=io.BytesIO(b)) as g:
                    while g.read(PIECE):
                        pass
        rec("gunzip via gzip.GzipFile (not a stage)", _best(gzipfile, repeat), gz_bytes)

    def sha_tar() -> None:
        for t in tars:
            h = hashlib.sha256()
            for p in _pieces(t):
                h.update(p)
            h.hexdigest()
    rec("sha256-tar", _best(sha_tar, repeat), content)

    def zstd_stage(name: str, workers: int) -> None:
        # the writer's parameters: zstd's multi-threaded mode with >= 1 worker
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=23, threads=max(1, workers), write_checksum=0, write_content_size=1)
        cctx = zstandard.ZstdCompressor(compression_params=params)
        zsize = [0]

        def zstd() -> None:
            total = 0
            for t in tars:
                ch = cctx.chunker(size=len(t), chunk_size=PIECE)
                for p in _pieces(t):
                    for c in ch.compress(p):
                        total += len(c)
                for c in ch.finish():
                    total += len(c)
            zsize[0] = total
        rec(name, _best(zstd, repeat), content)
        out[name]["output_mb"] = zsize[0] / 1e6

    if zstd:  # not a stage of a containerd pack, and the slowest to measure
        zstd_stage(f"zstd-{level}", threads)
    if extras and one_worker and threads != 1:
        zstd_stage(f"zstd-{level}, 1 worker", 1)
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=23, threads=max(1, threads), write_checksum=0, write_content_size=1)
    cctx = zstandard.ZstdCompressor(compression_params=params)

    gz_out = [0]

    def zstd_gz() -> None:
        total = 0
        for b in blobs:
            ch = cctx.chunker(size=len(b), chunk_size=PIECE)
            for p in _pieces(b):
                for c in ch.compress(p):
                    total += len(c)
            for c in ch.finish():
                total += len(c)
        gz_out[0] = total
    if extras:
        rec(f"zstd-{level} of the gzip blobs", _best(zstd_gz, repeat), gz_bytes)
        out[f"zstd-{level} of the gzip blobs"]["output_mb"] = gz_out[0] / 1e6

    def xxh() -> None:
        for b in blobs:
            for p in _pieces(b):
                xxhash.xxh3_64_intdigest(p)
    rec("xxh3", _best(xxh, repeat), gz_bytes)

    path = workdir / "stage-write.tmp"

    def write() -> None:
        with open(path, "wb") as fh:
            for b in blobs:
                for p in _pieces(b):
                    fh.write(p)
            fh.flush()
            os.fsync(fh.fileno())
    rec("write", _best(write, repeat), gz_bytes)
    path.unlink(missing_ok=True)
    out["_"] = {"content_mb": content / 1e6, "gz_mb": gz_bytes / 1e6}
    return out


# Which stages each pack pipeline runs, in order (a stage may run twice: a cold Docker
# pack inflates every layer once to check its diff_id, and again to write the tar).
PIPELINES: Dict[str, List[str]] = {
    "containerd-warm": ["sha256-gz", "xxh3", "write"],
    "containerd-cold": ["fetch", "sha256-gz", "gunzip", "sha256-tar", "sha256-gz", "xxh3", "write"],
    "docker-warm": ["gunzip", "sha256-tar", "zstd", "xxh3", "write"],
    "docker-cold": ["fetch", "sha256-gz", "gunzip", "sha256-tar", "gunzip", "sha256-tar", "zstd", "xxh3",
                    "write"],
}


def limits(stages: Dict[str, Dict[str, float]], pipeline: str, level: int) -> Dict[str, object]:
    """Slowest single stage (MB/s of content) and the all-on-one-core serial bound."""
    names = [f"zstd-{level}" if s == "zstd" else s for s in PIPELINES[pipeline]]
    names = [n for n in names if n in stages]
    slowest = min(set(names), key=lambda n: stages[n]["content_mbps"])
    total_s = sum(stages[n]["seconds"] for n in names)
    content = stages["_"]["content_mb"]
    return {"slowest": slowest, "slowest_mbps": stages[slowest]["content_mbps"],
            "serial_mbps": content / total_s if total_s else 0.0, "stages": names}
