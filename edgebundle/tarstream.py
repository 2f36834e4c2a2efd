"""Write files into a tar stream without buffering them (standard library only).

Both runtimes take images as a tar (containerd: an OCI layout; Docker: a docker-archive),
and so do the archives ``edgebundle export`` writes (``archive``). The size each tar header
needs is known up front (a bundle entry's decoded size, a blob's descriptor), so a file
flows one piece at a time: header, the pieces as they come, padding. No tarfile stream in
between (it copied every byte once more, measured in docs/BENCHMARKS.md).

Outside ``importer/`` so that importing it pulls in nothing but the standard library.
"""

from __future__ import annotations

import tarfile
from typing import Any, Iterable

BLOCK = 512


class TarStream:
    """A streaming tar writer with deterministic PAX headers."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink

    def add(self, name: str, size: int, pieces: Iterable[bytes]) -> None:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        self._sink.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        written = 0
        # Running the iterator to its end matters: the bundle entry checks its sha256 there.
        for piece in pieces:
            written += len(piece)
            if written > size:
                raise ValueError(f"tar member {name} got more than its {size} bytes")
            self._sink.write(piece)
        if written != size:
            raise ValueError(f"tar member {name} got {written} of its {size} bytes")
        if size % BLOCK:
            self._sink.write(b"\0" * (BLOCK - size % BLOCK))

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add(name, len(data), [data])

    def close(self) -> None:
        self._sink.write(b"\0" * (2 * BLOCK))


def blob_path(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]
