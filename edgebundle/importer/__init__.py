"""Device side: verify a bundle while streaming it into containerd or Docker.

Order of work (FORMAT.md, "Reading"):

1. header: version, required features, every field (``format.records``), runtime fit;
2. the runtime's real inventory; every prerequisite must be satisfied, else refuse
   with the full list before touching anything;
3. entries, in one pass: each is verified (chunk xxh3, sha256) as it streams into the
   runtime; blobs the runtime already holds are verified and skipped;
4. index and footer verified, and the index held to the header: every record's
   content is in the bundle or is a prerequisite (checked in step 2);
5. only then are images created (containerd: renamed from temporary names; Docker:
   manifest.json sent last); any failure before this point aborts the runtime stream;
6. the inventory is read back and every imported image must be present and complete.

Needs only zstandard, msgpack and xxhash (plus the ``ctr`` binary or Docker socket).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, ContextManager, Dict, Iterable, Iterator, List, Optional, Protocol, \
    Sequence

from ..errors import LoadError, PrerequisiteError
from ..format import (BLOB_RUNTIMES, LAYER_FORM_TAR, BaseLayer, BundleReader, EntryHead,
                      Header, ImageRecord, ImageSummary)
from ..format.reader import Verifier
from ..holdings import Holdings, Inventory
from ..progress import Bar
from ..rebuild import BaseTree, coalesced, rebuild
from ..space import ImportSpace

log = logging.getLogger(__name__)


class Loader(Protocol):
    """One import into a runtime: entries stream in, then ``commit`` or ``abort``."""

    def wants(self, head: EntryHead) -> bool:
        """Whether the runtime needs this entry's bytes (else it is verified and skipped)."""

    def add(self, digest: str, size: int, pieces: Iterator[bytes]) -> None:
        """Stream one entry's verified bytes; the iterator must be run to its end."""

    def add_rebuilt(self, diff_id: str, size: int, pieces: Iterator[bytes]) -> None:
        """Stream a layer tar a delta rebuilds; it is verified against ``diff_id`` at its end."""

    def commit(self, records: Sequence[ImageRecord]) -> List[str]:
        """Create the images; return the names now present and complete."""

    def abort(self) -> None:
        """Give up: whatever arrived must not become an image."""


class Runtime(Protocol):
    kind: str
    namespace: Optional[str]

    def inventory(self) -> Inventory: ...

    def loader(self, inv: Inventory, platform: str) -> Loader: ...

    def recover(self, wait: float) -> object:
        """Clean up after an interrupted import; the caller holds the device lock.

        ``wait``: seconds to wait for a runtime client an interrupted import left running
        (0: do nothing if one runs).
        """

    def reads_bases(self) -> bool:
        """Whether this runtime can serve layers' files as delta bases (``base_tree``)."""

    def base_tree(self, chain_id: str, diff_id: str) -> BaseTree:
        """The files of the applied layer ``chain_id``; ``PrerequisiteError`` if unreadable."""

    def base_tar(self, base: BaseLayer, inv: Inventory) -> ContextManager[BinaryIO]:
        """The layer's exact tar, rebuilt and verified (``rebuild.verified_tar``)."""


#: ``progress(total_decoded_bytes)`` -> a bar with ``update(n)``.
ProgressFactory = Callable[[Optional[int]], Bar]


@dataclass
class ImportResult:
    bundle: str
    site: Optional[str]
    runtime: str
    imported: List[str] = field(default_factory=list)
    already_present: List[str] = field(default_factory=list)
    entries_sent: int = 0
    entries_skipped: int = 0
    bundle_bytes: int = 0
    inventory: Optional[Inventory] = None
    signed_by: Optional[str] = None  # the trusted key whose signature was checked
    header: Optional[Header] = field(default=None, repr=False)

    def to_json(self) -> Dict[str, Any]:
        return {"bundle": self.bundle, "site": self.site, "runtime": self.runtime,
                "signed_by": self.signed_by,
                "imported": self.imported, "already_present": self.already_present,
                "entries_sent": self.entries_sent, "entries_skipped": self.entries_skipped,
                "bundle_bytes": self.bundle_bytes}


