"""The content-delta phase: bytes against `zstd --patch-from`, import and pack times, memory.

Scenarios (each per runtime, on a fresh device):

* (b) app update and (c) rebuild on the security-updated base: the delta bundles of the
  main timeline, against their layer-level (`--no-delta`) bundles and against the
  reference `zstd -19 --long=31 --patch-from=OLD.tar NEW.tar`, where OLD is the `docker
  save` tar of the image(s) the site holds (concatenated) and NEW the new image's;
* (f) base-only security update: the site holds bench/base:v1 and gets bench/base:v3;
* (g) one large file (300 MB in full mode) edited in 8 places: the device's peak memory.

Timings: the delta bundle's import against the layer-level bundle's import of the same
images into a device in the same state; the pack of (c) with warm blobs but no cached
deltas (computing them), and again with them cached (what the next site costs).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from . import proc, sites

if TYPE_CHECKING:
    from .runner import Bench

RUNTIMES = ("containerd", "docker")


def patch_from(b: "Bench", name: str, olds: List[Path], new: Path) -> Dict[str, Any]:
    """The reference: `zstd -19 --long=31 --patch-from`, create and apply, with peak RSS."""
    d = b.tmp / "patch-from"
    d.mkdir(exist_ok=True)
    old = olds[0]
    if len(olds) > 1:
        old = d / f"{name}-old.tar"
        with open(old, "wb") as out:
            for part in olds:
                with open(part, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 20)
    argv = f"zstd -19 --long=31 --patch-from={'+'.join(p.name for p in olds)} {new.name}"
    # -19 over hundreds of MB takes many minutes on one core, and depends only on the two
    # tars: a result is kept in the bench cache under their digests (and the zstd version).
    key = hashlib.sha256(f"{_zstd_version()} {_sha(old)} {_sha(new)}".encode()).hexdigest()[:32]
    cached = b.o.cache / "patch-from" / f"{key}.json"
    if cached.is_file():
        row = json.loads(cached.read_text())
        row["argv"], row["cached"] = argv, True
        b.log(f"  patch-from {name}: {row['bytes']:,} bytes (measured {row['measured_at']}, cached)")
        return row
    patch = d / f"{name}.zst"
    create = proc.run(["zstd", "-19", "--long=31", "-q", "-f", f"--patch-from={old}", str(new),
                       "-o", str(patch)]).check()
    apply = proc.run(["zstd", "-d", "--long=31", "-q", "-f", f"--patch-from={old}", str(patch),
                      "-o", str(d / f"{name}.out")]).check()
    same = _sha(d / f"{name}.out") == _sha(new)
    b.check(f"patch-from {name} round trip", same)
    (d / f"{name}.out").unlink()
    row = {"bytes": patch.stat().st_size, "create_s": create.wall, "create_rss_kb": create.tree_kb,
           "apply_s": apply.wall, "apply_rss_kb": apply.tree_kb, "old_bytes": old.stat().st_size,
           "new_bytes": new.stat().st_size, "argv": argv,
           "measured_at": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if same:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(row))
    b.log(f"  patch-from {name}: {row['bytes']:,} bytes in {create.wall:.1f} s "
          f"(RSS {create.tree_kb // 1024} MiB; apply {apply.tree_kb // 1024} MiB)")
    return row


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def _zstd_version() -> str:
    return proc.run(["zstd", "--version"]).check().stdout.strip()


def save_tar(b: "Bench", img: Any, name: str) -> Path:
    """`docker save` of one image on the packer-side helper dockerd."""
    from .runner import SAVE_REGISTRY
    docker = b.helper.docker_argv()
    ref = b.ref(img)
    fixed = f"{SAVE_REGISTRY}/{img.ref}"
    proc.run(docker + ["pull", "-q", ref]).check()
    proc.run(docker + ["tag", ref, fixed]).check()
    out = b.tmp / "baselines" / f"{name}-docker-save.tar"
    proc.run(docker + ["save", "-o", str(out), fixed]).check()
    return out


def delta_stats(plan: Dict[str, Any]) -> Dict[str, int]:
    out = {"copied": 0, "patched": 0, "literal": 0, "layers": 0}
    for img in plan["images"]:
        for layer in img["layers"]:
            if layer.get("delta"):
                out["layers"] += 1
                for k in ("copied", "patched", "literal"):
                    out[k] += layer["delta"][k]
    return out


def patch_levels(b: "Bench", levels=(3, 6, 9, 12, 15, 19)) -> List[Dict[str, Any]]:
    """edgebundle's windowed patch (delta._compress) at several zstd levels, on (up to
    48 MB of) the big file pair (g): bytes and seconds."""
    from edgebundle import delta as D
    from .images import BIG_FILE, big_file
    size = min(BIG_FILE["quick" if b.o.quick else "full"], 48_000_000)
    pairs = {"big file, 8 edits": (big_file("v1", size), big_file("v2", size))}
    rows = []
    for name, (old, new) in pairs.items():
        for level in levels:
            saved = D.PATCH_LEVEL
            D.PATCH_LEVEL = level
            try:
                t0 = time.perf_counter()
                total = 0
                for start in range(0, len(new), D.WINDOW):
                    chunk = new[start:start + D.WINDOW]
                    lo = max(0, start - D.MARGIN)
                    total += len(D._compress(chunk, old[lo:start + len(chunk) + D.MARGIN]))
                rows.append({"pair": name, "bytes_in": len(new), "level": level, "patch_bytes": total,
                             "seconds": time.perf_counter() - t0})
            finally:
                D.PATCH_LEVEL = saved
            b.log(f"  patch level {level:>2} on {name} ({len(new):,} B): {rows[-1]['patch_bytes']:,} B "
                  f"in {rows[-1]['seconds']:.2f} s")
    return rows


def run(b: "Bench") -> None:
    from .runner import SITE
    assert b.set is not None
    x = b.set.extras
    base = b.r["baselines"]
    b.log("== content deltas: references, base-only update, big file, import and pack times")
    refs: Dict[str, Dict[str, Any]] = {}
    paths = {sc: Path(base[sc]["paths"]["save"]) for sc in "abc"}
    refs["b"] = patch_from(b, "b", [paths["a"]], paths["b"])
    refs["c"] = patch_from(b, "c", [paths["a"], paths["b"]], paths["c"])
    refs["f"] = patch_from(b, "f", [save_tar(b, x["base-v1"], "f0")], save_tar(b, x["base-v3"], "f"))
    b.manifest("f0", [x["base-v1"]])
    b.manifest("f", [x["base-v3"]])
    b.manifest("g0", [x["big-v1"]])
    b.manifest("g", [x["big-v2"]])
    rows: List[Dict[str, Any]] = []
    bdir = b.tmp / "bundles"
    for rt in RUNTIMES:
        site = SITE[(rt, "edge")]
        # (b), (c): import the layer-level bundles into a device in the same states as
        # the main timeline's delta imports (a, then b, then c)
        dev = sites.start(rt, b.tmp)
        try:
            b.eb_import(b.bundles[(rt, "a")]["path"], dev)
            for sc in "bc":
                whole = b.bundles[(rt, f"{sc}-whole")]
                run_ = b.eb_import(whole["path"], dev)
                b.r["imports"].append(b._import_row(f"{sc}-whole", rt, "edgebundle", 0, whole, run_))
                b._verify(sc, rt, dev, b.scenario_images()[sc], whole, run_)
        finally:
            dev.stop()
        for sc in "bc":
            delta, whole = b.bundles[(rt, sc)], b.bundles[(rt, f"{sc}-whole")]
            rows.append(_row(b, sc, rt, delta, whole, refs[sc]))
        # (f) and (g): seed the old image, report, then the delta and the layer-level bundle
        for sc, old, new in (("f", "base-v1", "base-v3"), ("g", "big-v1", "big-v2")):
            home = b.tmp / f"home-{sc}-{rt}"
            seed = bdir / f"{sc}0-{rt}.ebundle"
            b.pack(home, b.manifests[f"{sc}0"], site, seed)
            timings: Dict[str, Any] = {}
            for kind in ("whole", "delta"):
                dev = sites.start(rt, b.tmp)
                try:
                    report = b.tmp / f"report-{sc}-{rt}-{kind}.json"
                    b.eb_import(seed, dev, report)
                    b.eb("--home", str(home), "inventory", "record", site, str(report)).check()
                    out = bdir / f"{sc}-{rt}-{kind}.ebundle"
                    extra = ("--no-delta",) if kind == "whole" else ()
                    res = b.pack(home, b.manifests[sc], site, out, extra=extra)
                    info = {"path": out, **b._pack_row(sc if kind == "delta" else f"{sc}-whole",
                                                       rt, "incremental", 0, res)}
                    b.r["packs"].append({k: v for k, v in info.items() if k != "path"})
                    b.bundles[(rt, sc if kind == "delta" else f"{sc}-whole")] = info
                    run_ = b.eb_import(out, dev)
                    b.r["imports"].append(b._import_row(sc if kind == "delta" else f"{sc}-whole",
                                                        rt, "edgebundle", 0, info, run_))
                    b._verify(sc, rt, dev, [x[new]], info, run_)
                    timings[kind] = (info, res)
                finally:
                    dev.stop()
            delta, whole = b.bundles[(rt, sc)], b.bundles[(rt, f"{sc}-whole")]
            rows.append(_row(b, sc, rt, delta, whole, refs.get(sc), timings["delta"][1]["plan"]))
        # pack (c) with warm blobs and no cached deltas, then again with them cached
        rows.append(_pack_c(b, rt, site))
    b.r["deltas"] = {"rows": rows, "refs": refs, "patch_levels": patch_levels(b),
                     "big_file_bytes": len(x["big-v1"].layers[-1].gz)}
    b.r["bundles"] = {f"{rt}/{sc}": {k: v for k, v in bb.items() if k != "path"}
                      for (rt, sc), bb in b.bundles.items()}


def _row(b: "Bench", sc: str, rt: str, delta: Dict[str, Any], whole: Dict[str, Any],
         ref: Optional[Dict[str, Any]], plan: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    imp = [i for i in b.r["imports"] if i["runtime"] == rt and i["tool"] == "edgebundle"]
    d_imp = min((i["wall"] for i in imp if i["scenario"] == sc), default=None)
    w_imp = min((i["wall"] for i in imp if i["scenario"] == f"{sc}-whole"), default=None)
    rss = max((i["hwm_kb"] for i in imp if i["scenario"] == sc), default=0)
    row = {"scenario": sc, "runtime": rt, "delta_bytes": delta["bundle_bytes"],
           "whole_bytes": whole["bundle_bytes"], "ref_bytes": ref["bytes"] if ref else None,
           "pack_s": delta["wall"], "import_s": d_imp, "whole_import_s": w_imp,
           "import_rss_kb": rss, "stats": delta_stats(plan) if plan else delta["delta_stats"]}
    b.log(f"  {sc} {rt}: delta {row['delta_bytes']:,} B, layer-level {row['whole_bytes']:,} B"
          + (f", patch-from {row['ref_bytes']:,} B" if ref else "")
          + (f"; import {d_imp:.2f} s vs {w_imp:.2f} s" if d_imp and w_imp else "")
          + f"; importer RSS {rss // 1024} MiB")
    return row


def _pack_c(b: "Bench", rt: str, site: str) -> Dict[str, Any]:
    """Pack (c) for a site in state (b): blobs cached, deltas computed, then cached."""
    home = b.tmp / f"home-{rt}"
    warm = b.tmp / f"home-c-deltas-{rt}"
    shutil.copytree(home / "cache" / "blobs", warm / "cache" / "blobs")
    shutil.copytree(home / "cache" / "layers", warm / "cache" / "layers")
    b.eb("--home", str(warm), "inventory", "record", site,
         str(b.tmp / f"report-{rt}-b.json")).check()
    out = b.tmp / "bundles" / f"c-{rt}-deltas-warm.ebundle"
    first = b.pack(warm, b.manifests["c"], site, out)
    again = b.pack(warm, b.manifests["c"], site, out)
    b.check(f"pack c {rt}: cached deltas give the same bundle",
            first["bundle_bytes"] == again["bundle_bytes"])
    stats = delta_stats(first["plan"])
    b.log(f"  pack c {rt}: deltas computed in {first['_wall']:.1f} s, cached {again['_wall']:.1f} s; "
          f"changed bytes {stats['patched'] + stats['literal']:,} of "
          f"{stats['patched'] + stats['literal'] + stats['copied']:,}")
    return {"scenario": "c-pack", "runtime": rt, "compute_s": first["_wall"],
            "cached_s": again["_wall"], "stats": stats, "argv": first["_argv"]}


def summary_json(r: Dict[str, Any]) -> str:
    return json.dumps(r.get("deltas", {}), indent=1, default=str)
