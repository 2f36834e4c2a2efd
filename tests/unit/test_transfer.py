"""Tests for edgebundle.transfer.ssh against an in-process paramiko SSH server.

The server listens on 127.0.0.1 in a thread of this process: no sshd needed, but
the client side runs exactly as against a device (TCP, key exchange, host key
check, public-key auth, exec / SFTP).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple, Union

import paramiko
import pytest
from paramiko.common import AUTH_FAILED, AUTH_SUCCESSFUL, OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED, OPEN_SUCCEEDED
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgebundle.errors import InventoryError, TransportError
from edgebundle.report import inventory_to_json
from edgebundle.holdings import HeldImage, Inventory
from edgebundle.oci import Platform
from edgebundle.specs import SiteSpec
from edgebundle.transfer.options import SshOptions
from edgebundle.transfer.ssh import (
    default_report_command,
    fingerprint,
    parse_ssh_target,
    pull_report,
    resolve_target,
)

REPORT = inventory_to_json(Inventory(runtime="containerd", namespace="k8s.io", images=(
    HeldImage("docker.io/library/alpine:3.19", "sha256:" + "1" * 64),)), None)
REPORT_BYTES = json.dumps(REPORT).encode()

Responder = Callable[[str], Tuple[bytes, bytes, int]]


def make_key(path: Path) -> paramiko.Ed25519Key:
    """A fresh ed25519 key written as an OpenSSH private key file (as ssh-keygen does)."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


class _StubSFTP(paramiko.SFTPServerInterface):
    """Serves the local filesystem read-only (enough for ``sftp.open(path, 'rb')``)."""

    def stat(self, path: str) -> Union[paramiko.SFTPAttributes, int]:
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(path))
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno or errno.EIO)

    def lstat(self, path: str) -> Union[paramiko.SFTPAttributes, int]:
        return self.stat(path)

    def open(self, path: str, flags: int, attr: object) -> Union[paramiko.SFTPHandle, int]:
        try:
            fh = open(path, "rb")
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno or errno.EIO)
        handle = paramiko.SFTPHandle(flags)
        handle.readfile = fh  # type: ignore[attr-defined]
        handle.filename = path  # type: ignore[attr-defined]
        return handle


@dataclass
class FakeDevice:
    """An SSH server on 127.0.0.1:port answering exec requests with ``responder``."""

    host_key: paramiko.PKey
    client_key: paramiko.PKey
    responder: Responder
    user: str = "edge"
    port: int = 0
    commands: List[str] = field(default_factory=list)
    _sock: Optional[socket.socket] = None

    def start(self) -> "FakeDevice":
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept_loop, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._sock:
            self._sock.close()

    def known_hosts_line(self, key: Optional[paramiko.PKey] = None) -> str:
        key = key or self.host_key
        return f"[127.0.0.1]:{self.port} {key.get_name()} {key.get_base64()}\n"

    def site(self, **kw: object) -> SiteSpec:
        args = dict(name="gw-01", runtime="containerd", platform=Platform.parse("linux/arm64"),
                    namespace="k8s.io", ssh=f"{self.user}@127.0.0.1:{self.port}")
        args.update(kw)
        return SiteSpec(**args)  # type: ignore[arg-type]

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        device = self
        exec_event = threading.Event()
        command: List[str] = []

        class Server(paramiko.ServerInterface):
            def check_channel_request(self, kind: str, chanid: int) -> int:
                if kind == "session":
                    return OPEN_SUCCEEDED
                return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

            def get_allowed_auths(self, username: str) -> str:
                return "publickey"

            def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
                ok = username == device.user and key == device.client_key
                return AUTH_SUCCESSFUL if ok else AUTH_FAILED

            def check_channel_exec_request(self, channel: paramiko.Channel, cmd: bytes) -> bool:
                command.append(cmd.decode())
                exec_event.set()
                return True

        transport = paramiko.Transport(conn)
        transport.add_server_key(self.host_key)
        transport.set_subsystem_handler("sftp", paramiko.SFTPServer, _StubSFTP)
        try:
            transport.start_server(server=Server())
            chan = transport.accept(timeout=10)
            if chan is None:
                return
            if exec_event.wait(timeout=2):
                self.commands.append(command[0])
                out, err, status = self.responder(command[0])
                chan.sendall_stderr(err)
                chan.sendall(out)
                chan.send_exit_status(status)
                chan.close()
            while transport.is_active():  # SFTP session: serve until the client hangs up
                transport.join(0.1)
        except (paramiko.SSHException, EOFError, OSError):
            pass  # the client walked away (e.g. it refused our host key)
        finally:
            transport.close()


