"""A fleet of real gateways on loopback for ``edgebundle sync``'s integration tests.

Each gateway is a real OpenSSH sshd (its own host key and port on 127.0.0.1; the
client key is shared, like an operator's) in front of its own runtime target: a
containerd *namespace* of one shared containerd (cheap: a namespace is a separate
image and content view), or a *dockerd of its own* (heavier: a daemon plus its
containerd). Each has its own device state dir, trust dir and staging dir, told to
the packer only through its site entry, as a real gateway's would be:

    ssh: root@127.0.0.1:PORT
    address: /…/containerd.sock | unix:///…/docker.sock
    namespace: fleet0-gw-03                      (containerd)
    staging: /…/gw-03/staging
    edgebundle: env EDGEBUNDLE_STATE_DIR=… EDGEBUNDLE_TRUST_DIR=… /…/python -m edgebundle

The device's edgebundle is this checkout, run by sshd through root's shell.

Faulty gateways carry real faults, not mocks (``FAULTS``):

- ``wrong-host-key``: known_hosts holds another key for its port;
- ``sshd-down``: its sshd was started, then stopped: nothing listens on its port;
- ``cut-upload``: ``ssh:`` names a ``faults.CuttingProxy`` in front of its sshd that
  drops the link mid-upload, once the partial bundle on the device holds
  ``CUT_AT_PART_BYTES``, and stays down until ``heal()``;
- ``disk-full``: the staging dir is a real 1 MiB tmpfs;
- ``edgebundle-missing``: ``edgebundle: /nonexistent/edgebundle``;
- ``import-killed``: ``edgebundle:`` is a wrapper (``KILLER``) that, for the first
  ``import`` only, gives the importer a ctr that SIGKILLs it right after
  ``ctr images import`` has loaded the content, before any name is published.

No pytest import: ``start_fleet`` raises ``services.ServiceError`` when something
cannot start, and the fixtures apply the skip/fail policy of conftest.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import faults
import services
from faults import CuttingProxy
from services import Containerd, Dockerd, ServiceError, Sshd

from edgebundle.oci import Platform
from edgebundle.specs import SiteSpec
from edgebundle.transfer.options import SshOptions

FAULTS = ("wrong-host-key", "sshd-down", "cut-upload", "disk-full", "edgebundle-missing", "import-killed")
# The old version some gateways hold at the start, and what the manifest asks for
# (imagefactory.standard_set: app v1 -> v2 changes one file of the top layer).
OLD_REFS = ("shop/app:v1",)
MANIFEST_REFS = ("shop/app:v2", "shop/worker:v1")
PLATFORM = "linux/amd64"
# The cut link drops once the device's partial upload holds this much (so at least one
# whole 1 MiB block is there to resume from; an empty site's bundle is about 4 MiB).
# Counting bytes through the proxy would not do: under load sshd's sftp-server lags
# megabytes behind what was forwarded.
CUT_AT_PART_BYTES = 1536 * 1024
DISK_FULL_MB = 1
MISSING_EDGEBUNDLE = "/nonexistent/edgebundle"
START_WORKERS = 8  # sshd / dockerd start-ups at once

KILLER = r'''#!/usr/bin/env python3
"""The device's edgebundle, except that its first ``import`` is killed mid-way.

