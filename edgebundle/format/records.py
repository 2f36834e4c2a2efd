"""The bundle's records as typed values, and the one parser that builds them.

Every rule of docs/FORMAT.md about what a record may contain lives here: field types,
enumerations, ``volume`` nil, digests, the header/index agreement and the coverage of
every image record by entries or prerequisites. ``parse_header``, ``parse_entry_head``,
``parse_index`` and ``check_index`` raise only ``BundleFormatError``, naming the field.
``verify``, ``import`` and ``inspect`` all read bundles through them, so a bundle is
judged the same way everywhere.

Records are frozen dataclasses with ``to_wire()`` (the msgpack map the writer emits) and
a parser for the other direction. New kinds slot in here: a new entry kind is a new
head class registered in ``_ENTRY_PARSERS`` behind a required feature, a new header
field (``volume``, signatures) a new typed field with its own check.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from ..errors import BundleFormatError, UsageError
from ..oci import Descriptor, Platform, chain_ids, check_digest, describing_blobs
from ..naming import check_device_name, check_reference_host, name_clash
from ..reference import parse_reference
from ..specs import NAMESPACE_RE, SITE_NAME_HINT, SITE_NAME_RE
from . import (CODECS, FEATURE_DELTA, FEATURE_SIGNATURE, KIND_BLOB, KIND_DELTA, KNOWN_FEATURES,
               LAYER_FORM_BLOB, LAYER_FORM_TAR, LAYER_FORMS, MAX_ENTRIES, MAX_FEATURES,
               MAX_FIELD_STRING, MAX_IMAGES, MAX_LAYERS, MAX_PREREQUISITES, MAX_RECORD_OBJECTS,
               RUNTIMES, BLOB_RUNTIMES)

SPEC_HINT = ("the bundle breaks docs/FORMAT.md, so it was not written by a compatible "
             "edgebundle (or was altered after packing): repack it")
UPGRADE_HINT = "upgrade edgebundle on this device"


# ---------------------------------------------------------------------------
# Typed records


@dataclass(frozen=True)
class Prerequisite:
    """A layer the site must already hold: satisfied by the blob or by the chain."""

    chain_id: str
    diff_id: str
    digest: str

    def to_wire(self) -> Dict[str, Any]:
        return {"chain_id": self.chain_id, "diff_id": self.diff_id, "digest": self.digest}


@dataclass(frozen=True)
class ImageSummary:
    """The header's short form of an image record: enough to decide before any entry."""

    name: str
    top: str
    config: str

    def to_wire(self) -> Dict[str, Any]:
        return {"name": self.name, "top": self.top, "config": self.config}


@dataclass(frozen=True)
class Commitments:
    """What a header commits to: the sha256 of every entry record and of the image records.

    A signature over the header therefore covers every byte a device acts on: each entry
    record is checked against its commitment before its bytes are used, the entry's
    bytes against the record's digest, and the index's image records at the end
    (``format.signature``).
    """

    entries: Tuple[bytes, ...]  # per entry, in bundle order
    images: bytes

    def to_wire(self) -> Dict[str, Any]:
        return {"entries": list(self.entries), "images": self.images}


