"""The packer's per-site state: the last inventory each site reported.

One JSON file per site::

    $EDGEBUNDLE_HOME/sites/<site>/inventory.json       the last recorded report
    $EDGEBUNDLE_HOME/sites/<site>/inventory.prev.json  the one before it
    $EDGEBUNDLE_HOME/sites/<site>/manifest             the manifest list last used for it

Why plain files and not SQLite: a report is always replaced whole (never updated
in part), so a database buys no transactions we need; a JSON file stays
human-readable, diffable against ``inventory.prev.json`` when a delta looks
wrong, and can be copied to or from a USB stick for sites without a network.
Each write is atomic (``files.atomic_write``), so a crash leaves either the old or
the new report, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

from .errors import InventoryError
from .files import atomic_write
from .holdings import Inventory
from .report import inventory_from_json, inventory_to_json, parse_json_object, report_site
from .specs import SITE_NAME_RE, SiteSpec, check_site_name


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
            atomic_write(final.with_name("inventory.prev.json"), final.read_bytes())
        atomic_write(final, data)
        return inv

    def remember_manifest(self, site: str, manifest_path: str) -> None:
        """So ``inventory pull SITE`` can find the site's SSH address without ``-m``."""
        path = self.root / check_site_name(site) / "manifest"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = os.path.abspath(manifest_path) + "\n"
        try:
            if path.read_text(encoding="utf-8") == text:
                return  # planning a fleet every hour need not rewrite a thousand files
        except (OSError, UnicodeDecodeError):
            pass
        atomic_write(path, text.encode())

    def remembered_manifest(self, site: str) -> Optional[str]:
        """The manifest list last used to plan or pack ``site``, if any."""
        path = self.root / check_site_name(site) / "manifest"
        try:
            return path.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise InventoryError(f"cannot read {path}: {exc}",
                                 "pass the manifest list with -m, or delete that file") from None

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
        return parse_json_object(text, f"inventory of site {site!r} ({path})",
                                 f"pull the report again; the previous one is {path.name[:-5]}.prev.json")

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
