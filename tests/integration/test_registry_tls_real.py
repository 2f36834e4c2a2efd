"""TLS the way Docker configures it, and proxies, against real ``docker-registry`` instances.

One plain-HTTP registry gets the image pushed; HTTPS registries (a private CA's
certificate, one of them requiring client certificates via ``http.tls.clientcas``)
serve the same storage root. certs.d roots are temp dirs (``certs_dirs=`` or, for the
CLI, ``EDGEBUNDLE_CERTS_DIRS``); the proxy is an in-process CONNECT proxy on loopback
that alone knows the name ``registry.edgebundle.test``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence

import pytest

import imagefactory
import services
from edgebundle.cache import BlobCache
from edgebundle.errors import ResolveError
from edgebundle.oci import Platform
from edgebundle.reference import parse_reference
from edgebundle.registry import RegistryClient
from edgebundle.registry.proxy import ProxySettings
from edgebundle.resolve import Resolver
from edgebundle.specs import ImageSpec, RegistryConfig

PROXIED_NAME = "registry.edgebundle.test"  # only the test proxy resolves it (to 127.0.0.1)
REPO = "shop/tls"


@dataclass
class Pki:
    ca: services.CertAuthority
    server: services.ServerCert
    client_ca: services.CertAuthority
    client: services.ServerCert  # signed by client_ca
    stranger: services.ServerCert  # a client certificate signed by another CA


@dataclass
class Setup:
    image: imagefactory.BuiltImage
    origin: services.Registry  # plain HTTP, where the image was pushed
    tls: services.Registry  # HTTPS, private CA
    mtls: services.Registry  # HTTPS, client certificates required
    pki: Pki


@pytest.fixture(scope="module")
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("tls")
    ca = services.make_ca(tmp / "ca")
    client_ca = services.make_ca(tmp / "client-ca", "edgebundle client CA")
    other_ca = services.make_ca(tmp / "other-ca", "someone else's CA")
    pki = Pki(ca, ca.issue(tmp / "pki", "registry", dns=(PROXIED_NAME,)), client_ca,
              client_ca.issue(tmp / "pki", "client", client=True),
              other_ca.issue(tmp / "pki", "stranger", client=True))
    started: list[services.Registry] = []
    try:
        origin = services.start_registry(tmp / "origin")
        started.append(origin)
        image = imagefactory.build_image([{"etc/motd": "tls layer one\n"}, {"app/data.bin": "x" * 5000}])
        imagefactory.push_image(origin.host, REPO, "v1", image)
        tls = services.start_registry(tmp / "tlsreg", tls=pki.server, storage=origin.root)
        started.append(tls)
        mtls = services.start_registry(tmp / "mtlsreg", tls=pki.server, client_cas=(client_ca.cert,),
                                       storage=origin.root)
        started.append(mtls)
    except (services.ServiceError, OSError) as exc:
        for reg in started:
            reg.stop()
        pytest.fail(f"docker-registry could not start: {exc}", pytrace=False)
    yield Setup(image, origin, tls, mtls, pki)
    for reg in started:
        reg.stop()


def certs_root(tmp: Path, host: str, files: Dict[str, Path]) -> Path:
    """``tmp/certs.d/<host>/`` holding ``files`` (name -> source), like /etc/docker/certs.d."""
    root = tmp / "certs.d"
    d = root / host
    d.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copy(src, d / name)
    return root


def pull(host: str, cache: Path, *, roots: Sequence[Path] = (), config: Optional[RegistryConfig] = None,
         proxies: Optional[ProxySettings] = None, timeout: float = 20.0) -> Any:
    """Resolve and fetch ``host/shop/tls:v1`` for linux/amd64; the fetched image."""
    client = RegistryClient({host: config} if config else {}, timeout=timeout, retries=0,
                            certs_dirs=[str(r) for r in roots], proxies=proxies)
    resolver = Resolver(BlobCache(cache), client)
    try:
        ref = f"{host}/{REPO}:v1"
        image = resolver.resolve(ImageSpec(ref, parse_reference(ref)), Platform.parse("linux/amd64"))
        (image,) = resolver.fetch_layers([image], {la.digest for la in image.layers})
        return image
    finally:
        resolver.close()
        client.close()


def check_image(image: Any, built: imagefactory.BuiltImage) -> None:
    assert image.manifest.digest == built.manifest_digest
    assert [la.diff_id for la in image.layers] == list(built.diff_ids)


# -- private CA ---------------------------------------------------------------------


def test_private_ca_from_certs_d(setup: Setup, tmp_path: Path) -> None:
    root = certs_root(tmp_path, setup.tls.host, {"ca.crt": setup.pki.ca.cert})
    check_image(pull(setup.tls.host, tmp_path / "cache", roots=[tmp_path / "empty", root]), setup.image)


def test_unknown_authority_names_host_and_certs_dir(setup: Setup, tmp_path: Path) -> None:
    root = tmp_path / "docker-certs.d"
    with pytest.raises(ResolveError) as err:
        pull(setup.tls.host, tmp_path / "cache", roots=[root])
    host = setup.tls.host
    assert err.value.message == f"registry {host}: x509: certificate signed by unknown authority"
    assert f"{root}/{host}/ca.crt" in (err.value.hint or "")


def test_wrong_ca_in_certs_d_is_still_unknown_authority(setup: Setup, tmp_path: Path) -> None:
    root = certs_root(tmp_path, setup.tls.host, {"other.crt": setup.pki.client_ca.cert})
    with pytest.raises(ResolveError) as err:
        pull(setup.tls.host, tmp_path / "cache", roots=[root])
    assert "unknown authority" in err.value.message
    assert "did not sign it" in (err.value.hint or "")


def test_manifest_ca_file(setup: Setup, tmp_path: Path) -> None:
    config = RegistryConfig(setup.tls.host, ca_file=str(setup.pki.ca.cert))
    check_image(pull(setup.tls.host, tmp_path / "cache", config=config), setup.image)


# -- client certificates --------------------------------------------------------------


def test_client_certificate_required_names_the_dir(setup: Setup, tmp_path: Path) -> None:
    root = certs_root(tmp_path, setup.mtls.host, {"ca.crt": setup.pki.ca.cert})
    with pytest.raises(ResolveError) as err:
        pull(setup.mtls.host, tmp_path / "cache", roots=[root])
    assert err.value.message == f"registry {setup.mtls.host} requires a TLS client certificate"
    assert f"client.cert and client.key in {root}/{setup.mtls.host}/" in (err.value.hint or "")


def test_client_certificate_from_certs_d(setup: Setup, tmp_path: Path) -> None:
    root = certs_root(tmp_path, setup.mtls.host, {"ca.crt": setup.pki.ca.cert, "client.cert": setup.pki.client.cert,
                                                  "client.key": setup.pki.client.key})
    check_image(pull(setup.mtls.host, tmp_path / "cache", roots=[root]), setup.image)


def test_client_certificate_from_manifest_keys(setup: Setup, tmp_path: Path) -> None:
    config = RegistryConfig(setup.mtls.host, ca_file=str(setup.pki.ca.cert), client_cert=str(setup.pki.client.cert),
                            client_key=str(setup.pki.client.key))
    check_image(pull(setup.mtls.host, tmp_path / "cache", config=config), setup.image)


def test_client_certificate_of_another_ca_is_refused(setup: Setup, tmp_path: Path) -> None:
    root = certs_root(tmp_path, setup.mtls.host, {"ca.crt": setup.pki.ca.cert,
                                                  "client.cert": setup.pki.stranger.cert,
                                                  "client.key": setup.pki.stranger.key})
    with pytest.raises(ResolveError) as err:
        pull(setup.mtls.host, tmp_path / "cache", roots=[root])
    assert err.value.message == (f"registry {setup.mtls.host} refused the client certificate "
                                 f"{root}/{setup.mtls.host}/client.cert")


# -- proxy ----------------------------------------------------------------------------


@pytest.fixture()
def proxy() -> Iterator[services.ConnectProxy]:
    p = services.start_connect_proxy({PROXIED_NAME: "127.0.0.1"})
    yield p
    p.stop()


def test_https_through_connect_proxy(setup: Setup, proxy: services.ConnectProxy, tmp_path: Path) -> None:
    host = f"{PROXIED_NAME}:{setup.tls.port}"  # unresolvable here: only the proxy knows it
    root = certs_root(tmp_path, host, {"ca.crt": setup.pki.ca.cert})
    image = pull(host, tmp_path / "cache", roots=[root], proxies=ProxySettings(https_proxy=proxy.url))
    check_image(image, setup.image)
    assert proxy.requests and set(proxy.requests) == {f"CONNECT {host}"}


def test_plain_http_through_proxy_and_loopback_goes_direct(setup: Setup, proxy: services.ConnectProxy,
                                                           tmp_path: Path) -> None:
    host = f"{PROXIED_NAME}:{setup.origin.port}"
    settings = ProxySettings.from_environ({"http_proxy": proxy.url, "HTTPS_PROXY": proxy.url})
    image = pull(host, tmp_path / "cache", config=RegistryConfig(host, insecure=True), proxies=settings)
    check_image(image, setup.image)
    assert proxy.requests and all(r.startswith(f"GET http://{host}/v2/{REPO}/") for r in proxy.requests)
    seen = len(proxy.requests)
    # 127.0.0.1 is never proxied (Docker's rule), with or without NO_PROXY.
    check_image(pull(setup.origin.host, tmp_path / "cache2", config=RegistryConfig(setup.origin.host, insecure=True),
                     proxies=settings), setup.image)
    assert len(proxy.requests) == seen


# -- the CLI: env EDGEBUNDLE_CERTS_DIRS and HTTPS_PROXY ------------------------------


def run_cli(*args: str, home: Path, env_extra: Dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = services.clean_env({"EDGEBUNDLE_HOME": str(home), "HOME": str(home / "user"), **env_extra})
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        if name not in env_extra:
            env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "edgebundle", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_plan_reads_certs_dirs_and_proxy_from_env(setup: Setup, proxy: services.ConnectProxy,
                                                      tmp_path: Path) -> None:
    host = f"{PROXIED_NAME}:{setup.mtls.port}"
    root = certs_root(tmp_path, host, {"ca.crt": setup.pki.ca.cert, "client.cert": setup.pki.client.cert,
                                       "client.key": setup.pki.client.key})
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"version: 1\nimages:\n  - {host}/{REPO}:v1\n"
                        "sites:\n  s1: {runtime: containerd, platform: linux/amd64}\n")
    env = {"EDGEBUNDLE_CERTS_DIRS": f"{tmp_path / 'none'}:{root}", "HTTPS_PROXY": proxy.url}
    proc = run_cli("plan", str(manifest), "--site", "s1", "--json", home=tmp_path / "home", env_extra=env)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["images"][0]["top"] == setup.image.manifest_digest
    assert plan["images"][0]["source"] == host
    assert f"CONNECT {host}" in proxy.requests

    env["EDGEBUNDLE_CERTS_DIRS"] = str(tmp_path / "none")
    proc = run_cli("plan", str(manifest), "--site", "s1", home=tmp_path / "home2", env_extra=env)
    assert proc.returncode == 4, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"edgebundle: error: registry {host}: x509: certificate signed by unknown "
                               "authority"), lines[0]
    assert f"{tmp_path / 'none'}/{host}/ca.crt" in lines[0]


# -- other certificate failures users meet -------------------------------------------


def test_certificate_for_another_name(setup: Setup, tmp_path: Path) -> None:
    host = f"localhost:{setup.tls.port}"  # the certificate names 127.0.0.1 and PROXIED_NAME only
    root = certs_root(tmp_path, host, {"ca.crt": setup.pki.ca.cert})
    with pytest.raises(ResolveError) as err:
        pull(host, tmp_path / "cache", roots=[root])
    assert err.value.message == f"registry {host}: x509: certificate is not valid for {host}"
    assert "subjectAltName" in (err.value.hint or "")


def test_expired_certificate(setup: Setup, tmp_path: Path) -> None:
    expired = setup.pki.ca.issue(tmp_path / "pki", "expired", days=-1)
    reg = services.start_registry(tmp_path / "reg", tls=expired, storage=setup.origin.root)
    try:
        root = certs_root(tmp_path, reg.host, {"ca.crt": setup.pki.ca.cert})
        with pytest.raises(ResolveError) as err:
            pull(reg.host, tmp_path / "cache", roots=[root])
    finally:
        reg.stop()
    assert err.value.message == f"registry {reg.host}: x509: certificate has expired or is not yet valid"


# -- a TLS mirror with its own certs.d entry ------------------------------------------


def test_each_host_its_own_certificates_mirror_and_upstream(setup: Setup, tmp_path: Path) -> None:
    """Mirror (client certificates required) and upstream (CA only), one certs.d each."""
    up, mirror = setup.tls.host, setup.mtls.host
    configs = {up: RegistryConfig(up, mirrors=(mirror,))}

    def fetch(files: Dict[str, Path], cache: Path) -> Dict[str, str]:
        root = certs_root(cache.parent, up, {"ca.crt": setup.pki.ca.cert})
        certs_root(cache.parent, mirror, files)
        client = RegistryClient(configs, timeout=20.0, retries=0, certs_dirs=[str(root)])
        resolver = Resolver(BlobCache(cache), client)
        try:
            ref = f"{up}/{REPO}:v1"
            image = resolver.resolve(ImageSpec(ref, parse_reference(ref)), Platform.parse("linux/amd64"))
            (image,) = resolver.fetch_layers([image], {la.digest for la in image.layers})
            check_image(image, setup.image)
            return client.served()
        finally:
            resolver.close()
            client.close()

    wanted = [setup.image.manifest_digest, *setup.image.layer_digests]
    served = fetch({"ca.crt": setup.pki.ca.cert, "client.cert": setup.pki.client.cert,
                    "client.key": setup.pki.client.key}, tmp_path / "a" / "cache")
    assert {served[d] for d in wanted} == {mirror}
    # Without its client certificate the mirror refuses us: upstream serves, nothing breaks.
    served = fetch({"ca.crt": setup.pki.ca.cert}, tmp_path / "b" / "cache")
    assert {served[d] for d in wanted} == {up}


def test_https_proxy_verified_by_its_own_certs_d(setup: Setup, tmp_path: Path) -> None:
    """TLS to the proxy (its CA from certs.d of the proxy's host:port), TLS to the registry inside."""
    proxy_ca = services.make_ca(tmp_path / "proxy-ca", "corporate proxy CA")
    p = services.start_connect_proxy({PROXIED_NAME: "127.0.0.1"},
                                     tls=proxy_ca.issue(tmp_path / "pki", "proxy"))
    try:
        host = f"{PROXIED_NAME}:{setup.tls.port}"
        proxy_host = f"127.0.0.1:{p.port}"
        root = certs_root(tmp_path, host, {"ca.crt": setup.pki.ca.cert})
        settings = ProxySettings(https_proxy=f"https://{proxy_host}")
        with pytest.raises(ResolveError) as err:  # the proxy's CA is not trusted yet
            pull(host, tmp_path / "c1", roots=[root], proxies=settings)
        assert "unknown authority" in err.value.message
        assert f"the HTTPS proxy {proxy_host}" in (err.value.hint or "")
        assert f"{root}/{proxy_host}/ca.crt" in (err.value.hint or "")
        certs_root(tmp_path, proxy_host, {"proxy-ca.crt": proxy_ca.cert})
        check_image(pull(host, tmp_path / "c2", roots=[root], proxies=settings), setup.image)
        assert f"CONNECT {host}" in p.requests
    finally:
        p.stop()
