"""A bundle packed in volumes imports into real containerd and real Docker.

From the first volume's path, and from standard input through a real pipe
(`cat b.ebundle.0* | edgebundle import - …`, the command README documents); a damaged
volume is named and nothing is imported. The volume size is lowered below the CLI's
1 MiB floor (``volumeset.MIN_VOLUME_SIZE``) so that these small test images still make
several volumes; everything else is the real path.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

import imagefactory
from edgebundle import volumeset
from test_core_loop import ctr, ctr_images, ctr_run, docker, eb, write_manifest

ROOT = Path(__file__).resolve().parents[2]
SIZE = 256 * 1024


@pytest.fixture(autouse=True)
def small_volumes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volumeset, "MIN_VOLUME_SIZE", 64 * 1024)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def pack_volumes(capsys: pytest.CaptureFixture[str], tmp_path: Path, manifest: Path,
                 site: str) -> List[Path]:
    out = tmp_path / "vols" / "b.ebundle"
    out.parent.mkdir()
    packed = eb(capsys, "--home", str(tmp_path / "home"), "pack", str(manifest), "--site", site,
                "-o", str(out), "--volume-size", f"{SIZE // 1024}k", "--json")
    paths = [Path(p) for p in packed["volumes"]]
    assert len(paths) >= 3 and paths[0].name == "b.ebundle.001"
    assert all(p.stat().st_size <= SIZE for p in paths)
    assert sorted(out.parent.iterdir()) == paths  # no temp files, nothing else
    return paths


def damaged_copy(tmp_path: Path, paths: List[Path], which: int, offset: int) -> List[Path]:
    bad = tmp_path / "bad"
    bad.mkdir()
    copies = [Path(shutil.copy(p, bad / p.name)) for p in paths]
    flip(copies[which], offset)
    return copies


def piped_import(paths: List[Path], runtime_args: List[str]) -> "subprocess.CompletedProcess[str]":
    """`cat VOLUMES | edgebundle import - …` through a shell: a real pipe, short reads and all."""
    cmd = (f"cat {' '.join(shlex.quote(str(p)) for p in paths)} | "
           f"{shlex.quote(sys.executable)} -m edgebundle import - "
           + " ".join(shlex.quote(a) for a in runtime_args))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=300, env=env)


def test_containerd_imports_volumes_from_path_and_stdin(tmp_path: Path, registry: Any,
                                                        containerd: Any,
                                                        pushed_images: Dict[str, Any],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    refs = ["shop/app:v1", "shop/worker:v1"]
    manifest = write_manifest(tmp_path / "m.yaml", registry.host, refs, "vol-path")
    paths = pack_volumes(capsys, tmp_path, manifest, "gw-01")

    def rt(ns: str) -> List[str]:
        return ["--runtime", "containerd", "--address", containerd.address, "--namespace", ns,
                "--snapshotter", containerd.snapshotter]

    # A volume damaged in the middle of the set: named, and nothing imported.
    bad = damaged_copy(tmp_path, paths, 1, SIZE // 2)
    res = eb(capsys, "import", str(bad[0]), *rt("vol-bad"), code=5)
    assert f"volume {bad[1]} (volume 2 of {len(paths)}) is damaged: payload checksum mismatch" \
        in res["stderr"]
    assert ctr_images(containerd, "vol-bad") == {}
    assert ctr(containerd, "vol-bad", "content", "ls", "-q").split() == []

    # From the first volume's path: the others are found next to it.
    eb(capsys, "import", str(paths[0]), *rt("vol-path"))
    listed = ctr_images(containerd, "vol-path")
    for ref in refs:
        assert listed[f"{registry.host}/{ref}"] == pushed_images["images"][ref]["manifest_digest"]
    out = ctr_run(containerd, "vol-path", f"{registry.host}/shop/app:v1", "vol-path-0")
    assert out.strip() == pushed_images["images"]["shop/app:v1"]["message"].strip()

    # From standard input, in sequence.
    proc = piped_import(paths, rt("vol-stdin"))
    assert proc.returncode == 0, proc.stderr
    assert set(ctr_images(containerd, "vol-stdin")) == set(listed)
    out = ctr_run(containerd, "vol-stdin", f"{registry.host}/shop/worker:v1", "vol-stdin-0")
    assert out.strip() == pushed_images["images"]["shop/worker:v1"]["message"].strip()

    # Standard input missing a volume: named, nothing imported.
    proc = piped_import(paths[:1] + paths[2:], rt("vol-gap"))
    assert proc.returncode == 5
    assert proc.stderr.startswith(f"edgebundle: error: volume 2 on standard input is volume 3 of "
                                  f"{len(paths)}, expected volume 2 (volumes swapped or out of order)")
    assert ctr_images(containerd, "vol-gap") == {}


def test_docker_imports_volumes_from_path_and_stdin(tmp_path: Path, registry: Any, dockerd: Any,
                                                    pushed_images: Dict[str, Any],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    app = pushed_images["images"]["shop/app:v1"]
    imagefactory.push_image(registry.host, "vol/app", "v1", app["built"])
    name = f"{registry.host}/vol/app:v1"
    manifest = write_manifest(tmp_path / "m.yaml", registry.host, ["vol/app:v1"], "unused")
    paths = pack_volumes(capsys, tmp_path, manifest, "line-3")
    rt = ["--runtime", "docker", "--host", dockerd.host]

    def tags() -> str:
        return docker(dockerd, "images", "--format", "{{.Repository}}:{{.Tag}}")

    # The last volume's own checksum damaged (the bundle inside is intact): still refused.
    last = paths[-1]
    bad = damaged_copy(tmp_path, paths, len(paths) - 1, last.stat().st_size - 10)
    res = eb(capsys, "import", str(bad[0]), *rt, code=5)
    assert f"volume {bad[-1]} (volume {len(paths)} of {len(paths)}) is damaged" in res["stderr"]
    assert name not in tags()

    eb(capsys, "import", str(paths[0]), *rt)
    assert docker(dockerd, "run", "--rm", "--network", "none", name).strip() == app["message"].strip()
    assert docker(dockerd, "image", "inspect", "--format", "{{.Id}}", name).strip() == app["config_digest"]

    docker(dockerd, "rmi", name)
    proc = piped_import(paths, rt)
    assert proc.returncode == 0, proc.stderr
    assert docker(dockerd, "run", "--rm", "--network", "none", name).strip() == app["message"].strip()
