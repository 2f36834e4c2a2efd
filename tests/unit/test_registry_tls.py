"""certs.d lookup, SSL contexts, proxy rules, the manifest's TLS keys, per-host transports.

Pure logic and file lookups on tmp dirs; the real handshakes are in
tests/integration/test_registry_tls_real.py.
"""

from __future__ import annotations

import ssl
import sys
from pathlib import Path
from typing import List

import httpx
import pytest

from edgebundle.errors import ManifestError, ResolveError, UsageError
from edgebundle.manifest import parse_manifest
from edgebundle.registry.client import HostTransports, RegistryClient, url_host
from edgebundle.registry.proxy import ProxySettings, use_proxy
from edgebundle.registry.tls import DEFAULT_CERTS_DIRS, certs_dirs_from_env, find_tls_files, ssl_context
from edgebundle.specs import RegistryConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
import services  # noqa: E402  (make_ca: real PEM files)

# -- certs.d -------------------------------------------------------------------------


def test_certs_dirs_default_and_env() -> None:
    assert certs_dirs_from_env({}) == DEFAULT_CERTS_DIRS == ("/etc/docker/certs.d", "/etc/containers/certs.d")
    assert certs_dirs_from_env({"EDGEBUNDLE_CERTS_DIRS": "/a:/b"}) == ("/a", "/b")
    assert certs_dirs_from_env({"EDGEBUNDLE_CERTS_DIRS": " "}) == DEFAULT_CERTS_DIRS


def test_find_tls_files_reads_both_roots_like_docker(tmp_path: Path) -> None:
    docker, containers = tmp_path / "docker", tmp_path / "containers"
    (docker / "reg:5000").mkdir(parents=True)
    (docker / "reg:5000" / "ca.crt").write_text("x")
    (docker / "reg:5000" / "README").write_text("ignored")
    (containers / "reg:5000").mkdir(parents=True)
    (containers / "reg:5000" / "corp.crt").write_text("x")
    (containers / "reg:5000" / "client.cert").write_text("x")
    (containers / "reg:5000" / "client.key").write_text("x")
    (docker / "reg").mkdir()  # another port's directory is not this host's
    (docker / "reg" / "other.crt").write_text("x")
    files = find_tls_files("reg:5000", None, [str(docker), str(containers), str(tmp_path / "missing")])
    assert files.ca_files == (str(docker / "reg:5000" / "ca.crt"), str(containers / "reg:5000" / "corp.crt"))
    assert files.client_cert == str(containers / "reg:5000" / "client.cert")
    assert files.client_key == str(containers / "reg:5000" / "client.key")
    assert files.certs_dirs == (str(docker / "reg:5000"), str(containers / "reg:5000"))
    assert find_tls_files("elsewhere", None, [str(docker)]).ca_files == ()


def test_manifest_files_add_to_certs_d(tmp_path: Path) -> None:
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / "ca.crt").write_text("x")
    config = RegistryConfig("reg", ca_file="/m/ca.pem", client_cert="/m/c.pem", client_key="/m/k.pem")
    files = find_tls_files("reg", config, [str(tmp_path)])
    assert files.ca_files == (str(tmp_path / "reg" / "ca.crt"), "/m/ca.pem")
    assert (files.client_cert, files.client_key) == ("/m/c.pem", "/m/k.pem")


@pytest.mark.parametrize("name, missing", [("client.cert", "client.key"), ("client.key", "client.cert")])
def test_half_a_client_pair_is_an_error(tmp_path: Path, name: str, missing: str) -> None:
    (tmp_path / "reg").mkdir()
    (tmp_path / "reg" / name).write_text("x")
    with pytest.raises(ResolveError) as err:
        find_tls_files("reg", None, [str(tmp_path)])
    assert str(tmp_path / "reg" / missing) in err.value.message


def test_ssl_context_loads_real_pem_and_names_bad_files(tmp_path: Path) -> None:
    ca = services.make_ca(tmp_path / "ca")
    client = ca.issue(tmp_path, "client", client=True)
    files = find_tls_files("reg", RegistryConfig("reg", ca_file=str(ca.cert), client_cert=str(client.cert),
                                                 client_key=str(client.key)), [])
    ctx = ssl_context(files)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    subjects = [dict(x[0] for x in c["subject"]).get("commonName") for c in ctx.get_ca_certs()]
    assert "edgebundle test CA" in subjects

    bad = tmp_path / "bad.crt"
    bad.write_text("not a certificate\n")
    with pytest.raises(ResolveError) as err:
        ssl_context(find_tls_files("reg", RegistryConfig("reg", ca_file=str(bad)), []))
    assert err.value.message.startswith(f"cannot load CA certificate {bad} for registry reg")
    with pytest.raises(ResolveError) as err:
        ssl_context(find_tls_files("reg", RegistryConfig("reg", client_cert=str(client.cert),
                                                         client_key=str(ca.cert)), []))
    assert err.value.message.startswith(f"cannot load client certificate {client.cert}")


# -- proxies -------------------------------------------------------------------------


