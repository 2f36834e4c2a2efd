"""Device use cases: import a bundle, report what the runtime holds, verify, inspect.

Standard library plus zstandard, msgpack and xxhash only: this runs on the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Sequence, Union

from .. import history, volumeset
from ..errors import EdgebundleError, LoadError, LockedError, UsageError
from ..files import check_output, open_output
from ..format import (FEATURE_DELTA, KNOWN_FEATURES, BundleInfo, BundleReader,
                      read_index_from)
from ..format.volumes import VolumeHead
from ..holdings import HeldImage, Holdings, Inventory
from ..importer import ImportResult, ProgressFactory, Runtime, import_bundle
from ..importer.prune import BUSY, images_of
from ..naming import CRI_NAMESPACE, cri_digest_name
from ..prune import ID_RUNTIMES, IN_USE, REMOVE, Decision, Present, check_keep, plan_prune
from ..importer.storage import runtime_storage
from ..report import inventory_to_json, now_rfc3339
from ..format.reader import Verifier
from ..space import UNCHECKED, ImportSpace
from ..state import StateDir, state_dir_path
from ..trust import TrustPolicy, check_not_older, record_imported

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeAddress:
    """Where the device's runtime listens (the ``--runtime`` group of flags)."""

    kind: str  # "containerd" | "docker" | "podman"
    address: str  # containerd socket
    namespace: str  # containerd namespace
    ctr: str  # the ctr command line, e.g. "k3s ctr"
    snapshotter: str
    host: str  # Docker Engine socket, unix://...
    stall: float = 120.0  # seconds the runtime may read nothing of the stream (--stall-timeout)
    podman: str = "podman"  # the podman command line
    root: Optional[str] = None  # podman --root (None: podman's default store)
    runroot: Optional[str] = None  # podman --runroot


#: How long an import waits for the ctr of a killed import to finish its unpack.
RECOVERY_WAIT = 300.0
#: How long a report waits for it: a report read right after a kill (the usual way to
#: look) should find the device clean, but a report must never hang on a long unpack.
REPORT_RECOVERY_WAIT = 10.0


def open_runtime(where: RuntimeAddress, state: Optional[StateDir] = None) -> Runtime:
    if where.kind == "containerd":
        from ..importer.containerd import ContainerdRuntime, Ctr

        return ContainerdRuntime(Ctr(where.address, where.namespace, where.ctr, where.snapshotter,
                                     stall=where.stall), state)
    if where.kind == "docker":
        from ..importer.docker import DockerAPI, DockerRuntime

        return DockerRuntime(DockerAPI(where.host))
    if where.kind == "podman":
        from ..importer.podman import Podman, PodmanRuntime

        return PodmanRuntime(Podman(where.podman, where.root, where.runroot))
    raise UsageError(f"unknown runtime {where.kind!r}",
                     "pass --runtime containerd, --runtime docker or --runtime podman")


@contextlib.contextmanager
def open_bundle(path: str, more: Sequence[str] = ()) -> Iterator[BinaryIO]:
    """A bundle to read front to back: a file, or ``-`` for standard input.

    Either may instead be a volume set (``volumeset``): volume 1's path (the others are
    found next to it, or given in order in ``more``), or the volumes in order on stdin.
    """
    if path == "-":
        if more:
            raise UsageError("- (standard input) takes no further paths",
                             "send the volumes in order on standard input, or pass their paths")
        with volumeset.read_stream(sys.stdin.buffer) as stream:
            yield stream
        return
    path = volumeset.first_volume(path)
    try:
        fh = open(path, "rb")
    except IsADirectoryError:
        raise UsageError(f"bundle {path} is a directory", "pass the .ebundle file itself") from None
    except OSError as exc:
        raise UsageError(f"cannot open bundle {path}: {exc.strerror}",
                         "check the path (on a USB stick: is it mounted?)") from None
    with fh, volumeset.read_file(fh, path, more) as stream:
        yield stream