def ok_responder(command: str) -> Tuple[bytes, bytes, int]:
    return REPORT_BYTES, b"", 0


@pytest.fixture
def keys(tmp_path: Path) -> Tuple[paramiko.PKey, paramiko.PKey, Path]:
    host = make_key(tmp_path / "host_key")
    client_path = tmp_path / "client_key"
    return host, make_key(client_path), client_path


@pytest.fixture
def device(keys: Tuple[paramiko.PKey, paramiko.PKey, Path]) -> Iterator[FakeDevice]:
    dev = FakeDevice(keys[0], keys[1], ok_responder).start()
    yield dev
    dev.stop()


@pytest.fixture
def known_hosts(tmp_path: Path, device: FakeDevice) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text("# trusted devices\n" + device.known_hosts_line())
    return path


def pull(device: FakeDevice, known_hosts: Path, client_key: Path, **kw: object) -> dict:
    kw.setdefault("site", device.site())
    site = kw.pop("site")
    options = SshOptions(known_hosts=str(known_hosts), key_filename=str(client_key),
                         ssh_config_path=kw.pop("ssh_config_path", os.devnull),  # type: ignore[arg-type]
                         timeout=5, allow_unknown_host=bool(kw.pop("allow_unknown_host", False)))
    return pull_report(site, options, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Pure helpers


@pytest.mark.parametrize("text, expect", [
    ("gw-01", (None, "gw-01", None)),
    ("root@gw-01", ("root", "gw-01", None)),
    ("root@gw-01:2222", ("root", "gw-01", 2222)),
    ("10.0.0.5:22", (None, "10.0.0.5", 22)),
    ("me@[fe80::1]:2200", ("me", "fe80::1", 2200)),
    ("fe80::1", (None, "fe80::1", None)),
])
def test_parse_ssh_target(text: str, expect: tuple) -> None:
    assert parse_ssh_target(text) == expect


@pytest.mark.parametrize("text", ["", "@host", "user@", "host:0", "host:70000", "host:ssh", "a b", "[::1", "[::1]x"])
def test_parse_ssh_target_rejects(text: str) -> None:
    with pytest.raises(TransportError, match="invalid ssh target"):
        parse_ssh_target(text)


def test_resolve_target_uses_ssh_config(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("Host gw\n  HostName 10.1.2.3\n  User edge\n  Port 2222\n  IdentityFile ~/.ssh/gw_key\n"
                      "  UserKnownHostsFile ~/kh\n")
    target = resolve_target("gw", str(config))
    assert (target.hostname, target.user, target.port) == ("10.1.2.3", "edge", 2222)
    assert target.identity_files == (os.path.expanduser("~/.ssh/gw_key"),)
    assert target.known_hosts_files == (os.path.expanduser("~/kh"),)
    assert target.known_hosts_name == "[10.1.2.3]:2222" and target.address == "10.1.2.3:2222"
    # explicit user/port in the site's ssh: win over the config, as on the ssh command line
    explicit = resolve_target("root@gw:22", str(config))
    assert (explicit.user, explicit.port, explicit.known_hosts_name) == ("root", 22, "10.1.2.3")


def test_resolve_target_missing_explicit_config(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="ssh config file .* not found"):
        resolve_target("gw", str(tmp_path / "nope"))


def test_default_report_command() -> None:
    cd = SiteSpec("a", "containerd", Platform.parse("linux/arm64"), namespace="k8s.io")
    assert default_report_command(cd) == "edgebundle report --runtime containerd --namespace k8s.io --json"
    dk = SiteSpec("b", "docker", Platform.parse("linux/amd64"))
    assert default_report_command(dk) == "edgebundle report --runtime docker --json"
    # The site's `address:` and `edgebundle:` keys; the command line is the device shell's.
    k3s = SiteSpec("c", "containerd", Platform.parse("linux/arm64"), namespace="k8s.io",
                   address="/run/k3s/containerd/containerd.sock", edgebundle="sudo /opt/eb/bin/edgebundle")
    assert default_report_command(k3s) == ("sudo /opt/eb/bin/edgebundle report --runtime containerd "
                                           "--namespace k8s.io --address "
                                           "/run/k3s/containerd/containerd.sock --json")
    remote = SiteSpec("d", "docker", Platform.parse("linux/amd64"), address="unix:///run/user docker.sock")
    assert default_report_command(remote).endswith("--host 'unix:///run/user docker.sock' --json")


def test_fingerprint_matches_openssh_format(keys: Tuple[paramiko.PKey, paramiko.PKey, Path]) -> None:
    key = keys[0]
    raw = base64.b64decode(key.get_base64())
    expect = "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")
    assert fingerprint(key) == expect and not expect.endswith("=")


def test_site_without_ssh() -> None:
    with pytest.raises(TransportError, match="site gw-01 has no ssh target") as info:
        pull_report(SiteSpec("gw-01", "docker", Platform.parse("linux/amd64")))
    assert "ssh:" in (info.value.hint or "")


# ---------------------------------------------------------------------------
# Against the in-process server


def test_pull_report_runs_default_command(device: FakeDevice, known_hosts: Path, keys: tuple) -> None:
    assert pull(device, known_hosts, keys[2]) == REPORT
    assert device.commands == ["edgebundle report --runtime containerd --namespace k8s.io --json"]


def test_edgebundle_missing_on_the_device_is_said_so(device: FakeDevice, known_hosts: Path,
                                                     keys: tuple) -> None:
    device.responder = lambda cmd: (b"", b"sh: 1: edgebundle: not found\n", 127)
    with pytest.raises(TransportError, match="edgebundle is not installed on site gw-01") as info:
        pull(device, known_hosts, keys[2])
    assert "pip install edgebundle" in (info.value.hint or "") and "`edgebundle:`" in (info.value.hint or "")


def test_edgebundle_too_old_on_the_device_is_said_so(device: FakeDevice, known_hosts: Path,
                                                     keys: tuple) -> None:
    device.responder = lambda cmd: (b"", b"usage: edgebundle ...\nedgebundle: error: unrecognized "
                                    b"arguments: --address /run/x.sock\n", 2)
    with pytest.raises(TransportError, match="edgebundle on site gw-01 is too old") as info:
        pull(device, known_hosts, keys[2], site=device.site(address="/run/x.sock"))
    assert "pip install -U edgebundle" in (info.value.hint or "")


def test_a_custom_report_command_failing_is_not_blamed_on_edgebundle(device: FakeDevice, known_hosts: Path,
                                                                     keys: tuple) -> None:
    device.responder = lambda cmd: (b"", b"sh: 1: cat: not found\n", 127)
    with pytest.raises(TransportError, match="report command on site gw-01 exited with status 127"):
        pull(device, known_hosts, keys[2], site=device.site(report_command="cat /r.json"))


def test_pull_report_custom_command(device: FakeDevice, known_hosts: Path, keys: tuple) -> None:
    pull(device, known_hosts, keys[2], site=device.site(report_command="sudo cat /var/lib/eb/report.json"))
    assert device.commands == ["sudo cat /var/lib/eb/report.json"]


def test_unknown_host_key_is_refused(device: FakeDevice, tmp_path: Path, keys: tuple) -> None:
    empty = tmp_path / "empty_known_hosts"
    with pytest.raises(TransportError) as info:
        pull(device, empty, keys[2])
    err = info.value
    assert err.message.startswith(f"host key for 127.0.0.1:{device.port} is not in known_hosts")
    assert fingerprint(device.host_key) in err.message
    assert "--accept-new-host-key" in (err.hint or "") and f"ssh-keyscan -p {device.port}" in (err.hint or "")
    assert not empty.exists() and device.commands == []


def test_accept_new_host_key_saves_it(device: FakeDevice, tmp_path: Path, keys: tuple) -> None:
    kh = tmp_path / "ssh" / "known_hosts"
    assert pull(device, kh, keys[2], allow_unknown_host=True) == REPORT
    assert kh.read_text() == device.known_hosts_line()
    assert (kh.stat().st_mode & 0o777) == 0o600
    # now known: a strict connection succeeds and nothing is appended twice
    assert pull(device, kh, keys[2]) == REPORT
    assert kh.read_text() == device.known_hosts_line()


def test_accept_new_appends_without_gluing_lines(device: FakeDevice, tmp_path: Path, keys: tuple) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text("other.host ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1cGRhdGVkLWtleS1mb3ItdGVzdGluZy1vbmx5")
    pull(device, kh, keys[2], allow_unknown_host=True)
    lines = kh.read_text().splitlines()
    assert lines[0].startswith("other.host ") and lines[1] == device.known_hosts_line().strip()


@pytest.mark.parametrize("accept_new", [False, True])
def test_changed_host_key_is_always_refused(device: FakeDevice, tmp_path: Path, keys: tuple,
                                            accept_new: bool) -> None:
    impostor_known = make_key(tmp_path / "old_host_key")
    kh = tmp_path / "known_hosts"
    kh.write_text(device.known_hosts_line(impostor_known))
    before = kh.read_text()
    with pytest.raises(TransportError) as info:
        pull(device, kh, keys[2], allow_unknown_host=accept_new)
    err = info.value
    assert err.message.startswith(f"host key for 127.0.0.1:{device.port} changed")
    assert f"known_hosts has ssh-ed25519 {fingerprint(impostor_known)}" in err.message
    assert f"the server sent ssh-ed25519 {fingerprint(device.host_key)}" in err.message
    assert f"ssh-keygen -R '[127.0.0.1]:{device.port}'" in (err.hint or "")
    assert kh.read_text() == before and device.commands == []


def test_key_for_port_22_entry_does_not_match_other_port(device: FakeDevice, tmp_path: Path, keys: tuple) -> None:
    # known_hosts keys non-22 ports as [host]:port; a bare "127.0.0.1" entry is another host.
    kh = tmp_path / "known_hosts"
    kh.write_text(f"127.0.0.1 {device.host_key.get_name()} {device.host_key.get_base64()}\n")
    with pytest.raises(TransportError, match="is not in known_hosts"):
        pull(device, kh, keys[2])


def test_revoked_host_key_is_refused(device: FakeDevice, known_hosts: Path, keys: tuple) -> None:
    with known_hosts.open("a") as fh:
        fh.write(f"@revoked * {device.host_key.get_name()} {device.host_key.get_base64()}\n")
    with pytest.raises(TransportError, match="marked @revoked"):
        pull(device, known_hosts, keys[2])


def test_nonzero_exit_reports_last_stderr_line(device: FakeDevice, known_hosts: Path, keys: tuple) -> None:
    device.responder = lambda cmd: (b"", b"starting\nedgebundle: error: containerd not reachable\n", 7)
    with pytest.raises(TransportError) as info:
        pull(device, known_hosts, keys[2])
    assert info.value.message == ("report command on site gw-01 exited with status 7: "
                                  "edgebundle: error: containerd not reachable")
    assert "edgebundle report --runtime containerd" in (info.value.hint or "")


def test_large_stderr_does_not_stall(device: FakeDevice, known_hosts: Path, keys: tuple) -> None:
    noise = b"warning: lots of noise\n" * 200_000  # ~4.6 MB, far beyond one SSH window
    device.responder = lambda cmd: (REPORT_BYTES, noise, 0)
    assert pull(device, known_hosts, keys[2]) == REPORT


def test_non_json_output(device: FakeDevice, known_hosts: Path, keys: tuple) -> None:
    device.responder = lambda cmd: (b"Usage: edgebundle [OPTIONS]\n", b"", 0)
    with pytest.raises(InventoryError, match="on site gw-01 is not JSON .* starts with 'Usage: edgebundle"):
        pull(device, known_hosts, keys[2])


def test_invalid_report_is_refused(device: FakeDevice, known_hosts: Path, keys: tuple) -> None:
    device.responder = lambda cmd: (json.dumps({**REPORT, "version": 9}).encode(), b"", 0)
    with pytest.raises(InventoryError, match="version 9 is not supported"):
        pull(device, known_hosts, keys[2])


def test_fetch_report_file_over_sftp(device: FakeDevice, known_hosts: Path, keys: tuple, tmp_path: Path) -> None:
    remote = tmp_path / "report.json"
    remote.write_bytes(REPORT_BYTES)
    assert pull(device, known_hosts, keys[2], path=str(remote)) == REPORT
    assert device.commands == []
    with pytest.raises(TransportError, match=f"report file {tmp_path / 'nope.json'} not found on site gw-01"):
        pull(device, known_hosts, keys[2], path=str(tmp_path / "nope.json"))


def test_auth_failure(device: FakeDevice, known_hosts: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    make_key(other)
    with pytest.raises(TransportError) as info:
        pull(device, known_hosts, other)
    assert info.value.message.startswith(f"SSH authentication as edge to 127.0.0.1:{device.port} failed")
    assert "--identity" in (info.value.hint or "")


def test_missing_key_file(device: FakeDevice, known_hosts: Path, tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="SSH key file .*nope not found"):
        pull(device, known_hosts, tmp_path / "nope")


def test_connection_refused(tmp_path: Path, keys: tuple) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    site = SiteSpec("gw-01", "docker", Platform.parse("linux/amd64"), ssh=f"edge@127.0.0.1:{port}")
    with pytest.raises(TransportError, match=f"SSH connection to 127.0.0.1:{port} refused") as info:
        pull_report(site, SshOptions(known_hosts=str(tmp_path / "kh"), key_filename=str(keys[2]),
                                     ssh_config_path=os.devnull))
    assert "sshd" in (info.value.hint or "")


def test_silent_server_times_out(tmp_path: Path, keys: tuple) -> None:
    with socket.socket() as listener:  # accepts TCP (backlog) but never speaks SSH
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        site = SiteSpec("gw-01", "docker", Platform.parse("linux/amd64"), ssh=f"edge@127.0.0.1:{port}")
        with pytest.raises(TransportError, match=f"127.0.0.1:{port}") as info:
            pull_report(site, SshOptions(known_hosts=str(tmp_path / "kh"), key_filename=str(keys[2]),
                                         ssh_config_path=os.devnull, timeout=0.5))
    assert "timed out" in info.value.message or "no SSH server answered" in info.value.message


def test_ssh_config_alias_end_to_end(device: FakeDevice, known_hosts: Path, keys: tuple, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(f"Host gw01\n  HostName 127.0.0.1\n  Port {device.port}\n  User {device.user}\n"
                      f"  IdentityFile {keys[2]}\n")
    site = device.site(ssh="gw01")
    assert pull_report(site, SshOptions(ssh_config_path=str(config), known_hosts=str(known_hosts),
                                        timeout=5)) == REPORT


def test_known_key_of_other_type_counts_as_changed(device: FakeDevice, tmp_path: Path, keys: tuple) -> None:
    # Like OpenSSH: a host known under another key type is not "unknown", so accept-new
    # must not quietly add a second key for it.
    rsa = paramiko.RSAKey.generate(1024)
    kh = tmp_path / "known_hosts"
    kh.write_text(device.known_hosts_line(rsa))
    with pytest.raises(TransportError, match=re.escape(f"changed: known_hosts has ssh-rsa {fingerprint(rsa)}")):
        pull(device, kh, keys[2], allow_unknown_host=True)


def test_unparsable_known_hosts_lines_are_skipped(device: FakeDevice, tmp_path: Path, keys: tuple) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text("@cert-authority *.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA\n"
                  "garbage-line\nhost ssh-ed25519 !!notbase64!!\n" + device.known_hosts_line())
    assert pull(device, kh, keys[2]) == REPORT
