"""files: the one atomic-replace helper and the rules for user-named outputs."""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path
from typing import List

import pytest

from edgebundle import files
from edgebundle.errors import OutputError, SpaceError

PKG = Path(__file__).resolve().parents[2] / "edgebundle"


def test_atomic_write_replaces_whole_and_fsyncs_file_and_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    synced: List[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "report.json"
    target.write_text("old")
    files.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert synced == ["file", "dir"]
    assert os.listdir(tmp_path) == ["report.json"]


def test_atomic_file_leaves_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "inventory.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_file(target) as out:
            out.write(b"half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["inventory.json"]


def test_atomic_file_temp_names_are_unique(tmp_path: Path) -> None:
    """Two writers of one file at once never share a temp file (once a fixed '.tmp' name)."""
    target = tmp_path / "x"
    seen: List[str] = []
    barrier = threading.Barrier(2)

    def write(data: bytes) -> None:
        with files.atomic_file(target) as out:
            seen.append(out.name)  # type: ignore[attr-defined]
            barrier.wait(timeout=10)
            out.write(data)

    threads = [threading.Thread(target=write, args=(d,)) for d in (b"a" * 1000, b"b" * 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 2
    assert target.read_bytes() in (b"a" * 1000, b"b" * 1000)


def test_new_files_get_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        files.atomic_write(tmp_path / "new", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o640


def test_stream_targets(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    regular = tmp_path / "file"
    regular.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(regular)
    assert files.is_stream_target("-")
    assert files.is_stream_target(str(fifo))
    assert files.is_stream_target("/dev/null")
    assert files.is_stream_target("/dev/stdout")  # a symlink into /proc: never renamed over
    assert not files.is_stream_target(str(regular))
    assert not files.is_stream_target(str(link))
    assert not files.is_stream_target(str(tmp_path / "absent"))


def test_open_output_into_a_device_writes_in_place(tmp_path: Path) -> None:
    with files.open_output("/dev/null", "bundle /dev/null") as out:
        out.write(b"x" * 1000)
    assert stat.S_ISCHR(os.lstat("/dev/null").st_mode)


def test_open_output_blames_only_its_own_errors(tmp_path: Path) -> None:
    """An OSError elsewhere in the block (say, the cache) is not an output error."""
    target = tmp_path / "b.ebundle"
    with pytest.raises(FileNotFoundError):
        with files.open_output(str(target), "bundle b.ebundle"):
            open(tmp_path / "missing")
    assert not target.exists() and os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_open_output_full_disk_is_a_space_error() -> None:
    with pytest.raises(SpaceError, match="no space left"):
        with files.open_output("/dev/full", "bundle /dev/full") as out:
            out.write(b"x" * (1 << 20))


# ---------------------------------------------------------------------------
# One home per concept


def _sources() -> List[Path]:
    return sorted(PKG.rglob("*.py"))


def test_only_files_py_renames_files_into_place() -> None:
    offenders = [str(p.relative_to(PKG)) for p in _sources()
                 if p.name != "files.py" and re.search(r"\bos\.(replace|rename)\(", p.read_text())]
    assert offenders == []


def test_one_io_chunk_constant() -> None:
    """The streaming chunk size lives in files.py; format/ has its own (spec) constants."""
    offenders = []
    for path in _sources():
        if path.name == "files.py" or path.parent.name == "format":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"^\s*[A-Z_]+\s*=\s*1024\s*\*\s*1024\s*$", line) or \
                    re.match(r"^\s*[A-Z_]*CHUNK[A-Z_]*\s*=", line):
                offenders.append(f"{path.relative_to(PKG)}:{n}: {line.strip()}")
    assert offenders == []
