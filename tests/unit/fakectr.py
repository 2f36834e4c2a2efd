#!/usr/bin/env python3
"""``ctr`` as a program: FakeContainerd behind a command line, state in $FAKECTR_STATE.

For CLI tests that run ``edgebundle import/report --ctr 'python fakectr.py'`` through the
real ``SubprocessRunner``, with no containerd. State: ``state.json`` (images, snapshots)
and ``content/<hex>`` files under the directory $FAKECTR_STATE names.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fake_runtimes import FakeContainerd  # noqa: E402


def load(root: Path) -> FakeContainerd:
    state = json.loads((root / "state.json").read_text())
    model = FakeContainerd(state["namespace"])
    model.images = {k: tuple(v) for k, v in state["images"].items()}  # type: ignore[misc]
    model.snapshots = set(state["snapshots"])
    model.root = str(root / "root")
    for path in (root / "content").iterdir():
        model.content["sha256:" + path.name] = path.read_bytes()
    return model


def save(root: Path, model: FakeContainerd) -> None:
    (root / "content").mkdir(exist_ok=True)
    for digest, data in model.content.items():
        (root / "content" / digest[7:]).write_bytes(data)
    (root / "state.json").write_text(json.dumps({
        "namespace": model.namespace, "images": model.images,
        "snapshots": sorted(model.snapshots)}))


def main() -> int:
    root = Path(os.environ["FAKECTR_STATE"])
    model = load(root)
    argv = ["ctr"] + sys.argv[1:]
    if "import" in argv:
        err = io.BytesIO()
        proc = model.start(argv, err)
        assert proc.stdin is not None
        proc.stdin.write(sys.stdin.buffer.read())
        code = proc.wait()
        sys.stderr.buffer.write(err.getvalue())
    else:
        done = model.run(argv, None, 60)
        sys.stdout.buffer.write(done.stdout)
        sys.stderr.buffer.write(done.stderr)
        code = done.returncode
    save(root, model)
    return code


if __name__ == "__main__":
    sys.exit(main())
