"""`edgebundle export` loaded by the real consumers: containerd (as k3s imports), docker, podman.

A real docker-registry serves the standard images; each archive is written by the real
CLI and loaded by the tool a device without edgebundle has: `ctr -n k8s.io images import`
(the k3s flavour exactly as k3s reads it: decompressed by file name with k3s's 32 MiB
zstd window limit, all platforms), `docker load`, `podman load` (own --root/--runroot).
Then the images run and their digests are compared with the registry's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import tarfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import zstandard

import imagefactory
import services
from edgebundle.oci import MT_OCI_LAYER_ZSTD
from edgebundle.cli.main import main

APPS = ["shop/app:v1", "shop/worker:v1", "shop/tools:v1"]  # tools: OCI media types

MANIFEST = """\
version: 1
registries:
  "{reg}": {{insecure: true}}
images:
  - {{ref: "{reg}/shop/app:v1", sites: [gw-01, line-3]}}
  - {{ref: "{reg}/shop/worker:v1", sites: [gw-01, line-3]}}
  - {{ref: "{reg}/shop/tools:v1", sites: [gw-01, line-3]}}
  - {{ref: "{reg}/shop/multi:v1", sites: [gw-01, gw-arm, line-3]}}
  - {{ref: "{reg}/shop/zstdapp:v1", sites: [zstd-docker, zstd-ctr]}}
sites:
  gw-01: {{runtime: containerd, namespace: k8s.io, platform: linux/amd64}}
  gw-arm: {{runtime: containerd, namespace: k8s.io, platform: linux/arm64}}
  line-3: {{runtime: docker, platform: linux/amd64}}
  zstd-docker: {{runtime: docker, platform: linux/amd64}}
  zstd-ctr: {{runtime: containerd, platform: linux/amd64}}
"""


def run(argv: List[str], *, stdin: Any = None, timeout: float = 180, **kw: Any) -> str:
    out = subprocess.run(argv, stdin=stdin, capture_output=True, text=True, timeout=timeout,
                         env=services.clean_env(), **kw)
    assert out.returncode == 0, f"{argv}: {out.stderr}"
    return out.stdout


def push_zstd_image(registry_host: str) -> Any:
    """shop/zstdapp:v1 with zstd layers (OCI ``tar+zstd``): same tars, so the same config."""
    base = imagefactory.build_app_image("zstdapp", "v1", media="oci")
    layers = tuple(imagefactory.Blob(MT_OCI_LAYER_ZSTD, zstandard.ZstdCompressor().compress(t))
                   for t in base.layer_tars)
    manifest = imagefactory.Blob(imagefactory.OCI_MANIFEST, imagefactory.canonical_json({
        "schemaVersion": 2, "mediaType": imagefactory.OCI_MANIFEST,
        "config": base.config.descriptor(), "layers": [b.descriptor() for b in layers]}))
    img = dataclasses.replace(base, manifest=manifest, layers=layers)
    imagefactory.push_image(registry_host, "shop/zstdapp", "v1", img)
    return img


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, registry: Any,
          pushed_images: Dict[str, Any]) -> Dict[str, Any]:
    tmp = tmp_path_factory.mktemp("export")
    manifest = tmp / "m.yaml"
    manifest.write_text(MANIFEST.format(reg=registry.host))
    return {"manifest": str(manifest), "home": str(tmp / "home"), "reg": registry.host,
            "images": pushed_images, "zstd": push_zstd_image(registry.host)}


@pytest.fixture(scope="module")
def k8s_containerd(request: pytest.FixtureRequest,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Containerd]:
    """A containerd of this module's own: its k8s.io namespace is what k3s imports into."""
    from conftest import _start

    cd = _start(request.config, "containerd",
                lambda: services.start_containerd(tmp_path_factory.mktemp("export-cd")))
    yield cd
    cd.stop()


def export(setup: Dict[str, Any], capsys: pytest.CaptureFixture[str], site: str, fmt: str,
           out: Path, *extra: str) -> Dict[str, Any]:
    capsys.readouterr()
    rc = main(["--home", setup["home"], "export", setup["manifest"], "--site", site,
               "--format", fmt, "-o", str(out), "--json", *extra])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    summary: Dict[str, Any] = json.loads(stdout)
    assert summary["bytes"] == out.stat().st_size
    return summary


