"""Volume files: write a bundle as ``OUTPUT.001 … OUTPUT.NNN``, read such a set back.

The container (``format.volumes``) is pure; this module names, creates, finds and opens
the files. Device-safe: standard library and xxhash only.

Writing: each volume is written to a temp file next to the output; only when the last
byte is written are the headers patched (count, total, id), every file fsynced, and
the set renamed to its final names, last volume first, volume 1 last. On any error
every temp file is removed, and so is any volume of the set already renamed: an error
never leaves part of a set under the final names. A crash mid-rename can; a reader
starts from volume 1, so it then finds new later volumes beside an old volume 1 (or
none), and refuses them as belonging to another bundle (or volume 1 as missing). Volumes of an older, longer set under the same name
(``OUTPUT.(N+1)`` …) are removed too, so that ``cat OUTPUT.*`` stays this set.

Reading: given volume 1's path the others are found next to it by name (its suffix's
digits counted up, as many as volume 1's count), or given in order as paths, or read in
sequence from one stream (standard input). With files, every header and file size is
checked before the first payload byte is handed to the bundle reader, so a missing,
duplicated, swapped, foreign or truncated volume is named before the import starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from typing import BinaryIO, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import xxhash

from .errors import BundleFormatError, OutputError, UsageError
from .files import output_error, rename_set
from .format import MAGIC, VOLUME_END_MAGIC, VOLUME_HEAD_SIZE, VOLUME_MAGIC
from .format.volumes import (OVERHEAD, JoinedVolumes, VolumeError, VolumeHead, VolumeSource,
                             VolumeSplitter, check_next, is_volume, parse_head)

#: The largest file FAT32 can hold: 4 GiB - 1 byte (its size field is a u32).
FAT32_VOLUME_SIZE = (1 << 32) - 1
#: Below this, ``--volume-size 4`` (meant as 4G) would write millions of files.
MIN_VOLUME_SIZE = 1 << 20

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"(\d+)\s*([kKmMgGtT]?)(?:i?B)?")
_SUFFIX = re.compile(r"\A(.*)\.([0-9]{3,})\Z", re.DOTALL)  # \Z: no match before a final newline


def parse_size(text: str, what: str = "volume size", minimum: Optional[int] = None,
               example: str = "700M") -> int:
    """``700M``, ``4G``, ``1048576``: bytes, with binary suffixes (1k = 1024).

    ``what`` names the value in errors (``sync --limit-rate`` parses bytes/s with it too);
    ``minimum`` defaults to ``MIN_VOLUME_SIZE``, read at the call (tests lower it).
    """
    if minimum is None:
        minimum = MIN_VOLUME_SIZE
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"{what} {text!r} is not a size",
                         f"give bytes with an optional k, M, G or T suffix (binary: 1k = 1024), e.g. {example}")
    size = int(m.group(1)) * _UNITS[m.group(2).lower()]
    if size < minimum:
        shown = f"{minimum >> 20}M ({minimum} bytes)" if minimum % (1 << 20) == 0 else f"{minimum} bytes"
        raise UsageError(f"{what} {text} is {size} bytes, below the minimum of {shown}",
                         f"give a suffix, e.g. 4G or {example}")
    return size


def volume_path(output: str, number: int, count: int) -> str:
    """``OUTPUT.001``: three digits, more only when the count needs them."""
    width = max(3, len(str(count)))
    return f"{output}.{number:0{width}d}"


# ---------------------------------------------------------------------------
# Writing


class VolumeOutput:
    """The sink ``write_volumes`` yields; ``paths`` holds the final names once it ends."""

    def __init__(self, splitter: VolumeSplitter, what: str) -> None:
        self._splitter = splitter
        self._what = what
        self.paths: List[str] = []
        self.heads: List[VolumeHead] = []

    def write(self, data: bytes) -> int:
        try:
            return self._splitter.write(data)
        except OSError as exc:
            raise output_error(self._what, exc) from None

    def flush(self) -> None:
        try:
            self._splitter.flush()
        except OSError as exc:
            raise output_error(self._what, exc) from None


@contextlib.contextmanager
def write_volumes(output: str, volume_size: int, what: str) -> Iterator[VolumeOutput]:
    """Write what the block writes as volumes of at most ``volume_size`` bytes each.

    ``what`` names the output in errors. See the module docstring for the guarantees.
    """
    directory = os.path.dirname(os.path.abspath(output))
    base = os.path.basename(output)
    temps: Dict[int, str] = {}

    def create(number: int) -> BinaryIO:
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.{number}.", suffix=".tmp")
        except OSError as exc:
            raise output_error(what, exc) from None
        temps[number] = tmp
        return cast(BinaryIO, os.fdopen(fd, "wb"))

    def close(number: int, fh: BinaryIO) -> None:
        try:
            fh.flush()
            fh.close()
        except OSError as exc:
            raise output_error(what, exc) from None

    splitter = VolumeSplitter(volume_size, create, close)
    sink = VolumeOutput(splitter, what)
    try:
        yield sink
        heads = splitter.finish()
        if not heads:
            raise OutputError(f"cannot write {what}: nothing was written", None)
        _seal(heads, temps)
        finals = [volume_path(output, h.number, h.count) for h in heads]
        # Volume 1 last: a reader starts from it (see the module docstring).
        rename_set([(temps[h.number], final) for h, final in reversed(list(zip(heads, finals)))])
        temps.clear()
    except OSError as exc:
        raise output_error(what, exc) from None
    finally:
        with contextlib.suppress(OSError):
            splitter.close()
        for tmp in temps.values():  # an error: no temp file stays behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    sink.paths, sink.heads = finals, heads
    _remove_stale(output, heads[0].count)


def _seal(heads: List[VolumeHead], temps: Dict[int, str]) -> None:
    """Write the final headers over the placeholders and make every volume durable."""
    mode = 0o666 & ~_umask()
    for head in heads:
        with open(temps[head.number], "r+b") as fh:
            fh.write(head.pack())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(temps[head.number], mode)  # mkstemp makes 0600; a bundle is not a secret


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale(output: str, count: int) -> None:
    """Remove ``OUTPUT.(count+1)`` … left by an older, longer set (volume files only)."""
    number = count + 1
    while True:
        path = volume_path(output, number, count)
        try:
            with open(path, "rb") as fh:
                if not is_volume(fh.read(len(VOLUME_MAGIC))):
                    return  # not ours: leave it, and stop there
            os.unlink(path)
        except OSError:
            return
        number += 1


# ---------------------------------------------------------------------------
# Reading


def first_volume(path: str) -> str:
    """``b.ebundle`` names its volume set when only ``b.ebundle.001`` exists."""
    if not os.path.exists(path) and os.path.isfile(path + ".001"):
        return path + ".001"
    return path


def _located(first: str, count: int) -> List[str]:
    """Volume 1's path and the paths of the others, by counting up its suffix."""
    m = _SUFFIX.match(first)
    if m is None:
        if count == 1:
            return [first]
        raise UsageError(f"{first} is volume 1 of {count}, but its name does not end in .001, "
                         "so the others cannot be found by name",
                         "restore the names OUTPUT.001, OUTPUT.002, …, or pass every volume in order")
    stem, width = m.group(1), len(m.group(2))
    if int(m.group(2)) != 1:
        # Its header said volume 1: the names were changed, and counting up would mislead.
        raise VolumeError(f"volume {first} is volume 1, but its name says {int(m.group(2))}",
                          "restore the names OUTPUT.001, OUTPUT.002, … as pack wrote them")
    return [f"{stem}.{n:0{width}d}" for n in range(1, count + 1)]


