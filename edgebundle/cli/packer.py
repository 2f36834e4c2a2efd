"""Packer commands: plan, pack, inventory. Needs the ``packer`` extra."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from tqdm import tqdm

from ..cache import BlobCache, default_home
from ..errors import ManifestError, UsageError
from ..inventory import InventoryStore, inventory_from_json, inventory_to_json
from ..manifest import load_manifest
from ..model import Inventory, ManifestList, ResolvedImage, SiteSpec
from ..plan import Plan, plan_bundle
from .main import emit_json


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home) if args.home else default_home()


def _site(manifest: ManifestList, name: str) -> SiteSpec:
    site = manifest.sites.get(name)
    if site is None:
        known = ", ".join(sorted(manifest.sites)) or "none"
        raise UsageError(f"site {name!r} is not declared in {manifest.path} (sites: {known})",
                         "add it under `sites:` or pick one of those")
    return site


def _remember_manifest(home: Path, site: str, manifest_path: str) -> None:
    """So `inventory pull SITE` can find the site's SSH address without -m."""
    d = home / "sites" / site
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest").write_text(os.path.abspath(manifest_path) + "\n")


def _remembered_manifest(home: Path, site: str) -> Optional[str]:
    p = home / "sites" / site / "manifest"
    return p.read_text().strip() if p.is_file() else None


