"""A small distribution token server (the ``auth: token`` realm) for integration tests.

It does what docker_auth / Harbor's core do for a pull, and no more:

* ``GET /token?service=S&scope=repository:NAME:pull`` with optional HTTP basic auth;
  wrong credentials answer 401, no credentials mean the anonymous account;
* ``POST /token`` (OAuth2: ``refresh_token`` grant for config.json's ``identitytoken``,
  or ``password``), when ``refresh_tokens`` is given; else 404 like a realm without it;
* grants the intersection of the requested actions and the account's ACL (an empty
  ``access`` when nothing is allowed: the registry then answers ``insufficient_scope``);
* returns an RS256 JWT whose header carries ``x5c`` (a self-signed certificate the
  registry lists in ``rootcertbundle``), with ``iss``/``aud`` the registry checks.

``jwt_lifetime`` / ``jwt_lifetimes`` (exp - now, may be negative: distribution 2.8
allows 60 s of leeway past ``exp``) and ``expires_in`` (what the client is told) are
separate so tests can make a token the client believes in expire at the registry mid-pack.

Every request is recorded (path, scopes, the basic-auth user it carried) so tests can
prove which realm saw which credentials. No pytest import here.
"""

from __future__ import annotations

import base64
import datetime
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from services import TokenAuth

ANONYMOUS = ""  # the ACL key of requests without credentials


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server saw."""

    method: str
    service: str
    scopes: Tuple[str, ...]
    user: Optional[str]  # basic-auth user sent, None when no Authorization header
    password: Optional[str] = field(default=None, repr=False)
    status: int = 0
    token: str = field(default="", repr=False)  # the JWT issued, if any


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parse_scope(scope: str) -> Optional[Tuple[str, str, List[str]]]:
    """``repository:shop/app:pull,push`` -> ("repository", "shop/app", ["pull", "push"])."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not name:
        return None
    return kind, name, [a for a in actions.split(",") if a]


