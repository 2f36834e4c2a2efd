"""The import journal: what an interrupted import left in the runtime, durably written.

An import that is killed (kill -9, power loss, the runtime dying) cannot clean up after
itself; the next ``import`` or ``report`` does, under the device lock (``StateDir.lock``),
from this record. It lives in the state directory, one file per runtime target (kind,
address, namespace), and is replaced atomically and fsynced (``StateDir.write_json``)
at each step that changes what a recovery must do:

``streaming``
    ctr (or the Docker load) has been started. Recorded: the temporary-name nonce, the
    ctr process (pid and its kernel start time, so a reused pid is never mistaken for
    it) and the leases that ctr created for this import, once they are known. Recovery:
    wait for that ctr to end, remove every temporary image, delete those leases, collect.

``publishing``
    every temporary image was checked complete; the renames to real names begin. Also
    recorded: each (temporary name, real name, digest alias, target digest). Recovery
    rolls forward: a real name whose temporary image is still complete with the recorded
    digest is (re)tagged, so a set interrupted between two renames converges to all of
    them published, never to an incomplete image under a real name.

The record is removed once the import has cleaned up; a missing record means there is
nothing to roll forward (temporary names are still swept: the lock says no import of
ours runs).

Device-safe: standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..state import StateDir

PHASE_STREAMING = "streaming"
PHASE_PUBLISHING = "publishing"
JOURNAL_VERSION = 1


@dataclass(frozen=True)
class Rename:
    """One image to publish: ``temp`` becomes ``name`` (and ``alias``, CRI's digest name)."""

    temp: str
    name: str
    digest: str
    alias: Optional[str] = None
    platform: Optional[str] = None  # the bundle's platform: what "complete" is checked for

    def to_json(self) -> Dict[str, Any]:
        return {"temp": self.temp, "name": self.name, "digest": self.digest, "alias": self.alias,
                "platform": self.platform}


@dataclass(frozen=True)
class ProcessId:
    """A process as the kernel knows it: pid plus start time (pids are reused)."""

    pid: int
    start: str

    def alive(self) -> bool:
        return self.start != "" and process_start(self.pid) == self.start


@dataclass(frozen=True)
class Journal:
    runtime: str
    target: str  # address and namespace, as the runtime names them
    nonce: str
    phase: str = PHASE_STREAMING
    process: Optional[ProcessId] = None
    leases: Tuple[str, ...] = ()
    renames: Tuple[Rename, ...] = field(default=())

    def to_json(self) -> Dict[str, Any]:
        return {"version": JOURNAL_VERSION, "runtime": self.runtime, "target": self.target,
                "nonce": self.nonce, "phase": self.phase,
                "process": None if self.process is None else
                {"pid": self.process.pid, "start": self.process.start},
                "leases": list(self.leases), "renames": [r.to_json() for r in self.renames]}


def parse_journal(obj: Any) -> Optional[Journal]:
    """A journal from its JSON, or None if it is not one we wrote (then: sweep only)."""
    if not isinstance(obj, dict) or obj.get("version") != JOURNAL_VERSION:
        return None
    try:
        proc = obj.get("process")
        process = ProcessId(int(proc["pid"]), str(proc["start"])) if isinstance(proc, dict) else None
        renames = tuple(Rename(str(r["temp"]), str(r["name"]), str(r["digest"]),
                               None if r.get("alias") is None else str(r["alias"]),
                               None if r.get("platform") is None else str(r["platform"]))
                        for r in obj.get("renames") or [])
        phase = str(obj["phase"])
        if phase not in (PHASE_STREAMING, PHASE_PUBLISHING):
            return None
        return Journal(runtime=str(obj["runtime"]), target=str(obj["target"]),
                       nonce=str(obj["nonce"]), phase=phase, process=process,
                       leases=tuple(str(l) for l in obj.get("leases") or []), renames=renames)
    except (KeyError, TypeError, ValueError):
        return None


def journal_name(runtime: str, target: str) -> str:
    """One record per runtime target: imports into two namespaces never share one."""
    return f"journal/import-{runtime}-{hashlib.sha256(target.encode()).hexdigest()[:16]}.json"


class JournalFile:
    """The journal of one runtime target in a state directory."""

    def __init__(self, state: StateDir, runtime: str, target: str) -> None:
        self.state = state
        self.name = journal_name(runtime, target)
        self.runtime, self.target = runtime, target

    def read(self) -> Optional[Journal]:
        journal = parse_journal(self.state.read_json(self.name))
        if journal is not None and (journal.runtime, journal.target) != (self.runtime, self.target):
            return None  # a hash collision or a copied state dir: not this target's
        return journal

    def write(self, journal: Journal) -> None:
        self.state.write_json(self.name, journal.to_json())

    def clear(self) -> None:
        path = self.state.path / self.name
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            from ..files import fsync_dir
            fsync_dir(path.parent)

    def sweep_temp_files(self) -> List[str]:
        """Temp files of atomic writes a kill interrupted (``.NAME.*.tmp``), removed."""
        removed: List[str] = []
        try:
            subdirs = [self.state.path / d for d in os.listdir(self.state.path)
                       if (self.state.path / d).is_dir()]
        except OSError:
            return removed
        for directory in [self.state.path, *subdirs]:  # journal/, signed/, ...
            with contextlib.suppress(OSError):
                for entry in os.listdir(directory):
                    if entry.startswith(".") and entry.endswith(".tmp"):
                        with contextlib.suppress(OSError):
                            os.unlink(directory / entry)
                            removed.append(entry)
        return removed


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22).

    "" if there is no such process (or no /proc): then it is treated as gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return ""
    # comm (field 2) is parenthesised and may hold spaces: split after its last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] == "Z":  # a zombie has finished its work
        return ""
    return fields[19]


def this_process(pid: int) -> ProcessId:
    return ProcessId(pid, process_start(pid))