@dataclass(frozen=True)
class Header:
    """Everything a device needs to decide before the first entry arrives."""

    site: Optional[str]
    runtime: str
    namespace: Optional[str]
    platform: str
    layer_form: str
    prerequisites: Tuple[Prerequisite, ...]
    images: Tuple[ImageSummary, ...]
    content_bytes: int
    created: str
    tool: str
    required_features: Tuple[str, ...] = ()
    volume: None = None  # reserved for multi-volume bundles; nil in version 1
    commitments: Optional[Commitments] = None
    # Sum of the shipped layers' tar sizes: the disk pre-flight's unpack estimate
    # (``space``). Optional: None when absent (older packers) or unknown.
    unpacked_bytes: Optional[int] = None

    @functools.cached_property
    def prerequisite_chains(self) -> FrozenSet[Tuple[str, str]]:
        """``(chain_id, diff_id)`` of every prerequisite, built once (not once per entry)."""
        return frozenset((p.chain_id, p.diff_id) for p in self.prerequisites)

    def to_wire(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "commitments": self.commitments.to_wire() if self.commitments else None,
            "content_bytes": self.content_bytes,
            "site": self.site,
            "runtime": self.runtime,
            "namespace": self.namespace,
            "platform": self.platform,
            "layer_form": self.layer_form,
            "prerequisites": [p.to_wire() for p in self.prerequisites],
            "images": [i.to_wire() for i in self.images],
            "created": self.created,
            "tool": self.tool,
            "required_features": list(self.required_features),
            "volume": self.volume,
        }
        if self.unpacked_bytes is not None:
            out["unpacked_bytes"] = self.unpacked_bytes
        return out


@dataclass(frozen=True)
class BaseLayer:
    """A layer the site holds that a delta reads from (named by its chain).

    ``tar``: the delta also copies byte ranges of this layer's own tar, which the device
    must rebuild exactly (and verify against ``diff_id``) before the entry is applied.
    """

    chain_id: str
    diff_id: str
    tar: bool = False

    def to_wire(self) -> Dict[str, Any]:
        return {"chain_id": self.chain_id, "diff_id": self.diff_id, "tar": self.tar}


@dataclass(frozen=True)
class DeltaHead:
    """What a delta entry rebuilds (``target``) and what it reads from (FORMAT.md)."""

    target: str  # diff_id of the rebuilt tar: checked before the layer is committed
    target_size: int
    bases: Tuple[BaseLayer, ...]

    def to_wire(self) -> Dict[str, Any]:
        return {"target": self.target, "target_size": self.target_size,
                "bases": [b.to_wire() for b in self.bases]}


@dataclass(frozen=True)
class EntryHead:
    """The record in front of an entry's chunks."""

    kind: str
    digest: str
    size: int  # decoded bytes
    codec: int
    level: Optional[int] = None  # zstd level, informational
    media_type: Optional[str] = None
    delta: Optional[DeltaHead] = None  # kind "delta" only

    def to_wire(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"kind": self.kind, "digest": self.digest, "size": self.size,
                               "codec": self.codec}
        if self.level is not None:
            out["level"] = self.level
        if self.media_type:
            out["media_type"] = self.media_type
        if self.delta is not None:
            out.update(self.delta.to_wire())
        return out

    @property
    def layer(self) -> str:
        """The layer identity this entry gives the runtime: its digest, or a delta's target."""
        return self.delta.target if self.delta is not None else self.digest


@dataclass(frozen=True)
class IndexEntry:
    """Where an entry landed and what it cost (the index's entry table)."""

    digest: str
    kind: str
    size: int
    codec: int
    stored_size: int  # bytes of chunk payload in the bundle
    offset: int  # of the entry record's tag byte
    target: Optional[str] = None  # kind "delta": the diff_id it rebuilds

    def to_wire(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"digest": self.digest, "kind": self.kind, "size": self.size,
                               "codec": self.codec, "stored_size": self.stored_size,
                               "offset": self.offset}
        if self.target is not None:
            out["target"] = self.target
        return out

    @classmethod
    def of(cls, head: EntryHead, stored_size: int, offset: int) -> "IndexEntry":
        return cls(head.digest, head.kind, head.size, head.codec, stored_size, offset,
                   head.delta.target if head.delta is not None else None)


@dataclass(frozen=True)
class LayerRecord:
    """One layer of an image record, in rootfs order."""

    media_type: str
    digest: str  # the registry blob
    size: int
    diff_id: str  # the uncompressed tar
    tar_size: int  # -1 when the packer never decompressed it
    form: str  # LAYER_FORM_BLOB | LAYER_FORM_TAR

    @property
    def entry(self) -> str:
        """The digest of the bundle entry that carries this layer, if one does."""
        return self.diff_id if self.form == LAYER_FORM_TAR else self.digest

    def to_wire(self) -> Dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size,
                "diff_id": self.diff_id, "tar_size": self.tar_size, "form": self.form}


