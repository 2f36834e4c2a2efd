"""Registry credentials and the distribution token-auth handshake.

Credentials come from Docker's ``config.json`` exactly as ``docker pull`` finds them:

* ``credHelpers[host]``: run ``docker-credential-<name> get`` for that host;
* else ``credsStore``: the default helper for every host;
* else ``auths[host]``: base64 ``auth`` ("user:pass"), or ``username``/``password``,
  and/or ``identitytoken`` (an OAuth2 refresh token).

Docker Hub is stored under ``https://index.docker.io/v1/``, every other registry under
its ``host[:port]`` (possibly written as a URL); lookups normalise both sides.

Token auth follows the distribution token spec: a ``401`` carries
``WWW-Authenticate: Bearer realm=..,service=..,scope=..``; we GET a token from the
realm (with basic credentials when we have them, or POST an OAuth2 refresh token when we
have an identity token) and cache it per ``(host, scope)`` until it expires. A ``Basic``
challenge is answered with basic credentials.

Secrets never reach a log line, an error message or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import httpx

from ..errors import ResolveError

log = logging.getLogger(__name__)

DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
DOCKER_HUB = "docker.io"
# Every name Docker Hub's registry goes by; credentials are shared between them.
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})

# Tokens without ``expires_in`` live 60 s (token spec); renew a little early so a token
# never expires between our check and the registry's.
_DEFAULT_TOKEN_TTL = 60.0
_TOKEN_MARGIN = 5.0
_HELPER_TIMEOUT = 60.0


@dataclass(frozen=True)
class Credential:
    """What config.json or a credential helper holds for one registry host."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    @property
    def has_basic(self) -> bool:
        return bool(self.username) and bool(self.password)


def docker_config_path(environ: Optional[Mapping[str, str]] = None) -> Path:
    """Where Docker keeps ``config.json``: ``$DOCKER_CONFIG/config.json`` or ``~/.docker``.

    The only place this package reads ``DOCKER_CONFIG``; the CLI calls it and passes
    the result to ``CredentialStore.load`` so library code stays environment-free.
    """
    env = os.environ if environ is None else environ
    directory = env.get("DOCKER_CONFIG")
    return (Path(directory) if directory else Path.home() / ".docker") / "config.json"


def normalize_host(server: str) -> str:
    """``host[:port]`` of a config.json key or registry name; Hub aliases become docker.io.

    Keys are written as ``host``, ``https://host`` or ``https://host/v1/``.
    """
    text = server.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0].lower()
    return DOCKER_HUB if text in _HUB_ALIASES else text


def server_url(host: str) -> str:
    """The key ``docker login`` stores (and credential helpers are asked for) for ``host``."""
    host = normalize_host(host)
    return DOCKER_HUB_AUTH_KEY if host == DOCKER_HUB else host


HelperRunner = Callable[[str, str], Optional[Credential]]


def run_credential_helper(helper: str, server: str) -> Optional[Credential]:
    """Ask ``docker-credential-<helper> get`` for ``server``; None if it has nothing.

    Raises:
        ResolveError: the helper is missing or fails for another reason than "not found".
    """
    program = f"docker-credential-{helper}"
    try:
        proc = subprocess.run([program, "get"], input=server.encode(), capture_output=True,
                              timeout=_HELPER_TIMEOUT, check=False)
    except FileNotFoundError:
        raise ResolveError(f"credential helper {program} for {server} not found on PATH",
                           f"install {program}, or remove it from credsStore/credHelpers in config.json") from None
    except subprocess.TimeoutExpired:
        raise ResolveError(f"credential helper {program} for {server} did not answer in {_HELPER_TIMEOUT:.0f}s",
                           "unlock the keychain it uses, or remove it from config.json") from None
    if proc.returncode != 0:
        # Helpers print "credentials not found in native keychain" on stdout: no secret there.
        reason = (proc.stdout or proc.stderr).decode(errors="replace").strip().splitlines()
        first = reason[0] if reason else f"exit status {proc.returncode}"
        if "not found" in first.lower():
            return None
        raise ResolveError(f"credential helper {program} failed for {server}: {first}",
                           f"run `docker login {normalize_host(server)}` again or fix the helper")
    try:
        obj = json.loads(proc.stdout)
        username, secret = str(obj.get("Username") or ""), str(obj.get("Secret") or "")
    except (ValueError, AttributeError):
        raise ResolveError(f"credential helper {program} returned unreadable output for {server}",
                           "check the helper works: echo HOST | " + program + " get") from None
    if not secret:
        return None
    # "<token>" is the helpers' marker for an identity (refresh) token instead of a password.
    if username == "<token>":
        return Credential(identity_token=secret)
    return Credential(username=username, password=secret)


