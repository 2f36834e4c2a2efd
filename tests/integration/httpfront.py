"""A reverse proxy in front of a real registry that answers chosen requests itself.

What registries behind a gateway or CDN send and a plain docker-registry never does:
429 with ``Retry-After`` (Docker Hub's rate limit), 403 ``DENIED`` (Harbor, GitLab,
ECR policies). Every other request is forwarded unchanged to the registry, so auth,
manifests and blobs stay real. Each request is recorded with its arrival time, so a
test can check how long the client waited. No pytest import here.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional

# Hop-by-hop headers (RFC 7230 6.1) are the proxy's own business, never forwarded.
_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"})


@dataclass(frozen=True)
class Seen:
    """One request the front received."""

    time: float  # time.monotonic() at arrival
    path: str
    status: int  # what the front answered
    authorization: str = field(default="", repr=False)


@dataclass
class Rule:
    """Answer ``times`` requests whose path matches ``path_re`` with ``status`` (then forward)."""

    path_re: str
    status: int
    headers: Dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    times: int = 1
    authorized_only: bool = False  # only requests that carry a token (a policy, not the auth layer)


def registry_error(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


class HttpFront:
    """127.0.0.1:<port> -> 127.0.0.1:<target_port>; ``rules`` are checked first, in order."""

    def __init__(self, target_port: int, *, slow_re: str = "", delay: float = 0.0) -> None:
        """``slow_re``/``delay``: forward requests whose path matches only after ``delay``
        seconds (a slow link, so that a pack takes longer than a token lives)."""
        self.target_port = target_port
        self.slow_re = slow_re
        self.delay = delay
        self.rules: List[Rule] = []
        self.log: List[Seen] = []
        self._lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                front._handle(self)

            do_HEAD = do_GET

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self._httpd.serve_forever, name="http-front", daemon=True).start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def seen(self, path_re: str) -> List[Seen]:
        """The requests whose path matched ``path_re``, in arrival order."""
        with self._lock:
            return [s for s in self.log if re.search(path_re, s.path)]

    def _rule_for(self, path: str, authorized: bool) -> Optional[Rule]:
        with self._lock:
            for rule in self.rules:
                if rule.authorized_only and not authorized:
                    continue
                if rule.times > 0 and re.search(rule.path_re, path):
                    rule.times -= 1
                    return rule
        return None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        arrived = time.monotonic()
        rule = self._rule_for(h.path, bool(h.headers.get("Authorization")))
        if rule is None:
            if self.slow_re and re.search(self.slow_re, h.path):
                time.sleep(self.delay)
            self._forward(h, arrived)
            return
        # Recorded before the answer goes out: once the client has its answer, a test
        # may read the log at once (recording afterwards was a race, seen in CI).
        self._record(arrived, h, rule.status)
        h.send_response(rule.status)
        for k, v in rule.headers.items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(rule.body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(rule.body)

    def _record(self, arrived: float, h: BaseHTTPRequestHandler, status: int) -> None:
        with self._lock:
            self.log.append(Seen(arrived, h.path, status, h.headers.get("Authorization", "")))

    def _forward(self, h: BaseHTTPRequestHandler, arrived: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            conn.request(h.command, h.path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            self._record(arrived, h, resp.status)
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body)
        finally:
            conn.close()
