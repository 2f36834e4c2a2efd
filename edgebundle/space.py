"""Disk pre-flight: will what we are about to write fit where it goes?

Device side (``ImportSpace``) and packer side (``check_packer``) share the arithmetic:
each ``Need`` is bytes bound for a directory; needs on the same filesystem are added up
and compared with the free space there (``statvfs``: ``f_bavail * f_frsize``, what an
unprivileged writer may use, so root's reserved blocks stay a cushion), less a safety
margin. A refusal is a ``SpaceError`` (exit 14) with both numbers and a hint.

What an import adds (FORMAT.md, header key ``unpacked_bytes``):

* containerd keeps the blob (content store) *and* unpacks it into a snapshot about the
  size of its tar;
* Docker's ``load`` first untars the whole archive into ``<DockerRootDir>/tmp`` and only
  then registers the layers, so at its peak it holds the tars twice (the archive copy
  and the layer directories);
* a delta that copies ranges of a base layer's tar spools that tar to the temp dir.

The header's numbers are estimates the packer wrote; a bundle may lie. So the import
also checks each entry's declared size before streaming it (``before_entry``: the
decoded length can never exceed it), and an ENOSPC the runtime reports anyway becomes
the same one-line ``SpaceError`` (``disk_full``), after the import was aborted.

Device-safe: standard library only.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .errors import EdgebundleError, SpaceError
from .format import LAYER_FORM_TAR

log = logging.getLogger(__name__)

#: The margin kept free beyond the estimate: at least this many bytes...
MIN_MARGIN = 16 * 1024 * 1024
#: ...or this fraction of the estimate, whichever is larger. Why: files round up to
#: whole blocks, directories and metadata grow with them (containerd's bolt database,
#: overlay work dirs, Docker's tar-split records are a few percent of a layer), bytes
#: still queued to the runtime are not yet visible in statvfs, and a device whose root
#: filesystem is filled to the last byte stops logging and may stop booting.
MARGIN_FRACTION = 0.05
#: Without ``unpacked_bytes`` (bundles of older packers), a compressed layer blob is
#: assumed to unpack to this many times its size (gzip of typical layers: 2-3x).
UNPACK_RATIO = 2.5

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: How runtimes word a full disk in the messages we relay (Go's syscall error strings).
_FULL_MARKERS = ("no space left on device", "disk quota exceeded")


# ---------------------------------------------------------------------------
# Pure arithmetic


@dataclass(frozen=True)
class Need:
    """``content`` + ``unpacked`` bytes that will be written under ``path``."""

    path: str
    label: str  # "containerd content store", "temp dir", ...
    content: int = 0
    unpacked: int = 0

    @property
    def total(self) -> int:
        return self.content + self.unpacked


@dataclass(frozen=True)
class Shortfall:
    """One filesystem that cannot hold its needs."""

    where: str  # "containerd at /var/lib/containerd"
    free: int
    content: int
    unpacked: int
    margin: int

    @property
    def needed(self) -> int:
        return self.content + self.unpacked + self.margin


def margin(total: int) -> int:
    return max(MIN_MARGIN, int(total * MARGIN_FRACTION))


def human(n: int) -> str:
    """Bytes in SI units with one decimal, as ``df -H`` counts them: ``3.4 GB``."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


class Disk:
    """Free space and filesystem identity of a path (the I/O seam; tests pass their own)."""

    def free(self, path: str) -> int:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def device(self, path: str) -> int:
        return os.stat(path).st_dev

    def nearest(self, path: str) -> str:
        """The directory to examine for ``path`` (which may not exist yet)."""
        return existing(path)

    def visible(self, path: str) -> bool:
        """Whether a directory the runtime reported is there as we see it. If not, we run
        in another mount namespace (a container given only the socket): its ancestors
        here are another filesystem, so it is not checked rather than checked wrongly."""
        return os.path.isdir(path)


class _Unchecked(Disk):
    """``import --no-space-check``: every filesystem has room (a full disk met anyway is
    still reported as one)."""

    def free(self, path: str) -> int:
        return 1 << 62


UNCHECKED: Disk = _Unchecked()


