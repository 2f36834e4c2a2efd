"""The packer's fleet bundles: one per state, kept while a site still needs it.

Layout under the packer home::

    bundles/.lock                  held (flock) while a bundle is looked up or packed,
                                   and while unneeded ones are removed
    bundles/<key>/<key>.ebundle    the bundle (its name is also its name on devices)
    bundles/<key>/meta.json        what it holds: size, entries, images, plan bytes
    bundles/<key>/needs/<site>     one empty file per site whose last state was <key>

A site needs the bundle of the state it was last seen in until it is done; a failed
site keeps its need, so the next run finds the same bytes and the device's partial
upload resumes. ``collect`` removes bundles nobody needs. Two sync processes share
the cache safely: packing and collecting hold the lock, and a need is written
under it (so a bundle is never collected between being found and being claimed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from ..files import atomic_write
from ..specs import check_site_name

log = logging.getLogger(__name__)

SUFFIX = ".ebundle"


@dataclass(frozen=True)
class FleetBundle:
    """A packed bundle for one state."""

    key: str
    path: str
    bundle_bytes: int
    entries: int
    images: int
    ship_registry_bytes: int  # what the plan ships, at registry sizes
    full_registry_bytes: int


class BundleCache:
    """``home/bundles``; thread-safe within a process, flock-safe across processes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._mutex = threading.Lock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the cache (blocking: the holder is packing or collecting)."""
        with self._mutex:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _dir(self, key: str) -> Path:
        return self.root / key

    def bundle_path(self, key: str) -> Path:
        return self._dir(key) / (key + SUFFIX)

    def lookup(self, key: str) -> Optional[FleetBundle]:
        """The bundle packed for ``key``, if it is there whole (call under ``locked``)."""
        try:
            meta = json.loads((self._dir(key) / "meta.json").read_text())
            bundle = FleetBundle(**meta)
            size = os.stat(bundle.path).st_size
        except (OSError, ValueError, TypeError):
            return None
        if bundle.key != key or size != bundle.bundle_bytes:
            log.warning("fleet bundle %s is damaged (%d bytes, meta says %d): packing it again",
                        key, size, bundle.bundle_bytes)
            return None
        return bundle

    def get_or_pack(self, key: str, site: str, pack: Callable[[Path], FleetBundle]) -> FleetBundle:
        """The bundle of ``key`` (packed by ``pack(path)`` if missing), claimed for ``site``."""
        with self.locked():
            bundle = self.lookup(key)
            if bundle is None:
                self._dir(key).mkdir(parents=True, exist_ok=True)
                bundle = pack(self.bundle_path(key))
                atomic_write(self._dir(key) / "meta.json",
                             (json.dumps(asdict(bundle), sort_keys=True) + "\n").encode())
                log.info("fleet bundle %s: packed, %d bytes", key, bundle.bundle_bytes)
            else:
                log.info("fleet bundle %s: reused for site %s", key, site)
            self._claim(key, site)
            return bundle

    def _claim(self, key: str, site: str) -> None:
        check_site_name(site)
        for other in self._keys():
            if other != key:
                with contextlib.suppress(FileNotFoundError):
                    (self._dir(other) / "needs" / site).unlink()
        needs = self._dir(key) / "needs"
        needs.mkdir(exist_ok=True)
        (needs / site).touch()

    def release(self, site: str) -> None:
        """``site`` is done: it needs no bundle until its state changes again."""
        check_site_name(site)
        for key in self._keys():
            with contextlib.suppress(FileNotFoundError):
                (self._dir(key) / "needs" / site).unlink()

    def claimed(self, site: str) -> bool:
        """Whether ``site`` still needs some bundle (its last sync did not finish)."""
        check_site_name(site)
        return any((self._dir(key) / "needs" / site).exists() for key in self._keys())

    def needed_by(self, key: str) -> List[str]:
        try:
            return sorted(p.name for p in (self._dir(key) / "needs").iterdir())
        except FileNotFoundError:
            return []

    def collect(self) -> List[str]:
        """Remove every bundle no site needs; their keys."""
        removed = []
        with self.locked():
            for key in self._keys():
                if not self.needed_by(key):
                    shutil.rmtree(self._dir(key), ignore_errors=True)
                    removed.append(key)
        if removed:
            log.info("fleet bundles no site needs any more, removed: %s", ", ".join(removed))
        return removed

    def _keys(self) -> List[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
