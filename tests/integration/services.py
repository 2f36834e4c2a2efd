"""Start and stop real services on loopback for integration tests.

Every service lives entirely inside a caller-supplied temp dir (data, sockets,
pid files, logs) so tests never touch the system-wide containerd / dockerd /
sshd, and ``stop()`` only signals the PID we spawned ourselves (plus
containerd shims that carry *our* socket path on their command line).

No pytest import here: the module is usable from scripts and fixtures alike.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

START_TIMEOUT = 30.0  # seconds a service gets to become ready
STOP_TIMEOUT = 15.0  # seconds between SIGTERM and SIGKILL

# Variables that would silently redirect docker/ctr/ssh clients to some
# other (system-wide) daemon or agent.
SCRUBBED_ENV = (
    "DOCKER_HOST",
    "DOCKER_CONTEXT",
    "DOCKER_TLS_VERIFY",
    "DOCKER_CERT_PATH",
    "CONTAINERD_ADDRESS",
    "CONTAINERD_NAMESPACE",
    "CONTAINERD_SNAPSHOTTER",
    "SSH_AUTH_SOCK",
)


class ServiceError(RuntimeError):
    """A service did not come up; the message carries the log tail."""


def clean_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """os.environ minus variables that point clients at foreign daemons."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    """Let the kernel pick an unused loopback port (small race, acceptable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def docker_cli() -> str:
    """The docker CLI matching the Debian daemon.

    This machine also has a newer /usr/local/bin/docker earlier in PATH; it
    works against the 20.10 daemon via API negotiation, but the packaged CLI
    is the one we know matches.
    """
    if os.path.exists("/usr/bin/docker"):
        return "/usr/bin/docker"
    found = shutil.which("docker")
    if not found:
        raise ServiceError("docker CLI not found")
    return found


def _require(binary: str) -> str:
    path = shutil.which(binary) or (binary if os.path.isabs(binary) and os.path.exists(binary) else None)
    if not path:
        raise ServiceError(f"{binary} not found (install the Debian package providing it)")
    return path


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _spawn(argv: list[str], log: Path, env: Optional[Mapping[str, str]] = None) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        # New session: a Ctrl-C aimed at pytest must not kill daemons before
        # their fixtures' finalizers run (and vice versa).
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else clean_env(),
            start_new_session=True,
        )


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM our PID, wait, SIGKILL if needed, reap."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)
    except ProcessLookupError:
        pass


