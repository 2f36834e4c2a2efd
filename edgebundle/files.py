"""Local files: the one atomic-replace helper, output targets, and the I/O chunk size.

Every file edgebundle replaces (bundles, reports, inventories, cache blobs) goes through
``atomic_file``: a uniquely named temp file in the target's directory, fsync of the
file, rename over the target, fsync of the directory. A crash or an error leaves the old
file or the new one, never a mix, and never a stray temp file.

``open_output`` is for outputs the user names (``pack -o``, ``report -o``): a regular
file (or a path that does not exist yet) is replaced atomically, but anything else (a
FIFO, ``/dev/stdout``, a tty, ``-``) is a stream and is written in place. Renaming a
temp file over a device node or a FIFO would silently replace it with a regular file.

Device-safe: standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

from .errors import EdgebundleError, OutputError, SpaceError

#: Bytes per read or write when streaming files, blobs and responses (one home for it).
IO_CHUNK = 1024 * 1024

PathLike = Union[str, "os.PathLike[str]"]


class Sink(Protocol):
    """Where streamed output goes: a file, a pipe, a socket wrapper."""

    def write(self, data: bytes) -> int: ...

    def flush(self) -> None: ...


def fsync_dir(directory: PathLike) -> None:
    """Make a rename in ``directory`` durable (the entry itself must reach the disk)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and /proc) refuse fsync on directories: nothing to do
    finally:
        os.close(fd)


def _new_file_mode(existing: Optional[Path]) -> int:
    """The mode a replaced file keeps, or what ``open()`` would give a new one."""
    if existing is not None:
        try:
            return stat.S_IMODE(os.stat(existing).st_mode)
        except OSError:
            pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: PathLike, *, tmp_dir: Optional[PathLike] = None) -> Iterator[BinaryIO]:
    """Write ``path`` whole or not at all.

    Yields a binary file. When the block ends normally the file is flushed, fsynced and
    renamed over ``path`` (whose directory is then fsynced); when it raises, the temp
    file is removed and ``path`` is untouched. ``tmp_dir`` must be on the same
    filesystem as ``path`` (default: ``path``'s directory).
    """
    target = Path(path)
    directory = Path(tmp_dir) if tmp_dir is not None else (target.parent or Path("."))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, _new_file_mode(target if target.exists() else None))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def rename_set(moves: Sequence[Tuple[PathLike, PathLike]]) -> None:
    """Rename each ``(temp, final)`` in order, then fsync their directories.

    Several renames cannot be one atomic step. If one fails, those already done are
    taken back (their finals removed), so an error leaves none of the set under its
    final names; a crash can still leave the first few done, which is why callers order
    ``moves`` so that the one a reader starts from comes last (volume 1 of a set).
    """
    done: List[PathLike] = []
    try:
        for tmp, final in moves:
            os.replace(tmp, final)
            done.append(final)
    except BaseException:
        for final in done:
            with contextlib.suppress(OSError):
                os.unlink(final)
        raise
    for directory in {os.path.dirname(os.path.abspath(final)) for _, final in moves}:
        fsync_dir(directory)


def atomic_write(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see ``atomic_file``)."""
    with atomic_file(path) as out:
        out.write(data)


def read_pieces(fh: BinaryIO, progress: Optional[Callable[[int], None]] = None,
                size: int = IO_CHUNK) -> Iterator[bytes]:
    """Read ``fh`` to its end in pieces of at most ``size`` bytes."""
    while True:
        piece = fh.read(size)
        if not piece:
            return
        if progress is not None:
            progress(len(piece))
        yield piece


# ---------------------------------------------------------------------------
# Outputs the user names


def _why(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or str(exc)


def _hint(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space or write the output somewhere else"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "check that the directory is writable (and not a read-only mount)"
    if exc.errno == errno.ENOENT:
        return "create the directory first, or fix the path"
    if exc.errno == errno.EPIPE:
        return "the reader of the output went away; check the command it is piped into"
    return "check the path and the device it is on"


def output_error(what: str, exc: OSError) -> EdgebundleError:
    """A one-line error for a failed write to ``what``: a full disk is a ``SpaceError``
    (exit 14, as when the pre-flight refuses), anything else an ``OutputError``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpaceError(f"cannot write {what}: {_why(exc)}", _hint(exc))
    return OutputError(f"cannot write {what}: {_why(exc)}", _hint(exc))