def stamped(inv: Inventory, runtime: Runtime, trust: Optional[TrustPolicy] = None) -> Inventory:
    """The report says when and where it was read, which bundle features it reads, and
    which keys its trust policy accepts (none: it does not enforce signatures).

    Deltas are offered only where this runtime can serve its layers' files as bases.
    """
    features = KNOWN_FEATURES if runtime.reads_bases() else KNOWN_FEATURES - {FEATURE_DELTA}
    return dataclasses.replace(inv, generated_at=now_rfc3339(), host=socket.gethostname(),
                               features=features,
                               trusted_keys=frozenset(trust.key_ids if trust else ()))


def write_report(path: str, inv: Inventory, site: Optional[str]) -> None:
    """Write the report JSON to ``path`` (replaced atomically; ``-`` is stdout)."""
    data = (json.dumps(inventory_to_json(inv, site), indent=2, sort_keys=True) + "\n").encode()
    with open_output(path, f"report {path}") as out:
        out.write(data)


def admission(trust: TrustPolicy, state: StateDir, allow_downgrade: bool = False) -> Verifier:
    """The device's decision on a header, before any entry: signature, then downgrade."""
    def verify(reader: BundleReader) -> Optional[str]:
        key = trust.admit(reader)
        if key is not None and not allow_downgrade:
            check_not_older(state, reader.header, reader.name)
        if key is not None:
            log.info("bundle %s: signature by trusted key %s checked", reader.name, key)
        return key
    return verify


def import_file(path: str, runtime: Runtime, *, progress: Optional[ProgressFactory] = None,
                report: Optional[str] = None, trust: Optional[TrustPolicy] = None,
                state: Optional[StateDir] = None, allow_downgrade: bool = False,
                space_check: bool = True, more: Sequence[str] = ()) -> ImportResult:
    """``edgebundle import``: verify and load a bundle; optionally write the report after.

    ``space_check`` False skips the disk pre-flight (``space``); a full disk met anyway
    is still reported as one. ``more``: the further volumes of a volume set, in order,
    when ``path`` is volume 1. The device lock is held throughout (a second import is
    refused with LockedError) and what an interrupted import left is cleaned up first.
    """
    if report is not None:
        check_output(report, f"report {report}")
    trust = trust or TrustPolicy((), "")
    state = state or StateDir(state_dir_path())
    space = ImportSpace(lambda: runtime_storage(runtime), disk=None if space_check else UNCHECKED)
    with open_bundle(path, more) as fh, state.lock():
        runtime.recover(wait=RECOVERY_WAIT)
        result = import_bundle(fh, path, runtime, progress=progress,
                               verifier=admission(trust, state, allow_downgrade), space=space)
        if result.signed_by is not None:
            assert result.header is not None
            record_imported(state, result.header, path, result.signed_by)
        _record_published(state, runtime, result, path)
    if report is not None:
        assert result.inventory is not None
        write_report(report, stamped(result.inventory, runtime, trust), result.site)
        log.info("report written to %s", report)
    return result


def _record_published(state: StateDir, runtime: Runtime, result: ImportResult, path: str) -> None:
    """Remember what this import named, so that ``prune`` may remove it one day (``history``).

    Only what it published itself: an image already present was not put there by it.
    The import has succeeded whatever happens here; a record that cannot be written
    only means those images are never pruned.
    """
    target = _target(runtime)
    if target is None or result.inventory is None or result.header is None or not result.imported:
        return
    held = Holdings(result.inventory)
    names = {(i.name, i.target.digest if i.target else None) for i in result.inventory.images}
    published = []
    for summary in result.header.images:
        if summary.name not in result.imported:
            continue
        image = held.image(summary.name, summary.top, summary.config)
        if image is None:
            continue
        if runtime.kind in ID_RUNTIMES:
            published.append((image.name, image.config, summary.name))
            continue
        published.append((image.name, summary.top, summary.name))
        alias = cri_digest_name(summary.name, summary.top) \
            if runtime.namespace == CRI_NAMESPACE else None
        if alias is not None and (alias, summary.top) in names:
            published.append((alias, summary.top, summary.name))
    try:
        history.record(state, runtime.kind, target, published, now_rfc3339(),
                       os.path.basename(path))
    except (EdgebundleError, OSError) as exc:
        log.warning("could not record the imported images for prune (%s); they will not be "
                    "pruned", getattr(exc, "message", exc))