def _wait_ready(
    name: str, proc: subprocess.Popen[bytes], log: Path, probe: Callable[[], bool], timeout: float = START_TIMEOUT
) -> None:
    """Poll ``probe`` until true; fail fast if the process died."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if proc.poll() is not None:
            raise ServiceError(f"{name} exited with {proc.returncode} during startup; log tail:\n{_log_tail(log)}")
        try:
            if probe():
                return
        except Exception:  # probe errors just mean "not ready yet"
            pass
        if time.monotonic() > deadline:
            _terminate(proc)
            raise ServiceError(f"{name} not ready after {timeout:.0f}s; log tail:\n{_log_tail(log)}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def _unix_connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def _kill_shims(marker: str) -> None:
    """Kill containerd shims whose argv mentions ``marker`` (our socket path).

    Shims re-parent to init, so they outlive containerd; they're still ours
    because they were started with ``-address <our socket>``.
    """
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"containerd-shim" in argv[0] and marker.encode() in argv:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


# --------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class Registry:
    host: str  # "127.0.0.1:PORT", plain HTTP unless started with tls=
    port: int
    pid: int
    root: Path  # filesystem storage root
    config_path: Path
    log_path: Path
    username: Optional[str] = None  # set when started with auth=True
    password: Optional[str] = None
    _proc: subprocess.Popen[bytes] = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def stop(self) -> None:
        _terminate(self._proc)


def _bcrypt_hash(password: str) -> str:
    """bcrypt hash for distribution's htpasswd (it accepts only bcrypt).

    ``bcrypt`` is already installed as a paramiko dependency; the stdlib
    ``crypt`` fallback works on glibc/libxcrypt (Debian 12) for Python < 3.13.
    """
    try:
        import bcrypt

        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    except ImportError:
        import crypt  # noqa: deprecated, gone in 3.13; fallback only

        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 4))


@dataclass(frozen=True)
class TokenAuth:
    """``auth: token`` settings: the realm clients are sent to and what the JWTs carry.

    ``rootcertbundle`` holds the certificate whose key signs the tokens (the token
    server puts it in the JWT's ``x5c``); see tests/integration/tokenserver.py.
    """

    realm: str
    service: str
    issuer: str
    rootcertbundle: Path


def start_registry(tmp: Path, *, auth: bool = False, username: str = "edge", password: Optional[str] = None,
                   token: Optional[TokenAuth] = None, tls: Optional["ServerCert"] = None,
                   client_cas: tuple[Path, ...] = (), storage: Optional[Path] = None) -> Registry:
    """``docker-registry serve`` (distribution 2.x) on 127.0.0.1, plain HTTP.

    With ``auth=True`` the registry requires HTTP basic auth (htpasswd); with ``token``
    it requires bearer tokens from that realm (distribution's token auth). With ``tls``
    it serves HTTPS with that certificate (``issue_cert``), and with ``client_cas`` it
    requires client certificates signed by one of them (``http.tls.clientcas``).
    ``storage``: serve this filesystem storage root (e.g. another registry's, or one
    images were pushed to without auth: imagefactory pushes with basic auth only)
    instead of a fresh one.
    """
    binary = _require("docker-registry")
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    root = Path(storage) if storage is not None else tmp / "storage"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # JSON is valid YAML, so no YAML library is needed.
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }
    if tls is not None:
        http_cfg = config["http"]
        assert isinstance(http_cfg, dict)
        http_cfg["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}
        if client_cas:
            http_cfg["tls"]["clientcas"] = [str(p) for p in client_cas]
    if auth:
        password = password or secrets.token_hex(8)
        htpasswd = tmp / "htpasswd"
        htpasswd.write_text(f"{username}:{_bcrypt_hash(password)}\n")
        config["auth"] = {"htpasswd": {"realm": "edgebundle-test", "path": str(htpasswd)}}
    elif token is not None:
        config["auth"] = {"token": {"realm": token.realm, "service": token.service, "issuer": token.issuer,
                                    "rootcertbundle": str(token.rootcertbundle)}}
    cfg = tmp / "config.yml"
    cfg.write_text(json.dumps(config, indent=2))
    log = tmp / "registry.log"
    proc = _spawn([binary, "serve", str(cfg)], log)

    def probe() -> bool:
        if tls is not None:
            # A TLS handshake that reaches the registry's certificate is "ready" (with
            # clientcas it then refuses us, which is the point of that registry).
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                # Not verifying: an expired or misnamed certificate is what some tests serve.
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                try:
                    with ctx.wrap_socket(raw) as conn:
                        conn.getpeercert()
                except ssl.SSLError as exc:
                    if client_cas and "certificate" in str(exc).lower():
                        return True
                    raise
                return True
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/")
        if auth:
            basic = base64.b64encode(f"{username}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {basic}")
        # Bypass any proxy settings: traffic must stay on loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(req, timeout=2) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError as exc:
            # A token registry answers /v2/ with a Bearer challenge once it serves.
            return token is not None and exc.code == 401 and \
                exc.headers.get("WWW-Authenticate", "").startswith("Bearer ")

    _wait_ready("docker-registry", proc, log, probe)
    return Registry(
        host=f"127.0.0.1:{port}",
        port=port,
        pid=proc.pid,
        root=root,
        config_path=cfg,
        log_path=log,
        username=username if auth else None,
        password=password if auth else None,
        _proc=proc,
        scheme="https" if tls is not None else "http",
    )


# --------------------------------------------------------------------------
# a private CA (TLS registries, client certificates)


@dataclass(frozen=True)
class ServerCert:
    cert: Path  # PEM certificate
    key: Path  # PEM key, unencrypted
    ca: Path  # the CA certificate that signed it


@dataclass
class CertAuthority:
    """A private CA made with ``cryptography`` (a paramiko dependency), for tests only."""

    cert: Path
    _key: object = field(repr=False)
    _name: object = field(repr=False)

    def issue(self, directory: Path, stem: str, *, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ("127.0.0.1",),
              client: bool = False, days: int = 2) -> ServerCert:
        """A certificate for ``dns``/``ips`` (server) or a client certificate, as
        ``directory/stem.{cert,key}``; ``days`` negative makes an expired one."""
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        start, end = (now - datetime.timedelta(days=3), now - datetime.timedelta(days=1)) if days < 0 else \
            (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days))
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
                   .issuer_name(self._name)  # type: ignore[arg-type]
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False))
        if not client:
            names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
            names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())  # type: ignore[arg-type]
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{stem}.cert", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return ServerCert(cert_path, key_path, self.cert)


def make_ca(directory: Path, name: str = "edgebundle test CA") -> CertAuthority:
    """A self-signed CA; its certificate is ``directory/ca.crt``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertAuthority(path, key, subject)


# --------------------------------------------------------------------------
# a CONNECT proxy and a silent server (in-process threads, loopback only)


@dataclass
class ConnectProxy:
    """An HTTP proxy on 127.0.0.1: CONNECT tunnels and absolute-URI forwarding.

    ``names`` maps host names only the proxy knows to 127.0.0.1 (so a client that
    reaches them went through the proxy); anything that is not loopback is refused
    (403), so no test traffic leaves the machine. ``requests`` lists what it was
    asked: ``"CONNECT host:port"`` or ``"GET http://..."``.
    """

    port: int
    names: dict[str, str]
    requests: list[str] = field(default_factory=list)
    _server: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]


def start_connect_proxy(names: Optional[Mapping[str, str]] = None, *,
                        tls: Optional[ServerCert] = None) -> ConnectProxy:
    """``ConnectProxy`` in a thread; with ``tls`` clients speak TLS to the proxy itself
    (an ``https://`` proxy URL), CONNECT tunnels then carrying TLS inside TLS."""
    import select
    import socketserver
    import threading

    proxy = ConnectProxy(0, dict(names or {}))
    server_ctx: Optional[ssl.SSLContext] = None
    if tls is not None:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(str(tls.cert), str(tls.key))

    def target(authority: str) -> tuple[str, int]:
        host, _, port = authority.rpartition(":")
        host = host.strip("[]")
        host = proxy.names.get(host, host)
        if host not in ("127.0.0.1", "localhost"):
            raise PermissionError(authority)
        return "127.0.0.1", int(port)

    def pipe(a: socket.socket, b: socket.socket) -> None:
        socks = [a, b]
        while True:
            # TLS may hold decrypted bytes select() cannot see.
            ready = [s for s in socks if isinstance(s, ssl.SSLSocket) and s.pending()]
            if not ready:
                ready, _, _ = select.select(socks, [], [], 30)
            if not ready:
                return
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                (b if s is a else a).sendall(data)

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            conn: socket.socket = self.request
            if server_ctx is not None:
                try:
                    conn = server_ctx.wrap_socket(conn, server_side=True)
                except (ssl.SSLError, OSError):
                    proxy.requests.append("TLS handshake failed")
                    return
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, uri, _ = line.split(" ", 2)
            proxy.requests.append(f"{method} {uri}")
            try:
                if method == "CONNECT":
                    upstream = socket.create_connection(target(uri), timeout=10)
                    conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    rest = head.split(b"\r\n\r\n", 1)[1]
                else:
                    authority = uri.split("://", 1)[1].split("/", 1)[0]
                    if ":" not in authority:
                        authority += ":80"
                    upstream = socket.create_connection(target(authority), timeout=10)
                    rest = head  # Go's server takes absolute-URI requests as they are
            except (PermissionError, OSError, ValueError):
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            with upstream:
                if rest:
                    upstream.sendall(rest)
                pipe(conn, upstream)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), Handler)
    proxy.port = int(server.server_address[1])
    proxy._server = server
    threading.Thread(target=server.serve_forever, name="connect-proxy", daemon=True).start()
    return proxy


