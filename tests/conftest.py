"""Options shared by the whole suite (must live at the rootdir to be seen by `pytest`)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-runtime-skip",
        action="store_true",
        default=False,
        help="fail (instead of skip) integration tests whose services cannot start; "
             "implied when the CI environment variable is set",
    )