def check_files(paths: Sequence[str], first: VolumeHead) -> None:
    """Every volume's header and size, before any payload is read (cheap: a stat each)."""
    seen: Dict[int, str] = {1: f"volume {paths[0]}"}
    offset = first.length
    for position, path in enumerate(paths[1:], start=2):
        what = f"volume {path}"
        if position > first.count:
            raise VolumeError(f"{what} is one too many: the bundle has {first.count} volumes",
                              "pass each volume once, in order")
        try:
            with open(path, "rb") as fh:
                head = parse_head(fh.read(VOLUME_HEAD_SIZE), what)
                size = os.fstat(fh.fileno()).st_size
        except FileNotFoundError:
            raise VolumeError(_missing_file(position, first.count, path),
                              "copy every volume of the set next to the first one") from None
        except IsADirectoryError:
            raise UsageError(f"{what} is a directory", "pass the volume files themselves") from None
        except OSError as exc:
            raise UsageError(f"cannot open {what}: {exc.strerror}",
                             "check the path (on a USB stick: is it mounted?)") from None
        check_next(head, what, position, first, offset, seen)
        _check_size(head, what, size)
        seen[head.number] = what
        offset += head.length
    if len(paths) < first.count:
        raise VolumeError(f"volume {len(paths) + 1} of {first.count} is missing: only "
                          f"{len(paths)} given", "pass every volume, in order")


