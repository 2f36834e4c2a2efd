"""The CLI run in-process, as the integration tests drive it (one home for the helper)."""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest

from edgebundle.cli.main import main


def eb(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> Dict[str, Any]:
    """Run the CLI in-process; assert the exit code; return parsed --json output if any."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == code, f"edgebundle {' '.join(argv)} exited {rc}: {err}"
    if "--json" in argv and rc == 0:
        return json.loads(out)  # type: ignore[no-any-return]
    return {"stdout": out, "stderr": err}
