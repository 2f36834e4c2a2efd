"""Parallel layer downloads (``--jobs``) against a real ``docker-registry`` on loopback.

* An image of several layers packs with ``--jobs 3``: every layer lands in the packer
  cache under its digest with the diff_id and tar size the image factory computed (learnt
  while it streamed), and three downloads really ran at once (a barrier in front of the
  real client's ``fetch_blob`` that sequential downloads could never pass).
* A site holding app:v1 gets app:v2 as a delta from a packer that has none of v1's
  blobs: the bases it needs are fetched from the real registry three at a time (the
  same barrier), and a base the registry lacks only costs its delta, never the plan.
* A blob the registry serves corrupted (its storage file overwritten after the push, same
  size) fails the pack with one line naming it; no temp file and no entry for it are left
  in the cache, and nothing half-written anywhere.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, List, Optional, Set

import pytest

import imagefactory
import services
from edgebundle.cache import BlobCache
from edgebundle.format import FEATURE_DELTA
from edgebundle.holdings import HeldImage, HeldLayer, Inventory
from edgebundle.manifest import load_manifest
from edgebundle.oci import chain_ids
from edgebundle.errors import ResolveError
from edgebundle.oci import Platform
from edgebundle.progress import NULL_BAR, Bar
from edgebundle.reference import Reference, parse_reference
from edgebundle.registry import RegistryClient
from edgebundle.resolve import Resolver
from edgebundle.usecases.packer import PackerSession
from edgebundle.specs import ImageSpec, RegistryConfig

pytestmark = pytest.mark.integration

LAYERS = 5
AMD64 = Platform("linux", "amd64")


def _image(tag: str) -> imagefactory.BuiltImage:
    # a few MB each, part random (incompressible) part text, so each download takes a while
    layers = [{f"data/{tag}/{i}.bin": imagefactory.pseudo_random_bytes(f"{tag}-{i}", 1_500_000 + 100_000 * i),
               f"data/{tag}/{i}.txt": (f"layer {i} of {tag}\n" * 40_000).encode()}
              for i in range(LAYERS)]
    return imagefactory.build_image(layers, media="oci")


def _manifest(tmp: Path, host: str, ref: str) -> Path:
    path = tmp / "m.yaml"
    path.write_text(f"""version: 1
registries:
  "{host}": {{insecure: true}}
images:
  - ref: {host}/{ref}
sites:
  gw: {{runtime: containerd, namespace: jobs, platform: linux/amd64}}
