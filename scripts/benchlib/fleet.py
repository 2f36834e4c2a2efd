"""The fleet phase (issue 9): pack once per state, upload against scp, sync of sites up to date.

Three measurements, each with its ratio taken in this run:

* **states**: ``sync.run.FleetPacker.bundle_for`` called in-process (no SSH) for N sites
  (1,000; ``--quick``: 100) that share runtime, namespace and platform, each in one of
  10 inventory states. The inventories are built from the resolved bench images (what a
  device holding those images reports: blobs, applied chains, the delta feature), one
  per subset of the manifest's images the state holds; sites are dealt states in a
  seeded random order. Counted: bundles packed (``len(packer.packed)``), and how often
  each entry was encoded (``EncodedCache.recording``: one call per compression kept)
  or taken from the encoded cache (``EncodedCache.lookup`` hits). Then a second pack of
  the costliest state: the bundle-cache hit, and a repack with its bundle dropped but
  the encoded cache warm (and, for the Docker form, with the encoded cache dropped too:
  what the encoded cache saves over the blob cache alone).
* **upload**: ``transfer.upload.upload_bundle`` (connect, staged check, pipelined SFTP
  writes, verification, rename: everything sync pays) against OpenSSH ``scp`` of the same
  bundle to the same loopback sshd, alternating, a few rounds; medians.
* **sync**: 20 real sshd (own host keys and ports; one client key) in front of 20
  containerd namespaces of one containerd, each already holding the manifest's images;
  ``edgebundle sync --site gw00`` (one site's round trip through the CLI), a bare
  connect + report in-process, and ``edgebundle sync --all --parallel P``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from . import proc
from .sites import services

if TYPE_CHECKING:
    from .runner import Bench

CREATED = "2026-01-01T00:00:00Z"  # fixed, as SOURCE_DATE_EPOCH would: repacks compare byte for byte
STATES = 10
PLATFORM = "linux/amd64"


def run(b: "Bench") -> None:
    assert b.set is not None
    o = b.o
    b.log(f"== fleet (issue 9): {o.fleet_sites} sites in {STATES} states, upload vs scp, "
          f"sync of {o.sync_sites} sites up to date")
    t0 = time.monotonic()
    out: Dict[str, Any] = {"run": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                   "load_start": _loadavg()}}
    root = b.tmp / "fleet"
    root.mkdir(exist_ok=True)
    # Docker form (tars recompressed at --level: where encoding costs) on the fleet's four
    # images; containerd form (registry blobs stored) on all six, for a larger bundle.
    out["states"] = [
        pack_states(b, root, "docker", list(b.set.fleet)),
        pack_states(b, root, "containerd", b.set.all_images()),
    ]
    big = max((s for s in out["states"]), key=lambda s: s["largest"]["bundle_bytes"])
    out["upload"] = upload_vs_scp(b, root, Path(big["largest"]["path"]), big["runtime"])
    out["sync"] = sync_up_to_date(b, root, small_fleet(b))
    for s in out["states"]:
        s["largest"].pop("path", None)
    out["run"].update(seconds=round(time.monotonic() - t0, 1), load_end=_loadavg())
    b.r["fleet"] = out


# ---------------------------------------------------------------------------
# 1,000 sites in 10 states


def _manifest_text(b: "Bench", images: Sequence[Any], sites: Sequence[Tuple[str, str]]) -> str:
    """A manifest list: ``images`` for every site; ``sites`` are (name, YAML flow map)."""
    lines = ["version: 1", "registries:", f'  "{b.reg.host}": {{insecure: true}}', "images:"]
    lines += [f"  - ref: {b.ref(i)}" for i in images]
    lines += ["sites:"] + [f"  {name}: {body}" for name, body in sites]
    return "\n".join(lines) + "\n"


def held_inventory(images: Sequence[Any], runtime: str, namespace: Optional[str]) -> Any:
    """What a device holding exactly ``images`` (complete) reports: its images, the blobs
    (containerd) and applied chains, the features of this edgebundle, no trust policy."""
    from edgebundle.format import KNOWN_FEATURES
    from edgebundle.holdings import HeldImage, HeldLayer, Inventory
    from edgebundle.naming import docker_tag
    from edgebundle.oci import chain_ids

    held, blobs, chains = [], set(), set()
    for img in images:
        ctr = runtime == "containerd"
        layers = tuple(HeldLayer(l.diff_id, l.digest if ctr else None, l.size if ctr else None,
                                 blob=ctr, unpacked=True, tar=True) for l in img.layers)
        held.append(HeldImage(name=img.name if ctr else docker_tag(img.name), config=img.config.digest,
                              target=img.top if ctr else None, manifest=img.manifest.digest,
                              platform=PLATFORM, complete=True, layers=layers))
        if ctr:
            blobs |= {img.top.digest, img.manifest.digest, img.config.digest, *(l.digest for l in img.layers)}
        chains |= set(chain_ids(l.diff_id for l in img.layers))
    return Inventory(runtime=runtime, namespace=namespace, images=tuple(sorted(held, key=lambda h: h.name)),
                     blobs=frozenset(blobs), chains=frozenset(chains), features=KNOWN_FEATURES,
                     trusted_keys=frozenset(), generated_at="2026-01-01T00:00:00Z", host="gateway")


def state_subsets(n_images: int, states: int, seed: int = 9) -> List[Tuple[int, ...]]:
    """``states`` distinct proper subsets of the images (indices) a state holds: the empty
    one (a new device) first, then a seeded draw of the others, largest-first variety."""
    every = [c for k in range(n_images) for c in itertools.combinations(range(n_images), k)]
    rng = random.Random(seed)
    rest = every[1:]
    rng.shuffle(rest)
    return [every[0], *rest[:states - 1]]


@contextlib.contextmanager
def counting_encodes() -> Iterator[Dict[str, Any]]:
    """Count, per entry digest, the encodings kept in the encoded cache and its hits."""
    from edgebundle.encoded import EncodedCache

    counts: Dict[str, Any] = {"encoded": {}, "reused": {}}
    real_recording, real_lookup = EncodedCache.recording, EncodedCache.lookup

    def recording(self: Any, head: Any, encoding: Any) -> Any:
        counts["encoded"][head.digest] = counts["encoded"].get(head.digest, 0) + 1
        return real_recording(self, head, encoding)

    def lookup(self: Any, head: Any, encoding: Any) -> Any:
        hit = real_lookup(self, head, encoding)
        if hit is not None:
            counts["reused"][head.digest] = counts["reused"].get(head.digest, 0) + 1
        return hit

    from edgebundle.bases import DeltaPlanner
    real_delta = DeltaPlanner._delta
    counts["deltas"] = {"computed": 0, "cached": 0}
    counts["delta_s"] = {"computed": 0.0}
    # Each delta asked for: (target diff_id, the bases it may read, answered by cache/deltas)
    counts["delta_calls"] = []

    def delta(self: Any, layer: Any, bases: Any, bar: Any) -> Any:
        # a delta is computed unless its key is in cache/deltas (DeltaPlanner._delta)
        hit = (self.cache.root / "deltas" / (self._key(layer, bases) + ".json")).is_file()
        t = time.monotonic()
        try:
            return real_delta(self, layer, bases, bar)
        finally:
            counts["deltas"]["cached" if hit else "computed"] += 1
            counts["delta_calls"].append(
                (layer.diff_id, frozenset(b.layer.chain_id for b in bases), hit))
            if not hit:
                counts["delta_s"]["computed"] += time.monotonic() - t

    EncodedCache.recording, EncodedCache.lookup = recording, lookup  # type: ignore[method-assign]
    DeltaPlanner._delta = delta  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        EncodedCache.recording, EncodedCache.lookup = real_recording, real_lookup  # type: ignore
        DeltaPlanner._delta = real_delta  # type: ignore[method-assign]


def pack_states(b: "Bench", root: Path, runtime: str, images: Sequence[Any]) -> Dict[str, Any]:
    from edgebundle.manifest import load_manifest
    from edgebundle.report import inventory_from_json, inventory_to_json
    from edgebundle.sync.run import FleetPacker, SyncOptions
    from edgebundle.sync.states import holding
    from edgebundle.usecases.packer import PackerSession

    o = b.o
    n = o.fleet_sites
    ns = "k8s.io" if runtime == "containerd" else None
    body = f"{{runtime: {runtime}{', namespace: ' + ns if ns else ''}, platform: {PLATFORM}}}"
    names = [f"s{i:04d}" for i in range(n)]
    mpath = root / f"states-{runtime}.yaml"
    mpath.write_text(_manifest_text(b, images, [(s, body) for s in names]))
    home = root / f"home-states-{runtime}"
    options = SyncOptions(level=o.level, threads=0 if o.threads == (os.cpu_count() or 1) else o.threads,
                          created=CREATED)
    b.log(f"  states, {runtime} form: {n} sites x {len(images)} images, {STATES} states, "
          f"level {options.level}")
    with PackerSession(home, load_manifest(str(mpath))) as session:
        t0 = time.monotonic()
        site_images = {s: session.resolve(session.site(s)) for s in names}
        resolve_s = time.monotonic() - t0
        resolved = site_images[names[0]]
        subsets = state_subsets(len(resolved), STATES)
        invs = [held_inventory([resolved[i] for i in sub], runtime, ns) for sub in subsets]
        roundtrip = all(inventory_from_json(inventory_to_json(i)) == i for i in invs)
        b.check(f"fleet states {runtime}: constructed inventories are valid reports", roundtrip)
        rng = random.Random(1000)
        deal = [k % STATES for k in range(n)]
        rng.shuffle(deal)
        packer = FleetPacker(session, options)
        first: Dict[int, Dict[str, Any]] = {}
        hits: List[float] = []
        plans_s = 0.0
        with counting_encodes() as counts:
            t0 = time.monotonic()
            for name, k in zip(names, deal):
                site = session.site(name)
                t1 = time.monotonic()
                done = holding(site, site_images[name], invs[k]).done  # sync's plan of the site
                t2 = time.monotonic()
                plans_s += t2 - t1
                if done:
                    continue
                enc_before = sum(counts["encoded"].values())
                reused_before = sum(counts["reused"].values())
                deltas_before = counts["deltas"]["computed"]
                delta_s_before = counts["delta_s"]["computed"]
                calls_before = len(counts["delta_calls"])
                fb = packer.bundle_for(site, site_images[name], invs[k])
                dt = time.monotonic() - t2
                if k in first:
                    hits.append(dt)
                    b.check(f"fleet states {runtime}: state {k} gets the same bundle",
                            fb.key == first[k]["key"])
                    continue
                first[k] = {"state": k, "holds": [images[i].ref for i in subsets[k]],
                            "key": fb.key, "seconds": dt, "bundle_bytes": fb.bundle_bytes,
                            "entries": fb.entries, "images": fb.images, "path": fb.path,
                            "encoded": sum(counts["encoded"].values()) - enc_before,
                            "reused": sum(counts["reused"].values()) - reused_before,
                            "deltas_computed": counts["deltas"]["computed"] - deltas_before,
                            "delta_s": counts["delta_s"]["computed"] - delta_s_before,
                            "order": len(first),
                            "delta_calls": list(counts["delta_calls"][calls_before:])}
                b.log(f"    state {k} ({'+'.join(first[k]['holds']) or 'empty'}): packed "
                      f"{fb.bundle_bytes / 1e6:.2f} MB, {fb.entries} entries in {dt:.2f} s "
                      f"({first[k]['encoded']} encoded, {first[k]['reused']} from the encoded cache; "
                      f"{first[k]['deltas_computed']} deltas computed in {first[k]['delta_s']:.1f} s)")
            total_s = time.monotonic() - t0
        encoded, reused = dict(counts["encoded"]), dict(counts["reused"])
        deltas = dict(counts["deltas"], seconds=counts["delta_s"]["computed"])
        packed = len(packer.packed)
        rows = sorted(first.values(), key=lambda r: r["order"])
        costliest = max(rows, key=lambda r: r["seconds"])
        largest = max(rows, key=lambda r: r["bundle_bytes"])
        again = second_packs(b, packer, session, site_images, names, deal, invs, costliest, runtime)
        repacks = [again] + [second_packs(b, packer, session, site_images, names, deal, invs, r, runtime,
                                          without_encoded=False)
                             for r in rows if b.o.fleet_repack_all and r is not costliest]
        cache_files = len(list((home / "cache" / "encoded").glob("*.zst")))
    res = {
        "runtime": runtime, "sites": n, "states": STATES, "images": [i.ref for i in images],
        "level": options.level, "resolve_s": resolve_s, "total_s": total_s, "plans_s": plans_s,
        "pack_s": sum(r["seconds"] for r in rows), "hits": len(hits),
        "hit_median_s": statistics.median(hits) if hits else 0.0, "hit_max_s": max(hits, default=0.0),
        "packed": packed, "distinct_keys": len({r["key"] for r in rows}),
        "encoded_entries": len(encoded), "encodes": sum(encoded.values()),
        "max_encodes": max(encoded.values(), default=0), "reuses": sum(reused.values()),
        "cache_files": cache_files, "rows": [{k: v for k, v in r.items() if k not in ("path", "delta_calls")} for r in rows],
        "largest": {k: v for k, v in largest.items() if k != "delta_calls"}, "second": again,
        "repacks": [{k: r[k] for k in ("state", "first_s", "repack_s", "identical", "repack_deltas_computed",
                                       "repack_deltas_more_bases")} for r in repacks],
        "layer_entries": sum(r["encoded"] + r["reused"] for r in rows), "deltas": deltas,
    }
    b.check(f"fleet states {runtime}: exactly {STATES} bundles packed", packed == STATES == res["distinct_keys"],
            f"{packed} packed, {res['distinct_keys']} keys")
    b.check(f"fleet states {runtime}: no entry encoded twice", res["max_encodes"] <= 1,
            f"max {res['max_encodes']} encodes of one entry")
    b.log(f"  states, {runtime}: {packed} bundles for {n} sites in {total_s:.1f} s ({res['pack_s']:.1f} s "
          f"packing, {len(hits)} cache hits of median {1000 * res['hit_median_s']:.1f} ms; resolve of "
          f"{n} sites {resolve_s:.1f} s before); {res['encodes']} encodes of {len(encoded)} entries, "
          f"{res['reuses']} reuses")
    return res


def second_packs(b: "Bench", packer: Any, session: Any, site_images: Dict[str, Any], names: Sequence[str],
                 deal: Sequence[int], invs: Sequence[Any], row: Dict[str, Any],
                 runtime: str, without_encoded: bool = True) -> Dict[str, Any]:
    """A packed state again (the costliest; with --fleet-repack-all, each): a bundle-cache
    hit, then a repack without the bundle (encoded cache warm), then (Docker form, if
    ``without_encoded``) without the encoded cache either."""
    k = row["state"]
    name = next(s for s, d in zip(names, deal) if d == k)
    site, imgs, inv = session.site(name), site_images[name], invs[k]
    path = Path(row["path"])
    digest = _sha256(path)
    keep = packer.bundles.root.parent / f"{row['key']}.first.ebundle"  # beside bundles/, which is dropped
    shutil.copyfile(path, keep)
    t0 = time.monotonic()
    fb = packer.bundle_for(site, imgs, inv)
    hit_s = time.monotonic() - t0
    b.check(f"fleet second pack {runtime}: cache hit is the same file", fb.path == str(path))
    shutil.rmtree(packer.bundles.root / row["key"])
    with counting_encodes() as counts:
        t0 = time.monotonic()
        fb = packer.bundle_for(site, imgs, inv)
        repack_s = time.monotonic() - t0
    # cache/deltas is keyed by the target and every base the packer can read: counted
    # apart, the deltas computed again because that set grew since the first pack (other
    # states' packs may have cached more of the site's layers in between).
    first_bases = {d: bases for d, bases, _ in row["delta_calls"]}
    recomputed = [(d, bases) for d, bases, hit in counts["delta_calls"] if not hit]
    grown = [d for d, bases in recomputed if d in first_bases and bases > first_bases[d]]
    # Reported, not checked: a repack's header may differ from the first pack's (see the
    # doc's note: image records carry tar sizes the packer cache learnt in between).
    same = _sha256(Path(fb.path)) == digest
    out = {"state": k, "first_s": row["seconds"], "hit_s": hit_s, "repack_s": repack_s, "identical": same,
           "repack_deltas_computed": len(recomputed), "repack_deltas_more_bases": len(grown),
           "repack_delta_s": counts["delta_s"]["computed"],
           "difference": "" if same else _first_difference(keep, Path(fb.path)).split(" (")[0],
           "header_diff": [] if same else _header_diff(keep, Path(fb.path))}
    if not same:
        b.log(f"    repack of state {k} differs from its first pack: {out['difference']}; "
              f"{'; '.join(out['header_diff'])}")
    if runtime == "docker" and without_encoded:
        encoded_dir = session.cache.root / "encoded"
        shutil.rmtree(packer.bundles.root / row["key"])
        shutil.move(str(encoded_dir), str(encoded_dir) + ".aside")
        try:
            t0 = time.monotonic()
            fb = packer.bundle_for(site, imgs, inv)
            out["no_encoded_s"] = time.monotonic() - t0
            out["no_encoded_identical"] = _sha256(Path(fb.path)) == digest
        finally:
            shutil.rmtree(encoded_dir, ignore_errors=True)
            shutil.move(str(encoded_dir) + ".aside", str(encoded_dir))
    b.log(f"    second pack of state {k}: cache hit {1000 * hit_s:.1f} ms, repack (encoded cache warm) "
          f"{repack_s:.2f} s" + (f", without the encoded cache {out['no_encoded_s']:.2f} s"
                                 if "no_encoded_s" in out else "")
          + f"; first pack {row['seconds']:.2f} s; the repack computed {len(recomputed)} delta(s) "
          f"({len(grown)} with more bases than the first pack had)")
    return out


def _first_difference(a: Path, b: Path) -> str:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            x, y = fa.read(1 << 16), fb.read(1 << 16)
            if x != y:
                k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
                return (f"{a.stat().st_size} vs {b.stat().st_size} bytes, first difference at byte {pos + k} "
                        f"({a} kept)")
            if not x:
                return "identical"
            pos += len(x)


def _header_diff(a: Path, b: Path) -> List[str]:
    """What differs between two bundles' ``inspect --json`` (a few keys, shortened)."""
    def flat(obj: Any, prefix: str = "") -> Dict[str, Any]:
        if isinstance(obj, dict):
            return {k2: v for k, v in obj.items() for k2, v in flat(v, f"{prefix}.{k}").items()}
        if isinstance(obj, list):
            return {k2: v for i, v in enumerate(obj) for k2, v in flat(v, f"{prefix}[{i}]").items()}
        return {prefix: obj}
    try:
        x, y = (flat(json.loads(proc.run([sys.executable, "-m", "edgebundle", "inspect", "--json", str(p)],
                                         poll=0.5).check().stdout)) for p in (a, b))
    except (RuntimeError, ValueError) as exc:
        return [f"(inspect failed: {exc})"]
    keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
    return [f"{k}: {x.get(k)} -> {y.get(k)}" for k in keys[:6]] + ([f"... {len(keys) - 6} more"]
                                                                     if len(keys) > 6 else [])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------
