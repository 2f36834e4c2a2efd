"""RegistryClient + Resolver against a real ``docker-registry`` on loopback.

Digests are checked twice: against what ``imagefactory`` computed when it built and
pushed the images, and against ``skopeo inspect --raw`` (sha256 of the raw bytes), an
implementation that shares no code with ours.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Dict

import pytest

import imagefactory
import services
from policy import unavailable
from edgebundle.cache import BlobCache
from edgebundle.errors import ResolveError
from edgebundle.image import ResolvedImage
from edgebundle.oci import Platform
from edgebundle.specs import ImageSpec, RegistryConfig
from edgebundle.reference import parse_reference
from edgebundle.registry import CredentialStore, RegistryClient
from edgebundle.resolve import Resolver


def skopeo_digest(skopeo: str, ref: str) -> str:
    """sha256 of the raw manifest skopeo fetches for ``ref`` (HOST/REPO:TAG or @digest)."""
    raw = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                         check=True, capture_output=True, env=services.clean_env(), timeout=120).stdout
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def resolver_for(host: str, cache_dir: Path, credentials: CredentialStore | None = None) -> Resolver:
    client = RegistryClient({host: RegistryConfig(host, insecure=True)}, credentials, timeout=30.0)
    return Resolver(BlobCache(cache_dir), client)


def image_spec(host: str, ref: str) -> ImageSpec:
    return ImageSpec(f"{host}/{ref}", parse_reference(f"{host}/{ref}"))


def check_against_factory(image: ResolvedImage, info: Dict[str, Any]) -> None:
    built: imagefactory.BuiltImage = info["built"]
    assert image.manifest.digest == info["manifest_digest"]
    assert image.manifest.size == info["manifest_size"]
    assert image.manifest.media_type == info["manifest_media_type"]
    assert image.config.digest == info["config_digest"] and image.config.size == info["config_size"]
    assert [(la.digest, la.size, la.diff_id, la.media_type) for la in image.layers] == [
        (la["digest"], la["size"], la["diff_id"], la["media_type"]) for la in info["layers"]]
    assert list(image.chain_ids) == info["chain_ids"]
    assert [la.tar_size for la in image.layers] == [len(t) for t in built.layer_tars]


def test_single_arch_image(registry: services.Registry, pushed_images: Dict[str, Any], skopeo: str,
                           tmp_path: Path) -> None:
    host = registry.host
    info = pushed_images["images"]["shop/app:v1"]
    resolver = resolver_for(host, tmp_path / "cache")
    image = resolver.resolve(image_spec(host, "shop/app:v1"), Platform.parse("linux/amd64"))
    assert image.top == image.manifest
    assert image.top.digest == skopeo_digest(skopeo, f"{host}/shop/app:v1")
    assert all(la.tar_size == -1 for la in image.layers)  # nothing decompressed yet

    (fetched,) = resolver.fetch_layers([image], {la.digest for la in image.layers})
    check_against_factory(fetched, info)
    cache = resolver.cache
    for layer, blob in zip(fetched.layers, info["built"].layers):
        assert cache.read_bytes(layer.digest) == blob.data
    assert json.loads(cache.read_bytes(image.config.digest))["rootfs"]["diff_ids"] == [
        la["diff_id"] for la in info["layers"]]


def test_multi_arch_image(registry: services.Registry, pushed_images: Dict[str, Any], skopeo: str,
                          tmp_path: Path) -> None:
    host = registry.host
    multi = pushed_images["multi"]
    index_digest = skopeo_digest(skopeo, f"{host}/shop/multi:v1")
    assert index_digest == multi["index_digest"]
    resolver = resolver_for(host, tmp_path / "cache")
    for wanted, key in (("linux/amd64", "linux/amd64"), ("linux/arm64", "linux/arm64/v8")):
        info = multi["platforms"][key]
        image = resolver.resolve(image_spec(host, "shop/multi:v1"), Platform.parse(wanted))
        assert image.top.digest == index_digest and image.top.media_type == multi["media_type"]
        assert image.top.size == multi["index_size"]
        assert image.platform == Platform.parse(wanted)
        assert image.manifest.digest == skopeo_digest(skopeo, f"{host}/shop/multi@{image.manifest.digest}")
        (fetched,) = resolver.fetch_layers([image], {la.digest for la in image.layers})
        check_against_factory(fetched, info)

    with pytest.raises(ResolveError) as err:
        resolver.resolve(image_spec(host, "shop/multi:v1"), Platform.parse("linux/arm/v7"))
    assert "available: linux/amd64, linux/arm64" in err.value.message


def test_pinned_cached_image_needs_no_registry(registry: services.Registry, pushed_images: Dict[str, Any],
                                               tmp_path: Path) -> None:
    host = registry.host
    multi = pushed_images["multi"]
    pinned = image_spec(host, f"shop/multi:v1@{multi['index_digest']}")
    online = resolver_for(host, tmp_path / "cache")
    first = online.resolve(pinned, Platform.parse("linux/arm64"))
    (first,) = online.fetch_layers([first], {la.digest for la in first.layers})
    offline = Resolver(BlobCache(tmp_path / "cache"), None)
    again = offline.resolve(pinned, Platform.parse("linux/arm64"))
    assert again == first  # tar sizes too, from the cache's layer info


def test_plain_http_registry_without_insecure_suggests_it(registry: services.Registry,
                                                          pushed_images: Dict[str, Any]) -> None:
    client = RegistryClient({}, retries=0)
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference(f"{registry.host}/shop/app:v1"))
    assert err.value.message.startswith(f"registry {registry.host} unreachable")
    assert "insecure: true" in (err.value.hint or "")


def test_missing_tag_on_real_registry(registry: services.Registry, pushed_images: Dict[str, Any]) -> None:
    client = RegistryClient({registry.host: RegistryConfig(registry.host, insecure=True)})
    with pytest.raises(ResolveError) as err:
        client.get_manifest(parse_reference(f"{registry.host}/shop/app:nope"))
    assert err.value.message.startswith(f"image {registry.host}/shop/app:nope not found in {registry.host}")


def test_basic_auth_registry_with_docker_config(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if not imagefactory.BUSYBOX.exists():
        unavailable(request.config, "/bin/busybox missing (apt-get install busybox-static)")
    try:
        reg = services.start_registry(tmp_path / "authreg", auth=True, username="edge", password="s3cret-pw")
    except (services.ServiceError, OSError) as exc:
        unavailable(request.config, f"docker-registry could not start: {exc}")
    try:
        img = imagefactory.build_image([{"hello.txt": "hi\n"}], media="docker")
        imagefactory.push_image(reg.host, "private/app", "v1", img, username="edge", password="s3cret-pw")
        config = tmp_path / "docker" / "config.json"
        config.parent.mkdir()
        config.write_text(json.dumps({"auths": {reg.host: {"auth": base64.b64encode(b"edge:s3cret-pw").decode()}}}))
        resolver = resolver_for(reg.host, tmp_path / "cache", CredentialStore.load(config))
        image = resolver.resolve(image_spec(reg.host, "private/app:v1"), Platform.parse("linux/amd64"))
        (image,) = resolver.fetch_layers([image], {la.digest for la in image.layers})
        assert image.manifest.digest == img.manifest_digest
        assert [la.diff_id for la in image.layers] == list(img.diff_ids)

        anonymous = resolver_for(reg.host, tmp_path / "cache2")
        with pytest.raises(ResolveError) as err:
            anonymous.resolve(image_spec(reg.host, "private/app:v1"), Platform.parse("linux/amd64"))
        assert err.value.message == f"{reg.host} requires authentication for private/app"

        config.write_text(json.dumps({"auths": {reg.host: {"username": "edge", "password": "wrong"}}}))
        wrong = resolver_for(reg.host, tmp_path / "cache3", CredentialStore.load(config))
        with pytest.raises(ResolveError) as err:
            wrong.resolve(image_spec(reg.host, "private/app:v1"), Platform.parse("linux/amd64"))
        assert err.value.message == f"authentication to {reg.host} failed for private/app"
    finally:
        reg.stop()
