"""The CLI end to end without daemons: pack from an OCI layout, import through a fake ``ctr``
program, and every command fed broken input: one line, the right exit code, no traceback.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import xxhash

from edgebundle.cache import BlobCache
from edgebundle.cli.main import main
from edgebundle.format import read_index
from edgebundle.format.framing import U32, U64, pack_record, unpack_body
from tiny_images import APP, BASE, TOOL, Images, write_oci_layout

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FAKECTR = f"{sys.executable} {HERE / 'fakectr.py'}"


class World:
    """A manifest list over an OCI layout, a packer home, and a device (fake ctr state)."""

    def __init__(self, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp = tmp
        self.capsys = capsys
        self.images = Images(BlobCache(tmp / "build"))
        self.app = self.images.image("example.test/shop/app:v1", [BASE, APP])
        self.tool = self.images.image("example.test/shop/tool:v1", [BASE, TOOL])
        write_oci_layout(tmp / "layout", self.images.cache, [self.app, self.tool])
        self.manifest = tmp / "m.yaml"
        self.manifest.write_text(f"""version: 1
images:
  - ref: example.test/shop/app:v1
    source: oci-layout:{tmp / 'layout'}
  - ref: example.test/shop/tool:v1
    source: oci-layout:{tmp / 'layout'}
sites:
  gw: {{runtime: containerd, namespace: k8s.io, platform: linux/amd64}}
  line: {{runtime: docker, platform: linux/amd64}}
  far: {{runtime: docker, platform: linux/amd64, ssh: "root@127.0.0.1:1"}}
  nossh: {{runtime: docker, platform: linux/amd64}}