def _target(runtime: Runtime) -> Optional[str]:
    try:
        return images_of(runtime).target
    except TypeError:  # a runtime prune does not know (a test's): nothing to record
        return None


@dataclass(frozen=True)
class Pruned:
    """What ``prune`` did (or, with ``dry_run``, would do), and the report after it."""

    dry_run: bool
    removed: List[Decision]  # with dry_run: would be removed
    kept: List[Decision]  # named by --keep (or the same image), or --keep-previous
    in_use: List[Decision]
    inventory: Inventory
    target: str
    recorded: int  # images edgebundle imported that the runtime still holds
    # removed without error, yet still held afterwards (re-pulled meanwhile?): exit 8
    failed: List[Decision] = dataclasses.field(default_factory=list)

    def to_json(self, site: Optional[str]) -> Dict[str, Any]:
        return {"dry_run": self.dry_run, "target": self.target,
                "removed": [d.name for d in self.removed],
                "kept": [d.name for d in self.kept],
                "in_use": [d.name for d in self.in_use],
                "failed": [d.name for d in self.failed],
                "decisions": [d.to_json() for d in self.removed + self.kept + self.in_use],
                "report": inventory_to_json(self.inventory, site)}


def prune(runtime: Runtime, keep: Sequence[str], *, keep_previous: int = 0,
          dry_run: bool = False, trust: Optional[TrustPolicy] = None,
          state: Optional[StateDir] = None) -> Pruned:
    """``edgebundle prune``: remove images edgebundle imported that are no longer wanted.

    Under the device lock (never beside an import); leftovers of an interrupted import
    are cleaned first, as ``report`` does. Never removes an image a container uses. The
    report returned is read from the runtime after the removal.
    """
    check_keep(keep)
    if keep_previous < 0:
        raise UsageError(f"--keep-previous {keep_previous} is negative", "pass 0 or more")
    state = state or StateDir(state_dir_path())
    images = images_of(runtime)
    with state.lock(what="a prune"):
        runtime.recover(wait=0)
        before = runtime.inventory()
        record = history.load(state, runtime.kind, images.target)
        present = [_present(runtime.kind, i) for i in before.images]
        plan = plan_prune(runtime.kind, present, record.images, keep, keep_previous,
                          images.in_use(), images.untagged())
        if not record.images:
            log.info("no image imported by edgebundle is recorded for %s: nothing to prune",
                     images.describe())
        kept = [d for d in plan.decisions if d.verdict not in (REMOVE, IN_USE)]
        in_use = plan.of(IN_USE)
        if dry_run:
            return Pruned(True, plan.remove, kept, in_use, stamped(before, runtime, trust),
                          images.target, len(plan.decisions))
        busy = {r.name for r in images.remove([d.name for d in plan.remove]) if r.outcome == BUSY}
        after = runtime.inventory()
        still = {(i.name, _present(runtime.kind, i).digest) for i in after.images}
        still |= {(d, d) for d in images.untagged()}
        removed = [d for d in plan.remove if d.name not in busy and (d.name, d.digest) not in still]
        in_use += [d for d in plan.remove if d.name in busy]
        failed = [d for d in plan.remove if d.name not in busy and (d.name, d.digest) in still]
        history.forget(state, record, [e for e in record.images if (e.name, e.digest) in still
                                       or (e.digest, e.digest) in still])
    for d in removed:
        log.info("removed %s (%s)", d.name, d.digest)
    return Pruned(False, removed, kept, in_use, stamped(after, runtime, trust), images.target,
                  len(plan.decisions), failed)


def prune_failure(result: Pruned) -> Optional[LoadError]:
    """The error to exit with after the output, when a removal did not take."""
    if not result.failed:
        return None
    return LoadError(f"the runtime still holds {', '.join(d.name for d in result.failed)} "
                     "after removing it", "check the runtime's logs (did something pull it "
                     "again?); `edgebundle report` shows what it holds")


