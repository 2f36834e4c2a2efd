"""The device's own state directory: locks and the few records that must survive.

Default ``/var/lib/edgebundle``; ``--state-dir`` or ``$EDGEBUNDLE_STATE_DIR`` override it.
What lives here is small and written atomically (``files.atomic_file``, fsynced), so a
power cut leaves the old record or the new one:

- ``import.lock``: held (``flock``) for the whole of an import or a prune, so two never
  interleave on the same device; the holder's pid and kind are written into it for the
  message.
- ``imported/…``: the images imports published, which ``prune`` may remove (``history``).
- JSON records named by their users (e.g. the newest signed bundle imported per site).

Device-safe: standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import LockedError, UsageError
from .files import atomic_write

DEFAULT_STATE_DIR = "/var/lib/edgebundle"
STATE_DIR_ENV = "EDGEBUNDLE_STATE_DIR"


def try_flock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` if no other process holds one (False if one does)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return False
    return True


def state_dir_path(explicit: Optional[str] = None) -> Path:
    """``--state-dir``, else ``$EDGEBUNDLE_STATE_DIR``, else ``/var/lib/edgebundle``."""
    return Path(explicit or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


class StateDir:
    """One device state directory (created on first use, mode 0700)."""

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        self.path = Path(path)

    def ensure(self) -> Path:
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the state directory {self.path}: {exc.strerror}",
                             f"run as root, or pass --state-dir (or set ${STATE_DIR_ENV}) "
                             "to a writable directory") from None
        return self.path

    def read_json(self, name: str) -> Optional[Any]:
        """The record ``name``, or None when absent or unreadable (never trusted blindly)."""
        try:
            with open(self.path / name, "rb") as fh:
                return json.loads(fh.read(1024 * 1024))
        except (OSError, ValueError):
            return None

    def write_json(self, name: str, obj: Any) -> None:
        """Replace the record ``name`` atomically and durably."""
        target = self.ensure() / name
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(target, (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode())

    @contextlib.contextmanager
    def lock(self, name: str = "import.lock", what: str = "an import",
             where: str = "on this device") -> Iterator[None]:
        """Hold ``name`` exclusively for the block; refuse at once if another process does.

        ``what`` names the holder (written into the lock file, for the message another
        process gets): "an import", "a prune".

        ``flock`` locks die with their process, so a killed import never leaves the
        device locked.
        """
        path = self.ensure() / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not try_flock(fd):
                # "<pid> <what>" as the holder wrote it (an older holder wrote the pid only)
                said = os.pread(fd, 200, 0).decode(errors="replace").strip().split(None, 1)
                pid = said[0] if said else "unknown"
                holder = said[1] if len(said) > 1 else what
                raise LockedError(f"{holder} is already running {where} (pid {pid}, "
                                  f"lock {path})",
                                  "wait for it to finish and run again")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
            yield
        finally:
            os.close(fd)
