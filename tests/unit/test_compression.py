"""decompress_stream: the one layer decompressor used by resolve (diff_id) and pack (tar form)."""

from __future__ import annotations

import gzip
import io
import zlib

import pytest
import zstandard

from edgebundle.compression import PIECE, decompress_stream


def run(data: bytes, kind: str) -> list[bytes]:
    return list(decompress_stream(io.BytesIO(data), kind))


def test_gzip_single_and_multi_member() -> None:
    a, b = b"first member " * 1000, b"second member " * 2000
    assert b"".join(run(gzip.compress(a, mtime=0), "gzip")) == a
    assert b"".join(run(gzip.compress(a, mtime=0) + gzip.compress(b, mtime=0), "gzip")) == a + b


def test_truncated_gzip_raises() -> None:
    blob = gzip.compress(bytes(range(256)) * 4000, mtime=0)
    with pytest.raises(EOFError):
        run(blob[: len(blob) // 2], "gzip")
    with pytest.raises(zlib.error):
        run(b"\x1f\x8b\x08\x00garbage-not-deflate" * 10, "gzip")


def test_output_pieces_are_bounded_for_a_gzip_bomb() -> None:
    bomb = gzip.compress(b"\0" * (64 * PIECE), mtime=0)  # ~64 KiB inflating to 64 MiB
    pieces = run(bomb, "gzip")
    assert sum(map(len, pieces)) == 64 * PIECE
    assert max(map(len, pieces)) <= PIECE


def test_zstd_and_none() -> None:
    data = b"layer tar bytes " * 50000
    assert b"".join(run(zstandard.ZstdCompressor().compress(data), "zstd")) == data
    assert b"".join(run(data, "none")) == data
