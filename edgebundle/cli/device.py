"""Device-side commands. Imports nothing beyond zstandard, msgpack, xxhash and stdlib.

Arguments in, printing out; the work is ``usecases.device``'s.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

from ..errors import UsageError
from ..files import check_output
from ..importer import Runtime
from ..progress import progress_bar
from ..prune import PREVIOUS, Decision
from ..report import inventory_to_json
from ..state import StateDir, state_dir_path
from ..trust import TrustPolicy, generate_key, load_public_key, load_signing_key
from ..usecases.device import (RuntimeAddress, VolumeVerified, import_file, inspect_bundle,
                               open_runtime, prune, prune_failure, take_report, verify_bundle,
                               write_report)
from .main import emit_json


def _runtime(args: argparse.Namespace) -> Runtime:
    return open_runtime(RuntimeAddress(args.runtime, args.address, args.namespace, args.ctr,
                                       args.snapshotter, args.host,
                                       getattr(args, "stall_timeout", 120.0), args.podman,
                                       args.root, args.runroot), _state(args))


def _state(args: argparse.Namespace) -> StateDir:
    return StateDir(state_dir_path(args.state_dir))


def _trust(args: argparse.Namespace) -> TrustPolicy:
    return TrustPolicy.load(args.trust, args.trust_dir)


def cmd_import(args: argparse.Namespace) -> int:
    trust = _trust(args)
    runtime = _runtime(args)
    show = not args.no_progress and sys.stderr.isatty()
    bars: List[Any] = []

    def make_bar(total: Optional[int]) -> Any:
        bars.append(progress_bar(total, "import", enabled=show))
        return bars[-1]

    try:
        result = import_file(args.bundle[0], runtime, progress=make_bar, report=args.report,
                             trust=trust, state=_state(args),
                             allow_downgrade=args.allow_downgrade,
                             space_check=not args.no_space_check, more=args.bundle[1:])
    finally:
        for bar in bars:
            bar.close()
    if args.json:
        emit_json(result.to_json())
        return 0
    for name in result.imported:
        print(f"imported  {name}")
    for name in result.already_present:
        print(f"present   {name}")
    if result.signed_by:
        print(f"signature by trusted key {result.signed_by} checked")
    size = f"; bundle {result.bundle_bytes} bytes" if result.bundle_bytes else ""
    print(f"{len(result.imported)} imported, {len(result.already_present)} already present; "
          f"{result.entries_sent} entries loaded, {result.entries_skipped} verified and skipped{size}")
    if args.report:
        print(f"report written to {args.report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    inv = take_report(_runtime(args), _trust(args), _state(args))
    if args.output:
        write_report(args.output, inv, args.site)
    if args.json or not args.output:
        emit_json(inventory_to_json(inv, args.site))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    if args.output:
        check_output(args.output, f"report {args.output}")
    result = prune(_runtime(args), args.keep, keep_previous=args.keep_previous,
                   dry_run=args.dry_run, trust=_trust(args), state=_state(args))
    if args.output:
        write_report(args.output, result.inventory, args.site)
    if args.json:
        emit_json(result.to_json(args.site))
    else:
        would = "would remove" if result.dry_run else "removed"
        def line(label: str, d: Decision, note: str = "") -> None:
            was = f" (untagged, was {d.was})" if d.was else ""
            print(f"{label:<13} {d.name}{was}{note}")

        for d in result.removed:
            line(would, d)
        for d in result.kept:
            line("kept", d, " (previous)" if d.verdict == PREVIOUS else "")
        for d in result.in_use:
            line("in use", d)
        for d in result.failed:
            line("still held", d)
        print(f"{len(result.removed)} {would}, {len(result.kept)} kept, {len(result.in_use)} in "
              f"use, of {result.recorded} image name(s) edgebundle imported")
        if args.output:
            print(f"report written to {args.output}")
    failure = prune_failure(result)
    if failure is not None:
        raise failure
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    trust = _trust(args)
    result = verify_bundle(args.bundle[0], trust, args.bundle[1:])
    if args.json:
        emit_json(result.to_json())
        return 0
    if isinstance(result, VolumeVerified):
        h = result.head
        print(f"{result.path}: OK, volume {h.number} of {h.count} of bundle {h.id_hex}, "
              f"{h.length} bytes (this volume only; verify volume 1 to check the whole bundle)")
        return 0
    if result.signed_by:
        signed = f"; signed by trusted key {result.signed_by}"
    elif result.signatures:
        signed = (f"; signed by {', '.join(result.signatures)} (signature not checked: "
                  "pass --trust PUBFILE)")
    else:
        signed = "; unsigned"
    volumes = f" in {result.volumes} volumes" if result.volumes is not None else ""
    print(f"{args.bundle[0]}: OK, format {result.version}, {result.entries} entries, "
          f"{len(result.images)} images, {result.bytes} bytes{volumes}{signed}")
    return 0


def cmd_key_generate(args: argparse.Namespace) -> int:
    key = generate_key(args.out)
    if args.json:
        emit_json({"key_id": key.key_id, "private": key.private_path, "public": key.public_path})
        return 0
    print(f"key {key.key_id}")
    print(f"  private {key.private_path} (mode 0600: keep it on the packer, pass it to `pack --sign`)")
    print(f"  public  {key.public_path} (copy it to each device's /etc/edgebundle/trusted.d/)")
    return 0


def cmd_key_show(args: argparse.Namespace) -> int:
    path = args.keyfile
    try:
        with open(path, "rb") as fh:  # which kind of key it is decides the loader
            private = b"PRIVATE KEY" in fh.read(200)
    except OSError as exc:
        raise UsageError(f"cannot read key {path}: {exc.strerror}", "check the path") from None
    key_id = load_signing_key(path).key_id if private else load_public_key(path).key_id
    if args.json:
        emit_json({"key_id": key_id, "file": path, "private": private})
    else:
        print(key_id)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_bundle(args.bundle)
    if args.json:
        emit_json(info.to_json())
        return 0
    header, index = info.header, info.index
    print(f"bundle {args.bundle}: format {info.version}, {info.size} bytes, created "
          f"{header.created} by {header.tool}")
    print(f"site {header.site}  runtime {header.runtime}  platform {header.platform}  "
          f"layer form {header.layer_form}")
    if info.signatures:
        print(f"signed by {', '.join(s.key_id for s in info.signatures)} "
              "(not checked here: `edgebundle verify --trust PUBFILE` checks it)")
    for rec in index.images:
        print(f"  image {rec.name}  {rec.top.digest}")
    stored = sum(e.stored_size for e in index.entries)
    print(f"{len(index.entries)} entries, {stored} stored bytes; "
          f"{len(header.prerequisites)} prerequisites")
    return 0


__all__ = ["cmd_import", "cmd_report", "cmd_prune", "cmd_verify", "cmd_inspect", "cmd_key_generate",
           "cmd_key_show"]