For that import the importer gets ``--ctr 'KILLER --as-ctr'``: this script as its ctr.
As ctr it runs the real one, and right after ``ctr images import`` has loaded the
bundle's content (under temporary names, nothing published yet) it SIGKILLs its
parent, the importer. A marker file makes it happen once; later runs are the plain
edgebundle.
"""
import os, signal, subprocess, sys

args = sys.argv[1:]
if args[:1] == ["--as-ctr"]:
    argv = [os.environ["EBFLEET_REAL_CTR"]] + args[1:]
    loads = any(args[i:i + 2] == ["images", "import"] for i in range(len(args)))
    if not loads:
        os.execv(argv[0], argv)
    rc = subprocess.call(argv)
    with open(os.environ["EBFLEET_KILL_MARKER"], "a") as fh:
        fh.write(f"killed importer {os.getppid()} after ctr images import (ctr rc {rc})\n")
    os.kill(os.getppid(), signal.SIGKILL)
    sys.exit(rc)
marker = os.environ["EBFLEET_KILL_MARKER"]
if args[:1] == ["import"] and not os.path.exists(marker):
    with open(marker, "w") as fh:
        fh.write(f"import {os.getpid()} armed\n")
    args += ["--ctr", f"{sys.executable} {os.path.abspath(__file__)} --as-ctr"]
os.execv(sys.executable, [sys.executable, "-m", "edgebundle"] + args)
'''


@dataclass(frozen=True)
class GatewaySpec:
    """What one gateway is: its runtime, what it holds at the start, its fault if any."""

    name: str
    runtime: str = "containerd"  # "containerd" | "docker"
    holds: str = "empty"  # "empty" | "old": the old version of the app, imported beforehand
    fault: Optional[str] = None  # one of FAULTS


def default_layout(containerd: int = 14, docker: int = 2,
                   faulty: Sequence[str] = FAULTS) -> Tuple[GatewaySpec, ...]:
    """Healthy containerd and Docker gateways (every other one holds the old version),
    then one containerd gateway per fault (each starts empty)."""
    specs = [GatewaySpec(f"gw-{i:02d}", "containerd", "old" if i % 2 else "empty") for i in range(containerd)]
    specs += [GatewaySpec(f"dk-{i:02d}", "docker", "old" if i % 2 else "empty") for i in range(docker)]
    specs += [GatewaySpec(f"bad-{f}", "containerd", "empty", f) for f in faulty]
    return tuple(specs)


@dataclass(frozen=True)
class Gateway:
    spec: GatewaySpec
    root: Path  # everything of this gateway lives under it
    port: int  # the port its ssh: names (a proxy's, a stopped sshd's, or its sshd's)
    sshd: Sshd
    state_dir: Path
    trust_dir: Path
    staging: Path
    address: str  # containerd socket, or unix:// Docker host
    namespace: Optional[str]  # containerd only
    edgebundle: str  # the device command line
    known_hosts_line: str  # what the packer's known_hosts says for it (wrong for wrong-host-key)
    dockerd: Optional[Dockerd] = None
    proxy: Optional[CuttingProxy] = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def runtime(self) -> str:
        return self.spec.runtime

    @property
    def fault(self) -> Optional[str]:
        return self.spec.fault

    @property
    def ssh(self) -> str:
        return f"root@127.0.0.1:{self.port}"

    def site_entry(self) -> Dict[str, Any]:
        """The manifest's site entry."""
        entry: Dict[str, Any] = {"runtime": self.runtime, "platform": PLATFORM}
        if self.namespace is not None:
            entry["namespace"] = self.namespace
        entry.update({"ssh": self.ssh, "address": self.address, "edgebundle": self.edgebundle})
        entry["staging"] = str(self.staging)
        return entry

    def site_spec(self) -> SiteSpec:
        return SiteSpec(name=self.name, runtime=self.runtime, platform=Platform.parse(PLATFORM),
                        namespace=self.namespace, ssh=self.ssh, address=self.address,
                        edgebundle=self.edgebundle, staging=str(self.staging))

    def local_args(self, containerd: Containerd) -> List[str]:
        """Runtime flags for running the device's edgebundle locally (seeding, checks)."""
        if self.runtime == "docker":
            return ["--runtime", "docker", "--host", self.address, "--state-dir", str(self.state_dir),
                    "--trust-dir", str(self.trust_dir)]
        assert self.namespace is not None
        return ["--runtime", "containerd", "--address", self.address, "--namespace", self.namespace,
                "--snapshotter", containerd.snapshotter, "--state-dir", str(self.state_dir),
                "--trust-dir", str(self.trust_dir)]


