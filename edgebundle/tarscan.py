"""Where a layer tar keeps its file contents: regular members with offsets and digests.

The delta encoder needs two facts about a tar: which byte ranges are file contents
(they may come from a base), and what everything else is (headers of every format,
padding, links, whiteouts: shipped as literal bytes, so no tar dialect can be rebuilt
wrongly). ``tarfile`` finds the members; we only keep, per regular member, the range
``[data_offset, data_offset + size)`` it reads contents from. Sparse members are left
literal.

Packer side (the device never parses a tar).
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, List, Optional, Tuple

from .files import IO_CHUNK


@dataclass(frozen=True)
class Member:
    """One regular file of a layer tar."""

    path: Optional[str]  # normalised (see ``normalise``); None if no device could look it up
    data_offset: int
    size: int
    digest: str  # sha256 of the contents


@dataclass(frozen=True)
class TarScan:
    size: int  # bytes of the whole tar
    files: Tuple[Member, ...]  # regular members, in tar order

    def last_by_path(self) -> "dict[str, Member]":
        """Each path's last regular member: what extracting the layer leaves there."""
        out: dict[str, Member] = {}
        for m in self.files:
            if m.path is not None:
                out[m.path] = m
        return out


def normalise(name: str) -> Optional[str]:
    """A member name as a path relative to the layer root, or None if it has none."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or "\0" in name:
        return None
    return "/".join(parts)


def scan(fh: BinaryIO) -> TarScan:
    """The regular members of the tar open in ``fh`` (seekable), hashed."""
    files: List[Member] = []
    fh.seek(0)
    with tarfile.open(fileobj=fh, mode="r:") as tar:
        infos = list(tar)
    for info in infos:
        if not info.isreg() or info.issparse() or info.size == 0:
            continue
        files.append(Member(normalise(info.name), info.offset_data, info.size,
                            _digest(fh, info.offset_data, info.size)))
    fh.seek(0, 2)
    return TarScan(fh.tell(), tuple(files))


def _digest(fh: BinaryIO, offset: int, size: int) -> str:
    hasher = hashlib.sha256()
    fh.seek(offset)
    left = size
    while left:
        piece = fh.read(min(IO_CHUNK, left))
        if not piece:
            raise ValueError("tar ends inside a member")
        hasher.update(piece)
        left -= len(piece)
    return "sha256:" + hasher.hexdigest()


def read_range(fh: BinaryIO, offset: int, size: int) -> bytes:
    fh.seek(offset)
    data = fh.read(size)
    if len(data) != size:
        raise ValueError("tar ends inside a member")
    return data