def ref(setup: Dict[str, Any], name: str) -> str:
    return f"{setup['reg']}/{name}"


def expected_manifest(setup: Dict[str, Any], name: str) -> str:
    """The registry's manifest digest of ``name`` for linux/amd64."""
    if name == "shop/multi:v1":
        return str(setup["images"]["multi"]["platforms"]["linux/amd64"]["manifest_digest"])
    return str(setup["images"]["images"][name]["manifest_digest"])


def expected_config(setup: Dict[str, Any], name: str) -> str:
    if name == "shop/multi:v1":
        return str(setup["images"]["multi"]["platforms"]["linux/amd64"]["config_digest"])
    return str(setup["images"]["images"][name]["config_digest"])


def ctr_images(cd: services.Containerd, ns: str) -> Dict[str, str]:
    rows = run(cd.ctr_argv(ns) + ["images", "ls"]).splitlines()[1:]
    return {r.split()[0]: r.split()[2] for r in rows if r.strip()}


def ctr_content(cd: services.Containerd, ns: str) -> set[str]:
    return set(run(cd.ctr_argv(ns) + ["content", "ls", "-q"]).split())


def ctr_run(cd: services.Containerd, ns: str, image: str, cid: str) -> str:
    return run(cd.ctr_argv(ns) + ["run", "--rm", "--snapshotter", cd.snapshotter, image, cid])


def k3s_import(cd: services.Containerd, ns: str, archive: Path) -> None:
    """What k3s does with a file in agent/images/: decompress by name (zstd with a 32 MiB
    decoder limit), then containerd's importer with all platforms."""
    importer = cd.ctr_argv(ns) + ["images", "import", "--all-platforms", "-"]
    name = archive.name
    if name.endswith((".tar.zst", ".tzst")):
        decompress = ["zstd", "-d", "-c", "--memory=32MB", str(archive)]
    elif name.endswith((".tar.gz", ".tgz")):
        decompress = ["gzip", "-d", "-c", str(archive)]
    else:
        decompress = ["cat", str(archive)]
    with subprocess.Popen(decompress, stdout=subprocess.PIPE) as src:
        run(importer, stdin=src.stdout)
        assert src.wait(timeout=60) == 0


# ---------------------------------------------------------------------------
# containerd / k3s


@pytest.mark.parametrize("suffix", [".tar.zst", ".tar.gz", ".tar"])
def test_k3s_airgap_imports_as_k3s_does(setup: Dict[str, Any], k8s_containerd: services.Containerd,
                                        tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        suffix: str) -> None:
    out = tmp_path / f"images{suffix}"
    summary = export(setup, capsys, "gw-01", "k3s-airgap", out)
    assert summary["compression"] == {".tar.zst": "zstd", ".tar.gz": "gzip", ".tar": "none"}[suffix]
    ns = "k8s.io" if suffix == ".tar.zst" else f"k3s-{suffix.strip('.').replace('.', '-')}"
    k3s_import(k8s_containerd, ns, out)

    listed = ctr_images(k8s_containerd, ns)
    names = APPS + ["shop/multi:v1"]
    # Each image targets the registry's manifest for the site's platform: k3s would fail
    # the whole file on an index whose other platforms are absent.
    assert listed == {ref(setup, n): expected_manifest(setup, n) for n in names}
    content = ctr_content(k8s_containerd, ns)
    for n in APPS:
        info = setup["images"]["images"][n]
        assert {info["config_digest"]} | {la["digest"] for la in info["layers"]} <= content
    arm = setup["images"]["multi"]["platforms"]["linux/arm64/v8"]
    assert arm["manifest_digest"] not in content and arm["config_digest"] not in content
    for i, n in enumerate(APPS):
        assert ctr_run(k8s_containerd, ns, ref(setup, n), f"k3s-{i}") == \
            setup["images"]["images"][n]["message"]


