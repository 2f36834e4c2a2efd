"""A small pull-only OCI distribution client: manifests and blobs, verified.

* https everywhere, plain http only for hosts declared ``insecure: true`` (a mirror may
  have its own entry); there is never a silent fallback from https to http.
* mirrors of a registry are tried in order before the registry itself; a mirror that is
  unreachable, failing (5xx) or lacks the content (404) just passes the request on.
* transient failures (5xx, 429, resets, timeouts, a blob that fails verification) are
  retried with exponential backoff and jitter.
* every byte is checked: manifests against the digest they were asked for (or the
  ``Docker-Content-Digest`` the registry claims), blobs by ``BlobCache.writer``; a mirror
  serving wrong bytes passes the request on like a failing one.
* each host gets its own connections: TLS from certs.d and the manifest (``tls``), a proxy
  from ``ProxySettings`` (``proxy``); ``served()`` tells which source gave each digest.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import logging
import random
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import httpcore
import httpx

from .. import __version__
from ..cache import BlobCache, DigestMismatch
from ..errors import ResolveError
from ..files import IO_CHUNK
from ..oci import INDEX_TYPES, MANIFEST_TYPES, MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, \
    MT_OCI_MANIFEST, sha256_digest
from ..specs import RegistryConfig
from ..reference import DEFAULT_DOMAIN, SHA256_RE, Reference
from .auth import AuthFailed, Authenticator, CredentialStore, TokenServerBusy, normalize_host
from .proxy import ProxySettings
from .tls import DEFAULT_CERTS_DIRS, TlsFiles, find_tls_files, host_dir, ssl_context

log = logging.getLogger(__name__)

# httpcore (httpx's transport) reads a response 64 KiB at a time, each read a trip
# through h11's state machine: with httpx's re-chunking, receiving + hashing + writing a
# 34 MB blob cost 0.11 CPU s, 0.06 s with IO_CHUNK reads and the raw body (_body_chunks;
# http.client's floor: 0.045 s). A class attribute meant to be tuned; only ever raised.
if getattr(httpcore.HTTP11Connection, "READ_NUM_BYTES", IO_CHUNK) < IO_CHUNK:
    httpcore.HTTP11Connection.READ_NUM_BYTES = IO_CHUNK

DOCKER_HUB_API_HOST = "registry-1.docker.io"
MANIFEST_ACCEPT = ", ".join((MT_OCI_INDEX, MT_OCI_MANIFEST, MT_DOCKER_LIST, MT_DOCKER_MANIFEST))
SCHEMA1_TYPES = frozenset({
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
})
# containerd refuses manifests above 4 MiB; so do we, rather than buffer anything a server sends.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024

Progress = Callable[[int], None]
T = TypeVar("T")


class Retryable(ResolveError):
    """A failure worth another attempt (5xx, 429, reset, timeout)."""

    def __init__(self, message: str, hint: Optional[str] = None, retry_after: Optional[float] = None) -> None:
        super().__init__(message, hint)
        self.retry_after = retry_after


class NotFound(ResolveError):
    """The registry answered 404; ``code`` is its error code (MANIFEST_UNKNOWN, ...)."""

    def __init__(self, message: str, hint: Optional[str] = None, code: str = "") -> None:
        super().__init__(message, hint)
        self.code = code


@dataclass(frozen=True)
class Endpoint:
    """Where requests for one registry go.

    ``host`` names the registry (or mirror) in messages and credential lookups;
    ``api_host`` is what the HTTP requests are sent to (docker.io -> registry-1.docker.io).
    """

    host: str
    api_host: str
    scheme: str
    mirror: bool = False
    prefix: str = ""  # path prefix of a mirror URL, e.g. "/dockerhub"

    def url(self, repo_path: str, kind: str, ident: str) -> str:
        """``<scheme>://<api_host>[prefix]/v2/<repo>/<kind>/<ident>`` (kind: manifests|blobs)."""
        return f"{self.scheme}://{self.api_host}{self.prefix}/v2/{repo_path}/{kind}/{ident}"

    @property
    def source(self) -> str:
        """How the plan names this source: ``host[/prefix]``."""
        return self.host + self.prefix


def url_host(url: httpx.URL) -> str:
    """``host[:port]`` of a URL as certs.d names directories (no port when it is the default)."""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return host if url.port is None else f"{host}:{url.port}"


