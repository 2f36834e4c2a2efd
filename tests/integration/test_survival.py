"""Kill -9 at many points of a real import, then: only complete images, a clean rerun.

Real seams only, no hooks in edgebundle:

- the importer runs as ``python -m edgebundle import -`` fed through a pipe the test
  controls: it is killed once it has *read* N bytes (the pipe is empty, FIONREAD);
- phases after the stream: ``--ctr`` is a wrapper script (the ctr command line is
  configurable) that kills the importer, or containerd, at its k-th ctr call (before
  or after running the real ctr); ctr itself is killed by pid;
- Docker: ``--host`` is a small unix-socket proxy that kills the importer at a chosen
  request, or after N bytes of the load body.

After each kill: every real name in the runtime is at its expected digest (names are
published only after the completeness check) and one of them runs; then ``report`` or a
rerun ``import`` cleans up, the rerun succeeds, the images run, and nothing temporary is
left: no temporary names, leases, ingests, ``extract-*`` snapshots or journal.

Images: three of ~1.5 MiB each (imagefactory), in a private containerd (so it can be
killed and restarted) and the session dockerd. Budget: well under 4 minutes on 2 cores.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest

import imagefactory
import services
from policy import unavailable

ROOT = Path(__file__).resolve().parents[2]
TEMP_PREFIX = "import.edgebundle.invalid/"
KILLS: Dict[str, int] = {"containerd": 0, "docker": 0}  # kill points exercised, per runtime

WRAPPER = r'''#!/usr/bin/env python3
"""ctr, except that on its k-th call it kills the importer (or containerd)."""
import fcntl, os, signal, subprocess, sys
env = os.environ
real = env["EBSURV_REAL_CTR"]
argv = [real] + sys.argv[1:]
with open(env["EBSURV_COUNTER"], "a+") as fh:
    fcntl.flock(fh, fcntl.LOCK_EX)
    fh.seek(0)
    n = len(fh.read().splitlines()) + 1
    i = argv.index("--namespace")
    fh.write(" ".join(argv[i + 2:]).replace("\n", " ") + "\n")
at = int(env.get("EBSURV_KILL_AT", "0"))
if n != at:
    os.execv(real, argv)
victim = int(env["EBSURV_CONTAINERD_PID"]) if env.get("EBSURV_WHO") == "containerd" else os.getppid()
if env.get("EBSURV_WHEN") == "after":
    rc = subprocess.call(argv)
    os.kill(victim, signal.SIGKILL)
    sys.exit(rc)
os.kill(victim, signal.SIGKILL)
if env.get("EBSURV_WHO") == "containerd":
    os.execv(real, argv)  # ctr now meets a dead containerd
sys.exit(1)
'''


# --------------------------------------------------------------------------- fixtures


@dataclass
class Image:
    ref: str  # registry/repo:tag
    digest: str  # manifest digest
    config: str
    message: str


@dataclass
class World:
    tmp: Path
    registry: Any
    images: List[Image]
    cd_bundle: Path
    dk_bundle: Path
    wrapper: Path
    cd: Any = None  # services.Containerd, restarted in place
    cd_dir: Optional[Path] = None
    counter: int = 0

    def restart_containerd(self) -> None:
        """containerd after a crash: same root and state, a new process."""
        if self.cd is not None and self.cd._proc.poll() is None:
            self.cd._proc.kill()
        if self.cd is not None:
            self.cd._proc.wait()
        assert self.cd_dir is not None
        self.cd = services.start_containerd(self.cd_dir)


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          registry: Any) -> Iterator[World]:
    if not imagefactory.BUSYBOX.exists():
        unavailable(request.config, "/bin/busybox missing (apt-get install busybox-static)")
    tmp = tmp_path_factory.mktemp("surv")
    images = []
    for repo, name, media in (("survival/app", "survapp", "docker"),
                              ("survival/worker", "survworker", "docker"),
                              ("survival/tools", "survtools", "oci")):
        built = imagefactory.build_app_image(name, "v1", media=media)
        imagefactory.push_image(registry.host, repo, "v1", built)
        images.append(Image(f"{registry.host}/{repo}:v1", built.manifest_digest,
                            built.config_digest, imagefactory.message_for(f"shop/{name}:v1")))
    refs = "\n".join(f"  - ref: {i.ref}" for i in images)
    (tmp / "m.yaml").write_text(f"""version: 1
