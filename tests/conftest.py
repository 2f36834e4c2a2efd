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


@pytest.fixture(autouse=True, scope="session")
def _device_paths_of_our_own(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never the machine's /etc/edgebundle/trusted.d or /var/lib/edgebundle.

    A trust directory there would change what every import test accepts, and state
    written there would outlive the suite. Tests that want them pass their own.
    """
    import os

    root = tmp_path_factory.mktemp("device-paths")
    os.environ["EDGEBUNDLE_TRUST_DIR"] = str(root / "trusted.d")
    os.environ["EDGEBUNDLE_STATE_DIR"] = str(root / "state")


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test (and every edgebundle it runs) gets its own device state directory.

    ``import`` and ``report`` lock and journal there; the default, /var/lib/edgebundle,
    is the real device's and no test may touch it.
    """
    monkeypatch.setenv("EDGEBUNDLE_STATE_DIR", str(tmp_path_factory.mktemp("state")))
