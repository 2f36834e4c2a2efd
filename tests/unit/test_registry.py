"""RegistryClient against an in-memory registry behind httpx.MockTransport (no network)."""

from __future__ import annotations

import base64
import datetime
import email.utils
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import httpx
import pytest

from edgebundle.cache import BlobCache
from edgebundle.errors import ResolveError
from edgebundle.oci import MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST, sha256_digest
from edgebundle.specs import RegistryConfig
from edgebundle.reference import parse_reference
from edgebundle.registry import CredentialStore, RegistryClient
from edgebundle.registry.client import MANIFEST_ACCEPT

Handler = Callable[[httpx.Request], Optional[httpx.Response]]


def manifest_bytes(tag: str = "v1") -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": MT_DOCKER_MANIFEST, "tag": tag}).encode()


class FakeRegistry:
    """A tiny distribution API: manifests by tag/digest, blobs, optional auth, injected faults.

    ``hooks`` run first, in order; one returning a response short-circuits the request.
    """

    def __init__(self, auth: Optional[str] = None, users: Optional[Dict[str, str]] = None) -> None:
        self.manifests: Dict[Tuple[str, str], Tuple[bytes, str]] = {}
        self.blobs: Dict[str, bytes] = {}
        self.requests: List[httpx.Request] = []
        self.auth = auth  # None | "basic" | "bearer"
        self.users = users or {}
        self.hooks: List[Handler] = []
        self.tokens_issued = 0

    def add_manifest(self, path: str, tag: str, body: bytes, media_type: str = MT_DOCKER_MANIFEST) -> str:
        digest = sha256_digest(body)
        self.manifests[(path, tag)] = (body, media_type)
        self.manifests[(path, digest)] = (body, media_type)
        return digest

    def add_blob(self, data: bytes) -> str:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        return digest

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def hosts(self) -> List[str]:
        return [r.url.netloc.decode() for r in self.requests]

    def paths(self, prefix: str = "/v2/") -> List[str]:
        return [r.url.path for r in self.requests if r.url.path.startswith(prefix)]

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        for hook in self.hooks:
            resp = hook(request)
            if resp is not None:
                return resp
        if request.url.path == "/token":
            return self._token(request)
        denied = self._check_auth(request)
        if denied is not None:
            return denied
        return self._serve(request)

    def _user_ok(self, header: str) -> bool:
        if not header.startswith("Basic "):
            return False
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return self.users.get(user) == password

    def _token(self, request: httpx.Request) -> httpx.Response:
        header = request.headers.get("authorization", "")
        if header and not self._user_ok(header):
            return httpx.Response(401, json={"errors": [{"code": "UNAUTHORIZED"}]})
        self.tokens_issued += 1
        who = "user" if header else "anon"
        return httpx.Response(200, json={"token": f"tok-{who}-{self.tokens_issued}", "expires_in": 300})

    def _check_auth(self, request: httpx.Request) -> Optional[httpx.Response]:
        header = request.headers.get("authorization", "")
        if self.auth == "basic" and not self._user_ok(header):
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="test"'})
        if self.auth == "bearer":
            repo = request.url.path.split("/")[2:4]
            ok = header.startswith("Bearer tok-user") if self.users else header.startswith("Bearer tok-")
            if not ok:
                challenge = (f'Bearer realm="https://{request.url.host}/token",service="fake registry",'
                             f'scope="repository:{"/".join(repo)}:pull"')
                return httpx.Response(401, headers={"WWW-Authenticate": challenge})
        return None

    def _serve(self, request: httpx.Request) -> httpx.Response:
        parts = request.url.path.split("/")
        # /v2/<repo...>/<kind>/<ident>
        kind, ident, repo = parts[-2], parts[-1], "/".join(parts[2:-2])
        if kind == "manifests" and (repo, ident) in self.manifests:
            body, media_type = self.manifests[(repo, ident)]
            return httpx.Response(200, content=body, headers={"Content-Type": media_type,
                                                              "Docker-Content-Digest": sha256_digest(body)})
        if kind == "blobs" and ident in self.blobs:
            return httpx.Response(200, content=self.blobs[ident])
        code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
        return httpx.Response(404, json={"errors": [{"code": code, "message": "unknown"}]})