class HostTransports(httpx.BaseTransport):
    """One httpx transport per (scheme, host, proxy): per-host TLS, per-request proxy choice.

    ``ssl_for(host)`` makes the verifying context of an https host (certs.d, manifest);
    its ``ResolveError`` (a bad certificate file) goes up to the caller unchanged.
    """

    def __init__(self, ssl_for: Callable[[str], ssl.SSLContext], proxies: ProxySettings) -> None:
        self._ssl_for = ssl_for
        self._proxies = proxies
        self._lock = threading.Lock()
        self._transports: Dict[Tuple[str, str, Optional[str]], httpx.HTTPTransport] = {}

    def key_for(self, url: httpx.URL) -> Tuple[str, str, Optional[str]]:
        """(scheme, host[:port] for https, proxy URL or None): what a transport is made for."""
        proxy = self._proxies.proxy_for(url.scheme, url.host, url.port)
        return url.scheme, url_host(url) if url.scheme == "https" else "", proxy

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        key = self.key_for(request.url)
        _, host, proxy = key
        with self._lock:
            transport = self._transports.get(key)
            if transport is None:
                # Plain HTTP never verifies anything: no context to build for it.
                verify: "ssl.SSLContext | bool" = self._ssl_for(host) if host else False
                transport = httpx.HTTPTransport(verify=verify, trust_env=False,
                                                proxy=self._proxy(proxy) if proxy else None)
                self._transports[key] = transport
        return transport.handle_request(request)

    def _proxy(self, url: str) -> httpx.Proxy:
        """An https:// proxy is verified like a registry: certs.d of its host[:port]."""
        parsed = httpx.URL(url)
        if parsed.scheme != "https":
            return httpx.Proxy(url)
        return httpx.Proxy(url, ssl_context=self._ssl_for(url_host(parsed)))

    def close(self) -> None:
        with self._lock:
            transports, self._transports = list(self._transports.values()), {}
        for transport in transports:
            transport.close()