@dataclass
class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers (an i/o timeout)."""

    port: int
    _sock: socket.socket = field(repr=False)
    _held: list[socket.socket] = field(default_factory=list, repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        for s in self._held:
            s.close()
        self._sock.close()


def start_silent_server() -> SilentServer:
    import threading

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = SilentServer(int(sock.getsockname()[1]), sock)

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            server._held.append(conn)

    threading.Thread(target=accept, name="silent-server", daemon=True).start()
    return server


# --------------------------------------------------------------------------
# containerd


@dataclass(frozen=True)
class Containerd:
    address: str  # grpc unix socket path (pass as ctr --address / -a)
    root: Path
    state: Path
    pid: int
    snapshotter: str  # "overlayfs" or "native" (pass to ctr run/pull --snapshotter)
    config_path: Path
    log_path: Path
    ctr: str = "ctr"
    _proc: subprocess.Popen[bytes] = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def ctr_argv(self, namespace: str = "default") -> list[str]:
        """Prefix for ctr commands against this instance."""
        return [self.ctr, "--address", self.address, "--namespace", namespace]

    def env(self) -> dict[str, str]:
        # ctr reads CONTAINERD_SNAPSHOTTER as the default for pull/import/run.
        return clean_env({"CONTAINERD_SNAPSHOTTER": self.snapshotter})

    def stop(self) -> None:
        _terminate(self._proc)
        _kill_shims(self.address)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # JSON string escaping is valid TOML basic-string escaping


def start_containerd(tmp: Path, *, snapshotter: Optional[str] = None,
                     root: Optional[Path] = None) -> Containerd:
    """A private containerd (config version 2) with everything under ``tmp``.

    ``root`` puts its data root (content store, snapshots, metadata) elsewhere, e.g.
    on a small tmpfs; by default it is ``tmp/root``.

    The CRI plugin is disabled (it would want CNI and a streaming port).
    The snapshotter is overlayfs when the overlayfs plugin loaded (it probes
    an overlay mount under its root at startup), else ``native``.
    """
    binary = _require("containerd")
    ctr = _require("ctr")
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    # unix socket paths are limited to 108 bytes; keep them short-ish.
    sock = tmp / "containerd.sock"
    if len(str(sock)) > 100:
        raise ServiceError(f"socket path too long for AF_UNIX: {sock}")
    root, state = Path(root) if root is not None else tmp / "root", tmp / "state"
    cfg = tmp / "config.toml"
    cfg.write_text(
        "\n".join(
            [
                "version = 2",
                f"root = {_toml_str(str(root))}",
                f"state = {_toml_str(str(state))}",
                'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",'
                ' "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",'
                ' "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]',
                "[grpc]",
                f"  address = {_toml_str(str(sock))}",
                "[ttrpc]",
                f"  address = {_toml_str(str(sock) + '.ttrpc')}",
                "[debug]",
                '  address = ""',  # empty = no debug socket
                '  level = "info"',
                "[metrics]",
                '  address = ""',  # empty = no metrics listener
                '[plugins."io.containerd.internal.v1.opt"]',
                f"  path = {_toml_str(str(tmp / 'opt'))}",
                "",
            ]
        )
    )
    log = tmp / "containerd.log"
    proc = _spawn([binary, "--config", str(cfg)], log)
    _wait_ready("containerd", proc, log, lambda: _ctr_answers(ctr, sock))

    if snapshotter is None:
        snapshotter = "overlayfs" if _plugin_ok(ctr, sock, "io.containerd.snapshotter.v1", "overlayfs") \
            else "native"
    return Containerd(
        address=str(sock),
        root=root,
        state=state,
        pid=proc.pid,
        snapshotter=snapshotter,
        config_path=cfg,
        log_path=log,
        ctr=ctr,
        _proc=proc,
    )


# --------------------------------------------------------------------------
# containerd with CRI (the image service kubelet and k3s use; namespace k8s.io)


_CRI_DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
)


def _cri_config(tmp: Path, snapshotter: str = "overlayfs") -> str:
    """config.toml (version 2) text for a private CRI-enabled containerd."""
    tmp = Path(tmp)
    sock = tmp / "containerd.sock"
    cri = '[plugins."io.containerd.grpc.v1.cri"]'
    return "\n".join(
        [
            "version = 2",
            f"root = {_toml_str(str(tmp / 'root'))}",
            f"state = {_toml_str(str(tmp / 'state'))}",
            "disabled_plugins = [" + ", ".join(_toml_str(p) for p in _CRI_DISABLED_PLUGINS) + "]",
            "[grpc]",
            f"  address = {_toml_str(str(sock))}",
            "[ttrpc]",
            f"  address = {_toml_str(str(sock) + '.ttrpc')}",
            "[debug]",
            '  address = ""',
            '  level = "info"',
            "[metrics]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml_str(str(tmp / 'opt'))}",
            cri,
            # streaming server (exec/attach/port-forward): loopback, kernel-picked port
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            "  disable_tcp_service = true",
            # sandbox netns bind-mounts under our state dir, not /var/run/netns
            "  netns_mounts_under_state_dir = true",
            "  disable_apparmor = true",
            "  enable_selinux = false",
            f"{cri[:-1]}.cni]",
            # empty private dirs: no network plugin, network simply not ready
            f"  bin_dir = {_toml_str(str(tmp / 'cni' / 'bin'))}",
            f"  conf_dir = {_toml_str(str(tmp / 'cni' / 'net.d'))}",
            f"{cri[:-1]}.containerd]",
            f"  snapshotter = {_toml_str(snapshotter)}",
            f"{cri[:-1]}.registry]",
            # hosts.toml dir (unused unless a test pulls through CRI)
            f"  config_path = {_toml_str(str(tmp / 'certs.d'))}",
            "",
        ]
    )


def _ctr_answers(ctr: str, sock: Path) -> bool:
    """The readiness probe of a private containerd: its socket accepts and ctr gets a version."""
    if not _unix_connectable(sock):
        return False
    r = subprocess.run([ctr, "--address", str(sock), "--connect-timeout", "2s", "version"],
                       env=clean_env(), capture_output=True, timeout=10)
    return r.returncode == 0


def _plugin_ok(ctr: str, sock: Path, kind: str, plugin_id: str) -> bool:
    """Whether ``ctr plugins ls`` (TYPE ID PLATFORMS STATUS) shows the plugin loaded."""
    r = subprocess.run([ctr, "--address", str(sock), "plugins", "ls"], env=clean_env(),
                       capture_output=True, text=True)
    for line in r.stdout.splitlines():
        cols = line.split()
        if len(cols) >= 3 and cols[0] == kind and cols[1] == plugin_id:
            return cols[-1] == "ok"
    return False


def start_containerd_cri(tmp: Path, *, snapshotter: Optional[str] = None) -> Containerd:
    """Like services.start_containerd, but with the CRI plugin enabled.

    The CRI runtime/image services are served on the same gRPC socket
    (``.address``) as runtime.v1.* (and v1alpha2); images are in namespace k8s.io.
    If ``snapshotter`` is None, overlayfs is tried first and, if the overlayfs
    plugin fails its mount probe, containerd is restarted with ``native``.
    """
    binary = _require("containerd")
    ctr = _require("ctr")
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    sock = tmp / "containerd.sock"
    if len(str(sock)) > 100:
        raise ServiceError(f"socket path too long for AF_UNIX: {sock}")
    for d in ("cni/bin", "cni/net.d", "certs.d"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    cfg = tmp / "config.toml"
    log = tmp / "containerd.log"

    def launch(snap: str) -> subprocess.Popen[bytes]:
        cfg.write_text(_cri_config(tmp, snap))
        proc = _spawn([binary, "--config", str(cfg)], log)
        _wait_ready("containerd (cri)", proc, log, lambda: _ctr_answers(ctr, sock))
        return proc

    snap = snapshotter or "overlayfs"
    proc = launch(snap)
    if snapshotter is None and not _plugin_ok(ctr, sock, "io.containerd.snapshotter.v1", "overlayfs"):
        _terminate(proc)
        snap = "native"
        proc = launch(snap)
    if not _plugin_ok(ctr, sock, "io.containerd.grpc.v1", "cri"):
        _terminate(proc)
        raise ServiceError(f"CRI plugin did not load; log tail:\n{_log_tail(log)}")
    # The CRI gRPC services are registered at once but answer "server is not
    # initialized yet" until the CRI plugin's init goroutine finishes.
    import cri  # tests/integration/cri.py: the CRI image service client (needs grpcio)

    _wait_ready("containerd CRI image service", proc, log, lambda: cri.ready(str(sock)))
    return Containerd(
        address=str(sock),
        root=tmp / "root",
        state=tmp / "state",
        pid=proc.pid,
        snapshotter=snap,
        config_path=cfg,
        log_path=log,
        ctr=ctr,
        _proc=proc,
    )


# --------------------------------------------------------------------------
# dockerd


@dataclass(frozen=True)
class Dockerd:
    host: str  # "unix:///.../docker.sock" (docker -H / DOCKER_HOST value)
    socket_path: Path
    pid: int
    data_root: Path
    exec_root: Path
    storage_driver: str
    log_path: Path
    containerd: Containerd  # the private containerd this dockerd uses
    docker: str = "/usr/bin/docker"
    _proc: subprocess.Popen[bytes] = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def docker_argv(self) -> list[str]:
        return [self.docker, "-H", self.host]

    def env(self) -> dict[str, str]:
        return clean_env()

    def stop(self) -> None:
        _terminate(self._proc)
        self.containerd.stop()


def _start_dockerd_once(tmp: Path, driver: str, cd: Containerd,
                        data_root: Optional[Path] = None) -> Dockerd:
    binary = _require("/usr/sbin/dockerd") if os.path.exists("/usr/sbin/dockerd") else _require("dockerd")
    sock = tmp / "docker.sock"
    data_root, exec_root = Path(data_root) if data_root is not None else tmp / "data", tmp / "exec"
    cfg = tmp / "daemon.json"
    cfg.write_text("{}\n")  # never pick up /etc/docker/daemon.json
    log = tmp / f"dockerd-{driver}.log"
    argv = [
        binary,
        "--config-file", str(cfg),
        "--data-root", str(data_root),
        "--exec-root", str(exec_root),
        "--pidfile", str(tmp / "docker.pid"),
        "-H", f"unix://{sock}",
        # Always our own containerd: without --containerd, dockerd 20.10
        # would use /run/containerd/containerd.sock if a system one runs.
        "--containerd", cd.address,
        "--iptables=false",
        "--ip6tables=false",
        "--ip-forward=false",
        "--ip-masq=false",
        "--bridge=none",
        "--storage-driver", driver,
    ]
    proc = _spawn(argv, log)
    docker = docker_cli()
    env = clean_env()

    def probe() -> bool:
        if not _unix_connectable(sock):
            return False
        r = subprocess.run([docker, "-H", f"unix://{sock}", "version"], env=env, capture_output=True, timeout=10)
        return r.returncode == 0

    _wait_ready(f"dockerd ({driver})", proc, log, probe)
    return Dockerd(
        host=f"unix://{sock}",
        socket_path=sock,
        pid=proc.pid,
        data_root=data_root,
        exec_root=exec_root,
        storage_driver=driver,
        log_path=log,
        containerd=cd,
        docker=docker,
        _proc=proc,
    )


def start_dockerd(tmp: Path, *, storage_drivers: tuple[str, ...] = ("overlay2", "vfs"),
                  data_root: Optional[Path] = None) -> Dockerd:
    """A private dockerd on a unix socket, no networking setup at all.

    Tries overlay2 first, then vfs (works everywhere, just slow/large).
    Containers must be run with ``--network none``. ``data_root`` puts its
    ``--data-root`` elsewhere (e.g. on a small tmpfs); by default ``tmp/data``.
    """
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    sock = tmp / "docker.sock"
    if len(str(sock)) > 100:
        raise ServiceError(f"socket path too long for AF_UNIX: {sock}")
    cd = start_containerd(tmp / "containerd")
    errors: list[str] = []
    try:
        for driver in storage_drivers:
            try:
                return _start_dockerd_once(tmp, driver, cd, data_root)
            except ServiceError as exc:
                errors.append(str(exc))
                # a failed attempt may leave a half-initialised data root (a mount
                # point given as data_root stays: only its contents go)
                shutil.rmtree(data_root if data_root is not None else tmp / "data",
                              ignore_errors=True)
    except BaseException:
        cd.stop()
        raise
    cd.stop()
    raise ServiceError("dockerd failed with every storage driver:\n" + "\n---\n".join(errors))


# --------------------------------------------------------------------------
# sshd


@dataclass(frozen=True)
class Sshd:
    port: int
    host_key_path: Path
    host_pubkey_line: str  # "ssh-ed25519 AAAA... comment" (for known_hosts)
    client_key_path: Path  # private key (OpenSSH format, no passphrase)
    pid: int
    config_path: Path
    log_path: Path
    user: str = "root"
    host: str = "127.0.0.1"
    _proc: subprocess.Popen[bytes] = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def known_hosts_line(self) -> str:
        key_type, key_b64 = self.host_pubkey_line.split()[:2]
        return f"[{self.host}]:{self.port} {key_type} {key_b64}"

    def stop(self) -> None:
        _terminate(self._proc)


def keygen(path: Path, comment: str) -> None:
    """An ed25519 key pair without passphrase: ``path`` and ``path.pub``."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        env=clean_env(),
    )


