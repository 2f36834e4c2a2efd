"""``edgebundle sync``: every selected site, in parallel, to the manifest.

Per site (``Syncer.sync_site``), under a packer-side lock so that two overlapping
runs never work on one site at once:

1. connect (``transfer.ssh.connect``: known_hosts enforced) and keep that one
   connection for every step below;
2. read the live report and record it; a site that already holds every image is
   done after this one round trip;
3. get the bundle of its state from ``FleetPacker`` (packed once per state, under
   one lock: the packer session is not thread-safe, and packing uses every core);
4. upload it to the site's ``staging:`` directory (resumable, verified);
5. import it there, prune if the site asks, read the report again and record it;
6. done only when that fresh report holds every manifest image complete; then the
   staged files go and the site releases its bundle.

A failure that may pass (the link dropped or timed out, the device's import lock is
held, its runtime is restarting, the import was killed) is retried with backoff,
within ``site_timeout``; any other is final for this run. Either way it is reported
for that site, and the other sites carry on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

from ..errors import EdgebundleError, LinkError, LoadError, LockedError, TransportError
from ..format import Signer
from ..holdings import Inventory
from ..image import ResolvedImage
from ..report import inventory_from_json
from ..specs import SiteSpec
from ..state import StateDir
from ..transfer.options import SshOptions
from ..usecases.packer import PackerSession
from .bundles import BundleCache, FleetBundle
from .device import Device, DeviceCommandError, Shell, SshShell
from .states import Holding, PackSettings, holding, site_plan, state_key

log = logging.getLogger(__name__)

MAX_BACKOFF = 300.0  # seconds: a long outage is the next scheduled run's business


@dataclass(frozen=True)
class SyncOptions:
    """What ``sync``'s flags decide (see ``edgebundle sync --help``)."""

    ssh: SshOptions = SshOptions()
    parallel: int = 4
    retries: int = 2  # further attempts after a failure worth retrying
    retry_delay: float = 5.0  # first backoff; doubled per attempt, with jitter
    site_timeout: float = 3600.0  # no new step or attempt for a site after this
    command_timeout: float = 3600.0  # an import may stay silent this long (it prints at the end)
    limit_rate: Optional[float] = None  # upload bytes/s per site
    dry_run: bool = False
    level: int = 16
    threads: int = 0
    deltas: bool = True
    signers: Tuple[Signer, ...] = ()
    created: Optional[str] = None

    @property
    def settings(self) -> PackSettings:
        return PackSettings(self.level, self.deltas, tuple(s.key_id for s in self.signers))


@dataclass(frozen=True)
class SiteOutcome:
    """How one site's sync ended."""

    site: str
    ok: bool
    action: str  # "up-to-date" | "updated" | "planned" (dry run) | "failed"
    error: Optional[str] = None  # one line: the message and its hint
    exit_code: int = 0
    before: Optional[Holding] = None
    after: Optional[Holding] = None
    bytes_sent: int = 0
    bundle_bytes: int = 0
    ship_bytes: int = 0  # what the plan ships, at registry sizes (the dry run's estimate)
    resumed_from: int = 0
    attempts: int = 0
    seconds: float = 0.0
    bundle: Optional[str] = None  # the state key of the bundle it got

    def to_json(self) -> Dict[str, Any]:
        def held(h: Optional[Holding]) -> Optional[Dict[str, int]]:
            return None if h is None else {"current": h.current, "images": h.images}

        out = dataclasses.asdict(self)
        out.update(before=held(self.before), after=held(self.after), seconds=round(self.seconds, 3))
        return out


class Events(Protocol):
    """What the display hears (``cli.sync``); called from the worker threads."""

    def phase(self, site: str, what: str) -> None: ...
    def upload(self, site: str, sent: int, total: int) -> None: ...
    def finished(self, outcome: SiteOutcome) -> None: ...


class _Quiet:
    def phase(self, site: str, what: str) -> None:
        log.info("site %s: %s", site, what)

    def upload(self, site: str, sent: int, total: int) -> None:
        pass

    def finished(self, outcome: SiteOutcome) -> None:
        pass


