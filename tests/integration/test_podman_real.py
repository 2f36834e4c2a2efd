"""Podman as an import target, against Debian's real podman on a private store.

Every podman here runs with its own --root/--runroot/--tmpdir under the test's temp
dir (services.start_podman_store), never the default store. Images come from the real
docker-registry (the standard set), packed for a `runtime: podman` site.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import services
from clirun import eb


MANIFEST = """\
version: 1
registries:
  "{reg}": {{insecure: true}}
images:
{images}
sites:
  pod-1: {{runtime: podman, platform: linux/amd64}}
  line-3: {{runtime: docker, platform: linux/amd64}}
"""

REFS = ["shop/app:v1", "shop/tools:v1", "shop/multi:v1"]


def write_manifest(path: Path, reg: str, refs: List[str]) -> Path:
    path.write_text(MANIFEST.format(reg=reg, images="\n".join(f"  - ref: {reg}/{r}" for r in refs)))
    return path




def inspect(store: Any, name: str) -> Optional[Dict[str, Any]]:
    out = store.podman("image", "inspect", name)
    return json.loads(out.stdout)[0] if out.returncode == 0 else None


def names(store: Any) -> List[str]:
    out = store.podman("images", "--all", "--format", "json")
    assert out.returncode == 0, out.stderr
    # `podman images` lists an image once per name: count each name once
    return sorted({n for i in json.loads(out.stdout or "[]") for n in i.get("Names") or []})


def image_ids(store: Any) -> List[str]:
    out = store.podman("images", "--all", "--format", "json")
    return sorted({i["Id"] for i in json.loads(out.stdout or "[]")})


def spools(store: Any) -> List[str]:
    return sorted(p.name for p in store.tmpdir.glob("edgebundle-import-*"))


def test_podman_import_report_update_and_refusals(tmp_path: Path, registry: Any, podman_store: Any,
                                                  pushed_images: Dict[str, Any],
                                                  request: pytest.FixtureRequest,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    reg, store = registry.host, podman_store
    dev = ["--state-dir", str(tmp_path / "state"), *store.edgebundle_args()]
    h = ["--home", str(tmp_path / "home")]
    manifest = write_manifest(tmp_path / "m.yaml", reg, REFS)
    seed = tmp_path / "seed.ebundle"
    eb(capsys, *h, "pack", str(manifest), "--site", "pod-1", "-o", str(seed))
    info = eb(capsys, "inspect", str(seed), "--json")
    assert info["header"]["runtime"] == "podman" and info["header"]["layer_form"] == "blob"

    # A corrupted copy is refused: podman is never handed anything, no spool is left.
    data = bytearray(seed.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.ebundle"
    bad.write_bytes(bytes(data))
    eb(capsys, "import", str(bad), *dev, code=5)
    assert names(store) == [] and spools(store) == []

    # A bundle packed for Docker (layers as tars) cannot keep digests in podman: refused.
    docker_bundle = tmp_path / "docker.ebundle"
    eb(capsys, *h, "pack", str(manifest), "--site", "line-3", "-o", str(docker_bundle))
    res = eb(capsys, "import", str(docker_bundle), *dev, code=8)
    assert "podman needs the original blobs" in res["stderr"]
    assert names(store) == []

    report = tmp_path / "report.json"
    out = eb(capsys, "import", str(seed), *dev, "--report", str(report), "--json")
    assert sorted(out["imported"]) == sorted(f"{reg}/{r}" for r in REFS)
    assert spools(store) == [] and all(not n.startswith("localhost/") for n in names(store))
    images = dict(pushed_images["images"])
    multi = pushed_images["multi"]
    images["shop/multi:v1"] = multi["platforms"]["linux/amd64"]
    for ref in REFS:
        got = inspect(store, f"{reg}/{ref}")
        assert got is not None
        want = images[ref]
        assert "sha256:" + got["Id"].removeprefix("sha256:") == want["config_digest"]
        repo = f"{reg}/{ref.split(':')[0]}"
        assert f"{repo}@{want['manifest_digest']}" in got["RepoDigests"]  # digests kept
    # An index keeps its own digest too: `podman run repo@<index digest>` resolves.
    got = inspect(store, f"{reg}/shop/multi:v1")
    assert got is not None and got["Digest"] == multi["index_digest"]
    assert f"{reg}/shop/multi@{multi['index_digest']}" in got["RepoDigests"]
    run = subprocess.run(store.run_argv() + [f"{reg}/shop/app:v1"], capture_output=True, text=True,
                         env=store.env(), timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == images["shop/app:v1"]["message"].strip()

    # The report holds exactly what podman holds, complete; the packer accepts it.
    rep = json.loads(report.read_text())
    assert rep["runtime"]["kind"] == "podman" and "tar-delta-v1" not in rep["features"]
    held = {(i["name"], i["manifest"]) for i in rep["images"] if i["complete"]}
    for ref in REFS:
        assert any(n == f"{reg}/{ref}" for n, _ in held)
    assert (f"{reg}/shop/app:v1", images["shop/app:v1"]["manifest_digest"]) in held
    assert (f"{reg}/shop/multi:v1", multi["index_digest"]) in held
    assert images["shop/app:v1"]["layers"][0]["digest"] in rep["blobs"]
    fresh = eb(capsys, "report", *dev, "--json")
    assert sorted((i["name"], i["manifest"]) for i in fresh["images"]) == \
        sorted((i["name"], i["manifest"]) for i in rep["images"])

    # Idempotent: everything is already present, nothing is loaded again.
    again = eb(capsys, "import", str(seed), *dev, "--json")
    assert again["imported"] == [] and sorted(again["already_present"]) == sorted(f"{reg}/{r}" for r in REFS)

    # The update ships only the changed top layer; held layers are prerequisites.
    eb(capsys, *h, "inventory", "record", "pod-1", str(report))
    manifest = write_manifest(tmp_path / "m.yaml", reg, ["shop/app:v2"] + REFS[1:])
    update = tmp_path / "update.ebundle"
    eb(capsys, *h, "pack", str(manifest), "--site", "pod-1", "-o", str(update))
    v2 = images["shop/app:v2"]
    assert update.stat().st_size <= v2["layers"][-1]["size"] * 1.05 + 64 * 1024
    assert eb(capsys, "inspect", str(update), "--json")["header"]["prerequisites"]

    # A store that lacks the prerequisites refuses it before podman sees anything.
    other = services.start_podman_store(tmp_path / "other")
    request.addfinalizer(other.stop)
    other_dev = ["--state-dir", str(tmp_path / "state2"), *other.edgebundle_args()]
    res = eb(capsys, "import", str(update), *other_dev, code=6)
    assert "lacks" in res["stderr"] and names(other) == []

    out = eb(capsys, "import", str(update), *dev, "--json")
    assert out["imported"] == [f"{reg}/shop/app:v2"]
    got = inspect(store, f"{reg}/shop/app:v2")
    assert got is not None and f"{reg}/shop/app@{v2['manifest_digest']}" in got["RepoDigests"]
    run = subprocess.run(store.run_argv() + [f"{reg}/shop/app:v2"], capture_output=True, text=True,
                         env=store.env(), timeout=120)
    assert run.stdout.strip() == v2["message"].strip(), run.stderr


def _children(pid: int) -> List[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_podman_killed_mid_load_is_cleaned_and_rerun(tmp_path: Path, registry: Any, podman_store: Any,
                                                     pushed_images: Dict[str, Any],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """kill -9 of the import and of its `podman load`: no real name shows an incomplete
    image, the next report removes the temporary names and the spool, the rerun imports."""
    reg, store = registry.host, podman_store
    dev = ["--state-dir", str(tmp_path / "state"), *store.edgebundle_args()]
    manifest = write_manifest(tmp_path / "m.yaml", reg, REFS)
    bundle = tmp_path / "seed.ebundle"
    eb(capsys, "--home", str(tmp_path / "home"), "pack", str(manifest), "--site", "pod-1",
       "-o", str(bundle))
    proc = subprocess.Popen([sys.executable, "-m", "edgebundle", "import", str(bundle), *dev],
                            env=store.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed: List[int] = []
    deadline = time.monotonic() + 60
    loads = 0
    while time.monotonic() < deadline and proc.poll() is None:
        for child in _children(proc.pid):
            if " load " in _cmdline(child):
                loads += 1
                if loads >= 2:  # the second image's load: the first one is loaded, unnamed
                    os.kill(proc.pid, signal.SIGKILL)
                    os.kill(child, signal.SIGKILL)
                    killed = [proc.pid, child]
                break
        if killed:
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert killed, f"never saw the import's podman load: {proc.stderr.read() if proc.stderr else ''}"

    # Nothing is listed under a real name (podman's own view and the report agree).
    real = [n for n in names(store) if not n.startswith("localhost/")]
    assert real == []
    rep = eb(capsys, "report", *dev, "--json")
    assert rep["images"] == []
    assert names(store) == [] and spools(store) == []  # the report cleaned up

    out = eb(capsys, "import", str(bundle), *dev, "--json")
    assert sorted(out["imported"]) == sorted(f"{reg}/{r}" for r in REFS)
    assert all(not n.startswith("localhost/") for n in names(store))


def test_podman_image_first_loaded_from_a_docker_archive(tmp_path: Path, registry: Any,
                                                         podman_store: Any,
                                                         pushed_images: Dict[str, Any],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`podman load` of a docker-archive gives the same image ID a made-up manifest digest
    (measured: the registry's digest is lost). Importing the bundle then adds the real
    digest to the same image, and the report lists it, so the import is confirmed and
    the next one finds it present."""
    reg, store = registry.host, podman_store
    import imagefactory

    info = pushed_images["images"]["shop/app:v1"]
    archive = tmp_path / "app.tar"
    archive.write_bytes(imagefactory.docker_archive_tar(info["built"], [f"{reg}/shop/app:v1"]))
    loaded = store.podman("load", "--quiet", "--input", str(archive))
    assert loaded.returncode == 0, loaded.stderr
    before = inspect(store, f"{reg}/shop/app:v1")
    assert before is not None and before["Digest"] != info["manifest_digest"]  # docker-archive: lost

    dev = ["--state-dir", str(tmp_path / "state"), *store.edgebundle_args()]
    manifest = write_manifest(tmp_path / "m.yaml", reg, ["shop/app:v1"])
    bundle = tmp_path / "b.ebundle"
    eb(capsys, "--home", str(tmp_path / "home"), "pack", str(manifest), "--site", "pod-1",
       "-o", str(bundle))
    out = eb(capsys, "import", str(bundle), *dev, "--json")
    assert out["imported"] == [f"{reg}/shop/app:v1"]
    after = inspect(store, f"{reg}/shop/app:v1")
    assert after is not None and f"{reg}/shop/app@{info['manifest_digest']}" in after["RepoDigests"]
    rep = eb(capsys, "report", *dev, "--json")
    assert (f"{reg}/shop/app:v1", info["manifest_digest"], True) in \
        {(i["name"], i["manifest"], i["complete"]) for i in rep["images"]}
    again = eb(capsys, "import", str(bundle), *dev, "--json")
    assert again["already_present"] == [f"{reg}/shop/app:v1"]


