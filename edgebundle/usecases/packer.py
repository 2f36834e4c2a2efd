"""Packer use cases: plan a site, pack a site, record or pull a report, show an inventory.

``PackerSession`` owns what one run opens (the registry client, offline sources, the
blob cache and the inventory store) and closes it in ``__exit__``; a site is resolved
once per session and planned once per pack. The CLI parses arguments and prints; fleet
sync runs many sites through one session, so each image is resolved once for all.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..bases import DeltaPlanner
from ..cache import BlobCache
from ..errors import InventoryError, ManifestError, UsageError
from ..files import check_output, is_stream_target, open_output
from ..format import Signer
from ..holdings import Inventory
from ..image import ResolvedImage
from ..manifest import load_manifest
from ..pack import PackStats, write_bundle
from ..plan import Plan, plan_bundle, with_layer_info
from ..progress import NULL_BAR, Bar, close_bar
from ..report import MAX_REPORT_BYTES, check_report_bounds, parse_json_object
from ..registry.auth import CredentialStore, docker_config_path
from ..registry.client import RegistryClient
from ..registry.proxy import ProxySettings
from ..registry.tls import certs_dirs_from_env
from ..resolve import DEFAULT_JOBS, ProgressFactory, Resolver
from ..specs import ManifestList, SiteSpec
from ..space import check_packer
from ..store import InventoryStore
from ..transfer.options import SshOptions
from ..volumeset import write_volumes

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PackOutcome:
    """A written bundle: where, its plan, and what it cost."""

    output: str
    plan: Plan
    stats: PackStats
    volumes: Tuple[str, ...] = ()  # the volume files written, in order (none: one file)


class PackerSession:
    """One packer run over one manifest list (use as a context manager).

    Args:
        home: packer state directory (``cache/`` and ``sites/`` below it).
        manifest: the manifest list.
        client: registry access; by default one is made from the manifest's registries
            and the docker credentials, and closed with the session.
        progress: makes the progress bars (``resolve.ProgressFactory``): downloads,
            layer checks, and the pack itself.
        jobs: layer blobs downloaded at once (``--jobs``).
    """

    def __init__(self, home: Path, manifest: ManifestList, *,
                 client: Optional[RegistryClient] = None,
                 progress: Optional[ProgressFactory] = None, jobs: int = DEFAULT_JOBS) -> None:
        self.home = home
        self.manifest = manifest
        self.cache = BlobCache(home / "cache")
        self.store = InventoryStore(home)
        self._own_client = client is None
        self.client = client or RegistryClient(manifest.registries,
                                               CredentialStore.load(docker_config_path()),
                                               certs_dirs=certs_dirs_from_env(),
                                               proxies=ProxySettings.from_environ())
        self.resolver = Resolver(self.cache, self.client, jobs=jobs)
        self._progress = progress
        self._resolved: Dict[str, List[ResolvedImage]] = {}
        self._inventories: Dict[str, Inventory] = {}
        self.deltas = DeltaPlanner(self.cache, progress=progress, fetch=self._fetch_bases)

    def _fetch_bases(self, wanted: Sequence[Tuple[str, str, Optional[int]]]) -> AbstractSet[str]:
        """Delta bases' blobs from the registries of the site's images (DeltaPlanner's
        fetch), ``--jobs`` at once."""
        return self.resolver.fetch_blobs(wanted, self._progress)

    def close(self) -> None:
        self.deltas.close()
        self.resolver.close()
        if self._own_client:
            self.client.close()

    def __enter__(self) -> "PackerSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- steps -----------------------------------------------------------------

    def site(self, name: str) -> SiteSpec:
        return self.manifest.site(name)

    def resolve(self, site: SiteSpec) -> List[ResolvedImage]:
        """The site's images, pinned to content for its platform (once per session)."""
        if site.name in self._resolved:
            return self._resolved[site.name]
        specs = self.manifest.images_for(site.name)
        if site.runtime in ("containerd", "podman"):
            for spec in specs:
                if spec.platform is not None and not spec.platform.matches(site.platform):
                    raise ManifestError(
                        f"{self.manifest.path}:{spec.line}: image {spec.ref} asks for {spec.platform} "
                        f"but {site.runtime} site {site.name} is {site.platform}",
                        f"a {site.runtime} import unpacks one platform: drop `platform:` for this image "
                        "or declare a separate site")
        images = []
        for spec in specs:
            image = self.resolver.resolve(spec, spec.platform or site.platform)
            log.info("resolved %s for %s: %s", spec.ref, image.platform, image.top.digest)
            images.append(image)
        self._resolved[site.name] = images
        return images

    def inventory(self, site: SiteSpec, *, full: bool = False) -> Inventory:
        """What the site last reported (empty with ``full``: ship everything)."""
        if full:
            log.info("site %s: --full, ignoring its inventory", site.name)
            return Inventory.empty(site.runtime, site.namespace)
        return self._recorded(site)

    def _recorded(self, site: SiteSpec) -> Inventory:
        """The site's recorded inventory, read once per session."""
        if site.name not in self._inventories:
            self._inventories[site.name] = self.store.load(site.name, site.runtime, site.namespace)
        return self._inventories[site.name]

    def plan(self, site: SiteSpec, *, full: bool = False, deltas: bool = True,
             fetch: bool = False, before_fetch: Optional[Callable[[Plan], None]] = None,
             inventory: Optional[Inventory] = None) -> Plan:
        """What ``site`` lacks; with ``deltas`` (and the site's ``deltas:``), as deltas
        where clearly smaller. The layers that ship are fetched when ``fetch`` asks (to
        pack them), or when deltas are considered (to diff them): once either way.
        ``before_fetch`` sees the plan before anything is downloaded (the disk pre-flight).
        ``inventory``: plan against this (a report just read) instead of the recorded one."""
        images = self.resolve(site)
        inv = inventory if inventory is not None else self.inventory(site, full=full)
        plan = plan_bundle(site.name, images, inv, runtime=site.runtime,
                           namespace=site.namespace, platform=str(site.platform))
        with_deltas = deltas and site.deltas and bool(plan.shipped_layers()) and bool(inv.images)
        if (fetch or with_deltas) and before_fetch is not None:
            before_fetch(plan)
        if fetch or with_deltas:
            plan = self._fetched(plan)
        if with_deltas:
            plan = self.deltas.apply(plan, inv)
        for ip in plan.images:
            shipped = sum(1 for lp in ip.layers if lp.ship)
            as_delta = sum(1 for lp in ip.layers if lp.ship and lp.delta)
            log.info("plan %s: %s", ip.image.name, "up to date" if ip.up_to_date else
                     f"ship {shipped} of {len(ip.layers)} layers ({as_delta} as deltas)")
        self.store.remember_manifest(site.name, self.manifest.path)
        return self.with_sources(plan)

    def with_sources(self, plan: Plan) -> Plan:
        """``plan`` noting which registry or mirror served each of its digests this run."""
        served = self.client.served()
        digests = {d.digest for ip in plan.images for d in ip.image.json_blobs}
        digests.update(la.digest for ip in plan.images for la in ip.image.layers)
        digests.update(ip.image.top.digest for ip in plan.images)
        return dataclasses.replace(plan, sources=tuple(sorted((d, served[d]) for d in digests if d in served)))

    def _fetched(self, plan: Plan) -> Plan:
        """Fetch every layer ``plan`` ships into the cache; the plan with tar sizes."""
        needed = {lp.layer.digest for lp in plan.shipped_layers()}
        fetched = self.resolver.fetch_layers([ip.image for ip in plan.to_ship], needed,
                                             progress_factory=self._progress)
        return with_layer_info(plan, fetched)

    def pack(self, site: SiteSpec, output: str, *, full: bool = False, level: int = 16,
             threads: int = 0, created: Optional[str] = None,
             deltas: bool = True, signers: Sequence[Signer] = (),
             volume_size: Optional[int] = None) -> PackOutcome:
        """Plan once, fetch what ships, write the bundle to ``output`` (``-``: stdout).

        ``threads`` 0 means one zstd worker per CPU; the bytes are the same for any count.
        ``signers`` sign it; a site whose last report enforces signatures is refused a
        bundle it would refuse (unsigned, or signed by keys it does not trust).
        ``volume_size``: write volumes ``output.001`` … of at most that many bytes each.
        """
        what = _output_what(output, volume_size)
        if volume_size is not None:
            if output == "-" or is_stream_target(output):
                raise UsageError(f"volumes are files: cannot write them to {output}",
                                 "name a file with -o, e.g. -o /media/usb/site.ebundle")
        check_output(output, what)  # before any download, not after
        self.check_signers(site, self._recorded(site), signers)
        plan = self.plan(site, full=full, deltas=deltas, fetch=True,
                         before_fetch=lambda plan: self.check_space(plan, output))
        return self.write(plan, output, level=level, threads=threads, created=created,
                          signers=signers, volume_size=volume_size)

    def write(self, plan: Plan, output: str, *, level: int = 16, threads: int = 0,
              created: Optional[str] = None, signers: Sequence[Signer] = (),
              volume_size: Optional[int] = None) -> PackOutcome:
        """Write the bundle of ``plan`` (its layers fetched) to ``output``; see ``pack``."""
        what = _output_what(output, volume_size)
        workers = threads if threads > 0 else (os.cpu_count() or 1)
        shipped = sum(lp.layer.size for lp in plan.shipped_layers())
        bar = (self._progress or _no_bar)(shipped, "pack")
        volumes: Tuple[str, ...] = ()
        try:
            if volume_size is not None:
                with write_volumes(output, volume_size, what) as vout:
                    stats = write_bundle(plan, self.cache, vout, level=level, threads=workers,
                                         created=created, progress=bar.update,
                                         delta_ops=self.deltas.ops, signers=signers)
                volumes = tuple(vout.paths)
            else:
                with open_output(output, what) as out:
                    stats = write_bundle(plan, self.cache, out, level=level, threads=workers,
                                         created=created, progress=bar.update,
                                         delta_ops=self.deltas.ops, signers=signers)
        finally:
            close_bar(bar)
        log.info("wrote %s: %d bytes, %d entries", what, stats.bundle_bytes, stats.entries)
        return PackOutcome(output, plan, stats, volumes)

    @staticmethod
    def check_signers(site: SiteSpec, inventory: Inventory, signers: Sequence[Signer]) -> None:
        """Refuse to pack what ``site`` (its trust policy as ``inventory`` reports it) would refuse."""
        trusted = inventory.trusted_keys
        if not trusted:
            return  # the site enforces nothing, or its report predates signatures
        ids = sorted(trusted)
        if not signers:
            raise UsageError(f"site {site.name} imports only signed bundles (it trusts "
                             f"{', '.join(ids)}): this one would be refused",
                             "pass --sign KEYFILE with one of those keys")
        if not any(s.key_id in trusted for s in signers):
            raise UsageError(f"site {site.name} trusts {', '.join(ids)}, not "
                             f"{', '.join(s.key_id for s in signers)}: it would refuse this bundle",
                             "sign with a key it trusts, or first add the new .pub to its "
                             "trust directory (co-sign with --sign OLD --sign NEW meanwhile)")

    def check_space(self, plan: Plan, output: str) -> None:
        """Downloads into the cache and the bundle at ``output`` must fit (``space``).

        The bundle is estimated at the registry size of what ships (stored blobs as they
        are, tars recompressed about as small; deltas only shrink it); an atomic
        replace holds the old file until the new one is whole, so it counts in full.
        """
        layers = {lp.layer.digest: lp.layer.size for lp in plan.shipped_layers()}
        fetch = sum(size for digest, size in layers.items() if not self.cache.has(digest))
        target = None if is_stream_target(output) else output
        log.info("space: %d bytes to fetch into %s, a bundle of about %d bytes", fetch,
                 self.cache.root, plan.ship_bytes)
        check_packer(str(self.cache.root), fetch, target, plan.ship_bytes)


