"""``edgebundle sync`` against the real gateway fleet (tests/integration/fleet.py).

22 gateways, each a real OpenSSH sshd with its own host key and port: 14 containerd
namespaces and 2 dockerds that are healthy (half start empty, half hold the old app
version), and one per real fault: wrong host key, sshd down, link cut mid-upload,
staging disk full, edgebundle missing, import SIGKILLed mid-way. Every sync is the
real CLI in its own process (``python -m edgebundle sync …``), as a timer would run it;
what the devices hold is asked of their runtimes (ctr, docker), and images are run.

The runs build on each other, as a fleet's scheduled runs do; each step is a
module-scoped fixture, so any test can be run alone (it brings the runs it needs):

1. ``dry_run``: ``--dry-run`` before anything, text and JSON: bytes per site and in
   total; nothing on any device changes, nothing is packed or recorded.
2. ``first``: ``sync --all --retries 1``: every healthy gateway reaches the manifest;
   the killed import converges on its retry (a new SSH session, a new import); each
   other faulty gateway fails with its own one-line error, retried only when the
   failure may pass (link down, refused); exit 16.
3. ``second``: the cut link is back; ``sync --all`` again: the cut upload resumes from
   its verified offset, the sites already done cost one report and no upload.
4. ``up_to_date``: ``--site`` for every site that made it: exit 0, nothing sent.
Then overlapping runs for one site, with one packer home and with two.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import fleet as fleetlib
import pytest
import services

FAILED = 16  # SyncIncomplete
SPACE = 14  # SpaceError
LOCKED = 15  # LockedError
TEMP_PREFIX = "import.edgebundle.invalid/"
TOOLS = "shop/tools:v1"  # asked of one site only, by the overlap tests
# Seconds for this file from the first run on (the fleet's start-up is test_fleet's):
# ~60-90 s alone on 2 cores, up to ~135 s with three other agents' work on them. The
# bound catches what would run away (e.g. the default 5 s backoff, doubled per retry).
WALL_BUDGET = 240.0


@dataclass(frozen=True)
class Run:
    argv: List[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def doc(self) -> Dict[str, Any]:
        return json.loads(self.stdout)  # type: ignore[no-any-return]

    @property
    def sites(self) -> Dict[str, Dict[str, Any]]:
        return {r["site"]: r for r in self.doc["sites"]}

    def show(self) -> str:
        return f"$ {' '.join(self.argv[2:])}\n-> {self.rc} in {self.seconds:.1f}s\n{self.stderr[-3000:]}"


@dataclass
class World:
    fleet: fleetlib.Fleet
    registry: str
    images: Dict[str, Any]  # imagefactory.standard_set()["images"]
    manifest: Path
    home: Path
    tmp: Path

    def ref(self, short: str) -> str:
        return f"{self.registry}/{short}"

    def start(self, *args: str, manifest: Optional[Path] = None, home: Optional[Path] = None,
              json_out: bool = True) -> "Tuple[List[str], subprocess.Popen[str], float]":
        """Start ``edgebundle sync`` in its own process, as a timer would.

        One retry after a short delay (the default backoff, 5 s doubled, is for real links).
        """
        argv = [*fleetlib.eb(), "--home", str(home or self.home), "sync", str(manifest or self.manifest), *args,
                *self.fleet.ssh_flags(), "--sign", str(self.fleet.signing_key), "--level", "3",
                "--parallel", "8", "--timeout", "10", "--retries", "1", "--retry-delay", "0.2",
                "--no-progress", *(["--json"] if json_out else [])]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=services.clean_env())
        return argv, proc, time.monotonic()

    def sync(self, *args: str, **kw: Any) -> Run:
        return finish(*self.start(*args, **kw))


def finish(argv: List[str], proc: "subprocess.Popen[str]", started: float, timeout: float = 300) -> Run:
    out, err = proc.communicate(timeout=timeout)
    return Run(argv, proc.returncode, out, err, time.monotonic() - started)


# --------------------------------------------------------------------------- device truth


def real_images(w: World, g: fleetlib.Gateway) -> Dict[str, str]:
    """name -> digest (containerd) / image id (docker) the runtime lists; temporaries apart."""
    return {n: d for n, d in fleetlib.runtime_images(w.fleet, g).items() if not n.startswith(TEMP_PREFIX)}


def temporaries(w: World, g: fleetlib.Gateway) -> List[str]:
    return [n for n in fleetlib.runtime_images(w.fleet, g) if n.startswith(TEMP_PREFIX)]


def expected(w: World, g: fleetlib.Gateway, refs: Iterable[str]) -> Dict[str, str]:
    """What the runtime must list for ``refs``: manifest digests (containerd), config ids (docker)."""
    key = "config_digest" if g.runtime == "docker" else "manifest_digest"
    return {w.ref(r): w.images[r][key] for r in refs}


def staged_files(g: fleetlib.Gateway) -> List[str]:
    return sorted(p.name for p in g.staging.iterdir()) if g.staging.is_dir() else []


def device_snapshot(w: World) -> Dict[str, Any]:
    """Everything a sync could change on the devices: images, staging, state dirs."""
    snap: Dict[str, Any] = {}
    for g in w.fleet.gateways:
        # (`report` takes the device's import lock, a file holding its pid: not a change)
        state = sorted((str(p.relative_to(g.state_dir)), p.stat().st_size) for p in g.state_dir.rglob("*")
                       if p.is_file() and not p.name.endswith(".lock"))
        snap[g.name] = (fleetlib.runtime_images(w.fleet, g), staged_files(g), state)
    return snap


def assert_holds(w: World, g: fleetlib.Gateway, refs: Sequence[str], *, also: Sequence[str] = (),
                 run: Optional[Sequence[str]] = None) -> None:
    """The runtime lists exactly ``refs`` (+ ``also``) at their registry digests, no
    temporaries, and ``run`` (default: ``refs``) run and print their message."""
    want = expected(w, g, [*refs, *also])
    assert real_images(w, g) == want, (g.name, real_images(w, g), want)
    assert temporaries(w, g) == [], (g.name, temporaries(w, g))
    for i, r in enumerate(refs if run is None else run):
        out = fleetlib.run_image(w.fleet, g, w.ref(r), f"t{time.monotonic_ns() % 10**9}-{i}")
        assert out == w.images[r]["message"], (g.name, r, out)


def one_line_error(record: Dict[str, Any]) -> str:
    err = record["error"]
    assert record["ok"] is False and isinstance(err, str) and err, record
    assert "\n" not in err and "Traceback" not in err, record
    return err


# --------------------------------------------------------------------------- the runs


def made_it(w: World) -> List[str]:
    """The sites the second run brings to the manifest: healthy ones and the two that recover."""
    return [g.name for g in w.fleet.gateways if g.fault in (None, "cut-upload", "import-killed")]


@pytest.fixture(scope="module")
def world(fleet: fleetlib.Fleet, registry: Any, pushed_images: Dict[str, Any],
          tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("sync")
    manifest = fleetlib.write_manifest(fleet, tmp / "fleet.yaml", registry.host, fleetlib.MANIFEST_REFS)
    return World(fleet, registry.host, pushed_images["images"], manifest, tmp / "home", tmp)


@pytest.fixture(scope="module")
def clock() -> Dict[str, float]:
    return {"start": time.monotonic()}


@pytest.fixture(scope="module")
def dry_run(world: World, clock: Dict[str, float]) -> Dict[str, Any]:
    before = device_snapshot(world)
    text = world.sync("--all", "--dry-run", json_out=False)
    js = world.sync("--all", "--dry-run")
    return {"before": before, "after": device_snapshot(world), "text": text, "json": js}


@pytest.fixture(scope="module")
def first(world: World, dry_run: Dict[str, Any]) -> Run:
    run = world.sync("--all")
    print(f"\nfirst sync: {run.rc} in {run.seconds:.1f}s")
    return run


@pytest.fixture(scope="module")
def second(world: World, first: Run) -> Run:
    cut = world.fleet.by_fault("cut-upload")
    assert cut.proxy is not None
    cut.proxy.heal()  # the link is back
    run = world.sync("--all")
    print(f"\nsecond sync: {run.rc} in {run.seconds:.1f}s")
    return run


@pytest.fixture(scope="module")
def up_to_date(world: World, second: Run) -> Run:
    args = [a for name in made_it(world) for a in ("--site", name)]
    run = world.sync(*args)
    print(f"\nup-to-date sync of {len(args) // 2} sites: {run.rc} in {run.seconds:.1f}s")
    return run


# --------------------------------------------------------------------------- 1. dry run


def mb(n: int) -> str:
    """A size as sync's summary prints it (cli.packer._mb)."""
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def test_dry_run_plans_every_site_and_changes_nothing(world: World, dry_run: Dict[str, Any]) -> None:
    text, js = dry_run["text"], dry_run["json"]
    assert dry_run["after"] == dry_run["before"]  # no image, staged file or state written anywhere
    home = list(world.home.rglob("*")) if world.home.exists() else []
    assert not [p for p in home if p.name.endswith(".ebundle")], home  # nothing packed
    assert not [p for p in home if p.name.startswith("inventory")], home  # nothing recorded
    sites = js.sites
    assert set(sites) == {g.name for g in world.fleet.gateways}, js.show()
    assert js.rc == text.rc == FAILED  # the sites that cannot be asked fail as in a real run
    for g in world.fleet.gateways:
        rec = sites[g.name]
        if g.fault in ("wrong-host-key", "sshd-down", "edgebundle-missing"):
            assert rec["ok"] is False and rec["action"] == "failed", (g.name, rec)
            one_line_error(rec)
            continue
        assert rec["ok"] is True and rec["action"] == "planned", (g.name, rec)
        assert rec["ship_bytes"] > 0 and rec["bytes_sent"] == 0, (g.name, rec)
    empty, old = sites["gw-00"], sites["gw-01"]
    assert old["ship_bytes"] < empty["ship_bytes"]  # the old site holds the base layers
    assert js.doc["total"]["ship_bytes"] == sum(r["ship_bytes"] for r in sites.values() if r["ok"])
    # The text form: one line per site with what it would ship, or its error; and the total.
    lines = text.stdout.splitlines()
    for g in world.fleet.gateways:
        rec = sites[g.name]
        line = next((ln for ln in lines if ln.split()[:1] == [g.name]), "")
        if rec["ok"]:
            assert f"would ship {mb(rec['ship_bytes'])}" in line, (g.name, text.stdout)
        else:
            assert f"FAILED (exit {rec['exit_code']}): {rec['error']}" in line, (g.name, text.stdout)
    total = js.doc["total"]["ship_bytes"]
    assert any(f"{mb(total)} in total" in ln and "nothing was changed" in ln for ln in lines), text.stdout


