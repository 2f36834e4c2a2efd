"""Hostile inventory reports on the packer (``inventory record`` / ``inventory pull``).

The probe of issue 8 found: JSON nested 100,000 deep raised an uncaught RecursionError; a
valid 57 MB report cost 1.09 GB; a report claiming an image complete whose layers it did
not hold was recorded, and the next plan called the site up to date. Each is now a
one-line ``InventoryError`` (exit 10).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from edgebundle.cli.main import main
from edgebundle.errors import InventoryError
from edgebundle.holdings import HeldImage, HeldLayer, Inventory
from edgebundle.oci import Descriptor, chain_ids
from edgebundle.report import MAX_REPORT_BYTES, MAX_REPORT_VALUES, inventory_from_json, inventory_to_json
from edgebundle.transfer.ssh import parse_report
from edgebundle.usecases.packer import record_report

ROOT = Path(__file__).resolve().parents[2]


def d(n: int) -> str:
    return "sha256:" + f"{n:064x}"


DIFFS = [d(10), d(11)]
CHAINS = list(chain_ids(DIFFS))


def containerd_report() -> Dict[str, Any]:
    """A consistent report: layer 0 held as a blob, layer 1 as a chain, top chain unpacked."""
    inv = Inventory(runtime="containerd", namespace="k8s.io", images=(
        HeldImage("example.test/app:v1", d(1), Descriptor("application/vnd.oci.image.index.v1+json", d(2), 10),
                  d(3), "linux/amd64", True,
                  (HeldLayer(DIFFS[0], d(20), 5, blob=True), HeldLayer(DIFFS[1], None, None, unpacked=True))),
        HeldImage("example.test/broken:v1", d(4), complete=False, layers=(HeldLayer(d(99)),))),
        blobs=frozenset({d(1), d(2), d(3), d(20)}), chains=frozenset({CHAINS[1]}))
    return inventory_to_json(inv, "gw")


def docker_report() -> Dict[str, Any]:
    inv = Inventory(runtime="docker", images=(
        HeldImage("example.test/app:v1", d(1), layers=tuple(HeldLayer(x, unpacked=True) for x in DIFFS)),),
        chains=frozenset(CHAINS))
    return inventory_to_json(inv, "gw")


def test_consistent_reports_are_accepted() -> None:
    assert inventory_from_json(containerd_report()).images[0].complete
    assert inventory_from_json(docker_report()).images[0].complete


# ---------------------------------------------------------------------------
# Complete images must hold their layers


def test_containerd_layer_neither_blob_nor_chain() -> None:
    rep = containerd_report()
    rep["blobs"].remove(d(20))
    with pytest.raises(InventoryError) as info:
        inventory_from_json(rep)
    assert str(info.value).startswith(
        f"inventory report field images[0] (example.test/app:v1).complete: is true, but layers[0] "
        f"({DIFFS[0]}) is not held: the report lists neither its blob in blobs or its chain in chains")


def test_containerd_top_chain_not_unpacked() -> None:
    rep = containerd_report()
    rep["images"][0]["layers"][1]["digest"] = d(21)
    rep["blobs"].append(d(21))
    rep["chains"] = []
    with pytest.raises(InventoryError, match=f"example.test/app:v1\\).complete: is true, but its top "
                                             f"chain {CHAINS[1]} is not unpacked"):
        inventory_from_json(rep)


def test_docker_layer_chain_missing() -> None:
    rep = docker_report()
    rep["chains"].remove(CHAINS[0])
    with pytest.raises(InventoryError, match=f"layers\\[0\\] \\({DIFFS[0]}\\) is not held: the report "
                                             "lists neither its chain in chains"):
        inventory_from_json(rep)


def test_docker_blobs_do_not_count() -> None:
    """Docker has no use for blobs: a layer is held only as a chain (holdings.py)."""
    rep = docker_report()
    rep["chains"] = [CHAINS[1]]
    rep["blobs"] = [DIFFS[0]]
    rep["images"][0]["layers"][0]["digest"] = DIFFS[0]
    with pytest.raises(InventoryError, match="layers\\[0\\]"):
        inventory_from_json(rep)


def test_inconsistent_report_is_not_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = containerd_report()
    rep["blobs"].remove(d(20))
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rep))
    home = tmp_path / "home"
    assert main(["--home", str(home), "inventory", "record", "gw", str(path)]) == 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "example.test/app:v1" in err[0] and DIFFS[0] in err[0]
    assert not (home / "sites" / "gw" / "inventory.json").exists()


# ---------------------------------------------------------------------------
# Nesting, size and value count


def deep(levels: int) -> str:
    return '{"version": 1, "x": ' + "[" * levels + "]" * levels + "}"


def test_deep_nesting_in_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.json"
    path.write_text(deep(100_000))
    assert main(["--home", str(tmp_path / "h"), "inventory", "record", "gw", str(path)]) == 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is nested too deeply to be a report" in err[0], err


def test_deep_nesting_over_ssh() -> None:
    with pytest.raises(InventoryError, match="nested too deeply"):
        parse_report(deep(100_000).encode(), "output of `edgebundle report` on site gw")


def test_a_report_over_the_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    text = json.dumps(containerd_report())
    path.write_text(text + " " * (MAX_REPORT_BYTES + 1 - len(text)))
    with pytest.raises(InventoryError, match="is larger than 16 MiB, more than a report may be"):
        record_report(tmp_path / "h", "gw", str(path))
    path.write_text(text + " " * (MAX_REPORT_BYTES - len(text)))  # exactly at the limit: fine
    assert record_report(tmp_path / "h", "gw", str(path)).runtime == "containerd"


def test_a_report_with_too_many_values() -> None:
    rep = containerd_report()
    rep["extra"] = {"x": [[]] * MAX_REPORT_VALUES}  # unknown contents: ignored, but still parsed
    with pytest.raises(InventoryError, match="has more than 1048576 JSON values"):
        parse_report(json.dumps(rep).encode(), "output")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_peak_memory_of_recording_a_report_of_empty_lists(tmp_path: Path) -> None:
    """0.2.0: 15 MB of ``[],`` was recorded at 511 MB. Now refused at ~57 MB."""
    rep = copy.deepcopy(containerd_report())
    rep["extra"] = {"x": [[]] * 5_000_000}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rep, separators=(",", ":")))
    code = ("import sys\nfrom pathlib import Path\nfrom edgebundle.usecases.packer import record_report\n"
            "try:\n    record_report(Path(sys.argv[2]), 'gw', sys.argv[1]); r = 'ok'\n"
            "except Exception as e:\n    r = type(e).__name__\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print(r, int(hwm) // 1024)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "h")], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    result, mb = proc.stdout.split()
    assert result == "InventoryError" and int(mb) < 150, proc.stdout + proc.stderr


def test_the_size_bound_is_in_bytes_and_the_rest_of_the_file_is_not_ignored(tmp_path: Path) -> None:
    """A valid report followed by padding past the limit (or multibyte text) is refused, not cut."""
    path = tmp_path / "r.json"
    text = json.dumps(containerd_report())
    path.write_bytes(text.encode() + b" " * (MAX_REPORT_BYTES - len(text)) + b"garbage")
    with pytest.raises(InventoryError, match="is larger than 16 MiB"):
        record_report(tmp_path / "h", "gw", str(path))
    path.write_bytes(text.encode()[:-1] + b', "x": "' + "\u00e9".encode() * (MAX_REPORT_BYTES // 2) + b'"}')
    with pytest.raises(InventoryError, match="is larger than 16 MiB"):
        record_report(tmp_path / "h", "gw", str(path))
