"""Device side: verify a bundle while streaming it into containerd or Docker.

Order of work (FORMAT.md, "Reading"):

1. header: version, required features, runtime fit;
2. the runtime's real inventory; every prerequisite must be satisfied, else refuse
   with the full list before touching anything;
3. entries, in one pass: each is verified (chunk xxh3, sha256) as it streams into the
   runtime; blobs the runtime already holds are verified and skipped;
4. index and footer verified; image records checked against entries + prerequisites;
5. only then are images created (containerd: renamed from temporary names; Docker:
   manifest.json sent last); any failure before this point aborts the runtime stream;
6. the inventory is read back and every imported image must be present and complete.

Needs only zstandard, msgpack and xxhash (plus the ``ctr`` binary or Docker socket).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict, List, Optional, Protocol, Sequence, Set

from ..errors import BundleFormatError, LoadError, PrerequisiteError, UsageError
from ..format import LAYER_FORM_TAR, LAYER_FORMS, BundleReader
from ..model import Inventory, chain_ids, check_digest
from ..plan import find_held, missing_prerequisites
from ..reference import normalize_name


class Loader(Protocol):
    def wants(self, digest: str, media_type: Optional[str]) -> bool: ...
    def add(self, digest: str, size: int, pieces: Any) -> None: ...
    def commit(self, records: Sequence[dict]) -> List[str]: ...
    def abort(self) -> None: ...


class Runtime(Protocol):
    kind: str
    namespace: Optional[str]

    def inventory(self) -> Inventory: ...
    def loader(self, inv: Inventory, platform: str) -> Loader: ...


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

    def to_json(self) -> Dict[str, Any]:
        return {"bundle": self.bundle, "site": self.site, "runtime": self.runtime,
                "imported": self.imported, "already_present": self.already_present,
                "entries_sent": self.entries_sent, "entries_skipped": self.entries_skipped,
                "bundle_bytes": self.bundle_bytes}


def is_present(inv: Inventory, name: str, top: str, config: str) -> bool:
    """The runtime holds image ``name`` with this content, complete."""
    return find_held(inv, name, top, config) is not None


def _summaries(header: Dict[str, Any], name: str) -> List[Dict[str, str]]:
    images = header.get("images")
    if not isinstance(images, list) or not all(
            isinstance(i, dict) and all(isinstance(i.get(k), str) for k in ("name", "top", "config"))
            for i in images):
        raise BundleFormatError(f"bundle {name}: header field 'images' is malformed")
    for image in images:
        try:
            normalize_name(image["name"])
            check_digest(image["top"])
            check_digest(image["config"])
        except (UsageError, ValueError) as exc:
            raise BundleFormatError(f"bundle {name}: header names an invalid image: {exc}") from None
    return images


def _validate_record(rec: Any, where: str) -> Dict[str, Any]:
    """Type-check one index image record; hostile shapes become BundleFormatError."""
    def bad(field: str) -> BundleFormatError:
        return BundleFormatError(f"{where}: field {field} is missing or malformed")

    def digest(value: Any, field: str) -> str:
        try:
            return check_digest(value, field)
        except ValueError:
            raise bad(field) from None

    def descriptor(value: Any, field: str) -> None:
        if not isinstance(value, dict) or not isinstance(value.get("mediaType"), str) or \
                not isinstance(value.get("size"), int) or isinstance(value.get("size"), bool):
            raise bad(field)
        digest(value.get("digest"), field + ".digest")

    if not isinstance(rec, dict):
        raise BundleFormatError(f"{where} is not a map")
    for key in ("name", "platform"):
        if not isinstance(rec.get(key), str):
            raise bad(key)
    for key in ("top", "manifest", "config"):
        descriptor(rec.get(key), key)
    layers = rec.get("layers")
    if not isinstance(layers, list):
        raise bad("layers")
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or layer.get("form") not in LAYER_FORMS:
            raise bad(f"layers[{i}].form")
        digest(layer.get("digest"), f"layers[{i}].digest")
        digest(layer.get("diff_id"), f"layers[{i}].diff_id")
    return rec


def _check_records(records: List[Any], summaries: List[Dict[str, str]], carried: Set[str],
                   inv: Inventory, name: str) -> None:
    """Every record matches its header summary and has each blob it needs somewhere."""
    if not isinstance(records, list) or \
            [r.get("name") if isinstance(r, dict) else None for r in records] != \
            [s["name"] for s in summaries]:
        raise BundleFormatError(f"bundle {name}: index images disagree with the header")
    for rec, summary in zip(records, summaries):
        _validate_record(rec, f"bundle {name}: image record {summary['name']}")
        top, config = rec["top"]["digest"], rec["config"]["digest"]
        needed_json = {top, rec["manifest"]["digest"], config}
        entries = [(l["diff_id"] if l["form"] == LAYER_FORM_TAR else l["digest"], l)
                   for l in rec["layers"]]
        if top != summary["top"] or config != summary["config"]:
            raise BundleFormatError(f"bundle {name}: image {summary['name']} differs between header and index")
        lacking = [d for d in needed_json if d not in carried and d not in inv.blobs]
        if inv.runtime == "docker":
            lacking = [config] if config not in carried else []
        chains = chain_ids(l["diff_id"] for _, l in entries)
        for (entry, layer), chain in zip(entries, chains):
            if entry in carried:
                continue
            if inv.runtime == "docker" and chain in inv.chains:
                continue
            if inv.runtime != "docker" and (layer["digest"] in inv.blobs or chain in inv.chains):
                continue
            lacking.append(entry)
        if lacking:
            raise PrerequisiteError(
                f"bundle {name}: image {summary['name']} needs content neither in the bundle "
                f"nor on the device: {', '.join(lacking)}", lacking,
                "repack against a fresh inventory report of this device")


def import_bundle(stream: BinaryIO, name: str, runtime: Runtime, *,
                  progress: Any = None) -> ImportResult:
    """Verify and import one bundle read front to back from ``stream``.

    ``progress``, if given, is called once with the total decoded bytes (or None) and
    returns a bar with ``update(n)``.
    """
    reader = BundleReader(stream, name)
    header = reader.header
    total = header.get("content_bytes")
    if progress is not None:
        progress = progress(total if isinstance(total, int) else None)
    summaries = _summaries(header, name)
    if runtime.kind == "containerd" and header.get("layer_form") == LAYER_FORM_TAR:
        raise LoadError(f"bundle {name} carries layers as plain tars (packed for Docker); "
                        "containerd needs the original blobs",
                        "repack for a containerd site (`pack --site` of a containerd site)")
    inv = runtime.inventory()
    prereqs = header.get("prerequisites") or []
    if not isinstance(prereqs, list) or not all(isinstance(p, dict) for p in prereqs):
        raise BundleFormatError(f"bundle {name}: header field 'prerequisites' is malformed")
    missing = missing_prerequisites(prereqs, inv, runtime.kind)
    if missing:
        listed = [str(p.get("digest") if runtime.kind == "containerd" else p.get("diff_id")) for p in missing]
        raise PrerequisiteError(
            f"device lacks {len(missing)} layer(s) bundle {name} builds on: {', '.join(listed)}",
            listed, "send a fresh `edgebundle report` to the packer and repack, "
                    "or import the earlier bundle first")
    result = ImportResult(bundle=name, site=header.get("site"), runtime=runtime.kind)
    todo = [s for s in summaries if not is_present(inv, s["name"], s["top"], s["config"])]
    result.already_present = [s["name"] for s in summaries if s not in todo]
    loader = runtime.loader(inv, str(header.get("platform") or "")) if todo else None
    carried: Set[str] = set()
    try:
        for entry in reader.entries():
            carried.add(entry.digest)
            if loader is not None and loader.wants(entry.digest, entry.media_type):
                loader.add(entry.digest, entry.size, _counting(entry.chunks(), progress))
                result.entries_sent += 1
            else:
                for piece in entry.chunks():
                    if progress is not None:
                        progress.update(len(piece))
                result.entries_skipped += 1
        assert reader.index is not None
        records = reader.index["images"]
        _check_records(records, summaries, carried, inv, name)
        if loader is not None:
            todo_names = {s["name"] for s in todo}
            result.imported = loader.commit([r for r in records if r["name"] in todo_names])
    except BaseException:
        if loader is not None:
            loader.abort()
        raise
    result.bundle_bytes = reader.total_size or 0
    after = runtime.inventory()
    absent = [s["name"] for s in summaries if not is_present(after, s["name"], s["top"], s["config"])]
    if absent:
        raise LoadError(f"after import the runtime does not hold complete: {', '.join(absent)}",
                        "check the runtime's logs; run `edgebundle report` to see its state")
    result.inventory = after
    return result


def _counting(pieces: Any, progress: Any) -> Any:
    for piece in pieces:
        if progress is not None:
            progress.update(len(piece))
        yield piece
