"""Models of containerd (behind ``ctr``) and dockerd (behind its Engine API socket).

They plug into the importer's real I/O seams: ``FakeContainerd`` is a
``containerd.Runner`` (it is handed ctr's argv and answers with ctr's exit codes and
output formats), ``FakeEngine.dial`` gives ``DockerAPI`` a socket whose far end speaks
HTTP/1.1 like dockerd. So ``Ctr``, ``ContainerdRuntime``, ``ContainerdLoader``,
``DockerAPI``, ``DockerRuntime`` and ``DockerLoader`` run unchanged; only the daemon is
modelled.

The models are written from the runtimes' observed behaviour (tests/fixtures/runtime,
recorded from containerd 1.6.20 and dockerd 20.10.24), not from edgebundle's code:
they parse the streams edgebundle sends (tar, HTTP chunked encoding) with independent
code (``tarfile``, a strict de-chunker) and keep their own state. They record every
command and request body so tests can check exactly what edgebundle sent.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from edgebundle.importer.containerd import Completed

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "runtime"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chains_of(diff_ids: Sequence[str]) -> List[str]:
    """OCI chain IDs, computed here independently of edgebundle."""
    out: List[str] = []
    for d in diff_ids:
        out.append(d if not out else sha(f"{out[-1]} {d}".encode()))
    return out


INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")

# ---------------------------------------------------------------------------
# containerd


IMAGES_HEADER = fixture("ctr_images_ls.txt").splitlines()[0]
CONTAINERS_HEADER = fixture("ctr_containers_ls_empty.stdout").splitlines()[0]
SNAPSHOTS_HEADER = fixture("ctr_snapshots_ls.txt").splitlines()[0]
VERSION_OUT = fixture("ctr_version.txt").encode()
PLUGINS_OUT = fixture("ctr_plugins_ls_d.txt")
PLUGINS_ROOT = "/tmp/space/rec/w/root"  # the data root of the recording's containerd


@dataclass
class CtrImport:
    """One ``ctr images import`` as containerd saw it."""

    argv: List[str]
    members: List[str] = field(default_factory=list)  # tar member names, in order
    index: Optional[Dict[str, Any]] = None  # the parsed index.json
    returncode: Optional[int] = None


class _ImportProcess:
    """What ``Popen`` gives the loader: stdin to write the tar to, then wait()."""

    def __init__(self, model: "FakeContainerd", argv: List[str], stderr: IO[bytes]) -> None:
        self._model = model
        self._argv = argv
        self._stderr = stderr
        self._buf = _Stdin()
        self.stdin: Optional[IO[bytes]] = self._buf  # type: ignore[assignment]
        self.returncode: Optional[int] = None
        self.record = CtrImport(argv)
        self.pid = 0  # no such process: the journal treats it as gone
        model.imports.append(self.record)
        # As ctr's client.Import: a lease (random id, 24 h) before reading stdin.
        self.lease = f"{len(model.imports)}000-fake"
        model.leases[self.lease] = "containerd.io/gc.expire=2026-12-02T00:00:00Z"
        if model.on_import_start is not None:
            model.on_import_start(model)  # e.g. another client's lease, created meanwhile

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            self._model.stdin_sizes.append(len(self._buf.data()))
            code, err = self._model._import(self._buf.data(), self._argv, self.record)
            self._stderr.write(err)
            self._stderr.flush()
            self.returncode = self.record.returncode = code
            self._model.leases.pop(self.lease, None)  # its deferred done(), error or not
        return self.returncode

    def kill(self) -> None:
        # Killed before exit: containerd never saw the end of the stream, and ctr's
        # lease outlives it.
        if self.returncode is None:
            self.returncode = self.record.returncode = -9
        self._buf.broken = True


class _Stdin(io.RawIOBase):
    def __init__(self) -> None:
        super().__init__()
        self._chunks: List[bytes] = []
        self.broken = False
        self.stop_after: Optional[int] = None  # bytes ctr reads before it dies
        self.on_death: Optional[Callable[[], None]] = None
        self._seen = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.broken:
            raise BrokenPipeError(32, "Broken pipe")
        data = bytes(data)
        if self.stop_after is not None and self._seen + len(data) > self.stop_after:
            self.broken = True
            if self.on_death is not None:
                self.on_death()
            raise BrokenPipeError(32, "Broken pipe")
        self._seen += len(data)
        self._chunks.append(data)
        return len(data)

    def data(self) -> bytes:
        return b"".join(self._chunks)


class FakeContainerd:
    """One containerd namespace as ``ctr`` shows it; a ``Runner`` for ``Ctr``.

    Knobs: ``after_import(model)`` runs once an import has finished (a concurrent GC,
    say); ``import_dies_after`` makes ctr stop reading stdin after that many bytes.
    """

    def __init__(self, namespace: str = "k8s.io", snapshotter: str = "overlayfs") -> None:
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.content: Dict[str, bytes] = {}
        self.images: Dict[str, Tuple[str, str]] = {}  # name -> (media type, target digest)
        self.snapshots: Set[str] = set()  # committed chain IDs
        self.calls: List[List[str]] = []  # every argv after --namespace NS
        self.imports: List[CtrImport] = []
        self.after_import: Optional[Callable[["FakeContainerd"], None]] = None
        self.import_dies_after: Optional[int] = None
        self.history: List[Tuple[str, ...]] = []  # (event, detail) in order
        self.root: Optional[str] = None  # data root `plugins ls -d` reports (None: as recorded)
        # the disk fills while a layer is extracted: what ctr then says (containerd 1.6)
        self.unpack_fails_with: Optional[str] = None
        self.leases: Dict[str, str] = {}  # id -> labels column of `ctr leases ls`
        self.collections = 0  # synchronous garbage collections asked for
        self.stdin_sizes: List[int] = []  # bytes each finished import read
        self.on_import_start: Optional[Callable[["FakeContainerd"], None]] = None
        self.import_killed_after: Optional[int] = None  # ctr SIGKILLed after that many bytes
        self.containers: Dict[str, str] = {}  # container id -> the image name it was made from

    # -- the Runner protocol -----------------------------------------------------

    def _args(self, argv: Sequence[str]) -> List[str]:
        argv = list(argv)
        i = argv.index("--namespace")
        assert argv[i + 1] == self.namespace, argv
        assert "--address" in argv, argv
        return argv[i + 2:]

    def run(self, argv: Sequence[str], input: Optional[bytes], timeout: float) -> Completed:
        args = self._args(argv)
        self.calls.append(args)
        if args == ["version"]:
            return Completed(0, VERSION_OUT, b"")
        if args == ["images", "ls"]:
            return Completed(0, self._images_ls().encode(), b"")
        if args == ["plugins", "ls", "-d"]:
            text = PLUGINS_OUT if self.root is None else PLUGINS_OUT.replace(PLUGINS_ROOT, self.root)
            return Completed(0, text.encode(), b"")
        if args == ["content", "ls", "-q"]:
            return Completed(0, "".join(d + "\n" for d in sorted(self.content)).encode(), b"")
        if args[:1] == ["snapshots"] and args[-1] == "ls":
            assert args[1:3] == ["--snapshotter", self.snapshotter], args
            return Completed(0, self._snapshots_ls().encode(), b"")
        if args[:2] == ["content", "get"]:
            data = self.content.get(args[2])
            if data is None:
                return Completed(1, b"", f"ctr: content digest {args[2]}: not found\n".encode())
            return Completed(0, data, b"")
        if args[:3] == ["images", "tag", "--force"]:
            src, dst = args[3], args[4]
            if src not in self.images:
                return Completed(1, b"", f'ctr: image "{src}": not found\n'.encode())
            self.images[dst] = self.images[src]
            self.history.append(("tag", src, dst))
            return Completed(0, (dst + "\n").encode(), b"")
        if args == ["leases", "ls"]:
            rows = ["ID CREATED AT LABELS "]
            rows += [f"{k} 2026-12-01T00:00:00Z {v} " for k, v in sorted(self.leases.items())]
            return Completed(0, ("\n".join(rows) + "\n").encode(), b"")
        if args[:2] == ["leases", "create"]:
            lease = args[args.index("--id") + 1]
            self.leases[lease] = ",".join(a for a in args[2:] if "=" in a)
            return Completed(0, (lease + "\n").encode(), b"")
        if args[:2] == ["leases", "rm"]:
            ids = [a for a in args[2:] if a != "--sync"]
            for lease in ids:
                if self.leases.pop(lease, None) is None:
                    return Completed(1, b"", f"ctr: lease {lease!r}: not found\n".encode())
                self.history.append(("lease-rm", lease))
            if "--sync" in args:
                self.collections += 1
            return Completed(0, b"", b"")
        if args == ["containers", "ls"]:
            # As recorded: tab-aligned columns, the image name a container was created
            # from (ctr images rm removes it all the same: containerd does not refuse).
            rows = [CONTAINERS_HEADER]
            rows += [f"{cid}    {image}    io.containerd.runc.v2    "
                     for cid, image in sorted(self.containers.items())]
            return Completed(0, ("\n".join(rows) + "\n").encode(), b"")
        if args[:2] == ["images", "rm"]:
            if "--sync" in args:
                self.collections += 1
                args = [a for a in args if a != "--sync"]
            err = b""
            for name in args[2:]:
                if self.images.pop(name, None) is None:
                    err += f'time="x" level=warning msg="{name}: image not found"\n'.encode()
                else:
                    self.history.append(("rm", name))
            return Completed(0, "".join(n + "\n" for n in args[2:]).encode(), err)
        raise AssertionError(f"ctr called with unexpected arguments {args}")

    def start(self, argv: Sequence[str], stderr: IO[bytes]) -> _ImportProcess:
        args = self._args(argv)
        self.calls.append(args)
        assert args[:2] == ["images", "import"] and args[-1] == "-", args
        proc = _ImportProcess(self, list(argv), stderr)
        proc._buf.stop_after = self.import_dies_after
        if self.import_killed_after is not None:
            proc._buf.stop_after = self.import_killed_after
            proc._buf.on_death = proc.kill  # killed: no deferred done(), the lease stays
        return proc

    # -- output formats (as recorded) -------------------------------------------------

    def _images_ls(self) -> str:
        rows = [IMAGES_HEADER]
        for name, (media_type, digest) in sorted(self.images.items()):
            rows.append(f"{name} {media_type} {digest} 2.5 MiB linux/amd64 -      ")
        return "\n".join(rows) + "\n"

    def _snapshots_ls(self) -> str:
        rows = [SNAPSHOTS_HEADER]
        rows += [f"{key} sha256:{'0' * 64} Committed " for key in sorted(self.snapshots)]
        rows.append(f"rec-active sha256:{'1' * 64} Active    ")
        return "\n".join(rows) + "\n"

    # -- what containerd does with an import -------------------------------------------

    def _import(self, data: bytes, argv: List[str], record: CtrImport) -> Tuple[int, bytes]:
        platform = argv[argv.index("--platform") + 1]
        try:
            tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
            members = tar.getmembers()
        except (tarfile.TarError, EOFError):
            return 1, b"ctr: failed to ingest: unexpected EOF\n"
        record.members = [m.name for m in members]
        for m in members:
            body = tar.extractfile(m)
            raw = body.read() if body is not None else b""
            if m.name.startswith("blobs/sha256/"):
                digest = "sha256:" + m.name.rsplit("/", 1)[1]
                if sha(raw) != digest:
                    return 1, f'ctr: failed to ingest "{m.name}": unexpected commit digest\n'.encode()
                self.content[digest] = raw
            elif m.name == "index.json":
                record.index = json.loads(raw)
        if record.index is None:
            return 1, b"ctr: unrecognized image format\n"
        for desc in record.index["manifests"]:
            name = desc["annotations"]["io.containerd.image.name"]
            if desc["digest"] not in self.content:
                return 1, f"ctr: content digest {desc['digest']}: not found\n".encode()
            # containerd records the image first, then unpacks (a failed unpack leaves it).
            self.images[name] = (desc["mediaType"], desc["digest"])
            self.history.append(("create", name))
            problem = self._unpack(desc, platform)
            if problem:
                return 1, f"ctr: {problem}\n".encode()
        if self.after_import is not None:
            self.after_import(self)
        return 0, b""

    def _unpack(self, desc: Dict[str, Any], platform: str) -> Optional[str]:
        manifest_desc = desc
        if desc["mediaType"] in INDEX_TYPES:
            index = json.loads(self.content[desc["digest"]])
            os_, arch = platform.split("/")[:2]
            picks = [m for m in index["manifests"]
                     if m.get("platform", {}).get("os") == os_
                     and m.get("platform", {}).get("architecture") == arch]
            if not picks:
                return None  # nothing for this platform: nothing to unpack
            manifest_desc = picks[0]
        if manifest_desc["digest"] not in self.content:
            return f"content digest {manifest_desc['digest']}: not found"
        manifest = json.loads(self.content[manifest_desc["digest"]])
        config = json.loads(self.content[manifest["config"]["digest"]])
        diff_ids = config["rootfs"]["diff_ids"]
        for layer, chain in zip(manifest["layers"], chains_of(diff_ids)):
            if chain in self.snapshots:
                continue
            if layer["digest"] not in self.content:
                return (f"failed to extract layer {chain}: failed to get reader from content "
                        f"store: content digest {layer['digest']}: not found")
            if self.unpack_fails_with is not None:
                return f"failed to extract layer {chain}: {self.unpack_fails_with}"
            self.snapshots.add(chain)
        return None

    # -- helpers for tests ------------------------------------------------------------

    def real_names(self) -> Set[str]:
        return {n for n in self.images if not n.startswith("import.edgebundle.invalid/")}


# ---------------------------------------------------------------------------
# dockerd


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: Dict[str, str]
    body: bytes
    chunked: bool


class ChunkError(AssertionError):
    """The client's chunked transfer encoding is malformed."""


