"""Layer blob compression: the one classifier, and streaming decompression.

``classify`` is the only place that decides whether a layer blob is gzip, zstd or a
plain tar; resolve, pack and the offline sources all ask it. The media type decides
when it says so; otherwise (unknown or foreign media types, and archives with no media
type at all) the first bytes do.

zlib's ``decompressobj`` directly, not ``gzip.GzipFile``: GzipFile adds Python-level
buffering and a second CRC pass (measured at about 0.8x the speed on the benchmark's
layers, docs/BENCHMARKS.md). Output per step is bounded (``max_length``) so a small blob
that inflates hugely never sits in memory whole.
"""

from __future__ import annotations

import zlib
from typing import Iterator, Protocol

import zstandard

from .files import IO_CHUNK

GZIP = "gzip"
ZSTD = "zstd"
NONE = "none"

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: Bytes of a blob's start that ``classify`` needs to tell the formats apart.
MAGIC_BYTES = 4


def classify(media_type: str = "", head: bytes = b"") -> str:
    """``GZIP``, ``ZSTD`` or ``NONE`` for a layer blob: by media type, else by magic bytes."""
    if media_type.endswith(("+gzip", ".gzip")):
        return GZIP
    if media_type.endswith(("+zstd", ".zstd")):
        return ZSTD
    if media_type.endswith(("+tar", ".tar")):
        return NONE
    if head[:2] == GZIP_MAGIC:
        return GZIP
    if head[:4] == ZSTD_MAGIC:
        return ZSTD
    return NONE


class Readable(Protocol):
    def read(self, n: int = -1) -> bytes: ...


def decompress_stream(fh: Readable, kind: str) -> Iterator[bytes]:
    """Yield the decompressed bytes of ``fh``; ``kind`` is what ``classify`` returned.

    Raises zlib.error / zstandard.ZstdError / EOFError on corrupt or truncated input.
    """
    if kind == GZIP:
        yield from _gunzip(fh)
    elif kind == ZSTD:
        reader = zstandard.ZstdDecompressor().stream_reader(
            fh, read_across_frames=True)  # type: ignore[arg-type]  # any read() will do; the stub wants IO
        while True:
            out = reader.read(IO_CHUNK)
            if not out:
                return
            yield out
    else:
        while True:
            out = fh.read(IO_CHUNK)
            if not out:
                return
            yield out


def _gunzip(fh: Readable) -> Iterator[bytes]:
    d = zlib.decompressobj(31)  # 31: gzip container
    fed = False  # has the current member consumed any bytes?
    while True:
        data = fh.read(IO_CHUNK)
        if not data:
            break
        while data:
            fed = True
            out = d.decompress(data, IO_CHUNK)
            if out:
                yield out
            if d.eof:  # multi-member gzip: the next member starts in unused_data
                data = d.unused_data
                d = zlib.decompressobj(31)
                fed = False
            else:
                data = d.unconsumed_tail
    if fed:
        raise EOFError("compressed stream ended inside a gzip member")
