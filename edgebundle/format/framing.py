"""Framing shared by writer and reader: records, chunks, msgpack with fixed options.

    Record := Tag(u8) || Length(u32be) || msgpack[Length] || xxh3_64(msgpack)(u64be)
    Chunk  := Length(u32be, 1..MAX_CHUNK_SIZE) || xxh3_64(data)(u64be) || data
    End    := u32be 0
"""

from __future__ import annotations

import struct
from typing import Any, Dict, cast

import msgpack
import xxhash

from ..errors import BundleFormatError
from . import MAX_RECORD_SIZE

U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
CHUNK_HEAD = struct.Struct(">IQ")
RECORD_HEAD = struct.Struct(">BI")


def pack_record(tag: int, obj: Dict[str, Any]) -> bytes:
    body = cast(bytes, msgpack.packb(obj, use_bin_type=True))
    if len(body) > MAX_RECORD_SIZE:
        raise ValueError(f"record of {len(body)} bytes exceeds the {MAX_RECORD_SIZE} limit")
    return RECORD_HEAD.pack(tag, len(body)) + body + U64.pack(xxhash.xxh3_64_intdigest(body))


def unpack_body(body: bytes, what: str) -> Dict[str, Any]:
    """Decode a record body; any malformation becomes ``BundleFormatError``."""
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types; all mean the same here
        raise BundleFormatError(f"bundle {what} is not valid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise BundleFormatError(f"bundle {what} is not a map")
    return obj