class ClientGone(Exception):
    """The client closed the connection before the request was complete (an abort)."""


def read_request(rfile: IO[bytes], first: Optional[bytes] = None) -> HttpRequest:
    """Parse one HTTP/1.1 request; chunked bodies are de-chunked strictly (RFC 9112 7.1)."""
    line = (first if first is not None else rfile.readline()).decode("latin-1").rstrip("\r\n")
    method, path, version = line.split(" ")
    assert version == "HTTP/1.1", line
    headers: Dict[str, str] = {}
    while True:
        h = rfile.readline().decode("latin-1")
        if h in ("\r\n", "\n", ""):
            break
        k, _, v = h.partition(":")
        headers[k.strip().lower()] = v.strip()
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"
    if chunked:
        body = bytearray()
        while True:
            size_line = rfile.readline()
            if not size_line:
                raise ClientGone("connection closed between chunks")
            if not size_line.endswith(b"\r\n"):
                raise ChunkError(f"chunk size line {size_line!r} does not end in CRLF")
            try:
                n = int(size_line[:-2].split(b";")[0], 16)
            except ValueError:
                raise ChunkError(f"chunk size {size_line!r} is not hex") from None
            if n == 0:
                if rfile.readline() != b"\r\n":
                    raise ChunkError("no CRLF after the last chunk")
                break
            data = rfile.read(n)
            if len(data) != n:
                raise ClientGone(f"connection closed inside a chunk ({len(data)} of {n} bytes)")
            body += data
            end = rfile.read(2)
            if not end:
                raise ClientGone("connection closed after a chunk")
            if end != b"\r\n":
                raise ChunkError("chunk data not followed by CRLF")
        return HttpRequest(method, path, headers, bytes(body), True)
    n = int(headers.get("content-length", "0"))
    return HttpRequest(method, path, headers, rfile.read(n), False)