class FleetPacker:
    """Plan and pack once per state; the part of sync without SSH.

    ``bundle_for`` is safe to call from many threads: all planning and packing runs
    under one lock (``PackerSession`` is not thread-safe, and a pack uses every core).
    """

    def __init__(self, session: PackerSession, options: SyncOptions,
                 bundles: Optional[BundleCache] = None) -> None:
        self.session = session
        self.options = options
        self.bundles = bundles or BundleCache(session.home / "bundles")
        self._lock = threading.Lock()
        self.packed: List[str] = []  # keys packed by this process

    def key(self, site: SiteSpec, images: Sequence[ResolvedImage], inventory: Inventory) -> str:
        return state_key(site, images, inventory, self.options.settings)

    def bundle_for(self, site: SiteSpec, images: Sequence[ResolvedImage],
                   inventory: Inventory) -> FleetBundle:
        """The bundle that brings ``site`` from ``inventory`` to the manifest."""
        PackerSession.check_signers(site, inventory, self.options.signers)
        key = self.key(site, images, inventory)

        def pack(path: Path) -> FleetBundle:
            session, opts = self.session, self.options
            plan = session.plan(site, inventory=inventory, deltas=opts.deltas, fetch=True,
                                before_fetch=lambda p: session.check_space(p, str(path)))
            # One bundle serves every site in this state: it names none (FORMAT.md).
            plan = dataclasses.replace(plan, site=None)
            out = session.write(plan, str(path), level=opts.level, threads=opts.threads,
                                created=opts.created, signers=opts.signers)
            self.packed.append(key)
            stats = out.stats
            return FleetBundle(key, str(path), stats.bundle_bytes, stats.entries, stats.images,
                               stats.ship_registry_bytes, stats.full_registry_bytes)

        with self._lock:
            return self.bundles.get_or_pack(key, site.name, pack)

    def estimate(self, site: SiteSpec, images: Sequence[ResolvedImage],
                 inventory: Inventory) -> Tuple[str, int, Optional[FleetBundle]]:
        """Dry run: the state key, what the plan ships, and the bundle if already packed."""
        key = self.key(site, images, inventory)
        with self._lock:
            with self.bundles.locked():
                cached = self.bundles.lookup(key)
            plan = self.session.plan(site, inventory=inventory, deltas=self.options.deltas)
        return key, plan.ship_bytes, cached


class _Attempt:
    """What a site's attempts learnt so far, kept when a later step fails."""

    def __init__(self) -> None:
        self.before: Optional[Holding] = None
        self.after: Optional[Holding] = None
        self.bundle: Optional[FleetBundle] = None
        self.bytes_sent = 0  # over every attempt: a metered link pays for them all
        self.resumed_from = 0
        self._call_sent = 0

    def upload_started(self) -> None:
        self._call_sent = 0

    def sent(self, n: int) -> None:
        """``upload_over``'s progress: ``n`` bytes so far in this call."""
        self.bytes_sent += n - self._call_sent
        self._call_sent = n


Link = Callable[[SiteSpec, SyncOptions], ContextManager[Shell]]


@contextlib.contextmanager
def ssh_link(site: SiteSpec, options: SyncOptions) -> Iterator[Shell]:
    """The real link: one SSH connection to the site's device (known_hosts enforced)."""
    from ..transfer.ssh import connect

    with connect(site, options.ssh, bulk=True) as client:
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(30)  # the link idles while another site packs
        yield SshShell(client, site, options.ssh.timeout)