""")
        self.home = tmp / "home"
        self.device = tmp / "device"
        (self.device / "content").mkdir(parents=True)
        (self.device / "state.json").write_text(json.dumps(
            {"namespace": "k8s.io", "images": {}, "snapshots": []}))
        self.sock = tmp / "containerd.sock"
        self.sock.touch()

    def run(self, *argv: str, code: int = 0) -> Tuple[str, str]:
        """``edgebundle ARGV`` in-process; assert the exit code and that nothing crashed."""
        self.capsys.readouterr()
        os.environ["FAKECTR_STATE"] = str(self.device)
        rc = main(["--home", str(self.home), *argv])
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err and "internal error" not in err, err
        assert rc == code, f"edgebundle {' '.join(argv)} exited {rc}, wanted {code}: {err}"
        if code:
            lines = [l for l in err.splitlines() if l.strip()]
            assert len(lines) == 1 and lines[0].startswith("edgebundle: error: "), err
            assert "(hint: " in lines[0], lines[0]
        return out, err

    def ctr_args(self) -> List[str]:
        return ["--runtime", "containerd", "--address", str(self.sock), "--namespace", "k8s.io",
                "--ctr", FAKECTR]

    def device_images(self) -> Dict[str, Any]:
        return json.loads((self.device / "state.json").read_text())["images"]  # type: ignore[no-any-return]

    def pack(self, site: str = "gw", *extra: str, name: str = "b.ebundle") -> Path:
        out = self.tmp / name
        self.run("pack", str(self.manifest), "--site", site, "-o", str(out), "--no-progress", *extra)
        return out


@pytest.fixture
def world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> World:
    return World(tmp_path, capsys)


# ---------------------------------------------------------------------------
# The loop, through the CLI


def test_pack_import_report_record_and_delta(world: World) -> None:
    bundle = world.pack()
    out, _ = world.run("verify", str(bundle), "--json")
    assert json.loads(out)["images"] == [world.app.name, world.tool.name]
    out, _ = world.run("import", str(bundle), *world.ctr_args(), "--json",
                       "--report", str(world.tmp / "report.json"))
    assert json.loads(out)["imported"] == [world.app.name, world.tool.name]
    assert set(world.device_images()) == {world.app.name, world.tool.name} | {
        f"{i.ref.repository}@{i.top.digest}" for i in (world.app, world.tool)}  # CRI's records
    report = json.loads((world.tmp / "report.json").read_text())
    assert all(i["complete"] for i in report["images"])
    world.run("inventory", "record", "gw", str(world.tmp / "report.json"))
    out, _ = world.run("plan", str(world.manifest), "--site", "gw", "--json")
    assert [i["status"] for i in json.loads(out)["images"]] == ["up-to-date", "up-to-date"]
    # Nothing to ship but a header and an index.
    again = world.pack(name="again.ebundle")
    assert read_index(again).index.images == ()


def test_pack_full_ignores_the_inventory(world: World) -> None:
    world.run("import", str(world.pack()), *world.ctr_args(),
              "--report", str(world.tmp / "report.json"))
    world.run("inventory", "record", "gw", str(world.tmp / "report.json"))
    delta = read_index(world.pack(name="delta.ebundle"))
    full = read_index(world.pack("gw", "--full", name="full.ebundle"))
    assert delta.index.images == () and delta.index.entries == ()
    assert [r.name for r in full.index.images] == [world.app.name, world.tool.name]
    assert full.header.prerequisites == ()
    assert {l.digest for l in world.app.layers + world.tool.layers} <= full.index.carried


def test_pack_plans_once_and_closes_what_it_opened(world: World,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from edgebundle.usecases import packer

    calls: List[str] = []
    plan_bundle, load = packer.plan_bundle, packer.InventoryStore.load
    closed: List[bool] = []
    close = packer.RegistryClient.close

    def counting_plan(*a: Any, **kw: Any) -> Any:
        calls.append("plan")
        return plan_bundle(*a, **kw)

    def counting_load(self: Any, *a: Any, **kw: Any) -> Any:
        calls.append("load")
        return load(self, *a, **kw)

    def closing(self: Any) -> None:
        closed.append(True)
        close(self)

    monkeypatch.setattr(packer, "plan_bundle", counting_plan)
    monkeypatch.setattr(packer.InventoryStore, "load", counting_load)
    monkeypatch.setattr(packer.RegistryClient, "close", closing)
    world.pack()
    assert calls == ["load", "plan"]
    assert closed == [True]


def test_same_bundle_whatever_the_cpu_count(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    one = world.pack("line", "--threads", "1", name="one.ebundle").read_bytes()
    four = world.pack("line", "--threads", "4", name="four.ebundle").read_bytes()
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    auto = world.pack("line", name="auto.ebundle").read_bytes()
    assert one == four == auto
    assert read_index(world.tmp / "one.ebundle").header.created == "2023-11-14T22:13:20Z"


# ---------------------------------------------------------------------------
# Where pack writes


def test_pack_to_stdout_pipes_into_verify(world: World) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), EDGEBUNDLE_HOME=str(world.home))
    pack = subprocess.Popen([sys.executable, "-m", "edgebundle", "pack", str(world.manifest),
                             "--site", "gw", "-o", "-"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    verify = subprocess.run([sys.executable, "-m", "edgebundle", "verify", "-", "--json"],
                            stdin=pack.stdout, capture_output=True, text=True, env=env, timeout=120)
    assert pack.wait(timeout=120) == 0, pack.stderr.read() if pack.stderr else ""
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["images"] == [world.app.name, world.tool.name]
    summary = pack.stderr.read().decode() if pack.stderr else ""
    assert "wrote standard output" in summary  # the summary went to stderr, not into the pipe


def test_pack_into_a_fifo_streams_and_keeps_the_fifo(world: World) -> None:
    fifo = world.tmp / "pipe"
    os.mkfifo(fifo)
    got: List[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    world.run("pack", str(world.manifest), "--site", "gw", "-o", str(fifo))
    reader.join(timeout=60)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    (world.tmp / "copy.ebundle").write_bytes(got[0])
    world.run("verify", str(world.tmp / "copy.ebundle"))


def test_pack_into_dev_full_is_one_line_and_leaves_the_device(world: World) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    _, err = world.run("pack", str(world.manifest), "--site", "gw", "-o", "/dev/full", code=14)
    assert "no space left" in err
    assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)


def test_pack_through_a_symlink_replaces_the_target(world: World) -> None:
    target = world.tmp / "real.ebundle"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    link = world.tmp / "latest.ebundle"
    link.symlink_to(target)
    world.run("pack", str(world.manifest), "--site", "gw", "-o", str(link))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640  # a replaced file keeps its mode
    world.run("verify", str(target))
    assert [p.name for p in world.tmp.glob(".real.ebundle.*")] == []  # no temp file left


def test_pack_refuses_outputs_it_cannot_write_before_any_work(world: World) -> None:
    _, err = world.run("pack", str(world.manifest), "--site", "gw", "-o",
                       str(world.tmp / "no" / "such" / "dir.ebundle"), code=12)
    assert "does not exist" in err
    assert not (world.home / "cache").exists() or not any((world.home / "cache" / "blobs" / "sha256").iterdir())
    _, err = world.run("pack", str(world.manifest), "--site", "gw", "-o", str(world.tmp), code=12)
    assert "is a directory" in err
    world.run("pack", str(world.manifest), "--site", "gw", "-o", "-", "--json", code=2)
    world.run("pack", str(world.manifest), "--site", "gw", "-o", "x", "--threads", "-1", code=2)
    _, err = world.run("pack", str(world.manifest), "--site", "gw", "-o", "x", "--jobs", "0", code=2)
    assert "--jobs 0" in err and len(err.strip().splitlines()) == 1
    _, err = world.run("plan", str(world.manifest), "--site", "gw", "--jobs", "-2", code=2)
    assert "--jobs -2" in err


def test_same_bundle_whatever_the_jobs(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    one = world.pack("gw", "--jobs", "1", name="one.ebundle").read_bytes()
    world.home = world.tmp / "home-3"  # cold again: every layer fetched, three at once
    three = world.pack("gw", "--jobs", "3", name="three.ebundle").read_bytes()
    assert one == three


# ---------------------------------------------------------------------------
# verify refuses spec-breaking bundles, naming the field


def reframe(raw: bytes, header: Optional[Callable[[Dict[str, Any]], None]] = None,
            index: Optional[Callable[[Dict[str, Any]], None]] = None) -> bytes:
    """Rewrite a valid bundle's header and/or index records, fixing offsets and checksums."""
    def record_at(pos: int) -> Tuple[Dict[str, Any], int]:
        n = U32.unpack(raw[pos + 1:pos + 5])[0]
        return unpack_body(raw[pos + 5:pos + 5 + n], "record"), pos + 5 + n + 8

    hdr, entries_at = record_at(10)
    index_at = U64.unpack(raw[-33 + 1:-33 + 9])[0]
    idx, _ = record_at(index_at)
    if header:
        header(hdr)
    new_head = pack_record(0x48, hdr)
    shift = len(new_head) - (entries_at - 10)
    for e in idx["entries"]:
        e["offset"] += shift
    if index:
        index(idx)
    body = raw[:10] + new_head + raw[entries_at:index_at]
    new_index_at = len(body)
    body += pack_record(0x49, idx) + bytes([0x46]) + U64.pack(new_index_at)
    return body + xxhash.xxh3_128_digest(body) + raw[-8:]