""")
    return path


def _pack(manifest: Path, home: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = services.clean_env({"HOME": str(home / "user")})
    return subprocess.run([sys.executable, "-m", "edgebundle", "--home", str(home), "pack", str(manifest),
                           "--site", "gw", "-o", str(home / "out.ebundle"), "--no-progress", *extra],
                          capture_output=True, text=True, env=env, timeout=180)


def _blob_file(registry: services.Registry, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return registry.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


def test_pack_jobs_3_fetches_every_layer_verified(registry: services.Registry, tmp_path: Path) -> None:
    img = _image("ok")
    imagefactory.push_image(registry.host, "jobs/ok", "v1", img)
    home = tmp_path / "home"
    proc = _pack(_manifest(tmp_path, registry.host, "jobs/ok:v1"), home, "--jobs", "3")
    assert proc.returncode == 0, proc.stderr
    cache = BlobCache(home / "cache")
    for blob, tar, diff_id in zip(img.layers, img.layer_tars, img.diff_ids):
        assert cache.has(blob.digest)
        assert imagefactory.sha256(cache.path(blob.digest).read_bytes()) == blob.digest
        assert cache.layer_info(blob.digest) == (diff_id, len(tar))
    assert list((home / "cache" / "tmp").iterdir()) == []
    verify = subprocess.run([sys.executable, "-m", "edgebundle", "verify", str(home / "out.ebundle")],
                            capture_output=True, text=True, env=services.clean_env(), timeout=120)
    assert verify.returncode == 0, verify.stderr


class _GatedClient(RegistryClient):
    """The real client; each blob download first waits until ``n`` are in flight at once."""

    def __init__(self, host: str, n: int, only: Optional[Set[str]] = None) -> None:
        """``only``: gate just these digests (default: every layer download)."""
        super().__init__({host: RegistryConfig(host, insecure=True)}, timeout=30.0)
        self.gate = threading.Barrier(n, timeout=20)
        self.only = only
        self.threads: List[str] = []

    def fetch_blob(self, repo: Reference, digest: str, size: Optional[int], cache: BlobCache,
                   progress: Any = None, layer_media_type: Optional[str] = None) -> None:
        # a layer (the config is fetched at resolve, alone), or one of ``only``
        if (digest in self.only) if self.only is not None else layer_media_type is not None:
            self.threads.append(threading.current_thread().name)
            if len(self.threads) <= self.gate.parties:
                self.gate.wait()  # raises BrokenBarrierError if fewer than n ever run together
        super().fetch_blob(repo, digest, size, cache, progress, layer_media_type)


def test_three_downloads_run_at_once_behind_one_bar(registry: services.Registry, tmp_path: Path) -> None:
    img = _image("gate")
    imagefactory.push_image(registry.host, "jobs/gate", "v1", img)
    client = _GatedClient(registry.host, 3)
    bars: List[str] = []

    class Counter:
        n = 0

        def update(self, k: int) -> None:
            self.n += k

    counter = Counter()

    def factory(total: int, desc: str) -> Bar:
        bars.append(desc)
        return counter

    with client:
        resolver = Resolver(BlobCache(tmp_path / "cache"), client, jobs=3)
        ref = f"{registry.host}/jobs/gate:v1"
        resolved = resolver.resolve(ImageSpec(ref, parse_reference(ref)), AMD64)
        resolver.fetch_layers([resolved], {la.digest for la in resolved.layers}, factory)
    assert bars == ["fetching layers"]  # one display for all five downloads
    assert counter.n == sum(b.size for b in img.layers)
    assert len(set(client.threads)) == 3  # three workers, reused for the other two


def test_corrupt_blob_fails_pack_in_one_line_and_leaves_no_cache_entry(
        registry: services.Registry, tmp_path: Path) -> None:
    img = _image("bad")
    imagefactory.push_image(registry.host, "jobs/bad", "v1", img)
    bad = img.layers[2]
    data = _blob_file(registry, bad.digest)
    data.write_bytes(b"\x00" * data.stat().st_size)  # same size, other bytes: only the digest tells
    home = tmp_path / "home"
    proc = _pack(_manifest(tmp_path, registry.host, "jobs/bad:v1"), home, "--jobs", "3")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("edgebundle: error: ") and bad.digest in lines[0], lines[0]
    cache = BlobCache(home / "cache")
    assert not cache.has(bad.digest) and cache.layer_info(bad.digest) is None
    assert list((home / "cache" / "tmp").iterdir()) == []  # no partial download anywhere
    for blob in img.layers:  # what did arrive is whole and verified
        if cache.has(blob.digest):
            assert imagefactory.sha256(cache.path(blob.digest).read_bytes()) == blob.digest
    assert not (home / "out.ebundle").exists()


def test_missing_blob_fails_resolver_and_stops_the_rest(registry: services.Registry, tmp_path: Path) -> None:
    img = _image("gone")
    imagefactory.push_image(registry.host, "jobs/gone", "v1", img)
    _blob_file(registry, img.layers[0].digest).unlink()  # the largest-but-one: a 404 (or 5xx) mid-run
    client = RegistryClient({registry.host: RegistryConfig(registry.host, insecure=True)}, timeout=30.0,
                            retries=1, backoff=0.01)
    with client:
        cache = BlobCache(tmp_path / "cache")
        resolver = Resolver(cache, client, jobs=3)
        ref = f"{registry.host}/jobs/gone:v1"
        resolved = resolver.resolve(ImageSpec(ref, parse_reference(ref)), AMD64)
        with pytest.raises(ResolveError) as err:
            resolver.fetch_layers([resolved], {la.digest for la in resolved.layers})
    assert img.layers[0].digest in err.value.message
    assert not cache.has(img.layers[0].digest)
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def _held(resolver: Resolver, ref: str) -> Inventory:
    """What a containerd device holding ``ref`` complete reports (blobs and chains)."""
    img = resolver.resolve(ImageSpec(ref, parse_reference(ref)), AMD64)
    layers = tuple(HeldLayer(la.diff_id, la.digest, la.size, blob=True, unpacked=True, tar=True)
                   for la in img.layers)
    held = HeldImage(img.name, img.config.digest, img.top, img.manifest.digest, "linux/amd64", True, layers)
    return Inventory("containerd", "jobs", (held,), frozenset(la.digest for la in img.layers),
                     frozenset(chain_ids(la.diff_id for la in img.layers)), features=frozenset({FEATURE_DELTA}))


def test_delta_bases_are_fetched_in_parallel_and_a_missing_one_costs_only_its_delta(
        registry: services.Registry, tmp_path: Path) -> None:
    libs = [{f"usr/lib/{i}/m{j}.py": imagefactory.pseudo_random_bytes(f"lib-{i}-{j}", 60_000) for j in range(20)}
            for i in range(4)]
    changed = [dict(layer) for layer in libs]
    for layer in changed:  # every layer of v2 edits one file of its v1 layer: each wants its base
        name = next(iter(layer))
        layer[name] = layer[name][:30_000] + b"# edited\n" + layer[name][30_000:]
    v1, v2 = imagefactory.build_image(libs, media="oci"), imagefactory.build_image(changed, media="oci")
    imagefactory.push_image(registry.host, "jobs/app", "v1", v1)
    imagefactory.push_image(registry.host, "jobs/app", "v2", v2)
    _blob_file(registry, v1.layers[0].digest).unlink()  # one base the registry no longer has
    manifest = _manifest(tmp_path, registry.host, "jobs/app:v2")
    present = {b.digest for b in v1.layers[1:]}
    client = _GatedClient(registry.host, 3, only=present)
    bars: List[str] = []
    with client:
        inv = _held(Resolver(BlobCache(tmp_path / "elsewhere"), client), f"{registry.host}/jobs/app:v1")
        with PackerSession(tmp_path / "home", load_manifest(str(manifest)), client=client, jobs=3,
                           progress=lambda total, desc: bars.append(desc) or NULL_BAR) as session:
            plan = session.plan(session.site("gw"), inventory=inv, fetch=True)
    assert len(set(client.threads)) == 3  # the three bases the registry has came at once
    cache = BlobCache(tmp_path / "home" / "cache")
    assert all(cache.has(d) for d in present) and not cache.has(v1.layers[0].digest)
    assert bars.count("fetching bases") == 1  # one display for them
    assert list((tmp_path / "home" / "cache" / "tmp").iterdir()) == []
    (ip,) = plan.images
    assert ip.layers[0].ship and ip.layers[0].delta is None  # its base is gone: whole, not a failure
    assert ip.layers[0].note.startswith("whole: ")
    for lp in ip.layers[1:]:
        assert lp.ship and lp.delta is not None and lp.delta.stored < lp.layer.size / 4
