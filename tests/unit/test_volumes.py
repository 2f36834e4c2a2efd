"""Volumes: pack a real bundle into volume files, read them back, and every way a set goes wrong.

The bundle is a real one (``pack.write_bundle`` over ``tiny_images``); volumes are written
by ``volumeset.write_volumes`` as ``pack --volume-size`` does, and read through the CLI
(``verify``, ``inspect``, ``import``) or ``usecases.device.open_bundle``. Error messages
are asserted whole: they are the interface a technician at a device reads.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import pytest

from edgebundle import volumeset
from edgebundle.cache import BlobCache
from edgebundle.cli.main import main
from edgebundle.errors import OutputError, SpaceError, UsageError
from edgebundle.format import VOLUME_HEAD_SIZE, BundleReader
from edgebundle.format.volumes import OVERHEAD, VolumeError, parse_head
from edgebundle.holdings import Inventory
from edgebundle.importer.containerd import ContainerdRuntime, Ctr
from edgebundle.pack import write_bundle
from edgebundle.plan import plan_bundle
from edgebundle.usecases.device import import_file, open_bundle
from fake_runtimes import FakeContainerd
from tiny_images import Images

VOLUME = 110_000  # three volumes of the bundle below


def make_bundle(tmp: Path, seed: int, created: str, signers: Sequence[Any] = ()) -> bytes:
    images = Images(BlobCache(tmp / f"cache-{seed}"))
    rnd = random.Random(seed)
    img = images.image("example.test/shop/app:v1",
                       [{"bin/app": bytes(rnd.getrandbits(8) for _ in range(300_000))},
                        {"etc/motd": b"hello\n"}])
    plan = plan_bundle("gw-01", [img], Inventory.empty("containerd", "k8s.io"),
                       runtime="containerd", namespace="k8s.io", platform="linux/amd64")
    out = io.BytesIO()
    write_bundle(plan, images.cache, out, level=3, created=created, signers=signers)
    return out.getvalue()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Tuple[bytes, bytes]:
    tmp = tmp_path_factory.mktemp("volumes")
    # The same images packed a day apart: other bytes (and id), the same size.
    return (make_bundle(tmp, 1, "2026-11-22T12:00:00Z"), make_bundle(tmp, 1, "2026-11-23T12:00:00Z"))


def split(data: bytes, output: Path, size: int = VOLUME) -> List[Path]:
    with volumeset.write_volumes(str(output), size, f"volumes {output}") as out:
        for i in range(0, len(data), 65536):
            out.write(data[i:i + 65536])
    return [Path(p) for p in out.paths]


@pytest.fixture()
def vols(tmp_path: Path, bundles: Tuple[bytes, bytes]) -> List[Path]:
    paths = split(bundles[0], tmp_path / "b.ebundle")
    assert [p.name for p in paths] == ["b.ebundle.001", "b.ebundle.002", "b.ebundle.003"]
    return paths


def run(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 0) -> Tuple[str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == code, err
    return out, err


def error_of(capsys: pytest.CaptureFixture[str], *argv: str, code: int = 5) -> str:
    _, err = run(capsys, *argv, code=code)
    assert err.count("\n") == 1 and err.startswith("edgebundle: error: "), err
    return err[len("edgebundle: error: "):].rstrip("\n")


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def rewrite_head(path: Path, **fields: Any) -> None:
    data = path.read_bytes()
    head = parse_head(data[:VOLUME_HEAD_SIZE], str(path))
    path.write_bytes(dataclasses.replace(head, **fields).pack() + data[VOLUME_HEAD_SIZE:])


HINT_COPY = ("(hint: copy that volume again from the packer's output, then check the set with "
             "`edgebundle verify` on its first volume)")
HINT_ORDER = "(hint: pass the volumes in order (.001, .002, …), each once, all from one pack)"


# ---------------------------------------------------------------------------
# The set as pack writes it


def test_volumes_have_the_size_asked_and_join_into_the_bundle(vols: List[Path],
                                                              bundles: Tuple[bytes, bytes]) -> None:
    data = bundles[0]
    sizes = [p.stat().st_size for p in vols]
    assert sizes[:-1] == [VOLUME, VOLUME] and 0 < sizes[-1] <= VOLUME
    heads = [parse_head(p.read_bytes()[:VOLUME_HEAD_SIZE], str(p)) for p in vols]
    assert [(h.number, h.count, h.total) for h in heads] == [(1, 3, len(data)), (2, 3, len(data)),
                                                             (3, 3, len(data))]
    assert len({h.bundle_id for h in heads}) == 1
    payloads = b"".join(p.read_bytes()[VOLUME_HEAD_SIZE:-(OVERHEAD - VOLUME_HEAD_SIZE)] for p in vols)
    assert payloads == data  # the payloads are today's bundle, byte for byte
    assert not [p for p in vols[0].parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_same_bundle_same_volumes(tmp_path: Path, bundles: Tuple[bytes, bytes]) -> None:
    """The id is the bundle's xxh3-128, not random: a reproducible pack stays byte-identical."""
    a = split(bundles[0], tmp_path / "a.ebundle")
    b = split(bundles[0], tmp_path / "b.ebundle")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