def make_client(reg: FakeRegistry, registries: Optional[Dict[str, RegistryConfig]] = None,
                credentials: Optional[CredentialStore] = None, **kw: object) -> Tuple[RegistryClient, List[float]]:
    sleeps: List[float] = []
    client = RegistryClient(registries or {}, credentials, transport=reg.transport(), backoff=0.01,
                            sleep=sleeps.append, **kw)  # type: ignore[arg-type]
    return client, sleeps


def creds(host: str, user: str = "alice", password: str = "s3cret") -> CredentialStore:
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    return CredentialStore({"auths": {host: {"auth": auth}}})


# ---------------------------------------------------------------------------
# endpoints


def test_docker_hub_reference_maps_to_registry_1_over_https() -> None:
    reg = FakeRegistry()
    body = manifest_bytes()
    reg.add_manifest("library/alpine", "3.19", body)
    client, _ = make_client(reg)
    data, media_type, digest = client.get_manifest(parse_reference("alpine:3.19"))
    assert str(reg.requests[0].url) == "https://registry-1.docker.io/v2/library/alpine/manifests/3.19"
    assert (data, media_type, digest) == (body, MT_DOCKER_MANIFEST, sha256_digest(body))


def test_manifest_request_accepts_oci_and_docker_types() -> None:
    reg = FakeRegistry()
    reg.add_manifest("shop/app", "v1", manifest_bytes())
    client, _ = make_client(reg)
    client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    accept = reg.requests[0].headers["accept"]
    assert accept == MANIFEST_ACCEPT
    for media_type in ("application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
                       "application/vnd.docker.distribution.manifest.list.v2+json", MT_DOCKER_MANIFEST):
        assert media_type in accept


