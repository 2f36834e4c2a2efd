"""The packer's content-addressed blob cache under ``$EDGEBUNDLE_HOME/cache``.

Layout (like an OCI layout's ``blobs/``)::

    blobs/sha256/<hex>          verified blob bytes, written via temp file + rename
    layers/sha256/<hex>.json    {"diff_id": ..., "tar_size": ...} for a layer blob

A blob is only ever visible under its name after its sha256 and size were checked, so
a crash or a bad download can never leave a wrong blob behind; a second pack of the
same images fetches nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Tuple

from .diffid import BackgroundDiffId
from .errors import CacheError
from .files import atomic_file, atomic_write
from .oci import check_digest, sha256_digest
from .space import full_error

log = logging.getLogger(__name__)


class DigestMismatch(ValueError):
    """Bytes did not hash to the digest (or size) they were fetched as."""


class BlobCache:
    def __init__(self, root: "os.PathLike[str] | str") -> None:
        self.root = Path(root)
        try:
            for sub in ("blobs/sha256", "layers/sha256", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the packer cache at {self.root}: {exc.strerror}",
                             "pass --home (or set EDGEBUNDLE_HOME) to a writable directory") from None

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / "blobs" / "sha256" / digest[7:]

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def open(self, digest: str) -> BinaryIO:
        """The cached blob, for streaming; a missing one is a ``CacheError``."""
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise CacheError(f"blob {digest} is missing from the packer cache ({self.root})",
                             "something removed it while edgebundle ran; run the command again "
                             "to fetch it") from None
        except OSError as exc:
            raise CacheError(f"cannot read blob {digest} from the packer cache: {exc.strerror}",
                             f"check the permissions of {self.root}") from None

    def read_bytes(self, digest: str) -> bytes:
        """A small (JSON) blob, verified; a damaged one is removed and reported."""
        with self.open(digest) as fh:
            data = fh.read()
        if sha256_digest(data) != digest:
            raise self.damaged(digest)
        return data

    def damaged(self, digest: str) -> CacheError:
        """Remove a blob whose bytes are not its digest; the error to raise for it."""
        log.info("blob %s in the packer cache is damaged; removing it", digest)
        with contextlib.suppress(OSError):
            self.path(digest).unlink()
        return CacheError(f"blob {digest} in the packer cache ({self.root}) was damaged and "
                          "has been removed", "run the command again to fetch it afresh; if "
                          "this recurs, check the disk")

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    @contextlib.contextmanager
    def writer(self, digest: str, size: Optional[int] = None,
               layer_media_type: Optional[str] = None) -> Iterator[BinaryIO]:
        """Write a blob; it appears under ``digest`` only if content and size check out.

        Raises ``DigestMismatch`` on exit if they do not (the temp file is removed).
        With ``layer_media_type`` (a layer blob's), the bytes are also decompressed as they
        pass and the tar's diff_id and size recorded (``layer_info``) once the blob is in:
        no second read of the blob to learn them. A blob that does not decompress is
        stored all the same, without layer info (``resolve`` reports it).
        """
        hasher = hashlib.sha256()
        try:
            with contextlib.ExitStack() as stack:
                # The inflate runs on a thread of its own (BackgroundDiffId: why).
                tar = (stack.enter_context(BackgroundDiffId(layer_media_type))
                       if layer_media_type is not None else None)
                with atomic_file(self.path(digest), tmp_dir=self.root / "tmp") as raw:
                    sink = _HashingWriter(raw, hasher, tar)
                    yield sink  # type: ignore[misc]  # _HashingWriter is the write() of a BinaryIO
                    actual = "sha256:" + hasher.hexdigest()
                    if actual != digest:
                        raise DigestMismatch(f"blob {digest} arrived with digest {actual}")
                    if size is not None and sink.count != size:
                        raise DigestMismatch(f"blob {digest} arrived with {sink.count} bytes, expected {size}")
                found = tar.result() if tar is not None else None
            if found is not None:
                self.set_layer_info(digest, found.diff_id, found.tar_size)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The temp file is gone (atomic_file); say the disk is full, not "internal error".
            raise full_error(f"blob {digest} into the packer cache at {self.root}", exc,
                             "free space there, or pass --home (or set EDGEBUNDLE_HOME) on a "
                             "bigger disk") from None

    def put_bytes(self, data: bytes, digest: Optional[str] = None) -> str:
        """Store ``data``; if ``digest`` is given it must match."""
        digest = digest or sha256_digest(data)
        if not self.has(digest):
            with self.writer(digest, len(data)) as out:
                out.write(data)
        elif digest != sha256_digest(data):
            raise DigestMismatch(f"blob {digest} does not match its content")
        return digest

    def _info_path(self, digest: str) -> Path:
        return self.root / "layers" / "sha256" / (check_digest(digest)[7:] + ".json")

    def layer_info(self, digest: str) -> Optional[Tuple[str, int]]:
        """(diff_id, tar_size) recorded for a layer blob, if it was decompressed before."""
        try:
            obj = json.loads(self._info_path(digest).read_text())
            return check_digest(obj["diff_id"]), int(obj["tar_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent or damaged: the layer is simply decompressed again

    def set_layer_info(self, digest: str, diff_id: str, tar_size: int) -> None:
        atomic_write(self._info_path(digest),
                     json.dumps({"diff_id": diff_id, "tar_size": tar_size}).encode())


class _HashingWriter:
    def __init__(self, raw: BinaryIO, hasher: "hashlib._Hash", tar: Optional[BackgroundDiffId]) -> None:
        self._raw = raw
        self._hasher = hasher
        self._tar = tar
        self.count = 0

    def write(self, data: bytes) -> int:
        self._hasher.update(data)
        self.count += len(data)
        if self._tar is not None:
            self._tar.feed(data)
        return self._raw.write(data)


def default_home() -> Path:
    """``$EDGEBUNDLE_HOME``, else ``$XDG_DATA_HOME/edgebundle``, else ``~/.local/share/edgebundle``."""
    env = os.environ.get("EDGEBUNDLE_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "edgebundle"
