"""Content deltas against the real containerd (namespace k8s.io) and dockerd.

The images are built so that a layer-level update ships megabytes where a content delta
needs kilobytes: a library layer of many files rebuilt with one changed and a directory
renamed, and an app layer whose 6 MiB file (crossing the 4 MiB patch window) changes in
a few bytes. Every step goes through the CLI; the runtimes are the oracle.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Dict, List

import pytest

import cri
import imagefactory as f
import services
from conftest import _start
from test_core_loop import ctr, ctr_images, ctr_run, docker, eb

pytestmark = pytest.mark.integration

BIG = 6 * 1024 * 1024


def _text(rng: random.Random, size: int) -> bytes:
    words = [b"import", b"def", b"return", b"self", b"value", b"None", b"for", b"in", b"\n    "]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" " + str(rng.randrange(10 ** 6)).encode()
    return bytes(out[:size])


def _layers(version: int) -> List[Dict[str, Any]]:
    """busybox | libs (200 files) | app (a 6 MiB file and a message), for version 1, 2, 3.

    v2 is an app update (the libs' directory renamed, a few bytes of the big file);
    v3 a rebuild on a security-updated base: the base layer changes too, so every
    layer digest and chain ID changes.
    """
    rng = random.Random(42)
    libdir = "usr/lib/python3.11" if version == 1 else "usr/lib/python3.12"  # renamed in v2
    libs: Dict[str, Any] = {f"{libdir}/mod{i}.py": _text(rng, rng.randrange(2000, 20000))
                            for i in range(200)}
    libs[f"{libdir}/version.py"] = f"VERSION = {version}\n".encode()
    big = bytearray(f.pseudo_random_bytes("big", BIG))
    for v in range(2, version + 1):  # each version edits a few bytes, one past the window
        for pos in (1000 * v, 3 * 1024 * 1024 + v, 5 * 1024 * 1024 + 7 * v):
            big[pos:pos + 16] = hashlib.sha256(f"v{v}-{pos}".encode()).digest()[:16]
    app = {"app/data.bin": bytes(big), "app/message.txt": f"hello from delta v{version}\n",
           "app/config.ini": f"[main]\nversion={version}\n".encode() * 20}
    base = f.busybox_layer()
    if version >= 3:
        base["etc/security-update"] = b"CVE-2026-0001 fixed\n"
    return [base, libs, app]


def _push(reg: str, repo: str, version: int) -> f.BuiltImage:
    img = f.build_image(_layers(version), {"Cmd": ["/bin/cat", "/app/message.txt"]}, media="oci")
    f.push_image(reg, repo, f"v{version}", img)
    return img


MANIFEST = """\
version: 1
registries:
  "{reg}": {{insecure: true}}
images:
  - ref: {reg}/{repo}:v{version}
sites:
  edge: {{runtime: containerd, namespace: k8s.io, platform: linux/amd64}}
  line: {{runtime: docker, platform: linux/amd64}}
"""


def _manifest(tmp: Path, reg: str, repo: str, version: int) -> str:
    path = tmp / "m.yaml"
    path.write_text(MANIFEST.format(reg=reg, repo=repo, version=version))
    return str(path)


@pytest.fixture(scope="module")
def images(registry: Any) -> Dict[int, f.BuiltImage]:
    return {v: _push(registry.host, "delta/app", v) for v in (1, 2, 3)}


def _cd(containerd: Any, ns: str = "k8s.io") -> List[str]:
    return ["--runtime", "containerd", "--address", containerd.address, "--namespace", ns,
            "--snapshotter", containerd.snapshotter]


def _layer_hows(plan: Dict[str, Any]) -> List[str]:
    return [l["how"] for i in plan["images"] for l in i["layers"]]


def test_containerd_deltas_keep_digests_run_and_chain(tmp_path: Path, registry: Any,
                                                      containerd: Any, images: Dict[int, Any],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    reg, repo, ns = registry.host, "delta/app", "k8s.io"
    h = ["--home", str(tmp_path / "home")]
    report = tmp_path / "report.json"

    seed = tmp_path / "v1.ebundle"
    eb(capsys, *h, "pack", _manifest(tmp_path, reg, repo, 1), "--site", "edge", "-o", str(seed))
    eb(capsys, "import", str(seed), *_cd(containerd), "--report", str(report))
    assert "tar-delta-v1" in json.loads(report.read_text())["features"]
    eb(capsys, *h, "inventory", "record", "edge", str(report))

    # v2: the plan names both changed layers as deltas against what the site holds.
    m2 = _manifest(tmp_path, reg, repo, 2)
    plan = eb(capsys, *h, "plan", m2, "--site", "edge", "--json")
    assert _layer_hows(plan) == ["held", "delta", "delta"]
    deltas = [l["delta"] for l in plan["images"][0]["layers"] if l["how"] == "delta"]
    assert all(d["bases"] for d in deltas)
    text = eb(capsys, *h, "plan", m2, "--site", "edge")["stdout"]
    assert text.count(" delta ") == 2 and "against" in text

    # A packer that never saw v1 (a fresh home, the site's report recorded) fetches the
    # bases by the digests the report names, and reaches the same delta.
    other = ["--home", str(tmp_path / "other-home")]
    eb(capsys, *other, "inventory", "record", "edge", str(report))
    assert _layer_hows(eb(capsys, *other, "plan", m2, "--site", "edge", "--json")) == \
        ["held", "delta", "delta"]

    whole = tmp_path / "v2-whole.ebundle"
    eb(capsys, *h, "pack", m2, "--site", "edge", "--no-delta", "-o", str(whole))
    v2 = tmp_path / "v2.ebundle"
    eb(capsys, *h, "pack", m2, "--site", "edge", "-o", str(v2))
    assert v2.stat().st_size * 20 < whole.stat().st_size, (v2.stat().st_size, whole.stat().st_size)
    eb(capsys, "verify", str(v2))

    res = eb(capsys, "import", str(v2), *_cd(containerd), "--report", str(report), "--json")
    assert res["imported"] == [f"{reg}/{repo}:v2"]
    listed = ctr_images(containerd, ns)
    assert listed[f"{reg}/{repo}:v2"] == images[2].manifest_digest  # the registry's digest
    assert not any(n.startswith("import.edgebundle.invalid/") for n in listed)
    assert ctr_run(containerd, ns, f"{reg}/{repo}:v2", "delta-v2").strip() == "hello from delta v2"

    # The report tells the truth: the rebuilt layers are snapshots without blobs.
    held = {i["name"]: i for i in json.loads(report.read_text())["images"]}[f"{reg}/{repo}:v2"]
    assert held["complete"] is True
    assert [(l["blob"], l["unpacked"]) for l in held["layers"]][1:] == [(False, True)] * 2
    assert held["layers"][0]["blob"] is True

    # It survives garbage collection: prune unreferenced content, drop another image.
    ctr(containerd, ns, "content", "prune", "references")
    ctr(containerd, ns, "images", "tag", f"{reg}/{repo}:v2", "example.test/gc-trigger:1")
    ctr(containerd, ns, "images", "rm", "--sync", "example.test/gc-trigger:1")
    assert ctr_run(containerd, ns, f"{reg}/{repo}:v2", "delta-v2-gc").strip() == "hello from delta v2"

    # v3 builds on v2's snapshot-only layers: a chain of deltas.
    eb(capsys, *h, "inventory", "record", "edge", str(report))
    m3 = _manifest(tmp_path, reg, repo, 3)
    v3 = tmp_path / "v3.ebundle"
    packed = eb(capsys, *h, "pack", m3, "--site", "edge", "-o", str(v3), "--json")
    assert _layer_hows(packed["plan"]) == ["delta", "delta", "delta"]  # the base changed too
    v2_chains = set(images[2].chain_ids)
    assert {p["chain_id"] for p in packed["plan"]["prerequisites"]} & (v2_chains - set(images[1].chain_ids))

    # ...but first, a device that lost those bases after its report refuses, cleanly.
    for name in [n for n in ctr_images(containerd, ns) if n.startswith(f"{reg}/{repo}")]:
        ctr(containerd, ns, "images", "rm", "--sync", name)  # repo:tag and CRI's repo@digest
    res = eb(capsys, "import", str(v3), *_cd(containerd), code=6)
    assert "lacks" in res["stderr"]
    left = ctr_images(containerd, ns)
    assert f"{reg}/{repo}:v3" not in left and not any(n.startswith("import.edgebundle") for n in left)

    # Put v2 back the way the site had it (v1 seed, then the v2 delta) and apply v3.
    eb(capsys, "import", str(seed), *_cd(containerd))
    eb(capsys, "import", str(v2), *_cd(containerd))
    eb(capsys, "import", str(v3), *_cd(containerd))
    assert ctr_images(containerd, ns)[f"{reg}/{repo}:v3"] == images[3].manifest_digest
    assert ctr_run(containerd, ns, f"{reg}/{repo}:v3", "delta-v3").strip() == "hello from delta v3"


def test_docker_deltas(tmp_path: Path, registry: Any, dockerd: Any, images: Dict[int, Any],
                       capsys: pytest.CaptureFixture[str]) -> None:
    reg, repo = registry.host, "delta/app"
    h = ["--home", str(tmp_path / "home")]
    host = ["--runtime", "docker", "--host", dockerd.host]
    report = tmp_path / "report.json"
    seed = tmp_path / "v1.ebundle"
    eb(capsys, *h, "pack", _manifest(tmp_path, reg, repo, 1), "--site", "line", "-o", str(seed))
    eb(capsys, "import", str(seed), *host, "--report", str(report))
    eb(capsys, *h, "inventory", "record", "line", str(report))

    m2 = _manifest(tmp_path, reg, repo, 2)
    v2 = tmp_path / "v2.ebundle"
    packed = eb(capsys, *h, "pack", m2, "--site", "line", "-o", str(v2), "--json")
    assert _layer_hows(packed["plan"]) == ["held", "delta", "delta"]
    whole = tmp_path / "v2-whole.ebundle"
    eb(capsys, *h, "pack", m2, "--site", "line", "--no-delta", "-o", str(whole))
    assert v2.stat().st_size * 20 < whole.stat().st_size

    eb(capsys, "import", str(v2), *host)
    inspect = json.loads(docker(dockerd, "image", "inspect", f"{reg}/{repo}:v2"))[0]
    assert inspect["Id"] == images[2].config_digest  # image ID = config digest
    out = docker(dockerd, "run", "--rm", "--network", "none", f"{reg}/{repo}:v2")
    assert out.strip() == "hello from delta v2"


@pytest.fixture()
def cri_containerd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A containerd of its own with the CRI plugin (this test restarts it)."""
    tmp = tmp_path_factory.mktemp("cri")
    cd = _start(request.config, "containerd with CRI", lambda: services.start_containerd_cri(tmp))
    box = {"cd": cd, "tmp": tmp}
    yield box
    box["cd"].stop()


def _cri_image(sock: str, name: str) -> Any:
    """CRI's ImageStatus, polled briefly: CRI picks up imports from containerd's events."""
    import time
    deadline = time.monotonic() + 10
    while True:
        found = cri.image_status(sock, name)
        if found is not None or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_cri_sees_a_delta_built_image_by_tag_and_digest_and_after_a_restart(
        tmp_path: Path, registry: Any, images: Dict[int, Any], cri_containerd: Dict[str, Any],
        capsys: pytest.CaptureFixture[str]) -> None:
    reg, repo, ns = registry.host, "delta/app", "k8s.io"
    cd = cri_containerd["cd"]
    h = ["--home", str(tmp_path / "home")]
    report = tmp_path / "report.json"
    seed, v2 = tmp_path / "v1.ebundle", tmp_path / "v2.ebundle"
    eb(capsys, *h, "pack", _manifest(tmp_path, reg, repo, 1), "--site", "edge", "-o", str(seed))
    eb(capsys, "import", str(seed), *_cd(cd), "--report", str(report))
    eb(capsys, *h, "inventory", "record", "edge", str(report))
    packed = eb(capsys, *h, "pack", _manifest(tmp_path, reg, repo, 2), "--site", "edge", "-o", str(v2),
                "--json")
    assert _layer_hows(packed["plan"]) == ["held", "delta", "delta"]
    eb(capsys, "import", str(v2), *_cd(cd))

    by_tag = _cri_image(cd.address, f"{reg}/{repo}:v2")
    assert by_tag is not None and by_tag["id"] == images[2].config_digest
    by_digest = _cri_image(cd.address, f"{reg}/{repo}@{images[2].manifest_digest}")
    assert by_digest is not None and by_digest["id"] == images[2].config_digest
    assert f"{reg}/{repo}@{images[2].manifest_digest}" in by_digest["repo_digests"]
    listed = {i["id"]: i for i in cri.list_images(cd.address)}
    assert f"{reg}/{repo}:v2" in listed[images[2].config_digest]["repo_tags"]

    # A containerd restart changes nothing: the snapshots, the names, CRI's view.
    cd.stop()
    cd = cri_containerd["cd"] = services.start_containerd_cri(cri_containerd["tmp"])
    assert ctr_run(cd, ns, f"{reg}/{repo}:v2", "after-restart").strip() == "hello from delta v2"
    assert _cri_image(cd.address, f"{reg}/{repo}@{images[2].manifest_digest}") is not None
