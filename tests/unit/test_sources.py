"""Offline sources: docker save archives (legacy and OCI-in-tar) and OCI layouts."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from edgebundle.cache import BlobCache
from edgebundle.errors import ResolveError
from edgebundle.oci import MT_DOCKER_LAYER_GZIP, MT_DOCKER_LAYER_TAR, MT_DOCKER_MANIFEST, MT_OCI_INDEX, \
    MT_OCI_MANIFEST, sha256_digest
from edgebundle.reference import parse_reference
from edgebundle.sources import DockerArchiveSource, OciLayoutSource, open_source


def layer_tar(files: Dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def config_for(tars: List[bytes], arch: str = "amd64") -> bytes:
    return json.dumps({"architecture": arch, "os": "linux",
                       "rootfs": {"type": "layers", "diff_ids": [sha256_digest(t) for t in tars]}}).encode()


def write_tar(path: Path, members: Dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


TARS = [layer_tar({"etc/os-release": b"ID=test\n"}), layer_tar({"app/hello.txt": b"hello\n"})]


def docker_save(path: Path, tags: List[str], tars: List[bytes] = TARS, *,
                extra_images: Optional[List[Tuple[List[str], List[bytes]]]] = None,
                gzip_layers: bool = False) -> Path:
    members: Dict[str, bytes] = {}
    manifest = []
    for repo_tags, layers in [(tags, tars)] + list(extra_images or []):
        config = config_for(layers)
        cfg_name = sha256_digest(config)[7:] + ".json"
        members[cfg_name] = config
        names = []
        for t in layers:
            data = gzip.compress(t, mtime=0) if gzip_layers else t
            name = sha256_digest(t)[7:] + "/layer.tar"
            members[name] = data
            names.append(name)
        manifest.append({"Config": cfg_name, "RepoTags": repo_tags, "Layers": names})
    members["manifest.json"] = json.dumps(manifest).encode()
    return write_tar(path, members)


def oci_members(tag_names: List[Optional[str]], tars: List[bytes] = TARS) -> Tuple[Dict[str, bytes], List[str]]:
    """An OCI layout's files; one manifest per name (layers differ by a marker file)."""
    members: Dict[str, bytes] = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}
    entries = []
    digests = []
    for i, name in enumerate(tag_names):
        layers = [gzip.compress(t, mtime=0) for t in tars] + [gzip.compress(layer_tar({"n": str(i).encode()}), mtime=0)]
        raw = list(tars) + [layer_tar({"n": str(i).encode()})]
        config = config_for(raw)
        for blob in layers + [config]:
            members[f"blobs/sha256/{sha256_digest(blob)[7:]}"] = blob
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256_digest(config),
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256_digest(b),
                        "size": len(b)} for b in layers]}).encode()
        digest = sha256_digest(manifest)
        members[f"blobs/sha256/{digest[7:]}"] = manifest
        entry: Dict[str, object] = {"mediaType": MT_OCI_MANIFEST, "digest": digest, "size": len(manifest)}
        if name:
            entry["annotations"] = {"org.opencontainers.image.ref.name": name}
        entries.append(entry)
        digests.append(digest)
    members["index.json"] = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": entries}).encode()
    return members, digests


def write_dir(root: Path, members: Dict[str, bytes]) -> Path:
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


# ---------------------------------------------------------------------------
# docker-archive (legacy manifest.json)


