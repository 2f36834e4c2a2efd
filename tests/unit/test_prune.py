"""``edgebundle prune``: the policy (pure), the import history, and the runtime calls
through the real seams (``Ctr`` over a ``Runner``, ``DockerAPI`` over its dial), against
the daemon models of fake_runtimes.py and outputs recorded from containerd 1.6 and
dockerd 20.10 (tests/fixtures/runtime, ``record_prune.py``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, List, Sequence

import pytest

from edgebundle import history
from edgebundle.cache import BlobCache
from edgebundle.cli.main import main
from edgebundle.errors import LoadError, LockedError, UsageError
from edgebundle.history import Imported
from edgebundle.holdings import Inventory
from edgebundle.image import ResolvedImage
from edgebundle.importer.containerd import ContainerdRuntime, Ctr
from edgebundle.importer.docker import DockerAPI, DockerRuntime
from edgebundle.importer.podman import Podman
from edgebundle.importer.process import Completed
from edgebundle.importer.prune import (BUSY, GONE, PodmanImages, parse_containers_json, parse_containers_ls,
                                       parse_podman_containers, parse_podman_dangling, parse_untagged)
from edgebundle.pack import write_bundle
from edgebundle.plan import plan_bundle
from edgebundle.prune import IN_USE, KEPT, PREVIOUS, REMOVE, InUse, Present, plan_prune
from edgebundle.state import StateDir
from edgebundle.usecases.device import import_file, prune
from fake_runtimes import FakeContainerd, FakeEngine, fixture
from tiny_images import APP, BASE, EXTRA, TOOL, Images

D1, D2, D3, D9 = (f"sha256:{c * 64}" for c in "123a")
C1 = f"sha256:{'c' * 64}"


def entry(name: str, digest: str, seq: int) -> Imported:
    return Imported(name, digest, name, "2026-12-01T00:00:00Z", seq)


def verdicts(plan: Any) -> dict:
    return {d.name: d.verdict for d in plan.decisions}


# ---------------------------------------------------------------------------
# the policy (pure)


def test_only_images_edgebundle_imported_are_candidates() -> None:
    present = [Present("reg/shop/app:v1", D1), Present("reg/shop/app:v2", D2),
               Present("reg/other/thing:1", D3)]
    plan = plan_prune("containerd", present, [entry("reg/shop/app:v2", D2, 1)],
                      ["reg/shop/app:v2"])
    assert verdicts(plan) == {"reg/shop/app:v2": KEPT}  # v1 and thing were here before


def test_a_name_someone_pointed_elsewhere_is_not_ours() -> None:
    present = [Present("reg/shop/app:v1", D9), Present("reg/shop/app:v2", D2)]
    hist = [entry("reg/shop/app:v1", D1, 1), entry("reg/shop/app:v2", D2, 2)]
    assert verdicts(plan_prune("containerd", present, hist, ["reg/shop/app:v2"])) == \
        {"reg/shop/app:v2": KEPT}


def test_keep_previous_keeps_the_newest_others_by_import_order() -> None:
    # Names sort v1 < v10 < v2; import order is v10 (seq 1), v1 (2), v2 (3): previous is v1.
    present = [Present("reg/shop/app:v10", D3), Present("reg/shop/app:v1", D1),
               Present("reg/shop/app:v2", D2)]
    hist = [entry("reg/shop/app:v10", D3, 1), entry("reg/shop/app:v1", D1, 2),
            entry("reg/shop/app:v2", D2, 3)]
    assert verdicts(plan_prune("containerd", present, hist, ["reg/shop/app:v2"])) == \
        {"reg/shop/app:v10": REMOVE, "reg/shop/app:v1": REMOVE, "reg/shop/app:v2": KEPT}
    assert verdicts(plan_prune("containerd", present, hist, ["reg/shop/app:v2"], 1)) == \
        {"reg/shop/app:v10": REMOVE, "reg/shop/app:v1": PREVIOUS, "reg/shop/app:v2": KEPT}
    assert set(verdicts(plan_prune("containerd", present, hist, ["reg/shop/app:v2"], 5))
               .values()) == {KEPT, PREVIOUS}


def test_keep_previous_is_per_repository_of_a_kept_name() -> None:
    present = [Present("reg/shop/app:v1", D1), Present("reg/shop/app:v2", D2),
               Present("reg/shop/gone:v1", D3)]
    hist = [entry("reg/shop/app:v1", D1, 1), entry("reg/shop/gone:v1", D3, 2),
            entry("reg/shop/app:v2", D2, 3)]
    assert verdicts(plan_prune("containerd", present, hist, ["reg/shop/app:v2"], 1)) == \
        {"reg/shop/app:v1": PREVIOUS, "reg/shop/app:v2": KEPT, "reg/shop/gone:v1": REMOVE}


def test_the_cri_digest_name_of_a_kept_image_stays_and_of_an_old_one_goes() -> None:
    present = [Present("reg/shop/app:v1", D1), Present("reg/shop/app@" + D1, D1),
               Present("reg/shop/app:v2", D2), Present("reg/shop/app@" + D2, D2)]
    hist = [entry(p.name, p.digest, 1 if p.digest == D1 else 2) for p in present]
    assert verdicts(plan_prune("containerd", present, hist, ["reg/shop/app:v2"])) == {
        "reg/shop/app:v1": REMOVE, "reg/shop/app@" + D1: REMOVE,
        "reg/shop/app:v2": KEPT, "reg/shop/app@" + D2: KEPT}


def test_in_use_by_name_by_digest_and_every_name_of_that_image() -> None:
    present = [Present("reg/shop/app:v1", D1, C1), Present("reg/shop/app@" + D1, D1, C1),
               Present("reg/shop/app:v2", D2), Present("reg/shop/old:v1", D3)]
    hist = [entry(p.name, p.digest, 1) for p in present]
    keep = ["reg/shop/app:v2"]
    by_name = plan_prune("containerd", present, hist, keep, in_use=InUse(names=frozenset(
        {"reg/shop/app:v1"})))
    assert verdicts(by_name) == {"reg/shop/app:v1": IN_USE, "reg/shop/app@" + D1: IN_USE,
                                 "reg/shop/app:v2": KEPT, "reg/shop/old:v1": REMOVE}
    by_id = plan_prune("containerd", present, hist, keep,
                       in_use=InUse(names=frozenset({C1})))  # CRI's bare image ID
    assert verdicts(by_id) == verdicts(by_name)
    by_digest = plan_prune("docker", present, hist, keep, in_use=InUse(digests=frozenset({D3})))
    assert verdicts(by_digest)["reg/shop/old:v1"] == IN_USE
    kept_in_use = plan_prune("containerd", present, hist, keep,
                             in_use=InUse(names=frozenset({"reg/shop/app:v2"})))
    assert verdicts(kept_in_use)["reg/shop/app:v2"] == KEPT  # listed once, as kept


@pytest.mark.parametrize("by_id", ["docker", "podman"])
def test_names_compare_normalised_and_docker_by_its_tag(by_id: str) -> None:
    present = [Present("docker.io/library/busybox:1", D1), Present("docker.io/library/busybox:2", D2)]
    hist = [entry(p.name, p.digest, 1) for p in present]
    assert verdicts(plan_prune("containerd", present, hist, ["busybox:2"])) == \
        {"docker.io/library/busybox:1": REMOVE, "docker.io/library/busybox:2": KEPT}
    # a digest-pinned image is tagged repo:sha256-<hex> in Docker (naming.docker_tag)
    pinned = [Present(f"reg/shop/app:sha256-{'2' * 64}", C1), Present("reg/shop/app:v1", D1)]
    hist = [entry(p.name, p.digest, 1) for p in pinned]
    assert verdicts(plan_prune(by_id, pinned, hist, ["reg/shop/app@" + D2])) == \
        {f"reg/shop/app:sha256-{'2' * 64}": KEPT, "reg/shop/app:v1": REMOVE}


@pytest.mark.parametrize("by_id", ["docker", "podman"])
def test_untagged_docker_images_we_imported_are_candidates_under_their_id(by_id: str) -> None:
    # reg/shop/app:latest was D1, then a newer load took the tag (D2): D1 is untagged.
    present = [Present("reg/shop/app:latest", D2), Present("reg/other:1", D9)]
    hist = [entry("reg/shop/app:latest", D1, 1), entry("reg/shop/app:latest", D2, 2),
            entry("reg/gone:1", D3, 1)]
    untagged = [D1, D3, C1]  # C1: not ours
    plan = plan_prune(by_id, present, hist, ["reg/shop/app:latest"], untagged=untagged)
    assert verdicts(plan) == {"reg/shop/app:latest": KEPT, D1: REMOVE, D3: REMOVE}
    assert {d.name: d.was for d in plan.decisions}[D1] == "reg/shop/app:latest"
    kept = plan_prune(by_id, present, hist, ["reg/shop/app:latest"], 1, untagged=untagged)
    assert verdicts(kept) == {"reg/shop/app:latest": KEPT, D1: PREVIOUS, D3: REMOVE}
    busy = plan_prune(by_id, present, hist, ["reg/shop/app:latest"], untagged=untagged,
                      in_use=InUse(digests=frozenset({D1})))
    assert verdicts(busy)[D1] == IN_USE
    # containerd has no untagged images: a name moved on leaves its content to the GC
    assert D1 not in verdicts(plan_prune("containerd", present, hist, ["reg/shop/app:latest"],
                                         untagged=untagged))


class RecordedPodman:
    """podman's answers as recorded (podman 4.3, a private store): rc and stderr per call."""

    def __init__(self, answers: Any) -> None:
        self.answers = answers
        self.calls: List[List[str]] = []

    def run(self, argv: Sequence[str], timeout: float) -> Completed:
        self.calls.append(list(argv))
        rc, out, err = self.answers[tuple(argv[1:])]
        return Completed(rc, out.encode(), err.encode())


