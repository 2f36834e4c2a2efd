"""Framing shared by writer and reader: records, chunks, msgpack with fixed options.

    Record := Tag(u8) || Length(u32be) || msgpack[Length] || xxh3_64(msgpack)(u64be)
    Chunk  := Length(u32be, 1..MAX_CHUNK_SIZE) || xxh3_64(data)(u64be) || data
    End    := u32be 0
"""

from __future__ import annotations

import struct
from typing import Any, Dict, List, cast

import msgpack
import xxhash

from ..errors import BundleFormatError
from . import (MAX_ENTRY_RECORD_SIZE, MAX_RECORD_OBJECTS, MAX_RECORD_SIZE, MAX_STRING,
               TAG_ENTRY)

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
CHUNK_HEAD = struct.Struct(">IQ")
RECORD_HEAD = struct.Struct(">BI")


def pack_record(tag: int, obj: Dict[str, Any]) -> bytes:
    body = cast(bytes, msgpack.packb(obj, use_bin_type=True))
    if len(body) > record_limit(tag):
        raise ValueError(f"record of {len(body)} bytes exceeds the {record_limit(tag)} limit")
    return RECORD_HEAD.pack(tag, len(body)) + body + U64.pack(xxhash.xxh3_64_intdigest(body))


_HINT = ("the bundle breaks docs/FORMAT.md, so it was not written by a compatible edgebundle "
         "(or was altered after packing): repack it")


class _TooManyObjects(Exception):
    pass


class _Budget:
    """Counts decoded objects as msgpack builds containers, and stops it at the limit.

    Every value sits in a container (a record is one map), so charging each container
    1 + its items (a map's pairs: 2) counts every object. msgpack calls the hooks as each
    container is completed, so at most one container (<= the limit's items) is built
    past the budget before decoding stops: memory stays ~70 bytes x the limit.
    """

    def __init__(self, limit: int) -> None:
        self.left = limit

    def list_hook(self, items: List[Any]) -> List[Any]:
        self.left -= 1 + len(items)
        if self.left < 0:
            raise _TooManyObjects
        return items

    def object_hook(self, pairs: Dict[str, Any]) -> Dict[str, Any]:
        self.left -= 1 + 2 * len(pairs)
        if self.left < 0:
            raise _TooManyObjects
        return pairs


def unpack_body(body: bytes, what: str, max_objects: int = MAX_RECORD_OBJECTS) -> Dict[str, Any]:
    """Decode a record body; any malformation or excess becomes ``BundleFormatError``."""
    budget = _Budget(max_objects)
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True,
                              list_hook=budget.list_hook, object_hook=budget.object_hook,
                              max_str_len=MAX_STRING, max_bin_len=len(body),
                              max_array_len=max_objects, max_map_len=max_objects,
                              max_ext_len=0)
    except _TooManyObjects:
        raise BundleFormatError(f"bundle {what} decodes to more than {max_objects} msgpack "
                                "objects (MAX_RECORD_OBJECTS)", _HINT) from None
    except Exception as exc:  # msgpack raises a zoo of types; all mean the same here
        raise BundleFormatError(f"bundle {what} is not valid msgpack: {_brief(exc)}", _HINT) from None
    if not isinstance(obj, dict):
        raise BundleFormatError(f"bundle {what} is not a map", _HINT)
    return obj


def _brief(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__  # StackError has no message
    return text if len(text) <= 120 else text[:117] + "..."


def record_limit(tag: int) -> int:
    """The largest body a record with ``tag`` may have."""
    return MAX_ENTRY_RECORD_SIZE if tag == TAG_ENTRY else MAX_RECORD_SIZE
