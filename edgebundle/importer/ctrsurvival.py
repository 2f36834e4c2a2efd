"""containerd leftovers: which are ours, and how the next run removes them.

What a ``ctr images import`` holds while it runs (containerd 1.6, ``client.Import``):

- a **lease** (random id ``<nanoseconds>-<base64>``, 24 h ``containerd.io/gc.expire``,
  no other label) created *before* ctr reads its first byte of stdin; every ingest and
  blob of the import is a resource of it. ctr deletes it in a deferred ``done()`` when
  ``Import`` returns -- also when it returns an error, e.g. because its stdin ended
  inside the tar. It is left behind only when ctr dies (SIGKILL, OOM) or containerd
  does (power loss) before that.
- **ingests** ``tar-<member name>`` (``content/ingest``): leased, so once the lease is
  gone containerd's garbage collector aborts them and deletes their partial data.
- after index.json: the **images**, under our temporary names, then one more lease per
  image for its unpack, holding an ``extract-<n>-<r> <chainID>`` active snapshot.

So a refused import ends ctr *gracefully* (``ContainerdLoader.abort``: a poisoned tar
header, then stdin closed: ctr's tar reader fails, ``done()`` runs, the lease goes) and
then asks for a synchronous collection, which removes the ingests at once.

Which lease is ours (never another client's: CRI pulls run concurrently on k3s and
their leases look exactly like ctr's): we list the leases just before starting ctr,
wait until ctr has *read* the first tar member (the pipe is empty, ``FIONREAD``) --
it created its lease before that read -- and list again. ctr's lease is among the new
ones; if exactly one is new, it is ours for certain. If several are (a pull started in
those milliseconds), the candidates are listed again at the end of the stream, and
kept only if a single one survives in both listings (ctr's lease lives until ctr
ends); else none is recorded and the lease is left to its 24 h expiry (logged). The
id is written to the journal before any image exists, so the next run deletes exactly
that lease. Unpack leases are created after index.json, one per image, while other
clients may create theirs, and ctr 1.6 cannot list a lease's resources: they are not
identified (a ctr killed mid-unpack leaves one, with its extract snapshot, for 24 h).
Every short ctr call writes its output to a file, never a pipe
(``process.run_to_files``): ``ctr images tag`` takes a lease too, and killed with
SIGPIPE by its dead reader's pipe it left that lease behind.

Temporary images are ours by their name alone: ``import.edgebundle.invalid/`` uses a
reserved top-level domain that no registry can serve, bundles may not use it (refused
at validation and in the loader) and only an import holding the device lock creates
them -- so under the lock every such name is a leftover.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import secrets
import struct
import termios
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from ..errors import EdgebundleError, LockedError
from ..oci import Platform
from .journal import PHASE_PUBLISHING, JournalFile, Rename

if TYPE_CHECKING:
    from .containerd import ContainerdRuntime, Ctr

log = logging.getLogger(__name__)

#: Our own short-lived leases (the collection trigger) carry this label and id prefix.
GC_LEASE_PREFIX = "edgebundle-gc-"


def parse_leases_ls(text: str) -> Dict[str, str]:
    """``ctr leases ls`` -> {id: labels column}."""
    out = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2:
            out[parts[0]] = parts[2] if len(parts) > 2 else ""
    return out


def leases(ctr: "Ctr") -> FrozenSet[str]:
    return frozenset(parse_leases_ls(ctr.run("leases", "ls").decode(errors="replace")))


def delete_leases(ctr: "Ctr", ids: Sequence[str], *, sync: bool) -> None:
    """Delete ``ids`` (absent ones are fine: ctr ended and deleted its own)."""
    for i, lease in enumerate(ids):
        last = i == len(ids) - 1
        ctr.run("leases", "rm", *(("--sync",) if sync and last else ()), lease, check=False)


def collect(ctr: "Ctr") -> None:
    """Run containerd's garbage collection now (aborts unleased ingests, frees blobs).

    ctr has no ``gc`` command; deleting a lease with ``--sync`` collects before it
    returns, so we create a lease of our own (labelled, so nobody mistakes it) and
    delete it that way.
    """
    lease = GC_LEASE_PREFIX + secrets.token_hex(6)
    ctr.run("leases", "create", "--id", lease, "--expires", "10m", "edgebundle.gc=1")
    ctr.run("leases", "rm", "--sync", lease, check=False)


def pipe_pending(stdin: Optional[IO[bytes]]) -> int:
    """Bytes written into ctr's stdin pipe that ctr has not read yet (0 if unknowable)."""
    try:
        fd = stdin.fileno() if stdin is not None else -1
    except (OSError, ValueError, AttributeError):
        return 0
    if fd < 0:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTTY, errno.EBADF):
            return 0
        raise


def wait_drained(stdin: Optional[IO[bytes]], proc: Any, bound: float) -> bool:
    """Wait until ctr read all we wrote (True), it exited, or ``bound`` passed (False)."""
    deadline = time.monotonic() + bound
    while True:
        if pipe_pending(stdin) == 0:
            return True
        poll = getattr(proc, "poll", None)
        if poll is not None and poll() is not None:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


