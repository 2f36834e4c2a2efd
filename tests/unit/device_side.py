"""Which modules make up the device side: whatever the device entry points import.

Computed, not listed, so a new module the importer starts to use is checked (Python
3.9 floor, no packer dependencies) without anyone remembering to add it.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "edgebundle"

ENTRY_POINTS = ["edgebundle.cli.device", "edgebundle.cli.staged", "edgebundle.usecases.device",
                "edgebundle.importer",
                "edgebundle.importer.containerd", "edgebundle.importer.docker",
                "edgebundle.importer.podman",
                "edgebundle.format", "edgebundle.report", "edgebundle.holdings", "edgebundle.logs",
                "edgebundle.trust", "edgebundle.state"]
# cryptography is not packer-only, but a device without a trust policy must not need it:
# the device entry points may import it only lazily, when a policy is loaded.
PACKER_ONLY = ["yaml", "httpx", "paramiko", "tqdm", "requests", "cryptography"]


@functools.lru_cache(maxsize=1)
def loaded() -> Dict[str, List[str]]:
    """{"edgebundle": [modules], "packer": [packer-only modules]} after importing the entry points."""
    code = (
        "import json, sys\n"
        + "".join(f"import {m}\n" for m in ENTRY_POINTS)
        + "from edgebundle.cli import main\n"
        + "main.build_parser().parse_args(['verify', 'x.ebundle'])\n"
        + "print(json.dumps({'edgebundle': sorted(m for m in sys.modules if m.split('.')[0] == 'edgebundle'),"
        + f" 'packer': sorted(m for m in sys.modules if m.split('.')[0] in {PACKER_ONLY!r})}}))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def device_files() -> List[Path]:
    out = []
    for module in loaded()["edgebundle"]:
        rel = Path(*module.split("."))
        path = ROOT / rel.with_suffix(".py")
        if not path.is_file():
            path = ROOT / rel / "__init__.py"
        out.append(path)
    return sorted(set(out))
