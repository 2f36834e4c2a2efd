"""``edgebundle sync``: arguments in, a progress display while it runs, a summary out.

The work is ``sync.run``'s; this module only selects sites, shows what happens and
says how it ended (a table, or ``--json``), with exit 16 when some site is not done.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from tqdm import tqdm

from ..errors import SyncIncomplete, UsageError
from ..manifest import load_manifest
from ..specs import ManifestList, SiteSpec
from ..sync.run import SiteOutcome, Syncer, SyncOptions
from ..trust import load_signing_key
from ..usecases.packer import PackerSession
from ..volumeset import parse_size
from .main import emit_json
from .packer import _Bars, _created, _home, _mb, jobs_arg, ssh_options


class _Display:
    """A bar for the fleet and one per site being worked on (tqdm, on stderr)."""

    def __init__(self, total: int, parallel: int) -> None:
        self._lock = threading.Lock()
        self._overall = tqdm(total=total, desc="sites done", unit="site", file=sys.stderr,
                             position=0, leave=False)
        self._bars: Dict[str, Any] = {}
        self._slots: Dict[str, int] = {}
        self._free = list(range(1, parallel + 1))

    def _bar(self, site: str) -> Any:
        bar = self._bars.get(site)
        if bar is None:
            slot = self._free.pop(0) if self._free else len(self._bars) + 1
            bar = tqdm(total=None, desc=site, unit="B", unit_scale=True, unit_divisor=1024,
                       file=sys.stderr, position=slot, leave=False)
            self._bars[site], self._slots[site] = bar, slot
        return bar

    def phase(self, site: str, what: str) -> None:
        with self._lock:
            bar = self._bar(site)
            bar.set_description_str(f"{site}: {what}")

    def upload(self, site: str, sent: int, total: int) -> None:
        with self._lock:
            bar = self._bar(site)
            bar.total = total
            bar.update(sent - bar.n)

    def finished(self, outcome: SiteOutcome) -> None:
        with self._lock:
            bar = self._bars.pop(outcome.site, None)
            if bar is not None:
                self._free.append(self._slots.pop(outcome.site))
                bar.close()
            self._overall.update(1)

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._overall.close()


def select_sites(args: argparse.Namespace, manifest: ManifestList) -> List[SiteSpec]:
    """``--site`` names (in order, once each) or ``--all`` (sorted)."""
    if args.all and args.site:
        raise UsageError("--all and --site both select sites", "pass one of them")
    if args.all:
        return [manifest.sites[name] for name in sorted(manifest.sites)]
    if not args.site:
        raise UsageError("sync needs the sites to work on",
                         "name them with --site SITE (repeatable), or pass --all")
    seen: Dict[str, SiteSpec] = {}
    for name in args.site:
        seen.setdefault(name, manifest.site(name))  # an unknown name is a UsageError there
    return list(seen.values())


def sync_options(args: argparse.Namespace) -> SyncOptions:
    for flag, value, low in (("--parallel", args.parallel, 1), ("--retries", args.retries, 0)):
        if value < low:
            raise UsageError(f"{flag} {value} is below {low}", f"pass {flag} {max(low, 1)} or more")
    for flag, seconds in (("--retry-delay", args.retry_delay), ("--site-timeout", args.site_timeout),
                          ("--command-timeout", args.command_timeout), ("--timeout", args.timeout)):
        if not seconds > 0 and not (flag == "--retry-delay" and seconds == 0):
            raise UsageError(f"{flag} {seconds:g} is not a positive number of seconds",
                             f"pass e.g. {flag} 60")
    rate = None if args.limit_rate is None else \
        parse_size(args.limit_rate, "--limit-rate", minimum=1024, example="200k")
    signers = tuple(load_signing_key(path) for path in args.sign)  # a bad key fails before any work
    return SyncOptions(ssh=ssh_options(args), parallel=args.parallel, retries=args.retries,
                       retry_delay=args.retry_delay, site_timeout=args.site_timeout,
                       command_timeout=args.command_timeout, limit_rate=rate, dry_run=args.dry_run,
                       level=args.level, threads=args.threads, deltas=not args.no_delta,
                       signers=signers, created=_created())


def cmd_sync(args: argparse.Namespace) -> int:
    options = sync_options(args)
    jobs = jobs_arg(args)
    manifest = load_manifest(args.manifest)
    sites = select_sites(args, manifest)
    show = not args.no_progress and not args.json and sys.stderr.isatty()
    display = _Display(len(sites), options.parallel) if show else None
    started = time.monotonic()
    try:
        with PackerSession(_home(args), manifest, progress=_Bars(show),
                           jobs=jobs) as session:
            syncer = Syncer(session, options, display)
            outcomes = syncer.run(sites)
            packed = len(syncer.packer.packed)
    finally:
        if display is not None:
            display.close()
    seconds = time.monotonic() - started
    failed = [o for o in outcomes if not o.ok]
    if args.json:
        emit_json(summary_json(outcomes, packed, seconds, options.dry_run))
    else:
        print_summary(outcomes, packed, seconds, options.dry_run, sys.stdout)
    if failed:
        names = ", ".join(o.site for o in failed[:10]) + (", …" if len(failed) > 10 else "")
        raise SyncIncomplete(f"{len(failed)} of {len(outcomes)} sites not done: {names}",
                             "each one's error is in the summary; fix those and run sync again "
                             "(it resumes uploads and skips sites already done)")
    return 0


def summary_json(outcomes: Sequence[SiteOutcome], packed: int, seconds: float,
                 dry_run: bool) -> Dict[str, Any]:
    return {
        "ok": all(o.ok for o in outcomes), "dry_run": dry_run,
        "sites": [o.to_json() for o in outcomes],
        "total": {"sites": len(outcomes), "done": sum(1 for o in outcomes if o.ok and not dry_run),
                  "failed": sum(1 for o in outcomes if not o.ok),
                  "bytes_sent": sum(o.bytes_sent for o in outcomes),
                  "ship_bytes": sum(o.ship_bytes for o in outcomes if o.action in ("planned", "updated")),
                  "bundles_packed": packed, "seconds": round(seconds, 3)},
    }


_RESULT = {"up-to-date": "up to date", "updated": "updated", "planned": "would ship"}


def print_summary(outcomes: Sequence[SiteOutcome], packed: int, seconds: float, dry_run: bool,
                  out: Any) -> None:
    rows = [("SITE", "BEFORE", "AFTER", "SHIPS" if dry_run else "SENT", "TIME", "RESULT")]
    for o in outcomes:
        before = str(o.before) if o.before else "-"
        after = str(o.after) if o.after else "-"
        amount = _size(o.ship_bytes) if dry_run else _size(o.bytes_sent)
        if o.ok:
            result = _RESULT[o.action]
            if o.action == "planned":
                result += f" {_size(o.ship_bytes)}" + (f" (bundle packed: {_size(o.bundle_bytes)})"
                                                       if o.bundle_bytes else "")
            elif o.resumed_from:
                result += f" (upload resumed at {_size(o.resumed_from)})"
        else:
            result = f"FAILED (exit {o.exit_code}): {o.error}"
        rows.append((o.site, before, after, amount, f"{o.seconds:.1f}s", result))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5], file=out)
    done = sum(1 for o in outcomes if o.ok)
    failed = len(outcomes) - done
    if dry_run:
        total = sum(o.ship_bytes for o in outcomes if o.action == "planned")
        print(f"dry run: {sum(1 for o in outcomes if o.action == 'planned')} of {len(outcomes)} sites "
              f"would get a bundle, {_size(total)} in total (plan estimate at registry sizes); "
              f"{failed} not reachable or not planned; nothing was changed", file=out)
        return
    sent = sum(o.bytes_sent for o in outcomes)
    print(f"{done} of {len(outcomes)} sites done, {failed} failed; {packed} bundle(s) packed; "
          f"{_size(sent)} sent in {seconds:.1f}s", file=out)


def _size(n: Optional[int]) -> str:
    return "0" if not n else _mb(n)