class LeaseBracket:
    """Finds the one lease a ctr import created (see the module docstring)."""

    def __init__(self, ctr: "Ctr") -> None:
        self.ctr = ctr
        self.before = leases(ctr)
        self.candidates: Optional[Set[str]] = None

    def after_first_read(self) -> Optional[str]:
        self.candidates = set(leases(self.ctr) - self.before)
        return self._one()

    def confirm(self) -> Optional[str]:
        """At the end of the stream: candidates that still exist."""
        if self.candidates is None:
            self.candidates = set(leases(self.ctr) - self.before)
        elif len(self.candidates) > 1:
            self.candidates &= set(leases(self.ctr))
        lease = self._one()
        if lease is None and self.candidates:
            log.info("cannot tell ctr's import lease from %d other new lease(s); if this "
                        "import is interrupted its lease expires in 24 h", len(self.candidates) - 1)
        return lease

    def _one(self) -> Optional[str]:
        if self.candidates is not None and len(self.candidates) == 1:
            return next(iter(self.candidates))
        return None


# --- recovery ------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovered:
    """What a recovery did (logged; tests read it)."""

    removed: Tuple[str, ...] = ()  # temporary image names removed
    published: Tuple[str, ...] = ()  # real names rolled forward
    leases: Tuple[str, ...] = ()  # leases deleted
    skipped: Optional[str] = None  # why nothing was done


def recover(runtime: "ContainerdRuntime", journal_file: Optional[JournalFile], *,
            wait: float) -> Recovered:
    """Clean what an interrupted import left; roll a started publication forward.

    The caller holds the device lock, so no import of ours is running -- except,
    possibly, the ctr of a killed importer, which goes on unpacking until it ends:
    we wait for it up to ``wait`` seconds (0: do not wait, do nothing now).
    """
    ctr = runtime.ctr
    journal = journal_file.read() if journal_file is not None else None
    if journal is not None and journal.process is not None and journal.process.alive():
        log.info("ctr (pid %d) of an interrupted import is still running", journal.process.pid)
        deadline = time.monotonic() + wait
        while journal.process.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if journal.process.alive():
            if wait <= 0:
                return Recovered(skipped=f"ctr pid {journal.process.pid} still runs")
            raise LockedError(f"ctr (pid {journal.process.pid}) of an interrupted import is "
                              f"still running after {wait:.0f}s", "wait for it to end and run again")
    from .containerd import TEMP_PREFIX

    listed = {name: (mt, dg) for name, mt, dg in ctr.images()}
    published: List[str] = []
    if journal is not None and journal.phase == PHASE_PUBLISHING:
        published = _roll_forward(runtime, journal.renames, listed)
    temps = sorted(n for n in listed if n.startswith(TEMP_PREFIX))
    stale = list(journal.leases) if journal is not None else []
    if journal is None and not temps:
        if journal_file is not None:
            journal_file.sweep_temp_files()
        return Recovered()
    if temps:
        log.info("removing %d temporary image(s) of an interrupted import", len(temps))
    delete_leases(ctr, stale, sync=False)
    # A collection now, after the leases are gone, so the ingests and blobs only they
    # and the temporary names held go at once (and are not listed as present).
    if temps:
        ctr.run("images", "rm", "--sync", *temps, check=False)
    else:
        collect(ctr)
    left = sorted(n for n, _, _ in ctr.images() if n.startswith(TEMP_PREFIX))
    if left:
        raise EdgebundleError(f"containerd kept temporary image(s) {', '.join(left)} of an "
                              "interrupted import", "check containerd's logs and run again")
    if journal_file is not None:
        journal_file.clear()
        journal_file.sweep_temp_files()
    return Recovered(removed=tuple(temps), published=tuple(published), leases=tuple(stale))


def _roll_forward(runtime: "ContainerdRuntime", renames: Sequence[Rename],
                  listed: Dict[str, Any]) -> List[str]:
    """Tag each real name whose temporary image is still complete with its digest."""
    ctr = runtime.ctr
    present, snaps = ctr.content(), ctr.snapshots()
    done = []
    for r in renames:
        for name in (r.name, r.alias):
            if name is None or listed.get(name, (None, None))[1] == r.digest:
                continue
            temp = listed.get(r.temp)
            if temp is None or temp[1] != r.digest:
                log.warning("cannot finish publishing %s: its temporary image is gone", r.name)
                break
            held = runtime.held_image(r.temp, temp[0], temp[1], present, snaps,
                                      Platform.parse(r.platform) if r.platform else None)
            if not held.complete:
                log.warning("cannot finish publishing %s: its temporary image is incomplete",
                            r.name)
                break
            log.info("finishing an interrupted import: naming %s", name)
            ctr.tag(r.temp, name)
            done.append(name)
    return done
