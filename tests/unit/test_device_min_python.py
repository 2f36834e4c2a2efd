"""The device side must run on Python 3.9 (Debian 11, Yocto): vermin checks the floor."""

from __future__ import annotations


import vermin

from device_side import PKG, device_files

# Not imported by the device commands, but run on the device as `python -m edgebundle`.
EXTRA = [PKG / "__main__.py", PKG / "progress.py"]


def test_device_modules_need_at_most_python_3_9() -> None:
    config = vermin.Config()
    config.set_eval_annotations(True)
    files = device_files() + EXTRA
    assert len(files) > 20 and all(f.is_file() for f in files)
    for path in files:
        result = vermin.visit(path.read_text(), config)
        mins = result.minimum_versions()
        py3 = mins[1]
        assert py3 is not None and tuple(py3) <= (3, 9), f"{path} needs Python {py3}"