def _check_size(head: VolumeHead, what: str, size: int) -> None:
    if size < head.file_size:
        raise VolumeError(f"{what} (volume {head.number} of {head.count}) is truncated: {size} "
                          f"bytes, its header says {head.file_size}",
                          "copy that volume again from the packer's output")
    if size > head.file_size:
        raise VolumeError(f"{what} (volume {head.number} of {head.count}) has data after its end: "
                          f"{size} bytes, its header says {head.file_size}",
                          "copy that volume again from the packer's output")


def _missing_file(position: int, count: int, path: str) -> str:
    return f"volume {position} of {count} is missing: no file {path}"


def _file_sources(paths: Sequence[str], first_fh: BinaryIO) -> Iterator[VolumeSource]:
    yield VolumeSource(f"volume {paths[0]}", first_fh, alone=True, owned=False)
    for number, path in enumerate(paths[1:], start=2):
        try:
            fh = open(path, "rb")
        except OSError:  # it was there a moment ago (check_files)
            raise VolumeError(_missing_file(number, len(paths), path),
                              "copy every volume of the set next to the first one") from None
        yield VolumeSource(f"volume {path}", fh, alone=True, owned=True)


@contextlib.contextmanager
def _blaming(joined: JoinedVolumes) -> Iterator[BinaryIO]:
    """Yield the joined stream; a bundle error inside names the damaged volume, if any."""
    try:
        yield cast(BinaryIO, joined)
    except VolumeError:
        raise
    except BundleFormatError as exc:
        culprit = joined.blame()
        if culprit is not None:
            raise culprit from exc
        raise
    finally:
        joined.close()


@contextlib.contextmanager
def read_file(fh: BinaryIO, path: str, more: Sequence[str] = ()) -> Iterator[BinaryIO]:
    """The bundle in the open file ``fh``: itself, or the volume set it starts.

    ``more``: further volumes given in order (else they are found next to ``path``).
    """
    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # a FIFO, /dev/stdin: a stream
        if more:
            raise UsageError(f"{path} is not a regular file; only volume files come as several paths",
                             "pass one stream, with the volumes in order")
        with read_stream(fh) as stream:
            yield stream
        return
    prefix = fh.read(VOLUME_HEAD_SIZE)
    if not is_volume(prefix):
        if more:
            raise UsageError(f"{path} is a bundle, not a volume; only volumes come as several files",
                             "pass one bundle file")
        fh.seek(0)
        yield fh
        return
    head = parse_head(prefix, f"volume {path}")
    check_next(head, f"volume {path}", 1, None, 0, {})  # refuses any but volume 1
    _check_size(head, f"volume {path}", os.fstat(fh.fileno()).st_size)
    paths = [path, *more] if more else _located(path, head.count)
    check_files(paths, head)
    fh.seek(0)
    joined = JoinedVolumes(_file_sources(paths, fh),
                           lambda n, c: _missing_file(n, c, paths[n - 1] if n <= len(paths) else "?"))
    with _blaming(joined) as stream:
        yield stream


class _Prefixed:
    """``read(n)`` of bytes already read from a stream, then of the stream itself."""

    def __init__(self, prefix: bytes, raw: BinaryIO) -> None:
        self._prefix = prefix
        self._raw = raw

    def read(self, n: int = -1) -> bytes:
        if not self._prefix:
            return self._raw.read(n)
        if n < 0:
            out, self._prefix = self._prefix + self._raw.read(), b""
            return out
        out, self._prefix = self._prefix[:n], self._prefix[n:]
        return out  # a short read: every reader here loops until it has enough


@contextlib.contextmanager
def read_stream(raw: BinaryIO) -> Iterator[BinaryIO]:
    """A bundle, or a volume set in order, read front to back from ``raw`` (stdin).

    Without look-ahead each volume is checked as it arrives; the bundle reader's own
    rule (nothing becomes an image before the whole bundle is verified) covers the rest.
    """
    prefix = raw.read(len(MAGIC))
    while prefix and len(prefix) < len(MAGIC):
        more = raw.read(len(MAGIC) - len(prefix))
        if not more:
            break
        prefix += more
    stream = _Prefixed(prefix, raw)
    if not is_volume(prefix):
        yield cast(BinaryIO, stream)
        return
    fh = cast(BinaryIO, stream)

    def sources() -> Iterator[VolumeSource]:
        number = 1
        while True:
            yield VolumeSource(f"volume {number} on standard input", fh, alone=False, owned=False)
            number += 1

    joined = JoinedVolumes(sources(), lambda n, c: f"volume {n} of {c} is missing: standard input "
                                                   f"ended after volume {n - 1}")
    with _blaming(joined) as joined_stream:
        yield joined_stream


