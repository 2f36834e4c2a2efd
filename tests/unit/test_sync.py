"""``sync`` without SSH: the state key, the fleet bundle cache, and the orchestration.

The orchestration runs through its one seam, the ``Shell`` a link yields: here a local
shell that runs the very command lines sync sends to a device (the real edgebundle
CLI, over ``fakectr.py`` as the device's ctr) and copies files where SFTP would upload
them. Faults are injected at that seam: a dropped upload, a device exit code, a
device that reports less than it was sent. The real SSH path is in
tests/integration/test_sync_real.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import pytest

from edgebundle.cache import BlobCache
from edgebundle.cli.main import main
from edgebundle.errors import EdgebundleError, LinkError, TransportError
from edgebundle.format import read_index
from edgebundle.holdings import HeldImage, Inventory
from edgebundle.manifest import load_manifest
from edgebundle.oci import Platform
from edgebundle.specs import SiteSpec
from edgebundle.state import StateDir
from edgebundle.sync.bundles import BundleCache, FleetBundle
from edgebundle.sync.device import DeviceCommandError
from edgebundle.sync.run import SiteOutcome, Syncer, SyncOptions, _retryable
from edgebundle.sync.states import Holding, PackSettings, holding, state_key
from edgebundle.transfer.ssh import CommandResult
from edgebundle.transfer.upload import UploadResult
from edgebundle.usecases.packer import PackerSession
from tiny_images import APP, BASE, TOOL, Images, write_oci_layout

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


# ---------------------------------------------------------------------------
# The state key (pure)


def _site(name: str = "gw-1", **kw: Any) -> SiteSpec:
    args: Dict[str, Any] = dict(name=name, runtime="containerd", platform=Platform.parse("linux/amd64"),
                                namespace="k8s.io")
    args.update(kw)
    return SiteSpec(**args)


@pytest.fixture
def images(tmp_path: Path) -> Images:
    return Images(BlobCache(tmp_path / "build"))


def _inv(*held: HeldImage, chains: Sequence[str] = (), host: str = "a", when: str = "t1") -> Inventory:
    return Inventory(runtime="containerd", namespace="k8s.io", images=tuple(held),
                     chains=frozenset(chains), generated_at=when, host=host,
                     features=frozenset({"tar-delta-v1"}), trusted_keys=frozenset(),
                     extra={"note": host})


def test_state_key_ignores_who_and_when_but_not_what(images: Images) -> None:
    app = images.image("example.test/shop/app:v1", [BASE, APP])
    held_a = HeldImage("example.test/shop/tool:v1", "sha256:" + "c" * 64)
    held_b = HeldImage("example.test/shop/old:v1", "sha256:" + "d" * 64)
    s = PackSettings()
    one = state_key(_site("gw-1"), [app], _inv(held_a, held_b, chains=["sha256:" + "1" * 64]), s)
    # Another site, another host, another time, images listed in another order: same state.
    same = state_key(_site("gw-2", ssh="root@h:22", staging="/x"),
                     [app], _inv(held_b, held_a, chains=["sha256:" + "1" * 64], host="b", when="t2"), s)
    assert one == same and len(one) == 32
    differs = [
        state_key(_site(), [app], _inv(held_a, chains=["sha256:" + "1" * 64]), s),  # holds less
        state_key(_site(), [app], _inv(held_a, held_b), s),  # a chain less
        state_key(_site(namespace="other"), [app], _inv(held_a, held_b, chains=["sha256:" + "1" * 64]), s),
        state_key(_site(platform=Platform.parse("linux/arm64")), [app],
                  _inv(held_a, held_b, chains=["sha256:" + "1" * 64]), s),
        state_key(_site(), [app], _inv(held_a, held_b, chains=["sha256:" + "1" * 64]), PackSettings(level=3)),
        state_key(_site(), [app], _inv(held_a, held_b, chains=["sha256:" + "1" * 64]),
                  PackSettings(signer_ids=("ed25519:" + "a" * 32,))),
        state_key(_site(), [app], _inv(held_a, held_b, chains=["sha256:" + "1" * 64]), PackSettings(deltas=False)),
        state_key(_site(), [images.image("example.test/shop/app:v1", [BASE, TOOL])],
                  _inv(held_a, held_b, chains=["sha256:" + "1" * 64]), s),  # the tag moved
    ]
    assert one not in differs and len(set(differs)) == len(differs)


def test_holding_counts_complete_current_images(images: Images) -> None:
    app = images.image("example.test/shop/app:v1", [BASE, APP])
    tool = images.image("example.test/shop/tool:v1", [BASE, TOOL])
    assert holding(_site(), [app, tool], _inv()) == Holding(0, 2)
    # An image by name but incomplete does not count; the right name and content does.
    from edgebundle.oci import Descriptor
    top = Descriptor(app.top.media_type, app.top.digest, app.top.size)
    held = HeldImage(app.name, app.config.digest, target=top, complete=False)
    assert not holding(_site(), [app, tool], _inv(held)).done
    h = holding(_site(), [app, tool], _inv(HeldImage(app.name, app.config.digest, target=top)))
    assert (h.current, h.images, str(h)) == (1, 2, "1/2")


def test_what_is_retried() -> None:
    assert _retryable(LinkError("link dropped", None))
    assert not _retryable(TransportError("host key changed", None))
    assert not _retryable(EdgebundleError("other", None))
    for status, again in ((15, True), (7, True), (-1, True), (137, True), (13, False), (14, False),
                          (8, False), (5, False)):
        exc = DeviceCommandError("import failed", None, status)
        assert _retryable(exc) is again, status
        assert exc.exit_code == (status if 0 < status < 126 else 1)


# ---------------------------------------------------------------------------
# The fleet bundle cache


def _fake_pack(calls: List[Path], key: str) -> Callable[[Path], FleetBundle]:
    def pack(path: Path) -> FleetBundle:
        calls.append(path)
        path.write_bytes(b"bundle of " + key.encode())
        return FleetBundle(key, str(path), path.stat().st_size, 1, 1, 10, 20)
    return pack


def test_bundle_cache_packs_once_per_key_and_keeps_it_while_needed(tmp_path: Path) -> None:
    cache = BundleCache(tmp_path / "bundles")
    calls: List[Path] = []
    a = cache.get_or_pack("k1", "gw-1", _fake_pack(calls, "k1"))
    b = cache.get_or_pack("k1", "gw-2", _fake_pack(calls, "k1"))
    assert a == b and len(calls) == 1 and Path(a.path).name == "k1.ebundle"
    assert cache.needed_by("k1") == ["gw-1", "gw-2"]
    # gw-2 moves to another state: it needs only the new bundle.
    cache.get_or_pack("k2", "gw-2", _fake_pack(calls, "k2"))
    assert cache.needed_by("k1") == ["gw-1"] and cache.needed_by("k2") == ["gw-2"]
    cache.release("gw-2")
    assert cache.collect() == ["k2"]
    assert not (tmp_path / "bundles" / "k2").exists() and Path(a.path).is_file()
    cache.release("gw-1")
    assert cache.collect() == ["k1"] and not Path(a.path).exists()


def test_bundle_cache_repacks_a_damaged_bundle(tmp_path: Path) -> None:
    cache = BundleCache(tmp_path / "bundles")
    calls: List[Path] = []
    first = cache.get_or_pack("k1", "gw-1", _fake_pack(calls, "k1"))
    with open(first.path, "ab") as fh:
        fh.write(b"x")  # no longer the size its meta records
    cache.get_or_pack("k1", "gw-1", _fake_pack(calls, "k1"))
    assert len(calls) == 2


def test_bundle_cache_refuses_a_bad_site_name(tmp_path: Path) -> None:
    with pytest.raises(EdgebundleError, match="invalid site name"):
        BundleCache(tmp_path).get_or_pack("k1", "../x", _fake_pack([], "k1"))


# ---------------------------------------------------------------------------
# The orchestration, through the Shell seam


class LocalShell:
    """The device commands sync sends, run by a local ``sh -c``; uploads are copies."""

    def __init__(self, fleet: "Fleet", site: SiteSpec) -> None:
        self.fleet = fleet
        self.site = site

    def run(self, command: str, what: str, timeout: float) -> CommandResult:
        self.fleet.commands.append((self.site.name, command))
        hook = self.fleet.on_command.get(self.site.name)
        if hook is not None:
            result = hook(command)
            if result is not None:
                return result
        proc = subprocess.run(["sh", "-c", command], capture_output=True, timeout=120)
        lines = [l for l in proc.stderr.decode().splitlines() if l.strip()]
        return CommandResult(proc.returncode, proc.stdout, lines[-1] if lines else "")

    def upload(self, bundle: str, staging: str, *, limit_rate: Optional[float],
               progress: Optional[Callable[[int], None]]) -> UploadResult:
        hook = self.fleet.on_upload.get(self.site.name)
        if hook is not None:
            hook()
        os.makedirs(staging, exist_ok=True)
        final = os.path.join(staging, os.path.basename(bundle))
        shutil.copyfile(bundle, final)
        size = os.path.getsize(final)
        if progress is not None:
            progress(size)
        self.fleet.uploads.append((self.site.name, final))
        return UploadResult(final, size, size, 0, 0.0, "size")

    def remove_staged(self, staging: str, suffixes: Sequence[str]) -> List[str]:
        names = [n for n in os.listdir(staging) if n.endswith(tuple(suffixes))]
        for n in names:
            os.unlink(os.path.join(staging, n))
        return names


class Fleet:
    """A manifest over an OCI layout and N devices, each a fakectr state of its own."""

    def __init__(self, tmp: Path, names: Sequence[str], *, prune: str = "") -> None:
        self.tmp = tmp
        self.images = Images(BlobCache(tmp / "build"))
        self.app = self.images.image("example.test/shop/app:v1", [BASE, APP])
        self.tool = self.images.image("example.test/shop/tool:v1", [BASE, TOOL])
        write_oci_layout(tmp / "layout", self.images.cache, [self.app, self.tool])
        self.commands: List[Any] = []
        self.uploads: List[Any] = []
        self.on_command: Dict[str, Callable[[str], Optional[CommandResult]]] = {}
        self.on_upload: Dict[str, Callable[[], None]] = {}
        sites = []
        for name in names:
            dev = tmp / "devices" / name
            (dev / "content").mkdir(parents=True)
            (dev / "bin").mkdir()
            (dev / "state.json").write_text(json.dumps({"namespace": "k8s.io", "images": {},
                                                        "snapshots": []}))
            (dev / "containerd.sock").touch()
            ctr = dev / "bin" / "ctr"
            ctr.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'fakectr.py'} \"$@\"\n")
            ctr.chmod(0o755)
            env = (f"env FAKECTR_STATE={dev} EDGEBUNDLE_STATE_DIR={dev / 'state'} "
                   f"EDGEBUNDLE_TRUST_DIR={dev / 'trust'} PATH={dev / 'bin'}:{os.environ['PATH']} "
                   f"PYTHONPATH={ROOT} {sys.executable} -m edgebundle")
            sites.append(f"  {name}: {{runtime: containerd, namespace: k8s.io, platform: linux/amd64, "
                         f"ssh: 'root@127.0.0.1:1', address: '{dev / 'containerd.sock'}', "
                         f"staging: '{dev / 'staging'}', edgebundle: '{env}'{prune}}}")
        self.manifest_path = tmp / "m.yaml"
        self.manifest_path.write_text(f"""version: 1
