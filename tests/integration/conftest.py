"""Session fixtures that run real services (registry, containerd, dockerd, sshd).

Policy when a service (or a required tool) is unavailable: the test FAILS if
env ``CI`` is non-empty or ``--no-runtime-skip`` was given, else it SKIPS
with the reason.  Missing runtimes must never turn CI green silently.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # tests/integration has no __init__.py
    sys.path.insert(0, str(HERE))

import fleet as fleetlib  # noqa: E402
import imagefactory  # noqa: E402
import services  # noqa: E402
from policy import unavailable  # noqa: E402
from services import Containerd, Dockerd, Registry, ServiceError, Sshd  # noqa: E402

T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs real services (registry, containerd, dockerd, sshd)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected item of the session, so filter by path.
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _start(config: pytest.Config, name: str, start: Callable[[], T]) -> T:
    try:
        return start()
    except (ServiceError, OSError, subprocess.SubprocessError) as exc:
        unavailable(config, f"{name} could not start: {exc}")
        raise  # unreachable: skip/fail raise


@pytest.fixture(scope="session")
def registry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    reg = _start(request.config, "docker-registry", lambda: services.start_registry(tmp_path_factory.mktemp("registry")))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def containerd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    cd = _start(request.config, "containerd", lambda: services.start_containerd(tmp_path_factory.mktemp("containerd")))
    yield cd
    cd.stop()


@pytest.fixture(scope="session")
def dockerd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    dk = _start(request.config, "dockerd", lambda: services.start_dockerd(tmp_path_factory.mktemp("dockerd")))
    yield dk
    dk.stop()


@pytest.fixture(scope="session")
def sshd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    sd = _start(request.config, "sshd", lambda: services.start_sshd(tmp_path_factory.mktemp("sshd")))
    yield sd
    sd.stop()


@pytest.fixture(scope="session")
def pushed_images(request: pytest.FixtureRequest, registry: Registry) -> dict[str, Any]:
    """imagefactory.standard_set() pushed to the session registry."""
    if not imagefactory.BUSYBOX.exists():
        unavailable(request.config, "/bin/busybox missing (apt-get install busybox-static)")
    return imagefactory.standard_set(registry.host)


@pytest.fixture(scope="session")
def skopeo(request: pytest.FixtureRequest) -> str:
    path = shutil.which("skopeo")
    if not path:
        unavailable(request.config, "skopeo not installed")
    return str(path)


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, containerd: Containerd,
          registry: Registry, pushed_images: dict[str, Any]) -> Iterator[fleetlib.Fleet]:
    """fleet.default_layout(): 22 gateways (sshd each) on the session containerd, 2 own dockerds;
    the "old" ones already hold fleet.OLD_REFS. See tests/integration/fleet.py.

    One fleet per test module (a few seconds): sync tests change what the gateways hold.
    """
    root = tmp_path_factory.mktemp("fleet")
    fl = _start(request.config, "gateway fleet", lambda: fleetlib.start_fleet(root, containerd))
    try:
        started = time.monotonic()
        _start(request.config, "fleet seeding",
               lambda: fleetlib.seed_old(fl, registry.host, fleetlib.OLD_REFS, root / "seed-home"))
        fl.startup["seed"] = time.monotonic() - started
        yield fl
    finally:
        fl.stop()