def test_proxy_settings_from_environ_like_go() -> None:
    s = ProxySettings.from_environ({"HTTPS_PROXY": "proxy:3128", "https_proxy": "http://lower:1",
                                    "http_proxy": "http://p2:8080", "no_proxy": "internal"})
    assert s.https_proxy == "http://proxy:3128"  # upper case wins; no scheme means http://
    assert s.http_proxy == "http://p2:8080"
    assert s.proxy_for("https", "reg.example.com", None) == "http://proxy:3128"
    assert s.proxy_for("http", "reg.example.com", 5000) == "http://p2:8080"
    assert s.proxy_for("https", "a.internal", None) is None
    assert ProxySettings.from_environ({}).proxy_for("https", "x", None) is None
    with pytest.raises(UsageError) as err:
        ProxySettings.from_environ({"HTTPS_PROXY": "socks5://p:1080"})
    assert "HTTPS_PROXY" in err.value.message


@pytest.mark.parametrize("host, port, no_proxy, proxied", [
    ("reg.example.com", 443, "", True),
    ("localhost", 443, "", False),  # Go never proxies loopback
    ("127.0.0.1", 5000, "", False),
    ("::1", 5000, "", False),
    ("reg.example.com", 443, "*", False),
    ("reg.example.com", 443, "example.com", False),  # the domain and its subdomains
    ("example.com", 443, "example.com", False),
    ("notexample.com", 443, "example.com", True),
    ("reg.example.com", 443, ".example.com", False),
    ("example.com", 443, ".example.com", True),  # a leading dot: subdomains only (Go)
    ("reg.example.com", 443, "*.example.com", False),
    ("reg.example.com", 5000, "reg.example.com:5000", False),
    ("reg.example.com", 443, "reg.example.com:5000", True),  # another port
    ("10.1.2.3", 443, "10.0.0.0/8", False),
    ("11.1.2.3", 443, "10.0.0.0/8", True),
    ("10.1.2.3", 5000, "10.1.2.3:5000", False),
    ("10.1.2.3", 443, "10.1.2.3:5000", True),
    ("REG.Example.COM", 443, " other , EXAMPLE.com ", False),
    ("fd00::5", 443, "[fd00::5]:443", False),
])
def test_no_proxy_rules(host: str, port: int, no_proxy: str, proxied: bool) -> None:
    assert use_proxy(host, port, no_proxy) is proxied


def test_host_transports_pick_tls_and_proxy_per_host(tmp_path: Path) -> None:
    asked: List[str] = []

    def ssl_for(host: str) -> ssl.SSLContext:
        asked.append(host)
        return ssl.create_default_context()

    ht = HostTransports(ssl_for, ProxySettings(https_proxy="http://p:3128", no_proxy="direct.example"))
    picked = [ht.key_for(httpx.URL(url)) for url in (
        "https://reg.example:5000/v2/", "https://reg.example:5000/v2/x", "https://direct.example/v2/",
        "http://plain.example/v2/", "https://127.0.0.1:5000/v2/")]
    assert picked[1] == picked[0]
    assert picked[3] == ("http", "", None)  # no HTTP_PROXY given
    assert picked[0] == ("https", "reg.example:5000", "http://p:3128")
    assert picked[2] == ("https", "direct.example", None)
    assert picked[4] == ("https", "127.0.0.1:5000", None)
    assert url_host(httpx.URL("https://[::1]:5000/")) == "[::1]:5000"
    ht.close()


def test_client_builds_one_context_per_https_host(tmp_path: Path) -> None:
    """Through RegistryClient's own transport: contexts come from its certs.d roots."""
    (tmp_path / "127.0.0.1:9").mkdir()
    (tmp_path / "127.0.0.1:9" / "ca.crt").write_text("garbage")
    client = RegistryClient({}, retries=0, certs_dirs=[str(tmp_path)], timeout=1.0)
    from edgebundle.reference import parse_reference
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("127.0.0.1:9/x:y"))
    client.close()
    assert err.value.message.startswith(f"cannot load CA certificate {tmp_path}/127.0.0.1:9/ca.crt for registry "
                                        "127.0.0.1:9")


# -- manifest keys -------------------------------------------------------------------


def manifest_text(entry: str) -> str:
    return (f"version: 1\nregistries:\n  reg.local:5000:\n{entry}\nimages:\n  - reg.local:5000/a:1\n"
            "sites:\n  s: {runtime: containerd, platform: linux/amd64}\n")


def test_manifest_tls_keys_resolve_against_its_directory(tmp_path: Path) -> None:
    for name in ("ca.pem", "c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    m = parse_manifest(manifest_text("    ca_file: ca.pem\n    client_cert: c.pem\n    client_key: k.pem"),
                       "m.yaml", base_dir=tmp_path)
    cfg = m.registries["reg.local:5000"]
    assert (cfg.ca_file, cfg.client_cert, cfg.client_key) == (
        str(tmp_path / "ca.pem"), str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))


def test_manifest_tls_key_errors(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ManifestError) as err:
        parse_manifest(manifest_text("    ca_file: nope.pem"), "m.yaml", base_dir=tmp_path)
    assert err.value.message == f"m.yaml:4: registry 'reg.local:5000': ca_file {tmp_path / 'nope.pem'} is not a file"
    with pytest.raises(ManifestError) as err:
        parse_manifest(manifest_text("    client_cert: c.pem"), "m.yaml", base_dir=tmp_path)
    assert err.value.message == "m.yaml:4: registry 'reg.local:5000': client_cert without client_key"
    with pytest.raises(ManifestError) as err:
        parse_manifest(manifest_text("    ca_fil: c.pem"), "m.yaml", base_dir=tmp_path)
    assert "ca_file" in (err.value.hint or "") + err.value.message