def test_podman_images_seam() -> None:
    hexid = "5184854b1d52417317eaab57d493b2bcc324453ccc15775d3c46a59f3c83577a"
    busy = (f"Error: image used by 99a7c5d69632: image is in use by a container: consider "
            "listing external containers and force-removing image\n")
    runner = RecordedPodman({
        ("ps", "-a", "--format", "json"): (0, json.dumps([{"Image": "localhost/t:v1", "ImageID": hexid}]), ""),
        ("images", "--filter", "dangling=true", "--format", "json"): (0, json.dumps([{"Id": hexid}]), ""),
        ("rmi", "localhost/t:v1"): (0, "Untagged: localhost/t:v1\n", ""),
        ("rmi", "localhost/t:v2"): (2, "", busy),
        ("rmi", "localhost/t:nope"): (1, "", "Error: localhost/t:nope: image not known\n"),
        ("rmi", hexid): (2, "", busy),
        ("rmi", "localhost/t:odd"): (125, "", "Error: database is locked\n"),
    })
    images = PodmanImages(Podman("podman", runner=runner))
    assert images.in_use() == InUse(names=frozenset({"localhost/t:v1"}), digests=frozenset({"sha256:" + hexid}))
    assert images.untagged() == frozenset({"sha256:" + hexid})
    done = images.remove(["localhost/t:v1", "localhost/t:v2", "localhost/t:nope", "sha256:" + hexid])
    assert [(r.name, r.outcome) for r in done] == [("localhost/t:v1", GONE), ("localhost/t:v2", BUSY),
                                                   ("localhost/t:nope", GONE), ("sha256:" + hexid, BUSY)]
    assert all("--force" not in c and "-f" not in c for c in runner.calls)
    with pytest.raises(LoadError) as err:
        images.remove(["localhost/t:odd"])
    assert err.value.message == "podman rmi localhost/t:odd failed (exit 125): Error: database is locked"
    assert parse_podman_containers(None) == InUse() and parse_podman_dangling(None) == frozenset()