registries:
  "{registry.host}": {{insecure: true}}
images:
{refs}
sites:
  cd: {{runtime: containerd, namespace: surv, platform: linux/amd64}}
  dk: {{runtime: docker, platform: linux/amd64}}
""")
    for site in ("cd", "dk"):
        subprocess.run(eb("--home", str(tmp / "home"), "pack", str(tmp / "m.yaml"), "--site", site,
                          "-o", str(tmp / f"{site}.ebundle"), "--no-progress"),
                       check=True, env=env(), capture_output=True, timeout=300)
    wrapper = tmp / "ctrwrap.py"
    wrapper.write_text(WRAPPER)
    w = World(tmp, registry, images, tmp / "cd.ebundle", tmp / "dk.ebundle", wrapper)
    cd_dir = tmp_path_factory.mktemp("cdk")
    try:
        w.cd_dir, w.cd = cd_dir, services.start_containerd(cd_dir)
    except (services.ServiceError, OSError) as exc:
        unavailable(request.config, f"containerd could not start: {exc}")
    yield w
    w.cd.stop()
    print(f"\nkill points exercised: {KILLS}")


def eb(*args: str) -> List[str]:
    return [sys.executable, "-m", "edgebundle", *args]


def env(**extra: str) -> Dict[str, str]:
    return services.clean_env({"PYTHONPATH": str(ROOT), **extra})


# --------------------------------------------------------------------------- containerd


@dataclass
class Point:
    """One kill point; ``ns`` is a fresh containerd namespace, ``state`` a fresh state dir."""

    name: str
    ns: str
    state: Path
    cleanup_by: str  # "import" or "report": which command must clean up after it


def cd_args(w: World, p: Point, *, ctr: Optional[str] = None) -> List[str]:
    return ["--runtime", "containerd", "--address", w.cd.address, "--namespace", p.ns,
            "--snapshotter", w.cd.snapshotter, "--state-dir", str(p.state),
            *(["--ctr", ctr] if ctr else [])]


def ctr(w: World, ns: str, *args: str, check: bool = True) -> str:
    out = subprocess.run(w.cd.ctr_argv(ns) + list(args), capture_output=True, text=True,
                         env=w.cd.env(), timeout=120)
    assert out.returncode == 0 or not check, out.stderr
    return out.stdout


def ctr_images(w: World, ns: str) -> Dict[str, str]:
    rows = ctr(w, ns, "images", "ls").splitlines()[1:]
    return {r.split()[0]: r.split()[2] for r in rows if r.strip()}


def pending(fd: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


class Importer:
    """``edgebundle import -`` fed by the test through a pipe."""

    def __init__(self, args: List[str], extra_env: Optional[Dict[str, str]] = None) -> None:
        self.proc = subprocess.Popen(eb("import", "-", "--no-progress", *args), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env(**(extra_env or {})))
        self.ctr_seen: List[int] = []

    def feed(self, data: bytes, *, close: bool = False, drained: bool = True) -> None:
        """Write ``data``; wait until the importer has read all of it (or died)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            if close:
                self.proc.stdin.close()
                self.proc.stdin = None
        except BrokenPipeError:
            return
        deadline = time.monotonic() + 60
        while drained and not close and self.proc.poll() is None and self.proc.stdin is not None \
                and pending(self.proc.stdin.fileno()):
            assert time.monotonic() < deadline, "the importer stopped reading"
            time.sleep(0.002)

    def kill(self) -> bool:
        """SIGKILL; False if the import had already ended (then it was no kill point)."""
        self.ctr_seen = self.children("images import")
        self.proc.kill()
        self.finish()
        return self.proc.returncode == -signal.SIGKILL

    def finish(self, timeout: float = 120) -> Tuple[int, str]:
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.stdin = None
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err.decode()

    def children(self, needle: str) -> List[int]:
        """pids of our importer's children whose command line holds ``needle``."""
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid and needle in cmd:
                out.append(int(entry))
        return out