def test_k3s_airgap_zstd_window_fits_k3s(setup: Dict[str, Any], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "images.tzst"
    # level 22 alone would ask for a 128 MiB window; k3s's decoder stops at 32 MiB
    export(setup, capsys, "gw-01", "k3s-airgap", out, "--level", "22")
    run(["zstd", "-t", "--memory=32MB", str(out)])


def test_oci_archive_ctr_import_keeps_every_digest(setup: Dict[str, Any],
                                                   k8s_containerd: services.Containerd,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gw-01-oci.tar"
    summary = export(setup, capsys, "gw-01", "oci-archive", out)
    ns = "oci-ctr"
    run(k8s_containerd.ctr_argv(ns) + ["images", "import", str(out)])
    listed = ctr_images(k8s_containerd, ns)
    expected = {ref(setup, n): expected_manifest(setup, n) for n in APPS}
    expected[ref(setup, "shop/multi:v1")] = setup["images"]["multi"]["index_digest"]
    assert listed == expected
    assert {i["name"]: i["named"] for i in summary["images"]} == expected
    content = ctr_content(k8s_containerd, ns)
    multi = setup["images"]["multi"]
    assert multi["index_digest"] in content
    for info in [setup["images"]["images"][n] for n in APPS] + [multi["platforms"]["linux/amd64"]]:
        assert {info["manifest_digest"], info["config_digest"]} | \
            {la["digest"] for la in info["layers"]} <= content  # the registry's own blobs
    assert ctr_run(k8s_containerd, ns, ref(setup, "shop/tools:v1"), "oci-0") == \
        setup["images"]["images"]["shop/tools:v1"]["message"]


def test_oci_archive_streams_into_ctr(setup: Dict[str, Any], k8s_containerd: services.Containerd) -> None:
    """`export -o - | ctr images import -`: the archive never touches the disk."""
    ns = "oci-pipe"
    argv = [sys.executable, "-m", "edgebundle", "--home", setup["home"], "export", setup["manifest"],
            "--site", "gw-01", "--format", "oci-archive", "-o", "-", "--image",
            ref(setup, "shop/app:v1")]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=services.clean_env()) as producer:
        run(k8s_containerd.ctr_argv(ns) + ["images", "import", "-"], stdin=producer.stdout)
        _, err = producer.communicate(timeout=60)
        assert producer.returncode == 0, err
    assert b"wrote standard output: oci-archive" in err
    assert ctr_images(k8s_containerd, ns) == {ref(setup, "shop/app:v1"):
                                              expected_manifest(setup, "shop/app:v1")}


def test_export_holds_only_the_sites_platform(setup: Dict[str, Any], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "arm.tar"
    summary = export(setup, capsys, "gw-arm", "k3s-airgap", out)
    arm = setup["images"]["multi"]["platforms"]["linux/arm64/v8"]
    amd = setup["images"]["multi"]["platforms"]["linux/amd64"]
    with tarfile.open(out) as tf:
        blobs = {m.name.rsplit("/", 1)[-1] for m in tf.getmembers() if m.name.startswith("blobs/")}
        index = json.load(tf.extractfile("index.json"))  # type: ignore[arg-type]
    assert [i["name"] for i in summary["images"]] == [ref(setup, "shop/multi:v1")]
    assert arm["manifest_digest"][7:] in blobs and arm["config_digest"][7:] in blobs
    assert amd["manifest_digest"][7:] not in blobs and amd["config_digest"][7:] not in blobs
    assert [m["digest"] for m in index["manifests"]] == [arm["manifest_digest"]]


# ---------------------------------------------------------------------------
# docker


def test_docker_archive_docker_load(setup: Dict[str, Any], dockerd: Any, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "line-3.tar.gz"
    summary = export(setup, capsys, "line-3", "docker-archive", out)
    assert summary["compression"] == "gzip"
    loaded = run(dockerd.docker_argv() + ["load", "-i", str(out)])
    names = APPS + ["shop/multi:v1"]
    for n in names:
        assert f"Loaded image: {ref(setup, n)}" in loaded
        image_id = run(dockerd.docker_argv() + ["image", "inspect", "--format", "{{.Id}}",
                                                 ref(setup, n)]).strip()
        assert image_id == expected_config(setup, n)  # the image ID is the config digest
        digests = run(dockerd.docker_argv() + ["image", "inspect", "--format",
                                               "{{json .RepoDigests}}", ref(setup, n)]).strip()
        assert digests == "[]"  # docker load records no registry digest (README)
    for i, n in enumerate(APPS):
        assert run(dockerd.docker_argv() + ["run", "--rm", "--network", "none", ref(setup, n)]) == \
            setup["images"]["images"][n]["message"]


# ---------------------------------------------------------------------------
# podman


@pytest.fixture()
def podman(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[List[str]]:
    from conftest import _start

    short = Path(tempfile.mkdtemp(prefix="export-pm-", dir="/tmp"))  # runroot: <= 50 chars
    try:
        yield _start(request.config, "podman",
                     lambda: services.podman_cmd(tmp_path / "podman-root", short / "run"))
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_podman_uses_only_its_own_store(podman: List[str], tmp_path: Path) -> None:
    info = json.loads(run(podman + ["info", "--format", "json"]))
    assert info["store"]["graphRoot"] == str(tmp_path / "podman-root")
    assert info["store"]["runRoot"] == podman[podman.index("--runroot") + 1]
    assert info["store"]["graphDriverName"] == "vfs"


def podman_images(podman: List[str]) -> Dict[str, Dict[str, Any]]:
    rows = json.loads(run(podman + ["images", "--format", "json"]))
    return {name: row for row in rows for name in row.get("Names") or []}


def test_podman_load_docker_archive(setup: Dict[str, Any], podman: List[str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "line-3.tar"
    export(setup, capsys, "line-3", "docker-archive", out)
    run(podman + ["load", "-i", str(out)])
    held = podman_images(podman)
    for n in APPS + ["shop/multi:v1"]:
        assert "sha256:" + held[ref(setup, n)]["Id"] == expected_config(setup, n)
        # podman writes a manifest of its own for a docker-archive (README: not kept)
        assert held[ref(setup, n)]["Digest"] != expected_manifest(setup, n)
    assert run(podman + ["run", "--rm", *services.PODMAN_RUN_FLAGS, ref(setup, "shop/app:v1")]) == \
        setup["images"]["images"]["shop/app:v1"]["message"]


def test_podman_load_oci_archive_keeps_the_registry_digest(
        setup: Dict[str, Any], podman: List[str], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # podman 4.3 loads one image per OCI archive ("more than one image in oci, choose an
    # image"): one archive per image with --image
    for n in ("shop/tools:v1", "shop/multi:v1"):
        out = tmp_path / f"{n.replace('/', '_').replace(':', '_')}.tar"
        export(setup, capsys, "gw-01", "oci-archive", out, "--image", ref(setup, n))
        run(podman + ["load", "-i", str(out)])
    held = podman_images(podman)
    tools, multi = held[ref(setup, "shop/tools:v1")], held[ref(setup, "shop/multi:v1")]
    assert tools["Digest"] == expected_manifest(setup, "shop/tools:v1")
    assert multi["Digest"] == setup["images"]["multi"]["index_digest"]  # the index, kept
    assert "sha256:" + multi["Id"] == expected_config(setup, "shop/multi:v1")
    assert run(podman + ["run", "--rm", *services.PODMAN_RUN_FLAGS,
                         ref(setup, "shop/multi:v1")]) == \
        setup["images"]["multi"]["platforms"]["linux/amd64"]["message"]


# ---------------------------------------------------------------------------
# zstd layers: containerd takes them as they are, docker-archive carries their tars


def test_zstd_layers_docker_load_and_ctr(setup: Dict[str, Any], dockerd: Any,
                                         k8s_containerd: services.Containerd, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    img = setup["zstd"]
    name = ref(setup, "shop/zstdapp:v1")
    message = imagefactory.message_for("shop/zstdapp:v1")
    out = tmp_path / "zstd-docker.tar"
    export(setup, capsys, "zstd-docker", "docker-archive", out)
    with tarfile.open(out) as tf:
        files = set(tf.getnames())
    assert {f"blobs/sha256/{d[7:]}" for d in img.diff_ids} <= files  # the tars, not zstd blobs
    run(dockerd.docker_argv() + ["load", "-i", str(out)])  # dockerd 20.10 reads no zstd layer
    assert run(dockerd.docker_argv() + ["image", "inspect", "--format", "{{.Id}}", name]).strip() \
        == img.config_digest
    assert run(dockerd.docker_argv() + ["run", "--rm", "--network", "none", name]) == message

    out = tmp_path / "zstd-oci.tar"
    export(setup, capsys, "zstd-ctr", "oci-archive", out)
    ns = "oci-zstd"
    run(k8s_containerd.ctr_argv(ns) + ["images", "import", str(out)])
    assert ctr_images(k8s_containerd, ns) == {name: img.manifest_digest}
    assert set(img.layer_digests) <= ctr_content(k8s_containerd, ns)  # the zstd blobs as served
    assert ctr_run(k8s_containerd, ns, name, "zstd-0") == message