def _output_what(output: str, volume_size: Optional[int]) -> str:
    """How messages name what ``pack`` writes."""
    if volume_size is not None:
        return f"volumes {output}.001…"
    return "bundle to standard output" if output == "-" else f"bundle {output}"


def _no_bar(total: int, desc: str) -> Bar:
    return NULL_BAR


def plan_site(home: Path, manifest_path: str, site: str, *, full: bool = False,
              deltas: bool = True, progress: Optional[ProgressFactory] = None,
              jobs: int = DEFAULT_JOBS) -> Plan:
    """``edgebundle plan``: what ``site`` lacks, from the manifest list and its inventory."""
    with PackerSession(home, load_manifest(manifest_path), progress=progress, jobs=jobs) as session:
        return session.plan(session.site(site), full=full, deltas=deltas)


def pack_site(home: Path, manifest_path: str, site: str, output: str, *, full: bool = False,
              level: int = 16, threads: int = 0, created: Optional[str] = None,
              progress: Optional[ProgressFactory] = None, deltas: bool = True,
              signers: Sequence[Signer] = (), volume_size: Optional[int] = None,
              jobs: int = DEFAULT_JOBS) -> PackOutcome:
    """``edgebundle pack``: write the bundle ``site`` needs to ``output``.

    ``progress`` makes a bar per step (fetching, packing), as in ``PackerSession``;
    ``volume_size`` splits it into volumes (``volumeset.write_volumes``); ``jobs``
    downloads run at once.
    """
    with PackerSession(home, load_manifest(manifest_path), progress=progress, jobs=jobs) as session:
        return session.pack(session.site(site), output, full=full, level=level, threads=threads,
                            created=created, deltas=deltas, signers=signers,
                            volume_size=volume_size)


