"""Tiny real images for unit tests: layer tars made with tarfile, gzipped with mtime=0,
their real diff_ids, configs and manifests (and optionally an index), in a BlobCache."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from typing import Dict, Sequence

from edgebundle.cache import BlobCache
from edgebundle.image import Layer, ResolvedImage
from edgebundle.oci import MT_DOCKER_CONFIG, MT_DOCKER_LAYER_GZIP, MT_DOCKER_MANIFEST, MT_OCI_INDEX, \
    Descriptor, Platform
from edgebundle.reference import parse_reference


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: Dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


BASE = {"etc/os-release": b"ID=test\n", "bin/sh": b"#!fake shell\n" * 20}
APP = {"app/main.py": b"print('v1')\n"}
TOOL = {"usr/bin/tool": b"tool binary " * 30}
EXTRA = {"app/data.bin": bytes(range(256)) * 4}


class Images:
    """Builds images into a cache and remembers every tar and blob it made."""

    def __init__(self, cache: BlobCache) -> None:
        self.cache = cache
        self.tars: Dict[str, bytes] = {}  # diff_id -> tar

    def layer(self, files: Dict[str, bytes]) -> Layer:
        tar = layer_tar(files)
        gz = gzip.compress(tar, mtime=0)
        digest = self.cache.put_bytes(gz)
        self.tars[sha(tar)] = tar
        return Layer(MT_DOCKER_LAYER_GZIP, digest, len(gz), sha(tar), len(tar))

    def image(self, name: str, layer_files: Sequence[Dict[str, bytes]], *, index: bool = False,
              pinned: bool = False) -> ResolvedImage:
        layers = tuple(self.layer(f) for f in layer_files)
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": [name]},
                             "rootfs": {"type": "layers",
                                        "diff_ids": [l.diff_id for l in layers]}},
                            sort_keys=True).encode()
        cdesc = Descriptor(MT_DOCKER_CONFIG, self.cache.put_bytes(config), len(config))
        manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_DOCKER_MANIFEST,
                               "config": cdesc.to_json(),
                               "layers": [{"mediaType": l.media_type, "digest": l.digest,
                                           "size": l.size} for l in layers]}).encode()
        mdesc = Descriptor(MT_DOCKER_MANIFEST, self.cache.put_bytes(manifest), len(manifest))
        top = mdesc
        if index:
            idx = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": [
                dict(mdesc.to_json(), platform={"os": "linux", "architecture": "amd64"})]}).encode()
            top = Descriptor(MT_OCI_INDEX, self.cache.put_bytes(idx), len(idx))
        ref = parse_reference(f"{name}@{top.digest}" if pinned else name)
        return ResolvedImage(ref, top, Platform.parse("linux/amd64"), mdesc, cdesc, layers)


def write_oci_layout(root: "object", cache: BlobCache, images: Sequence[ResolvedImage]) -> None:
    """An OCI image layout directory holding ``images`` (for offline-source manifests)."""
    from pathlib import Path

    base = Path(str(root))
    (base / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (base / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entries = []
    for img in images:
        for desc in list(img.json_blobs) + [Descriptor(l.media_type, l.digest, l.size) for l in img.layers]:
            (base / "blobs" / "sha256" / desc.digest[7:]).write_bytes(cache.read_bytes(desc.digest))
        entries.append(dict(img.top.to_json(),
                            annotations={"org.opencontainers.image.ref.name": str(img.ref)}))
    (base / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": entries}))