def test_docker_archive_synthesises_a_stable_schema2_manifest(tmp_path: Path) -> None:
    archive = docker_save(tmp_path / "app.tar", ["shop/app:v1"])
    ref = parse_reference("shop/app:v1")
    src = open_source(f"docker-archive:{archive}")
    assert isinstance(src, DockerArchiveSource)
    data, media_type, digest = src.top(ref)
    assert media_type == MT_DOCKER_MANIFEST and digest == sha256_digest(data)
    manifest = json.loads(data)
    assert [layer["digest"] for layer in manifest["layers"]] == [sha256_digest(t) for t in TARS]
    assert [layer["size"] for layer in manifest["layers"]] == [len(t) for t in TARS]
    assert {layer["mediaType"] for layer in manifest["layers"]} == {MT_DOCKER_LAYER_TAR}
    assert src.read_blob(manifest["config"]["digest"]) == config_for(TARS)
    # Same content, another run (and another file name): the same manifest digest.
    again = docker_save(tmp_path / "copy.tar", ["shop/app:v1"])
    assert open_source(f"docker-archive:{again}").top(ref)[2] == digest


def test_docker_archive_copies_layers_verified(tmp_path: Path) -> None:
    archive = docker_save(tmp_path / "app.tar", ["shop/app:v1"])
    src = open_source(f"docker-archive:{archive}")
    manifest = json.loads(src.top(parse_reference("shop/app:v1"))[0])
    cache = BlobCache(tmp_path / "cache")
    seen: List[int] = []
    for layer in manifest["layers"]:
        src.copy_blob(layer["digest"], layer["size"], cache, seen.append)
    assert [cache.read_bytes(layer["digest"]) for layer in manifest["layers"]] == TARS
    assert sum(seen) == sum(len(t) for t in TARS)


def test_docker_archive_with_corrupt_layer_is_refused(tmp_path: Path) -> None:
    config = config_for(TARS)
    bad = bytearray(TARS[1])
    bad[600] ^= 0xFF  # same size, other bytes: digest != diff_id
    archive = write_tar(tmp_path / "bad.tar", {
        "c.json": config, "a/layer.tar": TARS[0], "b/layer.tar": bytes(bad),
        "manifest.json": json.dumps([{"Config": "c.json", "RepoTags": None,
                                      "Layers": ["a/layer.tar", "b/layer.tar"]}]).encode()})
    src = open_source(f"docker-archive:{archive}")
    manifest = json.loads(src.top(parse_reference("anything:v1"))[0])  # the only image: any name
    cache = BlobCache(tmp_path / "cache")
    with pytest.raises(ResolveError) as err:
        src.copy_blob(manifest["layers"][1]["digest"], manifest["layers"][1]["size"], cache)
    assert "b/layer.tar" in err.value.message and str(archive) in err.value.message
    assert not cache.has(manifest["layers"][1]["digest"])


def test_docker_archive_picks_image_by_repo_tag(tmp_path: Path) -> None:
    other = [layer_tar({"other": b"1"})]
    archive = docker_save(tmp_path / "two.tar", ["shop/app:v1"], extra_images=[(["docker.io/shop/tool:v2"], other)])
    src = open_source(f"docker-archive:{archive}")
    manifest = json.loads(src.top(parse_reference("shop/tool:v2"))[0])
    assert [layer["digest"] for layer in manifest["layers"]] == [sha256_digest(other[0])]
    with pytest.raises(ResolveError) as err:
        src.top(parse_reference("shop/missing:v1"))
    assert "docker.io/shop/missing:v1" in err.value.message
    assert "shop/app:v1" in err.value.message and "docker.io/shop/tool:v2" in err.value.message


def test_docker_archive_with_compressed_layers_uses_their_own_digest(tmp_path: Path) -> None:
    archive = docker_save(tmp_path / "gz.tar", ["shop/app:v1"], gzip_layers=True)
    src = open_source(f"docker-archive:{archive}")
    manifest = json.loads(src.top(parse_reference("shop/app:v1"))[0])
    assert [layer["digest"] for layer in manifest["layers"]] == \
        [sha256_digest(gzip.compress(t, mtime=0)) for t in TARS]
    assert {layer["mediaType"] for layer in manifest["layers"]} == {MT_DOCKER_LAYER_GZIP}


