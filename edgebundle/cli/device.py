"""Device-side commands. Imports nothing beyond zstandard, msgpack, xxhash and stdlib."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import sys
from typing import Any, BinaryIO, Iterator, Optional

from ..errors import UsageError
from ..format import BundleReader, read_index
from ..importer import Runtime, import_bundle
from ..inventory import inventory_to_json, now_rfc3339
from ..model import Inventory
from ..progress import progress_bar
from .main import emit_json


def make_runtime(args: argparse.Namespace) -> Runtime:
    if args.runtime == "containerd":
        from ..importer.containerd import ContainerdRuntime, Ctr

        rt: Any = ContainerdRuntime(Ctr(args.address, args.namespace, args.ctr, args.snapshotter))
    else:
        from ..importer.docker import DockerAPI, DockerRuntime

        rt = DockerRuntime(DockerAPI(args.host))
    return rt  # type: ignore[no-any-return]


@contextlib.contextmanager
def open_bundle(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot open bundle {path}: {exc.strerror}",
                         "check the path (on a USB stick: is it mounted?)") from None
    with fh:
        yield fh


def stamped(inv: Inventory) -> Inventory:
    """The report says when and where it was read."""
    return dataclasses.replace(inv, generated_at=now_rfc3339(), host=socket.gethostname())


def _write_report(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def cmd_import(args: argparse.Namespace) -> int:
    runtime = make_runtime(args)
    size = os.path.getsize(args.bundle) if args.bundle != "-" else None
    show = not args.no_progress and sys.stderr.isatty()
    bars = []

    def make_bar(total: Optional[int]) -> Any:
        bars.append(progress_bar(total, "import", enabled=show))
        return bars[-1]

    with open_bundle(args.bundle) as fh:
        try:
            result = import_bundle(fh, args.bundle, runtime, progress=make_bar)
        finally:
            for bar in bars:
                bar.close()
    assert result.inventory is not None
    if args.report:
        _write_report(args.report, inventory_to_json(stamped(result.inventory), result.site))
    if args.json:
        emit_json(result.to_json())
    else:
        for name in result.imported:
            print(f"imported  {name}")
        for name in result.already_present:
            print(f"present   {name}")
        print(f"{len(result.imported)} imported, {len(result.already_present)} already present; "
              f"{result.entries_sent} entries loaded, {result.entries_skipped} verified and skipped"
              + (f"; bundle {size} bytes" if size is not None else ""))
        if args.report:
            print(f"report written to {args.report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    inv = stamped(make_runtime(args).inventory())
    obj = inventory_to_json(inv, args.site)
    if args.output:
        _write_report(args.output, obj)
    if args.json or not args.output:
        emit_json(obj)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with open_bundle(args.bundle) as fh:
        reader = BundleReader(fh, args.bundle)
        count = 0
        for entry in reader.entries():
            entry.skip()
            count += 1
    assert reader.index is not None
    out = {"bundle": args.bundle, "ok": True, "version": reader.version, "entries": count,
           "images": [r.get("name") for r in reader.index["images"]], "bytes": reader.total_size,
           "site": reader.header.get("site")}
    if args.json:
        emit_json(out)
    else:
        print(f"{args.bundle}: OK, format {reader.version}, {count} entries, "
              f"{len(out['images'])} images, {reader.total_size} bytes")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.bundle):
        raise UsageError(f"bundle {args.bundle} is not a file", "inspect needs a seekable file")
    info = read_index(args.bundle)
    if args.json:
        emit_json(info)
        return 0
    header, index = info["header"], info["index"]
    print(f"bundle {args.bundle}: format {info['version']}, {info['size']} bytes, created "
          f"{header.get('created')} by {header.get('tool')}")
    print(f"site {header.get('site')}  runtime {header.get('runtime')}  platform "
          f"{header.get('platform')}  layer form {header.get('layer_form')}")
    for rec in index.get("images", []):
        print(f"  image {rec.get('name')}  {rec.get('top', {}).get('digest')}")
    stored = sum(e.get("stored_size", 0) for e in index.get("entries", []))
    print(f"{len(index.get('entries', []))} entries, {stored} stored bytes; "
          f"{len(header.get('prerequisites') or [])} prerequisites")
    return 0