@dataclass
class Fleet:
    root: Path
    containerd: Containerd
    gateways: Tuple[Gateway, ...]
    client_key: Path  # the operator's key every sshd accepts
    known_hosts: Path
    signing_key: Path  # private key the devices trust (pass to sync --sign)
    startup: Dict[str, float] = field(default_factory=dict)  # phase -> seconds
    _mounts: List[Path] = field(default_factory=list, repr=False)

    def __getitem__(self, name: str) -> Gateway:
        for g in self.gateways:
            if g.name == name:
                return g
        raise KeyError(name)

    def by_fault(self, fault: str) -> Gateway:
        return next(g for g in self.gateways if g.fault == fault)

    @property
    def healthy(self) -> Tuple[Gateway, ...]:
        return tuple(g for g in self.gateways if g.fault is None)

    @property
    def faulty(self) -> Tuple[Gateway, ...]:
        return tuple(g for g in self.gateways if g.fault is not None)

    def ssh_options(self) -> SshOptions:
        return SshOptions(ssh_config_path=os.devnull, known_hosts=str(self.known_hosts),
                          key_filename=str(self.client_key), timeout=10)

    def ssh_flags(self) -> List[str]:
        """The packer's SSH flags for this fleet (never ~/.ssh)."""
        return ["--known-hosts", str(self.known_hosts), "--identity", str(self.client_key),
                "--ssh-config", os.devnull]

    def stop(self) -> None:
        """Stop what start_fleet started (by PID), unmount its tmpfs; namespaces stay with containerd."""
        for g in self.gateways:
            if g.proxy is not None:
                g.proxy.close()
            g.sshd.stop()
            if g.dockerd is not None:
                g.dockerd.stop()
        for m in self._mounts:
            faults.umount(m)
        self._mounts.clear()


def _parallel(fn: Any, items: Iterable[Any], started: Optional[List[Any]] = None) -> List[Any]:
    """``fn`` over ``items`` in threads, results in order. Every call runs to its end; what
    did start is also appended to ``started`` (so the caller can stop it when another failed)."""
    with ThreadPoolExecutor(START_WORKERS) as ex:
        futures = [ex.submit(fn, item) for item in items]
    results, errors = [], []
    for f in futures:
        if f.exception() is None:
            results.append(f.result())
            if started is not None:
                started.append(f.result())
        else:
            errors.append(f.exception())
    if errors:
        raise errors[0]  # type: ignore[misc]
    return results


def start_fleet(root: Path, containerd: Containerd, layout: Sequence[GatewaySpec] = default_layout()) -> Fleet:
    """Start every gateway of ``layout`` under ``root``; ``Fleet.stop()`` undoes it.

    ``containerd`` is the shared one: each containerd gateway is its namespace
    ``<root's name>-<gateway name>``, so several fleets can share one containerd.
    """
    if containerd.snapshotter != "overlayfs":
        # The device command sync runs is `EDGEBUNDLE import … --runtime containerd`, with
        # the importer's default snapshotter: a containerd without overlayfs cannot serve it.
        raise ServiceError(f"the fleet needs containerd's overlayfs snapshotter (got {containerd.snapshotter})")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = [s.name for s in layout]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate gateway names in {names}")
    stamps: Dict[str, float] = {}
    t0 = time.monotonic()

    client_key = root / "operator_ed25519"
    services.keygen(client_key, "edgebundle-fleet-operator")
    stray = root / "stray_host_key"  # the "other" key known_hosts wrongly holds
    services.keygen(stray, "edgebundle-fleet-stray")
    killer = root / "device-edgebundle-killer.py"
    killer.write_text(KILLER)
    killer.chmod(0o755)
    real_ctr = shutil.which("ctr") or containerd.ctr
    signing_key = _signing_key(root)

    sshds: List[Sshd] = []
    started: List[Tuple[str, Dockerd]] = []
    dockerds: Dict[str, Dockerd] = {}
    proxies: List[CuttingProxy] = []
    mounts: List[Path] = []
    try:
        _parallel(lambda s: _start_sshd(root / s.name / "sshd", client_key), layout, sshds)
        stamps["sshd"] = time.monotonic() - t0
        t1 = time.monotonic()
        dockers = [s for s in layout if s.runtime == "docker"]
        _parallel(lambda s: (s.name, services.start_dockerd(root / s.name / "dockerd")), dockers, started)
        dockerds.update(started)
        stamps["dockerd"] = time.monotonic() - t1

        gateways = []
        for spec, sshd in zip(layout, sshds):
            groot = root / spec.name
            state, trust, staging = groot / "state", groot / "trust", groot / "staging"
            for d in (state, trust):
                d.mkdir(parents=True, exist_ok=True)
            shutil.copy(signing_key.with_suffix(".pub"), trust / "fleet.pub")
            env = [f"EDGEBUNDLE_STATE_DIR={state}", f"EDGEBUNDLE_TRUST_DIR={trust}"]
            command = f"{sys.executable} -m edgebundle"
            port = sshd.port
            known = sshd.known_hosts_line()
            proxy = None
            if spec.fault == "wrong-host-key":
                key_type, key_b64 = stray.with_name(stray.name + ".pub").read_text().split()[:2]
                known = f"[127.0.0.1]:{port} {key_type} {key_b64}"
            elif spec.fault == "sshd-down":
                sshd.stop()  # a real sshd that was there and is gone: its port refuses
            elif spec.fault == "cut-upload":
                proxy = CuttingProxy(sshd.port, cut_when=_part_holds(staging, CUT_AT_PART_BYTES))
                proxies.append(proxy)
                port = proxy.port
                known = known.replace(f":{sshd.port} ", f":{proxy.port} ")
            elif spec.fault == "disk-full":
                mounts.append(faults.mount_tmpfs(staging, DISK_FULL_MB))
            elif spec.fault == "edgebundle-missing":
                env, command = [], MISSING_EDGEBUNDLE
            elif spec.fault == "import-killed":
                env += [f"EBFLEET_KILL_MARKER={groot / 'killed-once'}", f"EBFLEET_REAL_CTR={real_ctr}"]
                command = f"{sys.executable} {killer}"
            elif spec.fault is not None:
                raise ValueError(f"unknown fault {spec.fault!r} (known: {', '.join(FAULTS)})")
            edgebundle = shlex.join(["env", *env]) + " " + command if env else command
            dk = dockerds.get(spec.name)
            gateways.append(Gateway(
                spec=spec, root=groot, port=port, sshd=sshd, state_dir=state, trust_dir=trust,
                staging=staging, address=dk.host if dk else containerd.address,
                namespace=None if dk else f"{root.name}-{spec.name}", edgebundle=edgebundle,
                known_hosts_line=known, dockerd=dk, proxy=proxy))
    except BaseException:
        for p in proxies:
            p.close()
        for s in sshds:
            s.stop()
        for _, dk in started:
            dk.stop()
        for m in mounts:
            faults.umount(m)
        raise
    known_hosts = root / "known_hosts"
    known_hosts.write_text("".join(g.known_hosts_line + "\n" for g in gateways))
    stamps["total"] = time.monotonic() - t0
    return Fleet(root, containerd, tuple(gateways), client_key, known_hosts, signing_key, stamps, mounts)