# ---------------------------------------------------------------------------
# Inventories


def _manifest_site(home: Path, site: str, manifest_path: Optional[str]) -> Optional[SiteSpec]:
    """The site as the manifest list declares it (given, or the one last used for it)."""
    path = manifest_path or InventoryStore(home).remembered_manifest(site)
    if path is None:
        return None
    return load_manifest(path).site(site)


def read_report_file(path: str) -> Dict[str, Any]:
    """A report JSON file brought back from a device (validated when recorded)."""
    try:
        with open(path, "rb") as fh:  # no more than a report may be: a wrong file is not read whole
            data = fh.read(MAX_REPORT_BYTES + 1)
        if len(data) > MAX_REPORT_BYTES:  # bytes, not characters; before a cut char looks bad
            check_report_bounds(data.decode("latin-1"), f"report {path}", _REPORT_FILE_HINT)
        text = data.decode("utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read report {path}: {exc.strerror}",
                         "check the path (on a USB stick: is it mounted?)") from None
    except UnicodeDecodeError:
        raise InventoryError(f"report {path} is not UTF-8 text",
                             "use the file written by `edgebundle report -o`") from None
    return parse_json_object(text, f"report {path}", _REPORT_FILE_HINT)


_REPORT_FILE_HINT = "use the file written by `edgebundle report -o`"


