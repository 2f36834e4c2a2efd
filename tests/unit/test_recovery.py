"""Cleanup after interrupted imports (recovery), through the ctr seam (FakeContainerd as the Runner).

The recovery (``ctrsurvival.recover``), the journal and the loader's lease bookkeeping
run unchanged; only containerd is modelled. The real kills are in
tests/integration/test_survival.py.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

import pytest

from edgebundle.cache import BlobCache
from edgebundle.errors import LoadError, LockedError, RuntimeUnavailableError
from edgebundle.format import read_index
from edgebundle.importer import import_bundle
from edgebundle.importer.containerd import TEMP_PREFIX, Completed, ContainerdRuntime, Ctr
from edgebundle.importer.docker import DockerAPI, DockerLoader, DockerRuntime
from edgebundle.importer.journal import (PHASE_PUBLISHING, PHASE_STREAMING, Journal, ProcessId,
                                         Rename, parse_journal, process_start, this_process)
from edgebundle.state import StateDir
from edgebundle.usecases.device import import_file, take_report
from fake_runtimes import FakeContainerd
from test_loaders import _seeded
from test_pack_import import make_plan, pack
from tiny_images import APP, BASE, TOOL, Images


@pytest.fixture
def built(tmp_path: Path) -> Images:
    return Images(BlobCache(tmp_path / "cache"))


def runtime(model: FakeContainerd, tmp: Path) -> ContainerdRuntime:
    tmp.mkdir(parents=True, exist_ok=True)
    sock = tmp / "containerd.sock"
    sock.touch()
    return ContainerdRuntime(Ctr(str(sock), model.namespace, runner=model), StateDir(tmp / "state"))


def journal_of(rt: ContainerdRuntime, **kw: Any) -> Journal:
    base = dict(runtime="containerd", target=f"{rt.ctr.address}#{rt.ctr.namespace}", nonce="n0")
    base.update(kw)
    return Journal(**base)  # type: ignore[arg-type]


FOREIGN = "111-cri"  # another client's lease: a CRI pull, say


def test_recover_rolls_a_half_published_set_forward(tmp_path: Path) -> None:
    model = _seeded(tmp_path)
    top = model.images.pop("example.test/app:v1")
    model.images[f"{TEMP_PREFIX}n0/0:pending"] = top
    model.images[f"{TEMP_PREFIX}n0/1:pending"] = top
    model.images["example.test/app:v1"] = top  # the first rename happened, the second not
    model.leases[FOREIGN] = ""
    rt = runtime(model, tmp_path)
    assert rt.journal is not None
    rt.journal.write(journal_of(rt, phase=PHASE_PUBLISHING, renames=(
        Rename(f"{TEMP_PREFIX}n0/0:pending", "example.test/app:v1", top[1], platform="linux/amd64"),
        Rename(f"{TEMP_PREFIX}n0/1:pending", "example.test/other:v1", top[1],
               alias="example.test/other@" + top[1], platform="linux/amd64"))))
    done = rt.recover(wait=0)
    assert done.published == ("example.test/other:v1", "example.test/other@" + top[1])
    assert set(model.images) == {"example.test/app:v1", "example.test/other:v1",
                                 "example.test/other@" + top[1]}
    assert rt.journal.read() is None and model.collections == 1
    assert FOREIGN in model.leases  # never another client's


def test_recover_never_names_an_incomplete_image(tmp_path: Path) -> None:
    model = _seeded(tmp_path)
    top = model.images.pop("example.test/app:v1")
    model.images[f"{TEMP_PREFIX}n0/0:pending"] = top
    model.snapshots.discard(model.seeded["chains"][-1])  # its unpack did not finish
    rt = runtime(model, tmp_path)
    assert rt.journal is not None
    rt.journal.write(journal_of(rt, phase=PHASE_PUBLISHING, renames=(
        Rename(f"{TEMP_PREFIX}n0/0:pending", "example.test/app:v1", top[1]),)))
    done = rt.recover(wait=0)
    assert done.published == () and model.images == {}


def test_recover_in_streaming_phase_removes_temps_and_only_our_lease(tmp_path: Path) -> None:
    model = _seeded(tmp_path)
    model.images[f"{TEMP_PREFIX}n0/0:pending"] = model.images["example.test/app:v1"]
    model.images[f"{TEMP_PREFIX}old/3:snapshots"] = model.images["example.test/app:v1"]  # no journal
    model.leases.update({"222-ours": "", FOREIGN: ""})
    rt = runtime(model, tmp_path)
    assert rt.journal is not None
    rt.journal.write(journal_of(rt, leases=("222-ours",)))
    (tmp_path / "state" / ".import.lock.x1.tmp").write_text("")  # an interrupted atomic write
    done = rt.recover(wait=0)
    assert done.removed == (f"{TEMP_PREFIX}n0/0:pending", f"{TEMP_PREFIX}old/3:snapshots")
    assert set(model.images) == {"example.test/app:v1"}
    assert set(model.leases) == {FOREIGN} and done.leases == ("222-ours",)
    assert model.collections == 1  # images rm --sync: ingests collected now
    assert rt.journal.read() is None
    assert not (tmp_path / "state" / ".import.lock.x1.tmp").exists()


def test_recover_with_nothing_to_do_runs_one_ctr_call(tmp_path: Path) -> None:
    model = _seeded(tmp_path)
    rt = runtime(model, tmp_path)
    rt.recover(wait=0)
    assert model.calls == [["images", "ls"]]


def test_recover_waits_for_the_ctr_of_a_killed_import(tmp_path: Path) -> None:
    model = _seeded(tmp_path)
    model.images[f"{TEMP_PREFIX}n0/0:pending"] = model.images["example.test/app:v1"]
    rt = runtime(model, tmp_path)
    assert rt.journal is not None
    # "ctr" is this very process: alive, with its real start time.
    rt.journal.write(journal_of(rt, process=this_process(os.getpid())))
    assert rt.recover(wait=0).skipped  # report: not now, and nothing touched
    assert f"{TEMP_PREFIX}n0/0:pending" in model.images
    with pytest.raises(LockedError, match="still running"):
        rt.recover(wait=0.2)
    # a reused pid (other start time) is not it
    rt.journal.write(journal_of(rt, process=ProcessId(os.getpid(), "1")))
    assert rt.recover(wait=0).removed == (f"{TEMP_PREFIX}n0/0:pending",)


def test_journal_round_trip_and_junk(tmp_path: Path) -> None:
    j = Journal("containerd", "a#b", "n", PHASE_PUBLISHING, ProcessId(5, "77"), ("l",),
                (Rename("t", "n", "sha256:x", "a", "linux/amd64"),))
    assert parse_journal(j.to_json()) == j
    for junk in (None, [], {"version": 2}, {"version": 1, "phase": "x"}, {"version": 1}):
        assert parse_journal(junk) is None
    assert process_start(os.getpid()) != "" and process_start(2 ** 22 + 7) == ""


# --- the loader's side: journal before the runtime holds anything, lease identified ----


def _bundle(tmp_path: Path, built: Images, *names: str) -> Path:
    images = [built.image(n, [BASE, APP if i == 0 else TOOL]) for i, n in enumerate(names)]
    out = tmp_path / "b.ebundle"
    pack(make_plan(images, "containerd"), built.cache, out)
    return out


def _import(out: Path, rt: ContainerdRuntime) -> Any:
    with open(out, "rb") as fh:
        return import_bundle(fh, out.name, rt)


def test_journal_is_written_before_index_json_and_before_the_first_rename(
        tmp_path: Path, built: Images) -> None:
    out = _bundle(tmp_path, built, "example.test/shop/app:v1", "example.test/shop/tool:v1")
    model = FakeContainerd("k8s.io")
    rt = runtime(model, tmp_path)
    assert rt.journal is not None
    seen: List[Optional[Journal]] = []
    model.after_import = lambda m: seen.append(rt.journal.read())  # type: ignore[union-attr]
    real = model.run

    def run(argv: Sequence[str], input: Optional[bytes], timeout: float) -> Completed:
        if "tag" in argv:
            seen.append(rt.journal.read())  # type: ignore[union-attr]
        return real(argv, input, timeout)

    model.run = run  # type: ignore[method-assign]
    _import(out, rt)
    at_index, at_tag = seen[0], seen[1]
    assert at_index is not None and at_index.phase == PHASE_STREAMING
    assert at_index.leases == ("1000-fake",)  # ctr's lease, identified before any image
    assert at_tag is not None and at_tag.phase == PHASE_PUBLISHING
    assert {r.name for r in at_tag.renames} == {"example.test/shop/app:v1", "example.test/shop/tool:v1"}
    assert rt.journal.read() is None  # done: cleared


def test_ambiguous_new_lease_resolved_at_the_end_of_the_stream(tmp_path: Path, built: Images) -> None:
    out = _bundle(tmp_path, built, "example.test/shop/app:v1")
    model = FakeContainerd("k8s.io")
    model.import_killed_after = 2000  # ctr is killed: only our journal can clean its lease

    def cri_pull(m: FakeContainerd) -> None:
        m.leases[FOREIGN] = ""  # a pull starting in the same instant

    model.on_import_start = cri_pull
    rt = runtime(model, tmp_path)
    with pytest.raises(LoadError, match="stopped reading"):
        _import(out, rt)
    # two new leases at the first read: ambiguous, so ctr's was never recorded, and the
    # foreign one survives untouched (ours expires by itself).
    assert FOREIGN in model.leases and "1000-fake" in model.leases


def test_killed_ctr_lease_is_deleted_by_the_same_run(tmp_path: Path, built: Images) -> None:
    out = _bundle(tmp_path, built, "example.test/shop/app:v1")
    model = FakeContainerd("k8s.io")
    model.import_killed_after = 2000
    model.leases[FOREIGN] = ""  # existed before: never a candidate
    rt = runtime(model, tmp_path)
    with pytest.raises(LoadError, match="stopped reading"):
        _import(out, rt)
    assert set(model.leases) == {FOREIGN} and model.collections == 1
    assert rt.journal is not None and rt.journal.read() is None


def test_refused_import_ends_ctr_gracefully_and_collects(tmp_path: Path, built: Images) -> None:
    out = _bundle(tmp_path, built, "example.test/shop/app:v1")
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 1
    out.write_bytes(bytes(data))
    model = FakeContainerd("k8s.io")
    rt = runtime(model, tmp_path)
    with pytest.raises(Exception):
        _import(out, rt)
    assert [i.returncode for i in model.imports] == [1]  # not killed: done() ran
    assert model.leases == {} and model.collections == 1 and model.images == {}
    assert model.imports[0].index is None  # index.json never sent


def test_loader_refuses_the_temporary_prefix_as_a_name(tmp_path: Path, built: Images) -> None:
    """Defence in depth: even a record the format let through never gets that name."""
    out = _bundle(tmp_path, built, "example.test/shop/app:v1")
    (rec,) = read_index(out).index.images
    model = FakeContainerd("k8s.io")
    rt = runtime(model, tmp_path)
    loader = rt.loader(rt.inventory(), "linux/amd64")
    with pytest.raises(LoadError, match="reserved temporary prefix"):
        loader.commit([dataclasses.replace(rec, name=f"{TEMP_PREFIX}x/app:v1")])
    loader.abort()
    assert model.images == {} and model.imports == []


def test_ctr_killed_at_the_end_of_the_stream_is_cleaned_and_collected(
        tmp_path: Path, built: Images) -> None:
    """The failure shows only when index.json is written (after the entries): the same
    cleanup, and a collection, or the partial ingests linger and count as present."""
    out = _bundle(tmp_path, built, "example.test/shop/app:v1")
    clean = FakeContainerd("k8s.io")
    _import(out, runtime(clean, tmp_path / "a"))
    model = FakeContainerd("k8s.io")
    model.import_killed_after = clean.stdin_sizes[0] - 600  # inside the index.json member
    rt = runtime(model, tmp_path / "b")
    with pytest.raises(LoadError, match="stopped reading"):
        _import(out, rt)
    assert model.leases == {} and model.collections == 1 and model.images == {}
    assert rt.journal is not None and rt.journal.read() is None


def test_ambiguity_is_resolved_when_only_ours_survives(tmp_path: Path, built: Images) -> None:
    """Two new leases at the first read; by the end of the stream the other client's is
    gone (its pull finished), so the one left is ctr's: recorded before index.json."""
    out = _bundle(tmp_path, built, "example.test/shop/app:v1")
    model = FakeContainerd("k8s.io")
    model.on_import_start = lambda m: m.leases.__setitem__(FOREIGN, "")
    rt = runtime(model, tmp_path)
    assert rt.journal is not None
    lists = []
    real = model.run

    def run(argv: Sequence[str], input: Optional[bytes], timeout: float) -> Completed:
        if list(argv)[-2:] == ["leases", "ls"]:
            lists.append(1)
            if len(lists) == 3:  # the confirmation at the end of the stream
                model.leases.pop(FOREIGN, None)
        return real(argv, input, timeout)

    model.run = run  # type: ignore[method-assign]
    seen: List[Optional[Journal]] = []
    model.after_import = lambda m: seen.append(rt.journal.read())  # type: ignore[union-attr]
    _import(out, rt)
    assert len(lists) == 3 and seen[0] is not None and seen[0].leases == ("1000-fake",)