@pytest.mark.parametrize("how", ["first", "stem", "all", "stdin"])
def test_verify_reads_the_set(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                              vols: List[Path], bundles: Tuple[bytes, bytes], how: str) -> None:
    args = {"first": [str(vols[0])], "stem": [str(vols[0].with_suffix(""))],
            "all": [str(p) for p in vols], "stdin": ["-"]}[how]
    if how == "stdin":
        monkeypatch.setattr(sys, "stdin", _Stdin(b"".join(p.read_bytes() for p in vols)))
    out, _ = run(capsys, "verify", *args)
    assert out.endswith(f"OK, format 1, 4 entries, 1 images, {len(bundles[0])} bytes in 3 volumes; "
                        "unsigned\n")


def test_a_single_bundle_still_reads_from_stdin(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch,
                                                bundles: Tuple[bytes, bytes]) -> None:
    monkeypatch.setattr(sys, "stdin", _Stdin(bundles[0]))
    out, _ = run(capsys, "verify", "-")
    assert out == f"-: OK, format 1, 4 entries, 1 images, {len(bundles[0])} bytes; unsigned\n"


def test_verify_checks_a_later_volume_on_its_own(capsys: pytest.CaptureFixture[str],
                                                 vols: List[Path]) -> None:
    vols[0].unlink()
    vols[2].unlink()  # the other sticks are elsewhere
    out, _ = run(capsys, "verify", str(vols[1]))
    head = parse_head(vols[1].read_bytes()[:VOLUME_HEAD_SIZE], "")
    assert out == (f"{vols[1]}: OK, volume 2 of 3 of bundle {head.id_hex}, {head.length} bytes "
                   "(this volume only; verify volume 1 to check the whole bundle)\n")
    flip(vols[1], VOLUME_HEAD_SIZE + 5)
    assert error_of(capsys, "verify", str(vols[1])) == (
        f"volume {vols[1]} (volume 2 of 3) is damaged: payload checksum mismatch "
        "(hint: copy that volume again from the packer's output)")


def test_inspect_reads_header_and_index_across_volumes(capsys: pytest.CaptureFixture[str],
                                                       vols: List[Path],
                                                       bundles: Tuple[bytes, bytes]) -> None:
    out, _ = run(capsys, "inspect", str(vols[0]))
    assert out.startswith(f"bundle {vols[0]}: format 1, {len(bundles[0])} bytes, created "
                          "2026-11-22T12:00:00Z")
    assert "image example.test/shop/app:v1" in out


