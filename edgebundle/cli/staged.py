"""``edgebundle staged PATH --block-size N --json`` (device side, hidden from --help).

A module of its own so that the packer's upload, which runs it on the device twice
per upload, does not pay for importing the importer (about 60 ms a call).
"""

from __future__ import annotations

import argparse

from ..errors import UsageError
from ..staged import MAX_BLOCK, MIN_BLOCK, describe
from .main import emit_json


def cmd_staged(args: argparse.Namespace) -> int:
    try:
        staged = describe(args.path, args.block_size)
    except ValueError as exc:
        raise UsageError(str(exc), f"pass --block-size between {MIN_BLOCK} and {MAX_BLOCK}") from None
    except OSError as exc:
        raise UsageError(f"cannot read staged file {args.path}: {exc.strerror or exc}",
                         "check that the staging directory exists and is readable") from None
    emit_json(staged.to_json())
    return 0
