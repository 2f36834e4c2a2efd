"""The core loop against real services: registry -> plan -> pack -> import -> report -> delta.

Every step goes through the real CLI entry point (`edgebundle.cli.main.main`), against
a real docker-registry, containerd and dockerd on loopback. Each test uses its own
containerd namespace so tests do not see each other's state.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest

from clirun import eb

MANIFEST = """\
version: 1
registries:
  "{reg}": {{insecure: true}}
images:
{images}
sites:
  gw-01: {{runtime: containerd, namespace: {ns}, platform: linux/amd64}}
  gw-arm: {{runtime: containerd, namespace: {ns}-arm, platform: linux/arm64}}
  line-3: {{runtime: docker, platform: linux/amd64}}
"""


def write_manifest(path: Path, reg: str, refs: List[str], ns: str) -> Path:
    images = "\n".join(f"  - ref: {reg}/{r}" for r in refs)
    path.write_text(MANIFEST.format(reg=reg, images=images, ns=ns))
    return path




def ctr(containerd: Any, ns: str, *args: str) -> str:
    out = subprocess.run(containerd.ctr_argv(ns) + list(args), capture_output=True, text=True,
                         env=containerd.env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def ctr_images(containerd: Any, ns: str) -> Dict[str, str]:
    rows = ctr(containerd, ns, "images", "ls").splitlines()[1:]
    return {r.split()[0]: r.split()[2] for r in rows if r.strip()}


def ctr_run(containerd: Any, ns: str, image: str, cid: str) -> str:
    return ctr(containerd, ns, "run", "--rm", "--snapshotter", containerd.snapshotter, image, cid)


def docker(dockerd: Any, *args: str) -> str:
    out = subprocess.run(dockerd.docker_argv() + list(args), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "packer-home"


def test_containerd_seed_then_delta(tmp_path: Path, home: Path, registry: Any, containerd: Any,
                                    pushed_images: Dict[str, Any], skopeo: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    ns = "k8s.io"
    reg = registry.host
    refs = ["shop/app:v1", "shop/worker:v1", "shop/tools:v1", "shop/multi:v1"]
    manifest = write_manifest(tmp_path / "m.yaml", reg, refs, ns)
    h = ["--home", str(home)]

    plan = eb(capsys, *h, "plan", str(manifest), "--site", "gw-01", "--json")
    assert [i["status"] for i in plan["images"]] == ["ship"] * 4
    assert plan["ship_bytes"] == plan["full_bytes"] > 0

    bundle = tmp_path / "seed.ebundle"
    packed = eb(capsys, *h, "pack", str(manifest), "--site", "gw-01", "-o", str(bundle), "--json")
    # Three images share two base layers: they ship once.
    base = set(pushed_images["base_layer_digests"])
    shipped_layers = [l["digest"] for i in packed["plan"]["images"] for l in i["layers"] if l["ship"]]
    assert all(shipped_layers.count(d) == 1 for d in base)

    report = tmp_path / "report.json"
    eb(capsys, "import", str(bundle), "--runtime", "containerd", "--address", containerd.address,
       "--namespace", ns, "--snapshotter", containerd.snapshotter, "--report", str(report))

    # Names and digests exactly as the registry serves them (skopeo as the oracle).
    listed = ctr_images(containerd, ns)
    for ref in refs:
        raw = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false",
                              f"docker://{reg}/{ref}"], capture_output=True, check=True).stdout
        import hashlib
        assert listed[f"{reg}/{ref}"] == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert listed[f"{reg}/shop/multi:v1"] == pushed_images["multi"]["index_digest"]
    assert not any(name.startswith("import.edgebundle.invalid/") for name in listed)

    for i, ref in enumerate(["shop/app:v1", "shop/worker:v1", "shop/tools:v1"]):
        out = ctr_run(containerd, ns, f"{reg}/{ref}", f"seed-{i}")
        assert out.strip() == pushed_images["images"][ref]["message"].strip()

    # The report says what containerd really holds.
    rep = json.loads(report.read_text())
    assert rep["version"] == 1 and rep["runtime"]["namespace"] == ns
    held = {i["name"]: i for i in rep["images"]}
    assert held[f"{reg}/shop/app:v1"]["complete"] is True
    assert held[f"{reg}/shop/app:v1"]["config"] == pushed_images["images"]["shop/app:v1"]["config_digest"]

    # Imported content is protected from garbage collection: force a synchronous GC.
    ctr(containerd, ns, "images", "tag", f"{reg}/shop/app:v1", "example.test/gc-trigger:1")
    ctr(containerd, ns, "images", "rm", "--sync", "example.test/gc-trigger:1")
    content = set(ctr(containerd, ns, "content", "ls", "-q").split())
    for ref in ["shop/app:v1", "shop/worker:v1", "shop/tools:v1"]:
        assert {l["digest"] for l in pushed_images["images"][ref]["layers"]} <= content
    assert ctr_run(containerd, ns, f"{reg}/shop/tools:v1", "after-gc").strip() == \
        pushed_images["images"]["shop/tools:v1"]["message"].strip()

    # Importing the same bundle twice is a clean no-op.
    again = eb(capsys, "import", str(bundle), "--runtime", "containerd", "--address",
               containerd.address, "--namespace", ns, "--snapshotter", containerd.snapshotter, "--json")
    assert again["imported"] == [] and len(again["already_present"]) == 4
    assert again["entries_sent"] == 0

    # Report back; app moves to v2 (one file changed in the top layer): only the delta ships.
    eb(capsys, *h, "inventory", "record", "gw-01", str(report))
    manifest = write_manifest(tmp_path / "m.yaml", reg, ["shop/app:v2"] + refs[1:], ns)
    plan2 = eb(capsys, *h, "plan", str(manifest), "--site", "gw-01", "--json")
    assert [i["status"] for i in plan2["images"]] == ["ship", "up-to-date", "up-to-date", "up-to-date"]
    delta = tmp_path / "delta.ebundle"
    eb(capsys, *h, "pack", str(manifest), "--site", "gw-01", "-o", str(delta))
    top = pushed_images["images"]["shop/app:v2"]["layers"][-1]
    assert delta.stat().st_size <= top["size"] * 1.05 + 64 * 1024
    assert delta.stat().st_size < bundle.stat().st_size / 2

    eb(capsys, "import", str(delta), "--runtime", "containerd", "--address", containerd.address,
       "--namespace", ns, "--snapshotter", containerd.snapshotter)
    out = ctr_run(containerd, ns, f"{reg}/shop/app:v2", "delta-0")
    assert out.strip() == pushed_images["images"]["shop/app:v2"]["message"].strip()
    assert ctr_images(containerd, ns)[f"{reg}/shop/app:v2"] == \
        pushed_images["images"]["shop/app:v2"]["manifest_digest"]

    # An image whose layers are all on the device already imports fine (only JSON ships).
    import imagefactory
    imagefactory.push_image(reg, "shop/alias", "v1", pushed_images["images"]["shop/worker:v1"]["built"])
    eb(capsys, "report", "--runtime", "containerd", "--address", containerd.address, "--namespace", ns,
       "--snapshotter", containerd.snapshotter, "-o", str(report))
    eb(capsys, *h, "inventory", "record", "gw-01", str(report))
    manifest = write_manifest(tmp_path / "m.yaml", reg, ["shop/alias:v1"], ns)
    alias = tmp_path / "alias.ebundle"
    packed = eb(capsys, *h, "pack", str(manifest), "--site", "gw-01", "-o", str(alias), "--json")
    assert not any(l["ship"] for i in packed["plan"]["images"] for l in i["layers"])
    assert alias.stat().st_size < 16 * 1024
    eb(capsys, "import", str(alias), "--runtime", "containerd", "--address", containerd.address,
       "--namespace", ns, "--snapshotter", containerd.snapshotter)
    assert ctr_run(containerd, ns, f"{reg}/shop/alias:v1", "alias-0").strip() == \
        pushed_images["images"]["shop/worker:v1"]["message"].strip()

    # The delta needs the base: a namespace without it refuses, naming what is missing,
    # and leaves no image behind.
    res = eb(capsys, "import", str(delta), "--runtime", "containerd", "--address", containerd.address,
             "--namespace", "empty-ns", "--snapshotter", containerd.snapshotter, code=6)
    assert "lacks" in res["stderr"] and top["digest"] not in res["stderr"]
    assert pushed_images["images"]["shop/app:v2"]["layers"][0]["digest"] in res["stderr"]
    assert ctr_images(containerd, "empty-ns") == {}


def test_arm64_site_gets_arm64_variant(tmp_path: Path, home: Path, registry: Any, containerd: Any,
                                       pushed_images: Dict[str, Any],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    ns = "armtest"
    manifest = write_manifest(tmp_path / "m.yaml", registry.host, ["shop/multi:v1"], ns)
    bundle = tmp_path / "arm.ebundle"
    packed = eb(capsys, "--home", str(home), "pack", str(manifest), "--site", "gw-arm", "-o",
                str(bundle), "--json")
    arm = pushed_images["multi"]["platforms"]["linux/arm64/v8"]
    amd = pushed_images["multi"]["platforms"]["linux/amd64"]
    image = packed["plan"]["images"][0]
    assert image["platform"] == "linux/arm64"
    assert image["config"] == arm["config_digest"] != amd["config_digest"]
    report = tmp_path / "r.json"
    eb(capsys, "import", str(bundle), "--runtime", "containerd", "--address", containerd.address,
       "--namespace", f"{ns}-arm", "--snapshotter", containerd.snapshotter, "--report", str(report))
    name = f"{registry.host}/shop/multi:v1"
    assert ctr_images(containerd, f"{ns}-arm")[name] == pushed_images["multi"]["index_digest"]
    held = {i["name"]: i for i in json.loads(report.read_text())["images"]}[name]
    assert held["manifest"] == arm["manifest_digest"] and held["complete"] is True
    assert held["platform"] == "linux/arm64"


def test_docker_seed_delta_and_corruption(tmp_path: Path, home: Path, registry: Any, dockerd: Any,
                                          pushed_images: Dict[str, Any],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    reg = registry.host
    refs = ["shop/app:v1", "shop/worker:v1", "shop/tools:v1"]
    manifest = write_manifest(tmp_path / "m.yaml", reg, refs, "unused")
    h = ["--home", str(home)]
    bundle = tmp_path / "seed.ebundle"
    eb(capsys, *h, "pack", str(manifest), "--site", "line-3", "-o", str(bundle))

    # A corrupted copy is refused and loads nothing.
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.ebundle"
    bad.write_bytes(bytes(data))
    res = eb(capsys, "import", str(bad), "--runtime", "docker", "--host", dockerd.host, code=5)
    assert "corrupt" in res["stderr"] or "mismatch" in res["stderr"]
    assert f"{reg}/shop/app:v1" not in docker(dockerd, "images", "--format", "{{.Repository}}:{{.Tag}}")

    report = tmp_path / "report.json"
    eb(capsys, "import", str(bundle), "--runtime", "docker", "--host", dockerd.host,
       "--report", str(report))
    for ref in refs:
        info = pushed_images["images"][ref]
        assert docker(dockerd, "run", "--rm", "--network", "none", f"{reg}/{ref}").strip() == info["message"].strip()
        image_id = docker(dockerd, "image", "inspect", "--format", "{{.Id}}", f"{reg}/{ref}").strip()
        assert image_id == info["config_digest"]

    again = eb(capsys, "import", str(bundle), "--runtime", "docker", "--host", dockerd.host, "--json")
    assert again["imported"] == [] and sorted(again["already_present"]) == sorted(f"{reg}/{r}" for r in refs)

    eb(capsys, *h, "inventory", "record", "line-3", str(report))
    manifest = write_manifest(tmp_path / "m.yaml", reg, ["shop/app:v2"] + refs[1:], "unused")
    delta = tmp_path / "delta.ebundle"
    eb(capsys, *h, "pack", str(manifest), "--site", "line-3", "-o", str(delta))
    top = pushed_images["images"]["shop/app:v2"]["layers"][-1]
    assert delta.stat().st_size <= top["size"] * 1.05 + 64 * 1024
    eb(capsys, "import", str(delta), "--runtime", "docker", "--host", dockerd.host)
    v2 = pushed_images["images"]["shop/app:v2"]
    assert docker(dockerd, "run", "--rm", "--network", "none", f"{reg}/shop/app:v2").strip() == v2["message"].strip()
    assert docker(dockerd, "image", "inspect", "--format", "{{.Id}}", f"{reg}/shop/app:v2").strip() == \
        v2["config_digest"]