SPEC_BREAKS: Dict[str, Tuple[Any, Any, str]] = {
    "layer_form weird (docker)": (lambda h: h.update(layer_form="weird"), None,
                                  "field 'layer_form' is 'weird', not one of"),
    "runtime rkt (docker)": (lambda h: h.update(runtime="rkt"), None, "field 'runtime' is 'rkt'"),
    "volume set": (lambda h: h.update(volume={"index": 1, "count": 2}), None, "field 'volume'"),
    "runtime rkt": (lambda h: h.update(runtime="rkt"), None, "field 'runtime' is 'rkt'"),
    "layer_form weird": (lambda h: h.update(layer_form="weird"), None, "field 'layer_form' is 'weird'"),
    "prerequisites nope": (lambda h: h.update(prerequisites="nope"), None,
                           "field 'prerequisites' is a string, not a list"),
    "containerd with tars": (lambda h: h.update(layer_form="tar"), None, "field 'layer_form' is 'tar'"),
    "record name other than header's": (None, lambda i: i["images"][0].update(name="example.test/other:v1"),
                                        "disagree with the header"),
    "record layers not a list": (None, lambda i: i["images"][0].update(layers="not a list"),
                                 "field 'layers' is a string, not a list"),
    "record disagreeing and layers not a list": (
        None, lambda i: i["images"][0].update(top={"mediaType": "x", "digest": "sha256:" + "0" * 64,
                                                    "size": 1}, layers="not a list"),
        "field 'layers' is a string, not a list"),
    "record top other than header's": (
        None, lambda i: i["images"][0].update(top=dict(i["images"][0]["top"], digest="sha256:" + "0" * 64)),
        "differs from the header"),
}


