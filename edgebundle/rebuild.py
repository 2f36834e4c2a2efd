"""Device side of deltas: rebuild a layer's tar from a delta entry and the site's own files.

A delta entry names its base layers by chain ID (``format.DeltaHead``) and the base
files it reads by path, size and xxh3-128 (file ops). The runtime gives a ``BaseTree``
per base layer: that layer's files as the runtime holds them (containerd's committed
snapshot, Docker's layer diff directory). Each base file is checked, size and xxh3-128,
before its first use, so that a base that changed is named; the cryptographic check is
the next one: the rebuilt tar is hashed (sha256) as it streams and must equal the
target diff_id before the loader may commit anything. So a base that is missing or different is named in a
``PrerequisiteError``, a damaged delta is a ``BundleFormatError``, and neither ever
becomes a layer.

Memory: one op at a time (``format`` bounds them), one read buffer, and for a patch its
dictionary window and output: about 3 x 8 MiB at worst, whatever the file sizes.

Device-safe: stdlib, zstandard, msgpack, xxhash.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple

import xxhash
import zstandard

from .errors import BundleFormatError, PrerequisiteError
from .files import IO_CHUNK
from .format import MAX_PATCH_WINDOW_LOG, BaseLayer, DeltaHead
from .format.delta import XXH3, BaseFile, Copy, Literal, Op, Patch, Range, read_ops
from .format.records import SPEC_HINT

log = logging.getLogger(__name__)

BASE_HINT = ("the device no longer holds what its last report said: send a fresh "
             "`edgebundle report` to the packer and repack")


class BaseTree(Protocol):
    """The files of one base layer, as the runtime holds them."""

    describe: str  # for messages: where the files are

    def open(self, path: str) -> BinaryIO:
        """The regular file at ``path`` (relative); OSError if there is none."""


class DirTree:
    """A directory holding a layer's files (a snapshot's ``fs``, a Docker ``diff`` dir).

    Paths are walked one component at a time without following symlinks, so a link in
    the tree can never lead outside it.
    """

    def __init__(self, root: "os.PathLike[str] | str", describe: str) -> None:
        self.root = Path(root)
        self.describe = describe
        # The last directory walked to, kept open: a layer's files come in tar order,
        # so most lookups share the previous one's directory (one open instead of ~6).
        self._dir: Optional[Tuple[Tuple[str, ...], int]] = None

    def _dir_fd(self, parts: Tuple[str, ...]) -> int:
        if self._dir is not None and self._dir[0] == parts:
            return self._dir[1]
        fd = os.open(self.root, os.O_RDONLY | _O_DIRECTORY)
        try:
            for part in parts:
                nxt = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        self.close()
        self._dir = (parts, fd)
        return fd

    def open(self, path: str) -> BinaryIO:
        parts = path.split("/")
        leaf = os.open(parts[-1], os.O_RDONLY | _O_NOFOLLOW, dir_fd=self._dir_fd(tuple(parts[:-1])))
        if not stat.S_ISREG(os.fstat(leaf).st_mode):
            os.close(leaf)
            raise OSError(errno.EINVAL, "not a regular file")
        return os.fdopen(leaf, "rb")

    def close(self) -> None:
        if self._dir is not None:
            os.close(self._dir[1])
            self._dir = None

    def __del__(self) -> None:
        self.close()


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


def coalesced(pieces: Iterable[bytes], size: int = 256 * 1024) -> Iterator[bytes]:
    """``pieces`` joined into runs of at least ``size`` bytes (a tar of small files would
    otherwise cross the import's writer thread thousands of times a second)."""
    buf: List[bytes] = []
    held = 0
    for piece in pieces:
        buf.append(piece)
        held += len(piece)
        if held >= size:
            yield b"".join(buf)
            buf.clear()
            held = 0
    if buf:
        yield b"".join(buf)


class _Files:
    """The entry's base files: opened on demand, each verified once before first use."""

    def __init__(self, head: DeltaHead, trees: Sequence[BaseTree], where: str,
                 tars: Sequence[Optional[BinaryIO]]) -> None:
        self.head = head
        self.trees = trees
        self.where = where
        self.tars = tars
        self.files: List[BaseFile] = []  # defined by file ops, in order
        self._verified: set[int] = set()
        self._open: Optional[tuple[int, BinaryIO]] = None  # the last file used (patch runs)

    def _fail(self, f: BaseFile, problem: str) -> PrerequisiteError:
        base = self.head.bases[f.base]
        return PrerequisiteError(
            f"{self.where}: base file {f.path} of layer {base.diff_id} {problem} "
            f"(in {self.trees[f.base].describe})", [base.chain_id], BASE_HINT)

    def define(self, f: BaseFile) -> None:
        if f.base >= len(self.head.bases):
            raise BundleFormatError(f"{self.where}: a base file names base {f.base}, but the entry "
                                    f"has {len(self.head.bases)}", SPEC_HINT)
        self.files.append(f)

    def get(self, index: int) -> tuple[BaseFile, BinaryIO]:
        if not 0 <= index < len(self.files):
            raise BundleFormatError(f"{self.where}: op names base file {index}, but only "
                                    f"{len(self.files)} are defined before it", SPEC_HINT)
        f = self.files[index]
        if self._open is not None and self._open[0] == index:
            return f, self._open[1]
        self.close()
        try:
            fh = self.trees[f.base].open(f.path)
        except OSError as exc:
            raise self._fail(f, f"cannot be read: {exc.strerror or exc}") from None
        if index not in self._verified:
            self._verify(f, fh)
            self._verified.add(index)
        self._open = (index, fh)
        return f, fh

    def _verify(self, f: BaseFile, fh: BinaryIO) -> None:
        hasher = xxhash.xxh3_128()
        size = 0
        while True:
            piece = fh.read(IO_CHUNK)
            if not piece:
                break
            size += len(piece)
            hasher.update(piece)
        if size != f.size or XXH3 + hasher.hexdigest() != f.digest:
            fh.close()
            raise self._fail(f, f"differs from the one the delta was made against "
                                f"({size} bytes, expected {f.size})")
        log.debug("%s: base file %s verified", self.where, f.path)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


def rebuild(head: DeltaHead, ops: Iterable[bytes], trees: Sequence[BaseTree], where: str,
            tars: Optional[Sequence[Optional[BinaryIO]]] = None) -> Iterator[bytes]:
    """The target tar, streamed from the op stream ``ops`` (the entry's decoded bytes).

    ``tars[i]`` is base ``i``'s own tar, verified (``verified_tar``), for each base whose
    ``tar`` flag is set. Raises ``PrerequisiteError`` for a base file that is missing or
    different, ``BundleFormatError`` for a malformed delta or a result that is not the
    target.
    """
    if len(trees) != len(head.bases):
        raise ValueError("one base tree per base layer")
    tar_list: Sequence[Optional[BinaryIO]] = tars if tars is not None else [None] * len(trees)
    files = _Files(head, trees, where, tar_list)
    hasher = hashlib.sha256()
    total = 0
    try:
        for op in read_ops(ops, where):
            for piece in _apply(op, files, where):
                total += len(piece)
                if total > head.target_size:
                    raise BundleFormatError(f"{where}: rebuilds more than the target's "
                                            f"{head.target_size} bytes", SPEC_HINT)
                hasher.update(piece)
                yield piece
    finally:
        files.close()
    actual = "sha256:" + hasher.hexdigest()
    if total != head.target_size or actual != head.target:
        raise BundleFormatError(f"{where}: rebuilt tar hashes to {actual} ({total} bytes), not "
                                f"its target {head.target} ({head.target_size} bytes)", SPEC_HINT)


def _apply(op: Op, files: _Files, where: str) -> Iterator[bytes]:
    if isinstance(op, Literal):
        yield op.data
        return
    if isinstance(op, BaseFile):
        files.define(op)
        return
    if isinstance(op, Range):
        yield from _range(op, files, where)
        return
    f, fh = files.get(op.file)
    if isinstance(op, Copy):
        fh.seek(0)
        left = f.size
        while left:
            piece = fh.read(min(IO_CHUNK, left))
            if not piece:
                raise files._fail(f, "shrank while it was read")
            left -= len(piece)
            yield piece
        return
    assert isinstance(op, Patch)
    if op.offset + op.length > f.size:
        raise BundleFormatError(f"{where}: patch window {op.offset}+{op.length} lies outside "
                                f"base file {f.path} ({f.size} bytes)", SPEC_HINT)
    fh.seek(op.offset)
    window = fh.read(op.length)
    if len(window) != op.length:
        raise files._fail(f, "shrank while it was read")
    yield _unpatch(window, op, where)


def _range(op: Range, files: _Files, where: str) -> Iterator[bytes]:
    tar = files.tars[op.base] if op.base < len(files.tars) else None
    if op.base >= len(files.head.bases) or not files.head.bases[op.base].tar or tar is None:
        raise BundleFormatError(f"{where}: op copies from the tar of base {op.base}, which the "
                                "entry does not declare as a tar base", SPEC_HINT)
    size = tar.seek(0, os.SEEK_END)
    if op.offset + op.length > size:
        raise BundleFormatError(f"{where}: range {op.offset}+{op.length} lies outside the tar of "
                                f"layer {files.head.bases[op.base].diff_id} ({size} bytes)", SPEC_HINT)
    tar.seek(op.offset)
    left = op.length
    while left:
        piece = tar.read(min(IO_CHUNK, left))
        if not piece:
            raise BundleFormatError(f"{where}: base tar ended early", SPEC_HINT)
        left -= len(piece)
        yield piece


def verified_tar(pieces: Iterable[bytes], base: BaseLayer, describe: str,
                 spool_dir: "os.PathLike[str] | str | None" = None) -> BinaryIO:
    """A base layer's tar, rebuilt by the runtime, spooled to disk and checked against its
    diff_id before any delta may use it; ``PrerequisiteError`` if it is not that layer."""
    spool: BinaryIO = tempfile.TemporaryFile(dir=spool_dir)  # gone when closed, even on a crash
    hasher = hashlib.sha256()
    try:
        for piece in pieces:
            hasher.update(piece)
            spool.write(piece)
    except BaseException:
        spool.close()
        raise
    if "sha256:" + hasher.hexdigest() != base.diff_id:
        spool.close()
        raise PrerequisiteError(f"{describe} does not rebuild layer {base.diff_id} exactly "
                                f"(its tar hashes to sha256:{hasher.hexdigest()})",
                                [base.chain_id], BASE_HINT)
    spool.seek(0)
    return spool


def _unpatch(window: bytes, op: Patch, where: str) -> bytes:
    dictionary = zstandard.ZstdCompressionDict(window, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    dctx = zstandard.ZstdDecompressor(dict_data=dictionary,
                                      max_window_size=1 << MAX_PATCH_WINDOW_LOG)
    try:
        params = zstandard.get_frame_parameters(op.frame)
        if params.content_size != op.size:
            raise BundleFormatError(f"{where}: patch frame declares {params.content_size} bytes, "
                                    f"the op {op.size}", SPEC_HINT)
        out = dctx.decompress(op.frame, max_output_size=op.size)
    except zstandard.ZstdError as exc:
        raise BundleFormatError(f"{where}: patch does not decode: {exc}", SPEC_HINT) from None
    if len(out) != op.size:
        raise BundleFormatError(f"{where}: patch decodes to {len(out)} bytes, not {op.size}",
                                SPEC_HINT)
    return out
