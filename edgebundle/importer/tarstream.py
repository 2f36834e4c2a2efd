"""Write bundle entries into a tar stream without buffering them.

Both runtimes take images as a tar (containerd: an OCI layout; Docker: a docker-archive).
The bundle announces each entry's decoded size up front, which is exactly what a tar
header needs, so entries flow from the bundle into the runtime one chunk at a time.
"""

from __future__ import annotations

import io
import tarfile
from typing import BinaryIO, Iterator, Optional


class IterReader(io.RawIOBase):
    """A readable file over an iterator of byte pieces."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: "bytearray | memoryview") -> int:  # type: ignore[override]
        while not self._buf:
            nxt = next(self._pieces, None)
            if nxt is None:
                return 0
            self._buf = nxt
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def finish(self) -> None:
        """Run the iterator to its end: the bundle entry verifies its digest there."""
        for piece in self._pieces:
            if piece:
                raise ValueError("entry yielded more bytes than its tar member holds")
        if self._buf:
            raise ValueError("entry yielded more bytes than its tar member holds")


class TarStream:
    """A streaming tar writer (``tarfile`` mode ``w|``) with deterministic headers."""

    def __init__(self, sink: BinaryIO) -> None:
        self._tar = tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT,
                                 bufsize=1024 * 1024)

    def add(self, name: str, size: int, pieces: Iterator[bytes]) -> None:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        reader = IterReader(pieces)
        self._tar.addfile(info, io.BufferedReader(reader, 1024 * 1024))
        reader.finish()

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add(name, len(data), iter([data]))

    def close(self) -> None:
        self._tar.close()


def blob_path(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def last_line(text: Optional[str]) -> str:
    lines = [l.strip() for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""
