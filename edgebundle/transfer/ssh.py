"""Fetch a device's inventory report over SSH (paramiko; packer only).

Host keys are checked the way OpenSSH does with ``StrictHostKeyChecking=yes``
(default) or ``accept-new`` (``allow_unknown_host=True``): an unknown key is
refused or appended to known_hosts, and a *changed* key is always refused, since
a device whose key changed is either reinstalled (the user must confirm) or not
the device at all. ``connect()`` is the connection itself, shared with the bundle
upload (``transfer.upload``); those two are the only modules that import paramiko.
"""

from __future__ import annotations

import base64
import errno
import getpass
import hashlib
import logging
import os
import shlex
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import paramiko

from ..errors import InventoryError, LinkError, TransportError
from ..report import MAX_REPORT_BYTES as REPORT_LIMIT
from ..report import inventory_from_json, load_json_object
from ..specs import SiteSpec
from .options import DEFAULT_TIMEOUT, SshOptions

DEFAULT_PORT = 22
DEFAULT_COMMAND_TIMEOUT = 300.0  # seconds without output from the report command
# Read at most one byte more than a report may be (report.MAX_REPORT_BYTES), so that an
# endless or huge output is cut off, not buffered.
MAX_REPORT_BYTES = REPORT_LIMIT
USER_KNOWN_HOSTS = "~/.ssh/known_hosts"
SYSTEM_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"
USER_SSH_CONFIG = "~/.ssh/config"

# paramiko logs transport failures at ERROR from its own thread; without this, Python's
# last-resort handler would print tracebacks next to our one-line error. Apps that
# configure logging still get the records through propagation.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SshTarget:
    """Where to connect, after ``[user@]host[:port]`` and ~/.ssh/config are applied."""

    alias: str  # the host as written in the site's ssh: (may be a config Host alias)
    hostname: str  # what we actually connect to
    port: int
    user: str
    identity_files: Tuple[str, ...] = ()
    known_hosts_files: Tuple[str, ...] = ()  # UserKnownHostsFile from the config, if any

    @property
    def address(self) -> str:
        """``host:port`` for messages (``[v6]:port`` for IPv6)."""
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"{host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """The name known_hosts files the key under: ``host``, or ``[host]:port`` off port 22."""
        return self.hostname if self.port == DEFAULT_PORT else f"[{self.hostname}]:{self.port}"


def parse_ssh_target(text: str) -> Tuple[Optional[str], str, Optional[int]]:
    """Split ``[user@]host[:port]`` (IPv6 as ``[addr]:port``) into its parts.

    Returns:
        ``(user, host, port)`` with ``None`` for parts not given.

    Raises:
        TransportError: The text is not of that form or the port is out of range.
    """
    bad = TransportError(f"invalid ssh target {text!r}",
                         "write [user@]host[:port] (IPv6 as [addr]:port) or a Host alias from ~/.ssh/config")
    user, at, rest = text.rpartition("@")
    if (at and not user) or not rest or any(c.isspace() for c in text):
        raise bad
    port_text: Optional[str] = None
    if rest.startswith("["):
        host, close, after = rest[1:].partition("]")
        if not close or (after and not after.startswith(":")):
            raise bad
        port_text = after[1:] if after else None
    elif rest.count(":") == 1:
        host, port_text = rest.split(":")
    else:
        host = rest  # no port, or a bare IPv6 address
    if not host:
        raise bad
    port: Optional[int] = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise bad
        port = int(port_text)
    return (user or None), host, port


def resolve_target(text: str, ssh_config_path: Optional[str] = None) -> SshTarget:
    """Apply ~/.ssh/config (HostName, User, Port, IdentityFile, UserKnownHostsFile).

    Values written in ``text`` win over the config, as on the ssh command line.

    Args:
        text: ``[user@]host[:port]`` or a Host alias.
        ssh_config_path: Config file to read; ``None`` reads ~/.ssh/config if it exists.

    Raises:
        TransportError: ``text`` is malformed, or an explicit config file is missing.
    """
    user, host, port = parse_ssh_target(text)
    config = _lookup_config(host, ssh_config_path)
    try:
        config_port = int(config["port"]) if "port" in config else None
    except ValueError:
        raise TransportError(f"ssh config Port {config['port']!r} for host {host!r} is not a number",
                             "fix the Port line in your ssh config") from None
    return SshTarget(
        alias=host,
        hostname=str(config.get("hostname") or host),
        port=port or config_port or DEFAULT_PORT,
        user=user or str(config.get("user") or "") or getpass.getuser(),
        identity_files=tuple(os.path.expanduser(p) for p in config.get("identityfile", [])),
        known_hosts_files=tuple(os.path.expanduser(p)
                                for p in str(config.get("userknownhostsfile", "")).split() if p != "none"),
    )


def _lookup_config(host: str, ssh_config_path: Optional[str]) -> Dict[str, Any]:
    path = Path(os.path.expanduser(ssh_config_path or USER_SSH_CONFIG))
    if not path.exists():  # not is_file(): `-F /dev/null` is the usual "no config" idiom
        if ssh_config_path is not None:
            raise TransportError(f"ssh config file {path} not found", "check the --ssh-config path")
        return {}
    try:
        config = paramiko.SSHConfig.from_path(str(path))
    except (OSError, paramiko.ssh_exception.ConfigParseError) as exc:
        raise TransportError(f"cannot read ssh config {path}: {exc}", "fix or move the ssh config file") from None
    return dict(config.lookup(host))


def runtime_argv(site: SiteSpec) -> List[str]:
    """``--runtime R [--namespace N] [--address A | --host H]``: the device's runtime flags."""
    argv = ["--runtime", site.runtime]
    if site.runtime == "containerd" and site.namespace:
        argv += ["--namespace", site.namespace]
    if site.address is not None:
        argv += ["--address" if site.runtime == "containerd" else "--host", site.address]
    return argv


