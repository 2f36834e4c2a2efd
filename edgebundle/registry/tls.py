"""Which certificates a registry connection uses, found the way Docker and Podman find them.

* ``<root>/<host[:port]>/`` under each certs.d root (``/etc/docker/certs.d``, then
  ``/etc/containers/certs.d``): every ``*.crt`` is a CA added to the system trust store
  (Docker adds, it never replaces), every ``*.cert`` a client certificate whose key is the
  ``*.key`` of the same name (Docker's rule: one without the other is an error).
* the manifest's ``ca_file`` / ``client_cert`` / ``client_key`` under ``registries:``
  add to that (a client pair there wins over a certs.d one).
* otherwise the system trust store (OpenSSL's default paths; ``SSL_CERT_FILE`` works).

The roots are an argument, never read from the environment here: the CLI passes
``certs_dirs_from_env()`` so tests can point them at a temp dir.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

from ..errors import ResolveError
from ..specs import RegistryConfig

DEFAULT_CERTS_DIRS: Tuple[str, ...] = ("/etc/docker/certs.d", "/etc/containers/certs.d")
CERTS_DIRS_ENV = "EDGEBUNDLE_CERTS_DIRS"


def certs_dirs_from_env(environ: Optional[Mapping[str, str]] = None) -> Tuple[str, ...]:
    """``EDGEBUNDLE_CERTS_DIRS`` (``:``-separated) if set, else Docker's and Podman's roots."""
    env = os.environ if environ is None else environ
    value = env.get(CERTS_DIRS_ENV, "")
    if not value.strip():
        return DEFAULT_CERTS_DIRS
    return tuple(p for p in value.split(os.pathsep) if p)


@dataclass(frozen=True)
class TlsFiles:
    """The certificate files one host's connections use (all absolute paths)."""

    host: str  # host[:port] as certs.d names its directory
    ca_files: Tuple[str, ...] = ()
    client_cert: Optional[str] = None
    client_key: Optional[str] = None
    certs_dirs: Tuple[str, ...] = ()  # the <root>/<host> directories that exist

    @property
    def has_client_cert(self) -> bool:
        return self.client_cert is not None


def host_dir(root: str, host: str) -> str:
    """``<root>/<host[:port]>``: the directory Docker reads for ``host``."""
    return os.path.join(root, host)


def find_tls_files(host: str, config: Optional[RegistryConfig], roots: Sequence[str]) -> TlsFiles:
    """The certificates for ``host`` from the certs.d ``roots`` and its manifest entry.

    Raises:
        ResolveError: a client certificate without its key or a key without its
            certificate (Docker refuses those too), or an unreadable directory.
    """
    cas: List[str] = []
    pair: Optional[Tuple[str, str]] = None
    dirs: List[str] = []
    for root in roots:
        d = host_dir(root, host)
        if not os.path.isdir(d):
            continue
        dirs.append(d)
        try:
            names = sorted(os.listdir(d))
        except OSError as exc:
            raise ResolveError(f"cannot read certificates directory {d} for registry {host}: "
                               f"{exc.strerror or exc}", f"make {d} readable for this user") from None
        for name in names:
            path = os.path.join(d, name)
            if name.endswith(".crt"):
                cas.append(path)
            elif name.endswith(".cert"):
                key = path[:-len(".cert")] + ".key"
                if not os.path.exists(key):
                    raise ResolveError(f"client certificate {path} for registry {host} has no key {key}",
                                       "put its key beside it; CA certificates must end in .crt")
                if pair is None:
                    pair = (path, key)  # Docker uses the first pair it finds
            elif name.endswith(".key"):
                cert = path[:-len(".key")] + ".cert"
                if not os.path.exists(cert):
                    raise ResolveError(f"client key {path} for registry {host} has no certificate {cert}",
                                       "put the client certificate beside it as .cert (CAs end in .crt)")
    if config is not None:
        if config.ca_file:
            cas.append(config.ca_file)
        if config.client_cert and config.client_key:
            pair = (config.client_cert, config.client_key)
    return TlsFiles(host, tuple(cas), pair[0] if pair else None, pair[1] if pair else None, tuple(dirs))


def ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """A verifying client context: system trust plus ``files``' CAs and client pair.

    Raises:
        ResolveError: a file that is missing or not PEM, naming it.
    """
    ctx = ssl.create_default_context()  # system trust store, hostname checks, TLS >= 1.2
    for ca in files.ca_files:
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ResolveError(f"cannot load CA certificate {ca} for registry {files.host}: {_why(exc)}",
                               "it must be a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    if files.client_cert and files.client_key:
        try:
            ctx.load_cert_chain(files.client_cert, files.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise ResolveError(f"cannot load client certificate {files.client_cert} with key "
                               f"{files.client_key} for registry {files.host}: {_why(exc)}",
                               "both must be PEM, the key unencrypted and matching the certificate") from None
    return ctx


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