def import_bundle(stream: BinaryIO, name: str, runtime: Runtime, *,
                  progress: Optional[ProgressFactory] = None,
                  verifier: Optional[Verifier] = None,
                  space: Optional[ImportSpace] = None) -> ImportResult:
    """Verify and import one bundle read front to back from ``stream``.

    ``progress``, if given, is called once with the total decoded bytes and returns a
    bar with ``update(n)``. ``verifier`` (the device's trust policy) decides on the
    header and its signature before anything else happens. ``space``, if given, refuses
    (``SpaceError``) before the first byte reaches the runtime when the disk cannot hold
    the bundle, and before each entry that would not fit; a full disk met anyway is
    reported as such.
    """
    reader = BundleReader(stream, name, verifier)
    header = reader.header
    bar = progress(header.content_bytes) if progress is not None else None
    if runtime.kind in BLOB_RUNTIMES and header.layer_form == LAYER_FORM_TAR:
        raise LoadError(f"bundle {name} carries layers as plain tars (packed for Docker); "
                        f"{runtime.kind} needs the original blobs",
                        f"repack for a {runtime.kind} site (`pack --site` of a {runtime.kind} site)")
    holdings = Holdings(runtime.inventory())
    missing = holdings.missing_names(header.prerequisites)
    if missing:
        raise PrerequisiteError(
            f"device lacks {len(missing)} layer(s) bundle {name} builds on: {', '.join(missing)}",
            missing, "send a fresh `edgebundle report` to the packer and repack, "
                     "or import the earlier bundle first")
    log.info("bundle %s: %d image(s), %d prerequisite(s) all held", name, len(header.images),
             len(header.prerequisites))
    result = ImportResult(bundle=name, site=header.site, runtime=runtime.kind,
                          signed_by=reader.signed_by, header=header)
    todo = [s for s in header.images if not _held(holdings, s)]
    result.already_present = [s.name for s in header.images if s not in todo]
    for present in result.already_present:
        log.info("image %s is already present: skipping it", present)
    if space is not None and todo:
        space.preflight(name, header.content_bytes, header.unpacked_bytes, header.layer_form)
    loader = runtime.loader(holdings.inventory, header.platform) if todo else None
    try:
        for entry in reader.entries():
            delta = entry.head.delta
            if loader is not None and loader.wants(entry.head) and delta is not None:
                where = f"bundle {name} delta entry {entry.digest}"
                log.debug("%s: rebuilding layer %s from %d base layer(s)", where, delta.target,
                          len(delta.bases))
                if space is not None:
                    space.before_entry(where, delta.target_size)
                    spooled = sum(1 for b in delta.bases if b.tar)
                    if spooled:  # each base tar about the size of the layer it becomes
                        space.before_spool(where, spooled * delta.target_size)
                trees = [runtime.base_tree(b.chain_id, b.diff_id) for b in delta.bases]
                with contextlib.ExitStack() as stack:
                    tars = [stack.enter_context(runtime.base_tar(b, holdings.inventory))
                            if b.tar else None for b in delta.bases]
                    loader.add_rebuilt(delta.target, delta.target_size, _counting(
                        coalesced(rebuild(delta, entry.chunks(), trees, where, tars)), bar))
                result.entries_sent += 1
            elif loader is not None and loader.wants(entry.head):
                log.debug("entry %s (%d bytes): to the runtime", entry.digest, entry.size)
                if space is not None:
                    space.before_entry(f"bundle {name} entry {entry.digest}", entry.size)
                loader.add(entry.digest, entry.size, _counting(entry.chunks(), bar))
                result.entries_sent += 1
            else:
                log.debug("entry %s (%d bytes): verified, not needed", entry.digest, entry.size)
                for piece in entry.chunks():
                    if bar is not None:
                        bar.update(len(piece))
                result.entries_skipped += 1
        index = reader.index
        assert index is not None  # entries() ran to its end
        if loader is not None:
            wanted = {s.name for s in todo}
            result.imported = loader.commit([r for r in index.images if r.name in wanted])
    except BaseException as exc:
        if loader is not None:
            loader.abort()
        full = space.disk_full(exc, name) if space is not None else None
        if full is not None:
            raise full from None
        raise
    result.bundle_bytes = reader.total_size or 0
    after = Holdings(runtime.inventory())
    absent = [s.name for s in header.images if not _held(after, s)]
    if absent:
        raise LoadError(f"after import the runtime does not hold complete: {', '.join(absent)}",
                        "check the runtime's logs; run `edgebundle report` to see its state")
    result.inventory = after.inventory
    return result


def _held(holdings: Holdings, image: ImageSummary) -> bool:
    return holdings.image(image.name, image.top, image.config) is not None


def _counting(pieces: Iterable[bytes], bar: Optional[Bar]) -> Iterator[bytes]:
    for piece in pieces:
        if bar is not None:
            bar.update(len(piece))
        yield piece
