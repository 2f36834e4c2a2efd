"""Signed bundles against real containerd and dockerd: every forgery is refused before the
runtime is touched, shown by the runtime's own content store and image list.

The bundles are packed from the real registry by the CLI; forgeries are made as an
attacker would (tests/forge.py: edit a record, recompute every checksum but the
signature). Each case is imported through the CLI with an enforcing trust directory.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest

from edgebundle.format import FEATURE_SIGNATURE, TAG_ENTRY, TAG_HEADER, TAG_SIGNATURE
from forge import is_tag, records, replace_record
from test_core_loop import ctr, ctr_run, docker, eb

SITES = """\
version: 1
registries:
  "{reg}": {{insecure: true}}
images:
  - ref: {reg}/shop/app:v1
sites:
  gw-sig: {{runtime: containerd, namespace: signed, platform: linux/amd64}}
  line-sig: {{runtime: docker, platform: linux/amd64}}
"""


def containerd_state(containerd: Any) -> Tuple[Any, ...]:
    """What 'the runtime was not touched' means for containerd: content, images, snapshots."""
    content = ctr(containerd, "signed", "content", "ls", "-q").split()
    images = [l.split()[0] for l in ctr(containerd, "signed", "images", "ls").splitlines()[1:]]
    snaps = ctr(containerd, "signed", "snapshots", "--snapshotter", containerd.snapshotter, "ls")
    return sorted(content), sorted(images), sorted(snaps.splitlines()[1:])


def docker_state(dockerd: Any) -> Tuple[Any, ...]:
    images = docker(dockerd, "image", "ls", "-a", "--no-trunc", "--format",
                    "{{.ID}} {{.Repository}}:{{.Tag}}")
    return (sorted(images.splitlines()),)


def forge_cases(good: Path, other_key: Path, manifest: Path, home: Path, site: str,
                capsys: Any) -> List[Tuple[str, Path, int, str]]:
    """(name, bundle, exit code, message fragment) for each forgery of ``good``."""
    out = good.parent
    cases: List[Tuple[str, Path, int, str]] = []

    def variant(name: str, edit: Callable[[Path], None], code: int, fragment: str) -> None:
        path = out / f"{site}-{name}.ebundle"
        path.write_bytes(good.read_bytes())
        edit(path)
        cases.append((name, path, code, fragment))

    unsigned = out / f"{site}-unsigned.ebundle"
    eb(capsys, "--home", str(home), "pack", str(manifest), "--site", site, "-o", str(unsigned))
    cases.append(("unsigned", unsigned, 13, "is not signed"))
    wrong = out / f"{site}-wrong-key.ebundle"
    eb(capsys, "--home", str(home), "pack", str(manifest), "--site", site, "-o", str(wrong),
       "--sign", str(other_key))
    cases.append(("wrong key", wrong, 13, "a key this device does not trust"))
    variant("tampered header", lambda p: replace_record(
        p, is_tag(TAG_HEADER), lambda h: dict(h, site="elsewhere")), 13, "does not match its header")
    variant("tampered entry record", lambda p: replace_record(
        p, is_tag(TAG_ENTRY), lambda e: dict(e, media_type="application/x-evil")), 13,
        "is not the entry its header commits to")
    variant("stripped signature", lambda p: replace_record(p, is_tag(TAG_SIGNATURE), lambda s: None),
            5, "expected signature record")

    def strip_all(p: Path) -> None:
        replace_record(p, is_tag(TAG_SIGNATURE), lambda s: None)
        replace_record(p, is_tag(TAG_HEADER), lambda h: dict(h, required_features=[
            f for f in h["required_features"] if f != FEATURE_SIGNATURE]))
    variant("stripped signature and feature", strip_all, 13, "is not signed")

    def resign(p: Path) -> None:
        theirs = [r for r in records(wrong.read_bytes()) if r[0] == TAG_SIGNATURE][0][3]
        replace_record(p, is_tag(TAG_SIGNATURE), lambda s: theirs)
    variant("re-signed by an unknown key", resign, 13, "a key this device does not trust")
    return cases


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_forgeries_never_reach_the_runtime(tmp_path: Path, registry: Any, containerd: Any,
                                           dockerd: Any, pushed_images: Dict[str, Any],
                                           capsys: pytest.CaptureFixture[str], runtime: str) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(SITES.format(reg=registry.host))
    home = tmp_path / "home"
    site = "gw-sig" if runtime == "containerd" else "line-sig"
    eb(capsys, "key", "generate", "--out", str(tmp_path / "fleet"))
    eb(capsys, "key", "generate", "--out", str(tmp_path / "other"))
    trust_dir = tmp_path / "trusted.d"
    trust_dir.mkdir()
    (trust_dir / "fleet.pub").write_bytes((tmp_path / "fleet.pub").read_bytes())

    def pack_signed(name: str, epoch: str) -> Path:
        path = tmp_path / name
        with pytest.MonkeyPatch.context() as mp:  # the bundle's `created`, not the clock's
            mp.setenv("SOURCE_DATE_EPOCH", epoch)
            eb(capsys, "--home", str(home), "pack", str(manifest), "--site", site, "-o", str(path),
               "--sign", str(tmp_path / "fleet.key"))
        return path

    old = pack_signed("old.ebundle", "1764500000")
    good = pack_signed("good.ebundle", "1764590000")
    cases = forge_cases(good, tmp_path / "other.key", manifest, home, site, capsys)
    if runtime == "containerd":
        where = ["--runtime", "containerd", "--address", containerd.address, "--namespace", "signed",
                 "--snapshotter", containerd.snapshotter]
        state: Callable[[], Tuple[Any, ...]] = lambda: containerd_state(containerd)
    else:
        where = ["--runtime", "docker", "--host", dockerd.host]
        state = lambda: docker_state(dockerd)
    device = ["--trust-dir", str(trust_dir), "--state-dir", str(tmp_path / "state")]

    ref = f"{registry.host}/shop/app:v1"
    if runtime == "docker":  # other tests load the same image into the session's dockerd
        subprocess.run(dockerd.docker_argv() + ["image", "rm", "-f", ref], capture_output=True,
                       timeout=120)
    before = state()
    assert ref not in str(before)
    for name, path, code, fragment in cases:
        result = eb(capsys, "import", str(path), *where, *device, code=code)
        lines = result["stderr"].strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], (name, result["stderr"])
        assert state() == before, f"{name}: the runtime changed"

    eb(capsys, "import", str(good), *where, *device)
    after_good = state()
    assert ref in str(after_good)
    # Replaying the older signed bundle is a downgrade: refused, runtime unchanged.
    result = eb(capsys, "import", str(old), *where, *device, code=13)
    assert "refusing a downgrade" in result["stderr"]
    assert state() == after_good
    if runtime == "containerd":
        out = ctr_run(containerd, "signed", f"{registry.host}/shop/app:v1", "signed-run")
    else:
        out = docker(dockerd, "run", "--rm", "--network", "none", f"{registry.host}/shop/app:v1")
    assert out.strip() == pushed_images["images"]["shop/app:v1"]["message"].strip()
