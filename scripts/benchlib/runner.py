"""The benchmark run: services, images, packs, imports, baselines, checks.

Every edgebundle step runs the real CLI (``python -m edgebundle``) as a subprocess,
exactly as a user would; baselines run the real ``docker``, ``ctr``, ``skopeo`` and
``zstd`` binaries against the same private services.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import images as I
from . import deltas, planbench, proc, sites, stages
from .sites import NAMESPACE, services

ROOT = Path(__file__).resolve().parent.parent.parent

RUNTIMES = ("containerd", "docker")
SCENARIOS = {
    "a": "factory seed: empty site gets app:v1",
    "b": "app update: site holds app:v1, gets app:v2 (2 files edited in the top layer)",
    "c": "rebuild: site holds app:v2, gets app:v3 (rebuilt on bookworm-security; every digest changes)",
    "d": "fleet: empty site gets 4 images sharing a base",
    "e": "everything: empty site gets all 6 images (a larger bundle for the memory series)",
}
SITE = {("containerd", "edge"): "edge-c", ("docker", "edge"): "edge-d",
        ("containerd", "fleet"): "fleet-c", ("docker", "fleet"): "fleet-d",
        ("containerd", "sweep"): "sweep-c", ("docker", "sweep"): "sweep-d"}


SAVE_REGISTRY = "registry.bench.invalid"  # fixed name docker save archives carry


class CheckFailed(AssertionError):
    pass


@dataclass
class Options:
    quick: bool
    cache: Path
    level: int = 10
    repeat: int = 3
    pack_repeat: int = 1
    levels: Tuple[int, ...] = (1, 3, 10, 16, 19)
    threads: int = 1  # pack's zstd workers (edgebundle's default: one per CPU)
    plan_sites: int = 10_000
    plan_images: int = 50
    plan_budget: float = 120.0
    keep: bool = False
    py_spy: Optional[str] = None
    # the fleet phase (issue 9, benchlib/fleet.py)
    fleet_sites: int = 1000
    fleet_repack_all: bool = False  # repack every state, not only the costliest
    sync_sites: int = 20
    parallels: Tuple[int, ...] = (4, 8)
    upload_rounds: int = 3
    sync_repeat: int = 3


@dataclass
class Results:
    data: Dict[str, Any] = field(default_factory=dict)
    checks: List[Tuple[str, bool, str]] = field(default_factory=list)

    def __getitem__(self, k: str) -> Any:
        return self.data[k]

    def __setitem__(self, k: str, v: Any) -> None:
        self.data[k] = v


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


class Bench:
    def __init__(self, opts: Options, tmp: Path) -> None:
        self.o = opts
        self.tmp = tmp
        self.t0 = time.monotonic()
        self.r = Results()
        self.started: List[Any] = []
        self.env = services.clean_env()
        self.manifests: Dict[str, Path] = {}
        self.bundles: Dict[Tuple[str, str], Dict[str, Any]] = {}  # (runtime, scenario) -> info
        self.reg: Any = None
        self.set: Optional[I.ImageSet] = None

    # -- utilities -------------------------------------------------------------------

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.r.checks.append((name, bool(ok), detail))
        if not ok:
            self.log(f"CHECK FAILED: {name}: {detail}")

    def eb(self, *args: str) -> proc.Run:
        # memory is sampled every 5 ms for imports (the RSS goal), every 50 ms otherwise
        poll = 0.005 if args and args[0] == "import" else 0.05
        return proc.run([sys.executable, "-m", "edgebundle", *args], env=self.env, cwd=str(ROOT), poll=poll)

    def ref(self, img: I.BenchImage) -> str:
        return f"{self.reg.host}/{img.ref}"

    def manifest(self, name: str, imgs: Sequence[I.BenchImage]) -> Path:
        lines = ["version: 1", "registries:", f'  "{self.reg.host}": {{insecure: true}}', "images:"]
        lines += [f"  - ref: {self.ref(i)}" for i in imgs]
        lines += ["sites:"]
        for (rt, _), site in SITE.items():
            ns = f", namespace: {NAMESPACE}" if rt == "containerd" else ""
            lines.append(f"  {site}: {{runtime: {rt}{ns}, platform: linux/amd64}}")
        p = self.tmp / f"manifest-{name}.yaml"
        p.write_text("\n".join(lines) + "\n")
        self.manifests[name] = p
        return p

    # -- phases ------------------------------------------------------------------------

    def machine(self) -> None:
        def cmd(*argv: str) -> str:
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
                return (out.stdout or out.stderr).strip().splitlines()[0]
            except (OSError, IndexError, subprocess.SubprocessError):
                return "n/a"
        cpu = "unknown"
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        mem = 0
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
        import zstandard
        import edgebundle
        git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "edgebundle"],
                               capture_output=True, text=True).stdout.strip()
        self.r["machine"] = {
            "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem / 2**30, 1),
            "kernel": platform.release(), "os": _os_release(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "load_start": _loadavg(),
        }
        self.r["versions"] = {
            "edgebundle": f"{edgebundle.__version__} (git {git}{', edgebundle/ modified' if dirty else ''})",
            "python": sys.version.split()[0], "zstandard (python)": zstandard.__version__,
            "containerd": cmd("containerd", "--version"),
            "ctr": cmd("ctr", "--version"),
            "dockerd": cmd("/usr/sbin/dockerd", "--version"),
            "docker CLI": cmd(services.docker_cli(), "--version"),
            "zstd": cmd("zstd", "--version"),
            "skopeo": cmd("skopeo", "--version"),
            "docker-registry": cmd("docker-registry", "--version"),
            "mmdebstrap": cmd("mmdebstrap", "--version") if not self.o.quick else "not used (--quick)",
            "gzip (layers)": I.gzip_note(),
        }

    def build_images(self) -> None:
        self.log("building images" + (" (quick: host files + busybox)" if self.o.quick else
                                      f" (mmdebstrap, cache {self.o.cache})"))
        t0 = time.monotonic()
        self.set = I.quick_set(self.log) if self.o.quick else I.full_set(self.o.cache, self.log)
        self.r["images"] = {
            "mode": self.set.mode, "notes": self.set.notes, "seconds": round(time.monotonic() - t0, 1),
            "list": [{"ref": i.ref, "manifest": i.build().manifest_digest,
                      "registry_bytes": i.registry_bytes, "tar_bytes": i.tar_bytes,
                      "layers": [{"name": l.name, "digest": l.digest, "size": l.size,
                                  "tar_size": l.tar_size} for l in i.layers]}
                     for i in self.set.all_images()],
        }
        for i in self.set.all_images():
            self.log(f"  {i.ref:<18} {i.build().manifest_digest[:19]}  registry {_mb(i.registry_bytes)}, "
                     f"tars {_mb(i.tar_bytes)}: " + ", ".join(f"{l.name} {_mb(l.size)}" for l in i.layers))

    def start_services(self, helper: bool = True) -> None:
        """The registry (images pushed), and unless ``helper`` is False the packer-side
        dockerd the baselines need."""
        self.log("starting registry" + (" and the packer-side dockerd (for docker save / ctr export baselines)"
                                         if helper else ""))
        self.reg = services.start_registry(self.tmp / "registry")
        self.started.append(self.reg)
        if helper:
            self.helper = services.start_dockerd(self.tmp / "helper")
            self.started.append(self.helper)
        assert self.set is not None
        t0 = time.monotonic()
        self.set.push(self.reg.host)
        self.log(f"pushed {len(self.set.all_images())} images to {self.reg.host} in "
                 f"{time.monotonic() - t0:.1f} s")

    def stop_services(self) -> None:
        for svc in reversed(self.started):
            try:
                svc.stop()
            except Exception as exc:  # keep stopping the rest
                self.log(f"stopping {svc}: {exc}")
        self.started.clear()

    # -- plan ------------------------------------------------------------------------

    def plan_bench(self) -> None:
        out = []
        for rt in RUNTIMES:
            self.log(f"plan: {self.o.plan_sites} synthetic {rt} sites x {self.o.plan_images} images")
            res = planbench.run(self.o.plan_sites, self.o.plan_images, rt, self.o.plan_budget)
            self.log(f"  planned {res['planned']} sites in {res['seconds']:.1f} s "
                     f"({res['per_site_ms']:.2f} ms/site; projected {res['projected_s']:.1f} s for "
                     f"{res['sites']})")
            out.append(res)
        self.r["plan"] = out
        self.r["plan_profile"] = planbench.profile(200 if not self.o.quick else 20, self.o.plan_images,
                                                   "containerd")
        for res in out:
            self.check(f"plan {res['runtime']} planned sites", res["planned"] > 0)

    # -- baselines -------------------------------------------------------------------

    def scenario_images(self) -> Dict[str, List[I.BenchImage]]:
        assert self.set is not None
        return {"a": [self.set.app["v1"]], "b": [self.set.app["v2"]], "c": [self.set.app["v3"]],
                "d": list(self.set.fleet)}

    def held_before(self, scenario: str) -> Dict[str, int]:
        """Registry blobs the site holds before the scenario (digest -> size)."""
        assert self.set is not None
        held: Dict[str, int] = {}
        prior = {"a": [], "b": ["v1"], "c": ["v1", "v2"], "d": []}[scenario]
        for v in prior:
            held.update(self.set.app[v].blob_sizes())
        return held

    def baselines(self) -> None:
        """docker save | zstd -3, skopeo oci-archive, ctr export archives, layer-level dedup."""
        out: Dict[str, Dict[str, Any]] = {}
        d = self.tmp / "baselines"
        d.mkdir()
        docker = self.helper.docker_argv()
        for sc, imgs in self.scenario_images().items():
            refs = [self.ref(i) for i in imgs]
            # docker save records the names: tag them with a fixed registry name so that the
            # archive (and its zstd size) does not depend on the registry's random port
            fixed = [f"{SAVE_REGISTRY}/{i.ref}" for i in imgs]
            for r, f in zip(refs, fixed):
                proc.run(docker + ["pull", "-q", r]).check()
                proc.run(docker + ["tag", r, f]).check()
            save = d / f"{sc}-docker-save.tar"
            proc.run(docker + ["save", "-o", str(save), *fixed]).check()
            zst = d / f"{sc}-docker-save.tar.zst"
            z = proc.run(["zstd", "-3", "-q", "-f", "-o", str(zst), str(save)]).check()
            # skopeo: an OCI archive for one image; one shared OCI layout (tarred) for several
            if len(refs) == 1:
                sk = d / f"{sc}-skopeo.oci.tar"
                proc.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{refs[0]}",
                          f"oci-archive:{sk}"]).check()
            else:
                layout = d / f"{sc}-skopeo-layout"
                for r, img in zip(refs, imgs):
                    proc.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{r}",
                              f"oci:{layout}:{img.repo.split('/')[-1]}-{img.tag}"]).check()
                sk = d / f"{sc}-skopeo.oci.tar"
                with tarfile.open(sk, "w") as tf:
                    tf.add(layout, arcname=".")
            # ctr export (the input of the `ctr images import` baseline)
            ctr = self.helper.containerd.ctr_argv("export")
            for r in refs:
                proc.run(ctr + ["images", "pull", "--plain-http", "--platform", "linux/amd64", r],
                         env=self.helper.containerd.env()).check()
            exp = d / f"{sc}-ctr-export.tar"
            proc.run(ctr + ["images", "export", "--platform", "linux/amd64", str(exp), *refs],
                     env=self.helper.containerd.env()).check()
            full: Dict[str, int] = {}
            for i in imgs:
                full.update(i.blob_sizes())
            held = self.held_before(sc)
            lacking = {k: v for k, v in full.items() if k not in held}
            out[sc] = {"refs": refs, "docker_save": save.stat().st_size, "docker_save_zstd3": zst.stat().st_size,
                       "zstd3_seconds": z.wall, "skopeo_oci": sk.stat().st_size,
                       "ctr_export": exp.stat().st_size, "registry_full": sum(full.values()),
                       "layer_dedup": sum(lacking.values()),
                       "tar_bytes": sum(l.tar_size for i in imgs for l in i.layers
                                        if l.digest in lacking),
                       "paths": {"save": str(save), "zst": str(zst), "export": str(exp)}}
            self.log(f"baseline {sc}: docker save {_mb(out[sc]['docker_save'])}, | zstd -3 "
                     f"{_mb(out[sc]['docker_save_zstd3'])}, skopeo {_mb(out[sc]['skopeo_oci'])}, "
                     f"layer dedup {_mb(out[sc]['layer_dedup'])}")
        self.r["baselines"] = out

    # -- stages ----------------------------------------------------------------------

    def stage_speeds(self) -> None:
        """Raw stage speeds on the seed image's layers (a) and the fleet's unique layers (d)."""
        assert self.set is not None
        import gzip
        out = {}
        for sc, imgs in (("a", [self.set.app["v1"]]), ("d", list(self.set.fleet))):
            fetch: Dict[str, Tuple[str, I.LayerBlob]] = {}
            for img in imgs:
                for l in img.layers:
                    fetch.setdefault(l.digest, (img.repo, l))
            layers = [l for _, l in fetch.values()]
            tars = [gzip.decompress(l.gz) for l in layers]
            res = stages.measure([l.gz for l in layers], tars, self.o.level, self.tmp, registry=self.reg.host,
                                 fetch_list=[(repo, l.digest) for repo, l in fetch.values()],
                                 threads=self.o.threads, extras=(sc == "a"), one_worker=False)
            out[sc] = res
            self.log(f"stages ({sc}, {res['_']['content_mb']:.0f} MB content): " + ", ".join(
                f"{k} {v['content_mbps']:.0f}" for k, v in res.items() if k != "_") + " MB/s of content")
        self.r["stages"] = out

    # -- pack + import ---------------------------------------------------------------

    def pack(self, home: Path, manifest: Path, site: str, out: Path, level: Optional[int] = None,
             extra: Sequence[str] = ()) -> Dict[str, Any]:
        r = self.eb("--home", str(home), "pack", str(manifest), "--site", site, "-o", str(out), "--json",
                    "--no-progress", "--level", str(level if level is not None else self.o.level),
                    *extra).check()
        res = json.loads(r.stdout)
        res["_wall"] = r.wall
        res["_cpu"] = r.cpu
        res["_argv"] = proc.shell_join(["edgebundle", *r.argv[3:]])
        return res

    def eb_import(self, bundle: Path, dev: sites.Device, report: Optional[Path] = None) -> proc.Run:
        args = ["import", str(bundle), *dev.import_args(), "--json", "--no-progress"]
        if report is not None:
            args += ["--report", str(report)]
        return self.with_daemon_cpu(dev, lambda: self.eb(*args).check())

    @staticmethod
    def with_daemon_cpu(dev: sites.Device, fn: Callable[[], proc.Run]) -> proc.Run:
        """Run ``fn`` and attach the runtime daemons' CPU seconds spent meanwhile."""
        before = proc.cpu_seconds(dev.daemon_pids())
        run = fn()
        run.daemon_cpu = proc.cpu_seconds(dev.daemon_pids()) - before  # type: ignore[attr-defined]
        return run

    def shipped_content(self, scenario: str, runtime: str, plan: Dict[str, Any]) -> Tuple[int, int]:
        """(uncompressed tar bytes, registry bytes) of the layers a bundle ships."""
        assert self.set is not None
        by_digest = {l.digest: l for i in [*self.set.all_images(), *self.set.extras.values()]
                     for l in i.layers}
        seen = set()
        tar = reg = 0
        for img in plan["images"]:
            for l in img["layers"]:
                if l["ship"] and l["digest"] not in seen:
                    seen.add(l["digest"])
                    tar += by_digest[l["digest"]].tar_size
                    reg += by_digest[l["digest"]].size
        return tar, reg

    def packs_and_imports(self) -> None:
        imgs = self.scenario_images()
        for sc in "abcd":
            self.manifest(sc, imgs[sc])
        self.manifest("e", self.set.all_images())  # type: ignore[union-attr]
        packs: List[Dict[str, Any]] = []
        imports: List[Dict[str, Any]] = []
        bdir = self.tmp / "bundles"
        bdir.mkdir()
        for rt in RUNTIMES:
            self.log(f"== {rt} site: pack, import, report, record ({SITE[(rt, 'edge')]})")
            # (a) seed: cold pack (fresh home) then warm pack (same home), repeated
            home = self.tmp / f"home-{rt}"
            for k in range(self.o.pack_repeat):
                h = home if k == 0 else self.tmp / f"home-{rt}-rep{k}"
                for cache in ("cold", "warm"):
                    out = bdir / f"a-{rt}-{cache}-{k}.ebundle"
                    res = self.pack(h, self.manifests["a"], SITE[(rt, "edge")], out)
                    packs.append(self._pack_row("a", rt, cache, k, res))
                    if k == 0 and cache == "cold":
                        self.bundles[(rt, "a")] = {"path": out, **packs[-1]}
                    elif k > 0 or cache == "warm":
                        self.check(f"pack a {rt} {cache} rep{k} bytes identical to the first pack",
                                   res["bundle_bytes"] == self.bundles[(rt, "a")]["bundle_bytes"],
                                   f"{res['bundle_bytes']} vs {self.bundles[(rt, 'a')]['bundle_bytes']}")
                        out.unlink()
                if k > 0:
                    shutil.rmtree(h, ignore_errors=True)
            # timeline 0: import seed -> record -> pack update -> import -> record -> rebuild
            dev = sites.start(rt, self.tmp)
            try:
                for sc in "abc":
                    if sc != "a":
                        # the same state, layer-level (--no-delta): what deltas save
                        out = bdir / f"{sc}-{rt}-whole.ebundle"
                        res = self.pack(home, self.manifests[sc], SITE[(rt, "edge")], out,
                                        extra=("--no-delta",))
                        packs.append(self._pack_row(f"{sc}-whole", rt, "incremental", 0, res))
                        self.bundles[(rt, f"{sc}-whole")] = {"path": out, **packs[-1]}
                        out = bdir / f"{sc}-{rt}.ebundle"
                        res = self.pack(home, self.manifests[sc], SITE[(rt, "edge")], out)
                        packs.append(self._pack_row(sc, rt, "incremental", 0, res))
                        self.bundles[(rt, sc)] = {"path": out, **packs[-1]}
                    b = self.bundles[(rt, sc)]
                    report = self.tmp / f"report-{rt}-{sc}.json"
                    run = self.eb_import(b["path"], dev, report)
                    imports.append(self._import_row(sc, rt, "edgebundle", 0, b, run))
                    self.eb("--home", str(home), "inventory", "record", SITE[(rt, "edge")], str(report)).check()
                    self._verify(sc, rt, dev, imgs[sc], b, run)
                # pack again for a site that holds everything: the fixed cost of a pack
                out = bdir / f"noop-{rt}.ebundle"
                res = self.pack(home, self.manifests["c"], SITE[(rt, "edge")], out)
                packs.append(self._pack_row("noop", rt, "warm", 0, res))
                self.check(f"no-op pack {rt} ships no image", res["images"] == 0, str(res["images"]))
                # re-import the (small) update bundle: a no-op, the fixed cost of an import
                run = self.eb_import(self.bundles[(rt, "b")]["path"], dev)
                imports.append(self._import_row("noop", rt, "edgebundle", 0, self.bundles[(rt, "b")], run))
                res_json = json.loads(run.stdout)
                self.check(f"no-op re-import {rt} imports nothing", not res_json.get("imported"),
                           str(res_json.get("imported")))
            finally:
                dev.stop()
            # (d) fleet: cold + warm packs into a fresh home, then import into a fresh device
            for k in range(self.o.pack_repeat):
                h = self.tmp / f"home-fleet-{rt}-{k}"
                for cache in ("cold", "warm"):
                    out = bdir / f"d-{rt}-{cache}-{k}.ebundle"
                    res = self.pack(h, self.manifests["d"], SITE[(rt, "fleet")], out)
                    packs.append(self._pack_row("d", rt, cache, k, res))
                    if k == 0 and cache == "cold":
                        self.bundles[(rt, "d")] = {"path": out, **packs[-1]}
                    else:
                        self.check(f"pack d {rt} {cache} rep{k} bytes identical to the first pack",
                                   res["bundle_bytes"] == self.bundles[(rt, "d")]["bundle_bytes"])
                        out.unlink()
                if k > 0:
                    shutil.rmtree(h, ignore_errors=True)
            dev = sites.start(rt, self.tmp)
            try:
                b = self.bundles[(rt, "d")]
                run = self.eb_import(b["path"], dev, self.tmp / f"report-{rt}-d.json")
                imports.append(self._import_row("d", rt, "edgebundle", 0, b, run))
                self._verify("d", rt, dev, imgs["d"], b, run)
            finally:
                dev.stop()
            # (e) everything in one bundle, for the memory-vs-size series
            out = bdir / f"e-{rt}.ebundle"
            res = self.pack(self.tmp / f"home-e-{rt}", self.manifests["e"], SITE[(rt, "fleet")], out)
            packs.append(self._pack_row("e", rt, "cold", 0, res))
            self.bundles[(rt, "e")] = {"path": out, **packs[-1]}
            dev = sites.start(rt, self.tmp)
            try:
                b = self.bundles[(rt, "e")]
                run = self.eb_import(b["path"], dev)
                imports.append(self._import_row("e", rt, "edgebundle", 0, b, run))
                self._verify("e", rt, dev, self.set.all_images(), b, run)  # type: ignore[union-attr]
            finally:
                dev.stop()
            # baselines: ctr images import / docker load of the same images, same device states;
            # repetitions alternate edgebundle and baseline timelines, so that a burst of load
            # from elsewhere on the machine does not fall on one side only
            tool = "ctr import" if rt == "containerd" else "docker load"
            base = self.r["baselines"]

            def baseline_rep(k: int) -> None:
                dev = sites.start(rt, self.tmp)
                try:
                    for sc in "abc":
                        arch = Path(base[sc]["paths"]["export" if rt == "containerd" else "save"])
                        run = self.with_daemon_cpu(dev, lambda: dev.baseline_import(arch))
                        imports.append(self._import_row(sc, rt, tool, k, {"bundle_bytes": arch.stat().st_size}, run))
                    names = dev.names()
                    want = self.ref(self.set.app["v3"]) if rt == "containerd" else \
                        f"{SAVE_REGISTRY}/{self.set.app['v3'].ref}"  # type: ignore[union-attr]
                    self.check(f"{tool} baseline imported app:v3", want in names, str(names))
                finally:
                    dev.stop()
                dev = sites.start(rt, self.tmp)
                try:
                    arch = Path(base["d"]["paths"]["export" if rt == "containerd" else "save"])
                    run = self.with_daemon_cpu(dev, lambda: dev.baseline_import(arch))
                    imports.append(self._import_row("d", rt, tool, k, {"bundle_bytes": arch.stat().st_size}, run))
                finally:
                    dev.stop()
                if rt == "docker" and k == 0:
                    # the compressed form, as it would be shipped: zstd -dc | docker load
                    for sc in "ad":
                        dev = sites.start(rt, self.tmp)
                        try:
                            zst = Path(base[sc]["paths"]["zst"])
                            run = self.with_daemon_cpu(dev, lambda: dev.baseline_import_zstd(zst))  # type: ignore
                            imports.append(self._import_row(sc, rt, "zstd -dc | docker load", k,
                                                            {"bundle_bytes": zst.stat().st_size}, run))
                        finally:
                            dev.stop()

            baseline_rep(0)
            # repetitions of the import timelines with the same bundles
            for k in range(1, self.o.repeat):
                dev = sites.start(rt, self.tmp)
                try:
                    for sc in "abc":
                        b = self.bundles[(rt, sc)]
                        imports.append(self._import_row(sc, rt, "edgebundle", k, b, self.eb_import(b["path"], dev)))
                    b = self.bundles[(rt, "b")]
                    imports.append(self._import_row("noop", rt, "edgebundle", k, b, self.eb_import(b["path"], dev)))
                finally:
                    dev.stop()
                dev = sites.start(rt, self.tmp)
                try:
                    b = self.bundles[(rt, "d")]
                    imports.append(self._import_row("d", rt, "edgebundle", k, b, self.eb_import(b["path"], dev)))
                finally:
                    dev.stop()
                baseline_rep(k)
        self.r["packs"] = packs
        self.r["imports"] = imports
        self.r["bundles"] = {f"{rt}/{sc}": {k: v for k, v in b.items() if k != "path"}
                             for (rt, sc), b in self.bundles.items()}

    def _pack_row(self, sc: str, rt: str, cache: str, rep: int, res: Dict[str, Any]) -> Dict[str, Any]:
        tar, reg = self.shipped_content(sc, rt, res["plan"])
        row = {"scenario": sc, "runtime": rt, "cache": cache, "rep": rep, "bundle_bytes": res["bundle_bytes"],
               "wall": res["_wall"], "cpu": res.get("_cpu", 0.0), "content_bytes": tar, "layer_registry_bytes": reg,
               "entries": res["entries"], "images": res["images"], "argv": res["_argv"],
               "ship_registry_bytes": res["ship_registry_bytes"],
               "full_registry_bytes": res["full_registry_bytes"],
               "delta_stats": deltas.delta_stats(res["plan"])}
        self.log(f"  pack {sc} {rt} {cache:<11} rep{rep}: {_mb(res['bundle_bytes'])} in {res['_wall']:.2f} s "
                 f"({tar / 1e6 / res['_wall']:.1f} MB/s of content)")
        return row

    def _import_row(self, sc: str, rt: str, tool: str, rep: int, b: Dict[str, Any], run: proc.Run
                    ) -> Dict[str, Any]:
        row = {"scenario": sc, "runtime": rt, "tool": tool, "rep": rep, "bytes": b["bundle_bytes"],
               "wall": run.wall, "hwm_kb": run.hwm_kb, "tree_kb": run.tree_kb, "cpu": run.cpu,
               "daemon_cpu": getattr(run, "daemon_cpu", 0.0)}
        self.log(f"  import {sc:<4} {rt:<10} {tool:<22} rep{rep}: {_mb(b['bundle_bytes'])} in {run.wall:.2f} s, "
                 f"peak RSS {run.hwm_kb / 1024:.1f} MiB (with children {run.tree_kb / 1024:.1f} MiB)")
        return row

    def _verify(self, sc: str, rt: str, dev: sites.Device, imgs: Sequence[I.BenchImage], b: Dict[str, Any],
                run: proc.Run) -> None:
        names = dev.names()
        want = [self.ref(i) for i in imgs]
        listed = all(w in names for w in want)
        self.check(f"scenario {sc} {rt}: images listed", listed, f"want {want}, have {names}")
        outputs = []
        for img in imgs:
            try:
                out = dev.run_image(self.ref(img))
            except Exception as exc:
                out = f"ERROR {exc}"
            outputs.append(out.strip())
            self.check(f"scenario {sc} {rt}: {img.ref} runs", img.expect in out, out.strip()[:200])
        ok = listed and all(i.expect in o for i, o in zip(imgs, outputs))
        print(f"SCENARIO {sc} {rt}: bundle {b['bundle_bytes']} bytes, import {run.wall:.2f} s, "
              f"{len(imgs)} image(s) listed and run: {'OK' if ok else 'FAILED'}", flush=True)

    # -- level sweep -----------------------------------------------------------------

    def level_sweep(self) -> None:
        """Docker-site seed at several zstd levels, warm cache (the containerd form has no
        compressible layers), and once with a single zstd worker: FORMAT.md promises the same
        bytes for any worker count."""
        home = self.tmp / "home-fleet-docker-0"  # the fleet's packer home: app:v1's layers are cached
        if not home.is_dir():
            home = self.tmp / "home-sweep"
            self.pack(home, self.manifests["a"], SITE[("docker", "sweep")], self.tmp / "sweep-warmup.ebundle")
            (self.tmp / "sweep-warmup.ebundle").unlink()
        rows: List[Dict[str, Any]] = []

        def one(lvl: int, extra: Sequence[str] = ()) -> Dict[str, Any]:
            out = self.tmp / f"sweep-{lvl}.ebundle"
            res = self.pack(home, self.manifests["a"], SITE[("docker", "sweep")], out, level=lvl, extra=extra)
            tar, _ = self.shipped_content("a", "docker", res["plan"])
            row = {"level": lvl, "bundle_bytes": res["bundle_bytes"], "wall": res["_wall"], "content_bytes": tar}
            self.log(f"  level {lvl:>2} {' '.join(extra)}: {_mb(res['bundle_bytes'])} in {res['_wall']:.1f} s")
            out.unlink()
            return row

        for lvl in self.o.levels:
            rows.append(one(lvl))
        lvl = min(self.o.levels)
        row = one(lvl, ["--threads", "1"])
        row["threads"] = 1
        rows.append(row)
        same = [x for x in rows if x["level"] == lvl and not x.get("threads")]
        self.check("pack output size independent of the zstd worker count (FORMAT.md)",
                   bool(same) and same[0]["bundle_bytes"] == row["bundle_bytes"],
                   f"level {lvl}: {row['bundle_bytes']} with 1 worker, "
                   f"{same[0]['bundle_bytes'] if same else '?'} with {self.o.threads}")
        self.r["levels"] = rows

    # -- profiles ------------------------------------------------------------------------

    def profiles(self) -> None:
        """py-spy profiles of a pack and an import per site kind (``--py-spy PATH``)."""
        from . import profile as P
        if not self.o.py_spy:
            return
        d = self.tmp / "profiles"
        d.mkdir()
        out: List[Dict[str, Any]] = []

        def record(name: str, args: List[str]) -> None:
            raw = d / (re.sub(r"[^a-z0-9]+", "-", name.lower()) + ".raw")
            run = P.record(self.o.py_spy, [sys.executable, "-m", "edgebundle", *args], raw, env=self.env,
                           cwd=str(ROOT))
            shown = proc.shell_join(["edgebundle", *[a if not a.startswith(str(self.tmp)) else
                                                     a.replace(str(self.tmp), "$TMP") for a in args]])
            out.append({"name": name, "argv": shown, "wall": run.wall, "summary": P.summarize(raw)})
            self.log(f"  profiled {name}: {run.wall:.2f} s")

        self.log("profiles (py-spy)")
        for rt in RUNTIMES:
            home = self.tmp / f"home-profile-{rt}"
            site = SITE[(rt, "sweep")]
            for cache in (("cold", "warm") if rt == "containerd" else ("warm",)):
                record(f"pack, {rt} site, seed, {cache} cache",
                       ["--home", str(home), "pack", str(self.manifests["a"]), "--site", site, "-o",
                        str(d / f"{rt}-{cache}.ebundle"), "--no-progress", "--level", str(self.o.level)])
            dev = sites.start(rt, self.tmp)
            try:
                record(f"import, {rt} site, seed", ["import", str(self.bundles[(rt, "a")]["path"]),
                                                    *dev.import_args(), "--no-progress"])
            finally:
                dev.stop()
        self.r["profiles"] = out

    # -- consistency -------------------------------------------------------------------

    def consistency(self) -> None:
        b = self.r["bundles"]
        base = self.r["baselines"]
        for rt in RUNTIMES:
            a, u, c, d = (b[f"{rt}/{s}"]["bundle_bytes"] for s in "abcd")
            self.check(f"{rt}: update bundle < seed bundle", u < a, f"{u} vs {a}")
            self.check(f"{rt}: update bundle < 1/2 of the seed bundle", 2 * u < a, f"{u} vs {a}")
            self.check(f"{rt}: rebuild bundle > update bundle", c > u, f"{c} vs {u}")
            self.check(f"{rt}: fleet bundle > seed bundle", d > a, f"{d} vs {a}")
            e = b[f"{rt}/e"]["bundle_bytes"]
            self.check(f"{rt}: all-images bundle > fleet bundle", e > d, f"{e} vs {d}")
        for sc in "abcd":
            whole = f"containerd/{sc}-whole" if sc in "bc" else f"containerd/{sc}"
            cb = b[whole]["bundle_bytes"]
            dedup = base[sc]["layer_dedup"]
            # containerd carries the registry blobs as stored + zstd JSON + framing
            self.check(f"containerd {sc}: --no-delta bundle within framing of layer-level dedup",
                       dedup * 0.95 <= cb <= dedup * 1.01 + 64 * 1024, f"{cb} vs dedup {dedup}")
            for rt in RUNTIMES if sc in "bc" else ():
                d_, w_ = b[f"{rt}/{sc}"]["bundle_bytes"], b[f"{rt}/{sc}-whole"]["bundle_bytes"]
                self.check(f"{rt} {sc}: delta bundle <= layer-level bundle", d_ <= w_, f"{d_} vs {w_}")
            self.check(f"{sc}: layer dedup <= full registry bytes", dedup <= base[sc]["registry_full"])
        self.check("fleet layer dedup < sum of the images' registry sizes",
                   base["d"]["layer_dedup"] < sum(i.registry_bytes for i in self.set.fleet))  # type: ignore
        for p in self.r["packs"]:
            self.check(f"pack {p['scenario']} {p['runtime']} wrote a bundle", p["bundle_bytes"] > 0)

    # -- reproducibility -----------------------------------------------------------------

    def byte_counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for key, b in self.r["bundles"].items():
            out[f"bundle {key}"] = b["bundle_bytes"]
        for sc, b in self.r["baselines"].items():
            for f in ("docker_save", "docker_save_zstd3", "skopeo_oci", "ctr_export", "layer_dedup"):
                out[f"baseline {sc} {f}"] = b[f]
        for x in self.r.data.get("levels", []):
            out[f"level {x['level']}{' threads' if x.get('threads') else ''}"] = x["bundle_bytes"]
        for i in self.r["images"]["list"]:
            out[f"image {i['ref']} registry bytes"] = i["registry_bytes"]
        return out

    def reproducibility(self) -> None:
        """Compare every byte count with the previous run on the same cache, then store them."""
        path = self.o.cache / f"last-run-{'quick' if self.o.quick else 'full'}.json"
        now = {"date": self.r["machine"]["date"], "edgebundle": self.r["versions"]["edgebundle"],
               "level": self.o.level, "bytes": self.byte_counts()}
        prev = None
        if path.is_file():
            try:
                prev = json.loads(path.read_text())
            except ValueError:
                prev = None
        if prev and prev.get("level") == self.o.level:
            common = sorted(set(prev["bytes"]) & set(now["bytes"]))
            diffs = [(k, prev["bytes"][k], now["bytes"][k]) for k in common if prev["bytes"][k] != now["bytes"][k]]
            self.r["reproducibility"] = {"previous": prev["date"], "previous_edgebundle": prev["edgebundle"],
                                         "compared": len(common), "diffs": diffs}
            self.log(f"byte counts vs the previous run ({prev['date']}): {len(common) - len(diffs)} of "
                     f"{len(common)} identical")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now, indent=1))

    # -- run -------------------------------------------------------------------------

    def run(self, phases: Callable[["Bench"], None]) -> Results:
        try:
            phases(self)
        finally:
            self.stop_services()
        return self.r


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"