def test_a_signed_bundle_in_volumes_is_checked_against_the_trust_policy(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The signature covers the bundle, so volumes change nothing about it."""
    from edgebundle.trust import generate_key, load_signing_key
    key = generate_key(str(tmp_path / "k"))
    other = generate_key(str(tmp_path / "other"))
    data = make_bundle(tmp_path, 3, "2026-11-22T12:00:00Z", [load_signing_key(key.private_path)])
    vols = split(data, tmp_path / "s.ebundle")
    out, _ = run(capsys, "verify", str(vols[0]), "--trust", key.public_path, "--trust-dir",
                 str(tmp_path / "none"))
    assert out.endswith(f"bytes in 3 volumes; signed by trusted key {key.key_id}\n")
    _, err = run(capsys, "verify", str(vols[0]), "--trust", other.public_path, "--trust-dir",
                 str(tmp_path / "none"), code=13)
    assert err.startswith("edgebundle: error: ")


# ---------------------------------------------------------------------------
# Every way a set goes wrong, each named in one line (exit 5)


def test_damaged_payload_is_named(capsys: pytest.CaptureFixture[str], vols: List[Path]) -> None:
    flip(vols[1], VOLUME // 2)
    assert error_of(capsys, "verify", str(vols[0])) == (
        f"volume {vols[1]} (volume 2 of 3) is damaged: payload checksum mismatch {HINT_COPY}")


def test_damage_the_bundle_reader_sees_first_still_names_the_volume(
        capsys: pytest.CaptureFixture[str], vols: List[Path]) -> None:
    """A flip in the index record breaks its xxh3 before the last volume ends (the footer
    follows it): the error must still say which volume (``JoinedVolumes.blame``), not
    just which record."""
    data = vols[2].read_bytes()
    head = parse_head(data[:VOLUME_HEAD_SIZE], "")
    footer = data[-(OVERHEAD - VOLUME_HEAD_SIZE) - 33:-(OVERHEAD - VOLUME_HEAD_SIZE)]
    index_offset = int.from_bytes(footer[1:9], "big")
    assert head.offset < index_offset
    flip(vols[2], VOLUME_HEAD_SIZE + index_offset - head.offset + 10)
    assert error_of(capsys, "verify", str(vols[0])) == (
        f"volume {vols[2]} (volume 3 of 3) is damaged: payload checksum mismatch {HINT_COPY}")


def test_misplaced_slice_is_named(capsys: pytest.CaptureFixture[str], vols: List[Path]) -> None:
    head = parse_head(vols[1].read_bytes()[:VOLUME_HEAD_SIZE], "")
    rewrite_head(vols[1], offset=head.offset + 1)
    assert error_of(capsys, "verify", str(vols[0])) == (
        f"volume {vols[1]} (volume 2 of 3) starts at bundle byte {head.offset + 1}, expected "
        f"{head.offset} {HINT_COPY}")


def test_damaged_trailer_of_the_last_volume_is_found(capsys: pytest.CaptureFixture[str],
                                                     vols: List[Path]) -> None:
    """The bundle inside is intact: only the volume's own check can find this."""
    flip(vols[2], vols[2].stat().st_size - 10)
    assert error_of(capsys, "verify", str(vols[0])) == (
        f"volume {vols[2]} (volume 3 of 3) is damaged: payload checksum mismatch {HINT_COPY}")


def test_damaged_header_is_named(capsys: pytest.CaptureFixture[str], vols: List[Path]) -> None:
    flip(vols[2], 20)
    assert error_of(capsys, "verify", str(vols[0])) == (
        f"volume {vols[2]} is damaged (header checksum mismatch) {HINT_COPY}")


def test_missing_volume_is_named(capsys: pytest.CaptureFixture[str], vols: List[Path]) -> None:
    vols[1].unlink()
    assert error_of(capsys, "verify", str(vols[0])) == (
        f"volume 2 of 3 is missing: no file {vols[1]} "
        "(hint: copy every volume of the set next to the first one)")


def test_missing_volume_among_arguments(capsys: pytest.CaptureFixture[str], vols: List[Path]) -> None:
    assert error_of(capsys, "verify", str(vols[0]), str(vols[1])) == (
        "volume 3 of 3 is missing: only 2 given (hint: pass every volume, in order)")
    assert error_of(capsys, "verify", str(vols[0]), str(vols[2])) == (
        f"volume {vols[2]} is volume 3 of 3, expected volume 2 (volumes swapped or out of order) "
        f"{HINT_ORDER}")


def test_swapped_volumes_are_named(capsys: pytest.CaptureFixture[str], vols: List[Path]) -> None:
    tmp = vols[1].with_name("x")
    vols[1].rename(tmp)
    vols[2].rename(vols[1])
    tmp.rename(vols[2])
    assert error_of(capsys, "verify", str(vols[0])) == (
        f"volume {vols[1]} is volume 3 of 3, expected volume 2 (volumes swapped or out of order) "
        f"{HINT_ORDER}")


def test_duplicated_volume_is_named(capsys: pytest.CaptureFixture[str], vols: List[Path]) -> None:
    shutil.copy(vols[0], vols[1])
    assert error_of(capsys, "verify", str(vols[0])) == (
        f"volume {vols[1]} is volume 1 again (duplicated; volume {vols[0]} was volume 1), "
        f"expected volume 2 of 3 {HINT_ORDER}")
    assert error_of(capsys, "verify", str(vols[0]), str(vols[0]), str(vols[2])) == (
        f"volume {vols[0]} is volume 1 again (duplicated; volume {vols[0]} was volume 1), "
        f"expected volume 2 of 3 {HINT_ORDER}")


def test_foreign_volume_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 vols: List[Path], bundles: Tuple[bytes, bytes]) -> None:
    (tmp_path / "other").mkdir()
    other = split(bundles[1], tmp_path / "other" / "b.ebundle")
    shutil.copy(other[1], vols[1])
    mine = parse_head(vols[0].read_bytes()[:VOLUME_HEAD_SIZE], "").id_hex
    theirs = parse_head(other[1].read_bytes()[:VOLUME_HEAD_SIZE], "").id_hex
    assert mine != theirs
    assert error_of(capsys, "verify", str(vols[0])) == (
        f"volume {vols[1]} belongs to another bundle (id {theirs}; volume 1 has {mine}) {HINT_ORDER}")


