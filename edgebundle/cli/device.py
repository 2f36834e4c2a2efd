"""Device-side commands. Imports nothing beyond zstandard, msgpack, xxhash and stdlib.

Arguments in, printing out; the work is ``usecases.device``'s.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, List, Optional

from ..importer import Runtime
from ..progress import progress_bar
from ..report import inventory_to_json
from ..usecases.device import (RuntimeAddress, import_file, inspect_bundle, open_runtime,
                               take_report, verify_bundle, write_report)
from .main import emit_json


def _runtime(args: argparse.Namespace) -> Runtime:
    return open_runtime(RuntimeAddress(args.runtime, args.address, args.namespace, args.ctr,
                                       args.snapshotter, args.host))


def cmd_import(args: argparse.Namespace) -> int:
    runtime = _runtime(args)
    show = not args.no_progress and sys.stderr.isatty()
    bars: List[Any] = []

    def make_bar(total: Optional[int]) -> Any:
        bars.append(progress_bar(total, "import", enabled=show))
        return bars[-1]

    try:
        result = import_file(args.bundle, runtime, progress=make_bar, report=args.report)
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
    size = f"; bundle {result.bundle_bytes} bytes" if result.bundle_bytes else ""
    print(f"{len(result.imported)} imported, {len(result.already_present)} already present; "
          f"{result.entries_sent} entries loaded, {result.entries_skipped} verified and skipped{size}")
    if args.report:
        print(f"report written to {args.report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    inv = take_report(_runtime(args))
    if args.output:
        write_report(args.output, inv, args.site)
    if args.json or not args.output:
        emit_json(inventory_to_json(inv, args.site))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    result = verify_bundle(args.bundle)
    if args.json:
        emit_json(result.to_json())
    else:
        print(f"{args.bundle}: OK, format {result.version}, {result.entries} entries, "
              f"{len(result.images)} images, {result.bytes} bytes")
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
    for rec in index.images:
        print(f"  image {rec.name}  {rec.top.digest}")
    stored = sum(e.stored_size for e in index.entries)
    print(f"{len(index.entries)} entries, {stored} stored bytes; "
          f"{len(header.prerequisites)} prerequisites")
    return 0


__all__ = ["cmd_import", "cmd_report", "cmd_verify", "cmd_inspect"]