def device_command(site: SiteSpec, argv: Sequence[str]) -> str:
    """``EDGEBUNDLE ARGV…``: the site's ``edgebundle:`` command line, as the device's shell
    reads it (so ``sudo edgebundle`` or a venv's path work), then ``argv`` quoted."""
    return f"{site.edgebundle} {shlex.join(argv)}"


def default_report_command(site: SiteSpec) -> str:
    """``EDGEBUNDLE report --runtime R [--namespace N] [--address A | --host H] --json``."""
    return device_command(site, ["report", *runtime_argv(site), "--json"])


def fingerprint(key: paramiko.PKey) -> str:
    """``SHA256:<base64>`` exactly as ``ssh-keygen -l`` / OpenSSH print it (no padding)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def pull_report(
    site: SiteSpec,
    options: SshOptions = SshOptions(),
    *,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    path: Optional[str] = None,
) -> Dict[str, Any]:
    """Fetch and validate a site's inventory report over SSH (one connection).

    Args:
        site: The site; its ``ssh`` names the device.
        options: How to connect (``SshOptions``).
        command_timeout: Seconds the report command may stay silent before giving up.
        path: Remote report file to fetch over SFTP instead of running a command.

    Returns:
        The report JSON object, already validated by ``inventory_from_json``.

    Raises:
        TransportError: No ``ssh:`` for the site, connection, host key, auth or
            remote command failure.
        InventoryError: The device sent something that is not a valid report.
    """
    with connect(site, options) as client:
        return read_report(client, site, options.timeout, command_timeout=command_timeout, path=path)


def read_report(client: paramiko.SSHClient, site: SiteSpec, timeout: float = DEFAULT_TIMEOUT, *,
                command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
                path: Optional[str] = None) -> Dict[str, Any]:
    """The report over an open connection: ``site.report_command`` (or
    ``default_report_command(site)``) run on the device, or the file at ``path`` (SFTP)."""
    if path is not None:
        data = _read_remote_file(client, site, path, timeout)
        what = f"report file {path} on site {site.name}"
        log.info("site %s: got %d bytes of report", site.name, len(data))
        return parse_report(data, what)
    command = report_command(site)
    log.info("site %s: running %s", site.name, command)
    result = run_device_command(client, site, command, timeout, command_timeout, "report command")
    return command_report(site, command, result)


def report_command(site: SiteSpec) -> str:
    """The command that prints the site's report: its ``report_command``, else the default."""
    return site.report_command or default_report_command(site)