def _part_holds(staging: Path, size: int) -> Callable[[], bool]:
    """True once a ``*.part`` in ``staging`` holds ``size`` bytes."""
    def check() -> bool:
        try:
            return any(p.stat().st_size >= size for p in staging.glob("*.part"))
        except OSError:
            return False  # the part was renamed or removed meanwhile
    return check


def _start_sshd(tmp: Path, client_key: Path, attempts: int = 3) -> Sshd:
    """start_sshd, again on another port if the one picked was taken meanwhile (free_port's
    race: 20 start-ups at once, and other tests on the machine, pick ports too)."""
    for attempt in range(attempts):
        try:
            return services.start_sshd(tmp, client_key=client_key)
        except ServiceError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def _signing_key(root: Path) -> Path:
    """The fleet key (``edgebundle key generate``): devices trust its .pub, sync signs with it."""
    prefix = root / "fleet-key"
    out = subprocess.run(eb("key", "generate", "--out", str(prefix), "--json"), capture_output=True, text=True,
                         env=services.clean_env(), timeout=60)
    if out.returncode != 0:
        raise ServiceError(f"edgebundle key generate failed: {out.stderr.strip()}")
    return Path(json.loads(out.stdout)["private"])


def eb(*args: str) -> List[str]:
    """argv of this checkout's edgebundle."""
    return [sys.executable, "-m", "edgebundle", *args]


# ---------------------------------------------------------------------------
# Manifests


def write_manifest(fleet: Fleet, path: Path, registry_host: str, refs: Sequence[str],
                   gateways: Optional[Iterable[Gateway]] = None) -> Path:
    """A manifest list asking every site of ``gateways`` (default: all) for ``refs``.

    ``refs`` are repo:tag in the registry at ``registry_host`` (plain HTTP). JSON is
    YAML: every value is written as JSON so that paths and command lines need no
    YAML quoting rules.
    """
    chosen = list(gateways) if gateways is not None else list(fleet.gateways)
    lines = ["version: 1", "registries:", f"  {json.dumps(registry_host)}: {{insecure: true}}", "images:"]
    lines += [f"  - ref: {json.dumps(f'{registry_host}/{r}')}" for r in refs]
    lines.append("sites:")
    lines += [f"  {g.name}: {json.dumps(g.site_entry())}" for g in chosen]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------