def test_bad_input_is_refused() -> None:
    present = [Present("reg/shop/app:v1", D1)]
    with pytest.raises(UsageError, match="at least one --keep"):
        prune_nothing([])
    with pytest.raises(UsageError, match="invalid image reference"):
        prune_nothing(["Not A Name"])
    with pytest.raises(UsageError, match="negative"):
        plan_prune("containerd", present, [], ["reg/shop/app:v1"], -1)


def prune_nothing(keep: Sequence[str]) -> None:
    from edgebundle.prune import check_keep
    check_keep(keep)


# ---------------------------------------------------------------------------
# the history


def test_history_records_in_import_order_per_name_and_digest(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "s")
    history.record(state, "docker", "docker:unix:///a", [("r/a:1", D1, "r/a:1")], "t1", "b1")
    history.record(state, "docker", "docker:unix:///a", [("r/a:2", D2, "r/a:2")], "t2", "b2")
    history.record(state, "docker", "docker:unix:///a", [("r/a:2", D2, "r/a:2"),
                                                         ("r/a:1", D3, "r/a:1")], "t3", "b3")
    history.record(state, "docker", "docker:unix:///b", [("r/b:1", D1, "r/b:1")], "t4", "b4")
    h = history.load(state, "docker", "docker:unix:///a")
    assert h.seq == 3
    # r/a:2 again: one entry, the newer; r/a:1 moved to D3: the D1 image may linger untagged
    assert sorted((e.name, e.digest, e.seq, e.bundle) for e in h.images) == \
        [("r/a:1", D1, 1, "b1"), ("r/a:1", D3, 3, "b3"), ("r/a:2", D2, 3, "b3")]
    assert [e.name for e in history.load(state, "docker", "docker:unix:///b").images] == ["r/b:1"]


