"""Regenerate the golden volume sets: `python tests/golden/volumes/make_goldens.py`.

Each case is a directory of volume files and ``case.json``: what to run (``args``, from
inside the directory; ``stdin``: volume files to concatenate onto standard input) and
the exact result (``exit``, ``error``: the one stderr line without "edgebundle: error: ").
The sets come from one tiny bundle split into three volumes, then damaged one way each.
Run it only when the format changes; review the messages it records before committing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "unit")]

from edgebundle import volumeset  # noqa: E402
from edgebundle.cache import BlobCache  # noqa: E402
from edgebundle.cli.main import main  # noqa: E402
from edgebundle.format import VOLUME_HEAD_SIZE  # noqa: E402
from edgebundle.format.volumes import parse_head  # noqa: E402
from edgebundle.holdings import Inventory  # noqa: E402
from edgebundle.pack import write_bundle  # noqa: E402
from edgebundle.plan import plan_bundle  # noqa: E402
from tiny_images import Images  # noqa: E402

VOLUME = 1100
NAMES = [f"b.ebundle.00{i}" for i in (1, 2, 3)]


def bundle(created: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        images = Images(BlobCache(Path(tmp)))
        img = images.image("example.test/golden/app:v1", [{"hello.txt": b"hello, volumes\n"}])
        plan = plan_bundle("gw-01", [img], Inventory.empty("docker", None), runtime="docker",
                           namespace=None, platform="linux/amd64")
        out = io.BytesIO()
        write_bundle(plan, images.cache, out, level=3, created=created)
        return out.getvalue()


def volumes(data: bytes) -> List[bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        with volumeset.write_volumes(os.path.join(tmp, "b.ebundle"), VOLUME, "golden") as out:
            out.write(data)
        got = [Path(p).read_bytes() for p in out.paths]
    assert len(got) == 3, f"{len(got)} volumes: adjust VOLUME"
    return got


def flip(data: bytes, offset: int) -> bytes:
    raw = bytearray(data)
    raw[offset] ^= 0x01
    return bytes(raw)


def relabel(data: bytes, **fields: Any) -> bytes:
    head = parse_head(data[:VOLUME_HEAD_SIZE], "golden")
    return dataclasses.replace(head, **fields).pack() + data[VOLUME_HEAD_SIZE:]


def run(case: Path, spec: Dict[str, Any]) -> Dict[str, Any]:
    """Run the case as the test does; return its result."""
    cwd = os.getcwd()
    err = io.StringIO()
    saved = sys.stdin
    try:
        os.chdir(case)
        if spec.get("stdin"):
            data = b"".join((case / n).read_bytes() for n in spec["stdin"])
            sys.stdin = io.TextIOWrapper(io.BytesIO(data))
        with redirect_stderr(err):
            code = main(spec["args"])
    finally:
        sys.stdin = saved
        os.chdir(cwd)
    line = err.getvalue()
    prefix = "edgebundle: error: "
    return {"exit": code, "error": line[len(prefix):].rstrip("\n") if line.startswith(prefix) else None}


def main_() -> None:
    mine = volumes(bundle("2026-11-22T12:00:00Z"))
    other = volumes(bundle("2026-11-23T12:00:00Z"))
    mid = VOLUME // 2
    cases: Dict[str, Dict[Optional[str], bytes]] = {
        "intact": dict(zip(NAMES, mine)),
        "damaged-payload": dict(zip(NAMES, [mine[0], flip(mine[1], mid), mine[2]])),
        "damaged-trailer": dict(zip(NAMES, [mine[0], mine[1], flip(mine[2], len(mine[2]) - 10)])),
        "damaged-header": dict(zip(NAMES, [mine[0], flip(mine[1], 30), mine[2]])),
        "missing": dict(zip([NAMES[0], NAMES[2]], [mine[0], mine[2]])),
        "swapped": dict(zip(NAMES, [mine[0], mine[2], mine[1]])),
        "duplicated": dict(zip(NAMES, [mine[0], mine[0], mine[2]])),
        "foreign": dict(zip(NAMES, [mine[0], other[1], mine[2]])),
        "truncated": dict(zip(NAMES, [mine[0], mine[1][:-1], mine[2]])),
        "appended": dict(zip(NAMES, [mine[0], mine[1] + b"\0", mine[2]])),
        "wrong-count": dict(zip(NAMES, [mine[0], relabel(mine[1], count=4), mine[2]])),
        "stdin-gap": dict(zip([NAMES[0], NAMES[2]], [mine[0], mine[2]])),
        "stdin-short": dict(zip(NAMES[:2], mine[:2])),
    }
    for name, files in cases.items():
        case = HERE / name
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir()
        for fname, data in files.items():
            (case / str(fname)).write_bytes(data)
        spec: Dict[str, Any] = {"args": ["verify", NAMES[0]]}
        if name.startswith("stdin-"):
            spec = {"args": ["verify", "-"], "stdin": sorted(files)}
        spec.update(run(case, spec))
        (case / "case.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        print(f"{name}: exit {spec['exit']}: {spec['error']}")


if __name__ == "__main__":
    main_()