# --------------------------------------------------------------------------- 2. first run


def test_first_sync_brings_every_healthy_gateway_to_the_manifest(world: World, first: Run) -> None:
    assert first.rc == FAILED, first.show()
    sites = first.sites
    assert first.doc["ok"] is False
    assert set(sites) == {g.name for g in world.fleet.gateways}
    for g in world.fleet.healthy:
        rec = sites[g.name]
        assert rec["ok"] is True and rec["error"] is None and rec["action"] == "updated", (g.name, rec)
        assert 0 < rec["bytes_sent"] == rec["bundle_bytes"] and rec["resumed_from"] == 0, (g.name, rec)
        assert rec["attempts"] == 1, (g.name, rec)
        wanted = len(fleetlib.MANIFEST_REFS)  # (the old version is not one of them)
        assert rec["before"] == {"current": 0, "images": wanted}, (g.name, rec)
        assert rec["after"] == {"current": wanted, "images": wanted}, (g.name, rec)
        also = fleetlib.OLD_REFS if g.spec.holds == "old" else ()
        # The new app runs everywhere; every image on one gateway per runtime and start (a
        # ctr run costs ~0.4 s on 2 shared cores).
        run_all = g.name in ("gw-00", "gw-01", "dk-00", "dk-01")
        assert_holds(world, g, fleetlib.MANIFEST_REFS, also=also,
                     run=None if run_all else fleetlib.MANIFEST_REFS[:1])
        assert staged_files(g) == [], (g.name, staged_files(g))  # removed on success
    # The old sites got the new version as a delta against what they hold.
    assert sites["gw-01"]["bytes_sent"] < sites["gw-00"]["bytes_sent"]
    assert sites["dk-01"]["bytes_sent"] < sites["dk-00"]["bytes_sent"]