class RegistryClient:
    """Pull manifests and blobs from OCI registries."""

    def __init__(self, registries: Optional[Mapping[str, RegistryConfig]] = None,
                 credentials: Optional[CredentialStore] = None,
                 transport: Optional[httpx.BaseTransport] = None, timeout: float = 60.0,
                 retries: int = 4, *, backoff: float = 0.25, backoff_max: float = 10.0,
                 digest_retries: int = 2, retry_after_max: float = 60.0,
                 sleep: Callable[[float], None] = time.sleep,
                 certs_dirs: Sequence[str] = DEFAULT_CERTS_DIRS,
                 proxies: Optional[ProxySettings] = None) -> None:
        """Args:
            registries: per-host settings (insecure, mirrors, TLS files), keyed by ``host[:port]``.
            credentials: where to find credentials; None means anonymous only.
            transport: an httpx transport (``httpx.MockTransport`` in tests); by default
                ``HostTransports`` with certs.d TLS and ``proxies``.
            timeout: seconds for connecting and between bytes of a response.
            retries: extra attempts after a transient failure (upstream only; mirrors
                get one attempt each, since the next mirror or upstream is the retry).
            backoff: first backoff delay in seconds; doubles per attempt, plus jitter.
            backoff_max: cap of one delay.
            digest_retries: extra attempts for a blob that arrives with the wrong digest.
            retry_after_max: longest ``Retry-After`` (429/503) waited for; a longer one
                fails at once with the registry's wait in the message.
            sleep: how to wait (injectable so tests do not).
            certs_dirs: certs.d roots holding ``<host[:port]>/`` directories (``tls``).
            proxies: HTTP(S) proxies and exemptions; None: direct connections only.
        """
        self._registries: Dict[str, RegistryConfig] = dict(registries or {})
        self.timeout = timeout
        self.certs_dirs = tuple(certs_dirs)
        self._tls: Dict[str, TlsFiles] = {}
        self._served: Dict[str, str] = {}
        self._served_lock = threading.Lock()
        self._proxies = proxies or ProxySettings()
        if transport is None:
            transport = HostTransports(self._ssl_for, self._proxies)
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.digest_retries = digest_retries
        self.retry_after_max = retry_after_max
        self._sleep = sleep
        self._http = httpx.Client(transport=transport, timeout=httpx.Timeout(timeout), follow_redirects=True,
                                  trust_env=False,  # proxies and CAs come as arguments, not os.environ
                                  headers={"User-Agent": f"edgebundle/{__version__}"})
        self._auth = Authenticator(credentials, self._http)
        self._rng = random.Random()
        self._rng_lock = threading.Lock()

    def close(self) -> None:
        self._http.close()

    # -- TLS and sources -----------------------------------------------------------

    def tls_files(self, host: str) -> TlsFiles:
        """The certificates connections to ``host`` (``host[:port]``) use."""
        files = self._tls.get(host)
        if files is None:
            config = self._registries.get(DEFAULT_DOMAIN if host == DOCKER_HUB_API_HOST else host)
            files = self._tls[host] = find_tls_files(host, config, self.certs_dirs)
        return files

    def _ssl_for(self, host: str) -> ssl.SSLContext:
        return ssl_context(self.tls_files(host))

    def _record(self, digest: str, ep: Endpoint) -> None:
        with self._served_lock:
            self._served[digest] = ep.source

    def served(self) -> Dict[str, str]:
        """Which source (``host[/prefix]``) served each manifest/blob digest fetched so far."""
        with self._served_lock:
            return dict(self._served)

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- endpoints --------------------------------------------------------------

    def config(self, host: str) -> RegistryConfig:
        return self._registries.get(host) or RegistryConfig(host)

    def endpoints(self, host: str) -> List[Endpoint]:
        """Mirrors of ``host`` in declared order, then ``host`` itself."""
        out = [self._mirror_endpoint(m) for m in self.config(host).mirrors]
        api_host = DOCKER_HUB_API_HOST if host == DEFAULT_DOMAIN else host
        out.append(Endpoint(host, api_host, "http" if self.config(host).insecure else "https"))
        return out

    def _mirror_endpoint(self, mirror: str) -> Endpoint:
        text = mirror.strip().rstrip("/")
        scheme = ""
        if "://" in text:
            # An explicit http:// in the mirror list is a declaration, not a fallback.
            scheme, text = text.split("://", 1)
        host, _, prefix = text.partition("/")
        if not scheme:
            scheme = "http" if self.config(host).insecure else "https"
        prefix = "/" + prefix if prefix else ""
        if prefix.endswith("/v2"):
            prefix = prefix[:-3]
        return Endpoint(host, DOCKER_HUB_API_HOST if host == DEFAULT_DOMAIN else host, scheme, True, prefix)

    def _each_endpoint(self, host: str, attempt: Callable[[Endpoint], T]) -> T:
        """``attempt`` on each mirror, then upstream; a mirror's failure passes it on."""
        for ep in self.endpoints(host):
            if not ep.mirror:
                return attempt(ep)
            try:
                return attempt(ep)
            except ResolveError as exc:
                log.info("mirror %s of %s failed (%s); trying the next source", ep.source, host, exc.message)
        raise AssertionError("unreachable: the upstream endpoint is always last")

    # -- manifests --------------------------------------------------------------

    def get_manifest(self, ref: Reference) -> Tuple[bytes, str, str]:
        """Fetch the manifest or index ``ref`` names (by digest when it has one).

        Returns:
            ``(raw bytes, media type, sha256 digest of the bytes)``.

        Raises:
            ResolveError: not found, schema 1, digest mismatch, auth or network failure.
        """
        return self._each_endpoint(ref.domain, lambda ep: self._retrying(
            ep, 0, lambda: self._get_manifest_recorded(ep, ref)))

    def _get_manifest_recorded(self, ep: Endpoint, ref: Reference) -> Tuple[bytes, str, str]:
        got = self._get_manifest_once(ep, ref)
        self._record(got[2], ep)
        return got

    def _get_manifest_once(self, ep: Endpoint, ref: Reference) -> Tuple[bytes, str, str]:
        ident = ref.digest or ref.tag or "latest"
        url = ep.url(ref.path, "manifests", ident)
        try:
            resp = self._open(ep, ref.path, url, {"Accept": MANIFEST_ACCEPT}, what=f"manifest {ref}")
        except NotFound as exc:
            unknown = "repository unknown" if exc.code == "NAME_UNKNOWN" else "manifest unknown"
            raise NotFound(f"image {ref} not found in {ep.host} ({unknown})",
                           f"check the repository name and {'digest' if ref.digest else 'tag'} "
                           f"(e.g. `skopeo list-tags docker://{ref.repository}`)", exc.code) from None
        try:
            body = _read_limited(resp, MAX_MANIFEST_BYTES, lambda: ResolveError(
                f"manifest of {ref} on {ep.host} is larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB",
                "that is not an image manifest; check the reference"))
        except httpx.HTTPError as exc:
            raise self._network_error(ep, exc) from None
        finally:
            resp.close()
        header_digest = resp.headers.get("docker-content-digest", "")
        content_type = resp.headers.get("content-type", "").split(";")[0].strip()
        digest = sha256_digest(body)
        if ref.digest and digest != ref.digest:
            if ep.mirror:
                log.warning("mirror %s served wrong bytes for %s (digest %s); trying the next source",
                            ep.source, ref, digest)
            raise ResolveError(f"manifest {ref} from {ep.host} has digest {digest}, not the one asked for",
                               "the registry (or a proxy) served wrong content; try again or use another mirror")
        if not ref.digest and header_digest.startswith("sha256:") and header_digest != digest:
            raise ResolveError(f"manifest {ref} from {ep.host} has digest {digest}, but the registry "
                               f"says {header_digest}", "a proxy altered the response; try again")
        return body, manifest_media_type(body, content_type, ref, ep.host), digest

    # -- blobs -------------------------------------------------------------------

    def fetch_blob(self, repo: Reference, digest: str, size: Optional[int], cache: BlobCache,
                   progress: Optional[Progress] = None, layer_media_type: Optional[str] = None) -> None:
        """Stream blob ``digest`` of ``repo``'s repository into ``cache``, verified.

        Redirects (to object storage) are followed. Nothing happens if the cache has it.
        ``progress(n)`` is told of every chunk; when an attempt fails, the bytes it
        reported are taken back with a negative ``progress(-n)``. ``layer_media_type``:
        the blob is a layer; learn its diff_id as it streams (``BlobCache.writer``).

        Raises:
            ResolveError: not found, persistent digest mismatch, auth or network failure.
        """
        if cache.has(digest):
            return
        if not SHA256_RE.match(digest):
            raise ResolveError(f"blob digest {digest!r} of {repo.repository} is not sha256:<64 hex>",
                               "only sha256 content is supported")
        self._each_endpoint(repo.domain, lambda ep: self._retrying(
            ep, self.digest_retries if not ep.mirror else 0,
            lambda: self._fetch_blob_once(ep, repo, digest, size, cache, progress, layer_media_type)))

    def _fetch_blob_once(self, ep: Endpoint, repo: Reference, digest: str, size: Optional[int],
                         cache: BlobCache, progress: Optional[Progress],
                         layer_media_type: Optional[str] = None) -> None:
        url = ep.url(repo.path, "blobs", digest)
        reported = 0
        try:
            resp = self._open(ep, repo.path, url, {}, what=f"blob {digest} of {repo.repository}")
        except NotFound as exc:
            raise NotFound(f"blob {digest} not found in {repo.path} on {ep.host}",
                           "the image references a blob the registry lacks (pushed incompletely or "
                           "garbage-collected); re-push the image", exc.code) from None
        try:
            with cache.writer(digest, size, layer_media_type) as out:
                for chunk in _body_chunks(resp):
                    out.write(chunk)
                    reported += len(chunk)
                    if size is not None and reported > size:
                        raise DigestMismatch(f"blob {digest} is longer than {size} bytes")
                    if progress:
                        progress(len(chunk))
        except DigestMismatch as exc:
            if ep.mirror:
                log.warning("mirror %s served wrong bytes for blob %s (%s); trying the next source",
                            ep.source, digest, exc)
            raise
        except httpx.HTTPError as exc:
            raise self._network_error(ep, exc) from None
        finally:
            resp.close()
            if progress and reported and not cache.has(digest):
                progress(-reported)
        self._record(digest, ep)

    # -- requests, auth, retries ---------------------------------------------------

    def _retrying(self, ep: Endpoint, digest_retries: int, attempt: Callable[[], T]) -> T:
        retries = 0 if ep.mirror else self.retries
        failures = mismatches = 0
        while True:
            try:
                return attempt()
            except (Retryable, TokenServerBusy) as exc:
                failures += 1
                # A registry asking for a longer pause than we would wait: say so now.
                if failures > retries or (exc.retry_after or 0.0) > self.retry_after_max:
                    raise ResolveError(exc.message, exc.hint) from None
                delay = self._delay(failures, exc.retry_after)
                log.info("%s; retry %d/%d in %.2fs", exc.message, failures, retries, delay)
            except DigestMismatch as exc:
                mismatches += 1
                if mismatches > digest_retries:
                    raise ResolveError(f"{exc} from {ep.host} ({mismatches} attempts)",
                                       "the registry, its storage or a proxy corrupts this blob; "
                                       "check the registry or fetch through another mirror") from None
                delay = self._delay(mismatches, None)
                log.info("%s; retry in %.2fs", exc, delay)
            self._sleep(delay)

    def _delay(self, attempt: int, retry_after: Optional[float]) -> float:
        if retry_after is not None:
            # Retry-After is honoured as given (up to retry_after_max, see _retrying).
            return min(max(retry_after, 0.0), self.retry_after_max)
        base = min(self.backoff * 2.0 ** (attempt - 1), self.backoff_max)
        with self._rng_lock:
            # Jitter (half the delay) keeps parallel packers from retrying in lockstep.
            return base / 2 + self._rng.uniform(0, base / 2)

    def _open(self, ep: Endpoint, repo_path: str, url: str, headers: Dict[str, str],
              what: str) -> httpx.Response:
        """Send a GET with auth; return a streaming response with a 2xx status.

        The caller must close it (``with``). Non-2xx statuses become ResolveErrors.
        """
        cred_host = normalize_host(ep.host)
        cached = self._auth.authorization(ep.api_host, cred_host, repo_path)
        resp = self._send(ep, url, headers, cached)
        presented = cached is not None and self._auth.credential(cred_host) is not None
        if resp.status_code == 401:
            resp.close()
            if cached is not None:
                # A cached token may have been revoked or expired early: get a fresh one.
                self._auth.forget(ep.api_host, repo_path)
            value, presented = self._auth.answer(ep.api_host, cred_host, repo_path, resp)
            resp = self._send(ep, url, headers, value)
            if resp.status_code == 401:
                resp.close()
                raise self._auth.refused(cred_host, repo_path, resp, presented=presented)
        if resp.is_success:
            return resp
        try:
            resp.read()
        except httpx.HTTPError:
            pass  # the status alone tells what went wrong
        finally:
            resp.close()
        raise self._status_error(ep, repo_path, resp, what, presented)

    def _send(self, ep: Endpoint, url: str, headers: Dict[str, str], authorization: Optional[str]) -> httpx.Response:
        hdrs = dict(headers)
        if authorization:
            hdrs["Authorization"] = authorization
        try:
            request = self._http.build_request("GET", url, headers=hdrs)
            return self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._network_error(ep, exc) from None

    def _status_error(self, ep: Endpoint, repo_path: str, resp: httpx.Response, what: str,
                      presented: bool) -> ResolveError:
        status = resp.status_code
        code, detail = _registry_error(resp)
        if status == 404:
            return NotFound(f"{what} not found on {ep.host}", "check the name", code)
        if status == 429:
            wait = _retry_after(resp)
            return Retryable(f"registry {ep.host} rate-limits pulls (HTTP 429 for {what}"
                             + (f", retry after {wait:.0f}s)" if wait is not None else ")")
                             + (f": {detail}" if detail else ""),
                             f"try again later, log in (`docker login {ep.host}`: accounts usually get a "
                             "higher limit), or pull through a mirror", wait)
        if status >= 500:
            return Retryable(f"registry {ep.host} answered HTTP {status} for {what}"
                             + (f": {detail}" if detail else ""),
                             "the registry is overloaded or failing; try again later",
                             _retry_after(resp) if status == 503 else None)
        if status == 403:
            return AuthFailed(f"access to {repo_path} on {ep.host} denied (HTTP 403"
                              + (f": {detail})" if detail else ")"),
                              f"the credentials used for {ep.host} lack pull permission on {repo_path}"
                              if presented else f"run `docker login {ep.host}` with an account that may pull it")
        if status == 400 and "https" in resp.text.lower() and ep.scheme == "http":
            return ResolveError(f"registry {ep.host} speaks HTTPS, but it is declared insecure (plain HTTP)",
                                f"remove `insecure: true` from registry {ep.host}")
        return ResolveError(f"registry {ep.host} answered HTTP {status} for {what}" + (f": {detail}" if detail else ""),
                            "check the reference and the registry's logs")

    def _tls_error(self, ep: Endpoint, where: str, reason: str) -> Optional[ResolveError]:
        """The x509 / client-certificate failures users meet, named as Docker names them."""
        lowered = reason.lower()
        host = ep.api_host
        files = self.tls_files(host)
        root = self.certs_dirs[0] if self.certs_dirs else DEFAULT_CERTS_DIRS[0]
        config_host = DEFAULT_DOMAIN if host == DOCKER_HUB_API_HOST else host
        if any(s in lowered for s in ("unable to get local issuer", "self-signed", "self signed",
                                      "unable to get issuer", "unknown authority")):
            loaded = f"the CA certificates loaded ({', '.join(files.ca_files)}) did not sign it; " \
                if files.ca_files else ""
            target = httpx.URL(f"{ep.scheme}://{ep.api_host}/")
            proxy = self._proxies.proxy_for(target.scheme, target.host, target.port)
            via = ""
            if proxy and proxy.startswith("https://"):
                # The failing certificate may be the proxy's own: name its directory too.
                proxy_host = url_host(httpx.URL(proxy))
                via = f"; or, if it is the HTTPS proxy {proxy_host}'s, put that CA in " \
                      f"{host_dir(root, proxy_host)}/ca.crt"
            return ResolveError(f"registry {where}: x509: certificate signed by unknown authority",
                                f"{loaded}put the CA certificate that signed it in "
                                f"{host_dir(root, host)}/ca.crt (or set ca_file under registries: "
                                f"{config_host} in the manifest){via}")
        if "mismatch" in lowered and "certificate verify failed" in lowered:
            return ResolveError(f"registry {where}: x509: certificate is not valid for {host}",
                                f"the registry's certificate must name {host.rsplit(':', 1)[0]} in its "
                                "subjectAltName; use a name it has, or reissue it")
        if "expired" in lowered or "not yet valid" in lowered:
            return ResolveError(f"registry {where}: x509: certificate has expired or is not yet valid",
                                "renew the registry's certificate (or fix this machine's clock)")
        if "certificate required" in lowered or ("alert" in lowered and not files.has_client_cert
                                                 and ("bad certificate" in lowered or "handshake failure" in lowered)):
            return ResolveError(f"registry {where} requires a TLS client certificate",
                                f"put client.cert and client.key in {host_dir(root, host)}/ (or set "
                                f"client_cert and client_key under registries: {config_host})")
        if "alert" in lowered and files.has_client_cert and any(
                s in lowered for s in ("bad certificate", "unknown ca", "certificate unknown",
                                       "decrypt error", "handshake failure")):
            return ResolveError(f"registry {where} refused the client certificate {files.client_cert}",
                                "it must be signed by a CA the registry trusts (its http.tls.clientcas) "
                                "and be a client certificate")
        if "certificate" in lowered:
            return ResolveError(f"registry {where} unreachable: {reason}",
                                f"its TLS certificate is not trusted: put its CA in {host_dir(root, host)}/ca.crt "
                                "or the system trust store")
        return None

    def _network_error(self, ep: Endpoint, exc: httpx.HTTPError) -> ResolveError:
        reason = _reason(exc)
        where = f"{ep.host}" + (f" ({ep.api_host})" if ep.api_host != ep.host else "")
        if isinstance(exc, httpx.TimeoutException):
            phase = "connecting" if isinstance(exc, httpx.ConnectTimeout) else "waiting for data"
            return Retryable(f"registry {where}: i/o timeout ({phase}, nothing within {self.timeout:g}s)",
                             "check the network and any proxy (HTTPS_PROXY) on the way, or raise "
                             "the timeout for slow links")
        if _is_ssl_error(exc):
            tls_error = self._tls_error(ep, where, reason)
            if tls_error is not None:
                return tls_error
            return ResolveError(f"registry {where} unreachable: {reason}",
                                f"{ep.host} does not seem to speak HTTPS; if it is a plain-HTTP registry, "
                                "declare it with `insecure: true` under registries:")
        if isinstance(exc, httpx.ConnectError):
            lowered = reason.lower()
            if "name or service" in lowered or "nodename" in lowered or "name resolution" in lowered:
                hint = f"check the host name {ep.api_host.rsplit(':', 1)[0]} and DNS"
            elif "refused" in lowered:
                hint = "nothing listens there: check the address/port and that the registry runs"
            else:
                hint = "check the address/port, network, or declare it insecure: true for plain HTTP"
            return Retryable(f"registry {where} unreachable: {reason}", hint)
        if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            return Retryable(f"connection to registry {where} broke: {reason}",
                             "check the network and proxies between here and the registry; "
                             "if the registry is plain HTTP, declare it insecure: true")
        if isinstance(exc, httpx.TooManyRedirects):
            return ResolveError(f"registry {where} redirects in a loop", "check the registry's storage settings")
        return ResolveError(f"registry {where} unreachable: {reason}",
                            "check the address/port, network, or declare it insecure: true for plain HTTP")


