"""The containerd seam: everything goes through the ``ctr`` binary.

Why ``ctr`` and not the gRPC API: every containerd device has it (k3s ships it as
``k3s ctr``), and it keeps the device side free of grpc/protobuf. Argument building
and output parsing are pure functions next to the one class that runs processes.

Import protocol (never a half-imported image under its real name):

1. ``ctr images import --platform P -`` reads an OCI layout tar from stdin. We stream
   only the blobs the content store lacks; ``index.json`` comes last and names every
   image with a unique *temporary* name, so nothing is visible under a real name yet.
   containerd labels the walked tree for GC and unpacks it into snapshots.
2. Each temporary image is checked complete (content present, top chain unpacked).
3. Complete ones are retagged to their real names (``images tag --force``, one
   metadata update); every temporary name is removed, whatever happened.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from typing import IO, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

from ..errors import LoadError, RuntimeUnavailableError
from ..model import (INDEX_TYPES, Descriptor, HeldImage, HeldLayer, Inventory, Platform,
                     chain_ids)
from .tarstream import TarStream, ThreadedSink, blob_path, last_line

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


@dataclass(frozen=True)
class ImageTree:
    """The platform manifest an image record resolves to, read from the content store."""

    manifest: Optional[Descriptor]
    platform: Optional[str]
    config: Optional[str]
    layers: Tuple[Tuple[str, int, str], ...]  # (digest, size, diff_id)


def select_manifest(index: dict, platform: Optional[Platform],
                    present: FrozenSet[str]) -> Optional[Tuple[Descriptor, Optional[str]]]:
    """From an index, the manifest for ``platform`` (or the first one held, if None)."""
    for m in index.get("manifests", []):
        desc = Descriptor.from_json(m)
        plat = Platform.from_json(m["platform"]) if isinstance(m.get("platform"), dict) else None
        if platform is not None:
            if plat is not None and plat.matches(platform):
                return desc, str(plat)
        elif desc.digest in present:
            return desc, str(plat) if plat else None
    return None


# --- the process seam ---------------------------------------------------------------


class Ctr:
    """Runs ``ctr`` against one containerd address and namespace."""

    def __init__(self, address: str, namespace: str = "default", ctr: str = "ctr",
                 snapshotter: str = "overlayfs", timeout: float = 600.0) -> None:
        self.address = address
        self.namespace = namespace
        self.argv0 = shlex.split(ctr)
        self.snapshotter = snapshotter
        self.timeout = timeout

    def argv(self, *args: str) -> List[str]:
        return self.argv0 + ["--address", self.address, "--namespace", self.namespace, *args]

    def run(self, *args: str, input: Optional[bytes] = None, check: bool = True) -> bytes:
        if "://" not in self.address and not os.path.exists(self.address):
            # ctr would spend 10 s dialling a socket that is not there.
            raise RuntimeUnavailableError(f"containerd socket {self.address} does not exist",
                                          "check --address and that containerd is running "
                                          "(k3s: /run/k3s/containerd/containerd.sock)")
        try:
            proc = subprocess.run(self.argv(*args), input=input, capture_output=True,
                                  timeout=self.timeout, env=_env())
        except FileNotFoundError:
            raise RuntimeUnavailableError(f"containerd client {self.argv0[0]!r} not found",
                                          "install containerd's ctr or pass --ctr PATH "
                                          "(k3s: --ctr 'k3s ctr')") from None
        if check and proc.returncode != 0:
            err = last_line(proc.stderr.decode(errors="replace"))
            if "connection refused" in err or "no such file" in err.lower() or \
                    "failed to dial" in err or "permission denied" in err.lower():
                raise RuntimeUnavailableError(f"containerd at {self.address} is unreachable: {err}",
                                              "check --address and that containerd is running")
            raise LoadError(f"ctr {' '.join(args[:2])} failed: {err}")
        return proc.stdout

    def ping(self) -> None:
        self.run("version")

    def images(self) -> List[Tuple[str, str, str]]:
        return parse_images_ls(self.run("images", "ls").decode())

    def content(self) -> FrozenSet[str]:
        return parse_content_ls_quiet(self.run("content", "ls", "-q").decode())

    def snapshots(self) -> FrozenSet[str]:
        return parse_snapshots_ls(self.run("snapshots", "--snapshotter", self.snapshotter, "ls").decode())

    def get(self, digest: str) -> bytes:
        return self.run("content", "get", digest)

    def tag(self, source: str, target: str) -> None:
        self.run("images", "tag", "--force", source, target)

    def remove(self, *names: str) -> None:
        if names:
            self.run("images", "rm", *names, check=False)

    def start_import(self, platform: str, stderr: "IO[bytes]") -> "subprocess.Popen[bytes]":
        """``ctr images import`` reading a tar on stdin.

        stdout is discarded and stderr goes to a file: nobody reads pipes while we
        stream, and a full pipe would stall ctr (and so the whole import).
        """
        argv = self.argv("images", "import", "--platform", platform,
                         "--snapshotter", self.snapshotter, "-")
        try:
            return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=stderr, env=_env())
        except FileNotFoundError:
            raise RuntimeUnavailableError(f"containerd client {self.argv0[0]!r} not found",
                                          "pass --ctr PATH") from None


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    # ctr reads these and they would override our explicit flags' defaults elsewhere.
    for key in ("CONTAINERD_ADDRESS", "CONTAINERD_NAMESPACE", "CONTAINERD_SNAPSHOTTER"):
        env.pop(key, None)
    return env


# --- the runtime ---------------------------------------------------------------------


class ContainerdRuntime:
    kind = "containerd"

    def __init__(self, ctr: Ctr) -> None:
        self.ctr = ctr
        self.namespace = ctr.namespace
        self._blobs: Dict[str, bytes] = {}

    def _get(self, digest: str) -> bytes:
        """Content-addressed, so a blob read once never changes: keep it."""
        data = self._blobs.get(digest)
        if data is None:
            data = self._blobs[digest] = self.ctr.get(digest)
        return data

    def _tree(self, media_type: str, digest: str, present: FrozenSet[str],
              platform: Optional[Platform]) -> ImageTree:
        """Walk target -> manifest -> config; missing pieces come back as None."""
        if digest not in present:
            return ImageTree(None, None, None, ())
        data = self._get(digest)
        obj = json.loads(data)
        manifest = Descriptor(media_type, digest, len(data))
        plat: Optional[str] = None
        if media_type in INDEX_TYPES or "manifests" in obj:
            chosen = select_manifest(obj, platform, present)
            if chosen is None or chosen[0].digest not in present:
                return ImageTree(None, None, None, ())
            manifest, plat = chosen
            obj = json.loads(self._get(manifest.digest))
        config = obj.get("config", {}).get("digest")
        if not config or config not in present:
            return ImageTree(manifest, plat, None, ())
        cfg = json.loads(self._get(config))
        if plat is None:
            plat = str(Platform.from_json(cfg))
        diff_ids = cfg.get("rootfs", {}).get("diff_ids", [])
        layers = tuple((l["digest"], int(l["size"]), d)
                       for l, d in zip(obj.get("layers", []), diff_ids))
        if len(layers) != len(diff_ids):
            return ImageTree(manifest, plat, config, ())
        return ImageTree(manifest, plat, config, layers)

    def held_image(self, name: str, media_type: str, digest: str, present: FrozenSet[str],
                   snaps: FrozenSet[str], platform: Optional[Platform] = None) -> HeldImage:
        tree = self._tree(media_type, digest, present, platform)
        target = Descriptor(media_type, digest, len(self._get(digest))) if digest in present else None
        chains = chain_ids(d for _, _, d in tree.layers)
        layers = tuple(HeldLayer(diff_id=d, digest=dg, size=sz, blob=dg in present,
                                 unpacked=c in snaps)
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
                continue
            images.append(self.held_image(name, media_type, digest, present, snaps))
        return Inventory(runtime="containerd", namespace=self.namespace, images=tuple(images),
                         blobs=present, chains=snaps,
                         extra={"snapshotter": self.ctr.snapshotter})

    def loader(self, inv: Inventory, platform: str) -> "ContainerdLoader":
        return ContainerdLoader(self, inv, platform)


class ContainerdLoader:
    """One ``ctr images import`` process fed a streamed OCI layout tar."""

    def __init__(self, runtime: ContainerdRuntime, inv: Inventory, platform: str) -> None:
        self.runtime = runtime
        self.platform = platform
        self._present = inv.blobs
        self._nonce = secrets.token_hex(6)
        self._proc: Optional["subprocess.Popen[bytes]"] = None
        self._tar: Optional[TarStream] = None
        self._sink: Optional[ThreadedSink] = None
        self._temp_names: List[str] = []
        self._stderr = tempfile.TemporaryFile()

    def _ensure(self) -> TarStream:
        if self._tar is None:
            self._proc = self.runtime.ctr.start_import(self.platform, self._stderr)
            assert self._proc.stdin is not None
            self._sink = ThreadedSink(self._proc.stdin)
            self._tar = TarStream(self._sink)
        return self._tar

    def wants(self, digest: str, media_type: Optional[str]) -> bool:
        """Blobs already in the content store are not sent again."""
        return digest not in self._present

    def add(self, digest: str, size: int, pieces: Iterator[bytes]) -> None:
        self._ensure().add(blob_path(digest), size, pieces)

    def commit(self, records: Sequence[dict]) -> List[str]:
        """Write index.json naming each image temporarily, finish ctr, check, rename.

        Returns the names now complete; raises LoadError (after cleaning up) otherwise.
        """
        tar = self._ensure()
        manifests = []
        for i, rec in enumerate(records):
            temp = f"{TEMP_PREFIX}{self._nonce}/{i}:pending"
            self._temp_names.append(temp)
            desc = dict(rec["top"])
            desc["annotations"] = {ANNOTATION_IMAGE_NAME: temp}
            manifests.append(desc)
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": manifests}
        tar.add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        tar.add_bytes("index.json", json.dumps(index).encode())
        tar.close()
        proc = self._proc
        assert proc is not None and proc.stdin is not None and self._sink is not None
        try:
            self._sink.close()
            proc.stdin.close()
            proc.wait(timeout=self.runtime.ctr.timeout)
            self._stderr.seek(0)
            err = self._stderr.read()
            try:
                if proc.returncode != 0:
                    raise LoadError(f"containerd refused the import: "
                                    f"{last_line(err.decode(errors='replace'))}",
                                    "run `edgebundle report` to see what the device holds")
                return self._publish(records)
            finally:
                self.runtime.ctr.remove(*self._temp_names)
        finally:
            self._proc = None

    def _publish(self, records: Sequence[dict]) -> List[str]:
        present = self.runtime.ctr.content()
        snaps = self.runtime.ctr.snapshots()
        listed = {name: (mt, dg) for name, mt, dg in self.runtime.ctr.images()}
        done, broken = [], []
        for temp, rec in zip(self._temp_names, records):
            if temp not in listed:
                broken.append(rec["name"])
                continue
            mt, dg = listed[temp]
            held = self.runtime.held_image(temp, mt, dg, present, snaps,
                                           Platform.parse(rec["platform"]))
            if held.complete and dg == rec["top"]["digest"]:
                done.append((temp, rec["name"]))
            else:
                broken.append(rec["name"])
        if broken:
            raise LoadError(f"containerd import left incomplete: {', '.join(broken)}; "
                            "nothing was renamed", "check `ctr images ls`/containerd logs; the "
                            "bundle may lack a layer the device discarded")
        for temp, name in done:
            self.runtime.ctr.tag(temp, name)
        return [name for _, name in done]

    def abort(self) -> None:
        """Kill ctr before it sees index.json: no image record can have been created."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            if self._sink is not None:
                self._sink.abort()
            self._proc = None
        self.runtime.ctr.remove(*self._temp_names)