@dataclass(frozen=True)
class ImageRecord:
    """What the importer creates for one image (FORMAT.md, "Image record")."""

    name: str  # the device name: repo:tag, or repo@sha256:... when pinned
    ref: str
    platform: str
    top: Descriptor
    manifest: Descriptor
    config: Descriptor
    layers: Tuple[LayerRecord, ...]

    @property
    def summary(self) -> ImageSummary:
        return ImageSummary(self.name, self.top.digest, self.config.digest)

    @property
    def json_blobs(self) -> Tuple[Descriptor, ...]:
        """Index (if any), manifest and config, each once."""
        return describing_blobs(self.top, self.manifest, self.config)

    @property
    def chain_ids(self) -> Tuple[str, ...]:
        return chain_ids(layer.diff_id for layer in self.layers)

    def to_wire(self) -> Dict[str, Any]:
        return {"name": self.name, "ref": self.ref, "platform": self.platform,
                "top": self.top.to_json(), "manifest": self.manifest.to_json(),
                "config": self.config.to_json(), "layers": [l.to_wire() for l in self.layers]}


@dataclass(frozen=True)
class Index:
    """The record after the last entry: the entry table and the image records."""

    entries: Tuple[IndexEntry, ...]
    images: Tuple[ImageRecord, ...]

    @property
    def carried(self) -> FrozenSet[str]:
        """Digests of every entry the bundle carries."""
        return frozenset(e.digest for e in self.entries)

    @property
    def rebuilt(self) -> FrozenSet[str]:
        """diff_ids of the layer tars the bundle's delta entries rebuild."""
        return frozenset(e.target for e in self.entries if e.target is not None)

    def to_wire(self) -> Dict[str, Any]:
        return {"entries": [e.to_wire() for e in self.entries],
                "images": [i.to_wire() for i in self.images]}


# ---------------------------------------------------------------------------
# Field access that names what is wrong


# os/arch[/variant] as writers emit it (``str(Platform)``): lowercase ASCII words.
_PLATFORM_RE = re.compile(r"\A[a-z0-9][a-z0-9._-]*(?:/[a-z0-9][a-z0-9._-]*){1,2}\Z", re.ASCII)


def _kind(value: object) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (bytes, bytearray)):
        return "binary"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