def test_history_unreadable_is_empty_and_bounded(tmp_path: Path, monkeypatch: Any) -> None:
    state = StateDir(tmp_path / "s")
    target = "containerd:/x.sock#default"
    path = state.ensure() / history.record_name("containerd", target)
    path.parent.mkdir()
    path.write_text("{not json")
    assert history.load(state, "containerd", target).images == ()
    path.write_text(json.dumps({"version": 1, "target": "containerd:/other.sock#default",
                                "images": [entry("r/a:1", D1, 1).to_json()]}))
    assert history.load(state, "containerd", target).images == ()  # another target's
    monkeypatch.setattr(history, "MAX_ENTRIES", 3)
    for i in range(5):
        history.record(state, "containerd", target, [(f"r/a:{i}", D1, f"r/a:{i}")], "t", "b")
    assert [e.name for e in history.load(state, "containerd", target).images] == \
        ["r/a:2", "r/a:3", "r/a:4"]


def test_parsers_read_the_recorded_outputs() -> None:
    dangling = parse_untagged(json.loads(fixture("docker_get_images_json_all_dangling.body")))
    assert "sha256:bf6e9578da872be827a5eaab099f25a964fce9838442aab32f3cea720def8cfa" in dangling
    assert len(dangling) == 1
    assert parse_containers_ls(fixture("ctr_containers_ls.stdout")) == {"shop/app:v1"}
    assert parse_containers_ls(fixture("ctr_containers_ls_empty.stdout")) == set()
    used = parse_containers_json(json.loads(fixture("docker_get_containers_json_all.body")))
    assert used.digests == {"sha256:c68710cda60bec055286d5c3e600a7e52407f9ad18a4375cb8d380bf4c169211"}
    assert used.names == {"shop/app:v1"}
    assert parse_containers_json(json.loads(fixture("docker_get_containers_json_all_empty.body"))) \
        == InUse()


# ---------------------------------------------------------------------------
# import -> prune through the real runtimes, over modelled daemons


class Site:
    def __init__(self, kind: str, tmp: Path, namespace: str = "k8s.io") -> None:
        self.kind = kind
        self.state = StateDir(tmp / "state")
        self.tmp = tmp
        self.cache = BlobCache(tmp / "cache")
        self.images = Images(self.cache)
        self.namespace = namespace if kind == "containerd" else None
        if kind == "containerd":
            self.ctr = FakeContainerd(namespace)
            sock = tmp / "containerd.sock"
            sock.touch()
            self.runtime: Any = ContainerdRuntime(Ctr(str(sock), namespace, runner=self.ctr),
                                                  self.state)
        else:
            self.engine = FakeEngine()
            self.runtime = DockerRuntime(DockerAPI("unix:///nowhere/docker.sock",
                                                   dial=self.engine.dial))

    def ship(self, *images: ResolvedImage) -> Any:
        plan = plan_bundle("gw-01", list(images), Inventory.empty(self.kind, self.namespace),
                           runtime=self.kind, namespace=self.namespace, platform="linux/amd64")
        out = self.tmp / f"b{len(os.listdir(self.tmp))}.ebundle"
        with open(out, "wb") as fh:
            write_bundle(plan, self.cache, fh, level=3)
        return import_file(str(out), self.runtime, state=self.state)

    def names(self) -> set:
        if self.kind == "containerd":
            return self.ctr.real_names()
        return {t for img in self.engine.images.values() for t in img.tags}

    def report_names(self, result: Any) -> set:
        return {i["name"] for i in result.to_json(None)["report"]["images"]}

    def prune(self, keep: List[str], **kw: Any) -> Any:
        return prune(self.runtime, keep, state=self.state, **kw)


