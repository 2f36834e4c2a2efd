"""The test services and the image factory really work (independent oracles)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import subprocess
import tarfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

import imagefactory as f
import services
from services import Containerd, Dockerd, Registry, Sshd


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, env=env or services.clean_env(), timeout=timeout, **kw)
    assert r.returncode == 0, f"{argv} failed rc={r.returncode}\nstdout={r.stdout}\nstderr={r.stderr}"
    return r


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


# ---------------------------------------------------------------- factory


def test_factory_is_deterministic() -> None:
    a, b = f.build_app_image("app"), f.build_app_image("app")
    assert a.manifest.data == b.manifest.data
    assert a.config.data == b.config.data
    assert a.layer_digests == b.layer_digests
    assert f.build_multi().digest == f.build_multi().digest
    assert f.oci_layout_tar(a, "x/y:1") == f.oci_layout_tar(b, "x/y:1")


def test_layer_tar_headers_are_normalised() -> None:
    img = f.build_app_image("app")
    with tarfile.open(fileobj=io.BytesIO(img.layer_tars[0])) as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    assert {(m.uid, m.gid, m.mtime) for m in members} == {(0, 0, 0)}
    assert "bin/busybox" in names and "bin/sh" in names and "bin" in names
    # gzip header: mtime field (bytes 4..8) is zero, no FNAME flag
    gz = img.layers[0].data
    assert gz[4:8] == b"\0\0\0\0" and not gz[3] & 0x08
    assert gzip.decompress(gz) == img.layer_tars[0]


def test_app_v2_changes_one_file_in_top_layer_only() -> None:
    v1, v2 = f.build_app_image("app", "v1"), f.build_app_image("app", "v2")
    assert v1.layer_digests[:-1] == v2.layer_digests[:-1]
    assert v1.layer_digests[-1] != v2.layer_digests[-1]

    def files(raw: bytes) -> dict[str, bytes]:
        with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
            return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}  # type: ignore[union-attr]

    a, b = files(v1.layer_tars[-1]), files(v2.layer_tars[-1])
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == ["app/message.txt"]
    # the top layer barely compresses, so size-based delta checks mean something
    assert v1.layers[-1].size > 0.95 * f.TOP_PAYLOAD_SIZE


def test_chain_ids_follow_oci_definition() -> None:
    img = f.build_app_image("app")
    c = img.chain_ids
    assert c[0] == img.diff_ids[0]
    assert c[1] == f.sha256(f"{img.diff_ids[0]} {img.diff_ids[1]}".encode())


# ---------------------------------------------------------------- registry


def test_registry_serves_pushed_images(registry: Registry, pushed_images: dict[str, Any], skopeo: str) -> None:
    app = pushed_images["images"]["shop/app:v1"]
    built: f.BuiltImage = app["built"]
    req = urllib.request.Request(
        f"{registry.url}/v2/shop/app/manifests/v1", headers={"Accept": f.DOCKER_MANIFEST}
    )
    with _opener().open(req, timeout=10) as resp:
        assert resp.headers["Docker-Content-Digest"] == app["manifest_digest"]
        assert resp.read() == built.manifest.data

    # skopeo as an independent oracle
    for ref in ("shop/app:v1", "shop/worker:v1", "shop/tools:v1", "shop/app:v2"):
        out = json.loads(run([skopeo, "inspect", "--tls-verify=false", f"docker://{registry.host}/{ref}"]).stdout)
        info = pushed_images["images"][ref]
        assert out["Digest"] == info["manifest_digest"], ref
        assert out["Layers"] == [layer["digest"] for layer in info["layers"]], ref
    raw = run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/shop/tools:v1"]).stdout
    assert json.loads(raw)["mediaType"] == f.OCI_MANIFEST

    multi = pushed_images["multi"]
    raw = run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/shop/multi:v1"]).stdout
    index = json.loads(raw)
    assert f.sha256(raw.encode()) == multi["index_digest"]
    assert index["mediaType"] == f.OCI_INDEX
    platforms = {(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]}
    assert platforms == {("linux", "amd64"), ("linux", "arm64")}
    arm = json.loads(
        run(
            [skopeo, "inspect", "--override-arch", "arm64", "--override-variant", "v8", "--tls-verify=false",
             f"docker://{registry.host}/shop/multi:v1"]
        ).stdout
    )
    assert arm["Architecture"] == "arm64"


def test_registry_with_basic_auth(tmp_path: Path, skopeo: str) -> None:
    reg = services.start_registry(tmp_path / "authreg", auth=True)
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            _opener().open(f"{reg.url}/v2/", timeout=10)
        assert err.value.code == 401
        img = f.build_image([{"app/message.txt": "auth\n"}], media="oci")
        with pytest.raises(f.PushError):
            f.push_image(reg.host, "auth/x", "v1", img)
        f.push_image(reg.host, "auth/x", "v1", img, username=reg.username, password=reg.password)
        out = run(
            [skopeo, "inspect", "--raw", "--tls-verify=false", "--creds", f"{reg.username}:{reg.password}",
             f"docker://{reg.host}/auth/x:v1"]
        ).stdout
        assert out.encode() == img.manifest.data
    finally:
        reg.stop()
    assert reg._proc.poll() is not None  # stop() reaped our PID


# ---------------------------------------------------------------- containerd


def test_containerd_pull_and_run(containerd: Containerd, registry: Registry, pushed_images: dict[str, Any]) -> None:
    ctr = containerd.ctr_argv("k8s.io")
    env = containerd.env()
    for ref in ("shop/app:v1", "shop/tools:v1"):
        image = f"{registry.host}/{ref}"
        run([*ctr, "images", "pull", "--plain-http", image], env=env)
        out = run([*ctr, "images", "ls", "--quiet"], env=env).stdout.split()
        assert image in out
        cid = f"eb-test-{uuid.uuid4().hex[:12]}"
        r = run([*ctr, "run", "--rm", "--snapshotter", containerd.snapshotter, image, cid], env=env)
        assert r.stdout == pushed_images["images"][ref]["message"]

    # committed snapshots are keyed by ChainID
    keys = run([*ctr, "snapshots", "--snapshotter", containerd.snapshotter, "ls"], env=env).stdout
    for chain_id in pushed_images["images"]["shop/app:v1"]["chain_ids"]:
        assert chain_id in keys


def test_containerd_imports_arm64_from_multiarch_index(containerd: Containerd, pushed_images: dict[str, Any]) -> None:
    multi: f.BuiltIndex = pushed_images["multi"]["built"]
    ns = f"eb-{uuid.uuid4().hex[:8]}"
    ctr = containerd.ctr_argv(ns)
    tar = f.oci_layout_tar(multi, "example.test/shop/multi:v1", only_platform="arm64")
    r = subprocess.run(
        [*ctr, "images", "import", "--platform", "linux/arm64", "-"], input=tar, capture_output=True, env=containerd.env(), timeout=120
    )
    assert r.returncode == 0, r.stderr
    ls = run([*ctr, "images", "ls"], env=containerd.env()).stdout
    assert "example.test/shop/multi:v1" in ls and multi.digest in ls
    keys = run([*ctr, "snapshots", "ls"], env=containerd.env()).stdout
    assert multi.for_platform("arm64").chain_ids[-1] in keys


# ---------------------------------------------------------------- dockerd


def test_dockerd_load_and_run(dockerd: Dockerd, registry: Registry, pushed_images: dict[str, Any], skopeo: str, tmp_path: Path) -> None:
    archive = tmp_path / "app.tar"
    run(
        [skopeo, "copy", "--src-tls-verify=false", f"docker://{registry.host}/shop/app:v1",
         f"docker-archive:{archive}:example.test/shop/app:v1"]
    )
    docker = dockerd.docker_argv()
    assert "Loaded image: example.test/shop/app:v1" in run([*docker, "load", "-i", str(archive)]).stdout
    r = run([*docker, "run", "--rm", "--network", "none", "example.test/shop/app:v1"])
    assert r.stdout == pushed_images["images"]["shop/app:v1"]["message"]
    image_id = run([*docker, "image", "inspect", "--format", "{{.Id}}", "example.test/shop/app:v1"]).stdout.strip()
    assert image_id == pushed_images["images"]["shop/app:v1"]["config_digest"]

    # factory-made docker-archive with gzip layers loads too
    worker: f.BuiltImage = pushed_images["images"]["shop/worker:v1"]["built"]
    wtar = tmp_path / "worker.tar"
    wtar.write_bytes(f.docker_archive_tar(worker, ["example.test/shop/worker:v1"], compressed_layers=True))
    run([*docker, "load", "-i", str(wtar)])
    r = run([*docker, "run", "--rm", "--network", "none", "example.test/shop/worker:v1"])
    assert r.stdout == pushed_images["images"]["shop/worker:v1"]["message"]


# ---------------------------------------------------------------- sshd


def test_sshd_accepts_client_key(sshd: Sshd) -> None:
    import paramiko

    client = paramiko.SSHClient()
    host_keys = client.get_host_keys()
    key_type, key_b64 = sshd.host_pubkey_line.split()[:2]
    host_keys.add(f"[{sshd.host}]:{sshd.port}", key_type, paramiko.Ed25519Key(data=base64.b64decode(key_b64)))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())  # host key must match
    try:
        client.connect(
            sshd.host, port=sshd.port, username=sshd.user, key_filename=str(sshd.client_key_path),
            allow_agent=False, look_for_keys=False, timeout=15,
        )
        _, stdout, _ = client.exec_command("echo ok-$((40+2))")
        assert stdout.read().decode().strip() == "ok-42"
        assert stdout.channel.recv_exit_status() == 0
    finally:
        client.close()


def test_env_scrub(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("DOCKER_HOST", "CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "SSH_AUTH_SOCK"):
        monkeypatch.setenv(var, "/nonexistent")
    env = services.clean_env({"X_EXTRA": "1"})
    assert not {"DOCKER_HOST", "CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "SSH_AUTH_SOCK"} & env.keys()
    assert env["X_EXTRA"] == "1" and env["PATH"] == os.environ["PATH"]