def check_after_kill(w: World, p: Point, run_index: int) -> None:
    """Right after a kill: every real name is at its expected digest, one of them runs."""
    expected = {i.ref: i for i in w.images}
    listed = ctr_images(w, p.ns)
    real = {n: d for n, d in listed.items() if not n.startswith(TEMP_PREFIX)}
    for name, digest in real.items():
        assert name in expected and digest == expected[name].digest, (p.name, name, digest)
    if real:
        name = sorted(real)[run_index % len(real)]
        assert run(w, p.ns, name, f"{p.ns}-k") == expected[name].message


def run(w: World, ns: str, name: str, cid: str) -> str:
    return ctr(w, ns, "run", "--rm", "--snapshotter", w.cd.snapshotter, name, cid)


EVENTS: Dict[str, List[str]] = {}


def event(p: Point, what: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S.%f")[:-3]
    EVENTS.setdefault(p.ns, []).append(f"{now} {what}")


def check_converges(w: World, p: Point, run_index: int) -> None:
    """report or a rerun cleans up; the rerun succeeds; images run; nothing temporary is left."""
    event(p, "converge: " + p.cleanup_by)
    if p.cleanup_by == "report":
        out = subprocess.run(eb("report", *cd_args(w, p), "--json"), capture_output=True, text=True,
                             env=env(), timeout=300)
        assert out.returncode == 0, out.stderr
        reported = {i["name"]: i for i in json.loads(out.stdout)["images"]}
        assert all(i["complete"] for i in reported.values()), (p.name, reported)
        assert not any(n.startswith(TEMP_PREFIX) for n in ctr_images(w, p.ns)), p.name
    event(p, "rerun")
    rerun = subprocess.run(eb("import", str(w.cd_bundle), *cd_args(w, p), "--json", "-v"),
                           capture_output=True, text=True, env=env(), timeout=300)
    event(p, "rerun done: " + " | ".join(rerun.stderr.strip().splitlines()[-12:]))
    assert rerun.returncode == 0, (p.name, rerun.stderr)
    listed = ctr_images(w, p.ns)
    assert listed == {i.ref: i.digest for i in w.images}, (p.name, listed)
    img = w.images[run_index % len(w.images)]
    assert run(w, p.ns, img.ref, f"{p.ns}-r") == img.message
    assert_nothing_temporary(w, p)


def assert_nothing_temporary(w: World, p: Point) -> None:
    leases = ctr(w, p.ns, "leases", "ls")
    if leases.splitlines()[1:]:
        # The lease's creation time against the point's events tells which client left
        # it (the killed import's ctr, its unpack, `ctr run`, the rerun): printed whole,
        # since pytest shortens a long assertion message.
        print(f"leftover lease at {p.name}:\n{leases}\n" + "\n".join(EVENTS.get(p.ns, [])))
    assert leases.splitlines()[1:] == [], (p.name, "leases")
    assert ctr(w, p.ns, "content", "active").splitlines()[1:] == [], (p.name, "ingests")
    snaps = ctr(w, p.ns, "snapshots", "--snapshotter", w.cd.snapshotter, "ls").splitlines()[1:]
    assert not [s for s in snaps if s.startswith("extract-")], (p.name, snaps)
    journal = p.state / "journal"
    assert not journal.exists() or os.listdir(journal) == [], (p.name, os.listdir(journal))
    ingest = w.cd.root / "io.containerd.content.v1.content" / "ingest"
    assert not ingest.exists() or os.listdir(ingest) == [], (p.name, "ingest dirs")


def new_point(w: World, name: str) -> Point:
    w.counter += 1
    return Point(name, f"surv-{w.counter}", w.tmp / f"state-{w.counter}",
                 "report" if w.counter % 2 else "import")


def record_calls(w: World) -> List[str]:
    """The ctr calls of one clean import (namespace ``surv-calls``), in order."""
    counter = w.tmp / "calls.log"
    p = Point("calls", "surv-calls", w.tmp / "state-calls", "import")
    wrap = f"{sys.executable} {w.wrapper}"
    out = subprocess.run(eb("import", str(w.cd_bundle), *cd_args(w, p, ctr=wrap)), capture_output=True,
                         text=True, env=env(EBSURV_REAL_CTR=w.cd.ctr, EBSURV_COUNTER=str(counter)),
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return counter.read_text().splitlines()


def timed_import(w: World, args: Callable[[Point], List[str]], bundle: Optional[Path] = None) -> float:
    """Seconds a clean import takes once its input has ended."""
    p = new_point(w, "timing")
    imp = Importer(args(p))
    imp.feed((bundle or w.cd_bundle).read_bytes())
    started = time.monotonic()
    code, err = imp.finish()
    assert code == 0, err
    return time.monotonic() - started


def test_containerd_kill_points(world: World) -> None:
    w = world
    data = w.cd_bundle.read_bytes()
    done = 0

    # 1. The importer killed once it has read N bytes of the bundle (during the entries),
    #    or a fraction of a clean import's time after the bundle ended (the commit, the
    #    unpack, the renames, the read back).
    took = timed_import(w, lambda p: cd_args(w, p))
    for frac, pause in ((0.03, 0), (0.2, 0), (0.45, 0), (0.7, 0), (0.93, 0), (0.999, 0),
                        (1.0, 0.0), (1.0, 0.3 * took), (1.0, 0.7 * took)):
        p = new_point(w, f"bytes {frac} +{pause:.2f}s")
        imp = Importer(cd_args(w, p))
        event(p, "importer started")
        imp.feed(data[:int(len(data) * frac)], close=frac == 1.0)
        event(p, "fed")
        time.sleep(pause)
        killed = imp.kill()
        event(p, f"importer killed ({killed}); ctr children then: {imp.ctr_seen}")
        if killed:
            done += 1
        check_after_kill(w, p, done)
        check_converges(w, p, done)

    # 2. By phase: the importer killed at its k-th ctr call, before or after it runs.
    calls = record_calls(w)
    wrap = f"{sys.executable} {w.wrapper}"

    def at(pattern: str, nth: int = 1) -> int:
        hits = [i + 1 for i, c in enumerate(calls) if c.startswith(pattern)]
        assert len(hits) >= nth, (pattern, calls)
        return hits[nth - 1]

    imp_call = at("images import")
    phases = [
        ("before ctr images import", imp_call, "before"),
        ("after ctr images import (commit done, nothing named)", imp_call, "after"),
        ("before the 1st rename", at("images tag"), "before"),
        ("after the 1st rename", at("images tag"), "after"),
        ("after the 2nd rename", at("images tag", 2), "after"),
        ("after the last rename", at("images tag", 3), "after"),
        ("after the temporary names were removed", at("images rm"), "after"),
        ("during the inventory read back", len(calls) - 2, "before"),
        ("on the last call (the report)", len(calls), "after"),
    ]
    for name, k, when in phases:
        p = new_point(w, name)
        counter = w.tmp / f"count-{p.ns}"
        out = subprocess.run(eb("import", str(w.cd_bundle), "--report", str(w.tmp / f"r-{p.ns}.json"),
                                *cd_args(w, p, ctr=wrap)), capture_output=True, text=True, timeout=300,
                             env=env(EBSURV_REAL_CTR=w.cd.ctr, EBSURV_COUNTER=str(counter),
                                     EBSURV_KILL_AT=str(k), EBSURV_WHEN=when))
        assert out.returncode == -9, (name, out.returncode, out.stderr)
        done += 1
        check_after_kill(w, p, done)
        check_converges(w, p, done)

    # 3. ctr itself killed mid-stream: a one-line error; its lease (identified) and
    #    ingests are gone by the end of that same run.
    for frac in (0.3, 0.8):
        p = new_point(w, f"ctr killed at {frac}")
        imp = Importer(cd_args(w, p))
        imp.feed(data[:int(len(data) * frac)])
        (pid,) = imp.children("images import")
        os.kill(pid, signal.SIGKILL)
        imp.feed(data[int(len(data) * frac):], close=True)
        code, err = imp.finish()
        assert code == 8 and err.count("\n") == 1 and "ctr images import" in err, (code, err)
        assert_nothing_temporary(w, p)
        check_after_kill(w, p, done)
        check_converges(w, p, done)
        done += 1
    assert done >= 18, done  # a few byte points may land after the import ended
    KILLS["containerd"] += done


def test_containerd_killed_and_restarted(world: World) -> None:
    w = world
    data = w.cd_bundle.read_bytes()
    done = 0
    # containerd killed mid-stream: one line naming containerd; restarted; clean rerun
    # (the journal named ctr's lease: the rerun deletes it).
    p = new_point(w, "containerd killed mid-stream")
    imp = Importer(cd_args(w, p))
    imp.feed(data[:len(data) // 2])
    os.kill(w.cd.pid, signal.SIGKILL)
    imp.feed(data[len(data) // 2:], close=True)
    code, err = imp.finish()
    assert code in (7, 8) and err.count("\n") == 1 and "containerd" in err, (code, err)
    w.restart_containerd()
    check_after_kill(w, p, done)
    check_converges(w, p, done)
    done += 1

    # containerd killed between two renames: half published until the next run,
    # which rolls the publication forward.
    calls = record_calls(w) if not (w.tmp / "calls.log").exists() else \
        (w.tmp / "calls.log").read_text().splitlines()
    second_tag = [i + 1 for i, c in enumerate(calls) if c.startswith("images tag")][1]
    p = new_point(w, "containerd killed between renames")
    p.cleanup_by = "report"
    wrap = f"{sys.executable} {w.wrapper}"
    out = subprocess.run(eb("import", str(w.cd_bundle), *cd_args(w, p, ctr=wrap)), capture_output=True,
                         text=True, timeout=300,
                         env=env(EBSURV_REAL_CTR=w.cd.ctr, EBSURV_COUNTER=str(w.tmp / f"c-{p.ns}"),
                                 EBSURV_KILL_AT=str(second_tag), EBSURV_WHO="containerd",
                                 EBSURV_CONTAINERD_PID=str(w.cd.pid)))
    assert out.returncode == 7 and out.stderr.count("\n") == 1 and "containerd" in out.stderr, out.stderr
    w.restart_containerd()
    check_after_kill(w, p, done)
    assert len([n for n in ctr_images(w, p.ns) if not n.startswith(TEMP_PREFIX)]) == 1  # half
    rep = subprocess.run(eb("report", *cd_args(w, p), "--json"), capture_output=True, text=True,
                         env=env(), timeout=300)
    assert rep.returncode == 0, rep.stderr
    assert {i["name"] for i in json.loads(rep.stdout)["images"]} == {i.ref for i in w.images}
    check_converges(w, p, done)
    done += 1

    # containerd frozen (SIGSTOP) at 90 % of the stream: the stall bound ends the import
    # with one line instead of a hang; thawed, the rerun cleans up ctr's lease.
    p = new_point(w, "containerd frozen at 90%")
    imp = Importer(cd_args(w, p) + ["--stall-timeout", "3"])
    imp.feed(data[:int(len(data) * 0.9)])
    os.kill(w.cd.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        feeder = threading.Thread(target=imp.feed, args=(data[int(len(data) * 0.9):],),
                                  kwargs={"close": True}, daemon=True)
        feeder.start()
        imp.proc.wait(timeout=60)
        assert time.monotonic() - started < 15  # the 3 s bound, ctr's reaping, exit
        feeder.join(timeout=10)
        code, err = imp.finish()
    finally:
        os.kill(w.cd.pid, signal.SIGCONT)
    assert code == 7 and err.count("\n") == 1 and "stopped reading" in err, (code, err)
    check_after_kill(w, p, done)
    check_converges(w, p, done)
    done += 1
    KILLS["containerd"] += done


def test_two_imports_are_serialised(world: World) -> None:
    w = world
    p = new_point(w, "concurrent")
    first = Importer(cd_args(w, p))
    first.feed(w.cd_bundle.read_bytes()[:4096])
    second = subprocess.run(eb("import", str(w.cd_bundle), *cd_args(w, p)), capture_output=True,
                            text=True, env=env(), timeout=120)
    assert second.returncode == 15 and second.stderr.count("\n") == 1, second.stderr
    assert "already running" in second.stderr and str(first.proc.pid) in second.stderr
    # report does not clean up under the running import: its journal is still there
    rep = subprocess.run(eb("report", *cd_args(w, p), "--json"), capture_output=True, text=True,
                         env=env(), timeout=120)
    assert rep.returncode == 0 and os.listdir(p.state / "journal"), rep.stderr
    first.feed(w.cd_bundle.read_bytes()[4096:], close=True)
    code, err = first.finish()
    assert code == 0, err
    assert_nothing_temporary(w, p)


def test_refused_import_leaves_nothing(world: World) -> None:
    """A damaged bundle is refused mid-stream: no lease, no ingest, no partial content."""
    w = world
    p = new_point(w, "refused")
    before = set(ctr(w, p.ns, "content", "ls", "-q").split())
    data = bytearray(w.cd_bundle.read_bytes())
    data[int(len(data) * 0.6)] ^= 0x10
    out = subprocess.run(eb("import", "-", *cd_args(w, p)), input=bytes(data), capture_output=True,
                         env=env(), timeout=120)
    assert out.returncode == 5, out.stderr
    assert_nothing_temporary(w, p)
    assert ctr_images(w, p.ns) == {}
    after = set(ctr(w, p.ns, "content", "ls", "-q").split())
    assert after == before, "refused content stayed in the store"


# --------------------------------------------------------------------------- Docker


class KillingProxy:
    """A unix-socket proxy to dockerd that kills the importer at a chosen moment.

    ``at_request``: kill when the k-th request starts (before forwarding it);
    ``after_body``: kill once that many bytes of the load request were forwarded;
    ``after_response`` of request k: kill once its response was forwarded.
    """

    def __init__(self, path: Path, upstream: str) -> None:
        self.path, self.upstream = path, upstream
        self.victim: Optional[int] = None
        self.at_request: Optional[int] = None
        self.after_response: Optional[int] = None
        self.after_body: Optional[int] = None
        self.requests: List[str] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _kill(self) -> None:
        if self.victim is not None:
            try:
                os.kill(self.victim, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.connect(self.upstream)
        first = client.recv(65536)
        if not first:
            client.close()
            up.close()
            return
        self.requests.append(first.split(b"\r\n", 1)[0].decode())
        k = len(self.requests)
        if k == self.at_request:
            self._kill()
            client.close()
            up.close()
            return
        is_load = b"/images/load" in first.split(b"\r\n", 1)[0]
        sent = [len(first)]

        def pump_up() -> None:
            up.sendall(first)
            while True:
                try:
                    piece = client.recv(65536)
                except OSError:
                    piece = b""
                if not piece:
                    break
                up.sendall(piece)
                sent[0] += len(piece)
                if is_load and self.after_body is not None and sent[0] >= self.after_body:
                    self._kill()
                    time.sleep(0.2)
                    break
            try:
                up.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        t = threading.Thread(target=pump_up, daemon=True)
        t.start()
        while True:
            try:
                piece = up.recv(65536)
            except OSError:
                piece = b""
            if not piece:
                break
            try:
                client.sendall(piece)
            except OSError:
                break
        if k == self.after_response:
            self._kill()
        t.join(timeout=30)
        client.close()
        up.close()

    def close(self) -> None:
        self._server.close()


def docker(dockerd: Any, *args: str, check: bool = True) -> str:
    out = subprocess.run(dockerd.docker_argv() + list(args), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 or not check, out.stderr
    return out.stdout


def docker_reset(dockerd: Any, w: World) -> None:
    """Remove this test's images (by id: their tags and their layers)."""
    ids = [i.config for i in w.images]
    docker(dockerd, "rmi", "-f", *ids, check=False)


def docker_check_after_kill(dockerd: Any, w: World, index: int) -> None:
    expected = {i.ref: i for i in w.images}
    for line in docker(dockerd, "images", "--no-trunc", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}").splitlines():
        name, image_id = line.split()
        if name in expected:
            assert image_id == expected[name].config, (name, image_id)
    present = [n for n in expected if docker(dockerd, "images", "-q", n).strip()]
    if present:
        name = sorted(present)[index % len(present)]
        assert docker(dockerd, "run", "--rm", "--network", "none", name) == expected[name].message


def docker_converges(dockerd: Any, w: World, state: Path, index: int) -> None:
    out = subprocess.run(eb("import", str(w.dk_bundle), "--runtime", "docker", "--host", dockerd.host,
                            "--state-dir", str(state), "--json"), capture_output=True, text=True,
                         env=env(), timeout=300)
    assert out.returncode == 0, out.stderr
    for i in w.images:
        assert docker(dockerd, "image", "inspect", "--format", "{{.Id}}", i.ref).strip() == i.config
    img = w.images[index % len(w.images)]
    assert docker(dockerd, "run", "--rm", "--network", "none", img.ref) == img.message
    dangling = docker(dockerd, "images", "-q", "--filter", "dangling=true").split()
    assert not set(dangling) & {i.config[7:19] for i in w.images}, dangling
    assert not (state / "journal").exists() or os.listdir(state / "journal") == []


def test_docker_kill_points(world: World, dockerd: Any, tmp_path: Path) -> None:
    w = world
    data = w.dk_bundle.read_bytes()
    proxy = KillingProxy(tmp_path / "p.sock", str(dockerd.socket_path))
    host = f"unix://{tmp_path / 'p.sock'}"
    done = 0
    try:
        # By bytes read of the bundle (entries, the end, the commit).
        def args(p: Point) -> List[str]:
            return ["--runtime", "docker", "--host", dockerd.host, "--state-dir", str(p.state)]

        docker_reset(dockerd, w)
        took = timed_import(w, args, w.dk_bundle)
        for i, (frac, pause) in enumerate(((0.01, 0), (0.1, 0), (0.25, 0), (0.4, 0), (0.55, 0),
                                           (0.7, 0), (0.85, 0), (0.95, 0), (0.999, 0), (1.0, 0),
                                           (1.0, 0.3 * took), (1.0, 0.7 * took))):
            docker_reset(dockerd, w)
            state = tmp_path / f"b{i}"
            imp = Importer(["--runtime", "docker", "--host", dockerd.host, "--state-dir", str(state)])
            imp.feed(data[:int(len(data) * frac)], close=frac == 1.0)
            time.sleep(pause)
            if imp.kill():
                done += 1
            docker_check_after_kill(dockerd, w, i)
            docker_converges(dockerd, w, state, i)

        # By request (the proxy): list, inspect, load body cut at several sizes, the
        # load's response, the inventory read back.
        docker_reset(dockerd, w)
        proxy.requests.clear()
        probe = subprocess.run(eb("import", str(w.dk_bundle), "--runtime", "docker", "--host", host,
                                  "--state-dir", str(tmp_path / "probe")), capture_output=True,
                               text=True, env=env(), timeout=300)
        assert probe.returncode == 0, probe.stderr
        reqs = list(proxy.requests)
        load = next(i + 1 for i, r in enumerate(reqs) if "/images/load" in r)
        plans: List[Tuple[str, Dict[str, Any]]] = [
            ("at the first request", {"at_request": 1}),
            ("at the second request", {"at_request": 2}),
            ("load body 1 MB", {"after_body": 1_000_000}),
            ("load body 3/4", {"after_body": len(data) * 3 // 4}),
            ("at the load request", {"at_request": load}),
            ("load body 100 KB", {"at_request": None, "after_body": 100_000}),
            ("load body half", {"after_body": len(data) // 2}),
            ("load body all", {"after_body": int(len(data) * 0.99)}),
            ("after the load response", {"after_response": load}),
            ("at the read back", {"at_request": load + 1}),
            ("at the last request", {"at_request": len(reqs)}),
        ]
        for name, knobs in plans:
            docker_reset(dockerd, w)
            proxy.requests.clear()
            proxy.at_request = knobs.get("at_request")
            proxy.after_body = knobs.get("after_body")
            proxy.after_response = knobs.get("after_response")
            state = tmp_path / f"s{done}"
            proc = subprocess.Popen(eb("import", str(w.dk_bundle), "--runtime", "docker", "--host", host,
                                       "--state-dir", str(state), "--report", str(tmp_path / "r.json")),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
            proxy.victim = proc.pid
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == -9, (name, proc.returncode, err)
            done += 1
            proxy.at_request = proxy.after_body = proxy.after_response = proxy.victim = None
            time.sleep(0.3)  # the daemon finishes a load whose archive arrived whole
            docker_check_after_kill(dockerd, w, done)
            docker_converges(dockerd, w, state, done)
    finally:
        proxy.close()
    assert done >= 20, done
    KILLS["docker"] += done


def test_kill_point_counts(world: World) -> None:
    """The closing note needs these numbers; also: at least 20 per runtime ran."""
    print(f"\nkill points: {KILLS}")
    if KILLS["containerd"]:
        assert KILLS["containerd"] >= 20, KILLS
    if KILLS["docker"]:
        assert KILLS["docker"] >= 20, KILLS