@pytest.mark.parametrize("case", sorted(SPEC_BREAKS))
def test_verify_refuses_spec_breaking_bundles(world: World, case: str) -> None:
    header, index, fragment = SPEC_BREAKS[case]
    good = world.pack("line" if "docker" in case else "gw")
    bad = world.tmp / "bad.ebundle"
    bad.write_bytes(reframe(good.read_bytes(), header, index))
    _, err = world.run("verify", str(bad), code=5)
    assert fragment in err
    world.run("inspect", str(bad), code=5)
    world.run("import", str(bad), *world.ctr_args(), code=5)
    assert world.device_images() == {}


def test_reframe_alone_keeps_a_bundle_valid(world: World) -> None:
    good = world.pack()
    same = world.tmp / "same.ebundle"
    same.write_bytes(reframe(good.read_bytes(), lambda h: None, lambda i: None))
    world.run("verify", str(same))


# ---------------------------------------------------------------------------
# Reports from the device


def test_report_survives_a_non_sha256_index(world: World) -> None:
    odd = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "sha512:" + "ab" * 64,
         "size": 10, "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    import hashlib
    digest = hashlib.sha256(odd).hexdigest()
    (world.device / "content" / digest).write_bytes(odd)
    (world.device / "state.json").write_text(json.dumps({"namespace": "k8s.io", "snapshots": [],
        "images": {"example.test/odd:v1": ["application/vnd.oci.image.index.v1+json",
                                           "sha256:" + digest]}}))
    out, _ = world.run("report", *world.ctr_args(), "--json")
    (image,) = json.loads(out)["images"]
    assert image["name"] == "example.test/odd:v1" and image["complete"] is False


def test_import_report_into_a_missing_directory_is_refused_first(world: World) -> None:
    bundle = world.pack()
    _, err = world.run("import", str(bundle), *world.ctr_args(),
                       "--report", str(world.tmp / "nope" / "r.json"), code=12)
    assert "does not exist" in err
    assert world.device_images() == {}  # refused before anything was imported


# ---------------------------------------------------------------------------
# Every command, broken input: one line, the right code


def _corrupt_inventory(world: World) -> None:
    path = world.home / "sites" / "gw" / "inventory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{ this is not json")


def _bad_report(world: World, text: str) -> str:
    path = world.tmp / "r.json"
    path.write_text(text)
    return str(path)


def _blob_damaged(world: World) -> None:
    world.pack()
    layer = world.app.layers[1].digest
    (world.home / "cache" / "blobs" / "sha256" / layer[7:]).write_bytes(b"\x1f\x8b damaged")