# Seeding: the old version on the "old" gateways


def seed_old(fleet: Fleet, registry_host: str, refs: Sequence[str], home: Path, *, level: int = 3) -> Dict[str, Any]:
    """Import ``refs`` into every gateway whose spec holds "old", as an earlier sync would have.

    One signed bundle per runtime, packed by this checkout (packer home ``home``), and
    imported by the device's own edgebundle with the gateway's state and trust dirs.
    Returns {runtime: bundle path}.
    """
    old = [g for g in fleet.gateways if g.spec.holds == "old"]
    runtimes = sorted({g.runtime for g in old})
    seed = fleet.root / "seed"
    seed.mkdir(exist_ok=True)
    manifest = seed / "seed.yaml"
    lines = ["version: 1", "registries:", f"  {json.dumps(registry_host)}: {{insecure: true}}", "images:"]
    lines += [f"  - ref: {json.dumps(f'{registry_host}/{r}')}" for r in refs]
    lines += ["sites:"] + [f"  seed-{rt}: {{runtime: {rt}, platform: {PLATFORM}}}" for rt in runtimes]
    manifest.write_text("\n".join(lines) + "\n")
    bundles: Dict[str, Any] = {}
    for rt in runtimes:
        bundle = seed / f"seed-{rt}.ebundle"
        _check(eb("--home", str(home), "pack", str(manifest), "--site", f"seed-{rt}", "-o", str(bundle),
                  "--level", str(level), "--sign", str(fleet.signing_key), "--no-progress"), f"pack seed-{rt}")
        bundles[rt] = bundle
    _parallel(lambda g: _check(eb("import", str(bundles[g.runtime]), "--no-progress",
                                  *g.local_args(fleet.containerd)), f"seed import on {g.name}"), old)
    return bundles


def _check(argv: List[str], what: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, env=services.clean_env(), timeout=300)
    if out.returncode != 0:
        raise ServiceError(f"{what} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return out.stdout


# ---------------------------------------------------------------------------
# What a gateway really holds (asked of its runtime, not of edgebundle)


def runtime_images(fleet: Fleet, g: Gateway) -> Dict[str, str]:
    """name -> manifest digest (containerd) or image id = config digest (docker), as the runtime lists it."""
    if g.runtime == "docker":
        assert g.dockerd is not None
        out = subprocess.run(g.dockerd.docker_argv() + ["images", "--no-trunc", "--format",
                                                        "{{.Repository}}:{{.Tag}} {{.ID}}"],
                             capture_output=True, text=True, timeout=60, env=g.dockerd.env())
        if out.returncode != 0:
            raise AssertionError(f"docker images on {g.name}: {out.stderr}")
        return dict(line.split() for line in out.stdout.splitlines() if line.strip())
    assert g.namespace is not None
    out = subprocess.run(fleet.containerd.ctr_argv(g.namespace) + ["images", "ls"], capture_output=True,
                         text=True, timeout=60, env=fleet.containerd.env())
    if out.returncode != 0:
        raise AssertionError(f"ctr images ls on {g.name}: {out.stderr}")
    return {r.split()[0]: r.split()[2] for r in out.stdout.splitlines()[1:] if r.strip()}


def run_image(fleet: Fleet, g: Gateway, ref: str, tag: str) -> str:
    """Run ``ref`` on gateway ``g``'s runtime; its stdout (the image prints its message)."""
    if g.runtime == "docker":
        assert g.dockerd is not None
        argv = g.dockerd.docker_argv() + ["run", "--rm", "--network", "none", ref]
        env = g.dockerd.env()
    else:
        assert g.namespace is not None
        argv = fleet.containerd.ctr_argv(g.namespace) + ["run", "--rm", "--snapshotter",
                                                         fleet.containerd.snapshotter, ref, f"{g.name}-{tag}"]
        env = fleet.containerd.env()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    if out.returncode != 0:
        raise AssertionError(f"running {ref} on {g.name} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout
