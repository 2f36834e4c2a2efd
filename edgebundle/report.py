"""The inventory report: what a device's runtime really holds, as versioned JSON.

Written on the device (``edgebundle report``, ``import --report``) and read on the packer,
so this module imports only the standard library and device-side modules: no yaml,
httpx, paramiko or tqdm. Key names are specified in docs/FORMAT.md ("Inventory report"),
and a test holds the two together.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Dict, FrozenSet, List, Mapping, Optional

from .errors import InventoryError, UsageError, type_name
from .format import RUNTIME_DOCKER, RUNTIME_PODMAN, RUNTIMES
from .holdings import HeldImage, HeldLayer, Holdings, Inventory
from .oci import Descriptor, Platform, chain_ids, check_digest
from .specs import check_site_name

REPORT_VERSION = 1
REPORT_KIND = "edgebundle-inventory"

_REPORT_HINT = "regenerate it on the device with `edgebundle report --json` (same edgebundle version as the packer)"


def rfc3339(when: datetime.datetime) -> str:
    """``when`` (aware) as RFC 3339 UTC to the second: ``2024-05-01T12:00:00Z``."""
    return when.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339, for ``generated_at`` and a bundle's ``created``."""
    return rfc3339(datetime.datetime.now(datetime.timezone.utc))


# A report is read whole on the packer, and Python holds each JSON value in 30-70 bytes
# however short it is in the text (``[]`` is 2 bytes, a list 56), so a report is bounded
# in bytes and in values before it is parsed (FORMAT.md, "Inventory report"). A device
# of 600 images of 60 layers reports 14 MB and 332,000 values.
MAX_REPORT_BYTES = 16 << 20
MAX_REPORT_VALUES = 1 << 20


def check_report_bounds(text: str, what: str, hint: str) -> None:
    """Refuse a report too large to parse in memory proportional to a real one."""
    if len(text) > MAX_REPORT_BYTES:
        raise InventoryError(f"{what} is larger than {MAX_REPORT_BYTES >> 20} MiB, more than "
                             "a report may be", hint)
    # Every value but the first follows a ',' or opens a container; commas and brackets
    # inside strings only make this count larger, so it is an upper bound, cheap to take.
    values = text.count(",") + text.count("[") + text.count("{")
    if values > MAX_REPORT_VALUES:
        raise InventoryError(f"{what} has more than {MAX_REPORT_VALUES} JSON values", hint)


def load_json_object(text: str, what: str, hint: str) -> Dict[str, Any]:
    """``json.loads``, bounded; only ``ValueError`` (bad JSON) or ``InventoryError`` escape."""
    check_report_bounds(text, what, hint)
    try:
        obj = json.loads(text)
    except RecursionError:  # the C decoder recurses per nesting level
        raise InventoryError(f"{what} is nested too deeply to be a report", hint) from None
    if not isinstance(obj, dict):
        raise InventoryError(f"{what} is not a JSON object", hint)
    return obj


def parse_json_object(text: str, what: str, hint: str) -> Dict[str, Any]:
    """``text`` as a JSON object; anything else is an ``InventoryError`` naming ``what``."""
    try:
        return load_json_object(text, what, hint)
    except ValueError as exc:
        raise InventoryError(f"{what} is not valid JSON: {exc}", hint) from None


def inventory_to_json(inv: Inventory, site: Optional[str] = None) -> Dict[str, Any]:
    """Encode an inventory as the report JSON object.

    Lists are sorted so two reports of the same device diff cleanly.

    Args:
        inv: What the device holds. ``generated_at`` and ``host`` are written as given;
            the report writer fills them (see ``now_rfc3339``).
        site: The site name, when the device knows it.

    Returns:
        A JSON-serialisable dict following the version 1 schema.
    """
    return {
        "version": REPORT_VERSION,
        "kind": REPORT_KIND,
        "generated_at": inv.generated_at,
        "host": inv.host,
        "site": site,
        "runtime": {"kind": inv.runtime, "namespace": inv.namespace},
        "images": [_image_to_json(image) for image in inv.images],
        "blobs": sorted(inv.blobs),
        "chains": sorted(inv.chains),
        "features": sorted(inv.features),
        **({} if inv.trusted_keys is None else
           {"signatures": {"enforced": bool(inv.trusted_keys),
                           "trusted_keys": sorted(inv.trusted_keys)}}),
        "extra": dict(inv.extra),
    }


def _image_to_json(image: HeldImage) -> Dict[str, Any]:
    return {
        "name": image.name,
        "config": image.config,
        "target": image.target.to_json() if image.target else None,
        "manifest": image.manifest,
        "platform": image.platform,
        "complete": image.complete,
        "layers": [
            {"diff_id": layer.diff_id, "digest": layer.digest, "size": layer.size,
             "blob": layer.blob, "unpacked": layer.unpacked, "tar": layer.tar}
            for layer in image.layers
        ],
    }


def inventory_from_json(obj: object) -> Inventory:
    """Decode and strictly validate a report JSON object.

    Required: ``version`` (1), ``kind``, ``runtime.kind``, ``images``, ``blobs``,
    ``chains``; per image ``name``, ``config``, ``complete``, ``layers``; per layer
    ``diff_id``. Every other schema field may be absent or null, but when present
    its type is checked. Unknown keys are ignored so a newer device can add fields
    without breaking an older packer; incompatible changes bump ``version``.

    Raises:
        InventoryError: naming the first field that is missing or wrong.
    """
    if not isinstance(obj, dict):
        raise InventoryError(f"inventory report is a JSON {type_name(obj)}, not an object", _REPORT_HINT)
    if obj.get("kind") != REPORT_KIND:
        raise InventoryError(f"inventory report kind is {obj.get('kind')!r}, not {REPORT_KIND!r}",
                             "this file is not an edgebundle inventory report")
    version = obj.get("version")
    if type(version) is not int or version != REPORT_VERSION:
        raise InventoryError(f"inventory report version {version!r} is not supported (expected {REPORT_VERSION})",
                             "use the same edgebundle version on the packer and the device")
    runtime = _field(obj, "runtime", dict, "runtime")
    kind = _field(runtime, "kind", str, "runtime.kind")
    if kind not in RUNTIMES:
        raise _bad("runtime.kind", f"unknown runtime {kind!r} (expected {', '.join(RUNTIMES)})")
    images = _field(obj, "images", list, "images")
    extra = _field(obj, "extra", dict, "extra", required=False) or {}
    inv = Inventory(
        runtime=kind,
        namespace=_field(runtime, "namespace", str, "runtime.namespace", required=False),
        images=tuple(_image_from_json(item, f"images[{i}]") for i, item in enumerate(images)),
        blobs=frozenset(_digest_list(obj, "blobs")),
        chains=frozenset(_digest_list(obj, "chains")),
        generated_at=_field(obj, "generated_at", str, "generated_at", required=False) or "",
        host=_field(obj, "host", str, "host", required=False) or "",
        features=_features(obj),
        trusted_keys=_trusted_keys(obj),
        extra=dict(extra),
    )
    _check_complete_images_are_held(inv)
    return inv


def _check_complete_images_are_held(inv: Inventory) -> None:
    """A complete image's layers are held as its runtime needs them (FORMAT.md's rules).

    The packer trusts ``complete`` to skip an image and ``blobs``/``chains`` to skip its
    layers (``Holdings``); a report claiming an image complete whose layers it does not
    hold would make the next plan call the site up to date while the image cannot run.
    """
    holdings = Holdings(inv)
    docker = inv.runtime == RUNTIME_DOCKER
    podman = inv.runtime == RUNTIME_PODMAN
    for i, image in enumerate(inv.images):
        if not image.complete:
            continue
        where = f"images[{i}] ({image.name})"
        chains = chain_ids(layer.diff_id for layer in image.layers)
        for j, (layer, chain) in enumerate(zip(image.layers, chains)):
            if not holdings.layer(layer.digest or "", chain):
                held_as = ("its chain in chains" if docker else "its blob in blobs" if podman
                           else "its blob in blobs or its chain in chains")
                raise _bad(f"{where}.complete", f"is true, but layers[{j}] ({layer.diff_id}) is not "
                           f"held: the report lists neither {held_as}")
        if not docker and not podman and chains and chains[-1] not in inv.chains:
            raise _bad(f"{where}.complete", f"is true, but its top chain {chains[-1]} is not "
                       "unpacked (not in chains)")


def _trusted_keys(obj: Mapping[str, Any]) -> Optional[FrozenSet[str]]:
    """Absent in reports of devices older than signatures: unknown, not "none"."""
    sig = _field(obj, "signatures", dict, "signatures", required=False)
    if sig is None:
        return None
    enforced = _field(sig, "enforced", bool, "signatures.enforced")
    keys = _field(sig, "trusted_keys", list, "signatures.trusted_keys")
    if not all(isinstance(k, str) for k in keys):
        raise _bad("signatures.trusted_keys", "must list strings")
    if enforced != bool(keys):
        raise _bad("signatures.enforced", "disagrees with signatures.trusted_keys")
    return frozenset(keys)


