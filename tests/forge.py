"""Forging bundles in tests the way an attacker would: edit a record, then recompute every
checksum that is not a signature (record xxh3, index offsets, the footer's xxh3-128).

Shared by the unit and integration tests of signatures (tests/ is on sys.path through
its conftest.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Tuple

import msgpack
import xxhash

from edgebundle.format import TAG_ENTRY, TAG_INDEX
from edgebundle.format.framing import U64


def records(data: bytes) -> List[Tuple[int, int, int, Any]]:
    """(tag, offset, end, body) of every record up to the index, skipping entry chunks."""
    out, pos = [], 10
    while True:
        tag = data[pos]
        length = int.from_bytes(data[pos + 1:pos + 5], "big")
        end = pos + 5 + length + 8
        out.append((tag, pos, end, msgpack.unpackb(data[pos + 5:pos + 5 + length], raw=False)))
        if tag == TAG_INDEX:
            return out
        if tag == TAG_ENTRY:
            while True:  # chunks until the u32 0 end marker
                n = int.from_bytes(data[end:end + 4], "big")
                end += 4 if n == 0 else 12 + n
                if n == 0:
                    break
            out[-1] = (tag, pos, end, out[-1][3])
        pos = end


def record_bytes(tag: int, body: Any) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    return bytes([tag]) + len(raw).to_bytes(4, "big") + raw + U64.pack(xxhash.xxh3_64_intdigest(raw))


def refooter(data: bytes) -> bytes:
    """Recompute the index offset and the whole-file xxh3-128, as a forger would."""
    index = [r for r in records(data) if r[0] == TAG_INDEX][0]
    body = data[:index[2]] + b"F" + U64.pack(index[1])
    return body + xxhash.xxh3_128_digest(body) + b"EBDEND\r\n"


def replace_record(path: Path, which: Callable[[int, Any], bool], edit: Callable[[Any], Any]) -> None:
    """Rewrite the first record ``which`` selects with ``edit(body)`` (None: drop it)."""
    data = path.read_bytes()
    for tag, start, end, body in records(data):
        if which(tag, body):
            head_len = 5 + int.from_bytes(data[start + 1:start + 5], "big") + 8
            new = edit(body)
            replacement = b"" if new is None else record_bytes(tag, new)
            data = data[:start] + replacement + data[start + head_len:]
            break
    else:
        raise AssertionError("no such record")
    # Entry offsets in the index move when a record changes length: fix them too.
    fixed = bytearray(data)
    index = [r for r in records(data) if r[0] == TAG_INDEX][0]
    offsets = [r[1] for r in records(data) if r[0] == TAG_ENTRY]
    body = index[3]
    for e, off in zip(body["entries"], offsets):
        e["offset"] = off
    data = bytes(fixed[:index[1]]) + record_bytes(TAG_INDEX, body)
    path.write_bytes(refooter(data + b"F" + bytes(32)))


def is_tag(t: int) -> Callable[[int, Any], bool]:
    return lambda tag, body: tag == t