FAILING_FIRST = ("wrong-host-key", "sshd-down", "cut-upload", "disk-full", "edgebundle-missing")


def test_first_sync_reports_each_faulty_gateway_on_its_own(world: World, first: Run) -> None:
    sites = first.sites
    by_fault = {f: sites[world.fleet.by_fault(f).name] for f in FAILING_FIRST}
    errors = {f: one_line_error(rec) for f, rec in by_fault.items()}
    port = {f: world.fleet.by_fault(f).port for f in FAILING_FIRST}
    assert f"host key for 127.0.0.1:{port['wrong-host-key']} changed" in errors["wrong-host-key"], errors
    assert f"SSH connection to 127.0.0.1:{port['sshd-down']} refused" in errors["sshd-down"], errors
    missing = errors["edgebundle-missing"]
    assert "edgebundle is not installed on site bad-edgebundle-missing" in missing, missing
    assert "pip install edgebundle" in missing, missing  # says how to install it
    full = by_fault["disk-full"]
    assert full["exit_code"] == SPACE, full
    assert "has 1.0 MB free (1048576 bytes)" in full["error"] and f"({full['bundle_bytes']} bytes) more" \
        in full["error"], full
    # Retried only when it may pass: a refused connection, a dropped link; never a changed
    # host key, a full disk or a missing edgebundle.
    attempts = {f: rec["attempts"] for f, rec in by_fault.items()}
    assert attempts == {"wrong-host-key": 1, "sshd-down": 2, "cut-upload": 2, "disk-full": 1,
                        "edgebundle-missing": 1}, attempts
    for fault, rec in by_fault.items():
        g = world.fleet.by_fault(fault)
        assert rec["action"] == "failed" and rec["exit_code"] != 0, (fault, rec)
        assert real_images(world, g) == {}, (fault, real_images(world, g))  # nothing half-imported shows
    assert staged_files(world.fleet.by_fault("disk-full")) == []  # refused before writing
    # The run's own error line names every site that is not done.
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith(f"edgebundle: error: {len(FAILING_FIRST)} of {len(sites)} sites not done"), last
    assert all(world.fleet.by_fault(f).name in last for f in FAILING_FIRST), last