def command_report(site: SiteSpec, command: str, result: CommandResult) -> Dict[str, Any]:
    """The validated report a run of ``command`` printed (or its one-line failure)."""
    data = report_output(site, command, result)
    log.info("site %s: got %d bytes of report", site.name, len(data))
    return parse_report(data, f"output of `{command}` on site {site.name}")


@contextmanager
def connect(
    site: SiteSpec,
    options: SshOptions = SshOptions(),
    *,
    bulk: bool = False,
) -> Iterator[paramiko.SSHClient]:
    """An authenticated SSH client to ``site``'s device, closed on exit.

    ``options`` say how (``SshOptions``); ``bulk`` prefers AES-GCM
    (one pass per packet instead of AES-CTR plus an HMAC: the upload's throughput
    is bound by paramiko's per-byte work). paramiko and socket errors
    raised inside the ``with`` body become one-line ``TransportError``s, as they do
    while connecting.

    Raises:
        TransportError: No ``ssh:`` for the site, connection, host key or auth failure.
    """
    if not site.ssh:
        raise TransportError(f"site {site.name} has no ssh target",
                             f"add `ssh: user@host[:port]` to site {site.name} in the manifest")
    target = resolve_target(site.ssh, options.ssh_config_path)
    key_filename, timeout = options.key_filename, options.timeout
    keys = [key_filename] if key_filename else [p for p in target.identity_files if os.path.isfile(p)]
    if key_filename and not os.path.isfile(key_filename):
        raise TransportError(f"SSH key file {key_filename} not found", "check the --identity path")
    files, save_to = _known_hosts_files(target, options.known_hosts)
    client = paramiko.SSHClient()
    try:
        with _translate_errors(client, site, target, files, timeout):
            log.info("site %s: connecting to %s as %s", site.name, target.address, target.user)
            revoked = _load_host_keys(client, files)
            client.set_missing_host_key_policy(_HostKeyPolicy(target, save_to, options.allow_unknown_host))
            client.connect(target.hostname, port=target.port, username=target.user,
                           key_filename=keys or None,  # type: ignore[arg-type]  # paramiko takes a list too
                           timeout=timeout, banner_timeout=timeout,
                           auth_timeout=timeout, look_for_keys=not key_filename, allow_agent=True,
                           transport_factory=_bulk_transport if bulk else None)
            _check_not_revoked(client, target, revoked)
            yield client
    finally:
        client.close()


def _bulk_transport(sock: Any, **kwargs: Any) -> paramiko.Transport:
    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    gcm = tuple(c for c in options.ciphers if "-gcm@" in c)  # listed only when cryptography has it
    options.ciphers = gcm + tuple(c for c in options.ciphers if c not in gcm)
    return transport


# ---------------------------------------------------------------------------
# Host keys


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, key: paramiko.PKey) -> None:
        super().__init__("unknown host key")
        self.key = key


