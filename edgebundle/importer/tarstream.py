"""Write bundle entries into a tar stream without buffering them.

Both runtimes take images as a tar (containerd: an OCI layout; Docker: a docker-archive).
The bundle announces each entry's decoded size up front, which is exactly what a tar
header needs, so entries flow from the bundle into the runtime one piece at a time:
header, the pieces as they are decoded, padding. No tarfile stream in between (it
copied every byte once more, measured in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import queue
import tarfile
import threading
import time
from typing import Any, Callable, Iterable, Optional

BLOCK = 512


class TarStream:
    """A streaming tar writer with deterministic PAX headers."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink

    def add(self, name: str, size: int, pieces: Iterable[bytes]) -> None:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        self._sink.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        written = 0
        # Running the iterator to its end matters: the bundle entry checks its sha256 there.
        for piece in pieces:
            written += len(piece)
            if written > size:
                raise ValueError(f"tar member {name} got more than its {size} bytes")
            self._sink.write(piece)
        if written != size:
            raise ValueError(f"tar member {name} got {written} of its {size} bytes")
        if size % BLOCK:
            self._sink.write(b"\0" * (BLOCK - size % BLOCK))

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add(name, len(data), [data])

    def close(self) -> None:
        self._sink.write(b"\0" * (2 * BLOCK))


class ThreadedSink:
    """Hands writes to a background thread.

    The importer's thread decodes and hashes while this one feeds the runtime: zstd,
    sha256 and pipe/socket writes all release the GIL, so on a 2-core device they
    overlap instead of taking turns. ``depth`` bounds the pieces in flight (memory).

    ``stall``: if one write makes no progress for that many seconds (the runtime stopped
    reading: containerd frozen, a hung daemon), ``on_stall`` is called from a watchdog
    thread; it must break the sink (kill ctr, shut the socket) so the write fails and
    the import ends with an error instead of hanging until the runtime comes back.
    """

    def __init__(self, sink: Any, depth: int = 8, stall: Optional[float] = None,
                 on_stall: Optional[Callable[[], None]] = None) -> None:
        self._sink = sink
        self._queue: "queue.Queue[Optional[bytes]]" = queue.Queue(depth)
        self._error: Optional[BaseException] = None
        self._busy_since: Optional[float] = None  # monotonic time the current write began
        self._done = threading.Event()
        self.stalled = False
        self._thread = threading.Thread(target=self._run, name="edgebundle-sink", daemon=True)
        self._thread.start()
        if stall is not None and on_stall is not None:
            threading.Thread(target=self._watch, args=(stall, on_stall),
                             name="edgebundle-stall-watchdog", daemon=True).start()

    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if self._error is None:
                    self._busy_since = time.monotonic()
                    try:
                        self._sink.write(item)
                    except BaseException as exc:  # re-raised in the importer's thread
                        self._error = exc
                    finally:
                        self._busy_since = None
        finally:
            self._done.set()

    def _watch(self, stall: float, on_stall: Callable[[], None]) -> None:
        while not self._done.wait(min(1.0, stall / 4)):
            since = self._busy_since
            if since is not None and time.monotonic() - since > stall:
                self.stalled = True
                on_stall()
                return

    def write(self, data: bytes) -> int:
        if self._error is not None:
            raise self._error
        self._queue.put(data)
        return len(data)

    def close(self) -> None:
        """Wait until everything was written; raise what the writer thread hit."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop after the sink was broken (ctr killed, socket shut): drain and join."""
        self._error = self._error or RuntimeError("aborted")
        while True:
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
        self._thread.join(timeout=30)


def blob_path(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def last_line(text: Optional[str]) -> str:
    lines = [l.strip() for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""
