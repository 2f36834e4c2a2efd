"""What a partly uploaded (staged) bundle on the device holds, block by block.

Device side (stdlib + xxhash, Python 3.9). The packer's resumable upload runs
``edgebundle staged PATH --block-size N --json`` on the device before it trusts a
``.part`` file left by an earlier, interrupted upload: the size alone cannot show
a corrupted or half-flushed block, and reading the file back over a metered link
would cost as much as sending it again. The output is one JSON object::

    {"path": ..., "exists": bool, "size": int, "block_size": int,
     "blocks": ["<xxh3-128 hex of block 0>", ...], "free_bytes": int}

``free_bytes`` is what an unprivileged writer may still use in PATH's directory
(``statvfs`` ``f_bavail``), for the packer's space pre-flight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import xxhash

MIN_BLOCK = 4096
MAX_BLOCK = 64 * 1024 * 1024


@dataclass(frozen=True)
class StagedFile:
    path: str
    exists: bool
    size: int
    block_size: int
    blocks: Tuple[str, ...]  # xxh3-128 hex digest of each block; the last may be short
    free_bytes: int

    def to_json(self) -> Dict[str, Any]:
        return {"path": self.path, "exists": self.exists, "size": self.size, "block_size": self.block_size,
                "blocks": list(self.blocks), "free_bytes": self.free_bytes}


def block_digests(fh: Any, block_size: int) -> Tuple[str, ...]:
    """xxh3-128 hex digest of each ``block_size`` block read from ``fh`` to its end."""
    out: List[str] = []
    while True:
        data = fh.read(block_size)
        if not data:
            return tuple(out)
        # A short read before EOF (pipes) must not shift block boundaries.
        while len(data) < block_size:
            more = fh.read(block_size - len(data))
            if not more:
                break
            data += more
        out.append(xxhash.xxh3_128_hexdigest(data))


def describe(path: str, block_size: int) -> StagedFile:
    """The staged file at ``path`` (absent: size 0, no blocks) and its directory's free space.

    Raises:
        ValueError: ``block_size`` out of range.
        OSError: The file or its directory cannot be read.
    """
    if not MIN_BLOCK <= block_size <= MAX_BLOCK:
        raise ValueError(f"block size {block_size} is not between {MIN_BLOCK} and {MAX_BLOCK}")
    st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    free = st.f_bavail * st.f_frsize
    try:
        with open(path, "rb") as fh:
            blocks = block_digests(fh, block_size)
            size = fh.tell()
    except FileNotFoundError:
        return StagedFile(path, False, 0, block_size, (), free)
    return StagedFile(path, True, size, block_size, blocks, free)
