"""The Podman seam: the ``podman`` binary, and its image store read as Podman keeps it.

Why ``podman load`` of an OCI layout *directory*: it keeps the registry's digests (the
manifest is stored byte for byte, the image ID is the config digest, an index's digest
is recorded beside its platform manifest; a docker-archive instead gets a manifest made
up on load), it reads the blobs where they lie (an oci-archive is first untarred into a
temp dir, a stream on stdin first copied to one), and a layer whose blob the store
already made a layer from is reused without its file (containers/image looks layers up
by compressed digest, then by diff_id for an uncompressed blob). So the bundle's entries
are written once, into a spool directory, and only the blobs the store lacks.

Import protocol (never a half-imported image under its real name):

1. entries stream into ``<tmp>/edgebundle-import-<nonce>/blobs``; Podman sees nothing
   until the whole bundle (index, footer, checksums) is verified;
2. one ``podman load -i <spool>/<i>`` per image. Podman names an image loaded from a
   directory after the directory (``localhost/<tmp>/edgebundle-import-<nonce>/<i>``), a
   temporary name that ``report`` never lists;
3. each image is read back (``podman image inspect`` and the store's layer records):
   the image ID must be the config, the recorded digests must include the bundle's top
   digest, and every layer must be there, in order, complete. Only then does ``podman
   tag`` give it its real name -- one atomic names update in the store per image -- and
   the temporary name is removed.

The store's layer records (``<graphRoot>/<driver>-layers/layers.json``, c/storage's own
file, rewritten atomically) are read because no podman command lists which blobs a layer
was made from, and that decides which layers a bundle may leave out.

Interruptions: before step 2 only the spool exists; after it, an image may exist under
a temporary name (complete or not), and layers without an image. The next ``import`` or
``report`` (under the device lock) removes temporary names, the images left without a
name, and the spool. Layers a killed ``podman load`` wrote without an image stay in the
store (podman offers no command to remove a layer); the next import reuses them.

Deltas: Podman's layers are not offered as delta bases (``reads_bases`` is False, so the
report lacks ``tar-delta-v1`` and the packer ships whole layers).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Protocol, \
    Sequence, Set, Tuple

from ..errors import LoadError, PrerequisiteError, RuntimeUnavailableError
from ..format import BaseLayer, EntryHead, ImageRecord
from ..holdings import HeldImage, Inventory
from ..naming import docker_tag
from ..oci import INDEX_TYPES, Platform, chain_ids
from ..rebuild import BASE_HINT, BaseTree
from .podmanstore import (SPOOL_PREFIX, StoredImage, StoredLayer, held_images, is_temp_name,
                          layer_blobs, layer_chain, parse_images_store, parse_layers, stored_image)
from .process import Completed, command_line, run_to_files
from .tarstream import last_line

log = logging.getLogger(__name__)

# --- the process seam ---------------------------------------------------------------


class Runner(Protocol):
    """Runs ``podman``: the I/O seam between edgebundle and Podman."""

    def run(self, argv: Sequence[str], timeout: float) -> Completed:
        """Run to completion; raise FileNotFoundError if the program does not exist."""


class SubprocessRunner:
    def run(self, argv: Sequence[str], timeout: float) -> Completed:
        try:
            return run_to_files(argv, None, timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeUnavailableError(f"`{shlex.join(list(argv))}` did not finish within "
                                          f"{timeout:.0f}s", "check podman's storage (is "
                                          "another podman holding its lock?)") from None


class Podman:
    """Runs ``podman`` against one store (``--root``/``--runroot``, as podman means them)."""

    def __init__(self, podman: str = "podman", root: Optional[str] = None,
                 runroot: Optional[str] = None, timeout: float = 600.0,
                 runner: Optional[Runner] = None) -> None:
        self.argv0 = command_line("--podman", podman, "sudo podman")
        self.root = root
        self.runroot = runroot
        self.timeout = timeout
        self.runner: Runner = runner or SubprocessRunner()
        self._info: Optional[Dict[str, Any]] = None
        self._host: Dict[str, Any] = {}

    def describe(self) -> str:
        return f"podman store {self.root}" if self.root else "podman's default store"

    def argv(self, *args: str) -> List[str]:
        store = (["--root", self.root] if self.root else []) + \
            (["--runroot", self.runroot] if self.runroot else [])
        return self.argv0 + store + list(args)

    def run(self, *args: str, check: bool = True) -> bytes:
        argv = self.argv(*args)
        log.debug("run: %s", shlex.join(argv))
        try:
            proc = self.runner.run(argv, self.timeout)
        except FileNotFoundError:
            raise RuntimeUnavailableError(f"podman command {self.argv0[0]!r} not found",
                                          "install podman (Debian: apt-get install podman) "
                                          "or pass --podman PATH") from None
        if check and proc.returncode != 0:
            text = proc.stderr.decode(errors="replace")
            # podman load tries each format and lists why each failed; ours is the OCI one
            oci = [l.strip() for l in text.splitlines() if l.strip().startswith("* oci:")]
            err = oci[0][2:] if oci else last_line(text)
            raise LoadError(f"podman {' '.join(args[:2])} failed: {err or 'no message'}",
                            "check podman's storage; `edgebundle report --runtime podman` "
                            "shows what it holds")
        return proc.stdout

    def json(self, *args: str) -> Any:
        out = self.run(*args)
        try:
            return json.loads(out) if out.strip() else None
        except ValueError:
            raise LoadError(f"podman {' '.join(args[:2])} printed something that is not JSON: "
                            f"{out[:100]!r}", "check the --podman command") from None

    def info(self) -> Dict[str, Any]:
        """``podman info``'s store section, asked once: where the store is, its driver."""
        if self._info is None:
            try:
                info = self.json("info", "--format", "json")
            except LoadError as exc:
                raise RuntimeUnavailableError(f"{self.describe()} cannot be opened: "
                                              f"{exc.message.split(' failed: ', 1)[-1]}",
                                              "check --root/--runroot and that podman works "
                                              "(`podman info`)") from None
            store = info.get("store") if isinstance(info, dict) else None
            host = info.get("host") if isinstance(info, dict) else None
            self._info = store if isinstance(store, dict) else {}
            self._host = host if isinstance(host, dict) else {}
        return self._info

    def host_platform(self) -> Optional[Platform]:
        """The platform podman picks from an index on load: the device's own."""
        self.info()
        os_name, arch = self._host.get("os"), self._host.get("arch")
        if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
            return None
        return Platform(os_name, arch, "").normalized()

    def graph(self) -> Tuple[str, str]:
        """(graphRoot, graphDriverName)."""
        store = self.info()
        root, driver = store.get("graphRoot"), store.get("graphDriverName")
        if not isinstance(root, str) or not os.path.isabs(root) or not isinstance(driver, str) \
                or not driver.isidentifier():
            raise RuntimeUnavailableError(f"podman info names no usable store ({root!r}, "
                                          f"{driver!r})", "check `podman info`")
        return root, driver

    def spool_parent(self) -> str:
        """Where ``podman load`` itself would spool: its image copy temp dir.

        Podman names an image loaded from a directory ``localhost<path>``, so the path
        must spell a valid repository (lowercase words); else /var/tmp or /tmp is used.
        """
        tmp = self.info().get("imageCopyTmpDir")
        for path in (tmp if isinstance(tmp, str) else "", "/var/tmp", "/tmp"):
            if os.path.isabs(path) and os.path.isdir(path) and _spellable(path):
                return path
        raise LoadError(f"podman's temp dir {tmp!r} cannot be spelled as an image name",
                        "set TMPDIR to a directory whose path is lowercase letters, digits, "
                        "'.', '_' and '-'")


