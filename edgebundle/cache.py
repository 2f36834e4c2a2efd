"""The packer's content-addressed blob cache under ``$EDGEBUNDLE_HOME/blobs``.

Layout (like an OCI layout's ``blobs/``)::

    blobs/sha256/<hex>          verified blob bytes, written via temp file + rename
    layers/sha256/<hex>.json    {"diff_id": ..., "tar_size": ...} for a layer blob

A blob is only ever visible under its name after its sha256 and size were checked, so
a crash or a bad download can never leave a wrong blob behind; a second pack of the
same images fetches nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Tuple

from .model import check_digest, sha256_digest


class DigestMismatch(ValueError):
    """Bytes did not hash to the digest (or size) they were fetched as."""


class BlobCache:
    def __init__(self, root: "os.PathLike[str] | str") -> None:
        self.root = Path(root)
        (self.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "layers" / "sha256").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / "blobs" / "sha256" / digest[7:]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def open(self, digest: str) -> BinaryIO:
        return open(self.path(digest), "rb")

    def read_bytes(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    @contextlib.contextmanager
    def writer(self, digest: str, size: Optional[int] = None) -> Iterator[BinaryIO]:
        """Write a blob; it appears under ``digest`` only if content and size check out.

        Raises ``DigestMismatch`` on exit if they do not (the temp file is removed).
        """
        final = self.path(digest)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", prefix="blob-")
        hasher = hashlib.sha256()
        written = 0
        try:
            with os.fdopen(fd, "wb") as raw:
                sink = _HashingWriter(raw, hasher)
                yield sink  # type: ignore[misc]
                written = sink.count
                raw.flush()
                os.fsync(raw.fileno())
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise DigestMismatch(f"blob {digest} arrived with digest {actual}")
            if size is not None and written != size:
                raise DigestMismatch(f"blob {digest} arrived with {written} bytes, expected {size}")
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def put_bytes(self, data: bytes, digest: Optional[str] = None) -> str:
        """Store ``data``; if ``digest`` is given it must match."""
        digest = digest or sha256_digest(data)
        if not self.has(digest):
            with self.writer(digest, len(data)) as out:
                out.write(data)
        elif digest != sha256_digest(data):
            raise DigestMismatch(f"blob {digest} does not match its content")
        return digest

    def layer_info(self, digest: str) -> Optional[Tuple[str, int]]:
        """(diff_id, tar_size) recorded for a layer blob, if it was decompressed before."""
        path = self.root / "layers" / "sha256" / (check_digest(digest)[7:] + ".json")
        try:
            obj = json.loads(path.read_text())
            return str(obj["diff_id"]), int(obj["tar_size"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def set_layer_info(self, digest: str, diff_id: str, tar_size: int) -> None:
        path = self.root / "layers" / "sha256" / (check_digest(digest)[7:] + ".json")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"diff_id": diff_id, "tar_size": tar_size}))
        os.replace(tmp, path)


class _HashingWriter:
    def __init__(self, raw: BinaryIO, hasher: "hashlib._Hash") -> None:
        self._raw = raw
        self._hasher = hasher
        self.count = 0

    def write(self, data: bytes) -> int:
        self._hasher.update(data)
        self.count += len(data)
        return self._raw.write(data)


def default_home() -> Path:
    """``$EDGEBUNDLE_HOME``, else ``$XDG_DATA_HOME/edgebundle``, else ``~/.local/share/edgebundle``."""
    env = os.environ.get("EDGEBUNDLE_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "edgebundle"