BROKEN: List[Tuple[str, Callable[[World], List[str]], int, str]] = [
    ("plan: no manifest", lambda w: ["plan", str(w.tmp / "none.yaml"), "--site", "gw"], 3, "not found"),
    ("plan: manifest is a dir", lambda w: ["plan", str(w.tmp), "--site", "gw"], 3, "is a directory"),
    ("plan: unknown site", lambda w: ["plan", str(w.manifest), "--site", "nope"], 2, "'nope'"),
    ("plan: missing layout", lambda w: (w.manifest.write_text(w.manifest.read_text().replace(
        "/layout", "/gone")), ["plan", str(w.manifest), "--site", "gw"])[1], 4, "not found"),
    ("plan: corrupt stored inventory", lambda w: (_corrupt_inventory(w),
                                                  ["plan", str(w.manifest), "--site", "gw"])[1],
     10, "not valid JSON"),
    ("pack: damaged cache blob", lambda w: (_blob_damaged(w), [
        "pack", str(w.manifest), "--site", "gw", "-o", str(w.tmp / "x.ebundle")])[1], 11, "damaged"),
    ("import: no bundle", lambda w: ["import", str(w.tmp / "none.ebundle"), *w.ctr_args()], 2, "none.ebundle"),
    ("import: bundle is a dir", lambda w: ["import", str(w.tmp), *w.ctr_args()], 2, "is a directory"),
    ("import: not a bundle", lambda w: ["import", str(w.manifest), *w.ctr_args()], 5, "not an edgebundle"),
    ("import: no containerd", lambda w: ["import", str(w.pack()), "--runtime", "containerd",
                                         "--address", str(w.tmp / "none.sock")], 7, "does not exist"),
    ("import: no dockerd", lambda w: ["import", str(w.pack("line")), "--runtime", "docker",
                                      "--host", f"unix://{w.tmp}/none.sock"], 7, "unreachable"),
    ("import: docker host not unix", lambda w: ["import", str(w.pack("line")), "--runtime", "docker",
                                                "--host", "tcp://1.2.3.4:2375"], 7, "not a unix socket"),
    ("import: empty --ctr", lambda w: ["import", str(w.pack()), "--runtime", "containerd",
                                       "--address", str(w.sock), "--ctr", ""], 2, "--ctr"),
    ("import: unbalanced --ctr", lambda w: ["import", str(w.pack()), "--runtime", "containerd",
                                            "--address", str(w.sock), "--ctr", "k3s 'ctr"], 2, "--ctr"),
    ("import: ctr not found", lambda w: ["import", str(w.pack()), "--runtime", "containerd",
                                         "--address", str(w.sock), "--ctr", "/no/such/ctr"], 7, "not found"),
    ("import: docker bundle into containerd", lambda w: ["import", str(w.pack("line")), *w.ctr_args()],
     8, "plain tars"),
    ("report: no containerd", lambda w: ["report", "--runtime", "containerd", "--address",
                                         str(w.tmp / "none.sock")], 7, "does not exist"),
    ("report: -o a directory", lambda w: ["report", *w.ctr_args(), "-o", str(w.tmp)], 12, "is a directory"),
    ("report: -o in a missing dir", lambda w: ["report", *w.ctr_args(), "-o", str(w.tmp / "a" / "b")],
     12, "does not exist"),
    ("verify: no bundle", lambda w: ["verify", str(w.tmp / "none.ebundle")], 2, "none.ebundle"),
    ("verify: a directory", lambda w: ["verify", str(w.tmp)], 2, "is a directory"),
    ("verify: truncated", lambda w: (w.tmp.joinpath("cut.ebundle").write_bytes(w.pack().read_bytes()[:-40]),
                                     ["verify", str(w.tmp / "cut.ebundle")])[1], 5, "truncated"),
    ("inspect: stdin", lambda w: ["inspect", "-"], 2, "not a file"),
    ("inspect: truncated", lambda w: (w.tmp.joinpath("cut.ebundle").write_bytes(w.pack().read_bytes()[:-40]),
                                      ["inspect", str(w.tmp / "cut.ebundle")])[1], 5, "truncated"),
    ("inspect: junk", lambda w: ["inspect", str(w.manifest)], 5, "not an edgebundle"),
    ("record: no report file", lambda w: ["inventory", "record", "gw", str(w.tmp / "none.json")], 2, "none.json"),
    ("record: not JSON", lambda w: ["inventory", "record", "gw", _bad_report(w, "nope")], 10,
     "not valid JSON"),
    ("record: a list", lambda w: ["inventory", "record", "gw", _bad_report(w, "[]")], 10, "not a JSON object"),
    ("record: wrong kind", lambda w: ["inventory", "record", "gw", _bad_report(w, '{"kind": "x"}')],
     10, "kind"),
    ("record: bad site name", lambda w: ["inventory", "record", "../x", _bad_report(w, "{}")], 10,
     "invalid site name"),
    ("record: bad manifest", lambda w: ["inventory", "record", "gw", _bad_report(w, "{}"), "-m",
                                        str(w.tmp / "none.yaml")], 3, "not found"),
    ("show: never recorded", lambda w: ["inventory", "show", "gw"], 2, "no inventory recorded"),
    ("show: corrupt", lambda w: (_corrupt_inventory(w), ["inventory", "show", "gw"])[1], 10, "not valid JSON"),
    ("show: bad site name", lambda w: ["inventory", "show", "a/b"], 10, "invalid site name"),
    ("pull: no manifest known", lambda w: ["inventory", "pull", "gw"], 2, "no manifest known"),
    ("pull: site without ssh", lambda w: ["inventory", "pull", "nossh", "-m", str(w.manifest)], 9, "no ssh"),
    ("pull: nothing listens", lambda w: ["inventory", "pull", "far", "-m", str(w.manifest),
                                         "--known-hosts", str(w.tmp / "kh"), "--timeout", "5"], 9, "refused"),
    ("inventory: no action", lambda w: ["inventory"], 2, "needs an action"),
    ("key: no action", lambda w: ["key"], 2, "needs an action"),
    ("key show: missing", lambda w: ["key", "show", str(w.tmp / "none.pub")], 2, "cannot read key"),
    ("key show: not a key", lambda w: ["key", "show", str(w.manifest)], 2, "not a PEM public key"),
    ("pack: missing signing key", lambda w: ["pack", str(w.manifest), "--site", "gw", "-o",
                                             str(w.tmp / "o.ebundle"), "--sign", str(w.tmp / "no.key")],
     2, "cannot read signing key"),
    ("verify: trust not a key", lambda w: ["verify", str(w.manifest), "--trust", str(w.manifest)],
     2, "not a PEM public key"),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_input_is_one_line_with_its_exit_code(world: World,
                                                     case: Tuple[str, Any, int, str]) -> None:
    _, make, code, fragment = case
    argv = make(world)
    _, err = world.run(*argv, code=code)
    assert fragment in err, err


# ---------------------------------------------------------------------------
# Signing, through the CLI


def test_signed_loop_key_generate_pack_sign_and_an_enforcing_device(world: World) -> None:
    out, _ = world.run("key", "generate", "--out", str(world.tmp / "fleet"), "--json")
    key = json.loads(out)
    assert stat.S_IMODE(os.stat(key["private"]).st_mode) == 0o600
    out, _ = world.run("key", "show", key["public"])
    assert out.strip() == key["key_id"]
    trust_dir = world.tmp / "trusted.d"
    trust_dir.mkdir()
    (trust_dir / "fleet.pub").write_bytes(Path(key["public"]).read_bytes())
    trust = ["--trust-dir", str(trust_dir), "--state-dir", str(world.tmp / "state")]

    unsigned = world.pack(name="unsigned.ebundle")
    _, err = world.run("import", str(unsigned), *world.ctr_args(), *trust, code=13)
    assert "is not signed" in err and world.device_images() == {}
    _, err = world.run("verify", str(unsigned), "--trust-dir", str(trust_dir), code=13)

    signed = world.pack("gw", "--sign", key["private"], name="signed.ebundle")
    out, _ = world.run("verify", str(signed), "--trust", key["public"])
    assert f"signed by trusted key {key['key_id']}" in out
    out, _ = world.run("import", str(signed), *world.ctr_args(), *trust,
                       "--report", str(world.tmp / "report.json"))
    assert f"signature by trusted key {key['key_id']} checked" in out
    report = json.loads((world.tmp / "report.json").read_text())
    assert report["signatures"] == {"enforced": True, "trusted_keys": [key["key_id"]]}

    # The packer learns from the report that the site enforces signatures.
    world.run("inventory", "record", "gw", str(world.tmp / "report.json"))
    _, err = world.run("pack", str(world.manifest), "--site", "gw", "--full", "-o",
                       str(world.tmp / "x.ebundle"), code=2)
    assert "imports only signed bundles" in err
    world.run("key", "generate", "--out", str(world.tmp / "other"))
    _, err = world.run("pack", str(world.manifest), "--site", "gw", "--full", "-o",
                       str(world.tmp / "x.ebundle"), "--sign", str(world.tmp / "other.key"), code=2)
    assert "it would refuse this bundle" in err


def test_report_says_when_a_device_enforces_nothing(world: World) -> None:
    out, _ = world.run("report", *world.ctr_args(), "--json")
    assert json.loads(out)["signatures"] == {"enforced": False, "trusted_keys": []}


# ---------------------------------------------------------------------------
# -v and --debug


def test_verbose_says_what_happens_and_debug_says_more(world: World) -> None:
    _, quiet = world.run("pack", str(world.manifest), "--site", "gw", "-o", str(world.tmp / "q.ebundle"))
    assert "resolved" not in quiet
    _, verbose = world.run("pack", str(world.manifest), "--site", "gw", "-o",
                           str(world.tmp / "v.ebundle"), "-v")
    assert f"resolved {world.app.ref}" in verbose or "resolved example.test/shop/app:v1" in verbose
    assert "plan example.test/shop/app:v1" in verbose and "wrote bundle" in verbose
    assert "pack: layer" not in verbose  # DEBUG only
    _, debug = world.run("--debug", "import", str(world.tmp / "v.ebundle"), *world.ctr_args())
    assert "run: " in debug and "images import" in debug  # each ctr command at DEBUG
    assert "entry sha256:" in debug
    # With --debug an error still ends in its one line (after the log), never a traceback.
    world.capsys.readouterr()
    assert main(["verify", str(world.tmp / "none.ebundle"), "--debug"]) == 2
    err = world.capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("edgebundle: error: ")


def test_logging_redacts_secrets() -> None:
    from edgebundle.logs import redact

    assert "s3cr3t" not in redact("Authorization: Basic czNjcjN0OnMzY3IzdA==")
    assert "abc.def.ghijklmnop" not in redact("sending Bearer abc.def.ghijklmnop to the registry")
    assert "hunter2" not in redact("https://edge:hunter2@registry.local/v2/")
    assert "sigvalue" not in redact("GET https://s3/bucket/blob?X-Amz-Signature=sigvalue&x=1")
    assert "tok123" not in redact('{"token": "tok123", "expires_in": 300}')
    assert "tok456" not in redact("https://auth/token?service=r&access_token=tok456")
    assert redact("resolved example.test/app:v1 for linux/amd64") == \
        "resolved example.test/app:v1 for linux/amd64"


def test_debug_log_of_a_registry_login_shows_no_secret(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A token dance logged at --debug: httpx's request lines pass through the redactor."""
    import httpx

    from edgebundle.logs import setup_logging
    from edgebundle.reference import parse_reference
    from edgebundle.registry import CredentialStore, RegistryClient

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(200, json={"token": "tok-SECRET-123", "access_token": "tok-SECRET-123"})
        if request.headers.get("authorization") != "Bearer tok-SECRET-123":
            return httpx.Response(401, headers={"www-authenticate":
                                  'Bearer realm="https://reg.test/token",service="reg.test"'})
        return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})

    setup_logging(1, True)
    creds = CredentialStore({"auths": {"reg.test": {"username": "edge", "password": "pw-SECRET-456"}}})
    with RegistryClient({}, creds, transport=httpx.MockTransport(handler), retries=0) as client:
        with pytest.raises(Exception):
            client.get_manifest(parse_reference("reg.test/app:v1"))
    err = capsys.readouterr().err
    assert "HTTP Request" in err  # httpx logs at --debug
    assert "SECRET" not in err
    setup_logging(0, False)