def test_wrong_count_is_named(capsys: pytest.CaptureFixture[str], vols: List[Path]) -> None:
    rewrite_head(vols[1], count=4)
    assert error_of(capsys, "verify", str(vols[0])) == (
        f"volume {vols[1]} says the bundle has 4 volumes; volume 1 says 3 {HINT_ORDER}")


def test_truncated_volume_is_named(capsys: pytest.CaptureFixture[str], vols: List[Path]) -> None:
    data = vols[1].read_bytes()
    vols[1].write_bytes(data[:-1])
    assert error_of(capsys, "verify", str(vols[0])) == (
        f"volume {vols[1]} (volume 2 of 3) is truncated: {VOLUME - 1} bytes, its header says "
        f"{VOLUME} (hint: copy that volume again from the packer's output)")
    vols[1].write_bytes(data + b"\0")
    assert error_of(capsys, "verify", str(vols[0])) == (
        f"volume {vols[1]} (volume 2 of 3) has data after its end: {VOLUME + 1} bytes, its header "
        f"says {VOLUME} (hint: copy that volume again from the packer's output)")


def test_extra_volume_and_not_the_first(capsys: pytest.CaptureFixture[str], vols: List[Path]) -> None:
    assert error_of(capsys, "verify", *map(str, vols), str(vols[2])) == (
        f"volume {vols[2]} is one too many: the bundle has 3 volumes (hint: pass each volume once, in order)")
    assert error_of(capsys, "verify", str(vols[1]), str(vols[2])) == (
        f"volume {vols[1]} is volume 2 of 3, not the first (hint: start with volume 1 (the file "
        "ending in .001))")


def test_renamed_first_volume_cannot_find_the_rest(capsys: pytest.CaptureFixture[str],
                                                   vols: List[Path]) -> None:
    moved = vols[0].with_name("site.ebundle")
    vols[0].rename(moved)
    assert error_of(capsys, "verify", str(moved), code=2) == (
        f"{moved} is volume 1 of 3, but its name does not end in .001, so the others cannot be "
        "found by name (hint: restore the names OUTPUT.001, OUTPUT.002, …, or pass every volume in order)")
    run(capsys, "verify", str(moved), str(vols[1]), str(vols[2]))  # given in order, it reads


@pytest.fixture()
def stdin_of(monkeypatch: pytest.MonkeyPatch) -> Any:
    def feed(data: bytes) -> None:
        monkeypatch.setattr(sys, "stdin", _Stdin(data))
    return feed