def test_insecure_host_uses_plain_http_and_others_https() -> None:
    client = RegistryClient({"local:5000": RegistryConfig("local:5000", insecure=True)},
                            transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    (local,) = client.endpoints("local:5000")
    (other,) = client.endpoints("other.example")
    assert local.url("a/b", "manifests", "v1") == "http://local:5000/v2/a/b/manifests/v1"
    assert other.url("a/b", "blobs", "sha256:x") == "https://other.example/v2/a/b/blobs/sha256:x"


def test_mirror_uses_its_own_insecure_entry() -> None:
    registries = {
        "docker.io": RegistryConfig("docker.io", mirrors=("mirror.local:5000", "secure-mirror.example")),
        "mirror.local:5000": RegistryConfig("mirror.local:5000", insecure=True),
    }
    client = RegistryClient(registries, transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    eps = client.endpoints("docker.io")
    assert [(e.scheme, e.api_host, e.mirror) for e in eps] == [
        ("http", "mirror.local:5000", True),
        ("https", "secure-mirror.example", True),
        ("https", "registry-1.docker.io", False),
    ]


def test_no_silent_fallback_from_https_to_http() -> None:
    reg = FakeRegistry()

    def tls_fails(request: httpx.Request) -> Optional[httpx.Response]:
        if request.url.scheme == "https":
            raise httpx.ConnectError("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)",
                                     request=request)
        return None

    reg.hooks.append(tls_fails)
    reg.add_manifest("shop/app", "v1", manifest_bytes())
    client, sleeps = make_client(reg)
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("reg.test:5000/shop/app:v1"))
    assert err.value.message.startswith("registry reg.test:5000 unreachable: [SSL: WRONG_VERSION_NUMBER]")
    assert "insecure: true" in (err.value.hint or "")
    assert {r.url.scheme for r in reg.requests} == {"https"}
    assert len(reg.requests) == 1 and sleeps == []  # a TLS mismatch is not transient


def test_connection_refused_is_retried_then_reported_with_hint() -> None:
    reg = FakeRegistry()

    def refuse(request: httpx.Request) -> Optional[httpx.Response]:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    reg.hooks.append(refuse)
    client, sleeps = make_client(reg, retries=2)
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert err.value.message == "registry reg.test unreachable: [Errno 111] Connection refused"
    assert "address/port" in (err.value.hint or "")
    assert len(reg.requests) == 3 and len(sleeps) == 2


# ---------------------------------------------------------------------------
# auth


def test_anonymous_pull_sends_no_authorization() -> None:
    reg = FakeRegistry()
    reg.add_manifest("shop/app", "v1", manifest_bytes())
    client, _ = make_client(reg)
    client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert len(reg.requests) == 1
    assert "authorization" not in reg.requests[0].headers


def test_bearer_challenge_fetches_token_with_service_and_scope_then_caches_it() -> None:
    reg = FakeRegistry(auth="bearer")
    reg.add_manifest("shop/app", "v1", manifest_bytes())
    client, _ = make_client(reg)
    client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    first, token_req, retry = reg.requests
    assert "authorization" not in first.headers
    assert token_req.url.path == "/token"
    assert token_req.url.params["service"] == "fake registry"
    assert token_req.url.params["scope"] == "repository:shop/app:pull"
    assert "authorization" not in token_req.headers  # anonymous token
    assert retry.headers["authorization"] == "Bearer tok-anon-1"
    # The token is reused for the same repository: one request, no new token.
    client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert len(reg.requests) == 4 and reg.tokens_issued == 1
    assert reg.requests[3].headers["authorization"] == "Bearer tok-anon-1"


def test_bearer_token_request_carries_basic_credentials() -> None:
    reg = FakeRegistry(auth="bearer", users={"alice": "s3cret"})
    reg.add_manifest("shop/app", "v1", manifest_bytes())
    client, _ = make_client(reg, credentials=creds("reg.test"))
    client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    token_req = reg.requests[1]
    assert token_req.headers["authorization"] == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert reg.requests[2].headers["authorization"] == "Bearer tok-user-1"


def test_basic_challenge_is_answered_with_credentials() -> None:
    reg = FakeRegistry(auth="basic", users={"alice": "s3cret"})
    reg.add_manifest("shop/app", "v1", manifest_bytes())
    client, _ = make_client(reg, credentials=creds("reg.test"))
    client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert [r.headers.get("authorization") for r in reg.requests] == [
        None, "Basic " + base64.b64encode(b"alice:s3cret").decode()]
    client.get_manifest(parse_reference("reg.test/shop/app:v1"))  # basic is now sent up front
    assert len(reg.requests) == 3 and reg.requests[2].headers["authorization"].startswith("Basic ")


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_401_after_presenting_credentials_names_host_and_repo(auth: str) -> None:
    reg = FakeRegistry(auth=auth, users={"alice": "right"})
    reg.add_manifest("shop/app", "v1", manifest_bytes())
    client, sleeps = make_client(reg, credentials=creds("reg.test", password="wrong-pass"))
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert err.value.message == "authentication to reg.test failed for shop/app"
    assert "docker login reg.test" in (err.value.hint or "")
    assert "wrong-pass" not in str(err.value)
    assert sleeps == []  # auth failures are not retried


def test_basic_challenge_without_credentials_says_login_needed() -> None:
    reg = FakeRegistry(auth="basic", users={"alice": "s3cret"})
    client, _ = make_client(reg)
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert err.value.message == "reg.test requires authentication for shop/app"
    assert "docker login reg.test" in (err.value.hint or "")


def test_docker_hub_credentials_come_from_the_index_key() -> None:
    reg = FakeRegistry(auth="basic", users={"hubber": "pw"})
    reg.add_manifest("library/alpine", "latest", manifest_bytes())
    store = CredentialStore({"auths": {"https://index.docker.io/v1/": {"username": "hubber", "password": "pw"}}})
    client, _ = make_client(reg, credentials=store)
    client.get_manifest(parse_reference("alpine"))
    assert reg.hosts() == ["registry-1.docker.io", "registry-1.docker.io"]
    assert reg.requests[-1].headers["authorization"] == "Basic " + base64.b64encode(b"hubber:pw").decode()


def test_403_is_access_denied_not_retried() -> None:
    reg = FakeRegistry()
    reg.hooks.append(lambda r: httpx.Response(403))
    client, sleeps = make_client(reg)
    with pytest.raises(ResolveError, match=r"access to shop/app on reg.test denied"):
        client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert sleeps == [] and len(reg.requests) == 1


# ---------------------------------------------------------------------------
# mirrors


def test_mirrors_tried_in_order_then_upstream() -> None:
    reg = FakeRegistry()
    body = manifest_bytes()
    reg.add_manifest("library/alpine", "3.19", body)

    def broken_mirrors(request: httpx.Request) -> Optional[httpx.Response]:
        if request.url.host == "m1.local":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if request.url.host == "m2.local":
            return httpx.Response(503)
        if request.url.host == "m3.local":
            return httpx.Response(404, json={"errors": [{"code": "MANIFEST_UNKNOWN"}]})
        return None

    reg.hooks.append(broken_mirrors)
    registries = {"docker.io": RegistryConfig("docker.io", mirrors=("m1.local", "m2.local", "m3.local"))}
    client, sleeps = make_client(reg, registries)
    data, _, _ = client.get_manifest(parse_reference("alpine:3.19"))
    assert data == body
    # each mirror once (no retries: the next source is the retry), then upstream
    assert reg.hosts() == ["m1.local", "m2.local", "m3.local", "registry-1.docker.io"]
    assert sleeps == []


def test_working_mirror_spares_upstream(tmp_path: Path) -> None:
    reg = FakeRegistry()
    blob = b"layer bytes"
    digest = reg.add_blob(blob)
    registries = {"reg.test": RegistryConfig("reg.test", mirrors=("mirror.local:5000",)),
                  "mirror.local:5000": RegistryConfig("mirror.local:5000", insecure=True)}
    client, _ = make_client(reg, registries)
    cache = BlobCache(tmp_path)
    client.fetch_blob(parse_reference("reg.test/shop/app:v1"), digest, len(blob), cache)
    assert cache.read_bytes(digest) == blob
    assert [str(r.url) for r in reg.requests] == [f"http://mirror.local:5000/v2/shop/app/blobs/{digest}"]


def test_upstream_error_is_reported_after_mirrors_fail() -> None:
    reg = FakeRegistry()
    registries = {"reg.test": RegistryConfig("reg.test", mirrors=("m1.local",))}
    client, _ = make_client(reg, registries)
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("reg.test/shop/app:v9"))
    assert err.value.message == "image reg.test/shop/app:v9 not found in reg.test (manifest unknown)"
    assert "tag" in (err.value.hint or "")
    assert reg.hosts() == ["m1.local", "reg.test"]


