"""The op stream of a delta entry (FORMAT.md, "Delta entries"): typed ops and their codec.

A delta entry's decoded bytes are a sequence of msgpack arrays, each one op; applied in
order, their outputs concatenate to the target tar, byte for byte:

* ``[0, data]`` literal bytes (tar headers, padding, new file contents);
* ``[1, file]`` the whole content of base file ``file`` (an index into the entry's files);
* ``[2, file, offset, length, size, frame]`` ``size`` bytes decoded from the zstd
  ``frame`` with base file ``file``'s bytes ``[offset, offset + length)`` as its
  raw-content dictionary (a patch against one window of a similar file);
* ``[3, base, offset, length]`` bytes ``[offset, offset + length)`` of the tar of base
  layer ``base`` (headers and contents of members that did not change);
* ``[4, base, path, size, xxh3]`` defines the next base file (``file`` counts these
  from 0): a regular file of layer ``base`` whose size and xxh3-128 the device checks
  before first use.
  It produces no bytes.

Every op is bounded (``MAX_LITERAL``, ``MAX_PATCH_WINDOW``, ``MAX_PATCH_OUTPUT``), so a
device applies any delta, whatever the layer or file sizes, in a few windows of memory.
Reading raises only ``BundleFormatError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Union

import msgpack

from ..errors import BundleFormatError
from . import (MAX_LITERAL, MAX_PATCH_OUTPUT, MAX_PATCH_WINDOW, OP_COPY, OP_FILE, OP_LITERAL,
               OP_PATCH, OP_RANGE)
from .records import SPEC_HINT


@dataclass(frozen=True)
class Literal:
    data: bytes


@dataclass(frozen=True)
class Copy:
    file: int


@dataclass(frozen=True)
class Patch:
    file: int
    offset: int
    length: int
    size: int
    frame: bytes


@dataclass(frozen=True)
class BaseFile:
    """A regular file of a base layer, as extracting its tar leaves it; verified before use."""

    base: int  # index into DeltaHead.bases
    path: str  # relative, normalised: no leading '/', no empty, '.' or '..' component
    size: int
    digest: str  # "xxh3-128:<hex>" of the contents (16 raw bytes on the wire)


@dataclass(frozen=True)
class Range:
    base: int
    offset: int
    length: int


Op = Union[Literal, Copy, Patch, Range, BaseFile]

# The largest op on the wire: a patch frame never needs to be bigger than its output
# plus zstd's worst-case overhead (a stored block per 128 KiB), and headers are small.
XXH3 = "xxh3-128:"

MAX_OP_BYTES = MAX_PATCH_OUTPUT + MAX_PATCH_OUTPUT // 1024 + 4096


def encode(op: Op) -> bytes:
    """One op as its wire bytes."""
    if isinstance(op, Literal):
        if len(op.data) > MAX_LITERAL:
            raise ValueError(f"literal of {len(op.data)} bytes exceeds {MAX_LITERAL}")
        obj: list[object] = [OP_LITERAL, op.data]
    elif isinstance(op, Copy):
        obj = [OP_COPY, op.file]
    elif isinstance(op, Range):
        obj = [OP_RANGE, op.base, op.offset, op.length]
    elif isinstance(op, BaseFile):
        obj = [OP_FILE, op.base, op.path, op.size, bytes.fromhex(op.digest[len(XXH3):])]
    else:
        if op.length > MAX_PATCH_WINDOW or op.size > MAX_PATCH_OUTPUT:
            raise ValueError("patch window or output too large")
        obj = [OP_PATCH, op.file, op.offset, op.length, op.size, op.frame]
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


def read_ops(pieces: Iterable[bytes], where: str) -> Iterator[Op]:
    """Decode an op stream, refusing anything malformed or over the bounds."""
    arrays = [0]  # arrays msgpack completed since the last op

    def one_array_per_op(items: list[object]) -> list[object]:
        # An op is one flat array. Without this, one 16 MiB op of nested 6-item arrays
        # would decode to millions of lists (~1 GB) before _op could refuse it.
        arrays[0] += 1
        if arrays[0] > 1:
            raise ValueError("nested arrays in an op")
        return items

    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=2 * MAX_OP_BYTES,
                                max_bin_len=MAX_OP_BYTES, max_str_len=MAX_PATH, max_array_len=6,
                                max_map_len=0, max_ext_len=0, list_hook=one_array_per_op)
    fed = 0
    try:
        for piece in pieces:
            unpacker.feed(piece)
            fed += len(piece)
            for obj in unpacker:
                arrays[0] = 0
                yield _op(obj, where)
    except BundleFormatError:
        raise
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            msgpack.BufferFull) as exc:
        raise BundleFormatError(f"{where}: malformed op stream ({exc})", SPEC_HINT) from None
    if unpacker.tell() != fed:  # bytes fed but never made into an op: a torn last op
        raise BundleFormatError(f"{where}: op stream ends inside an op", SPEC_HINT)


def _int(value: object, where: str, what: str, maximum: int = 1 << 62) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise BundleFormatError(f"{where}: op field {what} is {value!r:.40}, not an integer "
                                f"0..{maximum}", SPEC_HINT)
    return value


def _op(obj: object, where: str) -> Op:
    if not isinstance(obj, list) or not obj:
        raise BundleFormatError(f"{where}: an op is not a non-empty array", SPEC_HINT)
    code = obj[0]
    if code == OP_LITERAL and len(obj) == 2 and isinstance(obj[1], bytes):
        if len(obj[1]) > MAX_LITERAL:
            raise BundleFormatError(f"{where}: literal of {len(obj[1])} bytes exceeds "
                                    f"{MAX_LITERAL}", SPEC_HINT)
        return Literal(obj[1])
    if code == OP_COPY and len(obj) == 2:
        return Copy(_int(obj[1], where, "file"))
    if code == OP_FILE and len(obj) == 5 and isinstance(obj[4], bytes) and len(obj[4]) == 16:
        return BaseFile(_int(obj[1], where, "base"), _path(obj[2], where),
                        _int(obj[3], where, "size"), XXH3 + obj[4].hex())
    if code == OP_RANGE and len(obj) == 4:
        return Range(_int(obj[1], where, "base"), _int(obj[2], where, "offset"),
                     _int(obj[3], where, "length"))
    if code == OP_PATCH and len(obj) == 6 and isinstance(obj[5], bytes):
        return Patch(_int(obj[1], where, "file"), _int(obj[2], where, "offset"),
                     _int(obj[3], where, "length", MAX_PATCH_WINDOW),
                     _int(obj[4], where, "size", MAX_PATCH_OUTPUT), obj[5])
    raise BundleFormatError(f"{where}: unknown or malformed op {_brief(obj)}", SPEC_HINT)


MAX_PATH = 4096


def _path(value: object, where: str) -> str:
    """A base file's path: relative and normalised, or the op stream is malformed."""
    if not isinstance(value, str):
        raise BundleFormatError(f"{where}: a base file path is {type(value).__name__}", SPEC_HINT)
    parts = value.split("/")
    if (not value or len(value) > MAX_PATH or "\0" in value or value.startswith("/")
            or any(p in ("", ".", "..") for p in parts)):
        raise BundleFormatError(f"{where}: base file path {value[:80]!r} is not relative and "
                                "normalised (no '.', '..' or empty components)", SPEC_HINT)
    return value


def _brief(obj: list[object]) -> str:
    return f"code {obj[0]!r:.20} with {len(obj)} field(s)"
