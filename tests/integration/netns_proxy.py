"""Run inside a network (and mount) namespace of the test's own: NO_PROXY for real.

``test_proxy_netns_real.py`` starts this with ``unshare --net --mount``. In here only
``lo`` exists, with 127.0.0.1 and an extra address 10.99.0.1, and ``/etc/hosts`` is a
bind mount naming ``registry.edge.test`` -> 10.99.0.1: a registry that is *not*
loopback (loopback is never proxied, so NO_PROXY could not be seen on it) and a name
the client resolves itself. Nothing can leave: there is no route out, no DNS server.

Each case pulls the image with a proxy set; the proxy (on 127.0.0.1) refuses every
target that is not loopback, so a request it was asked to carry fails, and its request
log says which requests went through it. Prints one JSON object: case -> result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import imagefactory  # noqa: E402
import services  # noqa: E402
from edgebundle.cache import BlobCache  # noqa: E402
from edgebundle.errors import EdgebundleError  # noqa: E402
from edgebundle.oci import Platform  # noqa: E402
from edgebundle.reference import parse_reference  # noqa: E402
from edgebundle.registry import RegistryClient  # noqa: E402
from edgebundle.registry.proxy import ProxySettings  # noqa: E402
from edgebundle.resolve import Resolver  # noqa: E402
from edgebundle.specs import ImageSpec, RegistryConfig  # noqa: E402

ADDRESS = "10.99.0.1"
NAME = "registry.edge.test"
REPO = "shop/noproxy"


def netns_setup(tmp: Path) -> None:
    if os.environ.get("EDGEBUNDLE_IN_OWN_NETNS") != "1":
        raise SystemExit("refusing to change lo and /etc/hosts outside a namespace of our own")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo"], check=True)
    hosts = tmp / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{ADDRESS} {NAME}\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)


def pull(host: str, env: Dict[str, str], cache: Path) -> Optional[str]:
    """None if the image came (and verified), else the one-line error."""
    client = RegistryClient({host: RegistryConfig(host, insecure=True)}, timeout=10, retries=0,
                            proxies=ProxySettings.from_environ(env))
    resolver = Resolver(BlobCache(cache), client)
    try:
        ref = f"{host}/{REPO}:v1"
        image = resolver.resolve(ImageSpec(ref, parse_reference(ref)), Platform.parse("linux/amd64"))
        resolver.fetch_layers([image], {la.digest for la in image.layers})
        return None
    except EdgebundleError as exc:
        return exc.message
    finally:
        resolver.close()
        client.close()


def main() -> None:
    tmp = Path(sys.argv[1])
    netns_setup(tmp)
    reg = services.start_registry(tmp / "reg", bind=ADDRESS)
    proxy = services.start_connect_proxy()
    try:
        imagefactory.push_image(reg.host, REPO, "v1", imagefactory.build_image([{"etc/motd": "no proxy\n"}]))
        port = reg.port
        by_name, by_ip = f"{NAME}:{port}", f"{ADDRESS}:{port}"
        cases = {
            "no NO_PROXY": (by_name, ""),
            "exact name": (by_name, NAME),
            "domain and its subdomains": (by_name, "edge.test"),
            "leading dot: subdomains": (by_name, ".edge.test"),
            "name with its port": (by_name, f"{NAME}:{port}"),
            "name with another port": (by_name, f"{NAME}:{port + 1}"),
            "another domain": (by_name, "example.test,other.test"),
            "star": (by_name, "*"),
            "ip": (by_ip, ADDRESS),
            "cidr": (by_ip, "10.99.0.0/24"),
            "cidr not matching": (by_ip, "10.98.0.0/24"),
        }
        results: Dict[str, Any] = {}
        for i, (case, (host, no_proxy)) in enumerate(cases.items()):
            seen = len(proxy.requests)
            env = {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "NO_PROXY": no_proxy}
            error = pull(host, env, tmp / f"cache-{i}")
            results[case] = {"error": error, "proxied": proxy.requests[seen:]}
        # The CLI reads them from its environment (lower-case names too).
        (tmp / "m.yaml").write_text(f"""version: 1
registries:
  "{by_name}": {{insecure: true}}
images:
  - ref: {by_name}/{REPO}:v1
sites:
  s: {{runtime: containerd, platform: linux/amd64}}
""")
        for case, no_proxy in (("cli direct", "edge.test"), ("cli proxied", "")):
            seen = len(proxy.requests)
            env = services.clean_env({"http_proxy": proxy.url, "no_proxy": no_proxy,
                                      "EDGEBUNDLE_HOME": str(tmp / f"home-{case[4:]}")})
            out = subprocess.run([sys.executable, "-m", "edgebundle", "plan", str(tmp / "m.yaml"),
                                  "--site", "s", "--json"], capture_output=True, text=True,
                                 env=env, timeout=120)
            results[case] = {"code": out.returncode, "stderr": out.stderr, "proxied": proxy.requests[seen:]}
        print(json.dumps(results))
    finally:
        proxy.stop()
        reg.stop()


if __name__ == "__main__":
    main()