def existing(path: str) -> str:
    """``path``, or its nearest ancestor that exists (an output or cache not made yet)."""
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def shortfalls(needs: Sequence[Need], disk: Disk, *, with_margin: bool = True,
               reserve: int = 0) -> List[Shortfall]:
    """The filesystems among ``needs`` that cannot hold their sum plus the margin.

    ``reserve`` (a margin fixed earlier) replaces the computed one when > 0. A path that
    cannot be examined is logged and skipped: we refuse on what we know, never on a guess.
    """
    groups: Dict[int, List[Tuple[Need, str]]] = {}
    for need in needs:
        if need.total <= 0:
            continue
        path = disk.nearest(need.path)
        try:
            dev = disk.device(path)
        except OSError as exc:
            log.info("cannot examine %s (%s): its free space is not checked", path, exc.strerror)
            continue
        groups.setdefault(dev, []).append((need, path))
    out = []
    for members in groups.values():
        paths = [p for _, p in members]
        try:
            free = disk.free(paths[0])
        except OSError as exc:
            log.info("cannot statvfs %s (%s): its free space is not checked", paths[0], exc.strerror)
            continue
        content = sum(n.content for n, _ in members)
        unpacked = sum(n.unpacked for n, _ in members)
        keep = reserve if reserve > 0 else (margin(content + unpacked) if with_margin else 0)
        log.debug("space at %s: %d free, %d content + %d unpacked + %d margin", ", ".join(paths),
                  free, content, unpacked, keep)
        if content + unpacked + keep > free:
            out.append(Shortfall(_where(members), free, content, unpacked, keep))
    return out


def _where(members: Sequence[Tuple[Need, str]]) -> str:
    labels = list(dict.fromkeys(n.label for n, _ in members))
    paths = list(dict.fromkeys(p for _, p in members))
    common = os.path.commonpath(paths) if len(paths) > 1 else paths[0]
    return f"{' and '.join(labels)} at {common if common != '/' else ', '.join(paths)}"


def describe(short: Shortfall, what: str) -> str:
    """"containerd at /var/lib/containerd has 1.2 GB free; bundle x needs about 3.4 GB (...)"."""
    parts = []
    if short.content:
        parts.append(f"{human(short.content)} content")
    if short.unpacked:
        parts.append(f"{human(short.unpacked)} unpacked")
    parts.append(f"{human(short.margin)} kept free")
    return (f"{short.where} has {human(short.free)} free; {what} needs about "
            f"{human(short.needed)} ({' + '.join(parts)})")