class Syncer:
    """Runs ``sync`` for a list of sites (``run``), one outcome per site.

    ``link`` opens the connection to a site's device (``ssh_link``; the seam unit
    tests replace).
    """

    def __init__(self, session: PackerSession, options: SyncOptions,
                 events: Optional[Events] = None, link: Link = ssh_link) -> None:
        self.session = session
        self.options = options
        self.events: Events = events or _Quiet()
        self.link = link
        self.packer = FleetPacker(session, options)

    def run(self, sites: Sequence[SiteSpec]) -> List[SiteOutcome]:
        images: Dict[str, List[ResolvedImage]] = {}
        outcomes: Dict[str, SiteOutcome] = {}
        for site in sites:  # resolving talks to registries: once, before the workers
            try:
                images[site.name] = self.session.resolve(site)
            except EdgebundleError as exc:
                outcomes[site.name] = _failed(site, exc, _Attempt(), 0, time.monotonic())
                self.events.finished(outcomes[site.name])
        todo = [s for s in sites if s.name in images]
        workers = max(1, min(self.options.parallel, len(todo) or 1))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sync") as pool:
            futures = {pool.submit(self.sync_site, s, images[s.name]): s for s in todo}
            for future in concurrent.futures.as_completed(futures):
                outcome = future.result()
                outcomes[outcome.site] = outcome
                self.events.finished(outcome)
        if not self.options.dry_run:
            self.packer.bundles.collect()
        return [outcomes[s.name] for s in sites]

    def sync_site(self, site: SiteSpec, images: Sequence[ResolvedImage]) -> SiteOutcome:
        """One site, start to end; never raises for the site's own failures."""
        started = time.monotonic()
        deadline = started + self.options.site_timeout
        attempts = 0
        state = _Attempt()
        try:
            with StateDir(self.session.home / "sites" / site.name).lock(
                    "sync.lock", f"a sync of site {site.name}", "on this packer"):
                while True:
                    attempts += 1
                    state.after = None
                    try:
                        return self._attempt(site, images, state, attempts, started, deadline)
                    except EdgebundleError as exc:
                        delay = self._backoff(attempts)
                        if not _retryable(exc) or attempts > self.options.retries \
                                or time.monotonic() + delay > deadline:
                            raise
                        log.warning("site %s: %s; retrying in %.0fs (attempt %d of %d)", site.name,
                                    exc.message, delay, attempts + 1, self.options.retries + 1)
                        self.events.phase(site.name, f"retry in {delay:.0f}s")
                        time.sleep(delay)
        except EdgebundleError as exc:
            return _failed(site, exc, state, attempts, started)
        except Exception as exc:  # noqa: BLE001 - one site's bug must not stop the fleet
            log.exception("site %s: unexpected error", site.name)
            return _failed(site, EdgebundleError(f"internal error: {type(exc).__name__}: {exc}",
                                                 "this is a bug; rerun with --debug and report it"),
                           state, attempts, started)

    def _backoff(self, attempt: int) -> float:
        base: float = min(MAX_BACKOFF, self.options.retry_delay * 2.0 ** (attempt - 1))
        return base * random.uniform(0.8, 1.2)  # noqa: S311 - spreading retries, not crypto

    def _attempt(self, site: SiteSpec, images: Sequence[ResolvedImage], state: _Attempt,
                 attempt: int, started: float, deadline: float) -> SiteOutcome:
        opts = self.options
        self.events.phase(site.name, "connect")
        with self.link(site, opts) as shell:
            device = Device(shell, site, command_timeout=opts.command_timeout)
            self.events.phase(site.name, "report")
            inventory = self._report(device, site)
            state.before = holding(site, images, inventory)
            if state.before.done:
                state.after = state.before
                if not opts.dry_run and self.packer.bundles.claimed(site.name):
                    # An earlier run got the images there but stopped before the end
                    # (prune, cleaning the staging directory): finish that now.
                    self._finish(device, site, images, state)
                    self.packer.bundles.release(site.name)
                return dataclasses.replace(_outcome(site, state, attempt, started), ok=True,
                                           action="up-to-date")
            if opts.dry_run:
                key, ship, cached = self.packer.estimate(site, images, inventory)
                return dataclasses.replace(_outcome(site, state, attempt, started), ok=True,
                                           action="planned", bundle=key, ship_bytes=ship,
                                           bundle_bytes=cached.bundle_bytes if cached else 0)
            _check_deadline(site, deadline, "pack")
            self.events.phase(site.name, "pack")
            state.bundle = bundle = self.packer.bundle_for(site, images, inventory)
            _check_deadline(site, deadline, "upload")
            self.events.phase(site.name, "upload")
            events = self.events

            def progress(n: int) -> None:
                state.sent(n)
                events.upload(site.name, n, bundle.bundle_bytes)

            state.upload_started()
            uploaded = device.upload(bundle.path, limit_rate=opts.limit_rate, progress=progress)
            state.resumed_from = uploaded.resumed_from
            _check_deadline(site, deadline, "import")
            self.events.phase(site.name, "import")
            device.import_bundle(uploaded.remote_path)
            self._check_done(device, site, images, state, "imported the bundle")
            self._finish(device, site, images, state)
        self.packer.bundles.release(site.name)
        return dataclasses.replace(_outcome(site, state, attempt, started), ok=True, action="updated")

    def _check_done(self, device: Device, site: SiteSpec, images: Sequence[ResolvedImage],
                    state: _Attempt, after_what: str) -> None:
        """Read and record the report; the site is done only if it holds every image."""
        self.events.phase(site.name, "report")
        after = self._report(device, site)
        state.after = holding(site, images, after)
        if not state.after.done:
            missing = _missing(site, images, after)
            raise LoadError(f"site {site.name} {after_what}, but its report holds {state.after} "
                            f"of the manifest's images (missing: {', '.join(missing)})",
                            "run `edgebundle report` on the device and check the runtime's log")

    def _finish(self, device: Device, site: SiteSpec, images: Sequence[ResolvedImage],
                state: _Attempt) -> None:
        """Prune as the site asks (then the report again: it must show the prune), and
        clear the staging directory."""
        if site.prune is not None and images:  # prune keeps nothing without names: refused
            self.events.phase(site.name, "prune")
            device.prune([i.name for i in images], site.prune.keep_previous)
            self._check_done(device, site, images, state, "pruned")
        device.clear_staging()

    def _report(self, device: Device, site: SiteSpec) -> Inventory:
        """The live report; recorded as the site's inventory (not in a dry run)."""
        obj = device.report()
        if self.options.dry_run:
            inventory = inventory_from_json(obj)
        else:
            inventory = self.session.store.record(site.name, obj, site)
        return inventory