# upload vs scp


def _ssh_options(key: Path, known_hosts: Path) -> Any:
    from edgebundle.transfer.options import SshOptions
    return SshOptions(known_hosts=str(known_hosts), key_filename=str(key), ssh_config_path=os.devnull)


def scp_argv(sd: Any, key: Path, known_hosts: Path, src: Path, dest: str) -> List[str]:
    return ["scp", "-q", "-P", str(sd.port), "-i", str(key), "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "BatchMode=yes", "-F", os.devnull, str(src), f"{sd.user}@{sd.host}:{dest}"]


def upload_vs_scp(b: "Bench", root: Path, bundle: Path, runtime: str,
                  rounds: Optional[int] = None) -> Dict[str, Any]:
    from edgebundle.oci import Platform
    from edgebundle.specs import SiteSpec
    from edgebundle.transfer.upload import upload_bundle

    rounds = rounds or b.o.upload_rounds
    d = root / "upload"
    sd = services.start_sshd(d / "sshd")
    try:
        kh = d / "known_hosts"
        kh.write_text(sd.known_hosts_line() + "\n")
        dest = d / "dest"
        dest.mkdir()
        site = SiteSpec(name="bench-upload", runtime="containerd", platform=Platform.parse(PLATFORM),
                        ssh=f"{sd.user}@{sd.host}:{sd.port}", edgebundle=f"{sys.executable} -m edgebundle")
        size = bundle.stat().st_size
        digest = _sha256(bundle)
        argv = scp_argv(sd, sd.client_key_path, kh, bundle, f"{dest}/scp.bin")
        scp_s: List[float] = []
        up_s: List[float] = []
        up_inner: List[float] = []
        for rnd in range(rounds):
            for first in (("scp", "upload") if rnd % 2 == 0 else ("upload", "scp")):
                for p in dest.iterdir():
                    p.unlink()
                if first == "scp":
                    t = time.monotonic()
                    subprocess.run(argv, check=True, env=services.clean_env(), capture_output=True)
                    scp_s.append(time.monotonic() - t)
                    b.check("fleet upload: scp copy identical", _sha256(dest / "scp.bin") == digest)
                else:
                    t = time.monotonic()
                    res = upload_bundle(site, str(bundle), str(dest), _ssh_options(sd.client_key_path, kh))
                    up_s.append(time.monotonic() - t)
                    up_inner.append(res.seconds)
                    b.check("fleet upload: upload_bundle copy identical and verified",
                            _sha256(dest / bundle.name) == digest and res.verified == "blocks"
                            and res.resumed_from == 0, f"verified {res.verified}, resumed {res.resumed_from}")
            b.log(f"  upload round {rnd}: scp {size / 1e6 / scp_s[-1]:.1f} MB/s ({scp_s[-1]:.2f} s), "
                  f"upload_bundle {size / 1e6 / up_s[-1]:.1f} MB/s ({up_s[-1]:.2f} s)")
        # the fixed costs of each (connect, and for upload_bundle the device's two `staged`
        # runs and the rename): the same commands on a 64 KiB file
        tiny = d / "tiny.ebundle"
        tiny.write_bytes(os.urandom(64 * 1024))
        floor_scp, floor_up = [], []
        for _ in range(rounds):
            for p in dest.iterdir():
                p.unlink()
            t = time.monotonic()
            subprocess.run(scp_argv(sd, sd.client_key_path, kh, tiny, f"{dest}/tiny.bin"), check=True,
                           env=services.clean_env(), capture_output=True)
            floor_scp.append(time.monotonic() - t)
            t = time.monotonic()
            upload_bundle(site, str(tiny), str(dest), _ssh_options(sd.client_key_path, kh))
            floor_up.append(time.monotonic() - t)
        scp_m, up_m = statistics.median(scp_s), statistics.median(up_s)
        out = {"bytes": size, "bundle": f"{runtime} form, empty-site state of the states run",
               "rounds": rounds, "scp_s": scp_s, "upload_s": up_s, "upload_inner_s": up_inner,
               "scp_median_s": scp_m, "upload_median_s": up_m, "ratio": scp_m / up_m,
               "scp_argv": proc.shell_join(["scp", *argv[1:-2], bundle.name, "root@127.0.0.1:DEST/"])
                   .replace(str(sd.client_key_path), "KEY").replace(str(kh), "KNOWN_HOSTS")
                   .replace(str(sd.port), "PORT"),
               "upload_call": "edgebundle.transfer.upload.upload_bundle(site, BUNDLE, DEST, SshOptions(...))",
               "floor_scp_s": statistics.median(floor_scp), "floor_upload_s": statistics.median(floor_up),
               "ssh_version": _ssh_version(), "paramiko": _paramiko_version()}
        b.log(f"  upload: {size / 1e6:.1f} MB, median scp {size / 1e6 / scp_m:.1f} MB/s, upload_bundle "
              f"{size / 1e6 / up_m:.1f} MB/s: {out['ratio']:.2f} x scp")
        return out
    finally:
        sd.stop()


def _ssh_version() -> str:
    r = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    return (r.stderr or r.stdout).strip()


def _paramiko_version() -> str:
    import paramiko
    return str(paramiko.__version__)


# ---------------------------------------------------------------------------
# sync of sites already up to date


def small_fleet(b: "Bench") -> List[Any]:
    """The images the 20 devices hold: the quick set's fleet (four images on one base, as
    the full fleet, a few MB each) under their own names. An up-to-date round trip reads
    image and layer records, never layer bytes, so their size does not matter to it, and
    importing the full fleet into 20 namespaces would cost minutes of unpacking."""
    import dataclasses
    from . import images as I
    if b.o.quick:
        return list(b.set.fleet)  # type: ignore[union-attr]
    small = [dataclasses.replace(img, repo=img.repo.replace("bench/", "bench-small/"), built=None)
             for img in I.quick_set(lambda _msg: None).fleet]
    for img in small:
        I.imagefactory.push_image(b.reg.host, img.repo, img.tag, img.build())
    return small


def sync_up_to_date(b: "Bench", root: Path, images: Sequence[Any]) -> Dict[str, Any]:
    from edgebundle.manifest import load_manifest
    from edgebundle.transfer.ssh import connect, read_report

    o = b.o
    n = o.sync_sites
    d = root / "sync"
    d.mkdir()
    started: List[Any] = []
    try:
        t0 = time.monotonic()
        cd = services.start_containerd(d / "cd")
        started.append(cd)
        sshds = []
        for i in range(n):
            sd = services.start_sshd(d / f"gw{i:02d}" / "sshd")
            started.append(sd)
            sshds.append(sd)
        client_key = sshds[0].client_key_path
        shared = client_key.with_name(client_key.name + ".pub").read_text()
        for sd in sshds[1:]:  # one client key for the fleet; sshd reads the file at each login
            (sd.config_path.parent / "authorized_keys").write_text(shared)
        kh = d / "known_hosts"
        kh.write_text("".join(sd.known_hosts_line() + "\n" for sd in sshds))
        sites = []
        for i, sd in enumerate(sshds):
            gw = d / f"gw{i:02d}"
            cmd = f"env EDGEBUNDLE_STATE_DIR={gw / 'state'} {sys.executable} -m edgebundle"
            sites.append((f"gw{i:02d}", "{" + ", ".join([
                "runtime: containerd", f"namespace: gw{i:02d}", f"platform: {PLATFORM}",
                f"ssh: {sd.user}@{sd.host}:{sd.port}", f'address: "{cd.address}"', f'edgebundle: "{cmd}"',
                f'staging: "{gw / "staging"}"']) + "}"))
        mpath = d / "sync.yaml"
        mpath.write_text(_manifest_text(b, images, sites))
        setup_s = time.monotonic() - t0
        b.log(f"  sync: containerd + {n} sshd started in {setup_s:.1f} s")
        # every namespace gets the manifest's images: one bundle, imported into each
        home = d / "home"
        bundle = d / "seed.ebundle"
        b.eb("--home", str(home), "pack", str(mpath), "--site", "gw00", "-o", str(bundle), "--no-progress").check()
        t0 = time.monotonic()
        for i in range(n):
            # as the device's own edgebundle would: its state dir is the one sync's command names
            env = services.clean_env({"EDGEBUNDLE_STATE_DIR": str(d / f"gw{i:02d}" / "state")})
            proc.run([sys.executable, "-m", "edgebundle", "import", str(bundle), "--runtime", "containerd",
                      "--address", cd.address, "--namespace", f"gw{i:02d}", "--snapshotter", cd.snapshotter,
                      "--no-progress"], env=env, poll=0.05).check()
        seed_s = time.monotonic() - t0
        b.log(f"  sync: {len(images)} images imported into {n} namespaces in {seed_s:.1f} s")
        shutil.rmtree(home)  # the packer starts knowing nothing: sync reads the reports
        ssh = ["--known-hosts", str(kh), "--identity", str(client_key), "--ssh-config", os.devnull]

        device_pids = [sd.pid for sd in sshds] + [cd.pid]
        last: Dict[str, float] = {}

        def sync(*sel: str) -> Tuple[float, Dict[str, Any]]:
            # CPU: the sync process tree (the packer), and the devices' side: every sshd with
            # the sessions, shells, edgebundle and ctr processes it reaped, and containerd
            before = proc.cpu_seconds(device_pids)
            r = b.eb("--home", str(home), "sync", str(mpath), *sel, *ssh, "--json", "--no-progress")
            last.update(packer_cpu=r.cpu, device_cpu=proc.cpu_seconds(device_pids) - before)
            try:
                obj = json.loads(r.stdout)
            except ValueError:
                obj = {"ok": False, "sites": [], "error": r.stderr[-500:]}
            if r.rc != 0:
                b.log(f"  sync {' '.join(sel)} exited {r.rc}: {r.stderr.strip()[-300:]}")
            return r.wall, obj

        def all_up_to_date(obj: Dict[str, Any], want: int) -> bool:
            sites_ = obj.get("sites", [])
            return bool(obj.get("ok")) and len(sites_) == want and all(
                s["action"] == "up-to-date" and s["bytes_sent"] == 0 for s in sites_) \
                and obj.get("total", {}).get("bundles_packed") == 0

        first_s, obj = sync("--all", "--parallel", str(o.parallels[0]))
        b.check("fleet sync: first run finds every site up to date", all_up_to_date(obj, n),
                json.dumps(obj)[:500])
        reps = o.sync_repeat
        one: List[float] = []
        one_site: List[float] = []
        one_cpu: List[Dict[str, float]] = []
        for _ in range(reps):
            wall, obj = sync("--site", "gw00")
            b.check("fleet sync: one site up to date", all_up_to_date(obj, 1), json.dumps(obj)[:300])
            one.append(wall)
            one_cpu.append(dict(last))
            one_site.extend(s["seconds"] for s in obj.get("sites", []))
        manifest = load_manifest(str(mpath))
        site0 = manifest.site("gw00")
        bare: List[float] = []
        for _ in range(reps):
            t = time.monotonic()
            with connect(site0, _ssh_options(client_key, kh)) as client:
                read_report(client, site0)
            bare.append(time.monotonic() - t)
        # the device's side of a round trip, without SSH: its report command, wall and CPU
        # (with ctr's); 20 devices on this machine's cores share that CPU
        env0 = services.clean_env({"EDGEBUNDLE_STATE_DIR": str(d / "gw00" / "state")})
        reports = [proc.run([sys.executable, "-m", "edgebundle", "report", "--runtime", "containerd",
                             "--namespace", "gw00", "--address", cd.address, "--json"], env=env0,
                            poll=0.05).check() for _ in range(reps)]
        device = {"report_wall_s": statistics.median(r.wall for r in reports),
                  "report_cpu_s": statistics.median(r.cpu for r in reports)}
        runs: Dict[int, List[Dict[str, Any]]] = {p: [] for p in o.parallels}
        for _ in range(reps):
            for p in o.parallels:
                wall, obj = sync("--all", "--parallel", str(p))
                b.check(f"fleet sync: --all --parallel {p} finds every site up to date",
                        all_up_to_date(obj, n), json.dumps(obj)[:300])
                per = [s["seconds"] for s in obj.get("sites", [])]
                runs[p].append({"wall": wall, "site_median_s": statistics.median(per) if per else 0.0,
                                "site_max_s": max(per, default=0.0), **last,
                                "load": _loadavg()})
                b.log(f"  sync --all --parallel {p}: {wall:.2f} s (per site median "
                      f"{runs[p][-1]['site_median_s']:.2f} s)")
        one_m = statistics.median(one)
        out = {
            "sites": n, "images": [i.ref for i in images], "setup_s": setup_s, "seed_s": seed_s,
            "first_all_s": first_s, "repeat": reps,
            "one_s": one, "one_median_s": one_m, "one_site_s": one_site, "one_cpu": one_cpu,
            "bare_s": bare, "bare_median_s": statistics.median(bare),
            # more workers than sites work as many as there are sites
            "parallel": {str(p): {"runs": rs, "median_s": statistics.median(r["wall"] for r in rs),
                                  "bound_s": 2 * one_m * n / min(p, n),
                                  "bare_bound_s": 2 * statistics.median(bare) * n / min(p, n)}
                         for p, rs in runs.items()},
            "device": device,
            "argv": {"one": "edgebundle sync sync.yaml --site gw00 --known-hosts KH --identity KEY --json",
                     "all": "edgebundle sync sync.yaml --all --parallel P --known-hosts KH --identity KEY --json"},
            "cores": os.cpu_count(),
        }
        b.log(f"  sync: one site {one_m:.2f} s (CLI; bare connect + report "
              f"{out['bare_median_s']:.2f} s); " + ", ".join(
                  f"--parallel {p}: {v['median_s']:.2f} s (bound {v['bound_s']:.2f} s)"
                  for p, v in out["parallel"].items()))
        return out
    finally:
        for svc in reversed(started):
            try:
                svc.stop()
            except Exception as exc:  # keep stopping the rest
                b.log(f"stopping {svc}: {exc}")