def test_first_sync_leaves_the_cut_upload_resumable(world: World, first: Run) -> None:
    g = world.fleet.by_fault("cut-upload")
    assert g.proxy is not None
    assert g.proxy.cuts == 1, g.proxy.cuts
    rec = first.sites[g.name]
    one_line_error(rec)
    parts = [n for n in staged_files(g) if n.endswith(".part")]
    assert len(parts) == 1 and not [n for n in staged_files(g) if n.endswith(".ebundle")], staged_files(g)
    assert fleetlib.CUT_AT_PART_BYTES <= (g.staging / parts[0]).stat().st_size < rec["bundle_bytes"], rec


def test_first_sync_import_killed_mid_way_converges_on_the_retry(world: World, first: Run) -> None:
    g = world.fleet.by_fault("import-killed")
    marker = g.root / "killed-once"
    assert marker.exists(), first.sites[g.name]  # the import was reached
    assert "killed importer" in marker.read_text(), marker.read_text()  # and SIGKILLed mid-way
    rec = first.sites[g.name]
    assert rec["ok"] is True and rec["action"] == "updated" and rec["attempts"] == 2, rec
    assert rec["error"] is None, rec
    assert_holds(world, g, fleetlib.MANIFEST_REFS)  # whole images, no temporaries, they run
    assert staged_files(g) == []


# --------------------------------------------------------------------------- 3. second run


def test_second_sync_resumes_the_cut_upload_from_its_offset(world: World, first: Run, second: Run) -> None:
    g = world.fleet.by_fault("cut-upload")
    rec = second.sites[g.name]
    assert rec["ok"] is True and rec["action"] == "updated", (rec, second.show())
    assert 0 < rec["resumed_from"] < rec["bundle_bytes"], rec
    assert rec["resumed_from"] % (1024 * 1024) == 0, rec  # a verified block boundary
    assert rec["bytes_sent"] == rec["bundle_bytes"] - rec["resumed_from"], rec
    assert_holds(world, g, fleetlib.MANIFEST_REFS)  # the bundle imported was whole and verified
    assert staged_files(g) == []


def test_second_sync_sends_nothing_to_sites_already_done(world: World, second: Run) -> None:
    assert second.rc == FAILED, second.show()  # the permanent faults still fail
    for g in [*world.fleet.healthy, world.fleet.by_fault("import-killed")]:
        rec = second.sites[g.name]
        assert rec["ok"] is True and rec["action"] == "up-to-date" and rec["bytes_sent"] == 0, (g.name, rec)
        assert rec["attempts"] == 1 and rec["bundle_bytes"] == 0, (g.name, rec)
    still = {"wrong-host-key", "sshd-down", "disk-full", "edgebundle-missing"}
    for g in world.fleet.faulty:
        assert second.sites[g.name]["ok"] is (g.fault not in still), (g.name, second.sites[g.name])


