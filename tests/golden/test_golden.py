"""Golden corrupted bundles: each file in cases/ gives exactly the error cases.json says.

``verify`` and ``import`` (into a modelled containerd, through the real importer) must
exit with the row's code and print the row's error line, word for word; ``import`` must
leave no image behind. The generator (make.py) must rebuild every generated file byte
for byte, so a case is never an unexplained blob.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "unit"))

import make  # noqa: E402

from fake_runtimes import FakeContainerd  # noqa: E402

TABLE = make.load_table()
IDS = [row["file"] for row in TABLE]


def test_every_row_has_its_file_and_every_file_a_row() -> None:
    files = {p.name for p in make.CASES_DIR.iterdir() if p.is_file()}
    assert sorted(files) == sorted(IDS)
    assert len(IDS) == len(set(IDS))
    assert all(set(row) <= {"file", "what", "exit", "error", "generated", "verify_args",
                            "import_exit", "import_error", "import_args"} for row in TABLE)


def test_the_generator_reproduces_the_committed_files() -> None:
    built = make.build_all()
    for row in TABLE:
        if row.get("generated", True):
            committed = (make.CASES_DIR / row["file"]).read_bytes()
            assert built[row["file"]] == committed, f"{row['file']}: run tests/golden/make.py"


def test_the_generator_reproduces_the_test_keys() -> None:
    for name, pem in make.public_pems().items():
        assert (make.KEYS_DIR / name).read_bytes() == pem, f"{name}: run tests/golden/make.py"


def test_files_are_small() -> None:
    sizes = {p.name: p.stat().st_size for p in make.CASES_DIR.iterdir()}
    assert max(sizes.values()) <= 300 * 1024 and sum(sizes.values()) <= 1024 * 1024


@pytest.mark.parametrize("row", TABLE, ids=IDS)
def test_verify(row: Dict[str, Any]) -> None:
    rc, line = make.run_cli(["verify", *row.get("verify_args", []), "cases/" + row["file"]])
    assert (rc, line) == (row["exit"], row["error"])


def _import(row: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tuple[int, str, Any]:
    import edgebundle.cli.device as device
    from edgebundle.importer.containerd import ContainerdRuntime, Ctr

    model = FakeContainerd("default")
    sock = tmp_path / "containerd.sock"
    sock.touch()
    monkeypatch.setattr(device, "_runtime",
                        lambda args: ContainerdRuntime(Ctr(str(sock), "default", runner=model)))
    rc, line = make.run_cli(["import", "--runtime", "containerd", "--state-dir", str(tmp_path / "state"),
                             *row.get("import_args", []), "cases/" + row["file"]])
    return rc, line, model


@pytest.mark.parametrize("row", TABLE, ids=IDS)
def test_import(row: Dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rc, line, model = _import(row, tmp_path, monkeypatch)
    if rc == 0:
        assert (rc, row["exit"]) == (0, 0) and model.real_names() == {make.NAME}
        return
    assert (rc, line) == (row.get("import_exit", row["exit"]), row.get("import_error", row["error"]))
    assert model.images == {}, "a refused import left an image (temporary or real) behind"
