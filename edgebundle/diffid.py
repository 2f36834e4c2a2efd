"""Layer blob bytes, as they stream into the cache -> (diff_id, tar size).

A layer's diff_id is the sha256 of its uncompressed tar. Computing it while the blob is
downloaded (the bytes are in memory anyway) spares the packer a second read and inflate
of every fetched layer. Pure: chunks in, a ``TarDigest`` or ``None`` out.

A blob that does not decompress gives ``None``, never an exception: the download itself
is fine (its digest is checked elsewhere), and ``resolve.uncompressed_digest`` then reads
the cached blob once more to say what is wrong with it.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import zstandard

from .compression import GZIP, MAGIC_BYTES, ZSTD, classify
from .files import IO_CHUNK


@dataclass(frozen=True)
class TarDigest:
    """What a layer blob decompresses to."""

    diff_id: str
    tar_size: int


class _Hashing:
    """The sink decompressed bytes go to (a file-like ``write`` for zstd's stream_writer)."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return len(data)


class DiffIdStream:
    """Feed a layer blob's bytes in order; ``result()`` at the end.

    Args:
        media_type: the layer's media type (its magic bytes decide when it says nothing).
    """

    def __init__(self, media_type: str) -> None:
        self._media_type = media_type
        self._head = b""  # the first bytes, until there are enough to classify
        self._kind: Optional[str] = None
        self._out = _Hashing()
        self._gz: Any = None  # zlib.Decompress of the current gzip member
        self._gz_fed = False  # has the current gzip member consumed any bytes?
        self._zstd: Any = None  # zstandard stream_writer
        self._failed = False

    def feed(self, data: bytes) -> None:
        if self._failed or not data:
            return
        if self._kind is None:
            self._head += data
            if len(self._head) < MAGIC_BYTES:
                return
            data, self._head = self._head, b""
            self._kind = classify(self._media_type, data[:MAGIC_BYTES])
            if self._kind == GZIP:
                self._gz = zlib.decompressobj(31)
            elif self._kind == ZSTD:
                self._zstd = zstandard.ZstdDecompressor().stream_writer(  # any write() will do
                    self._out, write_size=IO_CHUNK, write_return_read=True)  # type: ignore[arg-type]
        try:
            if self._kind == GZIP:
                self._gunzip(data)
            elif self._kind == ZSTD:
                self._zstd.write(data)
            else:
                self._out.write(data)
        except (zlib.error, zstandard.ZstdError, EOFError):
            self._failed = True

    def _gunzip(self, data: bytes) -> None:
        # Bounded output per call (IO_CHUNK): a highly compressible layer never balloons
        # memory; multi-member gzip (pigz, some builders) continues in unused_data.
        while data:
            self._gz_fed = True
            out = self._gz.decompress(data, IO_CHUNK)
            if out:
                self._out.write(out)
            if self._gz.eof:
                data = self._gz.unused_data
                self._gz = zlib.decompressobj(31)
                self._gz_fed = False
            else:
                data = self._gz.unconsumed_tail

    def result(self) -> Optional[TarDigest]:
        """The tar's digest and size; None if the blob did not decompress (or was cut)."""
        if self._kind is None:  # fewer bytes than the magic: classify what there is
            if classify(self._media_type, self._head) in (GZIP, ZSTD):
                return None  # a compressed stream of < 4 bytes is no stream
            self._out.write(self._head)
            self._head = b""
            self._kind = classify()
        if self._failed:
            return None
        if self._kind == GZIP and self._gz_fed:
            return None  # ended inside a gzip member
        if self._kind == ZSTD:
            try:
                self._zstd.flush()
            except zstandard.ZstdError:
                return None
        return TarDigest("sha256:" + self._out.hasher.hexdigest(), self._out.size)


class BackgroundDiffId:
    """A ``DiffIdStream`` fed on a thread of its own, so that the inflate and the tar's
    sha256 (a cold containerd pack's slowest work) run beside the download's receive,
    sha256 and file write instead of after each of them on the same thread.

    zlib, zstandard and hashlib release the GIL on large buffers, so on a second core
    the two halves overlap; on one core it costs a queue hand-off per chunk. The queue
    is bounded (``depth`` chunks): a slow inflate holds the download back rather than
    buffering the blob in memory. Use as a context manager; leaving it without
    ``result()`` (a failed download) stops the thread and discards what it had.
    """

    _END = b""  # feed() never queues empty chunks, so b"" can mark the end

    def __init__(self, media_type: str, depth: int = 8) -> None:
        self._stream = DiffIdStream(media_type)
        self._queue: "queue.Queue[bytes]" = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="diffid", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            data = self._queue.get()
            if data is self._END or not data:
                return
            if self._abandoned or self._error is not None:
                continue  # drain, so that a blocked feed() or close() can finish
            try:
                self._stream.feed(data)
            except BaseException as exc:  # e.g. MemoryError: raised again by result()
                self._error = exc

    def feed(self, data: bytes) -> None:
        if data:
            # bytes are immutable: the caller may reuse a bytearray or memoryview
            self._queue.put(data if type(data) is bytes else bytes(data))

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._queue.put(self._END)
            self._thread.join()

    def result(self) -> Optional[TarDigest]:
        """As ``DiffIdStream.result``, once every fed chunk is through."""
        self._finish()
        if self._error is not None:
            raise self._error
        return self._stream.result()

    def close(self) -> None:
        self._abandoned = True
        self._finish()

    def __enter__(self) -> "BackgroundDiffId":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
