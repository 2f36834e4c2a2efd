"""What each site holds: the report JSON codec and the packer's per-site store.

The codec (``inventory_to_json`` / ``inventory_from_json``) also runs on devices
(Python 3.9+), so this module imports only the standard library and
``edgebundle.model`` / ``edgebundle.errors``: no yaml, httpx, paramiko or tqdm.

The store keeps one JSON file per site::

    $EDGEBUNDLE_HOME/sites/<site>/inventory.json       the last recorded report
    $EDGEBUNDLE_HOME/sites/<site>/inventory.prev.json  the one before it

Why plain files and not SQLite: a report is always replaced whole (never updated
in part), so a database buys no transactions we need; a JSON file stays
human-readable, diffable against ``inventory.prev.json`` when a delta looks
wrong, and can be copied to or from a USB stick for sites without a network.
Each write is atomic (temp file + fsync + rename), so a crash leaves either the
old or the new report, never half of one.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from .errors import InventoryError, UsageError, type_name
from .model import RUNTIMES, Descriptor, HeldImage, HeldLayer, Inventory, Platform, SiteSpec, check_digest

REPORT_VERSION = 1
REPORT_KIND = "edgebundle-inventory"

# A site name becomes a directory name: one safe path component, never "." or "..".
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_REPORT_HINT = "regenerate it on the device with `edgebundle report --json` (same edgebundle version as the packer)"


def check_site_name(name: object) -> str:
    """Return ``name`` if it is a valid site name, else raise ``InventoryError``."""
    if not isinstance(name, str) or not SITE_NAME_RE.match(name):
        raise InventoryError(f"invalid site name {name!r}",
                             "site names are letters, digits, '.', '_' and '-', starting with a letter or digit")
    return name


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 (``2024-05-01T12:00:00Z``), for ``generated_at``."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------
# Report JSON codec (device-safe)


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
             "blob": layer.blob, "unpacked": layer.unpacked}
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
        raise _bad("runtime.kind", f"unknown runtime {kind!r} (expected {' or '.join(RUNTIMES)})")
    images = _field(obj, "images", list, "images")
    extra = _field(obj, "extra", dict, "extra", required=False) or {}
    return Inventory(
        runtime=kind,
        namespace=_field(runtime, "namespace", str, "runtime.namespace", required=False),
        images=tuple(_image_from_json(item, f"images[{i}]") for i, item in enumerate(images)),
        blobs=frozenset(_digest_list(obj, "blobs")),
        chains=frozenset(_digest_list(obj, "chains")),
        generated_at=_field(obj, "generated_at", str, "generated_at", required=False) or "",
        host=_field(obj, "host", str, "host", required=False) or "",
        extra=dict(extra),
    )


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
        return check_digest(value, where)  # type: ignore[arg-type]
    except ValueError:
        raise _bad(where, f"{value!r} is not sha256:<64 lowercase hex>") from None


def _nonempty(value: str, where: str) -> str:
    if not value:
        raise _bad(where, "is empty")
    return value


def _bad(where: str, problem: str) -> InventoryError:
    return InventoryError(f"inventory report field {where}: {problem}", _REPORT_HINT)


_KIND_NAMES = {str: "a string", int: "an integer", bool: "true/false", list: "an array", dict: "an object"}


# ---------------------------------------------------------------------------
# Packer-side store


class InventoryStore:
    """Last known inventory of each site, as JSON files under ``home/sites/``."""

    def __init__(self, home: Union[str, "os.PathLike[str]"]) -> None:
        self.root = Path(home) / "sites"

    def path(self, site: str) -> Path:
        """The file holding ``site``'s inventory (it may not exist yet)."""
        return self.root / check_site_name(site) / "inventory.json"

    def sites(self) -> List[str]:
        """Names of the sites that have a recorded inventory, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if SITE_NAME_RE.match(p.name) and (p / "inventory.json").is_file())

    def record(self, site: str, report: Union[Mapping[str, Any], Inventory],
               spec: Optional[SiteSpec] = None) -> Inventory:
        """Validate a report and make it the site's current inventory.

        The previous inventory is kept as ``inventory.prev.json``.

        Args:
            site: The site name (a safe path component).
            report: The report JSON object (as pulled from the device) or an ``Inventory``.
            spec: The site as declared in the manifest; when given, the report's runtime
                and namespace must match it.

        Returns:
            The recorded inventory.

        Raises:
            InventoryError: The report is invalid, names another site, or does not
                match ``spec``.
        """
        check_site_name(site)
        if isinstance(report, Inventory):
            inv = report
        else:
            inv = inventory_from_json(report)
            named = report_site(report)
            if named is not None and named != site:
                raise InventoryError(f"report is for site {named!r}, not {site!r}",
                                     f"record it as site {named!r}, or pull the report from {site!r}'s device")
        if spec is not None:
            _check_matches_spec(site, inv, spec)
        data = (json.dumps(inventory_to_json(inv, site), indent=2, sort_keys=True) + "\n").encode()
        final = self.path(site)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            _atomic_write(final.with_name("inventory.prev.json"), final.read_bytes())
        _atomic_write(final, data)
        return inv

    def load_json(self, site: str) -> Optional[Dict[str, Any]]:
        """The stored report object of ``site``, or ``None`` if none was recorded."""
        path = self.path(site)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise InventoryError(f"cannot read inventory of site {site!r} ({path}): {exc}",
                                 "check the file's permissions, or pull the report again") from None
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise InventoryError(f"inventory of site {site!r} ({path}) is not valid JSON: {exc}",
                                 f"pull the report again; the previous one is {path.name[:-5]}.prev.json") from None
        return obj  # type: ignore[no-any-return]

    def load(self, site: str, runtime: Optional[str] = None, namespace: Optional[str] = None) -> Inventory:
        """The recorded inventory of ``site``.

        Args:
            site: The site name.
            runtime: The site's runtime. A site never recorded yields
                ``Inventory.empty(runtime, namespace)`` (so everything is sent); when
                given, a recorded inventory of another runtime is refused.
            namespace: The site's containerd namespace, checked likewise when given.

        Raises:
            InventoryError: Nothing recorded and no ``runtime`` given, the stored file
                is corrupt, or it does not match ``runtime``/``namespace``.
        """
        obj = self.load_json(site)
        if obj is None:
            if runtime is None:
                raise InventoryError(f"no inventory recorded for site {site!r}",
                                     f"run `edgebundle inventory pull {site}` or record a report from the device")
            return Inventory.empty(runtime, namespace)
        inv = inventory_from_json(obj)
        # A stale inventory of another runtime would make the delta skip layers the device lacks.
        if runtime is not None and inv.runtime != runtime:
            raise InventoryError(
                f"stored inventory of site {site!r} is from a {inv.runtime} device, but the site is {runtime}",
                f"pull a fresh report: `edgebundle inventory pull {site}`")
        if namespace is not None and inv.runtime == "containerd" and inv.namespace != namespace:
            raise InventoryError(
                f"stored inventory of site {site!r} is for namespace {inv.namespace!r}, not {namespace!r}",
                f"pull a fresh report: `edgebundle inventory pull {site}`")
        return inv


def _check_matches_spec(site: str, inv: Inventory, spec: SiteSpec) -> None:
    if inv.runtime != spec.runtime:
        raise InventoryError(
            f"report for site {site!r} is from a {inv.runtime} device, but site {spec.name} is {spec.runtime}",
            f"pull the report from the right device, or fix `runtime:` of site {spec.name} in the manifest")
    if spec.runtime == "containerd" and spec.namespace is not None and inv.namespace != spec.namespace:
        raise InventoryError(
            f"report for site {site!r} lists containerd namespace {inv.namespace!r}, "
            f"but site {spec.name} uses {spec.namespace!r}",
            f"rerun the report with --namespace {spec.namespace}, or fix `namespace:` in the manifest")


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