# ---------------------------------------------------------------------------
# manifests


def test_manifest_by_digest_is_verified() -> None:
    reg = FakeRegistry()
    good = manifest_bytes("good")
    digest = sha256_digest(good)
    reg.manifests[("shop/app", digest)] = (manifest_bytes("evil"), MT_DOCKER_MANIFEST)
    client, _ = make_client(reg)
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference(f"reg.test/shop/app@{digest}"))
    assert f"reg.test/shop/app@{digest}" in err.value.message
    assert "not the one asked for" in err.value.message
    assert reg.requests[0].url.path == f"/v2/shop/app/manifests/{digest}"


def test_manifest_by_digest_with_tag_requests_the_digest() -> None:
    reg = FakeRegistry()
    digest = reg.add_manifest("shop/app", "v1", manifest_bytes())
    client, _ = make_client(reg)
    _, _, got = client.get_manifest(parse_reference(f"reg.test/shop/app:v1@{digest}"))
    assert got == digest and reg.requests[0].url.path.endswith(f"/manifests/{digest}")


def test_docker_content_digest_header_must_match_body() -> None:
    reg = FakeRegistry()
    reg.hooks.append(lambda r: httpx.Response(200, content=manifest_bytes(), headers={
        "Content-Type": MT_DOCKER_MANIFEST, "Docker-Content-Digest": sha256_digest(b"something else")}))
    client, _ = make_client(reg)
    with pytest.raises(ResolveError, match="but the registry says"):
        client.get_manifest(parse_reference("reg.test/shop/app:v1"))


def test_schema1_manifest_is_refused() -> None:
    reg = FakeRegistry()
    reg.hooks.append(lambda r: httpx.Response(200, content=b'{"schemaVersion": 1, "fsLayers": []}', headers={
        "Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"}))
    client, _ = make_client(reg)
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("reg.test/old/image:v1"))
    assert "schema 1" in err.value.message and "reg.test/old/image:v1" in err.value.message


