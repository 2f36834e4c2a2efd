"""Bearer token auth against a real ``docker-registry`` with ``auth: token``.

The realm is tests/integration/tokenserver.py (RS256 JWTs whose x5c certificate the
registry trusts through ``rootcertbundle``). Images are pushed to a plain registry on
the same storage root first (imagefactory pushes with basic auth only). What only a
gateway in front of a registry sends (429 with Retry-After, 403 DENIED) comes from
tests/integration/httpfront.py, which forwards everything else to the real registry.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import pytest

import httpfront
import imagefactory
import services
import tokenserver
from conftest import _start, unavailable
from edgebundle.cache import BlobCache
from edgebundle.errors import ResolveError
from edgebundle.oci import Platform
from edgebundle.reference import parse_reference
from edgebundle.registry import CredentialStore, RegistryClient
from edgebundle.resolve import Resolver
from edgebundle.specs import ImageSpec, RegistryConfig

LINUX = Platform.parse("linux/amd64")
ALICE_PW = "alice-pw-7f3a"
BOB_PW = "bob-pw-91c2"


@dataclass
class TokenSite:
    """Pushed images on a storage root, and how to start token registries on it."""

    storage: Path
    images: Dict[str, imagefactory.BuiltImage]  # repo -> image (tag v1)


@pytest.fixture(scope="module")
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TokenSite:
    if not imagefactory.BUSYBOX.exists():
        unavailable(request.config, "/bin/busybox missing (apt-get install busybox-static)")
    tmp = tmp_path_factory.mktemp("token-seed")
    plain = _start(request.config, "docker-registry", lambda: services.start_registry(tmp))
    try:
        images = {
            "team/a": imagefactory.build_image([{"a.txt": "team a\n"}, {"more/a2.txt": "a2\n" * 500}], media="docker"),
            "team/b": imagefactory.build_image([{"b.txt": "team b\n"}], media="docker"),
            "public/base": imagefactory.build_image([{"base.txt": "base\n"}]),
        }
        for repo, img in images.items():
            imagefactory.push_image(plain.host, repo, "v1", img)
    finally:
        plain.stop()
    return TokenSite(plain.root, images)


@dataclass
class TokenRegistry:
    tokens: tokenserver.TokenServer
    registry: services.Registry

    @property
    def host(self) -> str:
        return self.registry.host

    def log_count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.registry.log_path.read_text()))


StartRegistry = Callable[..., TokenRegistry]  # start_token_registry(name="reg", **TokenServer kwargs)

ACL = {
    "alice": {"team/a": {"pull", "push"}, "public/base": {"pull"}},
    "bob": {"team/b": {"pull"}, "public/base": {"pull"}},
    tokenserver.ANONYMOUS: {"public/base": {"pull"}},
}


@pytest.fixture
def start_token_registry(request: pytest.FixtureRequest, tmp_path: Path,
                         site: TokenSite) -> Iterator["StartRegistry"]:
    started: list[TokenRegistry] = []

    def start(name: str = "reg", **token_kw: object) -> TokenRegistry:
        ts = tokenserver.TokenServer(tmp_path / f"{name}-tokens", users={"alice": ALICE_PW, "bob": BOB_PW},
                                     acl=ACL, **token_kw)  # type: ignore[arg-type]
        try:
            reg = _start(request.config, "docker-registry (auth: token)", lambda: services.start_registry(
                tmp_path / name, token=ts.auth_config(), storage=site.storage))
        except BaseException:
            ts.stop()
            raise
        started.append(TokenRegistry(ts, reg))
        return started[-1]

    yield start
    for tr in started:
        tr.registry.stop()
        tr.tokens.stop()


def docker_config(tmp_path: Path, auths: Dict[str, tuple[str, str]]) -> CredentialStore:
    path = tmp_path / "docker" / "config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"auths": {h: {"username": u, "password": p} for h, (u, p) in auths.items()}}))
    return CredentialStore.load(path)


def client_for(*hosts: str, credentials: Optional[CredentialStore] = None, **kw: object) -> RegistryClient:
    return RegistryClient({h: RegistryConfig(h, insecure=True) for h in hosts}, credentials,
                          timeout=30.0, **kw)  # type: ignore[arg-type]


def spec(host: str, ref: str) -> ImageSpec:
    return ImageSpec(f"{host}/{ref}", parse_reference(f"{host}/{ref}"))


def pull(client: RegistryClient, cache: Path, host: str, repo: str, built: imagefactory.BuiltImage) -> None:
    """Resolve and fetch ``host/repo:v1`` and check it is exactly what was pushed."""
    resolver = Resolver(BlobCache(cache), client)
    image = resolver.resolve(spec(host, f"{repo}:v1"), LINUX)
    (image,) = resolver.fetch_layers([image], {la.digest for la in image.layers})
    assert image.manifest.digest == built.manifest_digest
    assert [la.diff_id for la in image.layers] == list(built.diff_ids)


def fails(client: RegistryClient, ref: str) -> ResolveError:
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference(ref))
    assert "\n" not in str(err.value)
    return err.value


# ---------------------------------------------------------------------------


def test_token_scopes_are_per_repository(start_token_registry: StartRegistry, site: TokenSite, tmp_path: Path) -> None:
    tr = start_token_registry()
    # Through a front that only records, to see which token went with which request.
    front = httpfront.HttpFront(tr.registry.port)
    try:
        client = client_for(front.host, credentials=docker_config(tmp_path, {front.host: ("alice", ALICE_PW)}))
        pull(client, tmp_path / "cache", front.host, "team/a", site.images["team/a"])
        # alice may not pull team/b: the token the realm gives for it grants nothing, and the
        # team/a token is never replayed for team/b (its own scope was asked for).
        err = fails(client, f"{front.host}/team/b:v1")
    finally:
        front.stop()
    assert err.message == f"credentials for {front.host} (user alice) do not grant pull access to team/b"
    assert "ask the admin" in (err.hint or "")
    for repo in ("team/a", "team/b"):
        sent = [s.authorization for s in front.seen(f"^/v2/{repo}/") if s.authorization]
        assert sent and {tr.tokens.scopes_of(a) for a in sent} == {(f"repository:{repo}:pull",)}
    scopes = [r.scopes for r in tr.tokens.seen()]
    assert ("repository:team/a:pull",) in scopes and ("repository:team/b:pull",) in scopes
    assert all(len(s) == 1 for s in scopes)  # pull only, one repository per token
    assert tr.tokens.users_seen() == {"alice"}


def test_anonymous_token_pulls_public_and_private_needs_login(start_token_registry: StartRegistry, site: TokenSite,
                                                              tmp_path: Path) -> None:
    tr = start_token_registry()
    client = client_for(tr.host, credentials=docker_config(tmp_path, {}))
    pull(client, tmp_path / "cache", tr.host, "public/base", site.images["public/base"])
    assert tr.tokens.users_seen() == {None}  # anonymous tokens, no Authorization sent to the realm
    err = fails(client, f"{tr.host}/team/a:v1")
    assert err.message == f"{tr.host} requires authentication for team/a"
    assert f"docker login {tr.host}" in (err.hint or "")


def test_401_with_wrong_credentials(start_token_registry: StartRegistry, tmp_path: Path) -> None:
    tr = start_token_registry()
    client = client_for(tr.host, credentials=docker_config(tmp_path, {tr.host: ("alice", "not-her-password")}))
    err = fails(client, f"{tr.host}/team/a:v1")
    assert err.message == f"authentication to {tr.host} failed for team/a"
    assert f"docker login {tr.host}" in (err.hint or "") and "not-her-password" not in str(err)
    assert [r.status for r in tr.tokens.seen()] == [401]  # refused once, not retried


def test_404_manifest_unknown_behind_token_auth(start_token_registry: StartRegistry, tmp_path: Path) -> None:
    tr = start_token_registry()
    client = client_for(tr.host, credentials=docker_config(tmp_path, {tr.host: ("alice", ALICE_PW)}))
    err = fails(client, f"{tr.host}/team/a:nope")
    assert err.message == f"image {tr.host}/team/a:nope not found in {tr.host} (manifest unknown)"
    assert "check the repository name and tag" in (err.hint or "")


def test_expiring_token_is_renewed_before_the_request_mid_pack(start_token_registry: StartRegistry, site: TokenSite,
                                                               tmp_path: Path) -> None:
    # expires_in 6 s: the client keeps it 1 s (it renews 5 s early), so a pack that
    # pauses 2 s between manifest and blobs needs a second token.
    tr = start_token_registry(expires_in=6)
    client = client_for(tr.host, credentials=docker_config(tmp_path, {tr.host: ("alice", ALICE_PW)}))
    resolver = Resolver(BlobCache(tmp_path / "cache"), client)
    image = resolver.resolve(spec(tr.host, "team/a:v1"), LINUX)
    assert tr.tokens.issued == 1
    time.sleep(2.0)
    (image,) = resolver.fetch_layers([image], {la.digest for la in image.layers})
    assert [la.diff_id for la in image.layers] == list(site.images["team/a"].diff_ids)
    assert tr.tokens.issued == 2
    # Renewed up front from the remembered realm: only the very first request went
    # out without a token, none with a stale one.
    assert tr.log_count(r'authorization token required.*uri="?/v2/team/') == 1
    assert tr.log_count(r"invalid token") == 0


def test_token_rejected_by_the_registry_mid_pack_is_fetched_again(start_token_registry: StartRegistry, site: TokenSite,
                                                                   tmp_path: Path) -> None:
    # The realm says 300 s, but the first JWT's exp is 57 s in the past: distribution's
    # 60 s leeway lets it pass for about 3 s, then the registry answers invalid_token, as
    # with a token revoked or a token server whose clock runs ahead. Later tokens are good.
    tr = start_token_registry(expires_in=300, jwt_lifetimes=[-57])
    client = client_for(tr.host, credentials=docker_config(tmp_path, {tr.host: ("alice", ALICE_PW)}))
    resolver = Resolver(BlobCache(tmp_path / "cache"), client)
    image = resolver.resolve(spec(tr.host, "team/a:v1"), LINUX)
    assert tr.tokens.issued == 1
    time.sleep(4.0)
    (image,) = resolver.fetch_layers([image], {la.digest for la in image.layers})
    assert [la.diff_id for la in image.layers] == list(site.images["team/a"].diff_ids)
    assert tr.tokens.issued >= 2
    assert tr.log_count(r"invalid token") >= 1


def test_docker_config_credentials_go_only_to_their_registrys_realm(start_token_registry: StartRegistry, site: TokenSite,
                                                                     tmp_path: Path) -> None:
    a = start_token_registry("a")
    b = start_token_registry("b")
    # Credentials for A only: B's realm must never see an Authorization header.
    client = client_for(a.host, b.host, credentials=docker_config(tmp_path, {a.host: ("alice", ALICE_PW)}))
    pull(client, tmp_path / "cache", a.host, "team/a", site.images["team/a"])
    pull(client, tmp_path / "cache2", b.host, "public/base", site.images["public/base"])
    pull(client, tmp_path / "cache3", a.host, "public/base", site.images["public/base"])
    assert a.tokens.users_seen() == {"alice"}
    assert b.tokens.users_seen() == {None}
    assert b.tokens.seen() and all(r.password is None for r in b.tokens.seen())

    # Credentials for both: each realm sees its own account, never the other's.
    (tmp_path / "docker" / "config.json").unlink()
    both = client_for(a.host, b.host, credentials=docker_config(
        tmp_path, {a.host: ("alice", ALICE_PW), b.host: ("bob", BOB_PW)}))
    pull(both, tmp_path / "cache4", b.host, "team/b", site.images["team/b"])
    pull(both, tmp_path / "cache5", a.host, "team/a", site.images["team/a"])
    assert a.tokens.users_seen() == {"alice"}
    assert b.tokens.users_seen() == {None, "bob"}
    assert {r.password for r in b.tokens.seen()} == {None, BOB_PW}


# -- what a gateway in front of the registry answers ------------------------------


Fronted = Tuple[TokenRegistry, httpfront.HttpFront]


@pytest.fixture
def fronted(start_token_registry: StartRegistry) -> Iterator[Fronted]:
    tr = start_token_registry()
    front = httpfront.HttpFront(tr.registry.port)
    yield tr, front
    front.stop()


def test_429_retry_after_is_honoured(fronted: Fronted, site: TokenSite, tmp_path: Path) -> None:
    tr, front = fronted
    front.rules.append(httpfront.Rule(r"/manifests/", 429, {"Retry-After": "2"},
                                      httpfront.registry_error("TOOMANYREQUESTS", "pull rate limit"), times=1))
    client = client_for(front.host, credentials=docker_config(tmp_path, {front.host: ("alice", ALICE_PW)}))
    pull(client, tmp_path / "cache", front.host, "team/a", site.images["team/a"])
    first, second, *_ = front.seen(r"/manifests/v1")
    assert (first.status, second.status) == (429, 401)  # then the token handshake, then 200
    assert second.time - first.time >= 2.0  # waited what the registry asked, not the 0.25 s backoff


def test_429_asking_for_too_long_a_wait_fails_at_once(fronted: Fronted, tmp_path: Path) -> None:
    tr, front = fronted
    front.rules.append(httpfront.Rule(r"/manifests/", 429, {"Retry-After": "3600"},
                                      httpfront.registry_error("TOOMANYREQUESTS", "pull rate limit"), times=5))
    client = client_for(front.host, credentials=docker_config(tmp_path, {}))
    started = time.monotonic()
    err = fails(client, f"{front.host}/team/a:v1")
    assert time.monotonic() - started < 5
    assert err.message == (f"registry {front.host} rate-limits pulls (HTTP 429 for manifest {front.host}/team/a:v1, "
                           "retry after 3600s): pull rate limit")
    assert f"docker login {front.host}" in (err.hint or "")
    assert len(front.seen(r"/manifests/")) == 1


def test_403_denied_names_registry_and_fix(fronted: Fronted, tmp_path: Path) -> None:
    tr, front = fronted
    front.rules.append(httpfront.Rule(r"/team/a/manifests/", 403, {},
                                      httpfront.registry_error("DENIED", "requested access to the resource is denied"),
                                      times=5, authorized_only=True))
    with_creds = client_for(front.host, credentials=docker_config(tmp_path, {front.host: ("alice", ALICE_PW)}),
                            retries=2)
    err = fails(with_creds, f"{front.host}/team/a:v1")
    assert err.message == (f"access to team/a on {front.host} denied (HTTP 403: "
                           "requested access to the resource is denied)")
    assert f"the credentials used for {front.host} lack pull permission on team/a" == err.hint
    assert [s.status for s in front.seen(r"/team/a/manifests/")] == [401, 403]  # the 403 not retried

    anonymous = client_for(front.host)
    err = fails(anonymous, f"{front.host}/team/a:v1")
    assert err.hint == f"run `docker login {front.host}` with an account that may pull it"


# -- the CLI, as a user runs it ---------------------------------------------------


def run_cli(*args: str, home: Path, docker_config_dir: Path) -> subprocess.CompletedProcess[str]:
    env = services.clean_env({"EDGEBUNDLE_HOME": str(home), "HOME": str(home / "user"),
                              "DOCKER_CONFIG": str(docker_config_dir)})
    return subprocess.run([sys.executable, "-m", "edgebundle", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_pack_with_token_auth_and_one_line_errors(start_token_registry: StartRegistry, tmp_path: Path) -> None:
    tr = start_token_registry()
    docker_config(tmp_path, {tr.host: ("alice", ALICE_PW)})
    m = tmp_path / "m.yaml"

    def write_manifest(*repos: str) -> None:
        images = "\n".join(f"  - ref: {tr.host}/{r}:v1" for r in repos)
        m.write_text(f'version: 1\nregistries:\n  "{tr.host}": {{insecure: true}}\nimages:\n{images}\n'
                     "sites:\n  gw: {runtime: containerd, namespace: tok, platform: linux/amd64}\n")

    write_manifest("team/a", "public/base")
    out = tmp_path / "b.ebundle"
    proc = run_cli("pack", str(m), "--site", "gw", "-o", str(out), home=tmp_path / "h",
                   docker_config_dir=tmp_path / "docker")
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and tr.tokens.users_seen() == {"alice"}
    assert ALICE_PW not in proc.stderr + proc.stdout

    write_manifest("team/b")
    for config_dir, expected in ((tmp_path / "docker", "do not grant pull access to team/b"),
                                 (tmp_path / "nowhere", "requires authentication for team/b")):
        proc = run_cli("plan", str(m), "--site", "gw", home=tmp_path / "h", docker_config_dir=config_dir)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 4 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("edgebundle: error: ") and tr.host in lines[0] and expected in lines[0]
        assert "docker login" in lines[0] or "ask the admin" in lines[0]


@pytest.mark.parametrize("expiry", ["honest", "rejected"])
def test_cli_pack_outlives_its_tokens(start_token_registry: StartRegistry, site: TokenSite, tmp_path: Path,
                                      expiry: str) -> None:
    # Each blob comes 2.5 s late through the front, so `edgebundle pack` of team/a
    # (config + 2 layers) takes longer than a token lives: "honest" tokens say
    # expires_in 6 (renewed after 1 s), "rejected": the first says 300 but the registry
    # stops accepting it after about 3 s (exp 57 s past, 60 s leeway). 2.5 s per blob keeps
    # the layers past that even when they are fetched in parallel.
    kw = {"expires_in": 6} if expiry == "honest" else {"expires_in": 300, "jwt_lifetimes": [-57]}
    tr = start_token_registry(**kw)
    front = httpfront.HttpFront(tr.registry.port, slow_re=r"/blobs/", delay=2.5)
    try:
        docker_config(tmp_path, {front.host: ("alice", ALICE_PW)})
        m = tmp_path / "m.yaml"
        m.write_text(f'version: 1\nregistries:\n  "{front.host}": {{insecure: true}}\nimages:\n'
                     f"  - ref: {front.host}/team/a:v1\n"
                     "sites:\n  gw: {runtime: containerd, namespace: tok, platform: linux/amd64}\n")
        out = tmp_path / "b.ebundle"
        proc = run_cli("pack", str(m), "--site", "gw", "-o", str(out), home=tmp_path / "h",
                       docker_config_dir=tmp_path / "docker")
        assert proc.returncode == 0, proc.stderr
        verify = run_cli("verify", str(out), home=tmp_path / "h", docker_config_dir=tmp_path / "docker")
        assert verify.returncode == 0, verify.stderr
        sent = front.seen(r"^/v2/team/a/blobs/")
    finally:
        front.stop()
    assert tr.tokens.issued >= 2 and tr.tokens.users_seen() == {"alice"}
    assert all(s.authorization.startswith("Bearer ") for s in sent)
    if expiry == "honest":
        assert all(s.status == 200 for s in sent)  # renewed before it ran out: never refused
    else:
        assert 401 in {s.status for s in sent} and sent[-1].status == 200
        assert tr.log_count(r"invalid token") >= 1


def test_identity_token_from_docker_config_is_traded_in_by_oauth2(start_token_registry: StartRegistry,
                                                                  site: TokenSite, tmp_path: Path) -> None:
    tr = start_token_registry(refresh_tokens={"rt-alice-5d1e": "alice"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {tr.host: {"identitytoken": "rt-alice-5d1e"}}}))
    client = client_for(tr.host, credentials=CredentialStore.load(path))
    pull(client, tmp_path / "cache", tr.host, "team/a", site.images["team/a"])
    assert {(r.method, r.user, r.status) for r in tr.tokens.seen()} == {("POST", "alice", 200)}

    no_oauth = start_token_registry("no-oauth")  # a realm without the OAuth2 endpoint
    path.write_text(json.dumps({"auths": {no_oauth.host: {"identitytoken": "rt-alice-5d1e"}}}))
    err = fails(client_for(no_oauth.host, credentials=CredentialStore.load(path)), f"{no_oauth.host}/team/a:v1")
    assert err.message == (f"token server {no_oauth.tokens.realm} for {no_oauth.host} does not take identity "
                           "tokens (OAuth2 POST answered HTTP 404)")
    assert f"docker login {no_oauth.host}" in (err.hint or "") and "rt-alice" not in str(err)


def test_credential_helper_answers_for_its_registry_only(start_token_registry: StartRegistry, site: TokenSite,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = start_token_registry("a")
    b = start_token_registry("b")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    asked = tmp_path / "asked.txt"
    helper = bindir / "docker-credential-edgetest"
    helper.write_text(f"""#!/bin/sh
read server
echo "$server" >> {asked}
[ "$server" = "{a.host}" ] && echo '{{"Username":"alice","Secret":"{ALICE_PW}"}}' && exit 0
echo "credentials not found in native keychain"; exit 1
""")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ.get('PATH', '')}")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"credHelpers": {a.host: "edgetest"}}))
    client = client_for(a.host, b.host, credentials=CredentialStore.load(path))
    pull(client, tmp_path / "cache", a.host, "team/a", site.images["team/a"])
    pull(client, tmp_path / "cache2", b.host, "public/base", site.images["public/base"])
    assert asked.read_text().split() == [a.host]  # asked once, only for its registry
    assert a.tokens.users_seen() == {"alice"} and b.tokens.users_seen() == {None}