def start_sshd(tmp: Path, *, client_key: Optional[Path] = None) -> Sshd:
    """OpenSSH sshd on 127.0.0.1:PORT accepting only one client key.

    The key is generated under ``tmp`` unless ``client_key`` (a private key whose
    ``.pub`` sits beside it) is given: a fleet of sshds then shares one client key,
    as a real fleet's gateways share the operator's key.
    """
    sshd_bin = "/usr/sbin/sshd"  # sshd refuses to re-exec unless started by absolute path
    if not os.path.exists(sshd_bin):
        raise ServiceError("/usr/sbin/sshd not found (install openssh-server)")
    _require("ssh-keygen")
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    # Privilege separation dir is hard-coded into Debian's sshd.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    host_key = tmp / "ssh_host_ed25519_key"
    generated = [host_key] if client_key is not None else [host_key, tmp / "client_ed25519"]
    for p in generated:
        for q in (p, p.with_name(p.name + ".pub")):
            q.unlink(missing_ok=True)
    keygen(host_key, "edgebundle-test-host")
    if client_key is None:
        client_key = tmp / "client_ed25519"
        keygen(client_key, "edgebundle-test-client")
    client_key = Path(client_key)
    authorized = tmp / "authorized_keys"
    authorized.write_text(client_key.with_name(client_key.name + ".pub").read_text())
    authorized.chmod(0o600)
    port = free_port()
    cfg = tmp / "sshd_config"
    cfg.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {tmp / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "UsePAM no",
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "AllowAgentForwarding no",
                "AllowTcpForwarding yes",  # tests may tunnel to a loopback registry
                "X11Forwarding no",
                "PrintMotd no",
                "UseDNS no",
                "LogLevel VERBOSE",
                "Subsystem sftp internal-sftp",
                "",
            ]
        )
    )
    log = tmp / "sshd.log"
    # -D: stay in foreground so the PID we hold is the listener; -E: log file.
    proc = _spawn([sshd_bin, "-D", "-f", str(cfg), "-E", str(log)], tmp / "sshd.stdout")

    def probe() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(64).startswith(b"SSH-")

    try:
        _wait_ready("sshd", proc, log, probe)
    except ServiceError as exc:
        raise ServiceError(f"{exc}\nstdout/stderr:\n{_log_tail(tmp / 'sshd.stdout')}") from None
    return Sshd(
        port=port,
        host_key_path=host_key,
        host_pubkey_line=host_key.with_name(host_key.name + ".pub").read_text().strip(),
        client_key_path=client_key,
        pid=proc.pid,
        config_path=cfg,
        log_path=log,
        _proc=proc,
    )


