"""Packer commands: plan, pack, inventory. Needs the ``packer`` extra.

Arguments in, printing out; the work is ``usecases.packer``'s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Set

from ..cache import default_home
from ..errors import UsageError
from ..holdings import Inventory
from ..plan import LayerPlan, Plan
from ..progress import NULL_BAR
from ..report import inventory_to_json, rfc3339
from ..transfer.options import SshOptions
from ..trust import load_signing_key
from ..usecases import packer as usecases
from ..volumeset import FAT32_VOLUME_SIZE, parse_size
from .main import emit_json


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home) if args.home else default_home()


def _created() -> Optional[str]:
    """``SOURCE_DATE_EPOCH`` (reproducible builds) as the bundle's creation time."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return None
    try:
        when = datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise UsageError(f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix time",
                         "set it to seconds since 1970, e.g. $(git log -1 --format=%ct)") from None
    return rfc3339(when)


class _Bars:
    """tqdm factory handed to the resolver: one bar per step (all downloads share one)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, total: Optional[int], desc: str) -> Any:
        if not self.enabled:
            return NULL_BAR
        from tqdm import tqdm  # only when shown: importing it costs ~30 ms of every pack

        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                    leave=False, file=sys.stderr)


def jobs_arg(args: argparse.Namespace) -> int:
    """``--jobs N``: parallel layer downloads (checked before any work)."""
    jobs: int = args.jobs
    if jobs < 1:
        raise UsageError(f"--jobs {jobs}: at least one download must run",
                         "pass --jobs 1 or more (default 3, as Docker's max-concurrent-downloads)")
    return jobs


def plan_json(plan: Plan) -> Dict[str, Any]:
    held = {p.chain_id for p in plan.prerequisites}
    return {
        "site": plan.site, "runtime": plan.runtime, "namespace": plan.namespace,
        "platform": plan.platform, "layer_form": plan.layer_form,
        "ship_bytes": plan.ship_bytes, "full_bytes": plan.full_bytes,
        "prerequisites": [p.to_wire() for p in plan.prerequisites],
        "images": [{
            "name": ip.image.name, "status": "up-to-date" if ip.up_to_date else "ship",
            "top": ip.image.top.digest, "config": ip.image.config.digest,
            "platform": str(ip.image.platform),
            "ship_bytes": ip.ship_bytes, "full_bytes": ip.full_bytes,
            # the registry or mirror that served it this run; null: from the cache
            "source": plan.source_of(ip.image.top.digest),
            "layers": [_layer_json(lp, held, plan.source_of(lp.layer.digest)) for lp in ip.layers],
        } for ip in plan.images],
    }


def _layer_json(lp: LayerPlan, held: Set[str], source: Optional[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"digest": lp.layer.digest, "diff_id": lp.layer.diff_id,
                           "size": lp.layer.size, "ship": lp.ship, "how": _how(lp, held),
                           "source": source}
    if lp.delta is not None:
        out["delta"] = {"entry": lp.delta.entry, "bytes": lp.delta.stored,
                        "bases": [b.diff_id for b in lp.delta.bases],
                        "copied": lp.delta.copied, "patched": lp.delta.patched,
                        "literal": lp.delta.literal}
    if lp.note:
        out["note"] = lp.note
    return out


def _how(lp: LayerPlan, held: Set[str]) -> str:
    """delta | whole | held | shared (shipped with an earlier image of the bundle)."""
    if lp.ship:
        return "delta" if lp.delta is not None else "whole"
    return "shared" if lp.chain_id not in held and lp.entry else "held"


def _mb(n: int) -> str:
    """Sizes as people read them: kB below a megabyte (a delta is often a few kB)."""
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _print_plan(plan: Plan, out: Any) -> None:
    ns = f", namespace {plan.namespace}" if plan.namespace else ""
    print(f"site {plan.site}: {plan.runtime}{ns}, {plan.platform}, layers as {plan.layer_form}",
          file=out)
    for ip in plan.images:
        shipped = sum(1 for lp in ip.layers if lp.ship)
        status = "up to date" if ip.up_to_date else \
            f"ship {_mb(ip.ship_bytes)}: {shipped} of {len(ip.layers)} layers"
        source = plan.source_of(ip.image.top.digest)
        print(f"  {ip.image.name}  [{ip.image.platform}]  {status}"
              + (f"  (from {source})" if source else ""), file=out)
        if ip.up_to_date:
            continue
        for lp in ip.layers:
            if not lp.ship:
                continue
            short = lp.layer.digest[7:19]
            source = plan.source_of(lp.layer.digest)
            origin = f" from {source}" if source else ""
            if lp.delta is not None:
                bases = ", ".join(b.diff_id[7:19] for b in lp.delta.bases)
                print(f"    {short}  delta {_mb(lp.delta.stored)} (whole {_mb(lp.layer.size)}) "
                      f"against {bases}{origin}", file=out)
            else:
                why = f" ({lp.note[len('whole: '):]})" if lp.note.startswith("whole: ") else ""
                print(f"    {short}  whole {_mb(lp.layer.size)}{why}{origin}", file=out)
    full = plan.full_bytes
    pct = f" ({100 * plan.ship_bytes / full:.1f}%)" if full else ""
    print(f"ships {_mb(plan.ship_bytes)} of {_mb(full)} for a full transfer{pct}; "
          f"{len(plan.prerequisites)} layers already on the site", file=out)


def cmd_plan(args: argparse.Namespace) -> int:
    show = sys.stderr.isatty() and not args.json
    plan = usecases.plan_site(_home(args), args.manifest, args.site, deltas=not args.no_delta,
                              progress=_Bars(show), jobs=jobs_arg(args))
    if args.json:
        emit_json(plan_json(plan))
    else:
        _print_plan(plan, sys.stdout)
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    to_stdout = args.output == "-"
    if to_stdout and args.json:
        raise UsageError("--json and -o - both want standard output",
                         "write the bundle to a file, or drop --json (the summary goes to stderr)")
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads} is negative", "pass 0 (one per CPU) or more")
    jobs = jobs_arg(args)
    volume_size = FAT32_VOLUME_SIZE if args.fat32 else \
        parse_size(args.volume_size) if args.volume_size is not None else None
    if volume_size is not None and to_stdout:
        raise UsageError("volumes are files: -o - cannot take --volume-size or --fat32",
                         "name the output file, e.g. -o /media/usb/site.ebundle")
    show = not args.no_progress and sys.stderr.isatty() and not args.json
    signers = [load_signing_key(path) for path in args.sign]  # a bad key fails before any work
    outcome = usecases.pack_site(_home(args), args.manifest, args.site, args.output,
                                 full=args.full, level=args.level, threads=args.threads,
                                 created=_created(), progress=_Bars(show),
                                 deltas=not args.no_delta, signers=signers,
                                 volume_size=volume_size, jobs=jobs)
    stats, plan = outcome.stats, outcome.plan
    if args.json:
        emit_json({"bundle": outcome.output, "bundle_bytes": stats.bundle_bytes,
                   "signed_by": [s.key_id for s in signers],
                   "entries": stats.entries, "images": stats.images,
                   "ship_registry_bytes": stats.ship_registry_bytes,
                   "full_registry_bytes": stats.full_registry_bytes, "plan": plan_json(plan),
                   "volumes": list(outcome.volumes)})
        return 0
    out = sys.stderr if to_stdout else sys.stdout  # stdout carries the bundle
    _print_plan(plan, out)
    full = stats.full_registry_bytes
    pct = f" = {100 * stats.bundle_bytes / full:.1f}% of a full transfer" if full else ""
    where = "standard output" if to_stdout else outcome.output
    if outcome.volumes:
        where = f"{len(outcome.volumes)} volume(s) {outcome.volumes[0]} … {outcome.volumes[-1]}" \
            if len(outcome.volumes) > 1 else f"1 volume {outcome.volumes[0]}"
    signed = f", signed by {', '.join(s.key_id for s in signers)}" if signers else ""
    print(f"wrote {where}: {stats.bundle_bytes} bytes, {stats.entries} entries, "
          f"{stats.images} images{pct} ({full} bytes){signed}", file=out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..usecases import export

    if args.output == "-" and args.json:
        raise UsageError("--json and -o - both want standard output",
                         "write the archive to a file, or drop --json (the summary goes to stderr)")
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads} is negative", "pass 0 (one per CPU) or more")
    jobs = jobs_arg(args)
    show = not args.no_progress and sys.stderr.isatty() and not args.json
    outcome = export.export_site(_home(args), args.manifest, args.site, args.archive_format,
                                 args.output, level=args.level, threads=args.threads,
                                 only=args.image, progress=_Bars(show), jobs=jobs)
    if args.json:
        emit_json(export_json(outcome))
        return 0
    out = sys.stderr if args.output == "-" else sys.stdout  # stdout carries the archive
    for img in outcome.images:
        named = img.manifest if outcome.platform_manifests else img.top
        print(f"  {img.name}  [{img.platform}]  {named.digest}  {len(img.layers)} layers", file=out)
    where = "standard output" if args.output == "-" else outcome.output
    packed = "" if outcome.compression == "none" else f", {outcome.compression}"
    print(f"wrote {where}: {outcome.format}{packed}, {len(outcome.images)} images for site "
          f"{outcome.site} ({outcome.platform}), {outcome.file_bytes} bytes "
          f"({outcome.content_bytes} bytes of blobs)", file=out)
    return 0


def export_json(outcome: Any) -> Dict[str, Any]:
    """``export --json``: the archive, and per image the digests it carries."""
    return {
        "output": outcome.output, "format": outcome.format, "compression": outcome.compression,
        "site": outcome.site, "platform": outcome.platform, "bytes": outcome.file_bytes,
        "content_bytes": outcome.content_bytes,
        "images": [{
            "name": img.name, "platform": img.platform,
            "top": img.top.digest, "manifest": img.manifest.digest, "config": img.config.digest,
            # the digest the archive names the image by (docker-archive: none, only the config)
            "named": None if outcome.format == "docker-archive" else
            (img.manifest if outcome.platform_manifests else img.top).digest,
            "layers": [la.digest for la in img.layers],
        } for img in outcome.images],
    }


def _print_recorded(args: argparse.Namespace, inv: Inventory) -> int:
    if args.json:
        emit_json(inventory_to_json(inv, args.site))
    else:
        complete = sum(1 for i in inv.images if i.complete)
        print(f"recorded {args.site}: {inv.runtime}, {complete} complete images, "
              f"{len(inv.chains)} layer chains, {len(inv.blobs)} blobs")
    return 0


def cmd_inventory_record(args: argparse.Namespace) -> int:
    inv = usecases.record_report(_home(args), args.site, args.report, args.manifest)
    return _print_recorded(args, inv)


def ssh_options(args: argparse.Namespace) -> SshOptions:
    """The SSH flags shared by ``inventory pull`` and ``sync`` (``cli.main._ssh_args``)."""
    return SshOptions(ssh_config_path=args.ssh_config, known_hosts=args.known_hosts,
                      allow_unknown_host=args.accept_new_host_key, key_filename=args.identity,
                      timeout=args.timeout)


def cmd_inventory_pull(args: argparse.Namespace) -> int:
    inv = usecases.pull_inventory(_home(args), args.site, args.manifest, ssh_options(args),
                                  path=args.path)
    return _print_recorded(args, inv)


def cmd_inventory_show(args: argparse.Namespace) -> int:
    inv = usecases.show_inventory(_home(args), args.site)
    if args.json:
        emit_json(inventory_to_json(inv, args.site))
        return 0
    for img in inv.images:
        mark = "" if img.complete else "  (incomplete: not counted)"
        print(f"{img.name}  {img.target.digest if img.target else img.config}{mark}")
    return _print_recorded(args, inv)
