"""contrib/'s scheduling files run commands this edgebundle accepts (they stay true to --help)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from edgebundle.cli.main import build_parser

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"


def _argv_of(line: str) -> list:
    words = shlex.split(line.split(">>")[0])
    start = next(i for i, w in enumerate(words) if w.endswith("/edgebundle"))
    return words[start + 1:]


def _commands() -> list:
    service = (CONTRIB / "systemd" / "edgebundle-sync.service").read_text()
    cron = (CONTRIB / "cron" / "edgebundle-sync").read_text()
    lines = [l[len("ExecStart="):] for l in service.splitlines() if l.startswith("ExecStart=")]
    lines += [l for l in cron.splitlines() if l and not l.startswith("#") and "edgebundle sync" in l]
    return lines


@pytest.mark.parametrize("line", _commands())
def test_scheduled_command_parses(line: str) -> None:
    args = build_parser().parse_args(_argv_of(line))
    assert args.command == "sync" and args.all and args.no_progress
    # A timer must never accept new host keys on its own.
    assert not args.accept_new_host_key and args.known_hosts


def test_service_and_timer_belong_together() -> None:
    service = (CONTRIB / "systemd" / "edgebundle-sync.service").read_text()
    timer = (CONTRIB / "systemd" / "edgebundle-sync.timer").read_text()
    assert "Type=oneshot" in service and "SuccessExitStatus=16" in service
    assert "OnCalendar=" in timer and "WantedBy=timers.target" in timer
    assert len(_commands()) == 2
