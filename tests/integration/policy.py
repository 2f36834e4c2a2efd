"""The suite's policy for a service or tool that is unavailable: FAIL when env ``CI``
is non-empty or ``--no-runtime-skip`` was given, else SKIP with the reason. Missing
runtimes must never turn CI green silently. The one home of that rule: conftest's
fixtures and the tests that start their own services both call ``unavailable``.
"""

from __future__ import annotations

import os

import pytest


def strict_runtime(config: pytest.Config) -> bool:
    return bool(os.environ.get("CI")) or bool(config.getoption("--no-runtime-skip", default=False))


def unavailable(config: pytest.Config, reason: str) -> None:
    """Skip or fail according to the policy above (never returns)."""
    if strict_runtime(config):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
