"""The runtime clients (``ctr``, ``podman``) as processes: the command line a user
gives (``--ctr 'k3s ctr'``, ``--podman 'sudo podman'``) and what a finished run left
(the one value both runners' seams return, so a recorded run fits either)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import List

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
