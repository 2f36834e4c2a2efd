"""Disk full, for real: the runtime's data root on a small tmpfs.

(a) the pre-flight refuses before anything reaches the runtime (exit 14, both numbers,
    image list and content store unchanged);
(b) a bundle whose header understates slips past the pre-flight and meets ENOSPC in the
    runtime: nothing half-imported is listed, the error says the disk filled (exit 14);
    after the tmpfs grows, the same bundle imports;
(c) ``pack -o`` onto a small tmpfs is refused before it fetches or writes.

Images are built in-process (``tests/unit/tiny_images``): one incompressible layer of
``BIG`` bytes, so blob, tar and unpacked layer are all about that size. Each tmpfs is
mounted under the test's own temp dir and unmounted afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest

import services
from faults import tmpfs

UNIT = Path(__file__).resolve().parents[1] / "unit"
if str(UNIT) not in sys.path:
    sys.path.insert(0, str(UNIT))

from tiny_images import BASE, Images, write_oci_layout  # noqa: E402

from edgebundle import pack as pack_module  # noqa: E402
from edgebundle.cache import BlobCache  # noqa: E402
from edgebundle.cli.main import main  # noqa: E402
from edgebundle.holdings import Inventory  # noqa: E402
from edgebundle.pack import write_bundle  # noqa: E402
from edgebundle.plan import plan_bundle  # noqa: E402

MB = 1000 * 1000
BIG = 24 * MB  # the incompressible layer


def big_layer() -> Dict[str, bytes]:
    return {"data/blob.bin": os.urandom(BIG)}


def grow(path: Path, size_mb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(path)], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def numbers(line: str) -> "tuple[float, float]":
    """(free, needed) in bytes from "... has 41.8 MB free; ... needs about 64.9 MB (...)"."""
    m = re.search(r"has (\d+\.\d) MB free; .* needs about (\d+\.\d) MB \(", line)
    assert m, line
    return float(m.group(1)) * MB, float(m.group(2)) * MB


def eb(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> str:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc == code, f"edgebundle {' '.join(argv)} exited {rc}, wanted {code}: {err}"
    if code:
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("edgebundle: error: "), err
        return lines[0]
    return out


def make_bundle(tmp: Path, runtime: str, name: str, *, lie: bool = False,
                monkeypatch: Optional[pytest.MonkeyPatch] = None) -> Path:
    """A one-image bundle with the big layer; ``lie``: its header claims 0 bytes."""
    images = Images(BlobCache(tmp / f"build-{name}"))
    img = images.image(f"example.test/space/{name}:v1", [BASE, big_layer()])
    ns = "space" if runtime == "containerd" else None
    plan = plan_bundle("gw", [img], Inventory.empty(runtime, ns), runtime=runtime, namespace=ns,
                       platform="linux/amd64")
    if lie:
        assert monkeypatch is not None
        monkeypatch.setattr(pack_module, "content_bytes", lambda plan: 0)
        monkeypatch.setattr(pack_module, "unpacked_bytes", lambda plan: 0)
    out = tmp / f"{name}.ebundle"
    with open(out, "wb") as fh:
        write_bundle(plan, images.cache, fh, level=1)
    if lie:
        monkeypatch.undo()  # type: ignore[union-attr]
    return out


# ---------------------------------------------------------------------------
# containerd


def ctr(cd: services.Containerd, *args: str, ns: str = "space") -> str:
    r = subprocess.run(cd.ctr_argv(ns) + list(args), capture_output=True, text=True,
                       env=cd.env(), timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def ctr_state(cd: services.Containerd) -> Dict[str, List[str]]:
    """What containerd lists: images, content, leases, active snapshots, ingests."""
    def rows(text: str) -> List[str]:
        return sorted(l.split()[0] for l in text.splitlines()[1:] if l.strip())

    ingest = cd.root / "io.containerd.content.v1.content" / "ingest"
    return {"images": rows(ctr(cd, "images", "ls")),
            "content": sorted(l for l in ctr(cd, "content", "ls", "-q").split()),
            "leases": rows(ctr(cd, "leases", "ls")),
            "snapshots": sorted(l for l in ctr(cd, "snapshots", "--snapshotter", cd.snapshotter,
                                                 "ls").splitlines()[1:] if l.strip()),
            "ingests": sorted(os.listdir(ingest)) if ingest.is_dir() else []}


def cd_import(cd: services.Containerd, bundle: Path, capsys: pytest.CaptureFixture[str],
              code: int = 0, *extra: str) -> str:
    return eb(capsys, "import", str(bundle), "--runtime", "containerd", "--address", cd.address,
              "--namespace", "space", "--snapshotter", cd.snapshotter, "--no-progress", *extra,
              code=code)


@pytest.fixture()
def small_containerd(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[services.Containerd]:
    size = getattr(request, "param", 40)
    with tmpfs(tmp_path / "cdroot", size) as root:
        try:
            cd = services.start_containerd(tmp_path / "cd", root=root)
        except services.ServiceError as exc:
            pytest.fail(f"containerd could not start on a tmpfs: {exc}", pytrace=False)
        try:
            yield cd
        finally:
            cd.stop()


def test_containerd_refused_before_starting(tmp_path: Path, small_containerd: services.Containerd,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    cd = small_containerd
    bundle = make_bundle(tmp_path, "containerd", "refused")
    before = ctr_state(cd)
    free = free_bytes(cd.root)
    line = cd_import(cd, bundle, capsys, 14)
    assert f"containerd content store and snapshots at {cd.root}" in line, line
    got_free, need = numbers(line)
    assert abs(got_free - free) < MB, (free, line)
    assert need > 2 * BIG and need > got_free, line  # blob + snapshot, both counted
    assert ctr_state(cd) == before


def settled(state: Callable[[], Dict[str, Any]], want: Dict[str, Any],
            timeout: float = 10.0) -> Dict[str, Any]:
    """The runtime's state once it equals ``want`` (GC after a failed import is
    asynchronous), or as it is when ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        got = state()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.mark.parametrize("small_containerd", [44], indirect=True)
