"""Sampling profiles of edgebundle subprocesses with py-spy (optional: ``--py-spy PATH``).

py-spy samples the Python stacks of the process (``--idle`` keeps samples where it
waits: on a pipe to ``ctr``, a socket to dockerd, the disk), so the shares below are
shares of the main thread's wall time (background threads, e.g. tqdm's monitor, are
left out). Time inside C code (zlib, hashlib, zstandard, xxhash) is charged
to the Python line that called it.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from . import proc

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+?)(?::(?P<line>\d+))?\)$")


def record(py_spy: str, argv: Sequence[str], out: Path, env: Optional[Mapping[str, str]] = None,
           cwd: Optional[str] = None) -> proc.Run:
    return proc.run([py_spy, "record", "--idle", "-r", "200", "-f", "raw", "-o", str(out), "--", *argv],
                    env=env, cwd=cwd, poll=0.05).check()


def _short(path: str) -> str:
    for marker in ("/edgebundle/", "/site-packages/", "/lib/python3"):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return ("edgebundle/" + tail) if marker == "/edgebundle/" else tail
    return path


def summarize(raw: Path, top: int = 12, keep: int = 60) -> Dict[str, object]:
    leaf: Dict[str, int] = collections.Counter()
    incl: Dict[str, int] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[0].startswith("Thread._bootstrap"):
            continue  # background threads (tqdm's monitor): idle, not the work
        n = int(count)
        total += n
        names = []
        for f in frames:
            m = FRAME.match(f.strip())
            names.append(f"{m.group('func')} ({_short(m.group('file'))}:{m.group('line')})" if m else f.strip())
        leaf[names[-1]] += n
        seen = set()
        for f in frames:
            m = FRAME.match(f.strip())
            if not m or "edgebundle" not in m.group("file"):
                continue
            key = f"{_short(m.group('file'))}:{m.group('func')}"
            if key not in seen:
                seen.add(key)
                incl[key] += n
    return {"samples": total,
            "self": [(k, v / total) for k, v in sorted(leaf.items(), key=lambda kv: -kv[1])[:top]] if total else [],
            "inclusive": [(k, v / total) for k, v in sorted(incl.items(), key=lambda kv: -kv[1])[:keep]]
            if total else []}


def render(name: str, argv: str, wall: float, s: Dict[str, object]) -> List[str]:
    out = [f"{name}: `{argv}` ({wall:.2f} s under py-spy, {s['samples']} samples at 200 Hz)", "",
           "| self (leaf line, C time included) | share | inclusive (edgebundle functions) | share |",
           "| --- | ---: | --- | ---: |"]
    selfs: List[Tuple[str, float]] = s["self"]  # type: ignore[assignment]
    incls: List[Tuple[str, float]] = s["inclusive"][:len(selfs)]  # type: ignore[index]
    for i in range(max(len(selfs), len(incls))):
        a = selfs[i] if i < len(selfs) else ("", 0.0)
        b = incls[i] if i < len(incls) else ("", 0.0)
        out.append(f"| `{a[0]}` | {100 * a[1]:.1f}% | `{b[0]}` | {100 * b[1]:.1f}% |" if a[0] or b[0] else "")
    return out + [""]
