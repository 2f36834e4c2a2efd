"""The pure parts of the resumable upload: resume offset, staged/df parsing, rate limiter."""

from __future__ import annotations

import io
import json
import os
from typing import List

import pytest
import xxhash

from edgebundle.staged import block_digests, describe
from edgebundle.transfer.upload import RateLimiter, local_blocks, parse_df, parse_staged, resume_offset

B = 4096


def digests(data: bytes) -> List[str]:
    return list(block_digests(io.BytesIO(data), B))


def test_block_digests_are_xxh3_128_of_each_block_and_short_tail() -> None:
    data = os.urandom(2 * B + 10)
    assert digests(data) == [xxhash.xxh3_128_hexdigest(data[i:i + B]) for i in (0, B, 2 * B)]
    assert digests(b"") == []


def test_block_digests_do_not_shift_on_short_reads() -> None:
    data = os.urandom(3 * B)

    class Trickle(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            return super().read(min(n, 1000))

    assert list(block_digests(Trickle(data), B)) == digests(data)


def test_resume_offset_is_first_differing_block() -> None:
    local = digests(os.urandom(5 * B + 7))
    assert resume_offset(local, local, 5 * B + 7, B) == 5 * B + 7  # complete
    assert resume_offset(local, [], 0, B) == 0
    assert resume_offset(local, local[:2] + ["x"] + local[3:], 5 * B + 7, B) == 2 * B  # corrupt block 2
    assert resume_offset(local, local[:3], 3 * B, B) == 3 * B  # clean cut at a block boundary


def test_partial_last_remote_block_is_not_trusted() -> None:
    data = os.urandom(4 * B)
    remote = data[:2 * B + 100]  # cut mid-block
    assert resume_offset(digests(data), digests(remote), len(remote), B) == 2 * B


def test_longer_remote_is_cut_to_local_size() -> None:
    data = os.urandom(2 * B)
    remote = data + os.urandom(B)
    assert resume_offset(digests(data), digests(remote), len(remote), B) == 2 * B


def test_local_blocks_match_describe(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "b")
    with open(path, "wb") as fh:
        fh.write(os.urandom(3 * B + 1))
    staged = describe(path, B)
    assert staged.exists and staged.size == 3 * B + 1 and staged.blocks == local_blocks(path, B)
    assert parse_staged(json.dumps(staged.to_json()).encode(), B) == staged
    missing = describe(path + ".none", B)
    assert (missing.exists, missing.size, missing.blocks) == (False, 0, ())


def test_parse_staged_rejects_inconsistent_output() -> None:
    good = {"path": "p", "exists": True, "size": B + 1, "block_size": B, "blocks": ["a", "b"], "free_bytes": 1}
    assert parse_staged(json.dumps(good).encode(), B).blocks == ("a", "b")
    for bad in ({**good, "blocks": ["a"]}, {**good, "block_size": 2 * B}, {"size": 1}):
        with pytest.raises(ValueError):
            parse_staged(json.dumps(bad).encode(), B)
    with pytest.raises(ValueError):
        parse_staged(b"usage: edgebundle ...", B)


def test_parse_df_posix_and_wrapped() -> None:
    out = b"Filesystem     1024-blocks  Used Available Capacity Mounted on\ntmpfs 2048 100 1948 5% /x\n"
    assert parse_df(out) == 1948 * 1024
    wrapped = b"Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/mapper/very-long-name\n 10 2 8 20% /\n"
    assert parse_df(wrapped) == 8 * 1024
    with pytest.raises(ValueError):
        parse_df(b"df: /nope: No such file or directory\n")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: List[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_rate_limiter_keeps_average_rate() -> None:
    c = FakeClock()
    lim = RateLimiter(1000.0, clock=c.clock, sleep=c.sleep)
    for _ in range(10):
        lim.sent(500)  # instant writes: the limiter alone paces them
    assert c.now - 100.0 == pytest.approx(5.0)
    assert 5000 / (c.now - 100.0) <= 1000.0 + 1e-9


def test_rate_limiter_does_not_sleep_when_link_is_slower() -> None:
    c = FakeClock()
    lim = RateLimiter(1000.0, clock=c.clock, sleep=c.sleep)
    lim.sent(100)
    c.now += 1.0  # the write itself took longer than 100 bytes at 1000 B/s
    lim.sent(100)
    assert c.slept == [pytest.approx(0.1)]


def test_rate_limiter_off_and_invalid() -> None:
    c = FakeClock()
    RateLimiter(None, clock=c.clock, sleep=c.sleep).sent(10 ** 9)
    assert c.slept == []
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_staged_command_prints_json_and_refuses_bad_block_size(tmp_path: object,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from edgebundle.cli.main import main

    path = os.path.join(str(tmp_path), "b.part")
    with open(path, "wb") as fh:
        fh.write(os.urandom(B + 1))
    assert main(["staged", path, "--block-size", str(B), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["size"] == B + 1 and out["blocks"] == list(local_blocks(path, B)) and out["free_bytes"] > 0
    assert main(["staged", path, "--block-size", "100", "--json"]) == 2
    assert "block size 100" in capsys.readouterr().err
    assert main(["staged", os.path.join(str(tmp_path), "no", "dir", "x"), "--json"]) == 2
    assert "cannot read staged file" in capsys.readouterr().err
