"""Credentials from docker config.json / credential helpers, and the token handshake."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import List, Optional

import httpx
import pytest

from edgebundle.errors import ResolveError
from edgebundle.registry.auth import Authenticator, Challenge, Credential, CredentialStore, \
    docker_config_path, normalize_host, parse_www_authenticate, server_url


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ---------------------------------------------------------------------------
# WWW-Authenticate


def test_parse_bearer_challenge_with_commas_inside_quotes() -> None:
    header = ('Bearer realm="https://auth.example.com/token",service="registry.example.com",'
              'scope="repository:shop/app:pull,push"')
    assert parse_www_authenticate(header) == [Challenge("bearer", {
        "realm": "https://auth.example.com/token", "service": "registry.example.com",
        "scope": "repository:shop/app:pull,push"})]


def test_parse_unquoted_values_spaces_and_escapes() -> None:
    header = 'bearer  realm = https://a/token , service="a \\"b\\" c", error="insufficient_scope"'
    (ch,) = parse_www_authenticate(header)
    assert ch.scheme == "bearer"
    assert ch.params == {"realm": "https://a/token", "service": 'a "b" c', "error": "insufficient_scope"}


def test_parse_several_challenges_in_one_header() -> None:
    header = 'Basic realm="Registry, with comma", Bearer realm="https://t/token",service=reg'
    assert parse_www_authenticate(header) == [
        Challenge("basic", {"realm": "Registry, with comma"}),
        Challenge("bearer", {"realm": "https://t/token", "service": "reg"}),
    ]


def test_parse_empty_and_garbage() -> None:
    assert parse_www_authenticate("") == []
    assert parse_www_authenticate('"oops"') == []
    assert parse_www_authenticate("Negotiate") == [Challenge("negotiate", {})]


# ---------------------------------------------------------------------------
# config.json


def test_docker_config_path_reads_docker_config_env(tmp_path: Path) -> None:
    assert docker_config_path({"DOCKER_CONFIG": str(tmp_path)}) == tmp_path / "config.json"
    assert docker_config_path({}) == Path.home() / ".docker" / "config.json"


def test_hub_key_normalisation() -> None:
    assert server_url("docker.io") == "https://index.docker.io/v1/"
    assert server_url("registry-1.docker.io") == "https://index.docker.io/v1/"
    assert server_url("reg.example:5000") == "reg.example:5000"
    assert normalize_host("https://index.docker.io/v1/") == "docker.io"
    assert normalize_host("http://Reg.Example:5000/v2/") == "reg.example:5000"


def test_auths_base64_auth(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {"reg.example:5000": {"auth": b64("alice:pa:ss")}}}))
    store = CredentialStore.load(path)
    assert store.get("reg.example:5000") == Credential("alice", "pa:ss")
    assert store.get("other.example") is None


def test_auths_username_password_identitytoken_and_url_keys() -> None:
    store = CredentialStore({"auths": {
        "https://reg.example": {"username": "bob", "password": "pw"},
        "https://index.docker.io/v1/": {"identitytoken": "refresh-me"},
    }})
    assert store.get("reg.example") == Credential("bob", "pw")
    assert store.get("docker.io") == Credential(identity_token="refresh-me")
    assert store.get("registry-1.docker.io") == Credential(identity_token="refresh-me")


def test_missing_config_is_anonymous_and_bad_json_names_the_path(tmp_path: Path) -> None:
    assert CredentialStore.load(tmp_path / "nope.json").get("reg.example") is None
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ResolveError) as err:
        CredentialStore.load(bad)
    assert str(bad) in err.value.message


def test_invalid_base64_auth_is_an_error_without_the_secret() -> None:
    store = CredentialStore({"auths": {"reg.example": {"auth": "!!secret!!"}}}, path="/x/config.json")
    with pytest.raises(ResolveError) as err:
        store.get("reg.example")
    assert "reg.example" in err.value.message and "/x/config.json" in err.value.message
    assert "secret" not in str(err.value)


def test_credential_repr_hides_secrets() -> None:
    text = repr(Credential("alice", "hunter2", "tok123"))
    assert "alice" in text and "hunter2" not in text and "tok123" not in text


# ---------------------------------------------------------------------------
# credential helpers (a fake docker-credential-test on PATH)


def install_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str = "test") -> Path:
    """docker-credential-<name>: logs the server it was asked for; knows two servers."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / f"{name}-asked.txt"
    script = bindir / f"docker-credential-{name}"
    script.write_text(f"""#!/bin/sh
[ "$1" = get ] || exit 2
read server
echo "$server" >> {log}
case "$server" in
  reg.example) echo '{{"ServerURL":"reg.example","Username":"helper-user","Secret":"helper-secret"}}' ;;
  https://index.docker.io/v1/) echo '{{"Username":"<token>","Secret":"hub-refresh-token"}}' ;;
  broken.example) echo "keychain locked" >&2; exit 1 ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return log


def test_cred_helpers_per_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = install_helper(tmp_path, monkeypatch)
    store = CredentialStore({"credHelpers": {"reg.example": "test"},
                             "auths": {"other.example": {"auth": b64("o:p")}}})
    assert store.get("reg.example") == Credential("helper-user", "helper-secret")
    assert store.get("other.example") == Credential("o", "p")  # no helper for it
    assert store.get("reg.example") == Credential("helper-user", "helper-secret")
    assert log.read_text().splitlines() == ["reg.example"]  # asked once, memoised


def test_creds_store_default_with_hub_server_url_and_token_marker(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    log = install_helper(tmp_path, monkeypatch)
    store = CredentialStore({"credsStore": "test"})
    assert store.get("docker.io") == Credential(identity_token="hub-refresh-token")
    assert store.get("unknown.example") is None  # "not found" is anonymous, not an error
    assert log.read_text().splitlines() == ["https://index.docker.io/v1/", "unknown.example"]


def test_creds_store_miss_falls_back_to_auths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_helper(tmp_path, monkeypatch)
    store = CredentialStore({"credsStore": "test", "auths": {"plain.example": {"auth": b64("u:p")}}})
    assert store.get("plain.example") == Credential("u", "p")


def test_helper_failure_and_missing_helper_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_helper(tmp_path, monkeypatch)
    with pytest.raises(ResolveError) as err:
        CredentialStore({"credsStore": "test"}).get("broken.example")
    assert err.value.message == "credential helper docker-credential-test failed for broken.example: keychain locked"
    with pytest.raises(ResolveError) as err:
        CredentialStore({"credHelpers": {"reg.example": "nosuchhelper"}}).get("reg.example")
    assert "docker-credential-nosuchhelper" in err.value.message and "not found on PATH" in err.value.message


# ---------------------------------------------------------------------------
# the handshake (Authenticator alone)


class TokenServer:
    def __init__(self, body: Optional[dict] = None, status: int = 200) -> None:
        self.requests: List[httpx.Request] = []
        self.body = body if body is not None else {"access_token": "AT", "expires_in": 120}
        self.status = status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, json=self.body)


def challenge_401(scope: str = "repository:shop/app:pull") -> httpx.Response:
    return httpx.Response(401, headers={
        "WWW-Authenticate": f'Bearer realm="https://auth.example/token",service="reg",scope="{scope}"'})


def test_access_token_field_and_expiry() -> None:
    server = TokenServer()
    now = [1000.0]
    auth = Authenticator(None, httpx.Client(transport=httpx.MockTransport(server)), clock=lambda: now[0])
    value, presented = auth.answer("reg.example", "reg.example", "shop/app", challenge_401())
    assert (value, presented) == ("Bearer AT", False)
    assert auth.cached("reg.example", "shop/app") == "Bearer AT"
    assert auth.cached("reg.example", "shop/other") is None  # per scope
    now[0] += 200  # past expires_in
    assert auth.cached("reg.example", "shop/app") is None


def test_identity_token_uses_oauth_refresh_grant() -> None:
    server = TokenServer({"access_token": "from-refresh"})
    store = CredentialStore({"auths": {"reg.example": {"identitytoken": "RT"}}})
    auth = Authenticator(store, httpx.Client(transport=httpx.MockTransport(server)))
    value, presented = auth.answer("reg.example", "reg.example", "shop/app", challenge_401())
    assert (value, presented) == ("Bearer from-refresh", True)
    (req,) = server.requests
    form = dict(x.split("=", 1) for x in req.content.decode().split("&"))
    assert req.method == "POST"
    assert form["grant_type"] == "refresh_token" and form["refresh_token"] == "RT"
    assert form["scope"] == "repository%3Ashop%2Fapp%3Apull" and form["service"] == "reg"


def test_token_server_refusing_credentials_is_auth_failure() -> None:
    server = TokenServer({"details": "bad"}, status=401)
    store = CredentialStore({"auths": {"reg.example": {"auth": b64("alice:topsecret")}}})
    auth = Authenticator(store, httpx.Client(transport=httpx.MockTransport(server)))
    with pytest.raises(ResolveError) as err:
        auth.answer("reg.example", "reg.example", "shop/app", challenge_401())
    assert err.value.message == "authentication to reg.example failed for shop/app"
    assert "topsecret" not in str(err.value)


def test_token_response_without_token_is_an_error() -> None:
    auth = Authenticator(None, httpx.Client(transport=httpx.MockTransport(TokenServer({"foo": "bar"}))))
    with pytest.raises(ResolveError, match="returned no token"):
        auth.answer("reg.example", "reg.example", "shop/app", challenge_401())


def test_expired_token_is_renewed_up_front_from_the_remembered_realm() -> None:
    server = TokenServer({"token": "T", "expires_in": 60})
    now = [1000.0]
    auth = Authenticator(None, httpx.Client(transport=httpx.MockTransport(server)), clock=lambda: now[0])
    assert auth.authorization("reg.example", "reg.example", "shop/app") is None  # no challenge seen yet
    auth.answer("reg.example", "reg.example", "shop/app", challenge_401())
    assert auth.authorization("reg.example", "reg.example", "shop/app") == "Bearer T"
    assert len(server.requests) == 1  # cached
    now[0] += 56  # past expires_in minus the renewal margin
    assert auth.authorization("reg.example", "reg.example", "shop/app") == "Bearer T"
    assert len(server.requests) == 2
    # Another repository gets its own scope from the same realm, without a 401 first.
    assert auth.authorization("reg.example", "reg.example", "shop/other") == "Bearer T"
    assert [r.url.params.get_list("scope") for r in server.requests] == [
        ["repository:shop/app:pull"], ["repository:shop/app:pull"], ["repository:shop/other:pull"]]
    assert auth.authorization("other.example", "other.example", "shop/app") is None  # realm is per host


def refused_401(error: str) -> httpx.Response:
    return httpx.Response(401, headers={"WWW-Authenticate": (
        f'Bearer realm="https://auth.example/token",service="reg",scope="repository:shop/b:pull",error="{error}"')})


def test_insufficient_scope_with_credentials_says_they_lack_access() -> None:
    store = CredentialStore({"auths": {"reg.example": {"auth": b64("alice:pw")}}})
    auth = Authenticator(store, httpx.Client(transport=httpx.MockTransport(TokenServer())))
    err = auth.refused("reg.example", "shop/b", refused_401("insufficient_scope"), presented=True)
    assert err.message == "credentials for reg.example (user alice) do not grant pull access to shop/b"
    assert "ask the admin of reg.example" in (err.hint or "")
    anon = auth.refused("reg.example", "shop/b", refused_401("insufficient_scope"), presented=False)
    assert anon.message == "reg.example requires authentication for shop/b"


def test_invalid_token_names_the_registry_token_server_trust() -> None:
    auth = Authenticator(None, httpx.Client(transport=httpx.MockTransport(TokenServer())))
    err = auth.refused("reg.example", "shop/b", refused_401("invalid_token"), presented=False)
    assert err.message == "reg.example rejected the token its token server issued for shop/b (invalid_token)"
    assert "signing certificate" in (err.hint or "")
    basic = auth.refused("reg.example", "shop/b", httpx.Response(401, headers={"WWW-Authenticate": "Basic"}),
                         presented=True)
    assert basic.message == "authentication to reg.example failed for shop/b"


def test_realm_query_is_kept_and_credentials_do_not_follow_a_redirect_elsewhere() -> None:
    seen: List[httpx.Request] = []

    def realm(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "auth.example":
            return httpx.Response(302, headers={"Location": "https://elsewhere.example/token"})
        return httpx.Response(200, json={"token": "T"})

    store = CredentialStore({"auths": {"reg.example": {"auth": b64("alice:pw")}}})
    auth = Authenticator(store, httpx.Client(transport=httpx.MockTransport(realm), follow_redirects=True))
    challenge = httpx.Response(401, headers={
        "WWW-Authenticate": 'Bearer realm="https://auth.example/token?account=edge",service="reg"'})
    assert auth.answer("reg.example", "reg.example", "shop/app", challenge) == ("Bearer T", True)
    first, second = seen
    assert first.url.params.get("account") == "edge" and first.url.params.get("scope") == "repository:shop/app:pull"
    assert first.headers["authorization"] == "Basic " + b64("alice:pw")
    assert second.url.host == "elsewhere.example" and "authorization" not in second.headers