# ---------------------------------------------------------------------------
# helpers


def manifest_media_type(body: bytes, content_type: str, ref: Reference, host: str) -> str:
    """The media type of a fetched manifest; schema 1 and non-manifests are refused.

    The server's Content-Type wins when it is a manifest type; otherwise the body's own
    ``mediaType``, else what its shape says (OCI allows omitting ``mediaType``).
    """
    if content_type in SCHEMA1_TYPES:
        raise _schema1(ref, host)
    try:
        obj = json.loads(body)
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
    except ValueError:
        raise ResolveError(f"manifest of {ref} from {host} is not JSON",
                           "the registry answered something else than a manifest; check the registry address")
    if obj.get("schemaVersion") == 1:
        raise _schema1(ref, host)
    if content_type in MANIFEST_TYPES or content_type in INDEX_TYPES:
        return content_type
    return guess_media_type(obj)


def guess_media_type(obj: Mapping[str, object]) -> str:
    """``mediaType`` of a parsed manifest/index, inferred from its shape when absent."""
    declared = obj.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    if "manifests" in obj:
        return MT_OCI_INDEX
    return MT_OCI_MANIFEST


def _schema1(ref: Reference, host: str) -> ResolveError:
    return ResolveError(f"image {ref} on {host} has a Docker schema 1 manifest, which is not supported",
                        "re-push the image with a current docker/buildx/skopeo (schema 2 or OCI)")


