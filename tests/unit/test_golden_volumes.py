"""Golden volume sets (tests/golden/volumes/*/): each gives exactly the error it records.

The sets are stored bytes (made once by ``tests/golden/volumes/make_goldens.py``), so a
change of wording or of the exit code shows up here as a diff to review, not silently.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from edgebundle.cli.main import main

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "volumes"
CASES = sorted(p.parent for p in GOLDEN.glob("*/case.json"))


def test_every_kind_of_bad_set_has_a_golden() -> None:
    names = {c.name for c in CASES}
    assert {"intact", "damaged-payload", "damaged-trailer", "damaged-header", "missing", "swapped",
            "duplicated", "foreign", "truncated", "appended", "wrong-count", "stdin-gap",
            "stdin-short"} <= names


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_volume_set(case: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    spec: Dict[str, Any] = json.loads((case / "case.json").read_text())
    monkeypatch.chdir(case)
    if spec.get("stdin"):
        data = b"".join((case / name).read_bytes() for name in spec["stdin"])
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    capsys.readouterr()
    code = main(spec["args"])
    _, err = capsys.readouterr()
    assert code == spec["exit"], err
    if spec["error"] is None:
        assert err == ""
    else:
        assert err == f"edgebundle: error: {spec['error']}\n"