def test_media_type_from_body_when_content_type_is_generic() -> None:
    reg = FakeRegistry()
    index = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    oci = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "config": {}, "layers": []}).encode()
    reg.add_manifest("a/index", "v1", index, "application/json")
    reg.add_manifest("a/oci", "v1", oci, "text/plain")
    client, _ = make_client(reg)
    assert client.get_manifest(parse_reference("reg.test/a/index:v1"))[1] == MT_OCI_INDEX
    assert client.get_manifest(parse_reference("reg.test/a/oci:v1"))[1] == MT_OCI_MANIFEST


def test_5xx_is_retried_with_backoff_then_succeeds() -> None:
    reg = FakeRegistry()
    body = manifest_bytes()
    reg.add_manifest("shop/app", "v1", body)
    failures = [502, 503, 500]

    def flaky(request: httpx.Request) -> Optional[httpx.Response]:
        return httpx.Response(failures.pop(0)) if failures else None

    reg.hooks.append(flaky)
    client, sleeps = make_client(reg, retries=3)
    assert client.get_manifest(parse_reference("reg.test/shop/app:v1"))[0] == body
    assert len(reg.requests) == 4 and len(sleeps) == 3
    assert sleeps[0] < sleeps[2]  # exponential: 0.005-0.01, then 0.02-0.04


def test_5xx_forever_gives_up_after_retries() -> None:
    reg = FakeRegistry()
    reg.hooks.append(lambda r: httpx.Response(500, json={"errors": [{"code": "UNKNOWN", "message": "disk full"}]}))
    client, sleeps = make_client(reg, retries=2)
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert err.value.message == "registry reg.test answered HTTP 500 for manifest reg.test/shop/app:v1: disk full"
    assert len(reg.requests) == 3 and len(sleeps) == 2


def test_429_honours_retry_after() -> None:
    reg = FakeRegistry()
    reg.add_manifest("shop/app", "v1", manifest_bytes())
    calls = iter([httpx.Response(429, headers={"Retry-After": "2"})])
    reg.hooks.append(lambda r: next(calls, None))
    client, sleeps = make_client(reg)
    client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert sleeps == [2.0]


def test_429_retry_after_http_date_and_too_long_waits() -> None:
    reg = FakeRegistry()
    reg.add_manifest("shop/app", "v1", manifest_bytes())
    soon = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc)
                                       + datetime.timedelta(seconds=30), usegmt=True)
    calls = iter([httpx.Response(429, headers={"Retry-After": soon})])
    reg.hooks.append(lambda r: next(calls, None))
    client, sleeps = make_client(reg)
    client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert len(sleeps) == 1 and 25 < sleeps[0] <= 30  # the date, not the 10 s backoff cap

    limited = FakeRegistry()
    limited.hooks.append(lambda r: httpx.Response(429, headers={"Retry-After": "3600"}, json={
        "errors": [{"code": "TOOMANYREQUESTS", "message": "pull rate limit"}]}))
    client, sleeps = make_client(limited)
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert err.value.message == ("registry reg.test rate-limits pulls (HTTP 429 for manifest reg.test/shop/app:v1, "
                                 "retry after 3600s): pull rate limit")
    assert "docker login reg.test" in (err.value.hint or "")
    assert sleeps == [] and len(limited.requests) == 1


def test_token_server_503_is_retried_and_then_named() -> None:
    reg = FakeRegistry(auth="bearer")
    reg.add_manifest("shop/app", "v1", manifest_bytes())
    busy = iter([httpx.Response(503, headers={"Retry-After": "3"})])
    reg.hooks.append(lambda r: next(busy, None) if r.url.path == "/token" else None)
    client, sleeps = make_client(reg)
    client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert sleeps == [3.0]

    down = FakeRegistry(auth="bearer")
    down.hooks.append(lambda r: httpx.Response(502) if r.url.path == "/token" else None)
    client, sleeps = make_client(down, retries=2)
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert err.value.message == "token server https://reg.test/token for reg.test answered HTTP 502"
    assert len(sleeps) == 2