images:
  - ref: example.test/shop/app:v1
    source: oci-layout:{tmp / 'layout'}
  - ref: example.test/shop/tool:v1
    source: oci-layout:{tmp / 'layout'}
sites:
""" + "\n".join(sites) + "\n")
        self.home = tmp / "home"

    def device_images(self, name: str) -> Dict[str, Any]:
        state = json.loads((self.tmp / "devices" / name / "state.json").read_text())
        return state["images"]  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def link(self, site: SiteSpec, options: SyncOptions) -> Iterator[LocalShell]:
        yield LocalShell(self, site)

    def sync(self, names: Optional[Sequence[str]] = None, **options: Any) -> List[SiteOutcome]:
        manifest = load_manifest(str(self.manifest_path))
        sites = [manifest.site(n) for n in (names or sorted(manifest.sites))]
        options.setdefault("retry_delay", 0.0)
        options.setdefault("level", 3)
        with PackerSession(self.home, manifest) as session:
            syncer = Syncer(session, SyncOptions(**options), link=self.link)
            outcomes = syncer.run(sites)
            self.packed = list(syncer.packer.packed)
        return outcomes


def test_sync_packs_once_per_state_imports_and_checks_the_fresh_report(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, ["gw-1", "gw-2"], prune=", prune: {keep_previous: 1}")
    staged: List[Path] = []
    pruned: List[List[str]] = []

    def watch(command: str) -> Optional[CommandResult]:
        argv = shlex.split(command)
        if "import" in argv:  # keep a copy of what the device got
            staged.append(tmp_path / f"copy{len(staged)}.ebundle")
            shutil.copyfile(argv[argv.index("import") + 1], staged[-1])
        if "prune" in argv:  # the device side of prune has its own tests
            pruned.append(argv[argv.index("prune"):])
            return CommandResult(0, b"{}", "")
        return None

    fleet.on_command["gw-1"] = fleet.on_command["gw-2"] = watch
    first = fleet.sync()
    assert [(o.site, o.ok, o.action, o.exit_code) for o in first] == \
        [("gw-1", True, "updated", 0), ("gw-2", True, "updated", 0)], [o.error for o in first]
    assert len(fleet.packed) == 1  # two sites in one state: one bundle
    assert first[0].bundle == first[1].bundle
    assert [(str(o.before), str(o.after)) for o in first] == [("0/2", "2/2")] * 2
    for name in ("gw-1", "gw-2"):
        assert {fleet.app.name, fleet.tool.name} <= set(fleet.device_images(name))
        assert os.listdir(tmp_path / "devices" / name / "staging") == []  # staged file removed
    assert first[0].bytes_sent == first[0].bundle_bytes > 0
    # One bundle for both: it names no site. Nobody needs it now, so it left the cache.
    assert [read_index(p).header.site for p in staged] == [None, None]
    assert staged[0].read_bytes() == staged[1].read_bytes()
    assert not list((fleet.home / "bundles").glob("*/*.ebundle"))
    # Prune ran after the import, keeping the manifest's images.
    sock = str(tmp_path / "devices" / "gw-1" / "containerd.sock")
    assert len(pruned) == 2 and ["prune", "--runtime", "containerd", "--namespace", "k8s.io", "--address", sock,
                                 "--keep", fleet.app.name, "--keep", fleet.tool.name, "--keep-previous", "1",
                                 "--json"] in pruned
    # The packer recorded each fresh report as the site's inventory.
    recorded = json.loads((fleet.home / "sites" / "gw-1" / "inventory.json").read_text())
    assert {i["name"] for i in recorded["images"] if i["complete"]} >= {fleet.app.name, fleet.tool.name}

    assert sorted(s for s, _ in fleet.uploads) == ["gw-1", "gw-2"]
    fleet.commands.clear()
    again = fleet.sync()
    assert [(o.action, o.bytes_sent, o.attempts) for o in again] == [("up-to-date", 0, 1)] * 2
    assert fleet.packed == [] and len(fleet.uploads) == 2  # both from the first sync
    assert all(" report " in c for _, c in fleet.commands)  # one round trip each, nothing else


def test_a_dropped_upload_is_retried_and_a_refusal_is_not(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, ["gw-1", "gw-2"])
    drops = []

    def drop() -> None:
        if not drops:
            drops.append(1)
            raise LinkError("upload of x to site gw-1 failed after 100 of 200 bytes", "run again")

    fleet.on_upload["gw-1"] = drop

    def refuse(command: str) -> Optional[CommandResult]:
        if " import " in command:
            return CommandResult(13, b"", "edgebundle: error: bundle is not signed (hint: sign it)")
        return None

    fleet.on_command["gw-2"] = refuse
    one, two = fleet.sync(retries=2)
    assert (one.ok, one.attempts, one.action) == (True, 2, "updated")
    assert (two.ok, two.attempts, two.exit_code) == (False, 1, 13)
    assert two.error and two.error.startswith("import on site gw-2 exited with status 13: "
                                              "edgebundle: error: bundle is not signed")
    # The failed site keeps its staged bundle (for the next run) and its need for it.
    staged = os.listdir(tmp_path / "devices" / "gw-2" / "staging")
    assert staged == [f"{two.bundle}.ebundle"]
    assert BundleCache(fleet.home / "bundles").needed_by(str(two.bundle)) == ["gw-2"]
    assert fleet.device_images("gw-2") == {}


def test_a_busy_device_is_retried_until_the_attempts_run_out(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, ["gw-1"])
    fleet.on_command["gw-1"] = lambda c: CommandResult(15, b"", "edgebundle: error: an import is "
                                                       "already running") if " import " in c else None
    (outcome,) = fleet.sync(retries=2)
    assert (outcome.ok, outcome.attempts, outcome.exit_code) == (False, 3, 15)
    assert sum(1 for _, c in fleet.commands if " import " in c) == 3


def test_done_only_when_the_fresh_report_holds_every_image(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, ["gw-1"])
    # The device says the import worked but loads nothing: the fresh report tells.
    fleet.on_command["gw-1"] = lambda c: CommandResult(0, b"{}", "") if " import " in c else None
    (outcome,) = fleet.sync()
    assert (outcome.ok, outcome.exit_code, str(outcome.after)) == (False, 8, "0/2")
    assert outcome.error and "holds 0/2 of the manifest's images (missing: " in outcome.error
    assert fleet.app.name in outcome.error


def test_a_failed_prune_is_finished_by_the_next_run(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, ["gw-1"], prune=", prune: true")
    old = CommandResult(2, b"", "edgebundle: error: argument COMMAND: invalid choice: 'prune'")
    fleet.on_command["gw-1"] = lambda c: old if " prune " in c else None
    (first,) = fleet.sync()
    assert (first.ok, first.exit_code, str(first.after)) == (False, 9, "2/2")
    assert first.error and first.error.startswith("edgebundle on site gw-1 is too old for this packer")
    staging = tmp_path / "devices" / "gw-1" / "staging"
    assert os.listdir(staging) == [f"{first.bundle}.ebundle"]  # kept until the site is finished
    # The device is upgraded: the next run finds the images there and finishes the job.
    fleet.on_command["gw-1"] = lambda c: CommandResult(0, b"{}", "") if " prune " in c else None
    fleet.commands.clear()
    (second,) = fleet.sync()
    assert (second.ok, second.action, second.bytes_sent) == (True, "up-to-date", 0)
    assert [c.split()[-1] for _, c in fleet.commands if " prune " in c] == ["--json"]
    assert os.listdir(staging) == [] and not BundleCache(fleet.home / "bundles").claimed("gw-1")
    fleet.commands.clear()
    fleet.sync()
    assert not [c for _, c in fleet.commands if " prune " in c]  # finished: one round trip again


def test_a_site_another_sync_holds_is_left_alone(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, ["gw-1", "gw-2"])
    with StateDir(fleet.home / "sites" / "gw-1").lock("sync.lock", "a sync of site gw-1", "on this packer"):
        one, two = fleet.sync()
    assert (one.ok, one.exit_code) == (False, 15)
    assert one.error and one.error.startswith("a sync of site gw-1 is already running on this packer")
    assert two.ok and not [c for s, c in fleet.commands if s == "gw-1"]


def test_site_timeout_stops_between_steps(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, ["gw-1"])
    fleet.on_command["gw-1"] = lambda c: (time.sleep(0.3), None)[1]  # a slow device
    (outcome,) = fleet.sync(site_timeout=0.2)
    assert not outcome.ok and outcome.error and "ran out of time before the pack" in outcome.error


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, ["gw-1"])
    (outcome,) = fleet.sync(dry_run=True)
    assert (outcome.ok, outcome.action, outcome.bytes_sent) == (True, "planned", 0)
    assert outcome.ship_bytes > 0 and outcome.bundle
    assert fleet.uploads == [] and fleet.packed == [] and fleet.device_images("gw-1") == {}
    assert not (fleet.home / "sites" / "gw-1" / "inventory.json").exists()


# ---------------------------------------------------------------------------
# The CLI


def _cli(tmp: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple:
    capsys.readouterr()
    rc = main(["--home", str(tmp / "home"), *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    return rc, out, err


def test_cli_sync_reports_each_site_and_exits_16(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fleet = Fleet(tmp_path, ["gw-1", "gw-2"])  # their ssh: port 1, where nothing listens
    rc, out, err = _cli(tmp_path, capsys, "sync", str(fleet.manifest_path), "--all", "--json",
                        "--retries", "0", "--ssh-config", os.devnull, "--known-hosts", str(tmp_path / "kh"))
    assert rc == 16
    doc = json.loads(out)
    assert doc["ok"] is False and doc["total"]["failed"] == 2
    for rec, name in zip(doc["sites"], ("gw-1", "gw-2")):
        assert {"site", "ok", "error", "bytes_sent", "exit_code", "action"} <= set(rec)
        assert (rec["site"], rec["ok"], rec["exit_code"], rec["bytes_sent"]) == (name, False, 9, 0)
        assert rec["error"].startswith("SSH connection to 127.0.0.1:1 refused")
    lines = [l for l in err.splitlines() if l.startswith("edgebundle: error:")]
    assert lines == [lines[0]] and "2 of 2 sites not done: gw-1, gw-2" in lines[0]
    rc, out, _ = _cli(tmp_path, capsys, "sync", str(fleet.manifest_path), "--site", "gw-2",
                      "--retries", "0", "--ssh-config", os.devnull, "--known-hosts", str(tmp_path / "kh"))
    assert rc == 16
    table = out.splitlines()
    assert table[0].split() == ["SITE", "BEFORE", "AFTER", "SENT", "TIME", "RESULT"]
    assert table[1].startswith("gw-2") and "FAILED (exit 9): SSH connection to 127.0.0.1:1 refused" in table[1]
    assert table[-1].startswith("0 of 1 sites done, 1 failed")


@pytest.mark.parametrize("argv, message", [
    ([], "sync needs the sites to work on"),
    (["--all", "--site", "gw-1"], "--all and --site both select sites"),
    (["--site", "nope"], "site 'nope' is not declared"),
    (["--all", "--parallel", "0"], "--parallel 0 is below 1"),
    (["--all", "--retries", "-1"], "--retries -1 is below 0"),
    (["--all", "--limit-rate", "fast"], "--limit-rate 'fast' is not a size"),
    (["--all", "--limit-rate", "10"], "--limit-rate 10 is 10 bytes, below the minimum of 1024 bytes"),
    (["--all", "--site-timeout", "0"], "--site-timeout 0 is not a positive number of seconds"),
    (["--all", "--jobs", "0"], "--jobs 0: at least one download must run"),
])
def test_cli_sync_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: List[str],
                               message: str) -> None:
    fleet = Fleet(tmp_path, ["gw-1"])
    rc, _, err = _cli(tmp_path, capsys, "sync", str(fleet.manifest_path), *argv)
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "(hint: " in err
