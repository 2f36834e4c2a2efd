"""The gateway fleet itself (tests/integration/fleet.py): it starts fast, its healthy
gateways answer over real SSH, and its faults are the faults they claim to be.

Through the existing code only (``transfer.ssh.pull_report``, ``edgebundle inventory
pull``): nothing here needs ``edgebundle sync``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict

import fleet as fleetlib
import pytest

from edgebundle.cli.main import main
from edgebundle.errors import TransportError
from edgebundle.transfer.ssh import pull_report

START_BUDGET = 30.0  # seconds for 22 sshd + 2 dockerd; measured ~3-6 s on 2 shared cores


def pull(fl: fleetlib.Fleet, g: fleetlib.Gateway) -> Any:
    try:
        return pull_report(g.site_spec(), fl.ssh_options(), command_timeout=120)
    except TransportError as exc:
        return exc


def test_fleet_starts_within_budget(fleet: fleetlib.Fleet) -> None:
    print(f"\nfleet of {len(fleet.gateways)} gateways started: " +
          ", ".join(f"{k} {v:.2f}s" for k, v in fleet.startup.items()))
    assert len(fleet.gateways) >= 20
    assert len({g.port for g in fleet.gateways}) == len(fleet.gateways)
    assert len({g.sshd.host_pubkey_line for g in fleet.gateways}) == len(fleet.gateways)  # own host keys
    assert {g.fault for g in fleet.faulty} == set(fleetlib.FAULTS)
    assert fleet.startup["total"] < START_BUDGET, fleet.startup


def test_every_reachable_gateway_reports_what_its_runtime_holds(fleet: fleetlib.Fleet, registry: Any) -> None:
    proxy = fleet.by_fault("cut-upload").proxy
    assert proxy is not None
    with ThreadPoolExecutor(6) as ex:
        answers = dict(zip((g.name for g in fleet.gateways), ex.map(lambda g: pull(fleet, g), fleet.gateways)))
    old = {f"{registry.host}/{r}" for r in fleetlib.OLD_REFS}
    refused = {"wrong-host-key": "changed", "sshd-down": "refused", "edgebundle-missing": "is not installed"}
    for g in fleet.gateways:
        got = answers[g.name]
        if g.fault in refused:
            assert isinstance(got, TransportError), (g.name, got)
            assert refused[g.fault] in got.message and "\n" not in got.message, (g.name, got.message)
            continue
        assert isinstance(got, dict), (g.name, got)
        held = {i["name"] for i in got["images"] if i["complete"]}
        assert held == (old if g.spec.holds == "old" else set()), (g.name, held)
        assert held == set(fleetlib.runtime_images(fleet, g)), g.name  # the runtime agrees
    assert proxy.cuts == 0  # a report goes through the cut link (it cuts uploads)


def test_edgebundle_inventory_pull_through_the_manifest(fleet: fleetlib.Fleet, registry: Any, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI reads the fleet's site entries (ssh, address, edgebundle) as written."""
    picked = [g for g in fleet.healthy if g.runtime == "docker" and g.spec.holds == "old"][:1] + [fleet["gw-01"]]
    manifest = fleetlib.write_manifest(fleet, tmp_path / "m.yaml", registry.host, fleetlib.MANIFEST_REFS,
                                       picked)
    home = ["--home", str(tmp_path / "home")]
    for g in picked:
        capsys.readouterr()
        rc = main([*home, "inventory", "pull", g.name, "-m", str(manifest), *fleet.ssh_flags(), "--json"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        shown: Dict[str, Any] = json.loads(out)
        held = {i["name"] for i in shown["images"] if i["complete"]}
        assert held == set(fleetlib.runtime_images(fleet, g)) and held, (g.name, held)
