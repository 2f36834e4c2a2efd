"""Feed bundle entries into a runtime's tar stream: the threaded sink, and its watchdog.

The tar writer itself (``TarStream``, ``blob_path``) lives in ``edgebundle/tarstream.py``
(standard library only, shared with ``archive``) and is re-exported here.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Optional

from ..tarstream import BLOCK, TarStream, blob_path

__all__ = ["BLOCK", "TarStream", "ThreadedSink", "blob_path", "last_line"]


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


def last_line(text: Optional[str]) -> str:
    lines = [l.strip() for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""