class _RevokedHostKey(paramiko.SSHException):
    def __init__(self, key: paramiko.PKey) -> None:
        super().__init__("revoked host key")
        self.key = key


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Called by paramiko only when known_hosts has *no* key for the host.

    (A known host with a different key raises ``BadHostKeyException`` before this.)
    """

    def __init__(self, target: SshTarget, save_to: str, accept_new: bool) -> None:
        self.target = target
        self.save_to = save_to
        self.accept_new = accept_new

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if not self.accept_new:
            raise _UnknownHostKey(key)
        _append_known_host(self.save_to, hostname, key)


def _known_hosts_files(target: SshTarget, known_hosts: Optional[str]) -> Tuple[List[str], str]:
    """(files to trust, file to add new keys to)."""
    if known_hosts is not None:
        # An explicit file is the whole truth: tests and CI must not depend on ~/.ssh.
        path = os.path.expanduser(known_hosts)
        return [path], path
    user_files = list(target.known_hosts_files) or [os.path.expanduser(USER_KNOWN_HOSTS)]
    return user_files + [SYSTEM_KNOWN_HOSTS], user_files[0]


def _load_host_keys(client: paramiko.SSHClient, files: Sequence[str]) -> List[Tuple[str, str]]:
    """Load ``files`` into ``client``; return the ``@revoked`` (keytype, base64) pairs.

    We parse the files ourselves rather than with ``HostKeys.load``: that crashes on
    marker lines (``@cert-authority``, ``@revoked``), and a key we cannot parse must
    only skip its own line. Nothing is ever saved through paramiko (its
    ``save_host_keys`` rewrites the file and drops comments); new keys are appended.
    """
    revoked: List[Tuple[str, str]] = []
    host_keys = client.get_host_keys()
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise TransportError(f"cannot read known_hosts file {path}: {exc.strerror}",
                                 "check the file's permissions") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("@"):
                fields = line.split()
                if len(fields) >= 4 and fields[0] == "@revoked":
                    revoked.append((fields[2], fields[3]))
                continue  # @cert-authority: host certificates are not supported, skip
            try:
                entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
            except Exception:  # noqa: BLE001 - one unparsable line must not hide the others
                continue
            if entry is not None:
                for name in entry.hostnames:
                    host_keys.add(name, entry.key.get_name(), entry.key)
    return revoked


def _check_not_revoked(client: paramiko.SSHClient, target: SshTarget, revoked: List[Tuple[str, str]]) -> None:
    transport = client.get_transport()
    if transport is None or not revoked:
        return
    key = transport.get_remote_server_key()
    if (key.get_name(), key.get_base64()) in revoked:
        raise _RevokedHostKey(key)


def _append_known_host(path: str, hostname: str, key: paramiko.PKey) -> None:
    """Append one ``name keytype base64`` line, creating ~/.ssh-like dirs privately."""
    data = f"{hostname} {key.get_name()} {key.get_base64()}\n".encode()
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # never glue our entry onto a last line without newline
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise TransportError(f"cannot save the host key of {hostname} to {path}: {exc.strerror}",
                             "check that the known_hosts file and its directory are writable") from None


# ---------------------------------------------------------------------------
# Errors


@contextmanager
def _translate_errors(client: paramiko.SSHClient, site: SiteSpec, target: SshTarget,
                      files: Sequence[str], timeout: float) -> Iterator[None]:
    """Turn paramiko/socket exceptions into one-line ``TransportError``s."""
    addr = target.address
    also = f"; files checked: {', '.join(files)}" if len(files) > 1 else ""
    try:
        yield
    except (TransportError, InventoryError):
        raise
    except paramiko.BadHostKeyException as exc:
        raise TransportError(
            f"host key for {addr} changed: known_hosts has {exc.expected_key.get_name()} "
            f"{fingerprint(exc.expected_key)}, the server sent {exc.key.get_name()} {fingerprint(exc.key)}",
            f"if site {site.name} was reinstalled, verify the new fingerprint on the device and remove the old "
            f"entry (ssh-keygen -R '{target.known_hosts_name}' -f {files[0]}{also}); "
            "otherwise someone may be intercepting the connection") from None
    except _UnknownHostKey as exc:
        raise TransportError(
            f"host key for {addr} is not in known_hosts ({exc.key.get_name()} {fingerprint(exc.key)})",
            f"verify the fingerprint and add it (ssh-keyscan -p {target.port} {target.hostname} >> "
            f"{files[0]}) or pass --accept-new-host-key") from None
    except _RevokedHostKey as exc:
        raise TransportError(f"host key for {addr} is marked @revoked in known_hosts ({fingerprint(exc.key)})",
                             "the device's key was revoked on purpose: do not connect until it is re-keyed") from None
    except paramiko.AuthenticationException as exc:
        raise TransportError(
            f"SSH authentication as {target.user} to {addr} failed: {exc}",
            f"check the user and key (IdentityFile / --identity); test with "
            f"`ssh -p {target.port} {target.user}@{target.hostname} true`") from None
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        refused = all(getattr(e, "errno", None) == errno.ECONNREFUSED for e in exc.errors.values())
        problem = "refused" if refused else "failed (host unreachable)"
        raise LinkError(f"SSH connection to {addr} {problem}",
                             f"check that sshd runs on site {site.name}'s device and listens on port "
                             f"{target.port}") from None
    except socket.gaierror as exc:
        raise TransportError(f"cannot resolve SSH host {target.hostname!r}: {exc.strerror}",
                             f"fix `ssh:` of site {site.name}, or add a HostName to ~/.ssh/config") from None
    except socket.timeout:
        raise LinkError(f"SSH connection to {addr} timed out",
                             "check that the device is online and reachable, or raise --timeout") from None
    except (paramiko.SSHException, EOFError) as exc:
        text = str(exc) or type(exc).__name__
        transport = client.get_transport()
        # When the transport thread failed first (e.g. banner timeout), connect() may report
        # a vague follow-up ("No existing session"); the thread's exception is the cause.
        cause = transport.get_exception() if transport is not None else None
        if cause is not None and str(cause):
            text = str(cause)
        if text == "No existing session":
            # paramiko's start_client() gives up silently when `timeout` passes mid-handshake.
            raise LinkError(f"SSH handshake with {addr} timed out after {timeout:g}s",
                                 "check that an SSH server answers on that port, or raise --timeout") from None
        if "banner" in text.lower():
            raise TransportError(f"no SSH server answered on {addr} ({text})",
                                 "check the port: something else listens there, or the device is overloaded") from None
        raise LinkError(f"SSH session with {addr} failed: {text}",
                             "retry; if it persists, test with the ssh command line") from None
    except OSError as exc:
        raise LinkError(f"SSH connection to {addr} failed: {exc.strerror or exc}",
                             "check the network path to the device") from None


# ---------------------------------------------------------------------------
# Remote command / file


@dataclass(frozen=True)
class CommandResult:
    """What a command run on the device gave back."""

    status: int  # its exit status; -1 when the channel closed without one (killed, link lost)
    stdout: bytes
    stderr_tail: str  # the last non-blank line of its stderr ("" if none)


def run_device_command(client: paramiko.SSHClient, site: SiteSpec, command: str, timeout: float,
                       command_timeout: float, what: str) -> CommandResult:
    """Run ``command`` on the device; its stdout (bounded), exit status and last stderr line.

    ``what`` names the command in messages ("report command", "import").

    Raises:
        LinkError: It sent nothing for ``command_timeout`` seconds, or the link failed.
        TransportError: Its stdout exceeded the report bound.
    """
    transport = client.get_transport()
    assert transport is not None  # connect() succeeded
    chan = transport.open_session(timeout=timeout)
    try:
        chan.settimeout(command_timeout)
        chan.exec_command(command)
        stderr: List[bytes] = []
        # Drain stderr concurrently: stdout and stderr share one SSH window, so a chatty
        # stderr that nobody reads would stall stdout forever.
        drain = threading.Thread(target=_drain_stderr, args=(chan, stderr), daemon=True)
        drain.start()
        try:
            out = _read_all(chan.recv, f"output of `{command}` on site {site.name}")
        except socket.timeout:
            raise LinkError(f"{what} on site {site.name} sent nothing for {command_timeout:.0f}s",
                            "check the command by hand on the device, or raise the command timeout") from None
        drain.join(command_timeout)
        chan.status_event.wait(command_timeout)
        status = chan.exit_status if chan.status_event.is_set() else -1
    finally:
        chan.close()
    return CommandResult(status, out, _last_line(b"".join(stderr)))


def report_output(site: SiteSpec, command: str, result: CommandResult) -> bytes:
    """The report command's stdout, or the one-line error its exit status means."""
    if result.status != 0:
        last = result.stderr_tail
        if command == default_report_command(site):
            check_device_edgebundle(site, result.status, last)
        how = f"exited with status {result.status}" if result.status > 0 else "ended without an exit status"
        raise TransportError(f"report command on site {site.name} {how}: {last or '(no stderr)'}",
                             f"run it by hand on the device: {command}")
    return result.stdout


