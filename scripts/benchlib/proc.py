"""Run a command and measure it: wall time, exit status, peak RSS.

Peak RSS is taken two ways, both by polling /proc while the command runs:

* ``hwm_kb``: the VmHWM ("high water mark") of the process itself. VmHWM only grows,
  so the last sample before exit misses at most the final poll interval. This is the
  importer's own memory.
* ``tree_kb``: the largest sum of VmRSS over the process and its descendants seen in
  any sample (for ``edgebundle import --runtime containerd`` that includes the ``ctr``
  processes it runs).

``ru_maxrss`` from ``wait4``/``getrusage(RUSAGE_CHILDREN)`` is not used: Linux carries
the parent's high-water mark over fork+exec into the child's maxrss, so a child of a
large benchmark process would report the benchmark's memory, not its own.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union


@dataclass
class Run:
    argv: Sequence[str]
    wall: float
    rc: int
    stdout: str
    stderr: str
    hwm_kb: int
    tree_kb: int
    cpu: float = 0.0  # user + system seconds of the process and the children it waited for

    def check(self) -> "Run":
        if self.rc != 0:
            raise RuntimeError(f"command failed with exit {self.rc}: {shell_join(self.argv)}\n"
                               f"stderr: {self.stderr[-3000:]}\nstdout: {self.stdout[-1500:]}")
        return self


def shell_join(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as fh:
                    out += [int(x) for x in fh.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def _tree_rss(pid: int) -> int:
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss(p)
        todo += _children(p)
    return total


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of running processes (e.g. the runtime daemons), from /proc/PID/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            # utime, stime, and cutime, cstime of reaped children (dockerd re-execs itself
            # to apply layers)
            total += sum(int(x) for x in fields[11:15]) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def run(argv: Sequence[str], *, env: Optional[Mapping[str, str]] = None,
        stdin_path: Optional[str] = None, cwd: Optional[str] = None,
        poll: float = 0.005, timeout: float = 1800.0) -> Run:
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdin=stdin, stdout=out, stderr=err,
                            env=dict(env) if env is not None else None, cwd=cwd)
    peak = [0, 0]
    done = threading.Event()

    def sampler() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _hwm(proc.pid))
            peak[1] = max(peak[1], _tree_rss(proc.pid))
            done.wait(poll)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    deadline = t0 + timeout
    status = None
    usage = None
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.002)
    finally:
        wall = time.perf_counter() - t0
        done.set()
        th.join()
        if stdin_path:
            stdin.close()  # type: ignore[union-attr]
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return Run(list(argv), wall, proc.returncode, out.read().decode(errors="replace"),
               err.read().decode(errors="replace"), peak[0], max(peak[0], peak[1]),
               (usage.ru_utime + usage.ru_stime) if usage else 0.0)


def sh(cmd: str, *, env: Optional[Mapping[str, str]] = None) -> Run:
    """A shell pipeline (bash, pipefail)."""
    return run(["bash", "-o", "pipefail", "-c", cmd], env=env, poll=0.05)


def timed(argv: Union[str, Sequence[str]], **kw: object) -> Run:
    if isinstance(argv, str):
        return sh(argv, **kw)  # type: ignore[arg-type]
    return run(argv, **kw)  # type: ignore[arg-type]