# --- losing the runtime: a broken pipe is named, not swallowed ------------------------


SCRIPT = """
import sys
from edgebundle.cli import main as m
def boom(args):
    if {stdout_first}:
        sys.stdout.write("x" * 200000); sys.stdout.flush()
    raise BrokenPipeError(32, "Broken pipe")
m.dispatch = boom
sys.exit(m.main(["report", "--runtime", "docker"]))
"""


def _run_script(stdout_first: bool, close_reader: bool) -> "subprocess.CompletedProcess[bytes]":
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(stdout_first=stdout_first)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    if close_reader:
        proc.stdout.close()  # `edgebundle ... | head`: the reader went away
        err = proc.stderr.read()
        proc.wait(timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, b"", err)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_broken_pipe_elsewhere_is_one_line_not_silence() -> None:
    res = _run_script(stdout_first=False, close_reader=False)
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("edgebundle: error: a pipe closed under us")


def test_broken_pipe_on_our_stdout_stays_quiet() -> None:
    res = _run_script(stdout_first=True, close_reader=True)
    assert res.returncode == 1
    assert b"edgebundle: error" not in res.stderr


def test_docker_daemon_hanging_up_before_the_load_is_named() -> None:
    def dial() -> socket.socket:
        ours, theirs = socket.socketpair()
        theirs.close()  # the daemon went away after accepting
        return ours

    loader = DockerLoader(DockerRuntime(DockerAPI("unix:///x/docker.sock", dial=dial)))
    with pytest.raises(RuntimeUnavailableError, match="docker daemon at unix:///x/docker.sock hung up"):
        loader.add("sha256:" + "a" * 64, 3, iter([b"abc"]))