def test_podman_killed_while_spooling_leaves_nothing_in_podman(tmp_path: Path, registry: Any,
                                                              podman_store: Any,
                                                              pushed_images: Dict[str, Any],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """kill -9 halfway through the bundle (read from a pipe): podman was never handed a
    byte, and the next report removes the spool."""
    reg, store = registry.host, podman_store
    dev = ["--state-dir", str(tmp_path / "state"), *store.edgebundle_args()]
    manifest = write_manifest(tmp_path / "m.yaml", reg, REFS)
    bundle = tmp_path / "seed.ebundle"
    eb(capsys, "--home", str(tmp_path / "home"), "pack", str(manifest), "--site", "pod-1",
       "-o", str(bundle))
    data = bundle.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "edgebundle", "import", "-", *dev],
                            env=store.env(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    assert proc.stdin is not None
    proc.stdin.write(data[: len(data) * 3 // 4])
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            (store.tmpdir / s / "blobs" / "sha256").is_dir() and
            any((store.tmpdir / s / "blobs" / "sha256").iterdir()) for s in spools(store)):
        time.sleep(0.01)
    assert spools(store), "the import never began to spool"
    assert not any(" load " in _cmdline(c) for c in _children(proc.pid))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdin.close()
    assert names(store) == [] and image_ids(store) == []
    rep = eb(capsys, "report", *dev, "--json")
    assert rep["images"] == [] and spools(store) == []


KILL_POINTS = ["load:1:before", "load:2:after", "image:2:after", "tag:1:after", "tag:3:before",
               "images:1:after", "untag:1:after", "untag:3:after", "info:1:after"]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_podman_kill_points(tmp_path: Path, registry: Any, podman_store: Any,
                            pushed_images: Dict[str, Any], kill_at: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """kill -9 of the import at each podman command of its commit (before the command or
    after it): every real name podman shows is a complete image with the registry's
    digests, the report lists only those, cleans up what was left, and the rerun
    imports the rest."""
    reg, store = registry.host, podman_store
    killer = Path(__file__).with_name("podman_killer.py")
    podman = f"{sys.executable} {killer} podman --tmpdir {store.runroot / 'libpod-tmp'}"
    dev = ["--state-dir", str(tmp_path / "state"), "--runtime", "podman", "--root", str(store.root),
           "--runroot", str(store.runroot)]
    manifest = write_manifest(tmp_path / "m.yaml", reg, REFS)
    bundle = tmp_path / "seed.ebundle"
    eb(capsys, "--home", str(tmp_path / "home"), "pack", str(manifest), "--site", "pod-1",
       "-o", str(bundle))
    (tmp_path / "kills").mkdir()
    env = dict(store.env(), EDGEBUNDLE_KILL_AT=kill_at, EDGEBUNDLE_KILL_DIR=str(tmp_path / "kills"))
    proc = subprocess.run([sys.executable, "-m", "edgebundle", "import", str(bundle), *dev,
                           "--podman", podman], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {kill_at}: {proc.stderr}"

    images = dict(pushed_images["images"])
    images["shop/multi:v1"] = pushed_images["multi"]["platforms"]["linux/amd64"]
    wanted = {f"{reg}/{r}": images[r] for r in REFS}

    def check_real_names() -> List[str]:
        real = [n for n in names(store) if not n.startswith("localhost/")]
        for name in real:
            got = inspect(store, name)
            assert got is not None and name in wanted, name
            assert "sha256:" + got["Id"].removeprefix("sha256:") == wanted[name]["config_digest"]
            assert [l["diff_id"] for l in wanted[name]["layers"]] == got["RootFS"]["Layers"]
            assert any(d.endswith(wanted[name]["manifest_digest"]) for d in got["RepoDigests"])
        return real

    real = check_real_names()
    rep = eb(capsys, "report", *dev, "--json")
    assert sorted({i["name"] for i in rep["images"]}) == sorted(real)
    assert all(i["complete"] for i in rep["images"])
    assert [n for n in names(store) if n.startswith("localhost/")] == [] and spools(store) == []

    out = eb(capsys, "import", str(bundle), *dev, "--json")
    assert sorted(out["imported"] + out["already_present"]) == sorted(wanted)
    assert sorted(check_real_names()) == sorted(wanted)
