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

import tarfile
from dataclasses import dataclass
from typing import BinaryIO, List, Optional, Tuple

import xxhash

from .files import IO_CHUNK

XXH3 = "xxh3-128:"  # how member digests are written (not OCI digests: see _digests)


@dataclass(frozen=True)
class Member:
    """One regular file of a layer tar."""

    path: Optional[str]  # normalised (see ``normalise``); None if no device could look it up
    data_offset: int
    size: int
    digest: str  # "xxh3-128:<hex>" of the contents


@dataclass(frozen=True)
class Region:
    """One member's bytes, ``[offset, end)``: extension headers, header, contents, padding."""

    offset: int
    end: int
    digest: str  # xxh3-128 of those bytes: equal regions can be copied from a base's tar
    file: Optional[Member] = None  # the regular file it holds, if any


@dataclass(frozen=True)
class TarScan:
    size: int  # bytes of the whole tar
    regions: Tuple[Region, ...]  # every member, in tar order; the end-of-archive is not one

    @property
    def files(self) -> Tuple[Member, ...]:
        """Regular members with contents, in tar order."""
        return tuple(r.file for r in self.regions if r.file is not None)

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
    """Every member of the tar open in ``fh`` (seekable), hashed in one pass."""
    fh.seek(0)
    with tarfile.open(fileobj=fh, mode="r:") as tar:
        infos = list(tar)
        end_of_members = tar.offset  # where the end-of-archive blocks (if any) begin
    fh.seek(0, 2)
    size = fh.tell()
    regions: List[Region] = []
    bounds = [i.offset for i in infos[1:]] + [end_of_members]
    for info, end in zip(infos, bounds):
        regular = info.isreg() and not info.issparse() and info.size > 0
        content = (info.offset_data, info.offset_data + info.size) if regular else (end, end)
        region_digest, file_digest = _digests(fh, info.offset, end, content)
        member = Member(normalise(info.name), info.offset_data, info.size, file_digest) \
            if regular else None
        regions.append(Region(info.offset, end, region_digest, member))
    return TarScan(size, tuple(regions))


def _digests(fh: BinaryIO, start: int, end: int, content: Tuple[int, int]) -> Tuple[str, str]:
    """xxh3-128 of ``[start, end)`` and of its ``content`` sub-range, in one read.

    These only find candidates (equal regions, equal files); the packer rebuilds every
    delta and checks it against the target's sha256 diff_id, and the device checks the
    rebuilt tar the same way, so a match never has to be cryptographic. xxh3 is ~10x
    faster than sha256 here, and half the bytes per file in a bundle.
    """
    whole, inner = xxhash.xxh3_128(), xxhash.xxh3_128()
    fh.seek(start)
    pos = start
    while pos < end:
        piece = fh.read(min(IO_CHUNK, end - pos))
        if not piece:
            raise ValueError("tar ends inside a member")
        whole.update(piece)
        lo, hi = max(pos, content[0]), min(pos + len(piece), content[1])
        if lo < hi:
            inner.update(piece[lo - pos:hi - pos])
        pos += len(piece)
    return XXH3 + whole.hexdigest(), XXH3 + inner.hexdigest()


def read_range(fh: BinaryIO, offset: int, size: int) -> bytes:
    fh.seek(offset)
    data = fh.read(size)
    if len(data) != size:
        raise ValueError("tar ends inside a member")
    return data