def _body_chunks(resp: httpx.Response) -> Iterator[bytes]:
    """A blob response's body as it arrives (pieces of at most READ_NUM_BYTES, above).

    Registries send blobs without a Content-Encoding: then the raw stream is the blob,
    and httpx's decoding and re-chunking (two more copies of every byte) are skipped. A
    body already read (a transport that is no stream) is iterated from memory."""
    if not resp.is_stream_consumed and \
            resp.headers.get("content-encoding", "identity").strip().lower() in ("", "identity"):
        return resp.iter_raw()
    return resp.iter_bytes(IO_CHUNK)


def _read_limited(resp: httpx.Response, limit: int, too_big: Callable[[], ResolveError]) -> bytes:
    parts: List[bytes] = []
    total = 0
    for chunk in resp.iter_bytes(IO_CHUNK):
        total += len(chunk)
        if total > limit:
            raise too_big()
        parts.append(chunk)
    return b"".join(parts)


def _registry_error(resp: httpx.Response) -> Tuple[str, str]:
    """(code, message) of the first entry of a distribution error body, if there is one."""
    try:
        errors = json.loads(resp.content).get("errors") or []
        first = errors[0]
        return str(first.get("code", "")), str(first.get("message", ""))
    except Exception:  # noqa: BLE001 - any unparseable body just has no details
        return "", ""


def _retry_after(resp: httpx.Response) -> Optional[float]:
    """Seconds a ``Retry-After`` header asks for: delta-seconds or an HTTP date."""
    value = resp.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - datetime.datetime.now(datetime.timezone.utc)).total_seconds(), 0.0)


def _is_ssl_error(exc: BaseException) -> bool:
    seen = set()
    cur: Optional[BaseException] = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError) or "[SSL" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if not text and exc.__cause__ is not None:
        text = str(exc.__cause__).strip()
    return text or type(exc).__name__
