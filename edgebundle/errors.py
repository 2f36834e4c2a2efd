"""Errors that carry an exit code and a hint.

Every failure the user can cause or fix surfaces as one line::

    edgebundle: error: <what is wrong, naming the thing> (hint: <what to do>)

and a non-zero exit code chosen by the error family:

    EdgebundleError                 1  (anything else)
    +-- UsageError                  2  bad flags / arguments
    +-- ManifestError               3  manifest list YAML
    +-- ResolveError                4  registry / offline source
    +-- BundleFormatError           5  corrupt, truncated or unsupported bundle
    +-- PrerequisiteError           6  the device lacks what the bundle builds on
    +-- RuntimeUnavailableError     7  containerd / dockerd not reachable
    +-- LoadError                   8  the runtime refused the import
    +-- TransportError              9  SSH / file transfer
    +-- InventoryError             10  report or inventory store
    +-- CacheError                 11  the packer's blob cache
    +-- OutputError                12  an output file or stream cannot be written
    +-- TrustError                 13  unsigned, wrongly signed or downgraded bundle
    +-- SpaceError                 14  not enough free disk for what would be written
    +-- LockedError                15  another import holds the device's lock
"""

from __future__ import annotations

from typing import Optional


class EdgebundleError(Exception):
    """Base class: a message naming the thing that is wrong, and a hint."""

    exit_code = 1

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message


class UsageError(EdgebundleError):
    exit_code = 2


class ManifestError(EdgebundleError):
    exit_code = 3


class ResolveError(EdgebundleError):
    exit_code = 4


class BundleFormatError(EdgebundleError):
    """The bundle is corrupt, truncated, tampered with or of an unknown version."""

    exit_code = 5


class PrerequisiteError(EdgebundleError):
    exit_code = 6

    def __init__(self, message: str, missing: "list[str]", hint: Optional[str] = None) -> None:
        super().__init__(message, hint)
        self.missing = list(missing)


class RuntimeUnavailableError(EdgebundleError):
    exit_code = 7


class LoadError(EdgebundleError):
    exit_code = 8


class TransportError(EdgebundleError):
    exit_code = 9


class InventoryError(EdgebundleError):
    exit_code = 10


class CacheError(EdgebundleError):
    """A blob in the packer's cache is missing or damaged (it is removed, so a rerun refetches)."""

    exit_code = 11


class OutputError(EdgebundleError):
    """Writing an output (bundle, report) failed: permissions, a closed pipe (a full disk
    is a ``SpaceError``)."""

    exit_code = 12


class TrustError(EdgebundleError):
    """The device's trust policy refuses the bundle (nothing reached the runtime)."""

    exit_code = 13


class SpaceError(EdgebundleError):
    """The disk cannot hold what would be written: refused before writing anything
    (``space``), or the disk filled while writing (nothing half-done is kept)."""

    exit_code = 14


class LockedError(EdgebundleError):
    """Another edgebundle process holds the lock (an import into the same runtime)."""

    exit_code = 15


class LinkError(TransportError):
    """The network path failed (refused, unreachable, timed out, dropped mid-session):
    worth retrying, unlike a refused host key or a failed login."""


class SyncIncomplete(EdgebundleError):
    """``sync``: some selected sites did not reach the manifest (each says why)."""

    exit_code = 16


def type_name(value: object, *, mapping: str = "object", sequence: str = "array") -> str:
    """What kind of value this is, in the words of the file it came from (JSON or YAML)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return sequence
    return mapping if isinstance(value, dict) else type(value).__name__