#: A path component of a repository name (distribution/reference's grammar).
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*")


def _spellable(path: str) -> bool:
    parts = [p for p in path.split("/") if p]
    return all(_COMPONENT.fullmatch(p) for p in parts)


# --- the runtime ---------------------------------------------------------------------


class PodmanRuntime:
    kind = "podman"
    namespace: Optional[str] = None

    def __init__(self, podman: Podman) -> None:
        self.podman = podman

    def _read_store(self, name: str) -> str:
        root, driver = self.podman.graph()
        path = os.path.join(root, f"{driver}-{name}", f"{name}.json")
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read()
        except FileNotFoundError:
            return ""  # an empty store: podman writes the file with the first entry
        except OSError as exc:
            raise LoadError(f"cannot read podman's {name} at {path}: {exc.strerror}",
                            "run edgebundle as the user podman stores images for (root "
                            "for /var/lib/containers)") from None

    def images(self) -> Tuple[List[StoredImage], Dict[str, StoredLayer]]:
        """Every image of the store with its layers, and the store's layer records."""
        layers = parse_layers(self._read_store("layers"))
        tops = parse_images_store(self._read_store("images"))
        out = []
        for detail in self._inspect(list(tops)) if tops else []:
            top = tops.get(str(detail.get("Id") or ""))
            chain = None if top is None else [] if top == "" else layer_chain(top, layers)
            image = stored_image(detail, chain)
            if image is not None:
                out.append(image)
        return out, layers

    def inventory(self) -> Inventory:
        images, layers = self.images()
        held: List[HeldImage] = []
        chains: Set[str] = set()
        for image in images:
            held.extend(held_images(image))
            if image.complete:
                chains.update(chain_ids(image.diff_ids))
        return Inventory(runtime="podman", images=tuple(held), blobs=layer_blobs(layers),
                         chains=frozenset(chains),
                         extra={"graph_driver": self.podman.graph()[1]})

    def _inspect(self, ids: Sequence[str]) -> List[Dict[str, Any]]:
        """``podman image inspect`` of every id; one that fails (removed meanwhile, or
        broken) is asked alone and left out."""
        try:
            out = self.podman.json("image", "inspect", *ids)
            return [d for d in out if isinstance(d, dict)] if isinstance(out, list) else []
        except LoadError:
            if len(ids) == 1:
                log.info("podman cannot inspect image %s: not reported", ids[0])
                return []
        return [d for i in ids for d in self._inspect([i])]

    def loader(self, inv: Inventory, platform: str) -> "PodmanLoader":
        return PodmanLoader(self, inv)

    def recover(self, wait: float) -> None:
        """Remove what an interrupted import left: temporary names, images left with no
        name by that, and spool directories (the caller holds the device lock)."""
        remove_temp_images(self.podman)
        try:
            parent = self.podman.spool_parent()
        except LoadError:  # no spool could have been made there either
            return
        for path in glob.glob(os.path.join(glob.escape(parent), SPOOL_PREFIX + "*")):
            log.info("removing the spool %s of an interrupted import", path)
            shutil.rmtree(path, ignore_errors=True)

    def reads_bases(self) -> bool:
        return False

    def base_tree(self, chain_id: str, diff_id: str) -> BaseTree:
        raise PrerequisiteError(f"podman cannot serve layer {diff_id} (chain {chain_id}) as a "
                                "delta base: edgebundle does not read podman's layers yet",
                                [chain_id], BASE_HINT)

    @contextlib.contextmanager
    def base_tar(self, base: BaseLayer, inv: Inventory) -> Iterator[BinaryIO]:
        raise self.base_tree(base.chain_id, base.diff_id)  # type: ignore[misc]
        yield  # pragma: no cover