# What argparse says when a flag or command is newer than the device's edgebundle.
_TOO_OLD = ("unrecognized arguments", "invalid choice")


def check_device_edgebundle(site: SiteSpec, status: int, last: str) -> None:
    """A missing or too old edgebundle on the device, said as such (not as a failed command)."""
    if status == 127:  # the shell's "command not found"
        raise TransportError(f"edgebundle is not installed on site {site.name} "
                             f"(`{site.edgebundle}`: command not found)",
                             "install it on the device (pip install edgebundle, Python >= 3.9), "
                             "or set `edgebundle:` in the site entry to the command that runs it")
    if status == 2 and any(marker in last for marker in _TOO_OLD):
        raise TransportError(f"edgebundle on site {site.name} is too old for this packer: {last}",
                             "upgrade it on the device: pip install -U edgebundle")


def _drain_stderr(chan: paramiko.Channel, sink: List[bytes]) -> None:
    kept = 0
    try:
        while True:
            data = chan.recv_stderr(32768)
            if not data:
                return
            sink.append(data)
            kept += len(data)
            while kept > 65536 and len(sink) > 1:  # only the tail matters for the message
                kept -= len(sink.pop(0))
    except (socket.timeout, OSError, EOFError, paramiko.SSHException):
        return


def _read_all(recv: Any, what: str) -> bytes:
    chunks: List[bytes] = []
    total = 0
    while True:
        data = recv(65536)
        if not data:
            return b"".join(chunks)
        total += len(data)
        if total > MAX_REPORT_BYTES:
            raise TransportError(f"{what} is larger than {MAX_REPORT_BYTES // (1024 * 1024)} MiB",
                                 "that is not an inventory report: check the report command or path")
        chunks.append(data)