def test_stdin_errors_are_named(capsys: pytest.CaptureFixture[str], vols: List[Path],
                                stdin_of: Any) -> None:
    v = [p.read_bytes() for p in vols]
    stdin_of(v[0] + v[2])
    assert error_of(capsys, "verify", "-") == (
        "volume 2 on standard input is volume 3 of 3, expected volume 2 (volumes swapped or out "
        f"of order) {HINT_ORDER}")
    stdin_of(v[0] + v[1])
    assert error_of(capsys, "verify", "-") == (
        "volume 3 of 3 is missing: standard input ended after volume 2 (hint: send every volume, "
        "in order, e.g. `cat b.ebundle.0* | edgebundle import -`)")
    stdin_of(v[0] + v[1] + v[2][:-30])
    assert error_of(capsys, "verify", "-") == (
        f"volume 3 on standard input (volume 3 of 3) is truncated {HINT_COPY}")
    stdin_of(v[0] + v[1] + v[2] + v[2])
    assert error_of(capsys, "verify", "-") == (
        f"volume 3 on standard input has data after the last volume (3 of 3) {HINT_ORDER}")
    bad = bytearray(v[1])
    bad[VOLUME_HEAD_SIZE + 100] ^= 1
    stdin_of(v[0] + bytes(bad) + v[2])
    assert error_of(capsys, "verify", "-") == (
        f"volume 2 on standard input (volume 2 of 3) is damaged: payload checksum mismatch {HINT_COPY}")


def test_volumes_relabelled_with_another_id_do_not_join(capsys: pytest.CaptureFixture[str],
                                                        tmp_path: Path, vols: List[Path],
                                                        bundles: Tuple[bytes, bytes]) -> None:
    """A forged set: another (valid) bundle's volumes, relabelled with this set's id."""
    (tmp_path / "o").mkdir()
    other = split(bundles[1], tmp_path / "o" / "b.ebundle")
    mine = parse_head(vols[0].read_bytes()[:VOLUME_HEAD_SIZE], "")
    for theirs in other:
        rewrite_head(theirs, bundle_id=mine.bundle_id)
    assert error_of(capsys, "verify", str(other[0])) == (
        f"the volumes of bundle {mine.id_hex} do not join into it (mixed from different packs?) "
        f"{HINT_ORDER}")


def test_usage_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path, vols: List[Path],
                      bundles: Tuple[bytes, bytes]) -> None:
    assert error_of(capsys, "verify", "-", str(vols[1]), code=2) == (
        "- (standard input) takes no further paths (hint: send the volumes in order on standard "
        "input, or pass their paths)")
    single = tmp_path / "one.ebundle"
    single.write_bytes(bundles[0])
    assert error_of(capsys, "verify", str(single), str(vols[1]), code=2) == (
        f"{single} is a bundle, not a volume; only volumes come as several files "
        "(hint: pass one bundle file)")


# ---------------------------------------------------------------------------
# Import through the real containerd loader (its daemon modelled behind ctr's seam)


def containerd(tmp: Path) -> Tuple[FakeContainerd, ContainerdRuntime]:
    fake = FakeContainerd("k8s.io")
    sock = tmp / "containerd.sock"
    sock.touch()
    return fake, ContainerdRuntime(Ctr(str(sock), "k8s.io", runner=fake))


def test_import_from_the_first_volume(tmp_path: Path, vols: List[Path]) -> None:
    fake, runtime = containerd(tmp_path)
    result = import_file(str(vols[0]), runtime)
    assert result.imported == ["example.test/shop/app:v1"]
    assert "example.test/shop/app:v1" in fake.real_names()


def test_import_of_a_damaged_set_names_the_volume_and_imports_nothing(tmp_path: Path,
                                                                      vols: List[Path]) -> None:
    flip(vols[2], vols[2].stat().st_size - 10)  # found only at the very end of the stream
    fake, runtime = containerd(tmp_path)
    with pytest.raises(VolumeError, match=r"volume .*b\.ebundle\.003 \(volume 3 of 3\) is damaged"):
        import_file(str(vols[0]), runtime)
    assert fake.real_names() == set()


def test_set_is_checked_before_the_runtime_is_touched(tmp_path: Path, vols: List[Path]) -> None:
    vols[2].unlink()
    fake, runtime = containerd(tmp_path)
    calls: List[Any] = []
    runtime.inventory = lambda: calls.append(1)  # type: ignore[method-assign, assignment, return-value]
    with pytest.raises(VolumeError, match="volume 3 of 3 is missing"):
        import_file(str(vols[0]), runtime)
    assert calls == []


# ---------------------------------------------------------------------------
# Writing: nothing half-written under the final names, no stray temp files


def test_error_while_writing_leaves_nothing(tmp_path: Path, bundles: Tuple[bytes, bytes]) -> None:
    with pytest.raises(RuntimeError):
        with volumeset.write_volumes(str(tmp_path / "b.ebundle"), VOLUME, "x") as out:
            out.write(bundles[0][:250_000])
            raise RuntimeError("the packer failed")
    assert list(tmp_path.iterdir()) == []