def _features(obj: Mapping[str, Any]) -> FrozenSet[str]:
    """Absent in reports of devices older than deltas: they read no optional feature."""
    items = _field(obj, "features", list, "features", required=False) or []
    if not all(isinstance(f, str) for f in items):
        raise _bad("features", "must list strings")
    return frozenset(items)


def report_site(obj: Mapping[str, Any]) -> Optional[str]:
    """The ``site`` a report names (``None`` when the device did not know it)."""
    site = _field(obj, "site", str, "site", required=False)
    return check_site_name(site) if site is not None else None


def _image_from_json(obj: object, where: str) -> HeldImage:
    if not isinstance(obj, dict):
        raise _bad(where, f"expected an object, got {type_name(obj)}")
    manifest = _field(obj, "manifest", str, f"{where}.manifest", required=False)
    platform = _field(obj, "platform", str, f"{where}.platform", required=False)
    if platform is not None:
        try:
            Platform.parse(platform)
        except UsageError as exc:
            raise _bad(f"{where}.platform", exc.message) from None
    layers = _field(obj, "layers", list, f"{where}.layers")
    return HeldImage(
        name=_nonempty(_field(obj, "name", str, f"{where}.name"), f"{where}.name"),
        config=_digest(_field(obj, "config", str, f"{where}.config"), f"{where}.config"),
        target=_target(obj.get("target"), f"{where}.target"),
        manifest=_digest(manifest, f"{where}.manifest") if manifest is not None else None,
        platform=platform,
        complete=_field(obj, "complete", bool, f"{where}.complete"),
        layers=tuple(_layer_from_json(item, f"{where}.layers[{i}]") for i, item in enumerate(layers)),
    )


def _target(obj: object, where: str) -> Optional[Descriptor]:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise _bad(where, f"expected an object or null, got {type_name(obj)}")
    size = _field(obj, "size", int, f"{where}.size")
    if size < 0:
        raise _bad(f"{where}.size", f"negative size {size}")
    return Descriptor(_field(obj, "mediaType", str, f"{where}.mediaType"),
                      _digest(_field(obj, "digest", str, f"{where}.digest"), f"{where}.digest"), size)


def _layer_from_json(obj: object, where: str) -> HeldLayer:
    if not isinstance(obj, dict):
        raise _bad(where, f"expected an object, got {type_name(obj)}")
    digest = _field(obj, "digest", str, f"{where}.digest", required=False)
    size = _field(obj, "size", int, f"{where}.size", required=False)
    if size is not None and size < 0:
        raise _bad(f"{where}.size", f"negative size {size}")
    return HeldLayer(
        diff_id=_digest(_field(obj, "diff_id", str, f"{where}.diff_id"), f"{where}.diff_id"),
        digest=_digest(digest, f"{where}.digest") if digest is not None else None,
        size=size,
        blob=bool(_field(obj, "blob", bool, f"{where}.blob", required=False)),
        unpacked=bool(_field(obj, "unpacked", bool, f"{where}.unpacked", required=False)),
        tar=bool(_field(obj, "tar", bool, f"{where}.tar", required=False)),
    )


def _digest_list(obj: Mapping[str, Any], key: str) -> List[str]:
    items = _field(obj, key, list, key)
    return [_digest(item, f"{key}[{i}]") for i, item in enumerate(items)]


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str, *, required: bool = True) -> Any:
    """``obj[key]`` checked to be of JSON type ``kind``; absent/null allowed unless required."""
    value = obj.get(key)
    if value is None:
        if required:
            raise _bad(where, "missing" if key not in obj else "is null")
        return None
    # bool is a subclass of int in Python, but `"size": true` is not a size.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(where, f"expected {_KIND_NAMES.get(kind, kind.__name__)}, got {type_name(value)}")
    return value


def _digest(value: object, where: str) -> str:
    try:
        return check_digest(value, where)
    except ValueError:
        raise _bad(where, f"{value!r} is not sha256:<64 lowercase hex>") from None


def _nonempty(value: str, where: str) -> str:
    if not value:
        raise _bad(where, "is empty")
    return value


def _bad(where: str, problem: str) -> InventoryError:
    return InventoryError(f"inventory report field {where}: {problem}", _REPORT_HINT)


_KIND_NAMES = {str: "a string", int: "an integer", bool: "true/false", list: "an array", dict: "an object"}
