"""Property tests of content deltas: random tar pairs rebuild byte-identical; damage is refused.

Tars are made with ``tarfile`` in every format it writes (GNU, PAX, USTAR), with long
names, hard and symbolic links, whiteouts and opaque-dir markers, xattrs (PAX), empty
files and files larger than the patch window (the window is shrunk so that crossing it
is cheap). The device side is the real one: base layers extracted into directories and
read through ``rebuild.DirTree``, as from a snapshot or a Docker diff directory.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgebundle import delta as delta_mod
from edgebundle.delta import Base, encode
from edgebundle.errors import BundleFormatError, PrerequisiteError
from edgebundle.format import BaseLayer
from edgebundle.rebuild import DirTree, rebuild
from edgebundle.tarscan import normalise, scan

FORMATS = (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT)
PROFILE = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture,
                                          HealthCheck.too_slow])


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


Files = Dict[str, bytes]


def make_tar(files: Files, fmt: int, rng: random.Random, *, extras: bool = True) -> bytes:
    """A layer tar of ``files`` plus dirs, links, whiteouts and xattrs (when the format can)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        dirs = sorted({str(Path(p).parent) for p in files if "/" in p})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for path in sorted(files):
            info = tarfile.TarInfo(path)
            info.size = len(files[path])
            info.mode = 0o644
            # Per path, so that an unchanged file gets a byte-identical member in any tar.
            info.mtime = zlib.crc32(path.encode())
            if fmt == tarfile.PAX_FORMAT and info.mtime % 3 == 0:
                info.pax_headers = {"SCHILY.xattr.user.test": "v" * (1 + info.mtime % 50)}
            tar.addfile(info, io.BytesIO(files[path]))
        if extras and files:
            first = min(files, key=len) if fmt == tarfile.USTAR_FORMAT else sorted(files)[0]
            link = tarfile.TarInfo("hard-" + Path(first).name[:80])
            link.type = tarfile.LNKTYPE
            link.linkname = first
            if len(first) <= 100 or fmt != tarfile.USTAR_FORMAT:
                tar.addfile(link)
            sym = tarfile.TarInfo("sym")
            sym.type = tarfile.SYMTYPE
            sym.linkname = "../" + "x" * 120 if fmt != tarfile.USTAR_FORMAT else "target"
            tar.addfile(sym)
            for name in (".wh.gone", (dirs[0] + "/" if dirs else "") + ".wh..wh..opq"):
                wh = tarfile.TarInfo(name)
                tar.addfile(wh)
    return buf.getvalue()


def extract(files: Files, root: Path) -> None:
    for path, data in files.items():
        full = root / path
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_bytes(data)


