"""The runtime clients (``ctr``, ``podman``) as processes: the command line a user
gives (``--ctr 'k3s ctr'``, ``--podman 'sudo podman'``) and what a finished run left
(the one value both runners' seams return, so a recorded run fits either)."""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence

from ..errors import UsageError


def command_line(flag: str, value: str, example: str) -> List[str]:
    """``value`` split as the shell would (``--FLAG 'sudo podman'``); refused if empty."""
    try:
        argv = shlex.split(value)
    except ValueError as exc:
        raise UsageError(f"{flag} {value!r} is not a command line: {exc}",
                         f"quote it like a shell word list, e.g. {flag} '{example}'") from None
    if not argv:
        raise UsageError(f"{flag} is empty", f"pass the command, e.g. {flag} {example.split()[-1]}")
    return argv


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


def run_to_files(argv: Sequence[str], input: Optional[bytes], timeout: float,
                 env: Optional[Mapping[str, str]] = None) -> Completed:
    """Run to completion with stdout and stderr in temp files, never in pipes.

    Why files: a pipe dies with its reader. If edgebundle is killed while a client runs,
    the client's next write to a pipe gets SIGPIPE, and a Go client dies of it before
    its deferred cleanup: ``ctr images tag`` takes a lease and prints the name last, so
    it left that lease for 24 h (tests/integration/test_survival.py caught it). A file
    takes the write, and the client ends as it would have.

    Raises:
        subprocess.TimeoutExpired: as ``subprocess.run`` (the process is killed).
        FileNotFoundError: the program does not exist.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.run(list(argv), input=input, stdin=None if input is not None
                              else subprocess.DEVNULL, stdout=out, stderr=err, timeout=timeout,
                              env=dict(env) if env is not None else None)
        out.seek(0)
        err.seek(0)
        return Completed(proc.returncode, out.read(), err.read())
