"""upload_bundle against a real OpenSSH sshd on 127.0.0.1 (the ``sshd`` fixture).

The device's edgebundle is this checkout (``python -m edgebundle``), run by sshd's
shell; a cut link is a real TCP proxy in front of sshd that closes both sides
after N bytes; a full staging disk is a real small tmpfs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List

import pytest
from faults import CuttingProxy, tmpfs
from services import Sshd

from edgebundle.errors import LockedError, SpaceError, TransportError
from edgebundle.oci import Platform
from edgebundle.specs import SiteSpec
from edgebundle.transfer.options import SshOptions
from edgebundle.transfer.upload import RATE_STEP, upload_bundle

BLOCK = 64 * 1024
SIZE = 4 * 1024 * 1024 + 12345  # a short last block
DEVICE_EDGEBUNDLE = f"{sys.executable} -m edgebundle"
OLD_EDGEBUNDLE = ("sh -c 'echo \"edgebundle: error: argument COMMAND: invalid choice: staged\" >&2; exit 2' x")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "gw.ebundle"
    path.write_bytes(os.urandom(SIZE))
    return path


@pytest.fixture
def known_hosts(sshd: Sshd, tmp_path: Path) -> Path:
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line() + "\n")
    return kh


def site(sshd: Sshd, port: int = 0, edgebundle: str = DEVICE_EDGEBUNDLE) -> SiteSpec:
    return SiteSpec(name="gw-01", runtime="containerd", platform=Platform.parse("linux/amd64"),
                    ssh=f"{sshd.user}@{sshd.host}:{port or sshd.port}", edgebundle=edgebundle)


def upload(sshd: Sshd, s: SiteSpec, bundle: Path, staging: Path, kh: Path, **kw: Any) -> Any:
    options = SshOptions(known_hosts=str(kh), key_filename=str(sshd.client_key_path),
                         ssh_config_path=os.devnull, timeout=10)
    return upload_bundle(s, str(bundle), str(staging), options, command_timeout=30, block_size=BLOCK, **kw)


def test_fresh_upload_is_verified_and_renamed(sshd: Sshd, bundle: Path, known_hosts: Path, tmp_path: Path) -> None:
    staging = tmp_path / "dev" / "staging"  # created on the device
    seen: List[int] = []
    result = upload(sshd, site(sshd), bundle, staging, known_hosts, progress=seen.append)
    assert (staging / bundle.name).read_bytes() == bundle.read_bytes()
    assert not (staging / (bundle.name + ".part")).exists()
    assert (result.bytes_sent, result.resumed_from, result.size, result.verified) == (SIZE, 0, SIZE, "blocks")
    assert seen[-1] == SIZE and seen == sorted(seen)


def test_cut_connection_then_resume_from_verified_offset(sshd: Sshd, bundle: Path, known_hosts: Path,
                                                        tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    proxy = CuttingProxy(sshd.port, cut_after=SIZE // 2)
    try:
        kh = tmp_path / "kh_proxy"
        kh.write_text(known_hosts.read_text() + sshd.known_hosts_line().replace(f":{sshd.port} ", f":{proxy.port} ")
                      + "\n")
        with pytest.raises(TransportError) as err:
            upload(sshd, site(sshd, proxy.port), bundle, staging, kh)
    finally:
        proxy.close()
    text = str(err.value)
    assert "\n" not in text and "site gw-01" in text and "run the upload again" in text, text
    part = staging / (bundle.name + ".part")
    assert part.exists() and not (staging / bundle.name).exists()
    result = upload(sshd, site(sshd), bundle, staging, known_hosts)
    assert 0 < result.resumed_from < SIZE and result.resumed_from % BLOCK == 0
    assert result.bytes_sent == SIZE - result.resumed_from < SIZE
    assert (staging / bundle.name).read_bytes() == bundle.read_bytes()


def test_corrupted_part_is_resent_from_the_bad_block(sshd: Sshd, bundle: Path, known_hosts: Path,
                                                     tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    data = bytearray(bundle.read_bytes())
    middle = SIZE // 2
    data[middle] ^= 0xFF  # same size as the bundle: a size check alone would accept it
    (staging / (bundle.name + ".part")).write_bytes(bytes(data))
    result = upload(sshd, site(sshd), bundle, staging, known_hosts)
    assert result.resumed_from == middle // BLOCK * BLOCK
    assert result.bytes_sent == SIZE - result.resumed_from
    assert (staging / bundle.name).read_bytes() == bundle.read_bytes()


def test_old_device_edgebundle_restarts_from_zero(sshd: Sshd, bundle: Path, known_hosts: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / (bundle.name + ".part")).write_bytes(bundle.read_bytes()[:SIZE // 2])
    with caplog.at_level("INFO", logger="edgebundle.transfer.upload"):
        result = upload(sshd, site(sshd, edgebundle=OLD_EDGEBUNDLE), bundle, staging, known_hosts)
    assert (result.resumed_from, result.bytes_sent, result.verified) == (0, SIZE, "sha256")
    assert "restarts from 0" in caplog.text and "too old" in caplog.text
    assert (staging / bundle.name).read_bytes() == bundle.read_bytes()


@pytest.mark.parametrize("edgebundle", [DEVICE_EDGEBUNDLE, OLD_EDGEBUNDLE], ids=["staged", "df"])
def test_not_enough_space_is_refused_up_front(sshd: Sshd, bundle: Path, known_hosts: Path, tmp_path: Path,
                                              edgebundle: str) -> None:
    with tmpfs(tmp_path / "small", 2) as staging:
        with pytest.raises(SpaceError) as err:
            upload(sshd, site(sshd, edgebundle=edgebundle), bundle, staging, known_hosts)
        assert not any(staging.iterdir())  # refused before writing anything
    text = str(err.value)
    assert "\n" not in text and "site gw-01" in text and f"({SIZE} bytes) more" in text, text
    assert err.value.exit_code == 14


def test_longer_stale_part_is_cut_to_the_bundle(sshd: Sshd, bundle: Path, known_hosts: Path, tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / (bundle.name + ".part")).write_bytes(bundle.read_bytes() + os.urandom(3 * BLOCK))
    result = upload(sshd, site(sshd), bundle, staging, known_hosts)
    assert result.resumed_from == SIZE // BLOCK * BLOCK  # the short last block is not trusted
    assert (staging / bundle.name).read_bytes() == bundle.read_bytes()


def test_part_changed_during_upload_fails_verification_and_is_kept(sshd: Sshd, bundle: Path, known_hosts: Path,
                                                                   tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    part = staging / (bundle.name + ".part")
    flipped: List[bool] = []

    def corrupt_block_zero(sent: int) -> None:
        # Once the device holds the first blocks, damage block 0 behind the uploader's back.
        if flipped or not part.exists() or part.stat().st_size < 2 * BLOCK:
            return
        with open(part, "r+b") as fh:
            first = fh.read(1)
            fh.seek(0)
            fh.write(bytes([first[0] ^ 0xFF]))
        flipped.append(True)

    with pytest.raises(TransportError, match=r"differs from .* after the upload \(from byte 0;") as err:
        upload(sshd, site(sshd), bundle, staging, known_hosts, progress=corrupt_block_zero)
    assert flipped and "\n" not in str(err.value)
    assert part.exists() and not (staging / bundle.name).exists()
    result = upload(sshd, site(sshd), bundle, staging, known_hosts)
    assert (result.resumed_from, result.bytes_sent) == (0, SIZE)
    assert (staging / bundle.name).read_bytes() == bundle.read_bytes()


def test_limit_rate_paces_the_upload(sshd: Sshd, bundle: Path, known_hosts: Path, tmp_path: Path) -> None:
    stamps: List[float] = []
    rate = SIZE / 0.8
    upload(sshd, site(sshd), bundle, tmp_path / "staging", known_hosts, limit_rate=rate,
           progress=lambda sent: stamps.append(time.monotonic()))
    # From the first chunk's callback to the last: the rest of the bundle at `rate` (unlimited,
    # pipelined writes to loopback take a few ms; connecting and hashing are outside this span).
    assert stamps[-1] - stamps[0] >= (SIZE - RATE_STEP) / rate * 0.95


def test_an_upload_another_packer_holds_is_refused(sshd: Sshd, bundle: Path, known_hosts: Path,
                                                   tmp_path: Path) -> None:
    # The device's lock as another packer's upload holds it: `staged --hold`, stdin open.
    staging = tmp_path / "staging"
    staging.mkdir()
    holder = subprocess.Popen([sys.executable, "-m", "edgebundle", "staged", str(staging / "x.part"),
                               "--hold", "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and b'"held"' in holder.stdout.readline()
        with pytest.raises(LockedError, match=f"site gw-01: an upload to {staging} is already running"):
            upload(sshd, site(sshd), bundle, staging, known_hosts)
        assert not any(staging.iterdir())  # nothing written, no lock file left
    finally:
        assert holder.stdin is not None
        holder.stdin.close()  # EOF: the holder lets go, as when a packer's channel closes
        assert holder.wait(10) == 0
    result = upload(sshd, site(sshd), bundle, staging, known_hosts)
    assert result.verified == "blocks" and sorted(p.name for p in staging.iterdir()) == [bundle.name]