class TokenServer:
    """Token realm on 127.0.0.1:<port>/token, in a daemon thread; ``stop()`` ends it."""

    def __init__(self, tmp: Path, *, issuer: str = "edgebundle-test-issuer", service: str = "edgebundle-registry",
                 users: Optional[Mapping[str, str]] = None,
                 acl: Optional[Mapping[str, Mapping[str, Set[str]]]] = None,
                 expires_in: int = 300, jwt_lifetime: Optional[int] = None,
                 refresh_tokens: Optional[Mapping[str, str]] = None, jwt_lifetimes: Sequence[int] = ()) -> None:
        """Args:
            tmp: where the signing certificate (``token.crt``) is written.
            users: username -> password.
            acl: account (``ANONYMOUS`` for none) -> repository -> allowed actions.
            expires_in: seconds told to the client.
            jwt_lifetime: ``exp - now`` in the JWT; default ``expires_in``.
            jwt_lifetimes: ``exp - now`` of the first tokens issued, one each (then
                ``jwt_lifetime``): a token that dies mid-pack, and a good one after it.
            refresh_tokens: OAuth2 refresh token (config.json ``identitytoken``) -> username;
                ``None`` answers every POST with 404, as a realm without the OAuth2 endpoint.
        """
        self.issuer = issuer
        self.service = service
        self.users: Dict[str, str] = dict(users or {})
        self.acl: Dict[str, Dict[str, Set[str]]] = {k: dict(v) for k, v in (acl or {}).items()}
        self.expires_in = expires_in
        self.jwt_lifetime = jwt_lifetime
        self._lifetimes = list(jwt_lifetimes)
        self.refresh_tokens = None if refresh_tokens is None else dict(refresh_tokens)
        self.requests: List[TokenRequest] = []
        self.issued = 0
        self._lock = threading.Lock()
        tmp.mkdir(parents=True, exist_ok=True)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgebundle test token signer")])
        self._cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                      .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
                      .not_valid_before(now - datetime.timedelta(days=1))
                      .not_valid_after(now + datetime.timedelta(days=2))
                      .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                      .sign(self._key, hashes.SHA256()))
        self.cert_path = tmp / "token.crt"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()

        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server._handle(self)

            def do_POST(self) -> None:  # noqa: N802
                server._handle_oauth(self)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self.realm = f"http://127.0.0.1:{self.port}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="token-server", daemon=True)
        self._thread.start()

    def auth_config(self) -> TokenAuth:
        """What a registry needs to trust this server's tokens (``services.start_registry(token=)``)."""
        return TokenAuth(self.realm, self.service, self.issuer, self.cert_path)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    # -- what tests look at --------------------------------------------------

    def seen(self) -> List[TokenRequest]:
        with self._lock:
            return list(self.requests)

    def scopes_of(self, authorization: str) -> Tuple[str, ...]:
        """The scopes the token in ``Authorization: Bearer <jwt>`` was issued for (() if not ours)."""
        token = authorization[len("Bearer "):] if authorization.startswith("Bearer ") else ""
        return next((r.scopes for r in self.seen() if token and r.token == token), ())

    def users_seen(self) -> Set[Optional[str]]:
        return {r.user for r in self.seen()}

    # -- the realm -------------------------------------------------------------

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def _handle_oauth(self, h: BaseHTTPRequestHandler) -> None:
        """``POST /token`` (distribution's OAuth2 spec): refresh_token or password grant."""
        length = int(h.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(h.rfile.read(length).decode())
        one = lambda key: (form.get(key) or [""])[0]  # noqa: E731
        scopes = tuple(s for s in one("scope").split(" ") if s)
        user: Optional[str] = None
        if self.refresh_tokens is None:
            status = 404
        elif one("grant_type") == "refresh_token":
            user = self.refresh_tokens.get(one("refresh_token"))
            status = 200 if user is not None else 401
        elif one("grant_type") == "password":
            user = one("username")
            status = 200 if self.users.get(user) == one("password") else 401
        else:
            status = 400
        if status != 200 or user is None:
            self._record(TokenRequest("POST", one("service"), scopes, user, status=status))
            self._reply(h, status, {"error": "invalid_grant" if status == 401 else "unsupported"})
            return
        token = self._sign(user, self._access(user, scopes))
        self._record(TokenRequest("POST", one("service"), scopes, user, status=200, token=token))
        with self._lock:
            self.issued += 1
        self._reply(h, 200, {"access_token": token, "expires_in": self.expires_in, "scope": " ".join(scopes)})

    def _reply(self, h: BaseHTTPRequestHandler, status: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _access(self, account: str, scopes: Tuple[str, ...]) -> List[Dict[str, object]]:
        """What ``account`` gets of ``scopes``: requested actions its ACL allows (maybe none)."""
        access: List[Dict[str, object]] = []
        allowed = self.acl.get(account, {})
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None or parsed[0] != "repository":
                continue
            _, name, actions = parsed
            granted = [a for a in actions if a in allowed.get(name, set()) or a in allowed.get("*", set())]
            access.append({"type": "repository", "name": name, "actions": granted})
        return access

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(h.path)
        query = urllib.parse.parse_qs(url.query)
        service = (query.get("service") or [""])[0]
        scopes = tuple(s for value in query.get("scope", []) for s in value.split(" ") if s)
        user, password = _basic(h.headers.get("Authorization", ""))
        account = user if user is not None else ANONYMOUS
        status = 200
        if url.path != "/token":
            status = 404
        elif user is not None and self.users.get(user) != password:
            status = 401
        if status != 200:
            self._record(TokenRequest("GET", service, scopes, user, password, status))
            body = json.dumps({"details": "invalid credentials" if status == 401 else "no such path"}).encode()
            h.send_response(status)
            if status == 401:
                h.send_header("WWW-Authenticate", 'Basic realm="edgebundle token server"')
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        token = self._sign(account or "anonymous", self._access(account, scopes))
        self._record(TokenRequest("GET", service, scopes, user, password, status, token))
        with self._lock:
            self.issued += 1
        body = json.dumps({"token": token, "access_token": token, "expires_in": self.expires_in,
                           "issued_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _sign(self, subject: str, access: List[Dict[str, object]]) -> str:
        now = int(time.time())
        lifetime = self.expires_in if self.jwt_lifetime is None else self.jwt_lifetime
        with self._lock:
            if self._lifetimes:
                lifetime = self._lifetimes.pop(0)
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + lifetime,
                  "nbf": now - 1, "iat": now, "jti": secrets.token_hex(8), "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode()))
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)


def _basic(header: str) -> Tuple[Optional[str], Optional[str]]:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        user, _, password = base64.b64decode(value.strip()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return "", ""
    return user, password
