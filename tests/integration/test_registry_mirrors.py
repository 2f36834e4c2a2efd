"""Mirrors proven with real registries: each mirror is a ``docker-registry`` serving a
copy of the upstream's storage (what a pull-through cache holds), altered on disk where
a test needs a mirror that lacks a blob or serves wrong bytes for one.

Every case checks the bytes (digests against what was pushed) and which source served
each digest (``RegistryClient.served()``, and the CLI's ``pack --json`` / text output).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

import imagefactory
import services
from edgebundle.cache import BlobCache
from edgebundle.errors import ResolveError
from edgebundle.image import ResolvedImage
from edgebundle.oci import Platform
from edgebundle.reference import parse_reference
from edgebundle.registry import RegistryClient
from edgebundle.resolve import Resolver
from edgebundle.specs import ImageSpec, RegistryConfig

REPO = "shop/mirrored"


@dataclass
class Mirrors:
    image: imagefactory.BuiltImage
    upstream: services.Registry
    full: services.Registry  # everything upstream has
    empty: services.Registry  # nothing at all
    no_blob: services.Registry  # lacks layer 0's blob
    corrupt: services.Registry  # serves wrong bytes (same size) for layer 1
    silent: services.SilentServer  # accepts, never answers
    dead: str  # nothing listens there


def blob_data(root: Path, digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return root / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


@pytest.fixture(scope="module")
def mirrors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirrors]:
    tmp = tmp_path_factory.mktemp("mirrors")
    started: List[services.Registry] = []
    silent = services.start_silent_server()
    try:
        upstream = services.start_registry(tmp / "upstream")
        started.append(upstream)
        image = imagefactory.build_image([{"etc/motd": "mirrored one\n"},
                                          {"app/blob.bin": imagefactory.pseudo_random_bytes("m", 20000)}])
        imagefactory.push_image(upstream.host, REPO, "v1", image)

        def copy(name: str) -> Path:
            root = tmp / name / "storage"
            shutil.copytree(upstream.root, root)
            return root

        no_blob_root = copy("no-blob")
        blob_data(no_blob_root, image.layers[0].digest).unlink()
        corrupt_root = copy("corrupt")
        data = blob_data(corrupt_root, image.layers[1].digest)
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        regs = {}
        for name, storage in (("full", copy("full")), ("empty", None), ("no_blob", no_blob_root),
                              ("corrupt", corrupt_root)):
            regs[name] = services.start_registry(tmp / f"{name}-reg", storage=storage)
            started.append(regs[name])
    except (services.ServiceError, OSError) as exc:
        for reg in started:
            reg.stop()
        silent.stop()
        pytest.fail(f"docker-registry could not start: {exc}", pytrace=False)
    yield Mirrors(image, upstream, regs["full"], regs["empty"], regs["no_blob"], regs["corrupt"], silent,
                  f"127.0.0.1:{services.free_port()}")
    for reg in started:
        reg.stop()
    silent.stop()


def client_for(m: Mirrors, mirror_hosts: List[str], timeout: float = 10.0) -> RegistryClient:
    configs = {h: RegistryConfig(h, insecure=True) for h in mirror_hosts}
    configs[m.upstream.host] = RegistryConfig(m.upstream.host, insecure=True, mirrors=tuple(mirror_hosts))
    return RegistryClient(configs, timeout=timeout, retries=1, backoff=0.01)


def pull(m: Mirrors, mirror_hosts: List[str], cache: Path, timeout: float = 10.0) -> Tuple[ResolvedImage, Dict[str, str]]:
    client = client_for(m, mirror_hosts, timeout)
    resolver = Resolver(BlobCache(cache), client)
    try:
        ref = f"{m.upstream.host}/{REPO}:v1"
        image = resolver.resolve(ImageSpec(ref, parse_reference(ref)), Platform.parse("linux/amd64"))
        (image,) = resolver.fetch_layers([image], {la.digest for la in image.layers})
        for blob in (*m.image.layers, m.image.config):
            assert resolver.cache.read_bytes(blob.digest) == blob.data
        return image, client.served()
    finally:
        resolver.close()
        client.close()


def digests(m: Mirrors) -> List[str]:
    return [m.image.manifest_digest, m.image.config_digest, *m.image.layer_digests]


def test_good_mirror_serves_everything(mirrors: Mirrors, tmp_path: Path) -> None:
    image, served = pull(mirrors, [mirrors.full.host], tmp_path / "c")
    assert image.manifest.digest == mirrors.image.manifest_digest
    assert {d: served[d] for d in digests(mirrors)} == {d: mirrors.full.host for d in digests(mirrors)}


def test_mirror_down_falls_back_to_upstream(mirrors: Mirrors, tmp_path: Path) -> None:
    _, served = pull(mirrors, [mirrors.dead], tmp_path / "c")
    assert {served[d] for d in digests(mirrors)} == {mirrors.upstream.host}


def test_mirror_timing_out_falls_back_to_upstream(mirrors: Mirrors, tmp_path: Path) -> None:
    started = time.monotonic()
    _, served = pull(mirrors, [mirrors.silent.host, mirrors.full.host], tmp_path / "c", timeout=1.0)
    assert {served[d] for d in digests(mirrors)} == {mirrors.full.host}
    # One attempt per request at the silent mirror (manifest, config, 2 layers), no retries there.
    assert time.monotonic() - started < 4 * 1.0 + 8


def test_mirror_lacking_image_falls_back(mirrors: Mirrors, tmp_path: Path) -> None:
    _, served = pull(mirrors, [mirrors.empty.host], tmp_path / "c")
    assert {served[d] for d in digests(mirrors)} == {mirrors.upstream.host}


def test_mirror_lacking_a_blob_serves_the_rest(mirrors: Mirrors, tmp_path: Path) -> None:
    _, served = pull(mirrors, [mirrors.no_blob.host], tmp_path / "c")
    lacking = mirrors.image.layers[0].digest
    assert served[lacking] == mirrors.upstream.host
    assert {served[d] for d in digests(mirrors) if d != lacking} == {mirrors.no_blob.host}


def test_mirror_serving_wrong_bytes_is_caught_and_next_source_used(mirrors: Mirrors, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    bad = mirrors.image.layers[1].digest
    _, served = pull(mirrors, [mirrors.corrupt.host, mirrors.no_blob.host], tmp_path / "c")
    assert served[bad] == mirrors.no_blob.host  # the next mirror, which has it right
    assert served[mirrors.image.layers[0].digest] == mirrors.corrupt.host
    assert any(f"mirror {mirrors.corrupt.host} served wrong bytes for blob {bad}" in r.getMessage()
               for r in caplog.records)


def test_all_sources_wrong_fails_one_line(mirrors: Mirrors, tmp_path: Path) -> None:
    """Upstream itself corrupt (the corrupt mirror's storage, as if it were the registry)."""
    client = RegistryClient({mirrors.corrupt.host: RegistryConfig(mirrors.corrupt.host, insecure=True)},
                            retries=0, backoff=0.01, digest_retries=1)
    with pytest.raises(ResolveError) as err:
        client.fetch_blob(parse_reference(f"{mirrors.corrupt.host}/{REPO}"), mirrors.image.layers[1].digest,
                          mirrors.image.layers[1].size, BlobCache(tmp_path / "c"))
    client.close()
    assert mirrors.corrupt.host in err.value.message and "\n" not in err.value.message
    assert not BlobCache(tmp_path / "c").has(mirrors.image.layers[1].digest)


def test_cli_pack_says_which_source_served_what(mirrors: Mirrors, tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    up = mirrors.upstream.host
    manifest.write_text(f"""version: 1
registries:
  "{up}": {{insecure: true, mirrors: ["{mirrors.dead}", "{mirrors.no_blob.host}"]}}
  "{mirrors.dead}": {{insecure: true}}
  "{mirrors.no_blob.host}": {{insecure: true}}
images:
  - {up}/{REPO}:v1
sites:
  s1: {{runtime: containerd, platform: linux/amd64}}
""")
    env = services.clean_env({"EDGEBUNDLE_HOME": str(tmp_path / "home"), "HOME": str(tmp_path / "user")})
    argv = [sys.executable, "-m", "edgebundle", "pack", str(manifest), "--site", "s1"]
    proc = subprocess.run(argv + ["-o", str(tmp_path / "a.ebundle"), "--json"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plan"]
    (img,) = plan["images"]
    assert img["source"] == mirrors.no_blob.host
    layers = {la["digest"]: la["source"] for la in img["layers"]}
    assert layers == {mirrors.image.layers[0].digest: up, mirrors.image.layers[1].digest: mirrors.no_blob.host}

    # Text output, a fresh home: the same sources, said per image and layer.
    env["EDGEBUNDLE_HOME"] = str(tmp_path / "home2")
    proc = subprocess.run(argv + ["-o", str(tmp_path / "b.ebundle")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"(from {mirrors.no_blob.host})" in proc.stdout
    assert f"{mirrors.image.layers[0].digest[7:19]}  whole" in proc.stdout
    line0 = next(line for line in proc.stdout.splitlines() if mirrors.image.layers[0].digest[7:19] in line)
    assert line0.endswith(f"from {up}"), proc.stdout


def test_registry_timing_out_is_one_line_i_o_timeout(mirrors: Mirrors) -> None:
    host = mirrors.silent.host
    client = RegistryClient({host: RegistryConfig(host, insecure=True)}, timeout=0.5, retries=1, backoff=0.01)
    started = time.monotonic()
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference(f"{host}/{REPO}:v1"))
    client.close()
    assert err.value.message == f"registry {host}: i/o timeout (waiting for data, nothing within 0.5s)"
    assert "HTTPS_PROXY" in (err.value.hint or "")
    assert time.monotonic() - started < 5  # two attempts of 0.5 s, bounded