# --------------------------------------------------------------------------
# podman (no daemon: every command is one process on its own store)


#: Flags ``podman run`` needs on this kind of machine: no network setup, and rlimits the
#: container may set (podman's defaults exceed the hard limits here, and runc refuses them).
PODMAN_RUN_FLAGS = ("--network", "none", "--ulimit", "nofile=1024:1024",
                    "--ulimit", "nproc=1024:1024")


def podman_cmd(root: Path, runroot: Path, *, driver: str = "vfs") -> list[str]:
    """The argv prefix of a podman that uses only its own store under ``root``/``runroot``.

    Never the default store (/var/lib/containers): ``--root``/``--runroot`` and libpod's
    ``--tmpdir`` live under the caller's temp dir. ``vfs`` leaves no mount behind (the
    overlay driver bind-mounts its directory); ``runroot`` must be short (at most 50
    characters, podman's limit); events go to a file, not journald; cgroupfs,
    not systemd; runc, because crun refuses this machine's hybrid cgroup layout.
    """
    binary = _require("podman")
    root, runroot = Path(root), Path(runroot)
    if len(str(runroot)) > 50:  # podman refuses a longer one (its socket paths)
        raise ServiceError(f"podman's runroot may have at most 50 characters: {runroot}")
    tmpdir = runroot / "libpod-tmp"
    for d in (root, runroot, tmpdir):
        d.mkdir(parents=True, exist_ok=True)
    return [binary, "--root", str(root), "--runroot", str(runroot), "--tmpdir", str(tmpdir),
            "--storage-driver", driver, "--events-backend", "file",
            "--cgroup-manager", "cgroupfs", "--runtime", "runc"]
