"""`scripts/bench.py --quick` runs every benchmark scenario end to end.

It starts its own registry, containerd and dockerd instances, so it runs as a
subprocess (with this interpreter), with a temp image cache and a temp output doc:
it must never touch docs/BENCHMARKS.md. Only consistency is asserted (sizes, imports,
images listed and running), never timings.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from policy import unavailable

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench.py"
SCENARIOS = ("a", "b", "c", "d")
RUNTIMES = ("containerd", "docker")


def _need(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        unavailable(config, "the benchmark needs root (containerd, dockerd)")
    for tool in ("containerd", "ctr", "dockerd", "docker-registry", "skopeo", "zstd"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            unavailable(config, f"{tool} not installed")
    if not Path("/bin/busybox").exists():
        unavailable(config, "/bin/busybox missing (apt-get install busybox-static)")


def test_bench_quick(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    _need(request.config)
    doc = tmp_path / "BENCHMARKS.md"
    raw = tmp_path / "results.json"
    real_doc = ROOT / "docs" / "BENCHMARKS.md"
    before = real_doc.read_bytes() if real_doc.exists() else None
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "CONTAINERD_ADDRESS")}
    env["EDGEBUNDLE_BENCH_CACHE"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--write-doc", str(doc), "--json", str(raw)],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, f"bench --quick exited {proc.returncode}\n{out[-6000:]}\n{proc.stderr[-6000:]}"

    # every scenario, for both kinds of site, produced a bundle that imported and whose
    # images are listed by the runtime and run
    for sc in SCENARIOS:
        for rt in RUNTIMES:
            line = re.search(rf"^SCENARIO {sc} {rt}: bundle (\d+) bytes, .* listed and run: (\w+)$", out, re.M)
            assert line, f"no SCENARIO line for {sc} {rt} in:\n{out[-4000:]}"
            assert int(line.group(1)) > 0
            assert line.group(2) == "OK", line.group(0)
    sizes = {(sc, rt): int(m.group(1)) for sc in SCENARIOS for rt in RUNTIMES
             for m in [re.search(rf"^SCENARIO {sc} {rt}: bundle (\d+) bytes", out, re.M)] if m}
    for rt in RUNTIMES:
        assert sizes[("b", rt)] < sizes[("a", rt)], "an update bundle must be smaller than the seed"
        assert sizes[("c", rt)] > sizes[("b", rt)], "a rebuild changes every digest: more than an update"
        assert sizes[("d", rt)] > sizes[("a", rt)], "the fleet holds more than the seed image"

    assert re.search(r"^bench: (\d+) of \1 consistency checks passed", out, re.M), out[-3000:]
    assert "== goals (measured, not asserted)" in out

    text = doc.read_text()
    for heading in ("### Goals", "### Bytes shipped", "### Pack throughput", "### Import time",
                    "### Importer peak RSS", "### Plan time", "### Fleet sync (issue 9)"):
        assert heading in text
    # issue 9's goals are measured (met or not), with the command that reruns only them
    for goal in ("upload throughput on loopback", "100 sites in 10 states: exactly 10 bundles",
                 "second pack of a packed state", "sync of 4 sites up to date"):
        assert goal in text, goal
    assert "bash scripts/bench --only fleet --write-doc docs/BENCHMARKS.md" in text
    assert raw.is_file()
    # the real results file is never touched by a test run
    after = real_doc.read_bytes() if real_doc.exists() else None
    assert after == before
