"""``edgebundle prune`` against a real containerd, a real dockerd and a real podman store.

Through the CLI entry point, as the coming ``sync`` calls it: import v1, then v2, of an
image of its own (``shop/prune``, so no other test's imports count as ours), and prune
keeping v2. Checked against the runtime's own tools (ctr, docker, podman), never against
edgebundle's reading of them: what goes, what stays (previous version, a container's
image, images edgebundle did not import), and that the report printed is what the
runtime holds afterwards, content included (``ctr images rm --sync`` waits for the GC);
and on Docker, the image a moved ``:latest`` left untagged.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest

import imagefactory
from edgebundle.cli.main import main

MANIFEST = """\
version: 1
registries:
  "{reg}": {{insecure: true}}
images:
  - ref: {reg}/shop/prune:{version}
sites:
  gw: {{runtime: containerd, namespace: {ns}, platform: linux/amd64}}
  line: {{runtime: docker, platform: linux/amd64}}
  pod: {{runtime: podman, platform: linux/amd64}}
"""
NS = "k8s.io"  # containerd: the namespace where imports also set the CRI repo@digest name


@pytest.fixture(scope="module")
def prune_images(request: pytest.FixtureRequest, registry: Any) -> Dict[str, Any]:
    """shop/prune:v0/v1/v2 in the registry: v1 -> v2 changes one file of the top layer."""
    if not imagefactory.BUSYBOX.exists():
        pytest.fail("/bin/busybox missing (apt-get install busybox-static)")
    out = {}
    for version in ("v0", "v1", "v2"):
        img = imagefactory.build_app_image("prune", version, media="docker")
        imagefactory.push_image(registry.host, "shop/prune", version, img)
        out[version] = {"top": img.manifest_digest, "config": img.config_digest,
                        "top_layer": img.layer_digests[-1],
                        "message": imagefactory.message_for(f"shop/prune:{version}"),
                        "built": img}
    return out


def eb(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> Any:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == code, f"edgebundle {' '.join(argv)} exited {rc}: {err}"
    return json.loads(out) if "--json" in argv and rc == 0 else err


def run(argv: List[str], env: Any = None) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, f"{argv}: {out.stderr}"
    return out.stdout


def ship(capsys: Any, tmp: Path, reg: str, site: str, version: str, runtime_args: List[str],
         state: Path) -> None:
    manifest = tmp / f"{version}.yaml"
    manifest.write_text(MANIFEST.format(reg=reg, version=version, ns=NS))
    bundle = tmp / f"{site}-{version}.ebundle"
    eb(capsys, "--home", str(tmp / "home"), "pack", str(manifest), "--site", site, "-o", str(bundle),
       "--no-progress")
    res = eb(capsys, "import", str(bundle), *runtime_args, "--state-dir", str(state), "--json",
             "--no-progress")
    assert res["imported"] == [f"{reg}/shop/prune:{version}"]


def test_prune_containerd(tmp_path: Path, registry: Any, containerd: Any, pushed_images: Any,
                          prune_images: Dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    reg = registry.host
    v0, v1, v2 = (f"{reg}/shop/prune:{v}" for v in ("v0", "v1", "v2"))
    alias1, alias2 = (f"{reg}/shop/prune@{prune_images[v]['top']}" for v in ("v1", "v2"))
    args = ["--runtime", "containerd", "--address", containerd.address, "--namespace", NS,
            "--snapshotter", containerd.snapshotter]
    state = tmp_path / "state"
    ctr = containerd.ctr_argv(NS)

    def images() -> Set[str]:
        rows = run(ctr + ["images", "ls", "-q"], containerd.env()).split()
        return {r for r in rows if not r.startswith("import.edgebundle.invalid/")}

    def content() -> Set[str]:
        return set(run(ctr + ["content", "ls", "-q"], containerd.env()).split())

    # Not imported by edgebundle: pulled by ctr, one of them in the same repository.
    worker = f"{reg}/shop/worker:v1"
    for ref in (v0, worker):
        run(ctr + ["images", "pull", "--plain-http", "--snapshotter", containerd.snapshotter, ref],
            containerd.env())
    ship(capsys, tmp_path, reg, "gw", "v1", args, state)
    ship(capsys, tmp_path, reg, "gw", "v2", args, state)
    assert {v0, v1, v2, alias1, alias2, worker} <= images()
    prune = ["prune", *args, "--state-dir", str(state), "--keep", v2, "--json"]

    # --keep-previous 1: v1 (both its names) stays
    out = eb(capsys, *prune, "--keep-previous", "1")
    assert out["removed"] == [] and {v1, alias1} <= set(out["kept"]) and v1 in images()

    # a container made from v1 (never started) keeps it, and says so
    run(ctr + ["containers", "create", "--snapshotter", containerd.snapshotter, v1, "prune-c1"],
        containerd.env())
    try:
        out = eb(capsys, *prune)
        assert sorted(out["in_use"]) == sorted([v1, alias1]) and out["removed"] == []
        assert v1 in images()
    finally:
        run(ctr + ["containers", "rm", "prune-c1"], containerd.env())

    # --dry-run says what would go, and nothing goes
    out = eb(capsys, *prune, "--dry-run")
    assert sorted(out["removed"]) == sorted([v1, alias1]) and out["dry_run"] is True
    assert v1 in images()

    out = eb(capsys, *prune)
    assert sorted(out["removed"]) == sorted([v1, alias1]) and sorted(out["kept"]) == sorted([v2, alias2])
    held = images()
    assert v1 not in held and alias1 not in held
    assert {v0, v2, alias2, worker} <= held  # never ours, or kept
    # The GC ran before prune returned: v1's own blobs are gone, and the report says so.
    blobs = content()
    for digest in (prune_images["v1"]["top"], prune_images["v1"]["config"],
                   prune_images["v1"]["top_layer"]):
        assert digest not in blobs and digest not in out["report"]["blobs"]
    # The report printed is the runtime's truth: every image name, every blob it claims.
    assert {i["name"] for i in out["report"]["images"]} == held
    assert set(out["report"]["blobs"]) <= blobs
    later = eb(capsys, "report", *args, "--state-dir", str(state), "--json")
    assert {i["name"] for i in later["images"]} == held
    run_out = run(ctr + ["run", "--rm", "--snapshotter", containerd.snapshotter, v2, "prune-run"],
                  containerd.env())
    assert run_out == prune_images["v2"]["message"]


def test_prune_docker(tmp_path: Path, registry: Any, dockerd: Any, pushed_images: Any,
                      prune_images: Dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    reg = registry.host
    v0, v1, v2 = (f"{reg}/shop/prune:{v}" for v in ("v0", "v1", "v2"))
    args = ["--runtime", "docker", "--host", dockerd.host]
    state = tmp_path / "state"
    docker = dockerd.docker_argv()

    def tags() -> Set[str]:
        return set(run(docker + ["images", "--format", "{{.Repository}}:{{.Tag}}"]).split())

    def ids() -> Set[str]:
        return set(run(docker + ["images", "-q", "--no-trunc"]).split())

    # Not imported by edgebundle: a tag of our own in the same repository (v0's image).
    run(docker + ["pull", v0])
    ship(capsys, tmp_path, reg, "line", "v1", args, state)
    ship(capsys, tmp_path, reg, "line", "v2", args, state)
    assert {v0, v1, v2} <= tags()
    prune = ["prune", *args, "--state-dir", str(state), "--keep", v2, "--json"]

    out = eb(capsys, *prune, "--keep-previous", "1")
    assert out["removed"] == [] and v1 in out["kept"] and v1 in tags()

    run(docker + ["create", "--name", "prune-c1", v1])  # created, never started
    try:
        out = eb(capsys, *prune)
        assert out["in_use"] == [v1] and out["removed"] == [] and v1 in tags()
    finally:
        run(docker + ["rm", "prune-c1"])

    out = eb(capsys, *prune, "--dry-run")
    assert out["removed"] == [v1] and v1 in tags()

    out = eb(capsys, *prune)
    assert out["removed"] == [v1] and out["kept"] == [v2]
    assert v1 not in tags() and {v0, v2} <= tags()
    assert prune_images["v1"]["config"] not in ids()  # the image itself is gone, not just its tag
    names = {i["name"] for i in out["report"]["images"]}
    assert v1 not in names and {v0, v2} <= names
    later = eb(capsys, "report", *args, "--state-dir", str(state), "--json")
    assert {i["name"] for i in later["images"]} == names
    assert run(docker + ["run", "--rm", "--network", "none", v2]) == prune_images["v2"]["message"]

    # :latest moves from v1's image to v2's: docker keeps v1's untagged, and it is ours.
    latest = f"{reg}/shop/prune:latest"
    for version in ("v1", "v2"):
        imagefactory.push_image(reg, "shop/prune", "latest", prune_images[version]["built"])
        ship(capsys, tmp_path, reg, "line", "latest", args, state)
    old = prune_images["v1"]["config"]
    assert old in ids() and latest in tags()
    prune = ["prune", *args, "--state-dir", str(state), "--keep", latest, "--json"]
    out = eb(capsys, *prune, "--keep-previous", "1")
    assert out["removed"] == [] and old in out["kept"] and old in ids()
    out = eb(capsys, *prune)
    assert out["removed"] == [old] and old not in ids()
    assert {latest, v0} <= tags()  # v2's image keeps its :latest (and v2, the same image)
    assert run(docker + ["run", "--rm", "--network", "none", latest]) == prune_images["v2"]["message"]


def test_prune_podman(tmp_path: Path, registry: Any, podman_store: Any, pushed_images: Any,
                      prune_images: Dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    reg, store = registry.host, podman_store
    v1, v2 = (f"{reg}/shop/prune:{v}" for v in ("v1", "v2"))
    args = store.edgebundle_args()
    state = tmp_path / "state"

    def tags() -> Set[str]:
        rows = json.loads(store.podman("images", "--format", "json").stdout or "[]")
        return {n for row in rows for n in row.get("Names") or []}

    def ids() -> Set[str]:
        rows = json.loads(store.podman("images", "-a", "--format", "json").stdout or "[]")
        return {"sha256:" + row["Id"] for row in rows}

    # Not imported by edgebundle: a tag of our own on v1's image, in another repository.
    ship(capsys, tmp_path, reg, "pod", "v1", args, state)
    assert store.podman("tag", v1, "localhost/mine:1").returncode == 0
    ship(capsys, tmp_path, reg, "pod", "v2", args, state)
    assert {v1, v2, "localhost/mine:1"} <= tags()
    prune = ["prune", *args, "--state-dir", str(state), "--keep", v2, "--json"]

    out = eb(capsys, *prune, "--keep-previous", "1")
    assert out["removed"] == [] and v1 in out["kept"] and v1 in tags()

    created = store.podman("create", "--name", "prune-c1", v1, "/bin/true")  # never started
    assert created.returncode == 0, created.stderr
    try:
        out = eb(capsys, *prune)
        assert out["in_use"] == [v1] and out["removed"] == [] and v1 in tags()
    finally:
        assert store.podman("rm", "prune-c1").returncode == 0

    out = eb(capsys, *prune, "--dry-run")
    assert out["removed"] == [v1] and v1 in tags()

    out = eb(capsys, *prune)
    assert out["removed"] == [v1] and out["kept"] == [v2]
    assert v1 not in tags() and {v2, "localhost/mine:1"} <= tags()
    # Its other (not ours) tag keeps v1's image: untagged, never deleted under someone.
    assert prune_images["v1"]["config"] in ids()
    assert store.podman("rmi", "localhost/mine:1").returncode == 0
    names = {i["name"] for i in out["report"]["images"]}
    assert v1 not in names and v2 in names
    later = eb(capsys, "report", *args, "--state-dir", str(state), "--json")
    assert {i["name"] for i in later["images"]} == {v2}
    ran = store.podman(*store.run_argv()[len(store.argv()):], v2)
    assert ran.returncode == 0 and ran.stdout == prune_images["v2"]["message"], ran.stderr
