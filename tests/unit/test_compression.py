"""compression: the one classifier and the one decompressor of layer blobs (resolve, pack, sources)."""

from __future__ import annotations

import gzip
import io
import zlib

import pytest
import zstandard

from edgebundle.compression import GZIP, NONE, ZSTD, classify, decompress_stream
from edgebundle.files import IO_CHUNK as PIECE


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


GZ = gzip.compress(b"x", mtime=0)[:4]
ZS = zstandard.ZstdCompressor().compress(b"x")[:4]


@pytest.mark.parametrize("media_type,head,kind", [
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", b"", GZIP),
    ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", b"", GZIP),
    ("application/vnd.oci.image.layer.v1.tar+gzip", b"", GZIP),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", b"", GZIP),
    ("application/vnd.oci.image.layer.v1.tar+zstd", b"", ZSTD),
    ("application/vnd.oci.image.layer.v1.tar", GZ, NONE),  # the media type wins over bytes
    ("application/vnd.docker.image.rootfs.diff.tar", b"", NONE),
    # No media type (docker-archive files) or one we do not know: the bytes decide.
    ("", GZ, GZIP),
    ("", ZS, ZSTD),
    ("", b"ustar", NONE),
    ("application/x-unknown", GZ, GZIP),
    ("application/x-unknown", ZS, ZSTD),
    ("application/x-unknown", b"", NONE),
])
def test_classify(media_type: str, head: bytes, kind: str) -> None:
    assert classify(media_type, head) == kind


def test_no_other_classifier_exists() -> None:
    """One home: nothing else in the package tests gzip/zstd magic or media suffixes."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2] / "edgebundle"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "compression.py":
            continue
        text = path.read_text()
        for needle in ('b"\\x1f\\x8b"', "b'\\x1f\\x8b'", '"+gzip"', '"+zstd"', 'endswith("gzip")'):
            if needle in text:
                offenders.append(f"{path.relative_to(root)}: {needle}")
    assert not offenders, offenders
