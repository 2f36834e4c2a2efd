"""NO_PROXY against a real registry that is not on loopback, in a network namespace of
our own (see netns_proxy.py: in there, nothing can leave the namespace)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

import services
from policy import unavailable

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    unshare, ip = shutil.which("unshare"), shutil.which("ip") or "/usr/sbin/ip"
    if os.geteuid() != 0 or unshare is None or not os.path.exists(ip):
        unavailable(request.config, "network namespaces need root, unshare and ip (iproute2)")
    tmp = tmp_path_factory.mktemp("netns")
    env = services.clean_env({"EDGEBUNDLE_IN_OWN_NETNS": "1", "PYTHONPATH": str(HERE.parents[1])})
    out = subprocess.run([unshare, "--net", "--mount", "--propagation", "private", sys.executable,
                          str(HERE / "netns_proxy.py"), str(tmp)], capture_output=True, text=True,
                         env=env, timeout=300)
    if out.returncode != 0:
        unavailable(request.config, f"the network-namespace run failed: {out.stderr.strip()[-2000:]}")
    parsed: Dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return parsed


DIRECT = ["exact name", "domain and its subdomains", "leading dot: subdomains", "name with its port",
          "star", "ip", "cidr"]
PROXIED = ["no NO_PROXY", "name with another port", "another domain", "cidr not matching"]


@pytest.mark.parametrize("case", DIRECT)
def test_no_proxy_entry_goes_direct(results: Dict[str, Any], case: str) -> None:
    r = results[case]
    assert r["error"] is None and r["proxied"] == [], r


@pytest.mark.parametrize("case", PROXIED)
def test_other_hosts_go_through_the_proxy(results: Dict[str, Any], case: str) -> None:
    r = results[case]
    # The proxy refuses every target that is not loopback: asked, it fails the pull.
    assert r["proxied"] and all(p.startswith("GET http://") for p in r["proxied"]), r
    assert r["error"], r


def test_cli_reads_lower_case_proxy_variables(results: Dict[str, Any]) -> None:
    direct, proxied = results["cli direct"], results["cli proxied"]
    assert direct["code"] == 0 and direct["proxied"] == [], direct
    assert proxied["proxied"] and proxied["code"] != 0, proxied
    assert proxied["stderr"].count("\n") == 1 and "registry.edge.test" in proxied["stderr"], proxied