def mutate(files: Files, rng: random.Random) -> Files:
    out: Files = {}
    for path, data in files.items():
        roll = rng.random()
        if roll < 0.25:
            out[path] = data  # unchanged
        elif roll < 0.5 and data:
            b = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                p = rng.randrange(len(b))
                b[p:p + 3] = bytes(rng.randrange(256) for _ in range(3))
            if rng.random() < 0.3:
                b[len(b) // 2:len(b) // 2] = b"inserted" * rng.randrange(1, 20)
            out[path] = bytes(b)
        elif roll < 0.65:
            out["moved/" + path] = data  # same contents, new path
        elif roll < 0.75:
            pass  # deleted
        else:
            out[path] = data[: len(data) // 2] + rng.randbytes(rng.randrange(0, 300))
    for i in range(rng.randrange(0, 3)):
        out[f"new/{i}-" + "n" * rng.choice((3, 95))] = rng.randbytes(rng.randrange(0, 2000))
    return out


def random_files(rng: random.Random, n: int, big: int) -> Files:
    files: Files = {}
    vocab = [rng.randbytes(rng.randrange(4, 16)) for _ in range(64)]
    for i in range(n):
        depth = "/".join(f"d{rng.randrange(3)}" for _ in range(rng.randrange(0, 3)))
        # Long names: > 100 bytes in all, components short enough for USTAR's prefix field.
        if rng.random() < 0.2:
            depth = (depth + "/" if depth else "") + "long-" + "D" * rng.randrange(40, 90)
        name = f"f{i}" + ("-" + "L" * rng.randrange(60, 95) if rng.random() < 0.2 else "")
        size = rng.choice((0, 1, 50, 200, 1000, 5000, big))
        data = b"".join(rng.choice(vocab) for _ in range(size // 8 + 1))[:size]
        files[(depth + "/" if depth else "") + name] = data
    return files


def open_bytes(data: bytes):  # type: ignore[no-untyped-def]
    return lambda: io.BytesIO(data)


def bases_of(tars: Sequence[bytes], tar: Sequence[bool] = ()) -> List[Base]:
    """Bases whose files (and, where ``tar`` says so, whole tars) the device can read."""
    flags = list(tar) + [False] * (len(tars) - len(tar))
    return [Base(BaseLayer(sha(t + b"chain"), sha(t), flag), scan(io.BytesIO(t)), open_bytes(t))
            for t, flag in zip(tars, flags)]


def tars_for(enc: delta_mod.Encoded, base_tars: Sequence[bytes]) -> List[Optional[io.BytesIO]]:
    by_diff = {sha(t): t for t in base_tars}
    return [io.BytesIO(by_diff[b.diff_id]) if b.tar else None for b in enc.head.bases]


def encode_bytes(target: bytes, bases: Sequence[Base]) -> Tuple[delta_mod.Encoded, bytes]:
    out = io.BytesIO()
    enc = encode(io.BytesIO(target), scan(io.BytesIO(target)), sha(target), bases, out)
    return enc, out.getvalue()


def pieces(data: bytes, n: int = 7777) -> List[bytes]:
    return [data[i:i + n] for i in range(0, len(data), n)]


@pytest.fixture(autouse=True)
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    # Files of a few KB then cross several windows; the logic is the same as at 4 MiB.
    monkeypatch.setattr(delta_mod, "WINDOW", 2048)
    monkeypatch.setattr(delta_mod, "MARGIN", 512)


@PROFILE
@given(seed=st.integers(0, 2 ** 32 - 1), fmt=st.sampled_from(FORMATS),
       base_fmt=st.sampled_from(FORMATS), n=st.integers(0, 12), tar_base=st.booleans())
def test_delta_rebuilds_target_exactly(tmp_path: Path, seed: int, fmt: int, base_fmt: int,
                                       n: int, tar_base: bool) -> None:
    rng = random.Random(seed)
    old = random_files(rng, n, big=rng.choice((3000, 9000)))
    other = random_files(rng, 3, big=500)
    new = mutate(old, rng)
    base_tars = [make_tar(old, base_fmt, rng), make_tar(other, base_fmt, rng, extras=False)]
    # Same format and mtimes as the base: unchanged members are byte-identical regions.
    target = make_tar(new, fmt, random.Random(seed)) if not tar_base else \
        make_tar(new, base_fmt, random.Random(seed))
    if tar_base:
        base_tars[0] = make_tar(old, base_fmt, random.Random(seed))
    bases = bases_of(base_tars, [tar_base])
    enc, ops = encode_bytes(target, bases)
    assert enc.size == len(ops) and enc.digest == sha(ops)
    assert enc.head.target == sha(target) and enc.head.target_size == len(target)
    # The device: each base layer's files in a directory, read by path.
    roots = {}
    for i, (files, base) in enumerate(zip((old, other), bases)):
        root = tmp_path / f"s{seed}-{fmt}-{base_fmt}-{n}" / str(i)
        extract(files, root)
        roots[base.layer] = DirTree(root, f"base {i}")
    by_chain = {layer.chain_id: tree for layer, tree in roots.items()}
    trees = [by_chain[layer.chain_id] for layer in enc.head.bases]
    rebuilt = b"".join(rebuild(enc.head, pieces(ops), trees, "t", tars_for(enc, base_tars)))
    assert rebuilt == target
    # Unchanged files were referenced, not shipped.
    unchanged = sum(len(d) for p, d in new.items() if old.get(p) == d and len(d) >= 128)
    assert enc.stats.copied >= unchanged


@PROFILE
@given(seed=st.integers(0, 2 ** 32 - 1), flip=st.integers(0, 2 ** 31))
def test_damaged_delta_raises_format_errors_only(tmp_path: Path, seed: int, flip: int) -> None:
    rng = random.Random(seed)
    old = random_files(rng, 6, big=6000)
    new = mutate(old, rng)
    base_tar, target = make_tar(old, tarfile.PAX_FORMAT, rng), make_tar(new, tarfile.GNU_FORMAT, rng)
    bases = bases_of([base_tar])
    enc, ops = encode_bytes(target, bases)
    root = tmp_path / f"d{seed}-{flip}"
    extract(old, root)
    trees = [DirTree(root, "base")] * len(enc.head.bases)
    damaged = bytearray(ops)
    if damaged:
        damaged[flip % len(damaged)] ^= 1 << (flip % 8)
    cut = bytes(damaged[: flip % (len(damaged) + 1)])
    for bad in (bytes(damaged), cut):
        if bad == ops:
            continue
        with pytest.raises((BundleFormatError, PrerequisiteError)):
            for _ in rebuild(enc.head, pieces(bad), trees, "t"):
                pass


def test_unchanged_members_are_copied_as_ranges_of_a_tar_base(tmp_path: Path) -> None:
    rng = random.Random(11)
    old = {f"usr/lib/m{i:03}.py": rng.randbytes(rng.randrange(200, 4000)) for i in range(300)}
    new = dict(old, **{"usr/lib/m150.py": old["usr/lib/m150.py"] + b"# v2\n"})
    base_tar, target = make_tar(old, tarfile.PAX_FORMAT, rng), make_tar(new, tarfile.PAX_FORMAT, rng)
    bases = bases_of([base_tar], [True])
    enc, ops = encode_bytes(target, bases)
    from edgebundle.format.delta import read_ops
    kinds = [type(op).__name__ for op in read_ops([ops], "t")]
    assert kinds.count("Range") <= 3, kinds  # before and after the changed file (+ links)
    import zstandard
    # The changed member's headers and bytes, and the end-of-archive zeros (as the entry's
    # zstd codec carries them): next to nothing, for a 300-file layer.
    assert len(zstandard.ZstdCompressor(level=3).compress(ops)) < 1500 and enc.head.bases[0].tar
    extract(old, tmp_path)  # the changed file is patched against its old version
    rebuilt = b"".join(rebuild(enc.head, [ops], [DirTree(tmp_path, "x")], "t",
                               [io.BytesIO(base_tar)]))
    assert rebuilt == target
    # Without the tar, the same delta is refused: it names a tar base it was not given.
    with pytest.raises(BundleFormatError, match="tar base"):
        list(rebuild(enc.head, [ops], [DirTree(tmp_path, "x")], "t", [None]))


def test_a_tar_base_is_used_only_where_ranges_cover_much_of_it() -> None:
    rng = random.Random(12)
    big = rng.randbytes(200_000)
    old = {"data/big.bin": big, "data/VERSION": b"v1\n" * 50}
    new = {"data/big.bin": big[:100_000] + b"edit" + big[100_004:], "data/VERSION": b"v1\n" * 50}
    base_tar = make_tar(old, tarfile.PAX_FORMAT, rng, extras=False)
    enc, _ = encode_bytes(make_tar(new, tarfile.PAX_FORMAT, rng, extras=False),
                          bases_of([base_tar], [True]))
    # Only the directory and VERSION members are unchanged: the device reads by file.
    assert [b.tar for b in enc.head.bases] == [False] and enc.stats.patched >= 200_000


def test_changed_or_missing_base_file_is_a_prerequisite_error(tmp_path: Path) -> None:
    rng = random.Random(7)
    old = {"etc/conf": b"setting=1\n" * 100, "bin/tool": rng.randbytes(5000)}
    new = {"etc/conf": b"setting=1\n" * 100, "bin/tool": old["bin/tool"][:4000] + b"v2"}
    bases = bases_of([make_tar(old, tarfile.PAX_FORMAT, rng)])
    enc, ops = encode_bytes(make_tar(new, tarfile.PAX_FORMAT, rng), bases)
    from edgebundle.format.delta import BaseFile, read_ops
    assert {op.path for op in read_ops([ops], "t") if isinstance(op, BaseFile)} == \
        {"etc/conf", "bin/tool"}
    extract(dict(old, **{"etc/conf": b"setting=2\n" * 100}), tmp_path / "changed")
    with pytest.raises(PrerequisiteError, match="etc/conf.*differs"):
        list(rebuild(enc.head, [ops], [DirTree(tmp_path / "changed", "snapshot 3")], "t"))
    extract({"bin/tool": old["bin/tool"]}, tmp_path / "missing")
    with pytest.raises(PrerequisiteError, match="etc/conf.*cannot be read") as info:
        list(rebuild(enc.head, [ops], [DirTree(tmp_path / "missing", "snapshot 3")], "t"))
    assert info.value.missing == [enc.head.bases[0].chain_id]


def test_symlink_in_a_base_tree_is_not_followed(tmp_path: Path) -> None:
    rng = random.Random(3)
    old = {"etc/conf": rng.randbytes(1000)}
    bases = bases_of([make_tar(old, tarfile.PAX_FORMAT, rng)])
    enc, ops = encode_bytes(make_tar(old, tarfile.GNU_FORMAT, rng), bases)
    outside = tmp_path / "outside"
    extract(old, outside)
    (tmp_path / "tree").mkdir()
    os.symlink(outside / "etc", tmp_path / "tree" / "etc")  # right bytes, but via a link
    with pytest.raises(PrerequisiteError, match="cannot be read"):
        list(rebuild(enc.head, [ops], [DirTree(tmp_path / "tree", "t")], "t"))


def test_normalise_names() -> None:
    assert normalise("./usr/bin/x") == "usr/bin/x"
    assert normalise("/usr//bin/./x") == "usr/bin/x"
    assert normalise("usr/../etc") is None
    assert normalise("./") is None