def test_report_cleans_up_only_when_no_import_holds_the_lock(tmp_path: Path) -> None:
    model = _seeded(tmp_path)
    temp = f"{TEMP_PREFIX}n0/0:pending"
    model.images[temp] = model.images["example.test/app:v1"]
    rt = runtime(model, tmp_path)
    state = StateDir(tmp_path / "state")
    with state.lock():  # an import runs (its ctr already done: only the lock says so)
        inv = take_report(rt, state=state)
        assert temp in model.images  # not touched under a running import
    assert [i.name for i in inv.images] == ["example.test/app:v1"]  # never reported
    take_report(rt, state=state)
    assert temp not in model.images


def test_second_import_is_refused_while_the_lock_is_held(tmp_path: Path, built: Images) -> None:
    out = _bundle(tmp_path, built, "example.test/shop/app:v1")
    model = FakeContainerd("k8s.io")
    rt = runtime(model, tmp_path)
    state = StateDir(tmp_path / "state")
    with state.lock():
        with pytest.raises(LockedError, match=f"already running on this device \\(pid {os.getpid()}"):
            import_file(str(out), rt, state=state)
    assert model.imports == []
    import_file(str(out), rt, state=state)
    assert "example.test/shop/app:v1" in model.real_names()


def test_unreferenced_blobs_are_sent_again(tmp_path: Path, built: Images) -> None:
    """What an interrupted import committed is in the store but named by no image: the
    next garbage collection may take it mid-import, so it does not count as present."""
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    out = tmp_path / "b.ebundle"
    pack(make_plan([a], "containerd"), built.cache, out)
    model = FakeContainerd("k8s.io")
    layer = a.layers[1].digest
    model.content[layer] = built.cache.read_bytes(layer)
    _import(out, runtime(model, tmp_path))
    assert "blobs/sha256/" + layer[7:] in model.imports[0].members


def test_recover_collects_even_without_temporary_images(tmp_path: Path) -> None:
    """Killed mid-stream: no images, but ctr's blobs and ingests; collected now, so the
    rerun does not see them as present (and the journalled lease is gone)."""
    model = _seeded(tmp_path)
    model.leases["333-ours"] = ""
    rt = runtime(model, tmp_path)
    assert rt.journal is not None
    rt.journal.write(journal_of(rt, leases=("333-ours",)))
    rt.recover(wait=0)
    assert model.leases == {} and model.collections == 1 and rt.journal.read() is None