def _read_remote_file(client: paramiko.SSHClient, site: SiteSpec, path: str, timeout: float) -> bytes:
    sftp = client.open_sftp()
    try:
        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(timeout)
        try:
            with sftp.open(path, "rb") as fh:
                return _read_all(fh.read, f"report file {path} on site {site.name}")
        except FileNotFoundError:
            raise TransportError(f"report file {path} not found on site {site.name}",
                                 "write it on the device first (edgebundle report --json > FILE), "
                                 "or fix the path") from None
        except PermissionError:
            raise TransportError(f"permission denied reading {path} on site {site.name}",
                                 "make the report readable by the SSH user") from None
        except OSError as exc:
            raise TransportError(f"cannot read {path} on site {site.name}: {exc.strerror or exc}",
                                 "check the path on the device") from None
    finally:
        sftp.close()


def _last_line(data: bytes) -> str:
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


_NOT_A_REPORT = "run the report command by hand on the device and check that it prints the report with --json"


def parse_report(data: bytes, what: str) -> Dict[str, Any]:
    try:
        obj = load_json_object(data.decode("utf-8"), what, _NOT_A_REPORT)
    except (UnicodeDecodeError, ValueError) as exc:
        start = data[:60].decode("utf-8", "replace").strip()
        raise InventoryError(f"{what} is not JSON ({exc}); it starts with {start!r}",
                             "run the report command by hand on the device and check that it prints the "
                             "report with --json") from None
    inventory_from_json(obj)  # raises unless obj is a valid report (so, a dict)
    assert isinstance(obj, dict)
    return obj