def _retryable(exc: EdgebundleError) -> bool:
    if isinstance(exc, DeviceCommandError):
        return exc.retryable
    # LockedError here is the device's upload lock (another packer uploading there):
    # the packer's own site lock is taken before the attempts.
    return isinstance(exc, (LinkError, LockedError))


def _check_deadline(site: SiteSpec, deadline: float, step: str) -> None:
    if time.monotonic() > deadline:
        raise TransportError(f"site {site.name} ran out of time before the {step} (--site-timeout)",
                             "raise --site-timeout, or let the next run go on from here")


def _missing(site: SiteSpec, images: Sequence[ResolvedImage], inventory: Inventory) -> List[str]:
    plan = site_plan(site, images, inventory)
    return [ip.image.name for ip in plan.images if not ip.up_to_date]


def _outcome(site: SiteSpec, state: _Attempt, attempts: int, started: float) -> SiteOutcome:
    """The outcome so far (failed until the caller says otherwise)."""
    bundle = state.bundle
    return SiteOutcome(site=site.name, ok=False, action="failed", before=state.before, after=state.after,
                       bytes_sent=state.bytes_sent, resumed_from=state.resumed_from,
                       bundle_bytes=bundle.bundle_bytes if bundle else 0,
                       ship_bytes=bundle.ship_registry_bytes if bundle else 0,
                       bundle=bundle.key if bundle else None, attempts=attempts,
                       seconds=time.monotonic() - started)


def _failed(site: SiteSpec, exc: EdgebundleError, state: _Attempt, attempts: int,
            started: float) -> SiteOutcome:
    text = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
    return dataclasses.replace(_outcome(site, state, attempts, started), error=text,
                               exit_code=exc.exit_code)