V1, V2 = "example.test/shop/app:v1", "example.test/shop/app:v2"


def removals(ctr: FakeContainerd) -> List[List[str]]:
    """``ctr images rm`` calls of real names (an import removes its temporary ones)."""
    return [c for c in ctr.calls if c[:2] == ["images", "rm"]
            and not any(a.startswith("import.edgebundle.invalid/") for a in c)]


@pytest.fixture(params=["containerd", "docker"])
def site(request: Any, tmp_path: Path) -> Site:
    return Site(request.param, tmp_path)


def two_versions(site: Site) -> List[ResolvedImage]:
    v1 = site.images.image(V1, [BASE, APP])
    v2 = site.images.image(V2, [BASE, APP, EXTRA])
    site.ship(v1)
    site.ship(v2)
    return [v1, v2]


def test_prune_removes_the_old_version_and_the_report_says_so(site: Site) -> None:
    v1, v2 = two_versions(site)
    if site.kind == "containerd":  # k8s.io: the CRI digest names were set and recorded too
        assert {V1, V2, f"example.test/shop/app@{v1.top.digest}"} <= site.names()
    result = site.prune([V2])
    gone = site.names()
    assert V1 not in gone and V2 in gone
    assert V1 not in site.report_names(result) and V2 in site.report_names(result)
    assert result.removed and {d.name for d in result.removed} >= {V1}
    if site.kind == "containerd":
        alias = f"example.test/shop/app@{v1.top.digest}"
        assert {d.name for d in result.removed} == {V1, alias} and alias not in gone
        assert f"example.test/shop/app@{v2.top.digest}" in gone
        rm = removals(site.ctr)
        assert rm == [["images", "rm", "--sync", V1, alias]]  # one call, waits for the GC
    else:
        deletes = [r for r in site.engine.requests if r.method == "DELETE"]
        assert [r.path for r in deletes] == [f"/images/{V1}"]  # by name, never ?force
    # the history forgets what is gone: a second prune has nothing to do
    target = site.prune([V2], dry_run=True).target
    recorded = history.load(site.state, site.kind, target).images
    assert V1 not in {e.name for e in recorded} and V2 in {e.name for e in recorded}
    again = site.prune([V2])
    assert again.removed == [] and [d.name for d in again.kept] == sorted(
        n for n in site.names() if n.startswith("example.test/"))


def test_keep_previous_one_keeps_v1(site: Site) -> None:
    two_versions(site)
    result = site.prune([V2], keep_previous=1)
    assert {V1, V2} <= site.names() and result.removed == []
    assert V1 in [d.name for d in result.kept if d.verdict == PREVIOUS]


def test_an_image_a_container_uses_is_kept_and_reported_in_use(site: Site) -> None:
    v1, _ = two_versions(site)
    if site.kind == "containerd":
        site.ctr.containers["c1"] = V1  # stopped or running: ctr lists both
    else:
        site.engine.containers.append(("f" * 64, V1, v1.config.digest))
    result = site.prune([V2])
    assert V1 in site.names() and V1 in [d.name for d in result.in_use] and result.removed == []
    assert V1 in site.report_names(result)
    if site.kind == "docker":  # decided before asking: dockerd's own 409 is the last resort
        assert not [r for r in site.engine.requests if r.method == "DELETE"]
    else:
        assert not removals(site.ctr)  # containerd would remove it (recorded): we must not ask


