"""Deterministic test images, built in pure Python and pushed with the stdlib.

Images are runnable: the base layer carries the statically linked busybox
from Debian's ``busybox-static`` package (``/bin/busybox``), so ``ctr run``
and ``docker run`` work without any network or base image.

Determinism: tar entries are sorted, uid/gid 0, mtime 0, fixed modes; gzip
header mtime 0 and no file name; JSON is canonical (sorted keys, compact).
Building twice in the same environment yields identical digests.  (Digests
depend on the busybox binary and zlib version of the machine, so never
hard-code them across machines.)

The arm64 variant of the multi-arch image reuses the *amd64* busybox (no
arm64 build is available here); it is only ever inspected/imported, never run.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import json
import random
import tarfile
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "cat", "echo", "ls", "sleep", "true", "env", "sha256sum")

# media types
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

MEDIA = {
    "docker": {"manifest": DOCKER_MANIFEST, "index": DOCKER_MANIFEST_LIST, "config": DOCKER_CONFIG, "layer": DOCKER_LAYER},
    "oci": {"manifest": OCI_MANIFEST, "index": OCI_INDEX, "config": OCI_CONFIG, "layer": OCI_LAYER},
}

REF_NAME_ANNOTATION = "io.containerd.image.name"  # read by `ctr images import`
OCI_REF_ANNOTATION = "org.opencontainers.image.ref.name"


# --------------------------------------------------------------------------
# layer entries


@dataclass(frozen=True)
class File:
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755


Entry = Union[bytes, str, File, Symlink, Dir]  # bytes/str = regular file 0644
Layer = Mapping[str, Entry]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def pseudo_random_bytes(seed: str, size: int) -> bytes:
    """Incompressible-ish but reproducible bytes (seeded PRNG)."""
    return random.Random(seed).randbytes(size)


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.linkname = linkname
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = 0
    return ti


def layer_tar(entries: Layer) -> bytes:
    """Uncompressed, deterministic layer tar; parent dirs are added implicitly."""
    norm: dict[str, Entry] = {}
    for raw, entry in entries.items():
        path = raw.strip("/")
        if not path:
            raise ValueError("empty path in layer")
        norm[path] = entry
        parts = path.split("/")
        for i in range(1, len(parts)):
            norm.setdefault("/".join(parts[:i]), Dir())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(norm):
            entry = norm[path]
            if isinstance(entry, str):
                entry = entry.encode()
            if isinstance(entry, bytes):
                entry = File(entry)
            if isinstance(entry, File):
                tf.addfile(_tarinfo(path, tarfile.REGTYPE, entry.mode, len(entry.data)), io.BytesIO(entry.data))
            elif isinstance(entry, Symlink):
                tf.addfile(_tarinfo(path, tarfile.SYMTYPE, 0o777, linkname=entry.target))
            elif isinstance(entry, Dir):
                tf.addfile(_tarinfo(path + "/", tarfile.DIRTYPE, entry.mode))
            else:
                raise TypeError(f"unsupported layer entry for {path}: {entry!r}")
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    # mtime=0 and no filename (BytesIO has none) keep the header constant.
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def busybox_layer() -> dict[str, Entry]:
    if not BUSYBOX.exists():
        raise FileNotFoundError("/bin/busybox missing: apt-get install busybox-static")
    layer: dict[str, Entry] = {"bin/busybox": File(BUSYBOX.read_bytes(), 0o755)}
    for applet in BUSYBOX_APPLETS:
        layer[f"bin/{applet}"] = Symlink("busybox")
    return layer


# --------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes = field(repr=False)

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: Optional[str] = None

    def as_dict(self) -> dict[str, str]:
        d = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            d["variant"] = self.variant
        return d

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class BuiltImage:
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]  # gzip blobs as stored in the registry
    layer_tars: tuple[bytes, ...] = field(repr=False)  # uncompressed (diff) tars
    diff_ids: tuple[str, ...]
    platform: Platform
    media: str  # "docker" | "oci"

    @property
    def manifest_digest(self) -> str:
        return self.manifest.digest

    @property
    def config_digest(self) -> str:
        return self.config.digest

    @property
    def layer_digests(self) -> tuple[str, ...]:
        return tuple(b.digest for b in self.layers)

    @property
    def chain_ids(self) -> tuple[str, ...]:
        """OCI ChainIDs: what containerd/docker name committed snapshots/layers by."""
        out: list[str] = []
        for diff_id in self.diff_ids:
            out.append(diff_id if not out else sha256(f"{out[-1]} {diff_id}".encode()))
        return tuple(out)

    def blobs(self) -> dict[str, Blob]:
        """All content-addressed blobs of the image (config, layers, manifest)."""
        return {b.digest: b for b in (self.config, *self.layers, self.manifest)}


@dataclass(frozen=True)
class BuiltIndex:
    index: Blob
    images: tuple[BuiltImage, ...]

    @property
    def digest(self) -> str:
        return self.index.digest

    def for_platform(self, architecture: str) -> BuiltImage:
        for img in self.images:
            if img.platform.architecture == architecture:
                return img
        raise KeyError(architecture)

    def blobs(self) -> dict[str, Blob]:
        out: dict[str, Blob] = {}
        for img in self.images:
            out.update(img.blobs())
        out[self.index.digest] = self.index
        return out


def build_image(
    layers: Iterable[Layer],
    config: Optional[Mapping[str, Any]] = None,
    arch: str = "amd64",
    *,
    media: str = "oci",
    variant: Optional[str] = None,
    os_name: str = "linux",
) -> BuiltImage:
    """Build an image from layer dicts (path -> bytes | File | Symlink | Dir).

    ``config`` overrides keys of the *container* config (Cmd, Env, Entrypoint,
    Labels, WorkingDir...).
    """
    mt = MEDIA[media]
    tars = tuple(layer_tar(layer) for layer in layers)
    gz = tuple(Blob(mt["layer"], gzip_bytes(t)) for t in tars)
    diff_ids = tuple(sha256(t) for t in tars)
    container_cfg: dict[str, Any] = {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["/bin/cat", "/app/message.txt"],
        "WorkingDir": "/",
    }
    container_cfg.update(config or {})
    platform = Platform(os_name, arch, variant)
    cfg_obj: dict[str, Any] = {
        "architecture": arch,
        "os": os_name,
        "created": "1970-01-01T00:00:00Z",
        "config": container_cfg,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": f"imagefactory layer {i}"} for i in range(len(tars))],
    }
    if variant:
        cfg_obj["variant"] = variant
    cfg = Blob(mt["config"], canonical_json(cfg_obj))
    manifest_obj = {
        "schemaVersion": 2,
        "mediaType": mt["manifest"],
        "config": cfg.descriptor(),
        "layers": [b.descriptor() for b in gz],
    }
    manifest = Blob(mt["manifest"], canonical_json(manifest_obj))
    return BuiltImage(manifest, cfg, gz, tars, diff_ids, platform, media)


def build_index(images: Iterable[BuiltImage], *, media: str = "oci") -> BuiltIndex:
    """OCI image index (or Docker manifest list) over per-platform images."""
    imgs = tuple(images)
    mt = MEDIA[media]
    obj = {
        "schemaVersion": 2,
        "mediaType": mt["index"],
        "manifests": [img.manifest.descriptor(platform=img.platform.as_dict()) for img in imgs],
    }
    return BuiltIndex(Blob(mt["index"], canonical_json(obj)), imgs)


# --------------------------------------------------------------------------
# registry client (stdlib only, plain HTTP)


class PushError(RuntimeError):
    pass


class _Client:
    def __init__(self, host: str, username: Optional[str] = None, password: Optional[str] = None) -> None:
        h, _, p = host.partition(":")
        self.conn_args = (h, int(p or 80))
        self.headers: dict[str, str] = {}
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"

    def request(
        self, method: str, path: str, body: bytes = b"", headers: Optional[Mapping[str, str]] = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(*self.conn_args, timeout=60)
        try:
            hdrs = {**self.headers, **(headers or {})}
            if method in ("PUT", "POST", "PATCH"):
                hdrs.setdefault("Content-Length", str(len(body)))
            conn.request(method, path, body=body if body else None, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()


def _push_blob(client: _Client, repo: str, blob: Blob) -> None:
    status, _, _ = client.request("HEAD", f"/v2/{repo}/blobs/{blob.digest}")
    if status == 200:
        return  # already there (shared layer)
    status, headers, body = client.request("POST", f"/v2/{repo}/blobs/uploads/")
    if status != 202 or "location" not in headers:
        raise PushError(f"start upload {repo}: HTTP {status} {body[:300]!r}")
    # Location may be absolute (distribution 2.x) or relative: keep path+query.
    loc = urllib.parse.urlsplit(headers["location"])
    sep = "&" if loc.query else "?"
    target = f"{loc.path}?{loc.query}" if loc.query else loc.path
    target += f"{sep}digest={urllib.parse.quote(blob.digest)}"
    status, _, body = client.request(
        "PUT", target, blob.data, {"Content-Type": "application/octet-stream"}
    )
    if status != 201:
        raise PushError(f"upload {blob.digest} to {repo}: HTTP {status} {body[:300]!r}")


def _put_manifest(client: _Client, repo: str, reference: str, blob: Blob) -> None:
    status, headers, body = client.request(
        "PUT", f"/v2/{repo}/manifests/{reference}", blob.data, {"Content-Type": blob.media_type}
    )
    if status != 201:
        raise PushError(f"put manifest {repo}:{reference}: HTTP {status} {body[:300]!r}")
    got = headers.get("docker-content-digest")
    if got and got != blob.digest:
        raise PushError(f"registry computed {got}, we computed {blob.digest}")


def push_image(
    registry_host: str,
    repo: str,
    tag: Optional[str],
    image: BuiltImage,
    *,
    username: Optional[str] = None,
    password: Optional[str] = None,
) -> str:
    """Push blobs + manifest; tag=None pushes by digest only. Returns manifest digest."""
    client = _Client(registry_host, username, password)
    for blob in (*image.layers, image.config):
        _push_blob(client, repo, blob)
    _put_manifest(client, repo, tag or image.manifest_digest, image.manifest)
    return image.manifest_digest


def push_index(
    registry_host: str,
    repo: str,
    tag: str,
    index: BuiltIndex,
    *,
    username: Optional[str] = None,
    password: Optional[str] = None,
) -> str:
    """Push every platform manifest by digest, then the index under ``tag``."""
    for img in index.images:
        push_image(registry_host, repo, None, img, username=username, password=password)
    _put_manifest(_Client(registry_host, username, password), repo, tag, index.index)
    return index.digest


# --------------------------------------------------------------------------
# local archive formats (oracles for importer tests)


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    tf.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))


def oci_layout_tar(
    target: Union[BuiltImage, BuiltIndex],
    ref_name: Optional[str] = None,
    *,
    omit: Iterable[str] = (),
    only_platform: Optional[str] = None,
) -> bytes:
    """OCI image layout as a tar (oci-layout, index.json, blobs/sha256/*).

    ``ref_name`` is written as both ``io.containerd.image.name`` and
    ``org.opencontainers.image.ref.name`` on the top-level descriptor.
    ``omit`` leaves out blobs by digest; ``only_platform`` ("arm64") keeps only
    that architecture's blobs of an index (plus the index itself).
    """
    if isinstance(target, BuiltIndex):
        top = target.index
        imgs = [i for i in target.images if only_platform in (None, i.platform.architecture)]
        blobs: dict[str, Blob] = {top.digest: top}
        for img in imgs:
            blobs.update(img.blobs())
    else:
        top = target.manifest
        blobs = target.blobs()
    annotations = {}
    if ref_name:
        annotations = {REF_NAME_ANNOTATION: ref_name, OCI_REF_ANNOTATION: ref_name}
    desc = top.descriptor(**({"annotations": annotations} if annotations else {}))
    index_json = canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]})
    skip = set(omit)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add_bytes(tf, "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
        _add_bytes(tf, "index.json", index_json)
        tf.addfile(_tarinfo("blobs/", tarfile.DIRTYPE, 0o755))
        tf.addfile(_tarinfo("blobs/sha256/", tarfile.DIRTYPE, 0o755))
        for digest in sorted(blobs):
            if digest not in skip:
                _add_bytes(tf, f"blobs/sha256/{digest.split(':', 1)[1]}", blobs[digest].data)
    return buf.getvalue()


def docker_archive_tar(
    image: BuiltImage,
    repo_tags: Iterable[str] = (),
    *,
    compressed_layers: bool = False,
    omit_layers: Iterable[int] = (),
) -> bytes:
    """``docker save`` style archive (manifest.json + config + layer files).

    Layer files are named ``<diff_id hex>/layer.tar`` (uncompressed, like
    ``docker save``) or ``<digest hex>.tar.gz`` with ``compressed_layers``.
    ``omit_layers`` lists layer indexes that are listed in manifest.json but
    not written into the tar.
    """
    cfg_name = image.config_digest.split(":", 1)[1] + ".json"
    names: list[str] = []
    files: dict[str, bytes] = {cfg_name: image.config.data}
    skip = set(omit_layers)
    for i, (raw, gz) in enumerate(zip(image.layer_tars, image.layers)):
        if compressed_layers:
            name, data = gz.digest.split(":", 1)[1] + ".tar.gz", gz.data
        else:
            name, data = image.diff_ids[i].split(":", 1)[1] + "/layer.tar", raw
        names.append(name)
        if i not in skip:
            files[name] = data
    manifest = [{"Config": cfg_name, "RepoTags": list(repo_tags), "Layers": names}]
    files["manifest.json"] = json.dumps(manifest).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files):
            _add_bytes(tf, name, files[name])
    return buf.getvalue()


# --------------------------------------------------------------------------
# the standard scenario


BASE_ETC: dict[str, Entry] = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/os-release": 'NAME="edgebundle test base"\nID=edgebundle-test\n',
    "tmp": Dir(0o1777),
    "root": Dir(0o700),
}

TOP_PAYLOAD_SIZE = 1536 * 1024  # 1.5 MiB of PRNG bytes: gzip can't shrink it


def message_for(ref: str) -> str:
    """What ``docker run``/``ctr run`` of ``ref`` prints."""
    return f"hello from {ref}\n"


def base_layers() -> list[dict[str, Entry]]:
    """Two layers shared by every standard image (busybox, /etc)."""
    return [busybox_layer(), dict(BASE_ETC)]


def build_app_image(name: str, version: str = "v1", *, media: str = "docker", arch: str = "amd64") -> BuiltImage:
    """shop/<name>:<version> = base(2) + lib layer + top layer.

    The top layer holds /app/message.txt and a 1.5 MiB payload seeded by
    ``name`` only, so v1 -> v2 of the same app changes exactly one file
    (message.txt) in exactly one layer (the top one).
    """
    ref = f"shop/{name}:{version}"
    lib = {f"app/lib/{name}.txt": f"library of {name}\n", "app/lib/shared.txt": "shared lib\n"}
    top: dict[str, Entry] = {
        "app/message.txt": message_for(ref),
        "app/payload.bin": pseudo_random_bytes(f"payload:{name}", TOP_PAYLOAD_SIZE),
    }
    return build_image([*base_layers(), lib, top], {"Labels": {"test.image": f"shop/{name}"}}, arch, media=media)


def build_multi(media: str = "oci") -> BuiltIndex:
    """shop/multi:v1: linux/amd64 + linux/arm64/v8; /etc/edgebundle-arch marks the arch.

    Both variants carry the amd64 busybox (see module docstring).
    """
    images = []
    for arch, variant in (("amd64", None), ("arm64", "v8")):
        marker = {"etc/edgebundle-arch": f"{arch}\n", "app/message.txt": message_for(f"shop/multi:v1 ({arch})")}
        images.append(
            build_image([*base_layers(), marker], {"Cmd": ["/bin/cat", "/app/message.txt"]}, arch, media=media, variant=variant)
        )
    return build_index(images, media=media)


# (repo, tag, app name, media) of the single-arch images in the standard set.
STANDARD_IMAGES = (
    ("shop/app", "v1", "app", "docker"),
    ("shop/worker", "v1", "worker", "docker"),
    ("shop/tools", "v1", "tools", "oci"),  # OCI media types, same base blobs
)


def _image_info(ref: str, img: BuiltImage) -> dict[str, Any]:
    return {
        "ref": ref,
        "manifest_digest": img.manifest_digest,
        "manifest_size": img.manifest.size,
        "manifest_media_type": img.manifest.media_type,
        "config_digest": img.config_digest,
        "config_size": img.config.size,
        "layers": [
            {"digest": b.digest, "size": b.size, "diff_id": d, "media_type": b.media_type}
            for b, d in zip(img.layers, img.diff_ids)
        ],
        "chain_ids": list(img.chain_ids),
        "platform": str(img.platform),
        "message": message_for(ref) if ref.startswith("shop/") and "multi" not in ref else None,
        "built": img,
    }


def push_app_v2(
    registry_host: str, *, username: Optional[str] = None, password: Optional[str] = None
) -> dict[str, Any]:
    """Push shop/app:v2 (app:v1 with only /app/message.txt in the top layer changed)."""
    img = build_app_image("app", "v2", media="docker")
    push_image(registry_host, "shop/app", "v2", img, username=username, password=password)
    return _image_info("shop/app:v2", img)


def standard_set(
    registry_host: str,
    *,
    include_v2: bool = True,
    username: Optional[str] = None,
    password: Optional[str] = None,
) -> dict[str, Any]:
    """Push the standard scenario and describe it.

    Returns ``{"registry": host, "images": {ref: info}, "multi": {...},
    "base_layer_digests": [...]}`` where ``info`` has manifest/config/layer
    digests and sizes, chain_ids, the expected ``message`` and the
    ``built`` BuiltImage.  ``multi`` has ``index_digest``, ``media_type``,
    ``platforms`` {"linux/amd64": info, "linux/arm64/v8": info} and ``built``.
    """
    out: dict[str, Any] = {"registry": registry_host, "images": {}}
    for repo, tag, name, media in STANDARD_IMAGES:
        img = build_app_image(name, tag, media=media)
        push_image(registry_host, repo, tag, img, username=username, password=password)
        out["images"][f"{repo}:{tag}"] = _image_info(f"{repo}:{tag}", img)
    if include_v2:
        out["images"]["shop/app:v2"] = push_app_v2(registry_host, username=username, password=password)
    multi = build_multi()
    push_index(registry_host, "shop/multi", "v1", multi, username=username, password=password)
    out["multi"] = {
        "ref": "shop/multi:v1",
        "index_digest": multi.digest,
        "index_size": multi.index.size,
        "media_type": multi.index.media_type,
        "platforms": {str(i.platform): _image_info("shop/multi:v1", i) for i in multi.images},
        "built": multi,
    }
    for arch_info, img in zip(out["multi"]["platforms"].values(), multi.images):
        arch_info["message"] = message_for(f"shop/multi:v1 ({img.platform.architecture})")
    app = out["images"]["shop/app:v1"]["built"]
    out["base_layer_digests"] = list(app.layer_digests[:2])
    return out
