"""The Docker seam: the Engine API over its unix socket, with the stdlib only.

Docker's image store knows layers by diff_id chain, not by compressed blob, and
``docker load`` skips any layer whose chain already exists *without opening its file*.
So the docker-archive we stream to ``POST /images/load`` lists every layer in
manifest.json but carries only the files the daemon lacks. manifest.json is written
last: if the stream is cut before it, the daemon loads nothing.

Docker cannot record a registry digest on load, so an image pinned by digest is tagged
``repo:sha256-<hex>`` (a tag, so ``docker image prune`` keeps it); see FORMAT.md.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Iterator, List, Optional, Sequence, Set

from ..errors import LoadError, RuntimeUnavailableError
from ..model import (MT_DOCKER_CONFIG, MT_OCI_CONFIG, HeldImage, HeldLayer, Inventory, Platform,
                     chain_ids, docker_tag)
from ..reference import parse_reference
from .tarstream import TarStream, ThreadedSink, blob_path

DEFAULT_HOST = "unix:///var/run/docker.sock"
CONFIG_TYPES = {MT_DOCKER_CONFIG, MT_OCI_CONFIG}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class DockerAPI:
    """Minimal Engine API client for what import and report need."""

    def __init__(self, host: str = DEFAULT_HOST, timeout: float = 600.0) -> None:
        if not host.startswith("unix://"):
            raise RuntimeUnavailableError(f"docker host {host!r} is not a unix socket",
                                          "pass --host unix:///path/to/docker.sock")
        self.host = host
        self.path = host[len("unix://"):]
        self.timeout = timeout

    def connection(self) -> _UnixConnection:
        conn = _UnixConnection(self.path, self.timeout)
        try:
            conn.connect()
        except OSError as exc:
            raise RuntimeUnavailableError(f"docker daemon at {self.host} is unreachable: {exc}",
                                          "check --host and that dockerd is running") from None
        return conn

    def get_json(self, path: str) -> Any:
        conn = self.connection()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        except OSError as exc:
            raise RuntimeUnavailableError(f"docker daemon at {self.host} failed: {exc}") from None
        finally:
            conn.close()
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise LoadError(f"docker API GET {path} returned {resp.status}: {body[:200]!r}")
        return json.loads(body)

    def ping(self) -> None:
        self.get_json("/version")


class _ChunkedBody:
    """Sends HTTP/1.1 chunked transfer encoding: small writes are coalesced, large
    pieces go out as their own chunk without being copied into a buffer first."""

    def __init__(self, conn: _UnixConnection, coalesce: int = 64 * 1024) -> None:
        self._conn = conn
        self._buf = bytearray()
        self._coalesce = coalesce

    def _send(self, data: "bytes | bytearray") -> None:
        sock = self._conn.sock
        assert sock is not None
        sock.sendall(b"%x\r\n" % len(data))
        sock.sendall(data)
        sock.sendall(b"\r\n")

    def write(self, data: bytes) -> int:
        if len(data) >= self._coalesce:
            self._flush()
            self._send(data)
        else:
            self._buf += data
            if len(self._buf) >= self._coalesce:
                self._flush()
        return len(data)

    def _flush(self) -> None:
        if self._buf:
            self._send(self._buf)
            self._buf = bytearray()

    def close(self) -> None:
        self._flush()
        sock = self._conn.sock
        assert sock is not None
        sock.sendall(b"0\r\n\r\n")


def parse_load_response(body: bytes) -> List[str]:
    """Lines of ``{"stream": ...}`` / ``{"errorDetail": ...}``; raise on an error line."""
    loaded = []
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "error" in msg or "errorDetail" in msg:
            detail = msg.get("errorDetail", {}).get("message") or msg.get("error")
            raise LoadError(f"docker refused the load: {detail}",
                            "run `edgebundle report` to see what the device holds")
        stream = str(msg.get("stream", "")).strip()
        if stream:
            loaded.append(stream)
    return loaded


class DockerRuntime:
    kind = "docker"
    namespace = None

    def __init__(self, api: DockerAPI) -> None:
        self.api = api

    def inventory(self) -> Inventory:
        images = []
        chains: Set[str] = set()
        for summary in self.api.get_json("/images/json?all=1") or []:
            detail = self.api.get_json(f"/images/{summary['Id']}/json")
            if detail is None:  # removed while we looked
                continue
            diff_ids = list((detail.get("RootFS") or {}).get("Layers") or [])
            ids = chain_ids(diff_ids)
            chains.update(ids)
            plat = str(Platform(detail.get("Os", ""), detail.get("Architecture", ""),
                                detail.get("Variant", "") or "").normalized())
            layers = tuple(HeldLayer(diff_id=d, unpacked=True) for d in diff_ids)
            for tag in summary.get("RepoTags") or []:
                if tag == "<none>:<none>":
                    continue
                images.append(HeldImage(name=str(parse_reference(tag)), config=summary["Id"],
                                        platform=plat, complete=True, layers=layers))
        return Inventory(runtime="docker", images=tuple(images), chains=frozenset(chains))

    def loader(self, inv: Inventory, platform: str) -> "DockerLoader":
        return DockerLoader(self)


class DockerLoader:
    """One ``POST /images/load`` request fed a streamed docker-archive."""

    def __init__(self, runtime: DockerRuntime) -> None:
        self.runtime = runtime
        self._conn: Optional[_UnixConnection] = None
        self._body: Optional[_ChunkedBody] = None
        self._sink: Optional[ThreadedSink] = None
        self._tar: Optional[TarStream] = None

    def _ensure(self) -> TarStream:
        if self._tar is None:
            conn = self.runtime.api.connection()
            conn.putrequest("POST", "/images/load?quiet=1")
            conn.putheader("Content-Type", "application/x-tar")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            self._conn = conn
            self._body = _ChunkedBody(conn)
            self._sink = ThreadedSink(self._body)
            self._tar = TarStream(self._sink)
        return self._tar

    def wants(self, digest: str, media_type: Optional[str]) -> bool:
        # Manifests and indexes mean nothing to docker load; configs and layers do.
        return not (media_type and ("manifest" in media_type or "index" in media_type))

    def add(self, digest: str, size: int, pieces: Iterator[bytes]) -> None:
        self._ensure().add(blob_path(digest), size, pieces)

    def commit(self, records: Sequence[dict]) -> List[str]:
        tar = self._ensure()
        manifest = []
        for rec in records:
            layers = []
            for layer in rec["layers"]:
                entry = layer["diff_id"] if layer["form"] == "tar" else layer["digest"]
                layers.append(blob_path(entry))
            manifest.append({"Config": blob_path(rec["config"]["digest"]),
                             "RepoTags": [docker_tag(rec["name"])], "Layers": layers})
        tar.add_bytes("manifest.json", json.dumps(manifest).encode())
        tar.close()
        assert self._body is not None and self._conn is not None and self._sink is not None
        try:
            self._sink.close()
            self._body.close()
            resp = self._conn.getresponse()
            body = resp.read()
        except OSError as exc:
            raise LoadError(f"docker load failed: {exc}") from None
        finally:
            self._conn.close()
            self._conn = None
        if resp.status != 200:
            raise LoadError(f"docker load returned HTTP {resp.status}: {body[:300]!r}")
        parse_load_response(body)
        return [rec["name"] for rec in records]

    def abort(self) -> None:
        """Drop the connection mid-archive: the daemon sees a broken tar and loads nothing."""
        if self._conn is not None:
            try:
                self._conn.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
            except OSError:
                pass
            if self._sink is not None:
                self._sink.abort()
            self._conn.close()
            self._conn = None
