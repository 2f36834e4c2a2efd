"""pull_report against a real OpenSSH sshd on 127.0.0.1 (the ``sshd`` fixture).

Checks host-key handling the way a user meets it: trusted, unknown, accept-new
and changed keys, with fingerprints compared to what ``ssh-keygen -l`` prints and
the known_hosts we write read back by OpenSSH's own tools.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict

import pytest
from services import Sshd, clean_env

from edgebundle.errors import TransportError
from edgebundle.report import inventory_to_json
from edgebundle.holdings import HeldImage, HeldLayer, Inventory
from edgebundle.oci import Platform
from edgebundle.specs import SiteSpec
from edgebundle.transfer.options import SshOptions
from edgebundle.transfer.ssh import pull_report

REPORT = inventory_to_json(
    Inventory(runtime="containerd", namespace="k8s.io", host="gw-01", generated_at="2024-05-01T12:00:00Z",
              images=(HeldImage("docker.io/library/alpine:3.19", "sha256:" + "1" * 64,
                                layers=(HeldLayer("sha256:" + "2" * 64, "sha256:" + "3" * 64, 10, True, True),)),),
              blobs=frozenset({"sha256:" + "3" * 64}), chains=frozenset({"sha256:" + "2" * 64})),
    "gw-01")


def keygen_fingerprint(pub_path: Path) -> str:
    """``SHA256:...`` as OpenSSH prints it for a public key file."""
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub_path)], check=True,
                         capture_output=True, text=True, env=clean_env()).stdout
    return out.split()[1]


@pytest.fixture
def report_file(tmp_path: Path) -> Path:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    return path


def site_for(sshd: Sshd, report_file: Path, **kw: Any) -> SiteSpec:
    args: Dict[str, Any] = dict(name="gw-01", runtime="containerd", platform=Platform.parse("linux/arm64"),
                                namespace="k8s.io", ssh=f"{sshd.user}@{sshd.host}:{sshd.port}",
                                report_command=f"cat {shlex.quote(str(report_file))}")
    args.update(kw)
    return SiteSpec(**args)


def pull(sshd: Sshd, site: SiteSpec, known_hosts: Path, **kw: Any) -> Dict[str, Any]:
    options = SshOptions(known_hosts=str(known_hosts), key_filename=str(sshd.client_key_path),
                         ssh_config_path=os.devnull, timeout=10,
                         allow_unknown_host=bool(kw.pop("allow_unknown_host", False)))
    return pull_report(site, options, **kw)


def test_trusted_host_runs_report_command(sshd: Sshd, report_file: Path, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line() + "\n")
    assert pull(sshd, site_for(sshd, report_file), kh) == REPORT


def test_trusted_host_fetches_file_over_sftp(sshd: Sshd, report_file: Path, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line() + "\n")
    assert pull(sshd, site_for(sshd, report_file, report_command=None), kh, path=str(report_file)) == REPORT
    with pytest.raises(TransportError, match="not found on site gw-01"):
        pull(sshd, site_for(sshd, report_file), kh, path=str(tmp_path / "missing.json"))


def test_failing_command_reports_stderr(sshd: Sshd, report_file: Path, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line() + "\n")
    site = site_for(sshd, report_file, report_command="echo starting >&2; echo 'edgebundle: error: no containerd' >&2; "
                                                      "exit 7")
    with pytest.raises(TransportError) as info:
        pull(sshd, site, kh)
    assert info.value.message == "report command on site gw-01 exited with status 7: edgebundle: error: no containerd"


def test_unknown_host_is_refused(sshd: Sshd, report_file: Path, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    with pytest.raises(TransportError) as info:
        pull(sshd, site_for(sshd, report_file), kh)
    err = info.value
    assert err.message.startswith(f"host key for 127.0.0.1:{sshd.port} is not in known_hosts")
    assert keygen_fingerprint(sshd.host_key_path.with_name(sshd.host_key_path.name + ".pub")) in err.message
    assert "--accept-new-host-key" in (err.hint or "")
    assert kh.read_text() == ""


def test_accept_new_host_key_writes_known_hosts(sshd: Sshd, report_file: Path, tmp_path: Path) -> None:
    kh = tmp_path / "dot-ssh" / "known_hosts"
    assert pull(sshd, site_for(sshd, report_file), kh, allow_unknown_host=True) == REPORT
    assert kh.read_text() == sshd.known_hosts_line() + "\n"
    # OpenSSH itself finds the entry under [127.0.0.1]:port
    found = subprocess.run(["ssh-keygen", "-F", f"[127.0.0.1]:{sshd.port}", "-f", str(kh)],
                           capture_output=True, text=True, env=clean_env())
    assert found.returncode == 0, found.stdout + found.stderr
    # and the saved key is now trusted strictly
    assert pull(sshd, site_for(sshd, report_file), kh) == REPORT
    assert kh.read_text().count("\n") == 1


@pytest.mark.skipif(shutil.which("ssh") is None, reason="OpenSSH client not installed")
def test_openssh_client_trusts_the_saved_key(sshd: Sshd, report_file: Path, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    pull(sshd, site_for(sshd, report_file), kh, allow_unknown_host=True)
    result = subprocess.run(
        ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={kh}", "-o", "GlobalKnownHostsFile=/dev/null", "-i", str(sshd.client_key_path),
         "-p", str(sshd.port), f"{sshd.user}@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=30, env=clean_env())
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("accept_new", [False, True])
def test_changed_host_key_is_refused(sshd: Sshd, report_file: Path, tmp_path: Path, accept_new: bool) -> None:
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True,
                   capture_output=True, env=clean_env())
    key_type, key_b64 = Path(str(other) + ".pub").read_text().split()[:2]
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {key_type} {key_b64}\n")
    before = kh.read_text()
    with pytest.raises(TransportError) as info:
        pull(sshd, site_for(sshd, report_file), kh, allow_unknown_host=accept_new)
    err = info.value
    assert err.message.startswith(f"host key for 127.0.0.1:{sshd.port} changed")
    assert f"known_hosts has ssh-ed25519 {keygen_fingerprint(Path(str(other) + '.pub'))}" in err.message
    real = keygen_fingerprint(sshd.host_key_path.with_name(sshd.host_key_path.name + ".pub"))
    assert f"the server sent ssh-ed25519 {real}" in err.message
    assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}'" in (err.hint or "")
    assert kh.read_text() == before


def test_wrong_client_key_fails_auth(sshd: Sshd, report_file: Path, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line() + "\n")
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True,
                   capture_output=True, env=clean_env())
    with pytest.raises(TransportError, match=f"SSH authentication as {sshd.user} to 127.0.0.1:{sshd.port} failed"):
        pull_report(site_for(sshd, report_file), SshOptions(known_hosts=str(kh), key_filename=str(stranger),
                                                            ssh_config_path=os.devnull, timeout=10))


def test_edgebundle_missing_or_too_old_on_the_device(sshd: Sshd, report_file: Path, tmp_path: Path) -> None:
    """Through the real sshd and the device's real shell: 127 and argparse's complaint."""
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line() + "\n")
    missing = site_for(sshd, report_file, report_command=None,
                       edgebundle=str(tmp_path / "no-such-dir" / "edgebundle"))
    with pytest.raises(TransportError, match="edgebundle is not installed on site gw-01"):
        pull(sshd, missing, kh)
    old = tmp_path / "old-edgebundle"  # what an older edgebundle says to a flag it lacks
    old.write_text("#!/bin/sh\necho 'usage: edgebundle [-h] ...' >&2\n"
                   "echo 'edgebundle: error: unrecognized arguments: --address /run/k3s.sock' >&2\nexit 2\n")
    old.chmod(0o755)
    too_old = site_for(sshd, report_file, report_command=None, edgebundle=str(old),
                       address="/run/k3s.sock")
    with pytest.raises(TransportError, match="edgebundle on site gw-01 is too old") as info:
        pull(sshd, too_old, kh)
    assert "pip install -U edgebundle" in (info.value.hint or "")