def test_failed_rename_takes_back_the_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          bundles: Tuple[bytes, bytes]) -> None:
    real = os.replace
    done: List[str] = []

    def replace(src: str, dst: str) -> None:
        if len(done) == 1:
            raise OSError(28, "No space left on device")
        real(src, dst)
        done.append(dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SpaceError, match="no space left"):
        split(bundles[0], tmp_path / "b.ebundle")
    assert done == [str(tmp_path / "b.ebundle.003")]  # the last volume is renamed first
    assert list(tmp_path.iterdir()) == []


def test_a_shorter_set_removes_the_older_sets_extra_volumes(tmp_path: Path,
                                                            bundles: Tuple[bytes, bytes]) -> None:
    keep = tmp_path / "b.ebundle.007"
    split(bundles[0], tmp_path / "b.ebundle", 60_000)
    assert len(list(tmp_path.iterdir())) == 6
    keep.write_bytes(b"not a volume")
    split(bundles[0], tmp_path / "b.ebundle", VOLUME)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "b.ebundle.001", "b.ebundle.002", "b.ebundle.003", "b.ebundle.007"]


def test_volume_write_errors_are_output_errors(tmp_path: Path, bundles: Tuple[bytes, bytes]) -> None:
    with pytest.raises(OutputError, match=r"cannot write x: "):
        with volumeset.write_volumes(str(tmp_path / "missing" / "b.ebundle"), VOLUME, "x") as out:
            out.write(bundles[0])


# ---------------------------------------------------------------------------
# Sizes and the pack flags


@pytest.mark.parametrize("text,size", [("1M", 1 << 20), ("700M", 700 << 20), ("4G", 4 << 30),
                                       ("1024k", 1 << 20), ("2GiB", 2 << 30), ("1048576", 1 << 20),
                                       ("3 MB", 3 << 20), ("1T", 1 << 40)])
def test_parse_size(text: str, size: int) -> None:
    assert volumeset.parse_size(text) == size


def test_parse_size_refuses() -> None:
    with pytest.raises(UsageError, match=r"volume size 4 is 4 bytes, below the minimum of 1M"):
        volumeset.parse_size("4")
    with pytest.raises(UsageError, match=r"volume size '1.5G' is not a size"):
        volumeset.parse_size("1.5G")
    assert volumeset.FAT32_VOLUME_SIZE == 4 * 1024 ** 3 - 1


def test_pack_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    m = str(tmp_path / "m.yaml")
    assert error_of(capsys, "pack", m, "--site", "s", "-o", "-", "--volume-size", "1M", code=2) == (
        "volumes are files: -o - cannot take --volume-size or --fat32 (hint: name the output "
        "file, e.g. -o /media/usb/site.ebundle)")
    assert error_of(capsys, "pack", m, "--site", "s", "-o", "-", "--fat32", code=2).startswith(
        "volumes are files")
    assert error_of(capsys, "pack", m, "--site", "s", "-o", "x", "--volume-size", "4", code=2) == (
        "volume size 4 is 4 bytes, below the minimum of 1M (1048576 bytes) (hint: give a suffix, "
        "e.g. 4G or 700M)")
    with pytest.raises(SystemExit):
        main(["pack", m, "--site", "s", "-o", "x", "--volume-size", "1M", "--fat32"])
    help_text = capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["pack", "--help"])
    help_text = capsys.readouterr()
    assert "binary units" in help_text.out and "FAT32" in help_text.out


class _Stdin:
    """``sys.stdin`` whose ``buffer`` hands out short reads, as a pipe does."""

    def __init__(self, data: bytes) -> None:
        self.buffer = _Short(data)


class _Short(io.BytesIO):
    def read(self, n: "int | None" = -1) -> bytes:
        return super().read(n if n is None or n < 0 else min(n, 7919))


def test_open_bundle_is_the_one_door(vols: List[Path], bundles: Tuple[bytes, bytes]) -> None:
    with open_bundle(str(vols[0])) as fh:
        reader = BundleReader(fh, "b")
        for entry in reader.entries():
            entry.skip()
    assert reader.total_size == len(bundles[0])
