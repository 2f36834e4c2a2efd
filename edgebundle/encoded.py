"""The packer's cache of encoded entries under ``cache/encoded``: a layer compressed once.

zstd at the default level 16 costs ~100 s for a 234 MB image on 2 cores, and every bundle
(every site state) carries the same layers; decoding to check the stored bytes costs a
small fraction of that (docs/BENCHMARKS.md). Layout::

    cache/encoded/<digest hex>-<key>.zst   an entry's stored bytes: one zstd frame

``key`` hashes everything besides the content that decides those bytes (codec, level,
chunk size, window log, zstd's version: ``format.writer.Encoding``), so a reused entry is
byte for byte what the writer would have made and bundles stay identical to uncached
ones. A delta entry's digest names its op stream, which names its bases. Files appear
whole (temp file + rename) and only after the writer verified the entry; they are never
trusted either: ``BundleWriter.add_encoded`` decodes and checks them before writing a
byte, and one that fails is removed and the entry encoded afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Iterator, Optional

from .files import atomic_file, read_pieces
from .format import CODEC_ZSTD, EntryHead
from .format.writer import Encoding
from .oci import check_digest

log = logging.getLogger(__name__)

#: Bump when what a cached file means changes; older files are then never looked at.
ENCODED_VERSION = 1


class EncodedCache:
    def __init__(self, root: "os.PathLike[str] | str") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def wanted(head: EntryHead) -> bool:
        """Only zstd entries: stored ones cost nothing to write again."""
        return head.codec == CODEC_ZSTD

    def path(self, head: EntryHead, encoding: Encoding) -> Path:
        ident = json.dumps([ENCODED_VERSION, head.codec, encoding.level, encoding.chunk_size,
                            encoding.window_log, encoding.zstd])
        key = hashlib.sha256(ident.encode()).hexdigest()[:32]
        return self.root / f"{check_digest(head.digest)[7:]}-{key}.zst"

    def lookup(self, head: EntryHead,
               encoding: Encoding) -> Optional[Callable[[], Iterator[bytes]]]:
        """The stored chunks of a cached entry, for ``add_encoded``; None if not cached."""
        path = self.path(head, encoding)
        if not path.is_file():
            return None
        return lambda: _chunks(path, encoding.chunk_size)

    def discard(self, head: EntryHead, encoding: Encoding, why: str) -> None:
        log.warning("cached encoded entry %s is damaged (%s); removing it and encoding afresh",
                    head.digest, why)
        with contextlib.suppress(OSError):
            self.path(head, encoding).unlink()

    @contextlib.contextmanager
    def recording(self, head: EntryHead, encoding: Encoding) -> Iterator[Callable[[bytes], None]]:
        """A tee for the writer; the file is kept only if the block ends normally.

        The cache only saves time: if it cannot be written (full disk, permissions) the
        pack goes on without it, but an error of the block itself (the entry) propagates.
        """
        path = self.path(head, encoding)
        tee = _Tee(path)
        try:
            yield tee.write
        except BaseException:
            tee.abandon()
            raise
        tee.commit()


class _Tee:
    """The stored chunks of one entry into the cache file, through ``files.atomic_file``.

    Failing to keep a cache file (full disk, permissions) only costs time later: every
    OSError here is logged and the file abandoned, never raised into the pack.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._cm: Optional[ContextManager[BinaryIO]] = None
        self._out: Optional[BinaryIO] = None
        try:
            cm = atomic_file(path)
            self._out = cm.__enter__()
            self._cm = cm
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        log.warning("cannot keep encoded entry in the packer cache (%s): %s", self._path,
                    exc.strerror or exc)
        self.abandon()

    def write(self, chunk: bytes) -> None:
        if self._out is None:
            return
        try:
            self._out.write(chunk)
        except OSError as exc:
            self._failed(exc)

    def abandon(self) -> None:
        """Remove the temp file (atomic_file does, when its block ends in an error)."""
        cm, self._cm, self._out = self._cm, None, None
        if cm is not None:
            with contextlib.suppress(OSError, _Abandoned):
                cm.__exit__(_Abandoned, _Abandoned(), None)

    def commit(self) -> None:
        cm, self._cm, self._out = self._cm, None, None
        if cm is None:
            return
        try:
            cm.__exit__(None, None, None)  # flush, fsync, rename into place, fsync the dir
        except OSError as exc:
            log.warning("cannot keep encoded entry in the packer cache (%s): %s", self._path,
                        exc.strerror or exc)


class _Abandoned(Exception):
    """Ends an atomic_file block without keeping the file."""


def _chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    # The writer's chunker cuts exactly chunk_size pieces (the last shorter): read the same.
    with open(path, "rb") as fh:
        yield from read_pieces(fh, size=chunk_size)