def test_images_not_imported_by_edgebundle_are_never_touched(site: Site) -> None:
    other = site.images.image("example.test/shop/app:local", [BASE, TOOL])
    site.ship(other)
    # as if it had been there before any history: forget what that import recorded
    for path in (site.state.path / "imported").iterdir():
        path.unlink()
    two_versions(site)
    site.prune([V2])
    assert "example.test/shop/app:local" in site.names() and V1 not in site.names()


def test_dry_run_removes_nothing(site: Site) -> None:
    two_versions(site)
    before = set(site.names())
    result = site.prune([V2], dry_run=True)
    assert site.names() == before and [d.name for d in result.removed][:1] == [V1]
    if site.kind == "containerd":
        assert not removals(site.ctr)
    else:
        assert not [r for r in site.engine.requests if r.method == "DELETE"]
    assert site.prune([V2]).removed  # and the history still knows it


def test_docker_image_a_newer_load_untagged_goes_by_its_id(tmp_path: Path) -> None:
    site = Site("docker", tmp_path)
    latest = "example.test/shop/app:latest"
    old = site.images.image(latest, [BASE, APP])
    site.ship(old)
    site.ship(site.images.image(latest, [BASE, APP, EXTRA]))
    assert site.engine.images[old.config.digest].tags == []  # dangling, still on disk
    kept = site.prune([latest], keep_previous=1)
    assert [(d.name, d.was) for d in kept.kept if d.verdict == PREVIOUS] == \
        [(old.config.digest, latest)]
    site.engine.containers.append(("d" * 64, old.config.digest, old.config.digest))
    assert [d.name for d in site.prune([latest]).in_use] == [old.config.digest]
    assert not [r for r in site.engine.requests if r.method == "DELETE"]
    site.engine.containers.clear()
    result = site.prune([latest])
    assert [d.name for d in result.removed] == [old.config.digest]
    assert old.config.digest not in site.engine.images and latest in site.names()
    assert [r.path for r in site.engine.requests if r.method == "DELETE"] == \
        [f"/images/{old.config.digest}"]
    assert site.prune([latest]).removed == []  # and the history forgot it


def test_docker_container_created_meanwhile_is_in_use_not_a_failure(tmp_path: Path) -> None:
    site = Site("docker", tmp_path)
    v1, _ = two_versions(site)
    site.engine.before_delete = lambda e: e.containers.append(("e" * 64, V1, v1.config.digest))
    result = site.prune([V2])
    assert [d.name for d in result.in_use] == [V1] and result.removed == [] and not result.failed
    assert V1 in site.names()


def test_prune_never_runs_beside_an_import(site: Site) -> None:
    two_versions(site)
    with site.state.lock():  # an import holds the device lock
        with pytest.raises(LockedError, match="an import is already running"):
            site.prune([V2])
    assert V1 in site.names()
    with site.state.lock(what="a prune"):
        with pytest.raises(LockedError, match="a prune is already running"):
            site.ship(site.images.image("example.test/shop/app:v3", [BASE, TOOL]))


# ---------------------------------------------------------------------------
# the command line


def test_cli_refuses_without_keep_and_prints_json(tmp_path: Path, capsys: Any,
                                                  monkeypatch: Any) -> None:
    sock = tmp_path / "containerd.sock"
    sock.touch()
    rc = main(["prune", "--runtime", "containerd", "--address", str(sock),
               "--state-dir", str(tmp_path / "s")])
    assert rc == 2 and "at least one --keep" in capsys.readouterr().err
    rc = main(["prune", "--runtime", "docker", "--keep", "x:1", "--keep-previous", "-1",
               "--state-dir", str(tmp_path / "s")])
    assert rc == 2 and "negative" in capsys.readouterr().err

    site = Site("docker", tmp_path)
    two_versions(site)
    import edgebundle.cli.device as device
    monkeypatch.setattr(device, "_runtime", lambda args: site.runtime)
    capsys.readouterr()
    rc = main(["prune", "--runtime", "docker", "--keep", V2, "--state-dir", str(site.state.path),
               "--json", "--site", "line-3", "-o", str(tmp_path / "report.json")])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["removed"] == [V1] and out["kept"] == [V2] and out["in_use"] == []
    assert out["report"]["site"] == "line-3"
    assert [i["name"] for i in out["report"]["images"]] == [V2]
    assert json.loads((tmp_path / "report.json").read_text())["images"] == out["report"]["images"]