def test_403_after_an_anonymous_token_suggests_login() -> None:
    reg = FakeRegistry(auth="bearer")
    reg.hooks.append(lambda r: httpx.Response(403, json={"errors": [{"code": "DENIED", "message": "no"}]})
                     if r.headers.get("authorization", "").startswith("Bearer ") else None)
    client, _ = make_client(reg)
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert err.value.message == "access to shop/app on reg.test denied (HTTP 403: no)"
    assert err.value.hint == "run `docker login reg.test` with an account that may pull it"
    with pytest.raises(ResolveError) as err:  # again, now with the cached anonymous token
        client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert err.value.hint == "run `docker login reg.test` with an account that may pull it"
    assert reg.requests[-1].headers["authorization"] == "Bearer tok-anon-1"


def test_read_timeout_is_retried() -> None:
    reg = FakeRegistry()
    reg.add_manifest("shop/app", "v1", manifest_bytes())
    timeouts = [1]

    def slow(request: httpx.Request) -> Optional[httpx.Response]:
        if timeouts:
            timeouts.pop()
            raise httpx.ReadTimeout("timed out", request=request)
        return None

    reg.hooks.append(slow)
    client, sleeps = make_client(reg)
    client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    assert len(reg.requests) == 2 and len(sleeps) == 1


# ---------------------------------------------------------------------------
# blobs


def test_fetch_blob_streams_into_cache_with_progress(tmp_path: Path) -> None:
    reg = FakeRegistry()
    blob = bytes(range(256)) * 10000
    digest = reg.add_blob(blob)
    client, _ = make_client(reg)
    cache = BlobCache(tmp_path)
    seen: List[int] = []
    client.fetch_blob(parse_reference("reg.test/shop/app:v1"), digest, len(blob), cache, seen.append)
    assert cache.read_bytes(digest) == blob
    assert sum(seen) == len(blob)
    assert reg.requests[0].url.path == f"/v2/shop/app/blobs/{digest}"


def test_fetch_blob_skips_cached_blob(tmp_path: Path) -> None:
    reg = FakeRegistry()
    cache = BlobCache(tmp_path)
    digest = cache.put_bytes(b"already here")
    client, _ = make_client(reg)
    client.fetch_blob(parse_reference("reg.test/shop/app:v1"), digest, 12, cache)
    assert reg.requests == []


def test_fetch_blob_follows_redirect_without_leaking_authorization(tmp_path: Path) -> None:
    reg = FakeRegistry(auth="bearer")
    blob = b"stored in object storage"
    digest = sha256_digest(blob)

    def storage(request: httpx.Request) -> Optional[httpx.Response]:
        if request.url.host == "storage.example":
            return httpx.Response(200, content=blob)
        if "/blobs/" in request.url.path and request.headers.get("authorization"):
            return httpx.Response(307, headers={"Location": f"https://storage.example/b/{digest}?sig=1"})
        return None

    reg.hooks.append(storage)
    client, _ = make_client(reg)
    cache = BlobCache(tmp_path)
    client.fetch_blob(parse_reference("reg.test/shop/app:v1"), digest, len(blob), cache)
    assert cache.read_bytes(digest) == blob
    to_storage = [r for r in reg.requests if r.url.host == "storage.example"]
    assert len(to_storage) == 1 and "authorization" not in to_storage[0].headers


def test_blob_digest_mismatch_is_retried_then_succeeds(tmp_path: Path) -> None:
    reg = FakeRegistry()
    blob = b"the real layer"
    digest = reg.add_blob(blob)
    corrupt = [b"the rea1 layer"]
    reg.hooks.append(lambda r: httpx.Response(200, content=corrupt.pop()) if corrupt else None)
    client, sleeps = make_client(reg)
    cache = BlobCache(tmp_path)
    progress: List[int] = []
    client.fetch_blob(parse_reference("reg.test/shop/app:v1"), digest, len(blob), cache, progress.append)
    assert cache.read_bytes(digest) == blob
    assert len(reg.requests) == 2 and len(sleeps) == 1
    assert sum(progress) == len(blob)  # the failed attempt's bytes were taken back


def test_blob_digest_mismatch_persisting_is_an_error(tmp_path: Path) -> None:
    reg = FakeRegistry()
    digest = sha256_digest(b"expected")
    reg.blobs[digest] = b"tampered"
    client, _ = make_client(reg, digest_retries=2)
    cache = BlobCache(tmp_path)
    with pytest.raises(ResolveError) as err:
        client.fetch_blob(parse_reference("reg.test/shop/app:v1"), digest, 8, cache)
    assert digest in err.value.message and "reg.test" in err.value.message
    assert len(reg.requests) == 3
    assert not cache.has(digest)
    assert list((tmp_path / "tmp").iterdir()) == []  # no partial blob left behind