def _raw_sha256(value: object, f: "_Fields", key: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        size = f" of {len(value)} bytes" if isinstance(value, bytes) else ""
        raise f.fail(key, f"holds {_kind(value)}{size}, not a 32-byte sha256")
    return value


def _show(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut short: a hostile field must not make a megabyte of message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class _Fields:
    """Typed reads of one msgpack map; failures name the record and the field."""

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise BundleFormatError(f"{where} is {_kind(obj)}, not a map", SPEC_HINT)
        self.obj: Dict[str, Any] = obj
        self.where = where

    def fail(self, key: str, problem: str, hint: str = SPEC_HINT) -> BundleFormatError:
        return BundleFormatError(f"{self.where} field {key!r} {problem}", hint)

    def _get(self, key: str) -> Any:
        if key not in self.obj:
            raise self.fail(key, "is missing")
        return self.obj[key]

    def string(self, key: str, *, nullable: bool = False, optional: bool = False) -> Optional[str]:
        if optional and key not in self.obj:
            return None
        value = self._get(key)
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            raise self.fail(key, f"is {_kind(value)}, not a string" + (" or nil" if nullable else ""))
        if len(value) > MAX_FIELD_STRING:
            raise self.fail(key, f"is {len(value)} characters long (limit {MAX_FIELD_STRING})")
        return value

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self.fail(key, f"is {_kind(value)}, not a boolean")
        return value

    def text(self, key: str) -> str:
        value = self.string(key)
        assert value is not None
        return value

    def integer(self, key: str, *, minimum: int = 0, optional: bool = False) -> Optional[int]:
        if optional and key not in self.obj:
            return None
        value = self._get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, f"is {_kind(value)}, not an integer")
        if value < minimum:
            raise self.fail(key, f"is {value}, below the minimum {minimum}")
        return value

    def count(self, key: str, *, minimum: int = 0) -> int:
        value = self.integer(key, minimum=minimum)
        assert value is not None
        return value

    def digest(self, key: str) -> str:
        value = self._get(key)
        try:
            return check_digest(value)
        except ValueError:
            raise self.fail(key, f"is {_show(value)}, not sha256:<64 lowercase hex>") from None

    def choice(self, key: str, choices: Sequence[Any], hint: str = SPEC_HINT) -> Any:
        value = self._get(key)
        if isinstance(value, bool) or value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise self.fail(key, f"is {_show(value)}, not one of {allowed}", hint)
        return value

    def items(self, key: str, maximum: int = MAX_RECORD_OBJECTS) -> List[Any]:
        """A list field; its spec limit (the default: the record's object budget, which a
        decoded list cannot exceed anyway) is checked before any item is parsed."""
        value = self._get(key)
        if not isinstance(value, list):
            raise self.fail(key, f"is {_kind(value)}, not a list")
        if len(value) > maximum:
            raise self.fail(key, f"lists {len(value)} items (limit {maximum})")
        return value

    def raw_digest(self, key: str) -> bytes:
        """A raw 32-byte sha256 (commitments are binary: half the bytes of hex)."""
        return _raw_sha256(self._get(key), self, key)

    def raw_digests(self, key: str) -> Tuple[bytes, ...]:
        return tuple(_raw_sha256(item, self, key) for item in self.items(key, MAX_ENTRIES))

    def nil(self, key: str, why: str) -> None:
        value = self._get(key)
        if value is not None:
            raise self.fail(key, f"is {_kind(value)}; {why}")

    def descriptor(self, key: str) -> Descriptor:
        sub = _Fields(self._get(key), f"{self.where} field {key!r}")
        return Descriptor(sub.text("mediaType"), sub.digest("digest"), sub.count("size"))

    def platform(self, key: str) -> str:
        value = self.text(key)
        try:
            if not _PLATFORM_RE.match(value):  # parse() forgives case and spaces; a bundle may not
                raise UsageError(value)
            Platform.parse(value)
        except UsageError:
            raise self.fail(key, f"is {_show(value)}, not os/arch[/variant]") from None
        return value

    def image_name(self, key: str, *, device: bool = True) -> str:
        """A reference; with ``device``, a name the importer may create (``check_device_name``)."""
        value = self.text(key)
        if len(value) > 512:  # name (255) + tag (128) + digest (71), with room to spare
            raise self.fail(key, f"is {len(value)} characters long, not an image name")
        try:
            if device:
                check_device_name(value)
            else:
                check_reference_host(parse_reference(value), value)
        except UsageError as exc:
            raise self.fail(key, f"is not a valid image name: {exc.message}") from None
        return value

    def site_name(self, key: str) -> Optional[str]:
        value = self.string(key, nullable=True)
        if value is not None and not SITE_NAME_RE.match(value):
            raise self.fail(key, f"is {_show(value)}, not a site name ({SITE_NAME_HINT})")
        return value

    def namespace(self, key: str) -> Optional[str]:
        value = self.string(key, nullable=True)
        if value is not None and not NAMESPACE_RE.match(value):
            raise self.fail(key, f"is {_show(value)}, not a containerd namespace")
        return value


# ---------------------------------------------------------------------------
# Parsers


def check_features(obj: object, name: str) -> Tuple[str, ...]:
    """The header's ``required_features``; any this reader lacks refuses the bundle.

    Checked before every other header field: a bundle of a newer kind must say
    "upgrade", not "malformed".
    """
    fields = _Fields(obj, f"bundle {name} header")
    features = fields.items("required_features", MAX_FEATURES)
    if not all(isinstance(f, str) for f in features):
        raise fields.fail("required_features", "must list strings")
    unknown = sorted(f for f in features if f not in KNOWN_FEATURES)
    if unknown:
        raise BundleFormatError(f"bundle {name} requires unsupported features: "
                                f"{_show(', '.join(unknown), 200)}",
                                UPGRADE_HINT)
    return tuple(features)


def parse_header(obj: object, name: str) -> Header:
    """The header record, every field checked (FORMAT.md, "Header")."""
    features = check_features(obj, name)
    f = _Fields(obj, f"bundle {name} header")
    f.nil("volume", "format version 1 has no multi-volume bundles (it must be nil)")
    runtime = f.choice("runtime", RUNTIMES)
    layer_form = f.choice("layer_form", LAYER_FORMS)
    if runtime in BLOB_RUNTIMES and layer_form != LAYER_FORM_BLOB:
        raise f.fail("layer_form", f"is {layer_form!r}, but {runtime} bundles carry layers as "
                     f"{LAYER_FORM_BLOB!r} (the registry's blobs keep their digests)")
    prerequisites = tuple(_prerequisite(item, f"bundle {name} header prerequisites[{i}]")
                          for i, item in enumerate(f.items("prerequisites", MAX_PREREQUISITES)))
    images = tuple(_summary(item, f"bundle {name} header images[{i}]")
                   for i, item in enumerate(f.items("images", MAX_IMAGES)))
    counts = Counter(i.name for i in images)  # not list.count: n images must cost O(n)
    twice = sorted(n for n, c in counts.items() if c > 1)
    if twice:
        raise f.fail("images", f"names {_show(', '.join(twice), 200)} more than once")
    # Distinct names can still land on one runtime name (Docker's repo:sha256-<hex> tag
    # of a pinned image, CRI's repo@top): refused here, before the runtime is touched.
    clash = name_clash((i.name, i.top, i.config) for i in images)
    if clash is not None:
        raise f.fail("images", f"names one image twice: {clash}")
    return Header(
        site=f.site_name("site"),
        runtime=runtime,
        namespace=f.namespace("namespace"),
        platform=f.platform("platform"),
        layer_form=layer_form,
        prerequisites=prerequisites,
        images=images,
        content_bytes=f.count("content_bytes"),
        created=f.text("created"),
        tool=f.text("tool"),
        required_features=features,
        commitments=_commitments(f, features),
        unpacked_bytes=f.integer("unpacked_bytes", optional=True),
    )


def _commitments(header: _Fields, features: Tuple[str, ...]) -> Optional[Commitments]:
    """The header's commitments: optional, but required when the bundle is signed."""
    value = header.obj.get("commitments")
    if value is None:
        if FEATURE_SIGNATURE in features:
            raise header.fail("commitments", f"is missing, but a {FEATURE_SIGNATURE!r} bundle "
                              "must commit to its entries")
        return None
    f = _Fields(value, f"{header.where} field 'commitments'")
    return Commitments(f.raw_digests("entries"), f.raw_digest("images"))


def _prerequisite(obj: object, where: str) -> Prerequisite:
    f = _Fields(obj, where)
    return Prerequisite(f.digest("chain_id"), f.digest("diff_id"), f.digest("digest"))


def _summary(obj: object, where: str) -> ImageSummary:
    f = _Fields(obj, where)
    summary = ImageSummary(f.image_name("name"), f.digest("top"), f.digest("config"))
    pinned = parse_reference(summary.name).digest
    if pinned is not None and pinned != summary.top:
        # The name promises the content: repo@X must run X (and CRI finds it by X).
        raise f.fail("top", f"is {summary.top}, but the image is named by digest {pinned}")
    return summary


def _blob_head(f: _Fields) -> EntryHead:
    return EntryHead(kind=KIND_BLOB, digest=f.digest("digest"), size=f.count("size"),
                     codec=f.choice("codec", CODECS, "this bundle needs a newer edgebundle"),
                     level=f.integer("level", minimum=-(1 << 17), optional=True),
                     media_type=f.string("media_type", nullable=True, optional=True))


def _delta_head(f: _Fields) -> EntryHead:
    bases = []
    for i, item in enumerate(f.items("bases", MAX_PREREQUISITES)):
        b = _Fields(item, f"{f.where} bases[{i}]")
        bases.append(BaseLayer(b.digest("chain_id"), b.digest("diff_id"), b.boolean("tar")))
    delta = DeltaHead(f.digest("target"), f.count("target_size"), tuple(bases))
    return EntryHead(kind=KIND_DELTA, digest=f.digest("digest"), size=f.count("size"),
                     codec=f.choice("codec", CODECS, "this bundle needs a newer edgebundle"),
                     level=f.integer("level", minimum=-(1 << 17), optional=True),
                     media_type=f.string("media_type", nullable=True, optional=True), delta=delta)


# Entry kinds this reader understands, by name. A kind a required feature adds registers
# its parser here; any other kind is refused.
_ENTRY_PARSERS: Dict[str, Callable[[_Fields], EntryHead]] = {KIND_BLOB: _blob_head,
                                                             KIND_DELTA: _delta_head}


def parse_entry_head(obj: object, where: str) -> EntryHead:
    f = _Fields(obj, where)
    kind = f.text("kind")
    parser = _ENTRY_PARSERS.get(kind)
    if parser is None:
        raise f.fail("kind", f"is {_show(kind)}, an entry kind this edgebundle does not know",
                     "this bundle needs a newer edgebundle")
    return parser(f)


def check_entry(head: EntryHead, header: Header, where: str) -> None:
    """An entry head agrees with its header: a delta is announced and builds on prerequisites.

    A delta's bases must be header prerequisites, so a device that lacks one refuses the
    bundle before it touches the runtime, with the full list.
    """
    if head.delta is None:
        return
    if FEATURE_DELTA not in header.required_features:
        raise BundleFormatError(f"{where} is a delta entry, but the header does not require "
                                f"{FEATURE_DELTA!r}", SPEC_HINT)
    for i, base in enumerate(head.delta.bases):
        if (base.chain_id, base.diff_id) not in header.prerequisite_chains:
            raise BundleFormatError(f"{where} bases[{i}] (chain {base.chain_id}) is not a "
                                    "prerequisite of the bundle", SPEC_HINT)


def _index_entry(obj: object, where: str) -> IndexEntry:
    f = _Fields(obj, where)
    kind = f.text("kind")
    return IndexEntry(digest=f.digest("digest"), kind=kind, size=f.count("size"),
                      codec=f.count("codec"), stored_size=f.count("stored_size"),
                      offset=f.count("offset"),
                      target=f.digest("target") if kind == KIND_DELTA else None)


def _layer(obj: object, where: str) -> LayerRecord:
    f = _Fields(obj, where)
    return LayerRecord(media_type=f.text("mediaType"), digest=f.digest("digest"),
                       size=f.count("size"), diff_id=f.digest("diff_id"),
                       tar_size=f.count("tar_size", minimum=-1), form=f.choice("form", LAYER_FORMS))


def _image(obj: object, where: str) -> ImageRecord:
    f = _Fields(obj, where)
    name = f.image_name("name")
    f.where = f"{where} ({name})"
    layers = tuple(_layer(item, f"{f.where} layers[{i}]")
                   for i, item in enumerate(f.items("layers", MAX_LAYERS)))
    return ImageRecord(name=name, ref=f.image_name("ref", device=False), platform=f.platform("platform"),
                       top=f.descriptor("top"), manifest=f.descriptor("manifest"),
                       config=f.descriptor("config"), layers=layers)


def parse_index(obj: object, name: str) -> Index:
    """The index record's shapes (agreement is ``check_index``'s job)."""
    f = _Fields(obj, f"bundle {name} index")
    entries = tuple(_index_entry(item, f"bundle {name} index entries[{i}]")
                    for i, item in enumerate(f.items("entries", MAX_ENTRIES)))
    images = tuple(_image(item, f"bundle {name} index images[{i}]")
                   for i, item in enumerate(f.items("images", MAX_IMAGES)))
    return Index(entries, images)


def check_index(index: Index, header: Header, name: str,
                seen: Optional[Sequence[IndexEntry]] = None) -> None:
    """The index agrees with the header and (when ``seen`` is given) with the stream.

    Invariants (FORMAT.md): the index lists exactly the entries the stream carried; its
    image records are the header's images, in order, with the same top and config;
    each record's layers are in the header's layer form; each record's index, manifest
    and config are entries; each layer is an entry or is named by a prerequisite.
    """
    where = f"bundle {name}"
    if seen is not None:
        if len(index.entries) != len(seen):
            raise BundleFormatError(f"{where}: index lists {len(index.entries)} entries, the "
                                    f"stream carried {len(seen)}", SPEC_HINT)
        for listed, actual in zip(index.entries, seen):
            if listed != actual:
                raise BundleFormatError(f"{where}: index disagrees with entry {actual.digest} "
                                        f"(index says {listed}, stream had {actual})", SPEC_HINT)
    names = [r.name for r in index.images]
    wanted = [s.name for s in header.images]
    if names != wanted:
        raise BundleFormatError(f"{where}: index images {names} disagree with the header's "
                                f"{wanted}", SPEC_HINT)
    carried = index.carried | index.rebuilt
    prereqs: Set[Tuple[str, str, str]] = {(p.chain_id, p.diff_id, p.digest)
                                          for p in header.prerequisites}
    for i, (rec, summary) in enumerate(zip(index.images, header.images)):
        what = f"{where} index images[{i}] ({rec.name})"
        if rec.summary != summary:
            raise BundleFormatError(f"{what} differs from the header: top {rec.top.digest}, config "
                                    f"{rec.config.digest} vs {summary.top}, {summary.config}", SPEC_HINT)
        for blob in rec.json_blobs:
            if blob.digest not in carried:
                raise BundleFormatError(f"{what} needs {blob.digest} ({blob.media_type}), which "
                                        "the bundle does not carry", SPEC_HINT)
        for j, (layer, chain) in enumerate(zip(rec.layers, rec.chain_ids)):
            if layer.form != header.layer_form:
                raise BundleFormatError(f"{what} layers[{j}] field 'form' is {layer.form!r}, but the "
                                        f"header's layer_form is {header.layer_form!r}", SPEC_HINT)
            if (layer.entry not in carried and layer.diff_id not in carried
                    and (chain, layer.diff_id, layer.digest) not in prereqs):
                raise BundleFormatError(f"{what} layers[{j}] ({layer.entry}) is neither an entry "
                                        "of the bundle, nor rebuilt by one, nor a prerequisite",
                                        SPEC_HINT)
    layers = {layer.diff_id for rec in index.images for layer in rec.layers}
    for entry in index.entries:
        if entry.target is not None and entry.target not in layers:
            raise BundleFormatError(f"{where}: delta entry {entry.digest} rebuilds {entry.target}, "
                                    "a layer of no image in the bundle", SPEC_HINT)


__all__ = [
    "BaseLayer", "Commitments", "DeltaHead", "EntryHead", "Header", "ImageRecord", "ImageSummary",
    "Index", "IndexEntry", "LayerRecord", "Prerequisite", "check_entry", "check_features",
    "check_index", "parse_entry_head", "parse_header",
    "parse_index",
]
