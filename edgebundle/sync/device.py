"""What ``sync`` runs on one device, through one ``Shell`` (over SSH: ``SshShell``).

Every device command is the site's ``edgebundle:`` command line plus quoted
arguments (``transfer.ssh.device_command``), so a device needs only edgebundle and
sshd. A command that fails becomes a ``DeviceCommandError`` carrying the device's
exit code (exit 14 there is a full disk there) and its last stderr line.

``Shell`` is the seam at the SSH boundary: ``SshShell`` is the real one (one
paramiko connection: exec channels and SFTP); unit tests run the same device command
lines on a local shell and copy files instead of uploading.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
from typing import Any, Dict, List, Optional, Protocol, Sequence

import paramiko

from ..errors import EdgebundleError, LockedError, RuntimeUnavailableError
from ..specs import SiteSpec
from ..transfer.ssh import (CommandResult, check_device_edgebundle, command_report, device_command,
                            report_command, run_device_command, runtime_argv)
from ..transfer.upload import Progress, UploadResult, upload_over
from .bundles import SUFFIX

log = logging.getLogger(__name__)

# A device exit code that says "try again later": another import holds the device's
# lock, or the runtime is restarting. Killed (-1: no exit status; 137: SIGKILL through
# the shell) is retried too: the next import recovers from the journal.
RETRY_EXIT_CODES = frozenset({LockedError.exit_code, RuntimeUnavailableError.exit_code, -1, 137})
REPORT_TIMEOUT = 300.0  # seconds a report may stay silent (it reads the whole runtime)


class DeviceCommandError(EdgebundleError):
    """A command on the device failed; ``exit_code`` is the device's own (1 when it has
    none, e.g. killed), ``device_status`` what the channel said (-1: no status)."""

    def __init__(self, message: str, hint: Optional[str], status: int) -> None:
        super().__init__(message, hint)
        self.device_status = status
        self.exit_code = status if 0 < status < 126 else 1

    @property
    def retryable(self) -> bool:
        return self.device_status in RETRY_EXIT_CODES


class Shell(Protocol):
    """The device end of one connection."""

    def run(self, command: str, what: str, timeout: float) -> CommandResult:
        """Run a shell command line there; ``timeout``: seconds it may stay silent."""

    def upload(self, bundle: str, staging: str, *, limit_rate: Optional[float],
               progress: Optional[Progress]) -> UploadResult:
        """Put ``bundle`` at ``staging/<its name>`` there (resuming a partial one)."""

    def remove_staged(self, staging: str, suffixes: Sequence[str]) -> List[str]:
        """Remove the files in ``staging`` ending in one of ``suffixes``; their names."""


class SshShell:
    """``Shell`` over an open paramiko connection (``transfer.ssh.connect(bulk=True)``)."""

    def __init__(self, client: paramiko.SSHClient, site: SiteSpec, timeout: float) -> None:
        self.client = client
        self.site = site
        self.timeout = timeout

    def run(self, command: str, what: str, timeout: float) -> CommandResult:
        return run_device_command(self.client, self.site, command, self.timeout, timeout, what)

    def upload(self, bundle: str, staging: str, *, limit_rate: Optional[float],
               progress: Optional[Progress]) -> UploadResult:
        return upload_over(self.client, self.site, bundle, staging, timeout=self.timeout,
                           limit_rate=limit_rate, progress=progress)

    def remove_staged(self, staging: str, suffixes: Sequence[str]) -> List[str]:
        removed = []
        sftp = self.client.open_sftp()
        try:
            for name in sftp.listdir(staging):
                if name.endswith(tuple(suffixes)):
                    with contextlib.suppress(OSError):
                        sftp.remove(posixpath.join(staging, name))
                        removed.append(name)
        except OSError as exc:
            log.warning("site %s: cannot clean %s: %s", self.site.name, staging, exc)
        finally:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                sftp.close()
        return removed


def import_argv(staged: str, site: SiteSpec) -> List[str]:
    return ["import", staged, *runtime_argv(site), "--json", "--no-progress"]


def prune_argv(site: SiteSpec, keep: Sequence[str], keep_previous: int) -> List[str]:
    argv = ["prune", *runtime_argv(site)]
    for name in keep:
        argv += ["--keep", name]
    return argv + ["--keep-previous", str(keep_previous), "--json"]


class Device:
    """One site's device, through ``shell``."""

    def __init__(self, shell: Shell, site: SiteSpec, *, command_timeout: float) -> None:
        self.shell = shell
        self.site = site
        self.command_timeout = command_timeout

    def report(self) -> Dict[str, Any]:
        """The device's live inventory report (validated)."""
        command = report_command(self.site)
        log.info("site %s: running %s", self.site.name, command)
        return command_report(self.site, command, self.shell.run(command, "report command", REPORT_TIMEOUT))

    def upload(self, bundle: str, *, limit_rate: Optional[float] = None,
               progress: Optional[Progress] = None) -> UploadResult:
        return self.shell.upload(bundle, self.site.staging, limit_rate=limit_rate, progress=progress)

    def import_bundle(self, staged: str) -> None:
        """``edgebundle import STAGED`` on the device, read from the staged file there."""
        self._run(import_argv(staged, self.site), "import")

    def prune(self, keep: Sequence[str], keep_previous: int) -> None:
        self._run(prune_argv(self.site, keep, keep_previous), "prune")

    def clear_staging(self) -> List[str]:
        """Remove every staged bundle and partial upload (``*.ebundle[.part]``) there.

        Called once the site is done: bundles of earlier states are of no use any more.
        """
        return self.shell.remove_staged(self.site.staging, (SUFFIX, SUFFIX + ".part"))

    def _run(self, argv: Sequence[str], what: str) -> CommandResult:
        command = device_command(self.site, argv)
        log.info("site %s: running %s", self.site.name, command)
        result = self.shell.run(command, what, self.command_timeout)
        if result.status == 0:
            return result
        check_device_edgebundle(self.site, result.status, result.stderr_tail)
        how = (f"exited with status {result.status}" if result.status > 0 else
               "ended without an exit status (killed, or the link dropped)")
        raise DeviceCommandError(
            f"{what} on site {self.site.name} {how}: {result.stderr_tail or '(no stderr)'}",
            f"the device keeps the staged bundle; sync again, or run it by hand there: {command}",
            result.status)
