"""Bad input gets one clear line naming the thing and what to do, and a distinct exit code.

Runs the real `edgebundle` console entry (`python -m edgebundle`) as a user would, against
real services where the error comes from one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, List

import pytest

import services


def run_cli(*args: str, home: Path, env_extra: Any = None) -> subprocess.CompletedProcess[str]:
    env = services.clean_env({"EDGEBUNDLE_HOME": str(home), "HOME": str(home / "user"),
                              **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "edgebundle", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("edgebundle: error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in line, line
    return line


def manifest(tmp: Path, reg: str, refs: List[str], extra_registries: str = "") -> Path:
    path = tmp / "m.yaml"
    images = "\n".join(f"  - ref: {reg}/{r}" for r in refs)
    path.write_text(f"""version: 1
registries:
  "{reg}": {{insecure: true}}
{extra_registries}images:
{images}
sites:
  gw: {{runtime: containerd, namespace: errs, platform: linux/amd64}}
""")
    return path


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nimages:\n  - ref: [unclosed\nsites: {}\n")
    proc = run_cli("plan", str(bad), "--site", "gw", home=tmp_path)
    line = assert_one_line_error(proc, 3, str(bad))
    assert ":3:" in line or ":4:" in line


def test_unknown_tag_is_404(tmp_path: Path, registry: Any, pushed_images: Any) -> None:
    m = manifest(tmp_path, registry.host, ["shop/app:no-such-tag"])
    proc = run_cli("plan", str(m), "--site", "gw", home=tmp_path)
    assert_one_line_error(proc, 4, "shop/app:no-such-tag", "not found")


def test_registry_unreachable(tmp_path: Path) -> None:
    port = services.free_port()  # nothing listens there
    m = manifest(tmp_path, f"127.0.0.1:{port}", ["shop/app:v1"])
    proc = run_cli("plan", str(m), "--site", "gw", home=tmp_path)
    assert_one_line_error(proc, 4, f"127.0.0.1:{port}", "unreachable")


def test_bad_credentials_is_401(tmp_path: Path) -> None:
    reg = services.start_registry(tmp_path / "authreg", auth=True, password="right-password")
    try:
        user = tmp_path / "user"
        (user / ".docker").mkdir(parents=True)
        import base64
        auth = base64.b64encode(f"{reg.username}:wrong-password".encode()).decode()
        (user / ".docker" / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
        m = manifest(tmp_path, reg.host, ["shop/app:v1"])
        proc = run_cli("plan", str(m), "--site", "gw", home=tmp_path)
        line = assert_one_line_error(proc, 4, reg.host)
        assert "authentication" in line and "wrong-password" not in proc.stderr
    finally:
        reg.stop()


def _packed(tmp_path: Path, registry: Any) -> Path:
    m = manifest(tmp_path, registry.host, ["shop/app:v1"])
    out = tmp_path / "b.ebundle"
    proc = run_cli("pack", str(m), "--site", "gw", "-o", str(out), home=tmp_path / "h")
    assert proc.returncode == 0, proc.stderr
    return out


def test_truncated_and_corrupt_bundles_are_refused(tmp_path: Path, registry: Any,
                                                    pushed_images: Any, containerd: Any) -> None:
    bundle = _packed(tmp_path, registry)
    data = bundle.read_bytes()
    cut = tmp_path / "cut.ebundle"
    cut.write_bytes(data[: len(data) * 2 // 3])
    proc = run_cli("verify", str(cut), home=tmp_path)
    assert_one_line_error(proc, 5, "truncated", str(cut))
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 1
    bad = tmp_path / "bad.ebundle"
    bad.write_bytes(bytes(flipped))
    proc = run_cli("import", str(bad), "--runtime", "containerd", "--address", containerd.address,
                   "--namespace", "corrupt-test", "--snapshotter", containerd.snapshotter, home=tmp_path)
    assert_one_line_error(proc, 5, "corrupt")
    listed = subprocess.run(containerd.ctr_argv("corrupt-test") + ["images", "ls", "-q"],
                            capture_output=True, text=True, env=containerd.env(), check=True).stdout
    assert listed.strip() == ""
    proc = run_cli("verify", str(bundle), home=tmp_path)
    assert proc.returncode == 0 and "OK" in proc.stdout


def test_runtime_unreachable(tmp_path: Path) -> None:
    proc = run_cli("report", "--runtime", "containerd", "--address", str(tmp_path / "none.sock"),
                   home=tmp_path)
    assert_one_line_error(proc, 7, str(tmp_path / "none.sock"))
    proc = run_cli("report", "--runtime", "docker", "--host", f"unix://{tmp_path}/docker.sock",
                   home=tmp_path)
    assert_one_line_error(proc, 7, f"{tmp_path}/docker.sock", "unreachable")


def test_not_a_bundle(tmp_path: Path) -> None:
    junk = tmp_path / "junk.ebundle"
    junk.write_bytes(b"PK\x03\x04 definitely a zip")
    proc = run_cli("verify", str(junk), home=tmp_path)
    assert_one_line_error(proc, 5, "not an edgebundle bundle")
    proc = run_cli("verify", str(tmp_path / "missing.ebundle"), home=tmp_path)
    assert_one_line_error(proc, 2, "missing.ebundle")


@pytest.mark.parametrize("site", ["nope"])
def test_unknown_site(tmp_path: Path, registry: Any, site: str) -> None:
    m = manifest(tmp_path, registry.host, ["shop/app:v1"])
    proc = run_cli("plan", str(m), "--site", site, home=tmp_path)
    assert_one_line_error(proc, 2, "'nope'", "gw")


def test_inventory_pull_over_real_ssh_and_changed_key(tmp_path: Path, sshd: Any) -> None:
    """`inventory pull` fetches the device's report through the real sshd; a changed
    host key is refused (exit 9) and the recorded inventory is left untouched."""
    report = {"version": 1, "kind": "edgebundle-inventory", "generated_at": "2026-01-01T00:00:00Z",
              "host": "gw", "site": "gw", "runtime": {"kind": "docker", "namespace": None},
              "images": [], "blobs": [], "chains": ["sha256:" + "ab" * 32], "extra": {}}
    rp = tmp_path / "device-report.json"
    rp.write_text(json.dumps(report))
    m = tmp_path / "m.yaml"
    m.write_text(f"""version: 1
images: [example.test/app:v1]
sites:
  gw: {{runtime: docker, platform: linux/amd64, ssh: "root@127.0.0.1:{sshd.port}",
        report_command: "cat {rp}"}}
""")
    known = tmp_path / "known_hosts"
    known.write_text(sshd.known_hosts_line() + "\n")
    base = ["inventory", "pull", "gw", "-m", str(m), "--identity", str(sshd.client_key_path),
            "--known-hosts", str(known)]
    proc = run_cli(*base, "--json", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["chains"] == report["chains"]

    # Another key for the same [127.0.0.1]:port: a changed host key, always refused.
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    pub = (tmp_path / "other_key.pub").read_text().split()
    known.write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    proc = run_cli(*base, "--accept-new-host-key", home=tmp_path)
    assert_one_line_error(proc, 9, "changed")
    shown = run_cli("inventory", "show", "gw", "--json", home=tmp_path)
    assert json.loads(shown.stdout)["chains"] == report["chains"]
