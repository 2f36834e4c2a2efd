"""``--only pack``: the cold containerd-site pack against its slowest stage (issue 10).

A small phase of its own, for a machine where the full image set cannot be built (no
Debian mirror) or there is no time for the full run: one image of three gzip layers
sized like the full set's `bench/app:v1` (about 121 + 46 + 36 MB of tar), made of the
host's own files (binaries, libraries, text: realistic compressibility), pushed to a
private `docker-registry`. In one run it times

* the pack stages alone on those layers (``stages.measure``: fetch, sha256, gunzip, ...),
* cold packs (fresh ``--home``) and warm packs of a containerd site with the CLI of this
  checkout, and, with ``--before DIR`` (an unpacked older checkout, e.g.
  ``git archive main | tar -x -C DIR``), the same packs with that code, alternating
  run by run so that load from elsewhere falls on both;

and reports MB/s of content and the ratio to the slowest stage of a cold containerd
pack (``stages.PIPELINES["containerd-cold"]``), best of ``--pack-repeat``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import images as I
from . import proc, stages
from . import rootfs as R
from .rootfs import Node, Rootfs
from .sites import services

# (layer name, host source directories, tar bytes wanted): like bench/app:v1's layers
LAYERS: Tuple[Tuple[str, Tuple[str, ...], int], ...] = (
    ("base", ("/usr/lib/x86_64-linux-gnu", "/usr/bin"), 121_000_000),
    ("python", ("/usr/lib/python3.11", "/usr/share/perl"), 45_800_000),
    ("app", ("/usr/share/doc", "/usr/share/locale", "/usr/share/man"), 35_600_000),
)
EPOCH = 1704067200


def _host_files(srcs: Tuple[str, ...], dst: str, limit: int) -> Rootfs:
    """Regular files under ``srcs`` (sorted walk) until ``limit`` bytes, re-rooted at ``dst``.

    Unlike ``rootfs.host_tree`` it stops reading at the limit (the sources are GBs)."""
    out: Rootfs = {}
    total = 0
    for src in srcs:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel = os.path.relpath(dirpath, "/")
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if p.is_symlink() or not p.is_file() or "__pycache__" in p.parts:
                    continue
                try:
                    data = p.read_bytes()
                except OSError:
                    continue
                if total + len(data) > limit:
                    return R.with_parents(out)
                total += len(data)
                out[R.norm(f"{dst}/{rel}/{name}")] = Node("f", 0o644, data=data)
    return R.with_parents(out)


def free_cores(blob: bytes) -> float:
    """How many cores this process could use now: the same inflate + sha256 work (GIL
    released in both) on one thread, then on two at once; 2.0 when two cores are free."""
    import hashlib
    import threading
    import zlib

    def work() -> None:
        d = zlib.decompressobj(31)
        h = hashlib.sha256()
        for i in range(0, len(blob), stages.PIECE):
            h.update(d.decompress(blob[i:i + stages.PIECE]))

    def timed(n: int) -> float:
        threads = [threading.Thread(target=work) for _ in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    one = min(timed(1) for _ in range(2))
    two = min(timed(2) for _ in range(2))
    return 2 * one / two


def image(cache: Path) -> I.BenchImage:
    lc = I.LayerCache(cache / "packbench")
    layers = []
    for name, srcs, limit in LAYERS:
        key = f"packbench {name} {srcs} {limit} {os.uname().release}"
        layers.append(lc.get(f"{name}@host", key,
                             lambda s=srcs, n=name, lim=limit: R.layer_tar(_host_files(s, f"srv/{n}", lim), EPOCH)))
    return I.BenchImage("bench/hostapp", "v1", layers, {"Cmd": ["/bin/true"]}, EPOCH)


def run(opts: Any, tmp: Path, before: Optional[Path], log: Any) -> Dict[str, Any]:
    img = image(opts.cache)
    log(f"image {img.ref}: " + ", ".join(f"{l.name} {l.size / 1e6:.2f}/{l.tar_size / 1e6:.2f} MB"
                                         for l in img.layers) + " (gzip/tar)")
    reg = services.start_registry(tmp / "registry")
    try:
        I.imagefactory.push_image(reg.host, img.repo, img.tag, img.build())
        tars = [gzip.decompress(l.gz) for l in img.layers]
        st = stages.measure([l.gz for l in img.layers], tars, opts.level, tmp, registry=reg.host,
                            fetch_list=[(img.repo, l.digest) for l in img.layers],
                            threads=opts.threads, extras=False, one_worker=False, zstd=False,
                            repeat=2)
        del tars
        cores = free_cores(img.layers[1].gz)
        log(f"free cores (two threads of inflate + sha256 against one): {cores:.2f}")
        lim = stages.limits(st, "containerd-cold", opts.level)
        warm_lim = stages.limits(st, "containerd-warm", opts.level)
        log("stages: " + ", ".join(f"{k} {v['content_mbps']:.0f}" for k, v in st.items() if k != "_")
            + " MB/s of content")
        manifest = tmp / "manifest.yaml"
        manifest.write_text("version: 1\nregistries:\n  \"%s\": {insecure: true}\nimages:\n  - ref: %s/%s\n"
                            "sites:\n  edge-c: {runtime: containerd, namespace: k8s.io, platform: linux/amd64}\n"
                            % (reg.host, reg.host, img.ref))
        here = Path(__file__).resolve().parent.parent.parent
        # (name, checkout, extra pack flags): this checkout with its defaults, and with one
        # download at a time (what the streamed diff_id alone gives, without parallelism)
        trees: List[Tuple[str, Path, Tuple[str, ...]]] = [("after", here, ()),
                                                         ("after --jobs 1", here, ("--jobs", "1"))]
        if before is not None:
            trees.insert(0, ("before", before, ()))
        runs: Dict[str, Dict[str, List[float]]] = {name: {"cold": [], "warm": []} for name, _, _ in trees}
        cpu: Dict[str, List[float]] = {name: [] for name, _, _ in trees}
        sizes: Dict[str, int] = {}
        # As installed (pip compiles bytecode): a PYTHONDONTWRITEBYTECODE=1 environment (as
        # here) would otherwise recompile edgebundle on every run, ~0.2 s of each pack.
        env = {k: v for k, v in services.clean_env().items() if k != "PYTHONDONTWRITEBYTECODE"}
        for _, tree, _ in trees:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(tree / "edgebundle")], check=True,
                           env=env, stdout=subprocess.DEVNULL)
        for k in range(opts.pack_repeat):
            for name, tree, extra in (trees if k % 2 == 0 else list(reversed(trees))):
                home = tmp / f"home-{name.replace(' ', '')}-{k}"
                for cache in ("cold", "warm"):
                    out = tmp / f"{name}-{cache}.ebundle"
                    argv = [sys.executable, "-m", "edgebundle", "--home", str(home), "pack", str(manifest),
                            "--site", "edge-c", "-o", str(out), "--json", "--no-progress", *extra]
                    r = proc.run(argv, env={**env, "PYTHONPATH": str(tree)}, cwd=str(tree), poll=0.05).check()
                    res = json.loads(r.stdout)
                    runs[name][cache].append(r.wall)
                    if cache == "cold":
                        cpu[name].append(r.cpu)
                    sizes[f"{name}-{cache}"] = res["bundle_bytes"]
                    log(f"  {name} {cache} pack {k}: {r.wall:.2f} s, {res['bundle_bytes']} bytes")
                    out.unlink()
                shutil.rmtree(home, ignore_errors=True)
        content = sum(l.tar_size for l in img.layers)
        rows = []
        for name, by_cache in runs.items():
            for cache, walls in by_cache.items():
                best = min(walls)
                limit = lim if cache == "cold" else warm_lim
                mbps = content / 1e6 / best
                median = statistics.median(walls)
                rows.append({"code": name, "cache": cache, "walls": walls, "best_s": best, "mbps": mbps,
                             "median_s": median,
                             "median_ratio": content / 1e6 / median / float(limit["slowest_mbps"]),  # type: ignore[arg-type]
                             "cpu_s": min(cpu[name]) if cache == "cold" else None,
                             "slowest": limit["slowest"], "slowest_mbps": limit["slowest_mbps"],
                             "ratio": mbps / float(limit["slowest_mbps"])})  # type: ignore[arg-type]
        return {"free_cores": cores, "stages": st, "limits": {"cold": lim, "warm": warm_lim}, "rows": rows, "sizes": sizes,
                "content_mb": content / 1e6, "gz_mb": sum(l.size for l in img.layers) / 1e6,
                "layers": [{"name": l.name, "size": l.size, "tar_size": l.tar_size} for l in img.layers]}
    finally:
        reg.stop()


def render(res: Dict[str, Any]) -> str:
    """The result table (markdown)."""
    lines = ["| code | cache | pack s (best) | runs s | CPU s (best) | MB/s of content | slowest stage MB/s "
             "| pack / slowest | same, median run |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["rows"]:
        cpu = f"{r['cpu_s']:.2f}" if r.get("cpu_s") is not None else ""
        lines.append(f"| {r['code']} | {r['cache']} | {r['best_s']:.2f} | "
                     f"{', '.join(f'{w:.2f}' for w in r['walls'])} | {cpu} | {r['mbps']:.1f} | "
                     f"{r['slowest']} {r['slowest_mbps']:.0f} | {r['ratio']:.2f} | {r['median_ratio']:.2f} |")
    st = res["stages"]
    lines.append("")
    lines.append(f"Free cores before the packs (two threads of inflate + sha256 against one): "
                 f"{res['free_cores']:.2f} of 2.")
    lines.append("Stages (MB/s of content, same run): " + ", ".join(
        f"{k} {v['content_mbps']:.0f}" for k, v in st.items() if k != "_"))
    return "\n".join(lines)


def main_phase(opts: Any, tmp: Path, before: Optional[Path], json_path: Optional[str]) -> int:
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:7.1f}s] {msg}", flush=True)

    load0 = os.getloadavg()
    res = run(opts, tmp, before, log)
    res["load"] = {"start": load0, "end": os.getloadavg()}
    res["seconds"] = time.monotonic() - t0
    print(render(res))
    print(f"load average at start {' '.join(f'{x:.2f}' for x in load0)}, at end "
          f"{' '.join(f'{x:.2f}' for x in res['load']['end'])}")
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=1, default=str))
    return 0