def test_blob_longer_than_descriptor_is_cut_off(tmp_path: Path) -> None:
    reg = FakeRegistry()
    digest = sha256_digest(b"short")
    reg.blobs[digest] = b"short" + b"x" * (3 * 1024 * 1024)
    client, _ = make_client(reg, digest_retries=0)
    with pytest.raises(ResolveError, match="longer than 5 bytes"):
        client.fetch_blob(parse_reference("reg.test/shop/app:v1"), digest, 5, BlobCache(tmp_path))


def test_blob_404_names_blob_repo_and_host(tmp_path: Path) -> None:
    reg = FakeRegistry()
    digest = sha256_digest(b"gone")
    client, sleeps = make_client(reg)
    with pytest.raises(ResolveError) as err:
        client.fetch_blob(parse_reference("reg.test/shop/app:v1"), digest, 4, BlobCache(tmp_path))
    assert err.value.message == f"blob {digest} not found in shop/app on reg.test"
    assert sleeps == []


def test_connection_reset_mid_blob_is_retried(tmp_path: Path) -> None:
    reg = FakeRegistry()
    blob = b"x" * 1000
    digest = reg.add_blob(blob)

    class Broken(httpx.SyncByteStream):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield b"x" * 10
            raise httpx.ReadError("Connection reset by peer")

    resets = [1]

    def reset(request: httpx.Request) -> Optional[httpx.Response]:
        if resets:
            resets.pop()
            return httpx.Response(200, stream=Broken())
        return None

    reg.hooks.append(reset)
    client, sleeps = make_client(reg)
    cache = BlobCache(tmp_path)
    client.fetch_blob(parse_reference("reg.test/shop/app:v1"), digest, len(blob), cache)
    assert cache.read_bytes(digest) == blob and len(sleeps) == 1


def test_insecure_declared_for_an_https_server_says_so() -> None:
    reg = FakeRegistry()
    reg.hooks.append(lambda r: httpx.Response(400, text="Client sent an HTTP request to an HTTPS server.\n"))
    client, _ = make_client(reg, {"reg.test:5000": RegistryConfig("reg.test:5000", insecure=True)})
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("reg.test:5000/shop/app:v1"))
    assert err.value.message == "registry reg.test:5000 speaks HTTPS, but it is declared insecure (plain HTTP)"
    assert reg.requests[0].url.scheme == "http"


def test_certificate_error_hint_is_about_trust_not_insecure() -> None:
    reg = FakeRegistry()

    def untrusted(request: httpx.Request) -> Optional[httpx.Response]:
        raise httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed "
                                 "certificate (_ssl.c:1006)", request=request)

    reg.hooks.append(untrusted)
    client, _ = make_client(reg)
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference("reg.test/shop/app:v1"))
    # Named as Docker names it, pointing at the certs.d directory to put the CA in.
    assert err.value.message == "registry reg.test: x509: certificate signed by unknown authority"
    assert "/etc/docker/certs.d/reg.test/ca.crt" in (err.value.hint or "")
    assert "insecure" not in (err.value.hint or "")


@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_streamed_blob_raw_or_content_encoded(tmp_path: Path, encoding: Optional[str]) -> None:
    """A streamed blob is stored as sent (the raw body, no re-chunking); one a proxy
    content-encodes is decoded first, as the registry's bytes are what the digest names."""
    import gzip as gz
    blob = bytes(range(256)) * 20_000  # 5 MB: several pieces
    digest = sha256_digest(blob)
    body = gz.compress(blob) if encoding else blob

    def handler(request: httpx.Request) -> httpx.Response:
        pieces = (body[i:i + 65536] for i in range(0, len(body), 65536))
        headers = {"content-encoding": encoding} if encoding else {}
        return httpx.Response(200, headers=headers, content=pieces)

    client = RegistryClient(transport=httpx.MockTransport(handler), retries=0, sleep=lambda s: None)
    cache = BlobCache(tmp_path)
    client.fetch_blob(parse_reference("reg.test/shop/app:v1"), digest, len(blob), cache)
    assert cache.read_bytes(digest) == blob