# --------------------------------------------------------------------------- 4. up to date


def test_up_to_date_sync_of_the_healthy_subset_exits_0_and_uploads_nothing(world: World, up_to_date: Run) -> None:
    assert up_to_date.rc == 0, up_to_date.show()
    assert set(up_to_date.sites) == set(made_it(world)), up_to_date.sites.keys()
    assert up_to_date.doc["ok"] is True
    for name, rec in up_to_date.sites.items():
        assert rec["ok"] is True and rec["action"] == "up-to-date", (name, rec)
        assert rec["bytes_sent"] == 0 and rec["error"] is None, (name, rec)


# --------------------------------------------------------------------------- overlapping runs


def overlap(w: World, g: fleetlib.Gateway, homes: Sequence[Path], *args: str) -> List[Run]:
    """Two syncs of ``g`` at once, asked for one more image than it holds."""
    manifest = fleetlib.write_manifest(w.fleet, w.tmp / f"overlap-{g.name}.yaml", w.registry,
                                       [*fleetlib.MANIFEST_REFS, TOOLS], [g])
    started = [w.start("--site", g.name, *args, home=h, manifest=manifest) for h in homes]
    return [finish(*s) for s in started]


def busy(rec: Dict[str, Any]) -> bool:
    """The site was refused as busy: sync's packer lock or the device's import lock (exit 15)."""
    return bool(rec["exit_code"] == LOCKED or "already running" in (rec["error"] or ""))


def check_overlap(w: World, g: fleetlib.Gateway, runs: List[Run], *, loser_says_busy: bool = True) -> None:
    recs = [r.sites[g.name] for r in runs]
    print(f"\noverlap on {g.name}: " + "; ".join(f"rc {r.rc} {rec['action']} attempts {rec['attempts']} "
                                                 f"sent {rec['bytes_sent']} {rec['error'] or ''}"
                                                 for r, rec in zip(runs, recs)))
    done = [r for r in recs if r["ok"]]
    assert done, [r.show() for r in runs]
    assert any(r["action"] == "updated" for r in done), recs  # one did the work
    for run, rec in zip(runs, recs):
        if rec["ok"]:
            assert run.rc == 0 and rec["action"] in ("updated", "up-to-date"), run.show()
        else:  # the other may only say the site is busy, in one line
            assert run.rc == FAILED, run.show()
            one_line_error(rec)
            assert busy(rec) or not loser_says_busy, rec
    also = fleetlib.OLD_REFS if g.spec.holds == "old" else ()
    assert_holds(w, g, [*fleetlib.MANIFEST_REFS, TOOLS], also=also)  # consistent, all run
    assert [n for n in staged_files(g) if not n.endswith(".part")] == [], staged_files(g)


def test_overlapping_runs_with_one_packer_home(world: World, up_to_date: Run) -> None:
    """Two timer runs at once (uploads slowed so that the first surely still works when
    the second starts): the second is refused by the packer's per-site lock, at once."""
    g = world.fleet["gw-02"]
    runs = overlap(world, g, [world.home, world.home], "--limit-rate", "400k")
    check_overlap(world, g, runs)
    loser = next(r.sites[g.name] for r in runs if not r.sites[g.name]["ok"])
    assert loser["exit_code"] == LOCKED and loser["attempts"] == 0, loser
    assert f"a sync of site {g.name} is already running on this packer" in loser["error"], loser


def test_overlapping_runs_from_two_packers_leave_the_device_consistent(world: World, up_to_date: Run) -> None:
    """Two operators' packers (separate homes: no shared packer lock). Whatever the loser
    says, the device ends holding whole, verified images and nothing staged."""
    g = world.fleet["gw-03"]
    check_overlap(world, g, overlap(world, g, [world.tmp / "home-a", world.tmp / "home-b"]),
                  loser_says_busy=False)


def test_overlapping_uploads_from_two_packers_the_loser_says_busy(world: World, up_to_date: Run) -> None:
    """As above, with uploads slowed so that they surely overlap on the device."""
    g = world.fleet["gw-05"]
    runs = overlap(world, g, [world.tmp / "home-c", world.tmp / "home-d"], "--limit-rate", "400k")
    check_overlap(world, g, runs)


def test_whole_file_stays_bounded(clock: Dict[str, float], up_to_date: Run) -> None:
    took = time.monotonic() - clock["start"]
    print(f"\ntest_sync_real so far: {took:.1f}s")
    assert took < WALL_BUDGET
