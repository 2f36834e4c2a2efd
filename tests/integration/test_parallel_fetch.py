"""Parallel layer downloads (``--jobs``) against a real ``docker-registry`` on loopback.

* An image of several layers packs with ``--jobs 3``: every layer lands in the packer
  cache under its digest with the diff_id and tar size the image factory computed (learnt
  while it streamed), and three downloads really ran at once (a barrier in front of the
  real client's ``fetch_blob`` that sequential downloads could never pass).
* A blob the registry serves corrupted (its storage file overwritten after the push, same
  size) fails the pack with one line naming it; no temp file and no entry for it are left
  in the cache, and nothing half-written anywhere.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, List, Optional

import pytest

import imagefactory
import services
from edgebundle.cache import BlobCache
from edgebundle.errors import ResolveError
from edgebundle.oci import Platform
from edgebundle.progress import Bar
from edgebundle.reference import Reference, parse_reference
from edgebundle.registry import RegistryClient
from edgebundle.resolve import Resolver
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

    def __init__(self, host: str, n: int) -> None:
        super().__init__({host: RegistryConfig(host, insecure=True)}, timeout=30.0)
        self.gate = threading.Barrier(n, timeout=20)
        self.threads: List[str] = []

    def fetch_blob(self, repo: Reference, digest: str, size: Optional[int], cache: BlobCache,
                   progress: Any = None, layer_media_type: Optional[str] = None) -> None:
        if layer_media_type is not None:  # a layer (the config is fetched at resolve, alone)
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
