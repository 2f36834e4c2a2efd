"""Real faults for integration tests: a link that drops mid-transfer, a small disk.

Shared by test_upload_real (one upload) and the gateway fleet (tests/integration/fleet.py).
No pytest import here: failures to set a fault up are ``ServiceError``s, which the
fixtures turn into a skip or (in CI) a failure like any service that cannot start.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from services import ServiceError


class CuttingProxy:
    """127.0.0.1:port → 127.0.0.1:target_port; the link drops after ``cut_after`` bytes.

    Bytes from the client to the target are counted per connection: the first
    connection that sends ``cut_after`` bytes is closed on both sides mid-stream, as a
    cellular link that goes down mid-upload (short connections, e.g. an inventory
    report, pass). Or the cut comes when ``cut_when()`` turns true (asked before each
    client chunk is forwarded), e.g. once the device's partial file holds some blocks:
    bytes forwarded are not bytes written, since sshd and sftp-server buffer and lag
    behind under load. After that cut the link stays down: every open connection drops and
    new ones are accepted and closed at once (so retries within the same run fail
    too), until ``heal()`` makes the proxy forward everything again.
    """

    def __init__(self, target_port: int, cut_after: int = 1 << 62,
                 cut_when: Optional[Callable[[], bool]] = None) -> None:
        self.target_port = target_port
        self.cut_after = cut_after
        self.cut_when = cut_when
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.forwarded = 0  # client → target bytes, all connections together
        self.cuts = 0  # connections cut mid-stream
        self.refused = 0  # connections closed at once while the link was down
        self.healed = False
        self._lock = threading.Lock()
        self._open: List[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def down(self) -> bool:
        return self.cuts > 0 and not self.healed

    def heal(self) -> None:
        """The link is back: forward every later connection in full."""
        self.healed = True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.down:
                self.refused += 1
                _close(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
            server.settimeout(None)
        except OSError:
            _close(client)
            return
        with self._lock:
            self._open += [client, server]
        up = threading.Thread(target=self._pump, args=(server, client, False), daemon=True)
        up.start()
        self._pump(client, server, True)
        up.join(5)
        with self._lock:
            self._open = [s for s in self._open if s not in (client, server)]

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        cut = False
        sent = 0  # this connection's client → target bytes
        try:
            while not self.down:
                data = src.recv(65536)
                if not data:
                    break
                if count and not self.healed:
                    if self.cut_when is not None and self.cut_when():
                        data, cut = b"", True
                    else:
                        data = data[:max(self.cut_after - sent, 0)]
                        sent += len(data)
                        cut = sent >= self.cut_after
                    with self._lock:
                        self.forwarded += len(data)
                        self.cuts += cut
                dst.sendall(data)
                if cut:
                    break
        except OSError:
            pass
        if cut:  # the link is down: every connection through it drops, not just this one
            self._drop_all()
        _close(src)
        _close(dst)

    def _drop_all(self) -> None:
        with self._lock:
            for s in self._open:
                _close(s)
            self._open = []

    def close(self) -> None:
        _close(self.listener)
        self._drop_all()


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()


def mount_tmpfs(path: Path, size_mb: int) -> Path:
    """A real small filesystem at ``path`` (a full device disk); ``umount(path)`` undoes it."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise ServiceError(f"cannot mount a tmpfs at {path}: {r.stderr.strip()}")
    return path


def umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size_mb: int) -> Iterator[Path]:
    mount_tmpfs(path, size_mb)
    try:
        yield path
    finally:
        umount(path)