def test_docker_archive_with_oci_index_uses_real_manifests(tmp_path: Path) -> None:
    members, digests = oci_members(["v1"])
    members["manifest.json"] = b"[]"  # docker 25+ writes both; index.json wins
    archive = write_tar(tmp_path / "new.tar", members)
    src = open_source(f"docker-archive:{archive}")
    assert isinstance(src, OciLayoutSource)
    data, media_type, digest = src.top(parse_reference("shop/app:v1"))
    assert digest == digests[0] and media_type == MT_OCI_MANIFEST and sha256_digest(data) == digest


# ---------------------------------------------------------------------------
# oci-layout


def test_oci_layout_dir_selects_by_ref_name(tmp_path: Path) -> None:
    members, digests = oci_members(["v1", "docker.io/shop/app:v2", None])
    layout = write_dir(tmp_path / "layout", members)
    src = open_source(f"oci-layout:{layout}")
    assert src.top(parse_reference("shop/app:v1"))[2] == digests[0]
    assert src.top(parse_reference("shop/app:v2"))[2] == digests[1]  # full name in the annotation
    assert src.top(parse_reference(f"shop/app@{digests[2]}"))[2] == digests[2]
    with pytest.raises(ResolveError) as err:
        src.top(parse_reference("shop/app:v3"))
    assert "no image named docker.io/shop/app:v3" in err.value.message
    assert "v1" in err.value.message and "docker.io/shop/app:v2" in err.value.message


def test_oci_layout_single_unnamed_image_is_taken(tmp_path: Path) -> None:
    members, digests = oci_members([None])
    src = open_source(f"oci-layout:{write_dir(tmp_path / 'l', members)}")
    assert src.top(parse_reference("whatever/name:v1"))[2] == digests[0]


def test_oci_layout_tar_and_blob_copy(tmp_path: Path) -> None:
    members, digests = oci_members(["v1"])
    src = open_source(f"oci-layout:{write_tar(tmp_path / 'layout.tar', members)}")
    manifest = json.loads(src.top(parse_reference("shop/app:v1"))[0])
    cache = BlobCache(tmp_path / "cache")
    layer = manifest["layers"][0]
    src.copy_blob(layer["digest"], layer["size"], cache)
    assert sha256_digest(cache.read_bytes(layer["digest"])) == layer["digest"]


def test_oci_layout_missing_and_corrupt_blobs(tmp_path: Path) -> None:
    members, digests = oci_members(["v1"])
    manifest = json.loads(members[f"blobs/sha256/{digests[0][7:]}"])
    config_digest = manifest["config"]["digest"]
    members[f"blobs/sha256/{config_digest[7:]}"] = b"{}"  # corrupt
    missing = manifest["layers"][0]["digest"]
    del members[f"blobs/sha256/{missing[7:]}"]
    layout = write_dir(tmp_path / "l", members)
    src = open_source(f"oci-layout:{layout}")
    with pytest.raises(ResolveError) as err:
        src.read_blob(config_digest)
    assert config_digest in err.value.message and "corrupt" in err.value.message
    with pytest.raises(ResolveError) as err:
        src.copy_blob(missing, 1, BlobCache(tmp_path / "cache"))
    assert err.value.message == f"blob {missing} missing from oci-layout:{layout}"


def test_not_an_oci_layout(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResolveError, match="not an OCI image layout"):
        open_source(f"oci-layout:{tmp_path / 'empty'}")


# ---------------------------------------------------------------------------
# bad paths


def test_missing_path_is_named(tmp_path: Path) -> None:
    for kind in ("docker-archive", "oci-layout"):
        with pytest.raises(ResolveError) as err:
            open_source(f"{kind}:{tmp_path / 'nope.tar'}")
        assert err.value.message == f"{kind} {tmp_path / 'nope.tar'} not found"


def test_unreadable_archive_is_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file at all" * 30)
    with pytest.raises(ResolveError) as err:
        open_source(f"docker-archive:{junk}")
    assert str(junk) in err.value.message