def test_containerd_unpack_fills_the_disk_nothing_is_listed(
        tmp_path: Path, small_containerd: services.Containerd, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The header claims 0 bytes: the pre-flight and the per-entry check pass (the blob
    fits), the snapshot does not."""
    cd = small_containerd
    bundle = make_bundle(tmp_path, "containerd", "liar", lie=True, monkeypatch=monkeypatch)
    before = ctr_state(cd)
    line = cd_import(cd, bundle, capsys, 14)
    assert "the disk filled while importing bundle" in line and "nothing was imported" in line
    assert "failed to extract layer" in line and "no space left on device" in line, line
    # No image, no lease, no ingest, no snapshot, no blob left behind.
    assert settled(lambda: ctr_state(cd), before) == before
    grow(cd.root, 200)
    cd_import(cd, bundle, capsys)
    assert ctr_state(cd)["images"] == ["example.test/space/liar:v1"]


@pytest.mark.parametrize("small_containerd", [30], indirect=True)
def test_containerd_entry_larger_than_the_header_said_is_refused(
        tmp_path: Path, small_containerd: services.Containerd, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-flight passes on the lying header; the big entry's own size does not fit:
    refused before its first byte, after ctr had been handed the small ones."""
    cd = small_containerd
    bundle = make_bundle(tmp_path, "containerd", "liar", lie=True, monkeypatch=monkeypatch)
    before = ctr_state(cd)
    line = cd_import(cd, bundle, capsys, 14)
    assert re.search(r"entry sha256:[0-9a-f]{64} needs about 40\.8 MB \(24\.0 MB content \+ ", line), line
    assert settled(lambda: ctr_state(cd), before) == before


@pytest.mark.parametrize("small_containerd", [20], indirect=True)
def test_containerd_disk_filling_mid_stream(tmp_path: Path, small_containerd: services.Containerd,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Unchecked (--no-space-check): the content store fills mid-blob."""
    cd = small_containerd
    bundle = make_bundle(tmp_path, "containerd", "mid")
    before = ctr_state(cd)
    line = cd_import(cd, bundle, capsys, 14, "--no-space-check")
    assert "the disk filled while importing bundle" in line and "nothing was imported" in line
    assert "failed to ingest" in line and "no space left on device" in line, line
    assert settled(lambda: ctr_state(cd), before) == before
    grow(cd.root, 200)
    cd_import(cd, bundle, capsys)
    assert ctr_state(cd)["images"] == ["example.test/space/mid:v1"]


# ---------------------------------------------------------------------------
# Docker


def docker_state(dk: services.Dockerd) -> Dict[str, Any]:
    r = subprocess.run(dk.docker_argv() + ["images", "-a", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    tmp = dk.data_root / "tmp"
    layers = dk.data_root / "image" / dk.storage_driver / "layerdb" / "sha256"
    return {"images": sorted(r.stdout.split("\n")[:-1]),
            "tmp": sorted(os.listdir(tmp)) if tmp.is_dir() else [],
            "layers": sorted(os.listdir(layers)) if layers.is_dir() else []}


def dk_import(dk: services.Dockerd, bundle: Path, capsys: pytest.CaptureFixture[str],
              code: int = 0) -> str:
    return eb(capsys, "import", str(bundle), "--runtime", "docker", "--host", dk.host,
              "--no-progress", code=code)


@pytest.fixture()
def small_dockerd(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[services.Dockerd]:
    size = getattr(request, "param", 40)
    with tmpfs(tmp_path / "dkroot", size) as root:
        try:
            dk = services.start_dockerd(tmp_path / "dk", data_root=root)
        except services.ServiceError as exc:
            pytest.fail(f"dockerd could not start on a tmpfs: {exc}", pytrace=False)
        try:
            yield dk
        finally:
            dk.stop()


def test_docker_refused_before_starting(tmp_path: Path, small_dockerd: services.Dockerd,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    dk = small_dockerd
    bundle = make_bundle(tmp_path, "docker", "refused")
    before = docker_state(dk)
    free = free_bytes(dk.data_root)
    line = dk_import(dk, bundle, capsys, 14)
    assert f"docker at {dk.data_root}" in line, line
    got_free, need = numbers(line)
    assert abs(got_free - free) < MB, (free, line)
    assert need > 2 * BIG and need > got_free, line  # load's temp copy + layer dir
    assert docker_state(dk) == before


@pytest.mark.parametrize("small_dockerd", [44], indirect=True)
def test_docker_unpack_fills_the_disk_nothing_is_listed(
        tmp_path: Path, small_dockerd: services.Dockerd, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Load's temp copy of the archive fits; unpacking the layer beside it does not."""
    dk = small_dockerd
    bundle = make_bundle(tmp_path, "docker", "liar", lie=True, monkeypatch=monkeypatch)
    before = docker_state(dk)
    line = dk_import(dk, bundle, capsys, 14)
    assert "the disk filled while importing bundle" in line and "nothing was imported" in line
    assert "no space left on device" in line, line
    assert settled(lambda: docker_state(dk), before) == before  # no image, no layer, no tmp
    grow(dk.data_root, 200)
    dk_import(dk, bundle, capsys)
    assert docker_state(dk)["images"][0].startswith("example.test/space/liar:v1 ")


@pytest.mark.parametrize("small_dockerd", [20], indirect=True)
def test_docker_disk_filling_mid_stream(tmp_path: Path, small_dockerd: services.Dockerd,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Unchecked (--no-space-check): load's temp copy fills the disk mid-archive."""
    dk = small_dockerd
    bundle = make_bundle(tmp_path, "docker", "mid")
    before = docker_state(dk)
    line = eb(capsys, "import", str(bundle), "--runtime", "docker", "--host", dk.host,
              "--no-progress", "--no-space-check", code=14)
    assert "the disk filled while importing bundle" in line and "nothing was imported" in line
    assert "no space left on device" in line, line
    assert settled(lambda: docker_state(dk), before) == before


# ---------------------------------------------------------------------------
# The packer: its cache and -o


def packer_world(tmp: Path) -> Path:
    """A manifest list over an OCI layout holding one image with the big layer."""
    images = Images(BlobCache(tmp / "build"))
    img = images.image("example.test/space/app:v1", [BASE, big_layer()])
    write_oci_layout(tmp / "layout", images.cache, [img])
    manifest = tmp / "m.yaml"
    manifest.write_text(f"""version: 1
images:
  - ref: example.test/space/app:v1
    source: oci-layout:{tmp / 'layout'}
sites:
  gw: {{runtime: containerd, namespace: space, platform: linux/amd64}}
""")
    return manifest


def cached_blobs(home: Path) -> List[int]:
    blobs = home / "cache" / "blobs" / "sha256"
    return sorted(p.stat().st_size for p in blobs.iterdir()) if blobs.is_dir() else []


def test_pack_output_on_a_small_disk_is_refused_up_front(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    manifest = packer_world(tmp_path)
    home = tmp_path / "home"
    with tmpfs(tmp_path / "stick", 20) as stick:
        free = free_bytes(stick)
        line = eb(capsys, "--home", str(home), "pack", str(manifest), "--site", "gw", "-o",
                  str(stick / "b.ebundle"), "--no-progress", code=14)
        assert f"bundle output at {stick}" in line, line
        got_free, need = numbers(line)
        assert abs(got_free - free) < MB and need > BIG, line
        assert os.listdir(stick) == []
    assert max(cached_blobs(home), default=0) < BIG  # the layer was never fetched


def test_pack_cache_on_a_small_disk_is_refused_before_fetching(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = packer_world(tmp_path)
    with tmpfs(tmp_path / "home", 20) as home:
        line = eb(capsys, "--home", str(home), "pack", str(manifest), "--site", "gw", "-o",
                  str(tmp_path / "b.ebundle"), "--no-progress", code=14)
        assert f"packer cache at {home / 'cache'}" in line and "MB free" in line, line
        assert max(cached_blobs(home), default=0) < BIG
        assert os.listdir(home / "cache" / "tmp") == []
    assert not (tmp_path / "b.ebundle").exists()


def test_pack_cache_filling_mid_fetch_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The pre-flight passed (its estimate was low): the disk fills while the layer is
    copied into the cache. One line, exit 14, no temp file left behind."""
    from edgebundle import space

    monkeypatch.setattr(space, "MIN_MARGIN", 0)
    monkeypatch.setattr(space.Disk, "free", lambda self, path: 1 << 40)  # the estimate lies
    manifest = packer_world(tmp_path)
    with tmpfs(tmp_path / "home", 20) as home:
        line = eb(capsys, "--home", str(home), "pack", str(manifest), "--site", "gw", "-o",
                  str(tmp_path / "b.ebundle"), "--no-progress", code=14)
        assert "packer cache" in line and "no space left" in line, line
        assert os.listdir(home / "cache" / "tmp") == []
