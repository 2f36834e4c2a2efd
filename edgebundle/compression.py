"""Streaming decompression of layer blobs (gzip, zstd or none), shared by resolve and pack.

zlib's ``decompressobj`` directly, not ``gzip.GzipFile``: GzipFile adds Python-level
buffering and a second CRC pass (measured at about 0.8x the speed on the benchmark's
layers, docs/BENCHMARKS.md). Output per step is bounded (``max_length``) so a small blob that
inflates hugely never sits in memory whole.
"""

from __future__ import annotations

from typing import BinaryIO, Iterator

import zlib

import zstandard

PIECE = 1024 * 1024


def decompress_stream(fh: BinaryIO, kind: str) -> Iterator[bytes]:
    """Yield the decompressed bytes of ``fh``; ``kind`` is "gzip", "zstd" or "none".

    Raises zlib.error / zstandard.ZstdError / EOFError on corrupt or truncated input.
    """
    if kind == "gzip":
        yield from _gunzip(fh)
    elif kind == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
        while True:
            out = reader.read(PIECE)
            if not out:
                return
            yield out
    else:
        while True:
            out = fh.read(PIECE)
            if not out:
                return
            yield out


def _gunzip(fh: BinaryIO) -> Iterator[bytes]:
    d = zlib.decompressobj(31)  # 31: gzip container
    fed = False  # has the current member consumed any bytes?
    while True:
        data = fh.read(PIECE)
        if not data:
            break
        while data:
            fed = True
            out = d.decompress(data, PIECE)
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
