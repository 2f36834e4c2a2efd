"""``edgebundle staged PATH --block-size N --json`` (device side, hidden from --help).

With ``--hold`` it instead holds the staging directory's upload lock (a
``flock`` on the directory) until its standard input ends: the packer keeps that
command running on its own channel for the whole upload, so two packers never write
one ``.part`` at once (the second is refused, exit 15), and a packer that dies lets go
of the lock with its connection.

A module of its own so that the packer's upload, which runs it on the device twice
per upload, does not pay for importing the importer (about 60 ms a call).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import LockedError, UsageError
from ..state import try_flock
from ..staged import MAX_BLOCK, MIN_BLOCK, describe
from .main import emit_json


def cmd_staged(args: argparse.Namespace) -> int:
    if args.hold:
        return hold_upload_lock(os.path.dirname(os.path.abspath(args.path)))
    try:
        staged = describe(args.path, args.block_size)
    except ValueError as exc:
        raise UsageError(str(exc), f"pass --block-size between {MIN_BLOCK} and {MAX_BLOCK}") from None
    except OSError as exc:
        raise UsageError(f"cannot read staged file {args.path}: {exc.strerror or exc}",
                         "check that the staging directory exists and is readable") from None
    emit_json(staged.to_json())
    return 0


def hold_upload_lock(directory: str) -> int:
    """Hold ``directory``'s upload lock until stdin ends; say so on stdout first.

    The lock is a ``flock`` on the directory itself: no file is left behind, and
    it dies with the process.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise UsageError(f"cannot open staging directory {directory}: {exc.strerror or exc}",
                         "check that it exists and is readable by the SSH user") from None
    try:
        if not try_flock(fd):
            raise LockedError(f"an upload to {directory} is already running on this device",
                              "wait for it to finish and run again")
        # One line: the packer reads up to the newline to know the lock is held.
        sys.stdout.write(json.dumps({"held": directory, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        while sys.stdin.buffer.read(65536):
            pass  # nothing is sent; EOF (the packer closed the channel) ends the hold
    finally:
        os.close(fd)
    return 0