class _GuardedWriter:
    """Writes to the output; an OSError there becomes an ``OutputError`` naming it.

    Only errors of *this* file are translated: an OSError elsewhere in the block (say, a
    cache blob that cannot be read) must not be blamed on the output.
    """

    def __init__(self, raw: BinaryIO, what: str) -> None:
        self._raw = raw
        self._what = what

    def write(self, data: bytes) -> int:
        try:
            return self._raw.write(data)
        except OSError as exc:
            raise output_error(self._what, exc) from None

    def flush(self) -> None:
        try:
            self._raw.flush()
        except OSError as exc:
            raise output_error(self._what, exc) from None


def is_stream_target(path: str) -> bool:
    """True when writing ``path`` must stream into it rather than replace it."""
    if path == "-":
        return True
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISREG(st.st_mode):
        return False
    if stat.S_ISLNK(st.st_mode):
        # /dev/stdout -> /proc/self/fd/1 -> wherever stdout points: never rename over it,
        # even when stdout is a regular file (the shell's open file would keep the old one).
        if _links_through_proc(path):
            return True
        try:
            return not stat.S_ISREG(os.stat(path).st_mode)
        except OSError:
            return False  # a dangling link: it names the file to create
    return True  # FIFO, character or block device, socket


def _links_through_proc(path: str) -> bool:
    """Whether following ``path``'s symlinks passes through /proc or /dev/fd."""
    current = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on a symlink chain
        if current.startswith(("/proc/", "/dev/fd/")):
            return True
        try:
            target = os.readlink(current)
        except OSError:
            return False  # not a link (any more): the chain ends here
        current = os.path.normpath(os.path.join(os.path.dirname(current), target))
    return False


def check_output(path: str, what: str) -> None:
    """Refuse up front an output that cannot be written (before hours of work, not after)."""
    if path == "-":
        return
    if os.path.isdir(path):
        raise OutputError(f"cannot write {what}: {path} is a directory", "name a file inside it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputError(f"cannot write {what}: directory {parent} does not exist",
                          "create the directory first, or fix the path")
    if not os.path.exists(path) and not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {what}: directory {parent} is not writable",
                          "check that the directory is writable (and not a read-only mount)")


@contextlib.contextmanager
def open_output(path: str, what: str) -> Iterator[Sink]:
    """Open a user-named output for writing; see the module docstring for the rules.

    ``what`` names it in errors ("bundle gw-01.ebundle"). Errors writing it become
    ``OutputError``; a directory is refused up front.
    """
    check_output(path, what)
    if path == "-":
        out = sys.stdout.buffer
        guarded = _GuardedWriter(out, what)
        yield guarded
        guarded.flush()
        return
    if is_stream_target(path):
        try:
            stream = open(path, "wb")
        except OSError as exc:
            raise output_error(what, exc) from None
        try:
            guarded = _GuardedWriter(stream, what)
            yield guarded
            guarded.flush()
        except BaseException:
            with contextlib.suppress(OSError):  # closing retries the failed flush
                stream.close()
            raise
        try:
            stream.close()
        except OSError as exc:
            raise output_error(what, exc) from None
        return
    # A symlink to a regular file: replace the file it points at, keep the link.
    real = Path(os.path.realpath(path))
    try:
        cm = atomic_file(real)
        raw = cm.__enter__()
    except OSError as exc:
        raise output_error(what, exc) from None
    try:
        yield _GuardedWriter(raw, what)
    except BaseException:
        cm.__exit__(*sys.exc_info())
        raise
    try:
        cm.__exit__(None, None, None)
    except OSError as exc:
        raise output_error(what, exc) from None