class CredentialStore:
    """Credentials per registry host, read from a Docker ``config.json``.

    Helpers run lazily (only for a registry that challenges us) and once per host.
    """

    def __init__(self, config: Optional[Mapping[str, object]] = None, *, path: str = "",
                 helper_runner: HelperRunner = run_credential_helper) -> None:
        """Args:
            config: the parsed config.json (``{}`` for anonymous access only).
            path: where it was read from; named in error hints.
            helper_runner: runs a credential helper (injectable for tests).
        """
        self._config: Mapping[str, object] = config or {}
        self.path = path or "~/.docker/config.json"
        self._run_helper = helper_runner
        self._memo: Dict[str, Optional[Credential]] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: "Optional[os.PathLike[str] | str]" = None, *,
             helper_runner: HelperRunner = run_credential_helper) -> "CredentialStore":
        """Read ``path`` (default ``~/.docker/config.json``); a missing file means no credentials.

        Raises:
            ResolveError: the file exists but is not valid JSON.
        """
        p = Path(path) if path is not None else Path.home() / ".docker" / "config.json"
        try:
            text = p.read_text()
        except FileNotFoundError:
            return cls({}, path=str(p), helper_runner=helper_runner)
        except OSError as exc:
            raise ResolveError(f"docker config {p} unreadable: {exc.strerror}",
                               "fix its permissions, or point DOCKER_CONFIG at another directory") from None
        try:
            obj = json.loads(text) if text.strip() else {}
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise ResolveError(f"docker config {p} is not valid JSON: {exc}",
                               "fix the file, or run `docker login` to rewrite it") from None
        return cls(obj, path=str(p), helper_runner=helper_runner)

    def get(self, host: str) -> Optional[Credential]:
        """Credentials for registry ``host`` (``host[:port]``), or None for anonymous."""
        key = normalize_host(host)
        with self._lock:
            if key not in self._memo:
                self._memo[key] = self._lookup(key)
            return self._memo[key]

    def _lookup(self, host: str) -> Optional[Credential]:
        helper = self._helper_for(host)
        if helper:
            cred = self._run_helper(helper, server_url(host))
            if cred is not None:
                log.debug("credentials for %s from docker-credential-%s", host, helper)
                return cred
        cred = self._from_auths(host)
        if cred is not None:
            log.debug("credentials for %s from %s", host, self.path)
        return cred

    def _helper_for(self, host: str) -> Optional[str]:
        helpers = self._config.get("credHelpers")
        if isinstance(helpers, dict):
            for key, name in helpers.items():
                if normalize_host(str(key)) == host and name:
                    return str(name)
        store = self._config.get("credsStore")
        return str(store) if store else None

    def _from_auths(self, host: str) -> Optional[Credential]:
        auths = self._config.get("auths")
        if not isinstance(auths, dict):
            return None
        # An exact key wins over another spelling of the same host.
        entry = auths.get(server_url(host))
        if entry is None:
            entry = next((v for k, v in auths.items() if normalize_host(str(k)) == host), None)
        if not isinstance(entry, dict):
            return None
        return self._parse_entry(host, entry)

    def _parse_entry(self, host: str, entry: Mapping[str, object]) -> Optional[Credential]:
        username = str(entry.get("username") or "")
        password = str(entry.get("password") or "")
        token = str(entry.get("identitytoken") or "")
        encoded = entry.get("auth")
        if encoded:
            try:
                decoded = base64.b64decode(str(encoded), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise ResolveError(f"credentials for {host} in {self.path} are not valid base64",
                                   f"run `docker login {host}` again") from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise ResolveError(f"credentials for {host} in {self.path} are not user:password",
                                   f"run `docker login {host}` again")
        if not (username and password) and not token:
            return None
        return Credential(username=username, password=password, identity_token=token)


# ---------------------------------------------------------------------------
# WWW-Authenticate


@dataclass(frozen=True)
class Challenge:
    """One challenge of a ``WWW-Authenticate`` header; scheme lower-cased."""

    scheme: str
    params: Dict[str, str]


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SCHEME_RE = re.compile(rf"[\s,]*({_TOKEN})")
_PARAM_RE = re.compile(rf"\s*({_TOKEN})\s*=\s*(\"(?:[^\"\\]|\\.)*\"|[^,\s]*)")
_QUOTED_PAIR_RE = re.compile(r"\\(.)")
_COMMA_RE = re.compile(r"\s*,")


def parse_www_authenticate(value: str) -> List[Challenge]:
    """Parse ``WWW-Authenticate`` (RFC 7235): quoted values may hold commas and escapes.

    ``Bearer realm="https://a/token",service="reg",scope="repository:x:pull,push"``
    yields one challenge with three params; several challenges may share one header.
    """
    out: List[Challenge] = []
    pos = 0
    while pos < len(value):
        m = _SCHEME_RE.match(value, pos)
        if not m:
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: Dict[str, str] = {}
        while True:
            p = _PARAM_RE.match(value, pos)
            if not p:
                break
            raw = p.group(2)
            if raw.startswith('"'):
                raw = _QUOTED_PAIR_RE.sub(r"\1", raw[1:-1])
            params[p.group(1).lower()] = raw
            pos = p.end()
            # After a comma comes either another param (token "=") or the next challenge,
            # which the outer loop picks up (its scheme is not followed by "=").
            comma = _COMMA_RE.match(value, pos)
            if not comma or not _PARAM_RE.match(value, comma.end()):
                break
            pos = comma.end()
        out.append(Challenge(scheme, params))
    return out


# ---------------------------------------------------------------------------
# The handshake


class AuthFailed(ResolveError):
    """Credentials (or the lack of them) were refused; never retried."""


class TokenServerBusy(ResolveError):
    """The realm answered 429 or 5xx: worth another attempt, after ``retry_after`` if it says."""

    def __init__(self, message: str, hint: Optional[str] = None, retry_after: Optional[float] = None) -> None:
        super().__init__(message, hint)
        self.retry_after = retry_after


def pull_scope(repo_path: str) -> str:
    return f"repository:{repo_path}:pull"


class Authenticator:
    """Answers registry challenges and remembers the result per ``(host, scope)``.

    ``host`` is the endpoint that challenged us (``registry-1.docker.io``, a mirror);
    credentials are looked up under its registry name (``docker.io``).
    """

    def __init__(self, credentials: Optional[CredentialStore], http: httpx.Client, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._credentials = credentials
        self._http = http
        self._clock = clock
        self._tokens: Dict[Tuple[str, str], Tuple[str, float]] = {}
        self._basic: Dict[str, str] = {}  # host -> "Basic ..." once the host asked for it
        # host -> its Bearer challenge (realm, service): lets a token for another repository,
        # or one that expired mid-pack, be fetched before the request instead of after a 401.
        self._realms: Dict[str, Challenge] = {}
        # (host, scope) -> held while one thread renews that token: parallel downloads
        # (``--jobs``) finding it expired together make one token request, not one each.
        self._renewing: Dict[Tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    @property
    def config_path(self) -> str:
        return self._credentials.path if self._credentials else "~/.docker/config.json"

    def cached(self, host: str, repo_path: str) -> Optional[str]:
        """An ``Authorization`` value to send up front, if an earlier challenge earned one."""
        with self._lock:
            hit = self._tokens.get((host, pull_scope(repo_path)))
            if hit and hit[1] > self._clock():
                return hit[0]
            return self._basic.get(host)

    def authorization(self, host: str, cred_host: str, repo_path: str) -> Optional[str]:
        """The ``Authorization`` value to send up front to ``host`` for ``repo_path``.

        A cached token while it lives; once it expired (or for a repository not asked
        for yet) a fresh one from the realm ``host`` challenged us with before, as docker
        does; else Basic credentials the host asked for; else None (anonymous first try).

        Raises:
            AuthFailed, ResolveError: as ``answer`` when a fresh token is fetched.
        """
        cached = self.cached(host, repo_path)
        if cached is not None and not cached.startswith("Basic "):
            return cached
        with self._lock:
            known = self._realms.get(host)
            flight = self._renewing.setdefault((host, pull_scope(repo_path)), threading.Lock())
        if known is None:
            return cached
        with flight:
            renewed = self.cached(host, repo_path)  # by the thread that held the lock before us
            if renewed is not None and not renewed.startswith("Basic "):
                return renewed
            # The remembered challenge's scope was for another request: ask for this repository.
            ch = Challenge(known.scheme, {k: v for k, v in known.params.items() if k not in ("scope", "error")})
            value, _ = self._bearer(host, cred_host, repo_path, ch, self.credential(cred_host))
            return value

    def forget(self, host: str, repo_path: str) -> None:
        """Drop what ``cached`` returned: the registry refused it (revoked, expired early)."""
        with self._lock:
            self._tokens.pop((host, pull_scope(repo_path)), None)
            self._basic.pop(host, None)

    def credential(self, cred_host: str) -> Optional[Credential]:
        return self._credentials.get(cred_host) if self._credentials else None

    def answer(self, host: str, cred_host: str, repo_path: str,
               response: httpx.Response) -> Tuple[str, bool]:
        """Answer the 401 ``response`` from ``host``.

        Returns:
            ``(authorization header value, whether credentials were presented)``.

        Raises:
            AuthFailed: no usable challenge, no credentials for a Basic challenge, or the
                token server refused us.
            ResolveError: the token server is unreachable or answers nonsense.
        """
        challenges = parse_www_authenticate(response.headers.get("www-authenticate", ""))
        cred = self.credential(cred_host)
        for ch in challenges:
            if ch.scheme == "bearer" and ch.params.get("realm"):
                with self._lock:
                    self._realms[host] = ch
                return self._bearer(host, cred_host, repo_path, ch, cred)
        for ch in challenges:
            if ch.scheme == "basic":
                if cred is None or not cred.has_basic:
                    raise self.denied(cred_host, repo_path, presented=False)
                value = _basic_header(cred)
                with self._lock:
                    self._basic[host] = value
                return value, True
        raise AuthFailed(f"{cred_host} asked for authentication for {repo_path} with an unsupported scheme "
                         f"({response.headers.get('www-authenticate', 'no WWW-Authenticate header')!r})",
                         "edgebundle speaks Bearer (token) and Basic auth; check the registry's auth setup")

    def refused(self, cred_host: str, repo_path: str, response: httpx.Response, *, presented: bool) -> AuthFailed:
        """The error for a 401 that came back although we sent what the realm gave us.

        distribution says why in the challenge's ``error``: ``insufficient_scope`` (the
        token grants no pull on this repository: credentials accepted but not allowed,
        or anonymous, or no such repository) or ``invalid_token`` (expired, or signed by
        a key the registry does not trust).
        """
        error = ""
        for ch in parse_www_authenticate(response.headers.get("www-authenticate", "")):
            if ch.scheme == "bearer":
                error = ch.params.get("error", "")
        if error == "insufficient_scope" and presented:
            cred = self.credential(cred_host)
            who = f" (user {cred.username})" if cred is not None and cred.username else ""
            return AuthFailed(f"credentials for {cred_host}{who} do not grant pull access to {repo_path}",
                              f"ask the admin of {cred_host} for pull access to {repo_path}, or check the "
                              "repository name (one that does not exist answers the same)")
        if error == "invalid_token":
            return AuthFailed(f"{cred_host} rejected the token its token server issued for {repo_path} "
                              "(invalid_token)", f"the registry {cred_host} does not trust its token server's "
                              "signing certificate, or their clocks disagree; check its auth: token settings")
        return self.denied(cred_host, repo_path, presented=presented)

    def denied(self, cred_host: str, repo_path: str, *, presented: bool) -> AuthFailed:
        """The error for a registry that still says 401 after we did what it asked."""
        if presented:
            return AuthFailed(f"authentication to {cred_host} failed for {repo_path}",
                              f"run `docker login {cred_host}` or fix the credentials for {cred_host} "
                              f"in {self.config_path}")
        return AuthFailed(f"{cred_host} requires authentication for {repo_path}",
                          f"run `docker login {cred_host}` (edgebundle reads {self.config_path}); "
                          "a private or misspelt repository answers like this too")

    def _bearer(self, host: str, cred_host: str, repo_path: str, ch: Challenge,
                cred: Optional[Credential]) -> Tuple[str, bool]:
        scope_key = pull_scope(repo_path)
        # The challenge's scope is what this request needs; fall back to pull on the repo.
        scopes = (ch.params.get("scope") or scope_key).split(" ")
        token, ttl = self._fetch_token(ch.params["realm"], ch.params.get("service", ""), scopes,
                                       cred, cred_host, repo_path)
        value = f"Bearer {token}"
        with self._lock:
            self._tokens[(host, scope_key)] = (value, self._clock() + max(ttl - _TOKEN_MARGIN, 1.0))
        return value, cred is not None

    def _fetch_token(self, realm: str, service: str, scopes: List[str], cred: Optional[Credential],
                     cred_host: str, repo_path: str) -> Tuple[str, float]:
        try:
            resp = self._token_request(realm, service, scopes, cred)
        except httpx.HTTPError as exc:
            raise ResolveError(f"token server {realm} for {cred_host} unreachable: {exc}",
                               "check network access to the token server named by the registry") from None
        if resp.status_code in (401, 403):
            raise self.denied(cred_host, repo_path, presented=cred is not None)
        if resp.request.method == "POST" and resp.status_code in (404, 405):
            # Only an identity token, and a realm without the OAuth2 endpoint to trade it in.
            raise AuthFailed(f"token server {realm} for {cred_host} does not take identity tokens "
                             f"(OAuth2 POST answered HTTP {resp.status_code})",
                             f"run `docker login {cred_host}` with a username and password "
                             f"(edgebundle reads {self.config_path})")
        if resp.status_code == 429 or resp.status_code >= 500:
            wait = resp.headers.get("retry-after", "")
            raise TokenServerBusy(f"token server {realm} for {cred_host} answered HTTP {resp.status_code}",
                                  "retry later; the registry's token service is overloaded or failing",
                                  float(wait) if wait.isdigit() else None)
        if resp.status_code != 200:
            raise ResolveError(f"token server {realm} for {cred_host} answered HTTP {resp.status_code}",
                               "the registry's token service refuses the request; check the registry's auth setup")
        try:
            obj = resp.json()
            token = obj.get("token") or obj.get("access_token")
            ttl = float(obj.get("expires_in") or _DEFAULT_TOKEN_TTL)
        except (ValueError, AttributeError, TypeError):
            token, ttl = None, _DEFAULT_TOKEN_TTL
        if not token or not isinstance(token, str):
            raise ResolveError(f"token server {realm} for {cred_host} returned no token",
                               "the registry's token service is misconfigured")
        log.debug("token for %s scope %s from %s (ttl %.0fs)", cred_host, " ".join(scopes), realm, ttl)
        return token, ttl

    def _token_request(self, realm: str, service: str, scopes: List[str],
                       cred: Optional[Credential]) -> httpx.Response:
        if cred is not None and cred.identity_token:
            # OAuth2 refresh-token grant, as docker does for identity tokens.
            form = {"grant_type": "refresh_token", "refresh_token": cred.identity_token,
                    "service": service, "scope": " ".join(scopes), "client_id": "edgebundle"}
            resp = self._http.post(realm, data=form)
            if resp.status_code not in (404, 405) or not cred.has_basic:
                return resp
        params: List[Tuple[str, Union[str, int, float, bool, None]]] = [("service", service)] if service else []
        params += [("scope", s) for s in scopes if s]
        auth = (cred.username, cred.password) if cred is not None and cred.has_basic else None
        # Merged into the realm's own query (``params=`` would replace it), as docker does.
        url = httpx.URL(realm).copy_merge_params(params)
        return self._http.get(url, auth=auth)


def _basic_header(cred: Credential) -> str:
    raw = f"{cred.username}:{cred.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()