def test_unknown_source_kind() -> None:
    with pytest.raises(ResolveError, match="unknown image source 'tarball:/x'"):
        open_source("tarball:/x")


def test_docker_archive_symlinked_shared_layer(tmp_path: Path) -> None:
    # Old `docker save` stores a layer two images share once and symlinks the other copy.
    config = config_for([TARS[0], TARS[0]])
    archive = tmp_path / "linked.tar"
    with tarfile.open(archive, "w") as tf:
        for name, data in (("c.json", config), ("a/layer.tar", TARS[0])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../a/layer.tar"
        tf.addfile(link)
        manifest = json.dumps([{"Config": "c.json", "RepoTags": ["x:v1"], "Layers": ["a/layer.tar", "b/layer.tar"]}])
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tf.addfile(info, io.BytesIO(manifest.encode()))
    src = open_source(f"docker-archive:{archive}")
    layers = json.loads(src.top(parse_reference("x:v1"))[0])["layers"]
    assert [layer["size"] for layer in layers] == [len(TARS[0])] * 2
    cache = BlobCache(tmp_path / "cache")
    src.copy_blob(layers[1]["digest"], layers[1]["size"], cache)
    assert cache.read_bytes(layers[1]["digest"]) == TARS[0]


def test_oci_layout_pinned_digest_must_exist(tmp_path: Path) -> None:
    members, digests = oci_members(["v1"])
    src = open_source(f"oci-layout:{write_dir(tmp_path / 'l', members)}")
    assert src.top(parse_reference(f"shop/app:v1@{digests[0]}"))[2] == digests[0]
    other = sha256_digest(b"other")
    with pytest.raises(ResolveError, match=f"has no image {other}"):
        src.top(parse_reference(f"shop/app:v1@{other}"))


def test_oci_layout_dir_never_reads_outside_itself(tmp_path: Path) -> None:
    """A blob that is a symlink out of the layout (say, to a secret) is treated as missing."""
    members, digests = oci_members(["v1"])
    manifest = json.loads(members[f"blobs/sha256/{digests[0][7:]}"])
    layer = manifest["layers"][0]
    layout = write_dir(tmp_path / "l", members)
    secret = tmp_path / "secret"
    secret.write_bytes(members[f"blobs/sha256/{layer['digest'][7:]}"])  # even with the right bytes
    blob = layout / "blobs" / "sha256" / layer["digest"][7:]
    blob.unlink()
    blob.symlink_to(secret)
    src = open_source(f"oci-layout:{layout}")
    with pytest.raises(ResolveError, match="missing from"):
        src.copy_blob(layer["digest"], layer["size"], BlobCache(tmp_path / "cache"))
    from edgebundle.sources import _DirFiles
    files = _DirFiles(layout)
    for name in ("../secret", "blobs/../../secret", "/etc/passwd"):
        with pytest.raises(FileNotFoundError):
            files.open(name)
        assert not files.exists(name)


def test_tar_members_read_in_parallel_each_get_their_own_bytes(tmp_path: Path) -> None:
    """Parallel downloads (--jobs) copy layers of one docker-archive at once: every
    member reads the archive's one file object, so reads must not interleave."""
    import hashlib
    import io
    import os
    import tarfile
    import threading

    from edgebundle.sources import _TarFiles

    blobs = {f"m{i}": os.urandom(2 * 1024 * 1024) for i in range(4)}
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in blobs.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    files = _TarFiles(archive)
    got: dict = {}

    def read(name: str) -> None:
        h = hashlib.sha256()
        with files.open(name) as fh:
            while True:
                piece = fh.read(64 * 1024)
                if not piece:
                    break
                h.update(piece)
        got[name] = h.hexdigest()

    for _ in range(3):
        threads = [threading.Thread(target=read, args=(n,)) for n in blobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == {n: hashlib.sha256(d).hexdigest() for n, d in blobs.items()}
    files.close()
