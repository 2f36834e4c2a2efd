"""What a finished runtime client (``ctr``, ``podman``) left: the one value both
runners' seams return, so a recorded run fits either."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes
