"""The containerd seam: everything goes through the ``ctr`` binary.

Why ``ctr`` and not the gRPC API: every containerd device has it (k3s ships it as
``k3s ctr``), and it keeps the device side free of grpc/protobuf. Argument building
and output parsing are pure functions; processes are run by a ``Runner`` (the one I/O
seam: ``SubprocessRunner`` in production, a recorded-output fake in the tests).

Import protocol (never a half-imported image under its real name):

1. ``ctr images import --platform P -`` reads an OCI layout tar from stdin. We stream
   only the blobs the content store lacks; ``index.json`` comes last and names every
   image with a unique *temporary* name, so nothing is visible under a real name yet.
   containerd labels the walked tree for GC and unpacks it into snapshots.
2. Each temporary image is checked complete (content present, top chain unpacked).
3. Complete ones are retagged to their real names (``images tag --force``, one
   metadata update); every temporary name is removed, whatever happened.

Surviving interruptions (``ctrsurvival``, ``journal``): ctr's lease is identified and
written to the device's journal before index.json is sent, and the renames are
journalled before the first one, so a killed import is cleaned up -- or its
publication rolled forward -- by the next ``import`` or ``report``. A refused import
ends ctr gracefully (its lease goes with it) and collects the partial ingests at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shlex
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Dict, FrozenSet, Iterator, List, Mapping, Optional, Protocol, \
    Sequence, Set, Tuple

import zstandard

from ..compression import MAGIC_BYTES, classify, decompress_stream
from ..errors import EdgebundleError, LoadError, PrerequisiteError, RuntimeUnavailableError
from ..format import BaseLayer, EntryHead, ImageRecord
from ..holdings import HeldImage, HeldLayer, Inventory
from ..naming import CRI_NAMESPACE, cri_digest_name
from ..oci import (INDEX_TYPES, MT_DOCKER_CONFIG, MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_CONFIG,
                   MT_OCI_INDEX, MT_OCI_LAYER, MT_OCI_MANIFEST, Descriptor, Platform, chain_ids,
                   check_digest, sha256_digest)
from ..rebuild import BASE_HINT, BaseTree, DirTree, verified_tar
from ..state import StateDir
from . import ctrsurvival
from .journal import PHASE_PUBLISHING, Journal, JournalFile, Rename, this_process
from .process import Completed, command_line, run_to_files
from .tarstream import BLOCK, TarStream, ThreadedSink, blob_path, last_line

log = logging.getLogger(__name__)

TEMP_PREFIX = "import.edgebundle.invalid/"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"


# --- pure parsers ---------------------------------------------------------------


def parse_images_ls(text: str) -> List[Tuple[str, str, str]]:
    """``ctr images ls`` -> [(name, media_type, digest)]. SIZE has spaces, so take 3 columns."""
    rows = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[2].startswith("sha256:"):
            rows.append((parts[0], parts[1], parts[2]))
    return rows


def parse_snapshots_ls(text: str) -> FrozenSet[str]:
    """``ctr snapshots ls`` -> keys of committed snapshots (unpack names them by chainID)."""
    keys = set()
    for line in text.splitlines()[1:]:
        parts = line.split()
        if parts and parts[-1] == "Committed" and parts[0].startswith("sha256:"):
            keys.add(parts[0])
    return frozenset(keys)


def parse_content_ls_quiet(text: str) -> FrozenSet[str]:
    return frozenset(l.strip() for l in text.splitlines() if l.strip().startswith("sha256:"))


class _Prefixed:
    """``head`` (already read, to classify the stream), then the rest of ``raw``."""

    def __init__(self, head: bytes, raw: IO[bytes]) -> None:
        self._head, self._raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if self._head:
            out, self._head = self._head, b""
            return out
        return self._raw.read(n)


def parse_view_mounts(text: str) -> Optional[str]:
    """``ctr snapshots view --mounts`` -> the parent snapshot's own directory, if named.

    A one-layer chain is a read-only bind of its directory; a longer one an overlay whose
    first lowerdir is the chain's top layer.
    """
    try:
        mounts = json.loads(text)
    except ValueError:
        return None
    first = mounts[0] if isinstance(mounts, list) and mounts else None
    if not isinstance(first, dict):
        return None
    kind, options = first.get("Type") or first.get("type"), first.get("Options") or first.get("options")
    if kind == "bind":
        source = first.get("Source") or first.get("source")
        return source if isinstance(source, str) and source.startswith("/") else None
    if kind == "overlay" and isinstance(options, list):
        for option in options:
            if isinstance(option, str) and option.startswith("lowerdir="):
                top = option[len("lowerdir="):].split(":")[0]
                return top if top.startswith("/") else None
    return None


@dataclass(frozen=True)
class ImageTree:
    """The platform manifest an image record resolves to, read from the content store."""

    manifest: Optional[Descriptor]
    platform: Optional[str]
    config: Optional[str]
    layers: Tuple[Tuple[str, int, str], ...]  # (digest, size, diff_id)


_NO_TREE = ImageTree(None, None, None, ())


def select_manifest(index: Mapping[str, Any], platform: Optional[Platform],
                    present: FrozenSet[str]) -> Optional[Tuple[Descriptor, Optional[str]]]:
    """From an index, the manifest for ``platform`` (or the first one held, if None).

    Entries we cannot read (another digest algorithm, no size) are skipped: they can
    name nothing this device was given by edgebundle.
    """
    manifests = index.get("manifests")
    for m in manifests if isinstance(manifests, list) else []:
        try:
            desc = Descriptor.from_json(m)
        except ValueError:
            continue
        raw = m.get("platform")
        plat = Platform.from_json(raw) if isinstance(raw, dict) else None
        if platform is not None:
            if plat is not None and plat.matches(platform):
                return desc, str(plat)
        elif desc.digest in present:
            return desc, str(plat) if plat else None
    return None


# --- the process seam ---------------------------------------------------------------


class Process(Protocol):
    """A started ``ctr images import`` (what ``subprocess.Popen`` offers)."""

    @property
    def stdin(self) -> Optional[IO[bytes]]: ...

    @property
    def stdout(self) -> Optional[IO[bytes]]: ...

    @property
    def returncode(self) -> Optional[int]: ...

    def wait(self, timeout: Optional[float] = None) -> int: ...

    def poll(self) -> Optional[int]: ...

    def kill(self) -> None: ...

    @property
    def pid(self) -> int: ...


class Runner(Protocol):
    """Runs ``ctr``: the I/O seam between edgebundle and containerd."""

    def run(self, argv: Sequence[str], input: Optional[bytes], timeout: float) -> Completed:
        """Run to completion; raise FileNotFoundError if the program does not exist."""

    def start(self, argv: Sequence[str], stderr: IO[bytes]) -> Process:
        """Start with a pipe on stdin, stdout discarded, stderr to ``stderr``."""

    def stream(self, argv: Sequence[str], stderr: IO[bytes]) -> Process:
        """Start with a pipe on stdout (to read a large output), stderr to ``stderr``."""


class SubprocessRunner:
    def run(self, argv: Sequence[str], input: Optional[bytes], timeout: float) -> Completed:
        try:
            return run_to_files(argv, input, timeout, _env())
        except subprocess.TimeoutExpired:
            raise RuntimeUnavailableError(f"`{shlex.join(list(argv[:1]) + list(argv[5:7]))}` did not finish "
                                          f"within {timeout:.0f}s", "check that containerd is healthy") from None

    def start(self, argv: Sequence[str], stderr: IO[bytes]) -> Process:
        # stdout is discarded and stderr goes to a file: nobody reads pipes while we
        # stream, and a full pipe would stall ctr (and so the whole import).
        return subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=stderr, env=_env())

    def stream(self, argv: Sequence[str], stderr: IO[bytes]) -> Process:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=stderr, env=_env())


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    # ctr reads these and they would override our explicit flags' defaults elsewhere.
    for key in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER"):
        env.pop(key, None)
    return env


_UNREACHABLE = ("connection refused", "no such file", "failed to dial", "permission denied",
                "context deadline exceeded", "code = unavailable", "transport is closing",
                "error reading from server")

#: Seconds one write into ctr's stdin may make no progress before ctr is given up on.
#: A healthy containerd reads on while it writes and fsyncs a blob; the longest pause
#: seen is a commit's fsync of a large layer on slow flash (seconds to tens of seconds).
#: Two minutes of nothing means containerd is frozen or gone (``--stall-timeout``).
DEFAULT_STALL = 120.0


class Ctr:
    """Runs ``ctr`` against one containerd address and namespace."""

    def __init__(self, address: str, namespace: str = "default", ctr: str = "ctr",
                 snapshotter: str = "overlayfs", timeout: float = 600.0,
                 runner: Optional[Runner] = None, stall: float = DEFAULT_STALL) -> None:
        self.address = address
        self.stall = stall
        self.namespace = namespace
        self.argv0 = command_line("--ctr", ctr, "k3s ctr")
        self.snapshotter = snapshotter
        self.timeout = timeout
        self.runner: Runner = runner or SubprocessRunner()

    def argv(self, *args: str) -> List[str]:
        return self.argv0 + ["--address", self.address, "--namespace", self.namespace, *args]

    def _check_socket(self) -> None:
        if "://" not in self.address and not os.path.exists(self.address):
            # ctr would spend 10 s dialling a socket that is not there.
            raise RuntimeUnavailableError(f"containerd socket {self.address} does not exist",
                                          "check --address and that containerd is running "
                                          "(k3s: /run/k3s/containerd/containerd.sock)")

    def run(self, *args: str, input: Optional[bytes] = None, check: bool = True) -> bytes:
        self._check_socket()
        argv = self.argv(*args)
        log.debug("run: %s", shlex.join(argv))
        try:
            proc = self.runner.run(argv, input, self.timeout)
        except FileNotFoundError:
            raise RuntimeUnavailableError(f"containerd client {self.argv0[0]!r} not found",
                                          "install containerd's ctr or pass --ctr PATH "
                                          "(k3s: --ctr 'k3s ctr')") from None
        if check and proc.returncode != 0:
            err = last_line(proc.stderr.decode(errors="replace"))
            if any(marker in err.lower() for marker in _UNREACHABLE):
                raise RuntimeUnavailableError(f"containerd at {self.address} is unreachable: {err}",
                                              "check --address and that containerd is running")
            raise LoadError(f"ctr {' '.join(args[:2])} failed: {err}",
                            "check containerd's logs; run `edgebundle report` to see its state")
        return proc.stdout

    def images(self) -> List[Tuple[str, str, str]]:
        return parse_images_ls(self.run("images", "ls").decode(errors="replace"))

    def content(self) -> FrozenSet[str]:
        return parse_content_ls_quiet(self.run("content", "ls", "-q").decode(errors="replace"))

    def snapshots(self) -> FrozenSet[str]:
        return parse_snapshots_ls(self.run("snapshots", "--snapshotter", self.snapshotter, "ls")
                                  .decode(errors="replace"))

    def get(self, digest: str) -> bytes:
        return self.run("content", "get", digest)

    @contextlib.contextmanager
    def content_stream(self, digest: str) -> Iterator[IO[bytes]]:
        """``ctr content get`` as a stream (a layer blob does not fit in memory)."""
        self._check_socket()
        argv = self.argv("content", "get", digest)
        log.debug("run: %s", shlex.join(argv))
        with tempfile.TemporaryFile() as err:
            try:
                proc = self.runner.stream(argv, err)
            except FileNotFoundError:
                raise RuntimeUnavailableError(f"containerd client {self.argv0[0]!r} not found",
                                              "pass --ctr PATH") from None
            assert proc.stdout is not None
            try:
                yield proc.stdout
            finally:
                proc.stdout.close()
                try:
                    proc.wait(timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.returncode != 0:
                err.seek(0)
                raise LoadError(f"ctr content get {digest} failed: "
                                f"{last_line(err.read().decode(errors='replace'))}",
                                "check containerd's logs")

    def tag(self, source: str, target: str) -> None:
        self.run("images", "tag", "--force", source, target)

    def remove(self, *names: str, sync: bool = False) -> bool:
        """Best effort (cleanup of temporary names): failures are logged, never raised.

        ``sync`` waits for the garbage collection the removal triggers. False if ctr
        could not be run (then the journal keeps the names for the next run).
        """
        if not names:
            return True
        try:
            self.run("images", "rm", *(("--sync",) if sync else ()), *names, check=False)
        except (RuntimeUnavailableError, LoadError) as exc:
            log.info("could not remove %s: %s", ", ".join(names), exc)
            return False
        return True

    def start_import(self, platform: str, stderr: IO[bytes]) -> Process:
        """``ctr images import`` reading an OCI layout tar on stdin."""
        self._check_socket()
        argv = self.argv("images", "import", "--platform", platform,
                         "--snapshotter", self.snapshotter, "-")
        log.debug("run: %s", shlex.join(argv))
        try:
            return self.runner.start(argv, stderr)
        except FileNotFoundError:
            raise RuntimeUnavailableError(f"containerd client {self.argv0[0]!r} not found",
                                          "pass --ctr PATH") from None


# --- the runtime ---------------------------------------------------------------------


def _json(data: bytes) -> Optional[Dict[str, Any]]:
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class ContainerdRuntime:
    kind = "containerd"

    def __init__(self, ctr: Ctr, state: Optional[StateDir] = None) -> None:
        self.ctr = ctr
        self.namespace: Optional[str] = ctr.namespace
        self._blobs: Dict[str, bytes] = {}
        self._trees: Dict[str, DirTree] = {}
        # Without a state dir (unit tests of other things) nothing is journalled.
        self.journal = JournalFile(state, "containerd", f"{ctr.address}#{ctr.namespace}") \
            if state is not None else None

    def recover(self, wait: float) -> ctrsurvival.Recovered:
        """Clean up after an interrupted import (the caller holds the device lock)."""
        return ctrsurvival.recover(self, self.journal, wait=wait)

    def _get(self, digest: str) -> Optional[bytes]:
        """A blob of the content store, or None if it went away since it was listed.

        Content-addressed, so a blob read once never changes: keep it. (A GC between
        ``content ls`` and ``content get`` is real; the image is then incomplete.)
        """
        data = self._blobs.get(digest)
        if data is None:
            try:
                data = self._blobs[digest] = self.ctr.get(digest)
            except LoadError as exc:
                log.info("content %s unreadable: %s", digest, exc.message)
                return None
        return data

    def _get_json(self, digest: str) -> Optional[Dict[str, Any]]:
        data = self._get(digest)
        return _json(data) if data is not None else None

    def _tree(self, media_type: str, digest: str, present: FrozenSet[str],
              platform: Optional[Platform]) -> ImageTree:
        """Walk target -> manifest -> config; missing or unreadable pieces end the walk.

        Whatever the content store holds, this never raises for its shape: an image
        whose tree cannot be read is simply reported incomplete.
        """
        data = self._get(digest) if digest in present else None
        obj = _json(data) if data is not None else None
        if data is None or obj is None:
            return _NO_TREE
        manifest = Descriptor(media_type, digest, len(data))
        plat: Optional[str] = None
        if media_type in INDEX_TYPES or "manifests" in obj:
            chosen = select_manifest(obj, platform, present)
            if chosen is None or chosen[0].digest not in present:
                return _NO_TREE
            manifest, plat = chosen
            obj = self._get_json(manifest.digest)
            if obj is None:
                return ImageTree(manifest, plat, None, ())
        config_desc = obj.get("config")
        config = config_desc.get("digest") if isinstance(config_desc, dict) else None
        if not isinstance(config, str) or config not in present:
            return ImageTree(manifest, plat, None, ())
        cfg = self._get_json(config)
        if cfg is None:
            return ImageTree(manifest, plat, None, ())
        if plat is None:
            plat = str(Platform.from_json(cfg))
        return ImageTree(manifest, plat, config, _layers(obj, cfg) or ())

    def held_image(self, name: str, media_type: str, digest: str, present: FrozenSet[str],
                   snaps: FrozenSet[str], platform: Optional[Platform] = None) -> HeldImage:
        tree = self._tree(media_type, digest, present, platform)
        data = self._get(digest) if digest in present else None
        target = Descriptor(media_type, digest, len(data)) if data is not None else None
        chains = chain_ids(d for _, _, d in tree.layers)
        layers = tuple(HeldLayer(diff_id=d, digest=dg, size=sz, blob=dg in present,
                                 unpacked=c in snaps, tar=dg in present)
                       for (dg, sz, d), c in zip(tree.layers, chains))
        # Runnable as if pulled: everything readable and the top chain unpacked.
        complete = bool(tree.config and layers and chains[-1] in snaps
                        and all(l.blob or l.unpacked for l in layers))
        return HeldImage(name=name, config=tree.config or "", target=target,
                         manifest=tree.manifest.digest if tree.manifest else None,
                         platform=tree.platform, complete=complete, layers=layers)

    def inventory(self, include_temp: bool = False) -> Inventory:
        present = self.ctr.content()
        snaps = self.ctr.snapshots()
        images = []
        for name, media_type, digest in self.ctr.images():
            if name.startswith(TEMP_PREFIX) and not include_temp:
                continue  # an import in progress (or one that died): never reported
            images.append(self.held_image(name, media_type, digest, present, snaps))
        return Inventory(runtime="containerd", namespace=self.namespace, images=tuple(images),
                         blobs=present, chains=snaps,
                         extra={"snapshotter": self.ctr.snapshotter})

    def loader(self, inv: Inventory, platform: str) -> "ContainerdLoader":
        return ContainerdLoader(self, inv, platform)

    # -- delta bases: a committed snapshot's own directory ------------------------------

    def reads_bases(self) -> bool:
        # overlayfs keeps each layer's files in a directory of their own (a view's first
        # lowerdir, or its bind source for a one-layer chain). native copies whole trees
        # into every view, which a GC may collect while we read: not offered.
        return self.ctr.snapshotter == "overlayfs"

    def base_tree(self, chain_id: str, diff_id: str) -> BaseTree:
        """The directory of the committed snapshot ``chain_id``, found through a view.

        The view is removed at once: its parent, the committed snapshot we read, stays as
        long as an image holds it (the prerequisite check saw it held).
        """
        def unservable(why: str) -> PrerequisiteError:
            return PrerequisiteError(f"containerd cannot serve layer {diff_id} (chain {chain_id}) "
                                     f"as a delta base: {why}", [chain_id], BASE_HINT)

        if not self.reads_bases():
            raise unservable(f"snapshotter {self.ctr.snapshotter} does not keep layers apart")
        if chain_id in self._trees:  # one view per layer and import, however many deltas
            return self._trees[chain_id]
        key = f"edgebundle-base-{secrets.token_hex(6)}"
        try:
            out = self.ctr.run("snapshots", "--snapshotter", self.ctr.snapshotter, "view",
                               "--mounts", key, chain_id)
        except LoadError as exc:
            raise unservable(exc.message) from None
        finally:
            self.ctr.run("snapshots", "--snapshotter", self.ctr.snapshotter, "rm", key, check=False)
        path = parse_view_mounts(out.decode(errors="replace"))
        if path is None or not os.path.isdir(path):
            raise unservable(f"its view's mounts name no readable directory ({out[:200]!r})")
        tree = self._trees[chain_id] = DirTree(path, f"containerd snapshot {path}")
        return tree

    @contextlib.contextmanager
    def base_tar(self, base: BaseLayer, inv: Inventory) -> Iterator[BinaryIO]:
        """The layer's tar, decompressed from its blob in the content store and verified."""
        blob = next((l.digest for img in inv.images for l in img.layers
                     if l.diff_id == base.diff_id and l.blob and l.digest), None)
        if blob is None:
            raise PrerequisiteError(f"containerd holds no blob of layer {base.diff_id} to rebuild "
                                    "its tar from", [base.chain_id], BASE_HINT)
        describe = f"blob {blob} in containerd's content store"
        try:
            with self.ctr.content_stream(blob) as raw:
                head = raw.read(MAGIC_BYTES)
                tar = verified_tar(decompress_stream(_Prefixed(head, raw), classify("", head)),
                                   base, describe)
        except (zlib.error, zstandard.ZstdError, EOFError, LoadError) as exc:
            raise PrerequisiteError(f"{describe} cannot be read as layer {base.diff_id}: {exc}",
                                    [base.chain_id], BASE_HINT) from None
        with tar:
            yield tar


def _layers(manifest: Mapping[str, Any], config: Mapping[str, Any]) -> Optional[Tuple[Tuple[str, int, str], ...]]:
    """(digest, size, diff_id) per layer, or None when manifest and config disagree."""
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    descs = manifest.get("layers")
    if not isinstance(diff_ids, list) or not isinstance(descs, list) or len(descs) != len(diff_ids):
        return None
    out = []
    for desc, diff_id in zip(descs, diff_ids):
        try:
            layer = Descriptor.from_json(desc)
            out.append((layer.digest, layer.size, check_digest(diff_id)))
        except ValueError:
            return None
    return tuple(out)


class ContainerdLoader:
    """``ctr images import`` processes fed streamed OCI layout tars.

    Layers a delta rebuilt are plain tars whose registry blob (gzip made by another
    program) cannot be remade. They take the *snapshot route* (FORMAT.md, "What is
    preserved"): the first import also names a throwaway image -- the exact config, the
    rebuilt tars as uncompressed layers -- so containerd's own applier commits the
    snapshots under the same chain IDs; a second import then brings the registry's
    index/manifest/config, whose unpack finds every snapshot present. The image keeps
    the registry's digests and runs; its rebuilt layers are snapshots without blobs, as
    CRI's ``discard_unpacked_layers`` leaves them. The throwaway is removed (``--sync``,
    so its tars are collected at once).
    """

    def __init__(self, runtime: ContainerdRuntime, inv: Inventory, platform: str) -> None:
        self.runtime = runtime
        self.platform = platform
        self._present = referenced_blobs(inv)
        self._nonce = secrets.token_hex(6)
        self._proc: Optional[Process] = None
        self._tar: Optional[TarStream] = None
        self._sink: Optional[ThreadedSink] = None
        self._temp_names: List[str] = []
        self._throwaways: List[str] = []
        self._stderr = tempfile.TemporaryFile()
        self._rebuilt: Dict[str, int] = {}  # diff_id -> tar size, for the snapshot route
        self._keep: Set[str] = set()  # JSON blobs to stream again to the second import
        self._json: Dict[str, bytes] = {}
        self._bracket: Optional[ctrsurvival.LeaseBracket] = None
        self._leases: List[str] = []  # ctr's import leases, identified (ctrsurvival)
        self._journal: Optional[Journal] = None
        self._killed = False  # ctr was killed: its lease outlives it
        self._collected = False
        self._frozen = False  # containerd stopped reading (the stall watchdog fired)
        self._named = False  # index.json was sent: temporary images may exist

    def _ensure(self) -> TarStream:
        if self._tar is None:
            ctr = self.runtime.ctr
            self._stderr.seek(0)
            self._stderr.truncate()
            self._bracket = ctrsurvival.LeaseBracket(ctr)
            self._proc = proc = ctr.start_import(self.platform, self._stderr)
            assert proc.stdin is not None
            # oci-layout first (ctr reads it anywhere in the tar): once ctr has read it,
            # its lease exists and can be told apart (ctrsurvival.LeaseBracket).
            try:
                TarStream(proc.stdin).add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
                proc.stdin.flush()
            except OSError as exc:
                raise self._died(exc) from None
            if ctrsurvival.wait_drained(proc.stdin, proc, bound=min(ctr.stall, 30.0)):
                self._note_lease(self._bracket.after_first_read())
            self._record(Journal(runtime="containerd", target=f"{ctr.address}#{ctr.namespace}",
                                 nonce=self._nonce, process=this_process(proc.pid),
                                 leases=tuple(self._leases)))
            self._sink = ThreadedSink(proc.stdin, stall=ctr.stall, on_stall=self._stalled)
            self._tar = TarStream(self._sink)
        return self._tar

    def _note_lease(self, lease: Optional[str]) -> None:
        if lease is not None and lease not in self._leases:
            self._leases.append(lease)

    def _record(self, journal: Journal) -> None:
        """Write the journal (fsynced) before the runtime holds what it describes."""
        self._journal = journal
        if self.runtime.journal is not None:
            self.runtime.journal.write(journal)

    def _stalled(self) -> None:
        """The watchdog's verdict: ctr stopped reading (containerd frozen). Kill it."""
        proc = self._proc
        if proc is not None:
            log.info("ctr images import read nothing for %.0fs: killing it", self.runtime.ctr.stall)
            self._killed = self._frozen = True
            proc.kill()

    def wants(self, head: EntryHead) -> bool:
        """Blobs already in the content store are not sent again; rebuilt tars always are."""
        if head.delta is not None:
            return True
        if head.digest in self._present:
            return False
        if head.media_type in _JSON_TYPES and head.size <= MAX_KEPT_JSON:
            self._keep.add(head.digest)
        return True

    def add(self, digest: str, size: int, pieces: Iterator[bytes]) -> None:
        if digest in self._keep:
            pieces = self._kept(digest, pieces)
        self._add(digest, size, pieces)

    def add_rebuilt(self, diff_id: str, size: int, pieces: Iterator[bytes]) -> None:
        # ctr's content store checks the tar against its name (the diff_id) as it
        # commits it; before that, ``rebuild`` raises at the end of a wrong one, which
        # aborts the import before any image is named.
        self._add(diff_id, size, pieces)
        self._rebuilt[diff_id] = size

    def _kept(self, digest: str, pieces: Iterator[bytes]) -> Iterator[bytes]:
        parts = []
        for piece in pieces:
            parts.append(piece)
            yield piece
        self._json[digest] = b"".join(parts)

    def _add(self, digest: str, size: int, pieces: Iterator[bytes]) -> None:
        tar = self._ensure()
        try:
            tar.add(blob_path(digest), size, pieces)
        except OSError as exc:  # ctr stopped reading: it died, or refused the stream
            raise self._died(exc) from None

    def _died(self, exc: OSError) -> "LoadError | RuntimeUnavailableError":
        """ctr closed its stdin early: reap it and say what it printed.

        containerd frozen (the stall watchdog killed ctr) or gone (ctr says so) is the
        runtime being unavailable, not a refusal of the bundle.
        """
        proc = self._proc
        if proc is not None:
            self._reap(proc)
        said = self._stderr_line()
        if self._frozen:
            return RuntimeUnavailableError(
                f"containerd at {self.runtime.ctr.address} stopped reading the image stream "
                f"(nothing for {self.runtime.ctr.stall:.0f}s); ctr was stopped",
                "check that containerd is running and healthy, then import again")
        if any(marker in said.lower() for marker in _UNREACHABLE):
            return RuntimeUnavailableError(f"containerd at {self.runtime.ctr.address} went away "
                                           f"during the import: {said}",
                                           "check that containerd is running, then import again")
        return LoadError(f"ctr images import stopped reading the image stream ({exc.strerror or exc}): "
                         f"{said or 'no message'}",
                         "check containerd's logs and free disk space; nothing was imported")

    def _stderr_line(self) -> str:
        self._stderr.seek(0)
        return last_line(self._stderr.read().decode(errors="replace"))

    def commit(self, records: Sequence[ImageRecord]) -> List[str]:
        """Name each image temporarily, finish ctr, check, rename.

        Returns the names now complete; raises LoadError (after cleaning up) otherwise.
        """
        rebuilt = [r for r in records if any(l.diff_id in self._rebuilt for l in r.layers)]
        for rec in records:
            # Defence in depth (the format refuses it too): such a name would be hidden
            # from reports and swept as a leftover by the next run.
            if rec.name.startswith(TEMP_PREFIX):
                raise LoadError(f"image name {rec.name!r} uses edgebundle's reserved temporary "
                                f"prefix {TEMP_PREFIX}", "repack with another name")
        for i, rec in enumerate(records):
            self._temp_names.append(f"{TEMP_PREFIX}{self._nonce}/{i}:pending")
        names = dict(zip((r.name for r in records), self._temp_names))
        ok = False
        try:
            try:
                tar = self._ensure()
                first = []
                for i, rec in enumerate(records):
                    if rec in rebuilt:
                        first.append(self._throwaway(tar, i, rec))
                    else:
                        first.append(_named(rec.top, names[rec.name]))
                self._finish(tar, first)
                if rebuilt:
                    log.info("layers rebuilt from deltas are committed as snapshots; importing "
                             "the registry's manifests of %d image(s) over them", len(rebuilt))
                    tar = self._ensure()
                    for rec in rebuilt:
                        for blob in rec.json_blobs:
                            if blob.digest in self._json:
                                tar.add_bytes(blob_path(blob.digest), self._json[blob.digest])
                    self._finish(tar, [_named(rec.top, names[rec.name]) for rec in rebuilt])
            except OSError as exc:
                raise self._died(exc) from None
            log.info("ctr images import finished; checking %d image(s) before naming them",
                     len(records))
            done = self._publish(records)
            ok = True
            return done
        finally:
            self._proc = None
            self._stderr.close()
            self._cleanup(collect=not ok)

    def _cleanup(self, collect: bool) -> None:
        """Remove our temporary names and, if ctr was killed, its lease; then the journal.

        ``collect``: the import failed, so run a garbage collection now -- after the
        lease is gone -- for the partial ingests and the blobs nothing names. (Left to
        containerd's own schedule, they linger a while and are listed as present.)
        If containerd cannot be reached the journal stays: the next run cleans up.
        """
        ctr = self.runtime.ctr
        if self._frozen:
            # containerd is frozen: every ctr call would wait for it (10 s to dial, each).
            # The journal names what to clean; the next import or report does it.
            log.info("containerd is not answering: leaving the cleanup to the next run")
            return
        try:
            if self._killed and self._leases:
                ctrsurvival.delete_leases(ctr, self._leases, sync=False)
            names = self._temp_names if self._named else []
            clean = ctr.remove(*names) and ctr.remove(*self._throwaways, sync=True)
            if collect and not self._collected:
                ctrsurvival.collect(ctr)
                self._collected = True
        except EdgebundleError as exc:
            log.info("cleanup after the import failed (%s); the next import or report "
                     "will finish it", exc.message)
            return
        if clean and self.runtime.journal is not None:
            self.runtime.journal.clear()

    def _throwaway(self, tar: TarStream, i: int, rec: ImageRecord) -> Dict[str, Any]:
        """The exact config over the rebuilt tars (and the other layers as they are)."""
        layers = []
        for layer in rec.layers:
            if layer.diff_id in self._rebuilt:
                layers.append({"mediaType": MT_OCI_LAYER, "digest": layer.diff_id,
                               "size": self._rebuilt[layer.diff_id]})
            else:
                layers.append({"mediaType": layer.media_type, "digest": layer.digest,
                               "size": layer.size})
        manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
                               "config": rec.config.to_json(), "layers": layers},
                              sort_keys=True).encode()
        desc = Descriptor(MT_OCI_MANIFEST, sha256_digest(manifest), len(manifest))
        tar.add_bytes(blob_path(desc.digest), manifest)
        name = f"{TEMP_PREFIX}{self._nonce}/{i}:snapshots"
        self._throwaways.append(name)
        return _named(desc, name)

    def _finish(self, tar: TarStream, manifests: List[Dict[str, Any]]) -> None:
        """index.json (naming ``manifests``) ends the stream; wait for ctr to finish."""
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": manifests}
        proc = self._proc
        assert proc is not None and proc.stdin is not None and self._sink is not None
        self._sink.close()  # everything but index.json is with ctr: confirm its lease now
        if self._bracket is not None:
            self._note_lease(self._bracket.confirm())
        assert self._journal is not None
        self._record(dataclasses.replace(self._journal, leases=tuple(self._leases)))
        tail = TarStream(proc.stdin)
        self._named = True  # from the first byte of index.json on, ctr may name images
        tail.add_bytes("index.json", json.dumps(index).encode())
        tail.close()
        proc.stdin.close()
        self._tar = self._sink = None
        try:
            proc.wait(timeout=self.runtime.ctr.timeout)
        except subprocess.TimeoutExpired:
            self._killed = True
            proc.kill()
            proc.wait()
            raise LoadError(f"ctr images import did not finish within "
                            f"{self.runtime.ctr.timeout:.0f}s", "check containerd's health") from None
        if proc.returncode != 0:
            raise LoadError(f"containerd refused the import: {self._stderr_line()}",
                            "run `edgebundle report` to see what the device holds")

    def _publish(self, records: Sequence[ImageRecord]) -> List[str]:
        present = self.runtime.ctr.content()
        snaps = self.runtime.ctr.snapshots()
        listed = {name: (mt, dg) for name, mt, dg in self.runtime.ctr.images()}
        done, broken = [], []
        for temp, rec in zip(self._temp_names, records):
            if temp not in listed:
                broken.append(rec.name)
                continue
            mt, dg = listed[temp]
            held = self.runtime.held_image(temp, mt, dg, present, snaps,
                                           Platform.parse(rec.platform))
            if held.complete and dg == rec.top.digest:
                done.append((temp, rec))
            else:
                broken.append(rec.name)
        if broken:
            raise LoadError(f"containerd import left incomplete: {', '.join(broken)}; "
                            "nothing was renamed", "check `ctr images ls`/containerd logs; the "
                            "bundle may lack a layer the device discarded")
        renames = tuple(Rename(temp, rec.name, rec.top.digest,
                               cri_digest_name(rec.name, rec.top.digest)
                               if self.runtime.namespace == CRI_NAMESPACE else None,
                               rec.platform) for temp, rec in done)
        # Journalled before the first rename: a kill between two renames is rolled
        # forward by the next run (ctrsurvival.recover), never left half-published.
        assert self._journal is not None
        self._record(dataclasses.replace(self._journal, phase=PHASE_PUBLISHING, renames=renames))
        for r in renames:
            log.info("image %s is complete: naming it", r.name)
            self.runtime.ctr.tag(r.temp, r.name)
            if r.alias is not None:
                self.runtime.ctr.tag(r.temp, r.alias)  # as a CRI pull names it: found by digest
        return [rec.name for _, rec in done]

    def _reap(self, proc: Process) -> None:
        """Wait for ctr to end (killing it after 30 s); note whether a signal ended it,
        for then its deferred lease deletion never ran."""
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._killed = True
            proc.kill()
            proc.wait()
        if proc.returncode is not None and proc.returncode < 0:
            self._killed = True

    def abort(self) -> None:
        """End ctr before it sees index.json -- gracefully, so it deletes its own lease.

        A tar header that cannot parse, then end of input: ctr's tar reader fails
        whether it was inside a member or between two, ``Import`` returns its error and
        ctr's deferred ``done()`` deletes the lease. Killing ctr (as before) left that
        lease holding every blob and partial ingest for 24 hours. Then a synchronous
        collection removes the ingests the lease held, so a refusal leaves nothing.
        """
        proc = self._proc
        if self._frozen:
            self._proc = None
            if self._sink is not None:
                self._sink.abort()
            if not self._stderr.closed:
                self._stderr.close()
            self._cleanup(collect=False)  # says why it does nothing
            return
        if proc is not None:
            if self._sink is not None:
                self._sink.abort()  # stop feeding; the writer thread is joined
            try:
                if proc.stdin is not None:
                    proc.stdin.write(b"\xff" * BLOCK)  # a header no tar reader accepts
                    proc.stdin.close()
            except OSError:
                pass  # ctr already gone
            self._reap(proc)
            self._proc = None
        if not self._stderr.closed:
            self._stderr.close()
        self._cleanup(collect=self._bracket is not None)  # ctr was started: collect


def referenced_blobs(inv: Inventory) -> FrozenSet[str]:
    """Blobs an image's tree holds: those, and only those, are safe not to send.

    A blob in the content store that no image references -- what an interrupted or
    refused import committed before its lease went -- is collected by containerd's
    next garbage collection, which may run while we stream: relying on it failed the
    rerun with "content digest ...: not found". Such blobs are sent again.
    """
    held: Set[str] = set()
    for img in inv.images:
        held.update(d for d in (img.target.digest if img.target else None, img.manifest,
                                img.config) if d)
        held.update(l.digest for l in img.layers if l.blob and l.digest)
    return frozenset(held & inv.blobs)


# Kept in memory for a second import when layers take the snapshot route.
_JSON_TYPES = frozenset({MT_OCI_MANIFEST, MT_OCI_INDEX, MT_OCI_CONFIG, MT_DOCKER_MANIFEST,
                         MT_DOCKER_LIST, MT_DOCKER_CONFIG})
MAX_KEPT_JSON = 4 * 1024 * 1024


def _named(desc: Descriptor, name: str) -> Dict[str, Any]:
    return dict(desc.to_json(), annotations={ANNOTATION_IMAGE_NAME: name})