class _Bars:
    """tqdm factory handed to the resolver (one bar per download)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, total: Optional[int], desc: str) -> Any:
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                    leave=False, file=sys.stderr, disable=not self.enabled)


def _resolve(manifest: ManifestList, site: SiteSpec, cache: BlobCache) -> Tuple[Any, List[ResolvedImage]]:
    from ..registry.auth import CredentialStore, docker_config_path
    from ..registry.client import RegistryClient
    from ..resolve import Resolver

    if site.runtime == "containerd":
        for spec in manifest.images_for(site.name):
            if spec.platform is not None and not spec.platform.matches(site.platform):
                raise ManifestError(
                    f"{manifest.path}:{spec.line}: image {spec.ref} asks for {spec.platform} but "
                    f"containerd site {site.name} is {site.platform}",
                    "a containerd import unpacks one platform: drop `platform:` for this image "
                    "or declare a separate site")
    client = RegistryClient(manifest.registries, CredentialStore.load(docker_config_path()))
    resolver = Resolver(cache, client)
    images = [resolver.resolve(spec, spec.platform or site.platform)
              for spec in manifest.images_for(site.name)]
    return resolver, images


def _make_plan(args: argparse.Namespace, full: bool = False
               ) -> Tuple[Plan, Any, BlobCache, Path, SiteSpec, ManifestList]:
    manifest = load_manifest(args.manifest)
    site = _site(manifest, args.site)
    home = _home(args)
    cache = BlobCache(home / "cache")
    resolver, images = _resolve(manifest, site, cache)
    store = InventoryStore(home)
    inv = Inventory.empty(site.runtime, site.namespace) if full else \
        store.load(site.name, site.runtime, site.namespace)
    plan = plan_bundle(site.name, images, inv, runtime=site.runtime,
                       namespace=site.namespace, platform=str(site.platform))
    _remember_manifest(home, site.name, args.manifest)
    return plan, resolver, cache, home, site, manifest


def plan_json(plan: Plan) -> Dict[str, Any]:
    return {
        "site": plan.site, "runtime": plan.runtime, "namespace": plan.namespace,
        "platform": plan.platform, "layer_form": plan.layer_form,
        "ship_bytes": plan.ship_bytes, "full_bytes": plan.full_bytes,
        "prerequisites": [p.to_json() for p in plan.prerequisites],
        "images": [{
            "name": ip.image.name, "status": "up-to-date" if ip.up_to_date else "ship",
            "top": ip.image.top.digest, "config": ip.image.config.digest,
            "platform": str(ip.image.platform),
            "ship_bytes": ip.ship_bytes, "full_bytes": ip.full_bytes,
            "layers": [{"digest": lp.layer.digest, "diff_id": lp.layer.diff_id,
                        "size": lp.layer.size, "ship": lp.ship} for lp in ip.layers],
        } for ip in plan.images],
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _print_plan(plan: Plan) -> None:
    ns = f", namespace {plan.namespace}" if plan.namespace else ""
    print(f"site {plan.site}: {plan.runtime}{ns}, {plan.platform}, layers as {plan.layer_form}")
    for ip in plan.images:
        shipped = sum(1 for lp in ip.layers if lp.ship)
        status = "up to date" if ip.up_to_date else \
            f"ship {_mb(ip.ship_bytes)}: {shipped} of {len(ip.layers)} layers"
        print(f"  {ip.image.name}  [{ip.image.platform}]  {status}")
    full = plan.full_bytes
    pct = f" ({100 * plan.ship_bytes / full:.1f}%)" if full else ""
    print(f"ships {_mb(plan.ship_bytes)} of {_mb(full)} for a full transfer{pct}; "
          f"{len(plan.prerequisites)} layers already on the site")


def cmd_plan(args: argparse.Namespace) -> int:
    plan = _make_plan(args)[0]
    if args.json:
        emit_json(plan_json(plan))
    else:
        _print_plan(plan)
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from ..pack import write_bundle

    plan, resolver, cache, home, site, _ = _make_plan(args, full=args.full)
    show = not args.no_progress and sys.stderr.isatty() and not args.json
    needed = {lp.layer.digest for ip in plan.to_ship for lp in ip.layers if lp.ship}
    images = resolver.fetch_layers([ip.image for ip in plan.to_ship], needed,
                                   progress_factory=_Bars(show))
    # Re-plan with the fetched layers' tar sizes filled in (same decisions, same inventory).
    by_name = {img.name: img for img in images}
    store = InventoryStore(home)
    inv = Inventory.empty(site.runtime, site.namespace) if args.full else \
        store.load(site.name, site.runtime, site.namespace)
    plan = plan_bundle(site.name, [by_name.get(ip.image.name, ip.image) for ip in plan.images],
                       inv, runtime=site.runtime, namespace=site.namespace,
                       platform=str(site.platform))
    total = sum((lp.layer.size for ip in plan.to_ship for lp in ip.layers if lp.ship), 0)
    bar = tqdm(total=total, desc="pack", unit="B", unit_scale=True, unit_divisor=1024,
               leave=False, file=sys.stderr, disable=not show)
    try:
        threads = args.threads if args.threads > 0 else (os.cpu_count() or 1)
        result = write_bundle(plan, cache, args.output, level=args.level, threads=threads,
                              progress=bar.update)
    finally:
        bar.close()
    out = {"bundle": result.path, "bundle_bytes": result.bundle_bytes, "entries": result.entries,
           "images": result.images, "ship_registry_bytes": result.ship_registry_bytes,
           "full_registry_bytes": result.full_registry_bytes, "plan": plan_json(plan)}
    if args.json:
        emit_json(out)
    else:
        _print_plan(plan)
        full = result.full_registry_bytes
        pct = f" = {100 * result.bundle_bytes / full:.1f}% of a full transfer" if full else ""
        print(f"wrote {result.path}: {result.bundle_bytes} bytes, {result.entries} entries, "
              f"{result.images} images{pct} ({full} bytes)")
    return 0


def _manifest_for(args: argparse.Namespace, home: Path) -> Optional[ManifestList]:
    path = args.manifest or _remembered_manifest(home, args.site)
    return load_manifest(path) if path else None


def cmd_inventory_record(args: argparse.Namespace) -> int:
    home = _home(args)
    manifest = _manifest_for(args, home)
    spec = _site(manifest, args.site) if manifest else None
    try:
        obj = json.loads(Path(args.report).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read report {args.report}: {exc.strerror}") from None
    except ValueError as exc:
        from ..errors import InventoryError
        raise InventoryError(f"report {args.report} is not JSON: {exc}",
                             "use the file written by `edgebundle report -o`") from None
    inv = InventoryStore(home).record(args.site, obj, spec)
    return _print_recorded(args, inv)


def _print_recorded(args: argparse.Namespace, inv: Inventory) -> int:
    if args.json:
        emit_json(inventory_to_json(inv, args.site))
    else:
        complete = sum(1 for i in inv.images if i.complete)
        print(f"recorded {args.site}: {inv.runtime}, {complete} complete images, "
              f"{len(inv.chains)} layer chains, {len(inv.blobs)} blobs")
    return 0


def cmd_inventory_pull(args: argparse.Namespace) -> int:
    from ..transfer.ssh import pull_report

    home = _home(args)
    manifest = _manifest_for(args, home)
    if manifest is None:
        raise UsageError(f"no manifest known for site {args.site}",
                         "pass -m MANIFEST (or plan/pack the site once)")
    spec = _site(manifest, args.site)
    obj = pull_report(spec, ssh_config_path=args.ssh_config, known_hosts=args.known_hosts,
                      allow_unknown_host=args.accept_new_host_key, key_filename=args.identity,
                      timeout=args.timeout, path=args.path)
    inv = InventoryStore(home).record(args.site, obj, spec)
    return _print_recorded(args, inv)


def cmd_inventory_show(args: argparse.Namespace) -> int:
    store = InventoryStore(_home(args))
    if not store.path(args.site).is_file():
        raise UsageError(f"no inventory recorded for site {args.site}",
                         "run `edgebundle inventory record` or `inventory pull` first")
    inv = inventory_from_json(json.loads(store.path(args.site).read_text()))
    if args.json:
        emit_json(inventory_to_json(inv, args.site))
    else:
        for img in inv.images:
            mark = "" if img.complete else "  (incomplete: not counted)"
            print(f"{img.name}  {img.target.digest if img.target else img.config}{mark}")
        _print_recorded(args, inv)
    return 0