def _present(kind: str, image: HeldImage) -> Present:
    if kind in ID_RUNTIMES:
        return Present(image.name, image.config, image.config)
    return Present(image.name, image.target.digest if image.target else "", image.config)


def take_report(runtime: Runtime, trust: Optional[TrustPolicy] = None,
                state: Optional[StateDir] = None) -> Inventory:
    """``edgebundle report``: what the runtime holds now, stamped with time and host.

    Leftovers of an interrupted import are cleaned first -- unless an import runs right
    now (the lock is held): then it is its business, and the report is read as is; the
    ctr of a killed import still unpacking is waited for ``REPORT_RECOVERY_WAIT`` at most
    (temporary names are never reported either way).
    """
    if state is not None:
        try:
            with state.lock(what="a report (cleaning up after an interrupted import)"):
                try:
                    runtime.recover(wait=REPORT_RECOVERY_WAIT)
                except LockedError as exc:
                    log.info("not cleaning up after an interrupted import now: %s", exc.message)
        except LockedError:
            log.info("an import is running: not cleaning up after interrupted ones now")
        except UsageError as exc:  # e.g. a user who may not write the state dir
            log.info("no cleanup of interrupted imports: %s", exc.message)
    return stamped(runtime.inventory(), runtime, trust)


@dataclass(frozen=True)
class Verified:
    bundle: str
    version: int
    entries: int
    images: List[str]
    bytes: int
    site: Optional[str]
    signatures: List[str] = dataclasses.field(default_factory=list)  # key ids, checked or not
    signed_by: Optional[str] = None  # the trusted key whose signature was checked
    volumes: Optional[int] = None  # how many volumes it came in (None: one bundle file)

    def to_json(self) -> Any:
        return {"bundle": self.bundle, "ok": True, "version": self.version, "entries": self.entries,
                "images": self.images, "bytes": self.bytes, "site": self.site,
                "signatures": self.signatures, "signed_by": self.signed_by,
                "volumes": self.volumes}


@dataclass(frozen=True)
class VolumeVerified:
    """One volume checked on its own (``verify`` of a volume other than the first)."""

    path: str
    head: VolumeHead

    def to_json(self) -> Any:
        h = self.head
        return {"volume": self.path, "ok": True, "number": h.number, "count": h.count,
                "bundle_id": h.id_hex, "offset": h.offset, "length": h.length, "total": h.total}


def verify_bundle(path: str, trust: Optional[TrustPolicy] = None,
                  more: Sequence[str] = ()) -> Union[Verified, VolumeVerified]:
    """``edgebundle verify``: every byte and every rule of FORMAT.md, without a runtime.

    With a trust policy, also the signature, as ``import`` would judge it. A volume
    other than the first, alone, is checked on its own (its header and its payload's
    checksum): the way to find a bad stick while the others are elsewhere.
    """
    alone = volumeset.lone_volume(path) if not more else None
    if alone is not None:
        head, _ = volumeset.verify_alone(alone)
        return VolumeVerified(alone, head)
    with open_bundle(path, more) as fh:
        reader = BundleReader(fh, path, trust.admit if trust is not None else None)
        count = 0
        for entry in reader.entries():
            entry.skip()
            count += 1
        volumes = volumeset.volume_count(fh)
    assert reader.index is not None
    return Verified(path, reader.version, count, [r.name for r in reader.index.images],
                    reader.total_size or 0, reader.header.site,
                    [s.key_id for s in reader.signatures], reader.signed_by, volumes)


def inspect_bundle(path: str) -> BundleInfo:
    """``edgebundle inspect``: header and index by seeking, entries not read."""
    if path != "-":
        path = volumeset.first_volume(path)
    if path == "-" or not os.path.isfile(path):
        raise UsageError(f"bundle {path} is not a file",
                         "inspect needs a seekable file; `edgebundle verify -` reads a stream")
    try:
        with volumeset.open_random(path) as fh:
            return read_index_from(fh, path)
    except OSError as exc:
        raise UsageError(f"cannot read bundle {path}: {exc.strerror}", "check the path") from None
