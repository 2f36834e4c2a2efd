"""The device side must run on Python 3.9 (Debian 11, Yocto): vermin checks the floor."""

from __future__ import annotations

from pathlib import Path

import vermin

ROOT = Path(__file__).resolve().parents[2] / "edgebundle"
DEVICE = ["__init__.py", "__main__.py", "errors.py", "reference.py", "model.py", "plan.py",
          "progress.py", "inventory.py", "cli/main.py", "cli/device.py"]


def device_files() -> list[Path]:
    files = [ROOT / f for f in DEVICE]
    files += sorted((ROOT / "format").glob("*.py")) + sorted((ROOT / "importer").glob("*.py"))
    return files


def test_device_modules_need_at_most_python_3_9() -> None:
    config = vermin.Config()
    config.set_eval_annotations(True)
    files = device_files()
    assert len(files) > 15 and all(f.is_file() for f in files)
    for path in files:
        result = vermin.visit(path.read_text(), config)
        mins = result.minimum_versions()
        py3 = mins[1]
        assert py3 is not None and tuple(py3) <= (3, 9), f"{path} needs Python {py3}"