def is_disk_full(exc: BaseException) -> bool:
    """An ENOSPC/EDQUOT OSError, or an error whose relayed message says the disk is full."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    if isinstance(exc, EdgebundleError):
        text = exc.message.lower()
        return any(marker in text for marker in _FULL_MARKERS)
    return False


# ---------------------------------------------------------------------------
# The device: what an import adds, where the runtime keeps it


@dataclass(frozen=True)
class Storage:
    """Where a runtime writes what an import adds (None: it did not say; not checked)."""

    runtime: str  # "containerd" | "docker"
    content: Optional[str]  # containerd's content store; Docker's root (load's tmp copy)
    unpacked: Optional[str]  # containerd's snapshotter root; Docker's root (layer dirs)
    label: str  # "containerd", "docker"


@dataclass(frozen=True)
class Estimate:
    """What a bundle will add: blobs as received, and the layers unpacked."""

    content: int
    unpacked: int
    unpacked_known: bool  # from the header's ``unpacked_bytes``, else estimated


def estimate(content_bytes: int, unpacked_bytes: Optional[int], layer_form: str) -> Estimate:
    """The estimate from the header's two numbers.

    ``content_bytes`` counts every entry; ``unpacked_bytes`` (optional) the layers' tars.
    Without it: a ``tar``-form bundle's content *is* its tars; a ``blob``-form one is
    assumed to unpack to ``UNPACK_RATIO`` times its size.
    """
    if unpacked_bytes is not None:
        return Estimate(content_bytes, unpacked_bytes, True)
    ratio = 1.0 if layer_form == LAYER_FORM_TAR else UNPACK_RATIO
    return Estimate(content_bytes, int(content_bytes * ratio), False)


def import_needs(storage: Storage, est: Estimate) -> List[Need]:
    """Content to ``storage.content``, the unpack to ``storage.unpacked`` (either may be
    unknown); on one filesystem they add up."""
    needs = []
    containerd = storage.runtime == "containerd"
    if storage.content is not None:
        needs.append(Need(storage.content, f"{storage.label} content store" if containerd
                          else storage.label, content=est.content))
    if storage.unpacked is not None:
        needs.append(Need(storage.unpacked, "snapshots" if containerd else storage.label,
                          unpacked=est.unpacked))
    return needs


def _hint(storage: Storage) -> str:
    if storage.runtime == "docker":
        cleanup = "e.g. `docker image prune -a` removes images no container uses"
    else:
        cleanup = "e.g. remove unused images with `ctr -n NAMESPACE images rm` or `crictl rmi --prune`"
    return (f"free space there, {cleanup}, or pack fewer images per bundle; "
            "--no-space-check skips this check")


class ImportSpace:
    """The importer's space checks for one bundle (``importer.import_bundle`` calls them).

    ``storage`` is asked once, at the pre-flight (a ``ctr plugins`` or ``GET /info``).
    """

    def __init__(self, storage: Callable[[], Storage], disk: Optional[Disk] = None,
                 tempdir: Optional[Callable[[], str]] = None) -> None:
        self._storage_of = storage
        self._storage: Optional[Storage] = None
        self.disk = disk or Disk()
        self._tempdir = tempdir or tempfile.gettempdir
        self._unpacked = 0  # the unpack still to come, reserved while entries stream
        self._reserve = 0  # the margin fixed by the pre-flight

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            found = self._storage_of()
            content, unpacked = (p if p is not None and self.disk.visible(p) else None
                                 for p in (found.content, found.unpacked))
            for path in {found.content, found.unpacked} - {content, unpacked, None}:
                log.info("%s keeps data at %s, which is not visible here: not checked",
                         found.label, path)
            self._storage = Storage(found.runtime, content, unpacked, found.label)
        return self._storage

    def preflight(self, name: str, content_bytes: int, unpacked_bytes: Optional[int],
                  layer_form: str) -> None:
        """Before the first byte reaches the runtime: the whole bundle must fit."""
        est = estimate(content_bytes, unpacked_bytes, layer_form)
        storage = self.storage
        if storage.content is None and storage.unpacked is None:
            log.info("%s did not say where it keeps its data: disk space not checked", storage.label)
            return
        self._unpacked = est.unpacked
        self._reserve = margin(est.content + est.unpacked)
        what = f"bundle {name}" + ("" if est.unpacked_known else " (unpacked size estimated)")
        log.info("space: bundle %s adds about %d bytes of content and %d unpacked", name,
                 est.content, est.unpacked)
        self._refuse(shortfalls(import_needs(storage, est), self.disk, reserve=self._reserve),
                     what, _hint(storage))

    def before_entry(self, where: str, size: int) -> None:
        """Before an entry of ``size`` decoded bytes streams in: it, and the unpack still
        to come, must fit (the header's totals may have understated)."""
        storage = self.storage
        if storage.content is None and storage.unpacked is None:
            return
        needs = import_needs(storage, Estimate(size, self._unpacked, True))
        self._refuse(shortfalls(needs, self.disk, reserve=self._reserve or margin(size)),
                     where, _hint(storage))

    def before_spool(self, where: str, size: int) -> None:
        """Before base layer tars (about ``size`` bytes) are spooled to the temp dir."""
        path = self._tempdir()
        self._refuse(shortfalls([Need(path, "temp dir", content=size)], self.disk), where,
                     "free space in the temp dir or point TMPDIR at a bigger disk")

    def disk_full(self, exc: BaseException, name: str) -> Optional[SpaceError]:
        """The one-line error for an ENOSPC that happened anyway (the import was aborted)."""
        if not is_disk_full(exc):
            return None
        if isinstance(exc, OSError):  # our own write: the spool of a delta's base tar
            return SpaceError(f"the temp dir {self._tempdir()} filled while importing bundle "
                              f"{name} ({exc.strerror or exc}); nothing was imported",
                              "free space there or point TMPDIR at a bigger disk, then "
                              "import again")
        assert isinstance(exc, EdgebundleError)
        try:
            storage = self.storage
        except EdgebundleError:  # never mask the runtime's error with our own lookup's
            storage = Storage("", None, None, "the runtime")
        paths = list(dict.fromkeys(p for p in (storage.content, storage.unpacked) if p))
        where = os.path.commonpath(paths) if len(paths) > 1 else "".join(paths)
        where = where if where != "/" else ", ".join(paths)
        return SpaceError(f"the disk filled while importing bundle {name} into {storage.label}"
                          f"{' at ' + where if where else ''} ({exc.message}); nothing was "
                          "imported",
                          _hint(storage).split("; ")[0] + ", then import again")

    @staticmethod
    def _refuse(short: List[Shortfall], what: str, hint: str) -> None:
        if short:
            raise SpaceError("; ".join(describe(s, what) for s in short), hint)


# ---------------------------------------------------------------------------
# The packer: its cache and its output


def check_packer(cache: str, fetch: int, output: Optional[str], bundle: int,
                 disk: Optional[Disk] = None, *, output_what: str = "bundle output",
                 doing: str = "this pack") -> None:
    """Refuse a pack whose downloads (into ``cache``) and bundle (at ``output``; None for
    a stream) do not fit. ``bundle`` is the plan's estimate of the bundle's size.
    ``output_what``/``doing`` name the output and the command (``export`` writes archives)."""
    needs = [Need(cache, "packer cache", content=fetch)]
    if output is not None:
        needs.append(Need(output, output_what, content=bundle))
    short = shortfalls(needs, disk or Disk())
    if short:
        raise SpaceError("; ".join(describe(s, doing) for s in short),
                         "free space there, or pass --home / -o on a bigger disk")


def full_error(what: str, exc: OSError, hint: str) -> SpaceError:
    """ENOSPC while writing ``what``: one line saying the disk is full."""
    why = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on the device"
    return SpaceError(f"cannot write {what}: {why}", hint)
