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

import base64
import contextlib
import gzip
import http.client
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, List, Optional, Sequence, Set, \
    Tuple

from ..errors import LoadError, PrerequisiteError, RuntimeUnavailableError, UsageError
from ..files import IO_CHUNK
from ..format import BaseLayer, EntryHead, ImageRecord
from ..holdings import HeldImage, HeldLayer, Inventory
from ..naming import docker_tag
from ..oci import Platform, chain_ids, is_manifest_or_index
from ..reference import parse_reference
from ..rebuild import BASE_HINT, BaseTree, DirTree, verified_tar
from ..tarscan import normalise
from .tarstream import TarStream, ThreadedSink, blob_path

log = logging.getLogger(__name__)

DEFAULT_HOST = "unix:///var/run/docker.sock"
BASE_DRIVERS = ("overlay2", "vfs")  # graph drivers whose layer directories we can read

#: Opens a connected stream socket to the daemon (the one I/O seam; tests pass their own).
Dial = Callable[[], socket.socket]


class _Connection(http.client.HTTPConnection):
    def __init__(self, dial: Dial, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._dial = dial

    def connect(self) -> None:
        self.sock = self._dial()


class DockerAPI:
    """Minimal Engine API client for what import and report need."""

    def __init__(self, host: str = DEFAULT_HOST, timeout: float = 600.0,
                 dial: Optional[Dial] = None) -> None:
        if not host.startswith("unix://"):
            raise RuntimeUnavailableError(f"docker host {host!r} is not a unix socket",
                                          "pass --host unix:///path/to/docker.sock")
        self.host = host
        self.path = host[len("unix://"):]
        self.timeout = timeout
        self._dial = dial or self._dial_unix

    def _dial_unix(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def connection(self) -> _Connection:
        conn = _Connection(self._dial, self.timeout)
        try:
            conn.connect()
        except OSError as exc:
            raise RuntimeUnavailableError(f"docker daemon at {self.host} is unreachable: {exc}",
                                          "check --host and that dockerd is running") from None
        return conn

    def get_json(self, path: str) -> Any:
        """GET ``path``; the parsed JSON body, or None on 404."""
        status, body = self._request("GET", path)
        if status == 404:
            return None
        if status != 200:
            raise LoadError(f"docker API GET {path} returned {status}: {body[:200]!r}",
                            "check the docker daemon's logs")
        try:
            return json.loads(body)
        except ValueError:
            raise LoadError(f"docker API GET {path} answered something that is not JSON: "
                            f"{body[:100]!r}", f"check that {self.host} is a docker daemon") from None

    def delete(self, path: str) -> Tuple[int, Any]:
        """DELETE ``path``: the status and the parsed JSON body (None if not JSON).

        The caller judges the status: for an image, 404 (gone) and 409 (in use) are
        answers, not failures.
        """
        status, body = self._request("DELETE", path)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, None

    def _request(self, method: str, path: str) -> Tuple[int, bytes]:
        """One bodiless request on a fresh connection: its status and body."""
        log.debug("docker API: %s %s", method, path)
        conn = self.connection()
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise RuntimeUnavailableError(f"docker daemon at {self.host} failed: {exc}",
                                          "check that dockerd is running and healthy") from None
        finally:
            conn.close()


class _ChunkedBody:
    """Sends HTTP/1.1 chunked transfer encoding: small writes are coalesced, large
    pieces go out as their own chunk without being copied into a buffer first."""

    def __init__(self, conn: _Connection, coalesce: int = 64 * 1024) -> None:
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
    """Lines of ``{"stream": ...}`` / ``{"errorDetail": ...}``; raise on an error line.

    The daemon answers 200 before it has read the archive, so a failed load is an
    error *line* in a 200 response, not a status.
    """
    loaded = []
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if not isinstance(msg, dict):
            continue
        if "error" in msg or "errorDetail" in msg:
            detail = msg.get("errorDetail")
            text = detail.get("message") if isinstance(detail, dict) else None
            raise LoadError(f"docker refused the load: {text or msg.get('error')}",
                            "run `edgebundle report` to see what the device holds")
        stream = str(msg.get("stream", "")).strip()
        if stream:
            loaded.append(stream)
    return loaded


class DockerRuntime:
    kind = "docker"
    namespace: Optional[str] = None  # Docker has no namespaces

    def __init__(self, api: DockerAPI) -> None:
        self.api = api
        self._info: Optional[Tuple[str, str]] = None

    def inventory(self) -> Inventory:
        images = []
        chains: Set[str] = set()
        serves = self.reads_bases()  # once: a stat of the data root, not one per layer
        summaries = self.api.get_json("/images/json?all=1") or []
        if not isinstance(summaries, list):
            raise LoadError(f"docker API /images/json answered {type(summaries).__name__}, not a list",
                            f"check that {self.api.host} is a docker daemon")
        for summary in summaries:
            image_id = summary.get("Id") if isinstance(summary, dict) else None
            if not isinstance(image_id, str):
                continue
            detail = self.api.get_json(f"/images/{image_id}/json")
            if not isinstance(detail, dict):  # removed while we looked
                continue
            diff_ids = [str(d) for d in (detail.get("RootFS") or {}).get("Layers") or []]
            ids = chain_ids(diff_ids)
            chains.update(ids)
            plat = str(Platform(str(detail.get("Os") or ""), str(detail.get("Architecture") or ""),
                                str(detail.get("Variant") or "")).normalized())
            layers = tuple(HeldLayer(diff_id=d, unpacked=True,
                                     tar=serves and self._tar_split(c).is_file())
                           for d, c in zip(diff_ids, ids))
            for tag in summary.get("RepoTags") or []:
                name = _tag_name(tag)
                if name is not None:
                    images.append(HeldImage(name=name, config=image_id, platform=plat,
                                            complete=True, layers=layers))
        return Inventory(runtime="docker", images=tuple(images), chains=frozenset(chains))

    def loader(self, inv: Inventory, platform: str) -> "DockerLoader":
        return DockerLoader(self)

    def recover(self, wait: float) -> None:
        """Nothing to clean up after an interrupted import.

        dockerd reads the whole archive into a temp dir of its own before it registers
        anything, and removes that dir when the upload breaks off; once manifest.json
        has arrived it finishes the load even if we are gone (tags last). Tested with
        kills at every request and byte range (tests/integration/test_survival.py).
        """

    # -- delta bases: a layer's files in the daemon's graph driver -----------------

    def _storage(self) -> Tuple[str, str]:
        """(DockerRootDir, storage driver) from ``GET /info``, asked once."""
        if self._info is None:
            try:
                info = self.api.get_json("/info")
            except LoadError as exc:  # an odd daemon: it still imports, it serves no bases
                log.info("docker /info unreadable (%s): no delta bases", exc.message)
                info = None
            info = info if isinstance(info, dict) else {}
            self._info = (str(info.get("DockerRootDir") or ""), str(info.get("Driver") or ""))
        return self._info

    def reads_bases(self) -> bool:
        root, driver = self._storage()
        return bool(root) and driver in BASE_DRIVERS and os.path.isdir(root)

    def base_tree(self, chain_id: str, diff_id: str) -> BaseTree:
        """The layer's own directory: overlay2 ``diff``, or vfs's (whole-tree) ``dir``.

        Found through the layer store (``image/<driver>/layerdb/sha256/<chain>``), whose
        ``diff`` file must name ``diff_id``: a recycled or foreign directory is refused.
        """
        root, driver = self._storage()

        def unservable(why: str) -> PrerequisiteError:
            return PrerequisiteError(f"docker cannot serve layer {diff_id} (chain {chain_id}) as "
                                     f"a delta base: {why}", [chain_id], BASE_HINT)

        if driver not in BASE_DRIVERS:
            raise unservable(f"storage driver {driver or 'unknown'} is not one of "
                             f"{', '.join(BASE_DRIVERS)}")
        layerdb = Path(root) / "image" / driver / "layerdb" / "sha256" / chain_id[7:]
        try:
            recorded = (layerdb / "diff").read_text().strip()
            cache_id = (layerdb / "cache-id").read_text().strip()
        except OSError as exc:
            raise unservable(f"{layerdb} is unreadable ({exc.strerror})") from None
        if recorded != diff_id or not cache_id or "/" in cache_id or cache_id.startswith("."):
            raise unservable(f"its layer store entry names {recorded[:80]!r}")
        path = Path(root) / driver / cache_id / "diff" if driver == "overlay2" else \
            Path(root) / "vfs" / "dir" / cache_id
        return DirTree(path, f"docker layer {path}")

    def _tar_split(self, chain_id: str) -> Path:
        root, driver = self._storage()
        return Path(root) / "image" / driver / "layerdb" / "sha256" / chain_id[7:] / \
            "tar-split.json.gz"

    @contextlib.contextmanager
    def base_tar(self, base: BaseLayer, inv: Inventory) -> Iterator[BinaryIO]:
        """The layer's exact tar: tar-split's recorded headers around the layer dir's files.

        This is how ``docker save`` rebuilds a layer byte for byte; we verify it against
        the diff_id before a delta uses it.
        """
        tree = self.base_tree(base.chain_id, base.diff_id)
        path = self._tar_split(base.chain_id)
        describe = f"docker's tar-split {path}"
        try:
            with gzip.open(path, "rb") as fh:
                tar = verified_tar(tar_split_pieces(fh, tree, describe), base, describe)
        except (OSError, EOFError, ValueError) as exc:
            raise PrerequisiteError(f"{describe} cannot rebuild layer {base.diff_id}: {exc}",
                                    [base.chain_id], BASE_HINT) from None
        with tar:
            yield tar


def tar_split_pieces(lines: Iterable[bytes], tree: BaseTree, describe: str) -> Iterator[bytes]:
    """A layer tar from its tar-split record (vbatts/tar-split's JSON lines).

    Type 2 ("segment") entries are raw tar bytes (headers, padding, the end blocks),
    base64; type 1 ("file") entries name a member whose ``size`` bytes of contents (the
    key is left out when 0) come from the layer directory.
    """
    for raw in lines:
        if not raw.strip():
            continue
        entry = json.loads(raw)
        if not isinstance(entry, dict):
            raise ValueError("a tar-split line is not an object")
        kind = entry.get("type")
        if kind == _TAR_SPLIT_SEGMENT:
            payload = entry.get("payload")
            if payload:
                yield base64.b64decode(payload)
        elif kind == _TAR_SPLIT_FILE:
            size = entry.get("size", 0)
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"a tar-split file entry has size {size!r}")
            if size == 0:
                continue
            name = normalise(str(entry.get("name", "")))
            if name is None:
                raise ValueError(f"tar-split names an unusable path {entry.get('name')!r}")
            with tree.open(name) as fh:
                left = size
                while left:
                    piece = fh.read(min(IO_CHUNK, left))
                    if not piece:
                        raise ValueError(f"{name} in the layer dir is shorter than tar-split says")
                    left -= len(piece)
                    yield piece
        else:
            raise ValueError(f"unknown tar-split entry type {kind!r}")


_TAR_SPLIT_FILE = 1  # tar-split's storage.FileType
_TAR_SPLIT_SEGMENT = 2  # storage.SegmentType


def _tag_name(tag: object) -> Optional[str]:
    """A RepoTags entry as a normalised name; None for ``<none>:<none>`` and oddities."""
    if not isinstance(tag, str) or tag == "<none>:<none>":
        return None
    try:
        return str(parse_reference(tag))
    except UsageError:
        return None


class DockerLoader:
    """One ``POST /images/load`` request fed a streamed docker-archive."""

    def __init__(self, runtime: DockerRuntime) -> None:
        self.runtime = runtime
        self._conn: Optional[_Connection] = None
        self._body: Optional[_ChunkedBody] = None
        self._sink: Optional[ThreadedSink] = None
        self._tar: Optional[TarStream] = None

    def _ensure(self) -> TarStream:
        if self._tar is None:
            log.debug("docker API: POST /images/load?quiet=1 (streamed docker-archive)")
            conn = self.runtime.api.connection()
            try:
                conn.putrequest("POST", "/images/load?quiet=1")
                conn.putheader("Content-Type", "application/x-tar")
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
            except OSError as exc:  # the daemon went away between connect and request
                conn.close()
                raise RuntimeUnavailableError(f"docker daemon at {self.runtime.api.host} hung up: "
                                              f"{exc.strerror or exc}",
                                              "check that dockerd is running, then import again") from None
            self._conn = conn
            self._body = _ChunkedBody(conn)
            self._sink = ThreadedSink(self._body)
            self._tar = TarStream(self._sink)
        return self._tar

    def wants(self, head: EntryHead) -> bool:
        # Manifests and indexes mean nothing to docker load; configs and layers do.
        return head.delta is not None or not is_manifest_or_index(head.media_type or "")

    def add_rebuilt(self, diff_id: str, size: int, pieces: Iterator[bytes]) -> None:
        # docker load hashes every layer tar against the config's diff_ids itself, and
        # a rebuilt tar that is not its diff_id raises before manifest.json is sent.
        self.add(diff_id, size, pieces)

    def add(self, digest: str, size: int, pieces: Iterator[bytes]) -> None:
        tar = self._ensure()
        try:
            tar.add(blob_path(digest), size, pieces)
        except OSError as exc:  # the daemon hung up mid-archive
            raise LoadError(f"docker daemon at {self.runtime.api.host} closed the load stream: "
                            f"{exc.strerror or exc}",
                            "check that dockerd runs, its logs and free disk space; nothing was "
                            "loaded") from None

    def commit(self, records: Sequence[ImageRecord]) -> List[str]:
        tar = self._ensure()
        manifest = [{"Config": blob_path(rec.config.digest), "RepoTags": [docker_tag(rec.name)],
                     "Layers": [blob_path(layer.entry) for layer in rec.layers]}
                    for rec in records]
        assert self._body is not None and self._conn is not None and self._sink is not None
        try:
            tar.add_bytes("manifest.json", json.dumps(manifest).encode())
            tar.close()
            self._sink.close()
            self._body.close()
            resp = self._conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise LoadError(f"docker load failed: {exc}",
                            "check the docker daemon's logs and free disk space") from None
        finally:
            self._conn.close()
            self._conn = None
        if resp.status != 200:
            raise LoadError(f"docker load returned HTTP {resp.status}: {body[:300]!r}",
                            "check the docker daemon's logs")
        for line in parse_load_response(body):
            log.info("docker: %s", line)
        return [rec.name for rec in records]

    def abort(self) -> None:
        """Drop the connection mid-archive: the daemon sees a broken tar and loads nothing."""
        if self._conn is not None:
            if self._conn.sock is not None:
                try:
                    self._conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            if self._sink is not None:
                self._sink.abort()
            self._conn.close()
            self._conn = None