def response(status: int, body: bytes, *, chunked: bool = False) -> bytes:
    reason = {200: "OK", 404: "Not Found", 409: "Conflict", 500: "Internal Server Error"}[status]
    head = (f"HTTP/1.1 {status} {reason}\r\nApi-Version: 1.41\r\nContent-Type: application/json\r\n"
            "Server: Docker/20.10.24+dfsg1 (linux)\r\nConnection: close\r\n")
    if chunked:
        payload = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + payload
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@dataclass
class DockerImage:
    id: str
    tags: List[str]
    diff_ids: List[str]
    os: str = "linux"
    architecture: str = "amd64"


class FakeEngine:
    """dockerd's image store behind the Engine API; ``dial`` is ``DockerAPI``'s seam."""

    def __init__(self) -> None:
        self.images: Dict[str, DockerImage] = {}
        self.layers: Set[str] = set()  # chain IDs in the layer store
        self.requests: List[HttpRequest] = []
        self.loads: List[List[Tuple[str, bytes]]] = []  # each load's tar members, in order
        self.errors: List[BaseException] = []
        self.aborted = 0  # requests the client abandoned half-sent
        self.hang_up_after: Optional[int] = None  # close the load connection after N bytes
        self.forget_loads = False  # answer "Loaded image" but keep nothing (a daemon bug)
        self.load_fails_with: Optional[str] = None  # the error line a failed load answers
        self.containers: List[Tuple[str, str, str]] = []  # (id, image as given, image ID)
        # called before a DELETE is answered (a container created meanwhile, say)
        self.before_delete: Optional[Callable[["FakeEngine"], None]] = None
        self._threads: List[threading.Thread] = []

    def dial(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        # A request framed wrongly leaves the daemon waiting for bytes that never come:
        # give up (and fail the test) instead of hanging it.
        theirs.settimeout(10)
        t = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
        t.start()
        self._threads.append(t)
        return ours

    def join(self) -> None:
        for t in self._threads:
            t.join(timeout=10)
        if self.errors:
            raise self.errors[0]

    def _serve(self, sock: socket.socket) -> None:
        try:
            with sock, sock.makefile("rb") as rfile:
                first = rfile.readline()
                if self.hang_up_after is not None and first.startswith(b"POST"):
                    rfile.read(self.hang_up_after)
                    self.aborted += 1
                    sock.shutdown(socket.SHUT_RDWR)
                    return
                try:
                    req = read_request(rfile, first)
                except ClientGone:
                    self.aborted += 1  # a real daemon sees a broken tar and loads nothing
                    return
                self.requests.append(req)
                sock.sendall(self._route(req))
        except BaseException as exc:  # noqa: BLE001 - surfaced by join()
            self.errors.append(exc)

    def _route(self, req: HttpRequest) -> bytes:
        if req.method == "GET" and req.path == "/version":
            return response(200, fixture("docker_get_version.body").encode())
        if req.method == "GET" and req.path == "/info":
            # The recorded answer, but no layer store on this machine: no delta bases.
            info = json.loads(fixture("docker_get_info.body"))
            info["DockerRootDir"] = "/nonexistent/docker"
            return response(200, json.dumps(info).encode())
        if req.method == "GET" and req.path == "/images/json?all=1":
            out = [{"Containers": -1, "Created": 0, "Id": img.id, "Labels": None, "ParentId": "",
                    "RepoDigests": None if img.tags else ["<none>@<none>"],
                    "RepoTags": img.tags or ["<none>:<none>"], "SharedSize": -1, "Size": 6,
                    "VirtualSize": 6} for img in self.images.values()]
            return response(200, json.dumps(out).encode())
        if req.method == "GET" and req.path.startswith("/images/") and req.path.endswith("/json"):
            img = self.images.get(req.path[len("/images/"):-len("/json")])
            if img is None:
                return response(404, fixture("docker_get_image_inspect_missing.body").encode())
            detail = json.loads(fixture("docker_get_image_inspect.body"))
            detail.update(Id=img.id, RepoTags=img.tags, Os=img.os, Architecture=img.architecture,
                          RootFS={"Type": "layers", "Layers": img.diff_ids})
            return response(200, json.dumps(detail).encode(), chunked=True)
        if req.method == "GET" and req.path == "/containers/json?all=1":
            template = json.loads(fixture("docker_get_containers_json_all.body"))[0]
            out = [dict(template, Id=cid, Names=[f"/c-{cid[:6]}"], Image=image, ImageID=image_id)
                   for cid, image, image_id in self.containers]
            return response(200, json.dumps(out).encode())
        if req.method == "DELETE" and req.path.startswith("/images/"):
            return self._delete(req.path[len("/images/"):])
        if req.method == "POST" and req.path == "/images/load?quiet=1":
            return response(200, self._load(req.body), chunked=True)
        raise AssertionError(f"unexpected request {req.method} {req.path}")

    def _load(self, body: bytes) -> bytes:
        def error(message: str) -> bytes:
            return json.dumps({"errorDetail": {"message": message}, "error": message}).encode() + b"\r\n"

        try:
            tar = tarfile.open(fileobj=io.BytesIO(body), mode="r:")
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
        except (tarfile.TarError, EOFError):
            return error("Error processing tar file(exit status 1): unexpected EOF")
        self.loads.append(members)
        files = dict(members)
        if "manifest.json" not in files:
            return error("open /var/lib/docker/tmp/docker-import-1/repositories: no such file or directory")
        out = b""
        for entry in json.loads(files["manifest.json"]):
            config = files[entry["Config"]]
            diff_ids = json.loads(config)["rootfs"]["diff_ids"]
            for name, diff_id, chain in zip(entry["Layers"], diff_ids, chains_of(diff_ids)):
                if chain in self.layers:
                    continue  # docker load skips a layer whose chain exists, file unopened
                if name not in files:
                    return error(f"open /var/lib/docker/tmp/docker-import-1/{name}: no such file or directory")
                if sha(files[name]) != diff_id:
                    return error(f"layer {name} does not match diff_id {diff_id}")
                if self.load_fails_with is not None:
                    return error(self.load_fails_with)
                self.layers.add(chain)
            image_id = sha(config)
            img = self.images.setdefault(image_id, DockerImage(image_id, [], diff_ids))
            for tag in entry["RepoTags"]:
                for other in self.images.values():
                    if tag in other.tags:
                        other.tags.remove(tag)
                img.tags.append(tag)
                out += json.dumps({"stream": f"Loaded image: {tag}\n"}).encode() + b"\r\n"
            if self.forget_loads:
                del self.images[image_id]
        return out

    def _delete(self, name: str) -> bytes:
        """dockerd's ImageDelete without force (recorded: docker_delete_image_*): a tag of
        several is untagged; the last one deletes the image, unless a container (running
        or not) uses it: 409. Query strings (force, noprune) are refused by this model."""
        assert "?" not in name, f"DELETE /images/{name}: this model takes no query (never force)"
        if self.before_delete is not None:
            self.before_delete(self)
        if name in self.images:  # by ID: what prune does only for an untagged image
            img = self.images[name]
            assert not img.tags, f"DELETE /images/{name}: by ID, but it has tags {img.tags}"
            user = next((c for c in self.containers if c[2] == img.id), None)
            if user is not None:  # as recorded: docker_delete_dangling_in_use
                message = (f"conflict: unable to delete {img.id[7:19]} (must be forced) - image "
                           f"is being used by stopped container {user[0][:12]}")
                return response(409, json.dumps({"message": message}).encode() + b"\n")
            del self.images[name]
            return response(200, json.dumps([{"Deleted": img.id}]).encode() + b"\n")
        img = next((i for i in self.images.values() if name in i.tags), None)
        if img is None:
            return response(404, json.dumps({"message": f"No such image: {name}"}).encode() + b"\n")
        if len(img.tags) > 1:
            img.tags.remove(name)
            return response(200, json.dumps([{"Untagged": name}]).encode() + b"\n")
        user = next((c for c in self.containers if c[2] == img.id), None)
        if user is not None:
            message = (f'conflict: unable to remove repository reference "{name}" (must force) '
                       f"- container {user[0][:12]} is using its referenced image {img.id[7:19]}")
            return response(409, json.dumps({"message": message}).encode() + b"\n")
        del self.images[img.id]
        return response(200, json.dumps([{"Untagged": name}, {"Deleted": img.id}]).encode() + b"\n")

    def add_image(self, config: bytes, tags: List[str]) -> DockerImage:
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        self.layers.update(chains_of(diff_ids))
        img = DockerImage(sha(config), list(tags), diff_ids)
        self.images[img.id] = img
        return img