def volume_count(stream: BinaryIO) -> Optional[int]:
    """How many volumes a stream from ``read_file``/``read_stream`` joined (None: a bundle)."""
    return stream.count if isinstance(stream, JoinedVolumes) else None


def lone_volume(path: str) -> Optional[str]:
    """``path`` when it is a volume other than volume 1 (checked alone by ``verify``)."""
    if path == "-":
        return None
    try:
        with open(path, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            prefix = fh.read(VOLUME_HEAD_SIZE)
    except OSError:
        return None  # open_bundle says what is wrong with it
    if not is_volume(prefix):
        return None
    head = parse_head(prefix, f"volume {path}")
    return path if head.number != 1 else None


def verify_alone(path: str) -> Tuple[VolumeHead, str]:
    """Check one volume on its own (header, size, payload): a stick before the import."""
    what = f"volume {path}"
    with open(path, "rb") as fh:
        head = parse_head(fh.read(VOLUME_HEAD_SIZE), what)
        _check_size(head, what, os.fstat(fh.fileno()).st_size)
        hasher = xxhash.xxh3_128()
        left = head.length
        while left:
            piece = fh.read(min(left, 1 << 20))
            if not piece:
                raise VolumeError(f"{what} (volume {head.number} of {head.count}) is truncated")
            hasher.update(piece)
            left -= len(piece)
        trailer = fh.read(OVERHEAD - VOLUME_HEAD_SIZE)
    if trailer[16:] != VOLUME_END_MAGIC or trailer[:16] != hasher.digest():
        raise VolumeError(f"{what} (volume {head.number} of {head.count}) is damaged: "
                          "payload checksum mismatch", "copy that volume again from the packer's output")
    return head, what


class _SeekableSet:
    """Random access to a volume set's bundle bytes (``inspect``): read, seek, tell.

    Headers and sizes were checked (``check_files``); payload checksums are not, just as
    ``inspect`` does not read a single file's entries.
    """

    def __init__(self, paths: Sequence[str], heads: Sequence[VolumeHead]) -> None:
        self._paths = list(paths)
        self._heads = list(heads)
        self._pos = 0
        self._open: Optional[Tuple[int, BinaryIO]] = None
        self.total = heads[0].total

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.total}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.total - self._pos
        out: List[bytes] = []
        while n > 0 and self._pos < self.total:
            i = next(i for i, h in enumerate(self._heads) if h.offset + h.length > self._pos)
            head = self._heads[i]
            if self._open is None or self._open[0] != i:
                self.close()
                self._open = (i, open(self._paths[i], "rb"))
            fh = self._open[1]
            fh.seek(VOLUME_HEAD_SIZE + self._pos - head.offset)
            data = fh.read(min(n, head.offset + head.length - self._pos))
            if not data:
                raise VolumeError(f"volume {self._paths[i]} is truncated")
            out.append(data)
            self._pos += len(data)
            n -= len(data)
        return b"".join(out)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


@contextlib.contextmanager
def open_random(path: str) -> Iterator[BinaryIO]:
    """``path`` as a seekable bundle: the file itself, or the volume set it starts."""
    with open(path, "rb") as fh:
        prefix = fh.read(VOLUME_HEAD_SIZE)
        if not is_volume(prefix):
            fh.seek(0)
            yield fh
            return
        head = parse_head(prefix, f"volume {path}")
        check_next(head, f"volume {path}", 1, None, 0, {})
        _check_size(head, f"volume {path}", os.fstat(fh.fileno()).st_size)
    paths = _located(path, head.count)
    check_files(paths, head)
    heads = []
    for p in paths:
        with open(p, "rb") as vf:
            heads.append(parse_head(vf.read(VOLUME_HEAD_SIZE), f"volume {p}"))
    view = _SeekableSet(paths, heads)
    try:
        yield cast(BinaryIO, view)
    finally:
        view.close()
