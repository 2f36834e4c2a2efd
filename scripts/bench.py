#!/usr/bin/env python3
"""edgebundle benchmark: bytes shipped, pack throughput, import time, importer memory, plan time.

Builds realistic, reproducible images (full mode: real Debian packages via mmdebstrap;
--quick: host files + busybox), pushes them to a private docker-registry, and runs four
scenarios for a containerd site and a Docker site, with the real `edgebundle` CLI against
fresh containerd/dockerd instances, side by side with `docker save | zstd -3`,
`skopeo copy`, `ctr images import` and `docker load` in the same run.

    bash scripts/bench --write-doc docs/BENCHMARKS.md     # full (~15 min; first run +2 min)
    bash scripts/bench --quick                            # < 1 min: every scenario, checks only

Exit status: 0 when every consistency check passed, 1 otherwise (goals are measured and
reported, never asserted), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from benchlib import deltas, fleet, report, runner  # noqa: E402


def default_cache() -> Path:
    env = os.environ.get("EDGEBUNDLE_BENCH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgebundle-bench"


def pack_default(dest: str) -> int:
    """The default of an `edgebundle pack` option, from the CLI's own parser."""
    from edgebundle.cli.main import build_parser

    parser = build_parser()
    for action in parser._actions:  # the subcommands
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict) and "pack" in choices:
            for a in choices["pack"]._actions:
                if a.dest == dest:
                    return int(a.default)
    raise SystemExit(f"bench: edgebundle pack has no --{dest} option")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="small images from host files, no mmdebstrap; checks consistency, never timings")
    ap.add_argument("--write-doc", metavar="PATH",
                    help="write the results as markdown (keeps the hand-written part above the marker)")
    ap.add_argument("--json", metavar="PATH", help="also write the raw results as JSON")
    ap.add_argument("--cache", metavar="DIR", type=Path, default=None,
                    help="image cache (default: $EDGEBUNDLE_BENCH_CACHE or ~/.cache/edgebundle-bench)")
    ap.add_argument("--level", type=int, default=None, help="edgebundle pack --level "
                    "(default: edgebundle's own default)")
    ap.add_argument("--repeat", type=int, default=None, help="repetitions of the import timelines "
                    "(default: 3; --quick: 1)")
    ap.add_argument("--pack-repeat", type=int, default=None, help="repetitions of the cold/warm packs "
                    "(default: 1)")
    ap.add_argument("--levels", default=None, help="comma-separated zstd levels for the level sweep "
                    "(default: 1,3,10,16,19; --quick: 3)")
    ap.add_argument("--plan-sites", type=int, default=None,
                    help="synthetic sites for the plan benchmark (default: 10000; --quick: 100)")
    ap.add_argument("--plan-budget", type=float, default=None,
                    help="seconds per runtime before the plan benchmark stops and projects "
                         "(default: 150; --quick: 10)")
    ap.add_argument("--py-spy", metavar="PATH", default=None,
                    help="profile a pack and an import per site kind with this py-spy binary "
                         "(e.g. after `pip install py-spy`); default: py-spy on PATH, if any (not in --quick)")
    ap.add_argument("--fleet-sites", type=int, default=None,
                    help="simulated sites for the pack-once-per-state measurement (default: 1000; --quick: 100)")
    ap.add_argument("--fleet-repack-all", action="store_true",
                    help="repack every packed state (bundle dropped, encoded cache warm), not only the "
                         "costliest, and count the deltas each computes again")
    ap.add_argument("--sync-sites", type=int, default=None,
                    help="real sshd sites for the up-to-date sync (default: 20; --quick: 4)")
    ap.add_argument("--only", choices=["fleet", "pack"], default=None,
                    help="fleet: run only this phase (with the images and registry it needs) and merge its "
                         "results into the saved results of the last run of the same mode "
                         "(last-results-{full,quick}.json in the cache); with --write-doc, rewrite the doc "
                         "from them. pack: the cold containerd pack against its slowest stage on an image "
                         "of host files (benchlib/packbench.py; prints a table, --json keeps it)")
    ap.add_argument("--before", metavar="DIR", type=Path, default=None,
                    help="with --only pack: also time the packs of the edgebundle checkout unpacked in DIR "
                         "(e.g. `git archive main | tar -x -C DIR`), alternating with this one")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (bundles, archives, logs)")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="measure nothing: re-render --write-doc from saved results (every run saves "
                         "them as last-results-{full,quick}.json in the cache)")
    args = ap.parse_args()
    if args.render:
        from benchlib import analysis
        data = json.loads(Path(args.render).read_text())
        data["analysis"] = analysis.explain(data)
        if not args.write_doc:
            print("bench: --render needs --write-doc PATH", file=sys.stderr)
            return 2
        report.write(Path(args.write_doc), data)
        print(f"bench: wrote {args.write_doc} from {args.render}")
        return 0
    if os.geteuid() != 0:
        print("bench: needs root (it starts containerd and dockerd, and runs mmdebstrap)", file=sys.stderr)
        return 2
    q = args.quick
    opts = runner.Options(
        quick=q, cache=args.cache or default_cache(),
        level=args.level if args.level is not None else pack_default("level"),
        threads=pack_default("threads") or (os.cpu_count() or 1),
        repeat=args.repeat if args.repeat is not None else (1 if q else 3),
        pack_repeat=args.pack_repeat if args.pack_repeat is not None else 1,
        levels=tuple(int(x) for x in (args.levels or ("3" if q else "1,3,10,16,19")).split(",") if x),
        plan_sites=args.plan_sites if args.plan_sites is not None else (100 if q else 10_000),
        plan_budget=args.plan_budget if args.plan_budget is not None else (10.0 if q else 150.0),
        keep=args.keep,
        py_spy=args.py_spy or (None if q else shutil.which("py-spy")),
        fleet_sites=args.fleet_sites if args.fleet_sites is not None else (100 if q else 1000),
        fleet_repack_all=args.fleet_repack_all,
        sync_sites=args.sync_sites if args.sync_sites is not None else (4 if q else 20),
        parallels=(2, 4) if q else (4, 8),
        upload_rounds=1 if q else 3,
        sync_repeat=1 if q else 3)
    for flag, n in (("--fleet-sites", opts.fleet_sites), ("--sync-sites", opts.sync_sites)):
        if n < 1:
            print(f"bench: {flag} {n}: need at least 1", file=sys.stderr)
            return 2
    if args.only == "pack":
        from benchlib import packbench
        tmp = Path(tempfile.mkdtemp(prefix="ebbench-pack-"))
        try:
            return packbench.main_phase(opts, tmp, args.before, args.json)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    saved = opts.cache / f"last-results-{'quick' if q else 'full'}.json"
    merge_into: Optional[Dict[str, Any]] = None
    alone = False  # --only fleet with no whole run to merge into: report the phase by itself
    if args.only:
        try:
            merge_into = json.loads(saved.read_text())
        except (OSError, ValueError) as exc:
            if args.only == "fleet" and not args.write_doc:
                merge_into, alone = {}, True  # its goals and --json; nothing saved
            else:
                print(f"bench: --only {args.only} merges into the saved results of a whole run, and {saved} "
                      f"cannot be read ({exc}); run the whole benchmark once first "
                      f"(bash scripts/bench{' --quick' if q else ''}), or measure the phase alone "
                      "without --write-doc", file=sys.stderr)
                return 2
    tmp = Path(tempfile.mkdtemp(prefix="ebbench-"))
    bench = runner.Bench(opts, tmp)
    t0 = time.monotonic()

    def phases(b: runner.Bench) -> None:
        b.machine()
        b.build_images()
        b.plan_bench()
        b.start_services()
        b.stage_speeds()
        b.baselines()
        b.packs_and_imports()
        deltas.run(b)
        b.level_sweep()
        fleet.run(b)
        b.profiles()
        b.consistency()
        b.reproducibility()

    def only_fleet(b: runner.Bench) -> None:
        b.machine()
        b.build_images()
        b.start_services(helper=False)
        fleet.run(b)

    try:
        res = bench.run(only_fleet if args.only else phases)
    except Exception:
        print(f"bench: failed; temp dir kept at {tmp}", file=sys.stderr)
        raise
    res["machine"]["load_end"] = runner._loadavg()
    res["quick"] = q
    res["level"] = opts.level
    res["threads"] = opts.threads
    res["repeat"] = opts.repeat
    res["pack_repeat"] = opts.pack_repeat
    res["elapsed_s"] = time.monotonic() - t0
    res["command"] = " ".join(["bash scripts/bench", *sys.argv[1:]])
    res["fleet"]["run"].update(command=res["command"], edgebundle=res["versions"]["edgebundle"])
    from benchlib import analysis
    if merge_into is not None:
        data = merge(merge_into, res)
    else:
        data = res.data | {"checks": res.checks}
    if alone:
        summary(report.fleet_goals(data), "fleet goals (measured, not asserted; no whole run to merge "
                                          "into, nothing saved)")
    else:
        data["analysis"] = analysis.explain(data)
        summary(report.goals(data))
    if args.write_doc:
        report.write(Path(args.write_doc), data)
        print(f"bench: wrote {args.write_doc}" + (f" (the {args.only} phase merged into {saved})"
                                                   if args.only else ""))
    raw = json.dumps(data, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(raw)
    try:
        opts.cache.mkdir(parents=True, exist_ok=True)
        if not alone:
            saved.write_text(raw)
    except OSError as exc:
        print(f"bench: could not save the results in {opts.cache}: {exc}", file=sys.stderr)
    if args.keep:
        print(f"bench: kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = [c for c in res.checks if not c[1]]
    print(f"bench: {len(res.checks) - len(failed)} of {len(res.checks)} consistency checks passed "
          f"in {res['elapsed_s']:.0f} s")
    for name, _, detail in failed:
        print(f"bench: FAILED {name}: {detail}")
    return 1 if failed else 0


def merge(saved: Dict[str, Any], res: runner.Results) -> Dict[str, Any]:
    """The saved results of a whole run with this run's fleet phase in place of theirs:
    its numbers and its checks (named "fleet ..."); the rest, with its own command and
    machine, stays as measured then (the fleet section names its own command)."""
    data = dict(saved)
    data["fleet"] = res["fleet"]
    data["checks"] = [c for c in saved.get("checks", []) if not str(c[0]).startswith("fleet")] + \
        [c for c in res.checks if str(c[0]).startswith("fleet")]
    return data


def summary(rows: List[Tuple[str, str, Optional[bool], str]], title: str = "goals (measured, not asserted)") -> None:
    print(f"\n== {title}")
    for goal, measured, ok, _ in rows:
        print(f"  {'met   ' if ok else 'MISSED' if ok is False else 'n/a   '} {goal}: {measured}")


if __name__ == "__main__":
    sys.exit(main())