def record_report(home: Path, site: str, report_path: str,
                  manifest_path: Optional[str] = None) -> Inventory:
    """``inventory record``: make a report brought back by hand the site's inventory."""
    spec = _manifest_site(home, site, manifest_path)
    return InventoryStore(home).record(site, read_report_file(report_path), spec)


def pull_inventory(home: Path, site: str, manifest_path: Optional[str] = None,
                   options: SshOptions = SshOptions(), path: Optional[str] = None) -> Inventory:
    """``inventory pull``: fetch the site's report over SSH (``options``; the file at
    ``path`` instead of running ``edgebundle report``) and record it."""
    from ..transfer.ssh import pull_report

    spec = _manifest_site(home, site, manifest_path)
    if spec is None:
        raise UsageError(f"no manifest known for site {site}",
                         "pass -m MANIFEST (or plan/pack the site once)")
    obj = pull_report(spec, options, path=path)
    return InventoryStore(home).record(site, obj, spec)


def show_inventory(home: Path, site: str) -> Inventory:
    """``inventory show``: what the packer believes ``site`` holds."""
    store = InventoryStore(home)
    if not store.path(site).is_file():
        raise UsageError(f"no inventory recorded for site {site}",
                         "run `edgebundle inventory record` or `inventory pull` first")
    return store.load(site)