def remove_temp_images(podman: Podman, only: Optional[str] = None) -> None:
    """Untag every temporary name (of spool ``only``, else any), then remove the images
    that held nothing else. Best effort: what fails is left for the next run."""
    try:
        listed = podman.json("images", "--all", "--format", "json") or []
    except LoadError as exc:
        log.info("cannot list podman's images to clean up (%s)", exc.message)
        return
    done: Set[str] = set()
    for image in listed if isinstance(listed, list) else []:
        if not isinstance(image, dict):
            continue
        names = [str(n) for n in image.get("Names") or []]
        temp = [n for n in names if is_temp_name(n) and (only is None or only in n)]
        image_id = str(image.get("Id") or "")
        if not temp or not image_id or image_id in done:
            continue  # `podman images` lists an image once per name
        done.add(image_id)
        log.info("removing temporary name(s) %s", ", ".join(temp))
        podman.run("untag", image_id, *temp, check=False)
        if len(temp) == len(names):  # nothing else named it: it was ours alone
            podman.run("rmi", image_id, check=False)


class PodmanLoader:
    """Entries into a spool directory; ``commit`` loads, checks and names each image."""

    def __init__(self, runtime: PodmanRuntime, inv: Inventory) -> None:
        self.runtime = runtime
        self._present = inv.blobs
        self._spool: Optional[str] = None
        self._loaded = False

    def _blobs(self) -> str:
        if self._spool is None:
            parent = self.runtime.podman.spool_parent()
            # Not mkdtemp: its random names may hold '_' where a repository name may not
            # (podman names the loaded image after this path). Hex only, created exclusively.
            spool = os.path.join(parent, SPOOL_PREFIX + secrets.token_hex(8))
            try:
                os.mkdir(spool, 0o700)
                self._spool = spool
            except OSError as exc:
                raise LoadError(f"cannot make podman's spool in {parent}: {exc.strerror}",
                                "set TMPDIR to a writable directory (podman spools there "
                                "too)") from None
            os.makedirs(os.path.join(self._spool, "blobs", "sha256"))
        return os.path.join(self._spool, "blobs", "sha256")

    def wants(self, head: EntryHead) -> bool:
        # A blob some layer was made from is reused by podman without its file.
        return head.delta is not None or head.digest not in self._present

    def add(self, digest: str, size: int, pieces: Iterator[bytes]) -> None:
        path = os.path.join(self._blobs(), digest.split(":", 1)[1])
        with open(path, "wb") as fh:
            # Run to its end: the bundle entry checks its sha256 there.
            for piece in pieces:
                fh.write(piece)

    def add_rebuilt(self, diff_id: str, size: int, pieces: Iterator[bytes]) -> None:
        raise LoadError(f"podman cannot import layer {diff_id} from a delta",
                        "repack with `--no-delta` (or `deltas: false` on the site)")

    def commit(self, records: Sequence[ImageRecord]) -> List[str]:
        podman = self.runtime.podman
        host = podman.host_platform()
        for rec in records:
            # podman load has no --platform: from an index it takes the device's platform,
            # whose manifest a bundle for another platform does not carry.
            want = Platform.parse(rec.platform).normalized()
            if host is not None and rec.top.media_type in INDEX_TYPES and \
                    (want.os, want.architecture) != (host.os, host.architecture):
                raise LoadError(f"image {rec.name} is packed for {rec.platform}, but podman here "
                                f"loads {host} from an index", "pack for a site whose platform "
                                "is this device's")
        self._blobs()
        assert self._spool is not None
        for i, rec in enumerate(records):
            layout = os.path.join(self._spool, str(i))
            os.makedirs(layout)
            os.symlink(os.path.join("..", "blobs"), os.path.join(layout, "blobs"))
            _write(os.path.join(layout, "oci-layout"), b'{"imageLayoutVersion":"1.0.0"}')
            _write(os.path.join(layout, "index.json"), json.dumps(
                {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [rec.top.to_json()]}).encode())
            log.info("podman load of %s (under a temporary name)", rec.name)
            self._loaded = True
            podman.run("load", "--quiet", "--input", layout)
        stored, _ = self.runtime.images()
        broken = [rec.name for rec in records if not _complete(stored, rec)]
        if broken:
            raise LoadError(f"podman load left incomplete: {', '.join(broken)}; nothing was "
                            "named", "check podman's storage (`podman images`) and free disk "
                            "space; the next import or report removes what was left")
        for rec in records:
            log.info("image %s is complete: naming it", rec.name)
            podman.run("tag", rec.config.digest.split(":", 1)[1], docker_tag(rec.name))
        self._cleanup()
        return [rec.name for rec in records]

    def abort(self) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self._spool is not None:
            if self._loaded:
                remove_temp_images(self.runtime.podman, os.path.basename(self._spool))
            shutil.rmtree(self._spool, ignore_errors=True)
            self._spool = None


def _complete(images: Sequence[StoredImage], rec: ImageRecord) -> bool:
    """The image of ``rec`` is in the store, complete, with the bundle's top and config."""
    want = tuple(l.diff_id for l in rec.layers)
    return any(i.config == rec.config.digest and rec.top.digest in i.digests and i.complete
               and i.diff_ids == want for i in images)


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


__all__ = ["Completed", "Podman", "PodmanLoader", "PodmanRuntime", "Runner", "SubprocessRunner",
           "remove_temp_images"]
