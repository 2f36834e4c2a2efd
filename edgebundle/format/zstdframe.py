"""Walk zstd frame structure to hold an entry to *exactly one* frame.

A decompressor alone cannot tell: skippable frames are skipped, and an empty frame
after the real one decodes to nothing. FORMAT.md says an entry's stored bytes are a
single zstd frame, so the reader follows the frame's block headers as bytes arrive
(RFC 8878, section 3.1.1) and refuses anything before, after or inside it that is not
that frame. Cost: a few operations per block (<= 128 KiB), never a copy of the data.
"""

from __future__ import annotations

from typing import Optional

from ..errors import BundleFormatError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DID_SIZE = (0, 1, 2, 4)
_FCS_SIZE = (0, 2, 4, 8)


class FrameWalker:
    def __init__(self, what: str) -> None:
        self.what = what
        self._state = "head"  # head -> block* -> done
        self._buf = b""
        self._skip = 0
        self._checksum = False

    def _fail(self, problem: str) -> BundleFormatError:
        return BundleFormatError(f"{self.what} {problem}",
                                 "the file is damaged or was not written by edgebundle")

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                continue
            if self._state == "done":
                raise self._fail("has data after its zstd frame")
            want = 5 if self._state == "head" else 3
            take = min(want - len(self._buf), n - i)
            self._buf += bytes(view[i:i + take])
            i += take
            if len(self._buf) < want:
                continue
            head, self._buf = self._buf, b""
            if self._state == "head":
                self._head(head)
            else:
                self._block(head)

    def _head(self, head: bytes) -> None:
        if head[:4] != ZSTD_MAGIC:
            raise self._fail("does not start with a zstd frame")
        fhd = head[4]
        if fhd & 0x08:
            raise self._fail("has a zstd frame header with the reserved bit set")
        single = bool(fhd & 0x20)
        fcs = _FCS_SIZE[fhd >> 6] or (1 if single else 0)
        self._checksum = bool(fhd & 0x04)
        self._skip = (0 if single else 1) + _DID_SIZE[fhd & 0x03] + fcs
        self._state = "block"

    def _block(self, head: bytes) -> None:
        value = head[0] | head[1] << 8 | head[2] << 16
        block_type = (value >> 1) & 0x03
        if block_type == 3:
            raise self._fail("has a reserved zstd block type")
        self._skip = 1 if block_type == 1 else value >> 3  # RLE blocks store one byte
        if value & 1:  # last block
            self._skip += 4 if self._checksum else 0
            self._state = "done"

    def finish(self) -> Optional[None]:
        if self._state != "done" or self._skip or self._buf:
            raise self._fail("ends inside its zstd frame")
        return None
