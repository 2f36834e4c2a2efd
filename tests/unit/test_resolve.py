"""Resolver: platform selection, cache-first resolution, layer fetching and checking."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import httpx
import pytest
import zstandard

from edgebundle.cache import BlobCache
from edgebundle.errors import ResolveError
from edgebundle.oci import MT_DOCKER_LIST, MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_LAYER, MT_OCI_LAYER_GZIP, \
    MT_OCI_LAYER_ZSTD, MT_OCI_MANIFEST, Platform, sha256_digest
from edgebundle.specs import ImageSpec
from edgebundle.reference import parse_reference
from edgebundle.registry import RegistryClient
from edgebundle.resolve import Resolver, uncompressed_digest

AMD64 = Platform.parse("linux/amd64")
ARM64 = Platform.parse("linux/arm64")


def layer_tar(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(tar: bytes, media_type: str) -> bytes:
    if media_type.endswith("gzip"):
        return gzip.compress(tar, mtime=0)
    if media_type.endswith("zstd"):
        return zstandard.ZstdCompressor().compress(tar)
    return tar


@dataclass
class Image:
    manifest: bytes
    config: bytes
    layers: List[bytes]
    tars: List[bytes]

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)


def build_image(arch: str = "amd64", variant: str = "", marker: str = "", *,
                layer_types: Tuple[str, ...] = (MT_OCI_LAYER_GZIP, MT_OCI_LAYER_GZIP),
                media: str = MT_OCI_MANIFEST, diff_ids: Optional[List[str]] = None) -> Image:
    tars = [layer_tar(f"f{i}", f"layer {i} {marker or arch}".encode() * 50) for i in range(len(layer_types))]
    blobs = [compress(t, mt) for t, mt in zip(tars, layer_types)]
    cfg: Dict[str, object] = {"architecture": arch, "os": "linux",
                              "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha256_digest(t) for t in tars]}}
    if variant:
        cfg["variant"] = variant
    config = json.dumps(cfg).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": media,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(config),
                   "size": len(config)},
        "layers": [{"mediaType": mt, "digest": sha256_digest(b), "size": len(b)} for b, mt in zip(blobs, layer_types)],
    }).encode()
    return Image(manifest, config, blobs, tars)


def build_index(images: List[Tuple[Image, Dict[str, str]]], media: str = MT_OCI_INDEX) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": media, "manifests": [
        {"mediaType": MT_OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest), "platform": plat}
        for img, plat in images]}).encode()


class Registry:
    """Minimal registry: serves manifests by tag or digest and blobs; counts requests."""

    def __init__(self) -> None:
        self.manifests: Dict[str, Tuple[bytes, str]] = {}
        self.blobs: Dict[str, bytes] = {}
        self.requests: List[httpx.Request] = []

    def push(self, repo_tag: str, image: Image) -> None:
        self.manifests[image.digest] = (image.manifest, MT_OCI_MANIFEST)
        self.manifests[repo_tag] = (image.manifest, MT_OCI_MANIFEST)
        for blob in [image.config] + image.layers:
            self.blobs[sha256_digest(blob)] = blob

    def push_index(self, tag: str, index: bytes, images: List[Image], media: str = MT_OCI_INDEX) -> None:
        for img in images:
            self.push(img.digest, img)
        self.manifests[tag] = (index, media)
        self.manifests[sha256_digest(index)] = (index, media)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        kind, ident = request.url.path.split("/")[-2:]
        if kind == "manifests" and ident in self.manifests:
            body, media_type = self.manifests[ident]
            return httpx.Response(200, content=body, headers={"Content-Type": media_type})
        if kind == "blobs" and ident in self.blobs:
            return httpx.Response(200, content=self.blobs[ident])
        return httpx.Response(404)

    def client(self) -> RegistryClient:
        return RegistryClient({}, transport=httpx.MockTransport(self.handle), backoff=0.0, sleep=lambda s: None)

    def count(self, kind: str) -> int:
        return sum(1 for r in self.requests if f"/{kind}/" in r.url.path)


def spec(text: str, platform: Optional[str] = None, source: Optional[str] = None) -> ImageSpec:
    return ImageSpec(text, parse_reference(text), source=source,
                     platform=Platform.parse(platform) if platform else None)


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    return BlobCache(tmp_path / "cache")


# ---------------------------------------------------------------------------
# resolve


def test_resolve_single_manifest(cache: BlobCache) -> None:
    reg = Registry()
    img = build_image()
    reg.push("v1", img)
    resolved = Resolver(cache, reg.client()).resolve(spec("reg.test/shop/app:v1"), AMD64)
    assert resolved.ref == parse_reference("reg.test/shop/app:v1")
    assert resolved.top == resolved.manifest and resolved.top.digest == img.digest
    assert resolved.top.media_type == MT_OCI_MANIFEST and resolved.top.size == len(img.manifest)
    assert resolved.config.digest == sha256_digest(img.config)
    assert [(la.digest, la.diff_id, la.tar_size) for la in resolved.layers] == [
        (sha256_digest(b), sha256_digest(t), -1) for b, t in zip(img.layers, img.tars)]
    # the small blobs are cached; no layer was fetched
    assert cache.read_bytes(img.digest) == img.manifest and cache.has(resolved.config.digest)
    assert reg.count("blobs") == 1 and not any(cache.has(la.digest) for la in resolved.layers)


def test_index_platform_selection_with_arm64_variant_v8(cache: BlobCache) -> None:
    reg = Registry()
    amd, arm = build_image("amd64"), build_image("arm64", "v8")
    index = build_index([(amd, {"os": "linux", "architecture": "amd64"}),
                         (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    reg.push_index("v1", index, [amd, arm])
    resolver = Resolver(cache, reg.client())
    for wanted, image in ((ARM64, arm), (Platform.parse("linux/arm64/v8"), arm), (AMD64, amd)):
        resolved = resolver.resolve(spec("reg.test/shop/multi:v1"), wanted)
        assert resolved.top.digest == sha256_digest(index) and resolved.top.media_type == MT_OCI_INDEX
        assert resolved.manifest.digest == image.digest
        assert resolved.platform == wanted.normalized()
    assert [b.digest for b in resolved.json_blobs] == [sha256_digest(index), amd.digest, sha256_digest(amd.config)]
    # the tag was asked once: every platform of one run sees the same index
    assert sum(1 for r in reg.requests if r.url.path.endswith("/manifests/v1")) == 1


def test_image_platform_overrides_site_platform(cache: BlobCache) -> None:
    reg = Registry()
    amd, arm = build_image("amd64"), build_image("arm64")
    reg.push_index("v1", build_index([(amd, {"os": "linux", "architecture": "amd64"}),
                                      (arm, {"os": "linux", "architecture": "arm64"})]), [amd, arm])
    resolved = Resolver(cache, reg.client()).resolve(spec("reg.test/shop/multi:v1", platform="linux/arm64"), AMD64)
    assert resolved.manifest.digest == arm.digest and resolved.platform == ARM64


def test_no_matching_platform_lists_available(cache: BlobCache) -> None:
    reg = Registry()
    amd, arm = build_image("amd64"), build_image("arm", "v7")
    attestation = build_image("unknown", marker="att")
    index = build_index([(amd, {"os": "linux", "architecture": "amd64"}),
                         (arm, {"os": "linux", "architecture": "arm", "variant": "v7"}),
                         (attestation, {"os": "unknown", "architecture": "unknown"})], media=MT_DOCKER_LIST)
    reg.push_index("v1", index, [amd, arm, attestation], media=MT_DOCKER_LIST)
    with pytest.raises(ResolveError) as err:
        Resolver(cache, reg.client()).resolve(spec("reg.test/shop/multi:v1"), Platform.parse("linux/arm/v6"))
    assert err.value.message == ("image reg.test/shop/multi:v1 has no linux/arm/v6 variant "
                                 "(available: linux/amd64, linux/arm/v7)")
    assert "platform:" in (err.value.hint or "")


def test_plain_manifest_for_the_wrong_platform(cache: BlobCache) -> None:
    reg = Registry()
    reg.push("v1", build_image("amd64"))
    with pytest.raises(ResolveError) as err:
        Resolver(cache, reg.client()).resolve(spec("reg.test/shop/app:v1"), ARM64)
    assert err.value.message == "image reg.test/shop/app:v1 is built for linux/amd64, not linux/arm64"


def test_layer_and_diff_id_count_mismatch(cache: BlobCache) -> None:
    reg = Registry()
    reg.push("v1", build_image(diff_ids=[sha256_digest(b"only one")]))
    with pytest.raises(ResolveError) as err:
        Resolver(cache, reg.client()).resolve(spec("reg.test/shop/app:v1"), AMD64)
    assert "lists 2 layers but its config has 1 diff_ids" in err.value.message


def test_not_found_propagates_with_reference(cache: BlobCache) -> None:
    with pytest.raises(ResolveError, match=r"image reg.test/shop/app:nope not found in reg.test"):
        Resolver(cache, Registry().client()).resolve(spec("reg.test/shop/app:nope"), AMD64)


def test_digest_pinned_cached_image_resolves_without_network(cache: BlobCache) -> None:
    reg = Registry()
    amd, arm = build_image("amd64"), build_image("arm64")
    index = build_index([(amd, {"os": "linux", "architecture": "amd64"}),
                         (arm, {"os": "linux", "architecture": "arm64"})])
    reg.push_index("v1", index, [amd, arm])
    pinned = spec(f"reg.test/shop/multi:v1@{sha256_digest(index)}")
    first = Resolver(cache, reg.client()).resolve(pinned, ARM64)
    assert len(reg.requests) == 3  # index, arm64 manifest, config
    reg.requests.clear()
    second = Resolver(cache, reg.client()).resolve(pinned, ARM64)
    assert reg.requests == []
    assert second == first
    # and with no registry client at all
    assert Resolver(cache, None).resolve(pinned, ARM64) == first


def test_tag_resolve_only_refetches_the_tag(cache: BlobCache) -> None:
    reg = Registry()
    reg.push("v1", build_image())
    Resolver(cache, reg.client()).resolve(spec("reg.test/shop/app:v1"), AMD64)
    reg.requests.clear()
    Resolver(cache, reg.client()).resolve(spec("reg.test/shop/app:v1"), AMD64)
    assert [r.url.path for r in reg.requests] == ["/v2/shop/app/manifests/v1"]


def test_offline_resolver_refuses_uncached_images(cache: BlobCache) -> None:
    with pytest.raises(ResolveError, match="no registry client"):
        Resolver(cache, None).resolve(spec("reg.test/shop/app:v1"), AMD64)


# ---------------------------------------------------------------------------
# fetch_layers


class Bar:
    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n, self.closed = total, desc, 0, False

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


def test_fetch_layers_fetches_only_needed_and_fills_tar_size(cache: BlobCache) -> None:
    reg = Registry()
    img = build_image(layer_types=(MT_OCI_LAYER_GZIP, MT_OCI_LAYER_ZSTD, MT_OCI_LAYER))
    reg.push("v1", img)
    resolver = Resolver(cache, reg.client())
    resolved = resolver.resolve(spec("reg.test/shop/app:v1"), AMD64)
    reg.requests.clear()
    bars: List[Bar] = []

    def factory(total: int, desc: str) -> Bar:
        bars.append(Bar(total, desc))
        return bars[-1]

    wanted = {resolved.layers[1].digest, resolved.layers[2].digest}
    (updated,) = resolver.fetch_layers([resolved], wanted, factory)
    assert sorted(r.url.path.split("/")[-1] for r in reg.requests) == sorted(wanted)
    assert not cache.has(resolved.layers[0].digest)
    assert [la.tar_size for la in updated.layers] == [-1, len(img.tars[1]), len(img.tars[2])]
    assert cache.layer_info(resolved.layers[1].digest) == (sha256_digest(img.tars[1]), len(img.tars[1]))
    total = len(img.layers[1]) + len(img.layers[2])
    # one bar for all downloads; the diff_ids were learnt as they streamed: no check pass
    assert [(b.desc, b.total, b.n, b.closed) for b in bars] == [("fetching layers", total, total, True)]
    # again: nothing to fetch, nothing to decompress, sizes known
    reg.requests.clear()
    bars.clear()
    (again,) = resolver.fetch_layers([resolved], wanted, factory)
    assert reg.requests == [] and bars == [] and again == updated


def test_tar_size_known_from_cache_at_resolve(cache: BlobCache) -> None:
    reg = Registry()
    img = build_image()
    reg.push("v1", img)
    resolver = Resolver(cache, reg.client())
    resolved = resolver.resolve(spec("reg.test/shop/app:v1"), AMD64)
    resolver.fetch_layers([resolved], {la.digest for la in resolved.layers})
    fresh = Resolver(cache, reg.client()).resolve(spec("reg.test/shop/app:v1"), AMD64)
    assert [la.tar_size for la in fresh.layers] == [len(t) for t in img.tars]


def test_diff_id_mismatch_is_detected(cache: BlobCache) -> None:
    reg = Registry()
    good = build_image()
    bad = build_image(diff_ids=[sha256_digest(good.tars[0]), sha256_digest(b"not the tar")])
    reg.push("v1", bad)
    resolver = Resolver(cache, reg.client())
    resolved = resolver.resolve(spec("reg.test/shop/app:v1"), AMD64)
    with pytest.raises(ResolveError) as err:
        resolver.fetch_layers([resolved], {la.digest for la in resolved.layers})
    assert resolved.layers[1].digest in err.value.message
    assert f"decompresses to {sha256_digest(good.tars[1])}" in err.value.message
    # what the blob decompresses to is a fact about the blob (learnt as it streamed in):
    # kept, so a second pack fails the same way without fetching or inflating it again
    assert cache.layer_info(resolved.layers[1].digest) == (sha256_digest(good.tars[1]), len(good.tars[1]))
    reg.requests.clear()
    with pytest.raises(ResolveError) as again:
        resolver.fetch_layers([resolved], {la.digest for la in resolved.layers})
    assert again.value.message == err.value.message and reg.requests == []


def test_shared_layer_fetched_once_across_images(cache: BlobCache) -> None:
    reg = Registry()
    one, two = build_image(marker="same"), build_image(marker="same", layer_types=(MT_OCI_LAYER_GZIP,) * 3)
    reg.push("one", one)
    reg.push("two", two)
    resolver = Resolver(cache, reg.client())
    images = [resolver.resolve(spec("reg.test/shop/app:one"), AMD64),
              resolver.resolve(spec("reg.test/shop/app:two"), AMD64)]
    reg.requests.clear()
    needed = {la.digest for img in images for la in img.layers}
    assert len(needed) == 3
    resolver.fetch_layers(images, needed)
    assert reg.count("blobs") == 3


def test_unknown_needed_digest_is_an_error(cache: BlobCache) -> None:
    with pytest.raises(ResolveError, match="no resolved image has it as a layer"):
        Resolver(cache, None).fetch_layers([], {sha256_digest(b"x")})


def test_uncompressed_digest_handles_multi_member_gzip_and_corruption() -> None:
    tar = layer_tar("a", b"hello" * 1000)
    blob = gzip.compress(tar[:700], mtime=0) + gzip.compress(tar[700:], mtime=0)
    assert uncompressed_digest(io.BytesIO(blob), MT_OCI_LAYER_GZIP) == (sha256_digest(tar), len(tar))
    with pytest.raises(ResolveError, match="does not decompress as gzip"):
        uncompressed_digest(io.BytesIO(blob[:-20]), MT_OCI_LAYER_GZIP)


# ---------------------------------------------------------------------------
# offline sources through the resolver


def docker_archive(path: Path, tars: List[bytes], tag: str) -> Path:
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha256_digest(t) for t in tars]}}).encode()
    members = {"config.json": config, "manifest.json": json.dumps([{
        "Config": "config.json", "RepoTags": [tag], "Layers": [f"{i}/layer.tar" for i in range(len(tars))]}]).encode()}
    members.update({f"{i}/layer.tar": t for i, t in enumerate(tars)})
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_docker_archive_resolves_and_fetches_offline(tmp_path: Path, cache: BlobCache) -> None:
    tars = [layer_tar("a", b"A" * 3000), layer_tar("b", b"B" * 10)]
    archive = docker_archive(tmp_path / "app.tar", tars, "shop/app:v1")
    resolver = Resolver(cache, None)
    image_spec = spec("registry.local/shop/app:v1", source=f"docker-archive:{archive}")
    resolved = resolver.resolve(image_spec, AMD64)
    assert resolved.top == resolved.manifest and resolved.top.media_type == MT_DOCKER_MANIFEST
    assert [la.digest for la in resolved.layers] == [la.diff_id for la in resolved.layers]
    (updated,) = resolver.fetch_layers([resolved], {la.digest for la in resolved.layers})
    assert [la.tar_size for la in updated.layers] == [len(t) for t in tars]
    assert all(cache.has(la.digest) for la in resolved.layers)
    resolver.close()
    # stable: a new resolver over the same archive pins the same manifest
    assert Resolver(cache, None).resolve(image_spec, AMD64).top.digest == resolved.top.digest


def test_oci_layout_index_resolves_platform_offline(tmp_path: Path, cache: BlobCache) -> None:
    amd, arm = build_image("amd64"), build_image("arm64", "v8")
    index = build_index([(amd, {"os": "linux", "architecture": "amd64"}),
                         (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    for blob in [index, amd.manifest, amd.config, arm.manifest, arm.config] + amd.layers + arm.layers:
        (layout / "blobs" / "sha256" / sha256_digest(blob)[7:]).write_bytes(blob)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": MT_OCI_INDEX, "digest": sha256_digest(index), "size": len(index),
        "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}))
    resolver = Resolver(cache, None)
    resolved = resolver.resolve(spec("shop/multi:v1", source=f"oci-layout:{layout}"), ARM64)
    assert resolved.top.digest == sha256_digest(index) and resolved.manifest.digest == arm.digest
    (updated,) = resolver.fetch_layers([resolved], {resolved.layers[0].digest})
    assert updated.layers[0].tar_size == len(arm.tars[0]) and updated.layers[1].tar_size == -1


def test_docker_schema2_manifest_media_type_kept(cache: BlobCache) -> None:
    reg = Registry()
    img = build_image(media=MT_DOCKER_MANIFEST)
    reg.manifests["v1"] = (img.manifest, MT_DOCKER_MANIFEST)
    for blob in [img.config] + img.layers:
        reg.blobs[sha256_digest(blob)] = blob
    resolved = Resolver(cache, reg.client()).resolve(spec("reg.test/shop/app:v1"), AMD64)
    assert resolved.top.media_type == MT_DOCKER_MANIFEST


def test_docker_archive_pinned_to_another_digest_is_refused(tmp_path: Path, cache: BlobCache) -> None:
    archive = docker_archive(tmp_path / "app.tar", [layer_tar("a", b"A")], "shop/app:v1")
    pinned = spec(f"shop/app:v1@{sha256_digest(b'something else')}", source=f"docker-archive:{archive}")
    with pytest.raises(ResolveError, match="not the pinned"):
        Resolver(cache, None).resolve(pinned, AMD64)
