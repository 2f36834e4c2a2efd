"""Offline image sources: ``docker-archive:PATH`` and ``oci-layout:PATH``.

* ``oci-layout:PATH``: an OCI image layout, a directory with ``oci-layout``,
  ``index.json`` and ``blobs/`` (a tar of one is accepted too). The image is the
  ``index.json`` entry whose ``org.opencontainers.image.ref.name`` (or containerd's
  ``io.containerd.image.name``) names the wanted reference or tag, or the only entry.
  Its manifests are used byte for byte, so digests survive.
* ``docker-archive:PATH``: a ``docker save`` tar. Docker 25+ writes an OCI layout inside
  the tar (``index.json``), which is used like the above. Older archives only have
  ``manifest.json`` (Config/RepoTags/Layers) and no registry manifest at all, so one is
  synthesised: a Docker schema2 manifest whose layers are the archive's layer files as
  they are (uncompressed tars, ``...rootfs.diff.tar``). Its bytes depend only on the
  archive's content, so its digest is the same on every run.

Every blob is verified against its digest on its way into the ``BlobCache``.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import posixpath
import tarfile
import threading
from pathlib import Path
from typing import IO, BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple, cast

from .cache import BlobCache, DigestMismatch
from .errors import ResolveError, UsageError
from .compression import GZIP, MAGIC_BYTES, NONE, classify
from .files import read_pieces
from .oci import MT_DOCKER_CONFIG, MT_DOCKER_LAYER_GZIP, MT_DOCKER_LAYER_TAR, MT_DOCKER_MANIFEST, \
    MT_OCI_INDEX, MT_OCI_LAYER_ZSTD, sha256_digest
from .reference import SHA256_RE, Reference, parse_reference

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
# Manifests, indexes and configs are read into memory; nothing legitimate is this big.
MAX_JSON_BYTES = 64 * 1024 * 1024

Progress = Callable[[int], None]


# ---------------------------------------------------------------------------
# Files in a directory or a tar, by slash-separated relative name.


class _Files(abc.ABC):
    @abc.abstractmethod
    def open(self, name: str) -> BinaryIO:
        """Open ``name``; raise FileNotFoundError if it is not there."""

    @abc.abstractmethod
    def size(self, name: str) -> int:
        """Size of ``name``; raise FileNotFoundError if it is not there."""

    def exists(self, name: str) -> bool:
        try:
            self.size(name)
            return True
        except FileNotFoundError:
            return False

    def read(self, name: str, limit: int = MAX_JSON_BYTES) -> bytes:
        with self.open(name) as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"{name} is larger than {limit} bytes")
        return data

    def close(self) -> None:
        """Release open handles."""


class _DirFiles(_Files):
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        # Names come from JSON inside the source; keep them inside its directory.
        path = (self.root / name).resolve()
        if self.root.resolve() not in path.parents:
            raise FileNotFoundError(name)
        return path

    def open(self, name: str) -> BinaryIO:
        return open(self._path(name), "rb")

    def size(self, name: str) -> int:
        path = self._path(name)
        if not path.is_file():
            raise FileNotFoundError(name)
        return path.stat().st_size


class _TarFiles(_Files):
    def __init__(self, path: Path) -> None:
        # "r:*" also reads `docker save | gzip` archives (slower: seeks decompress).
        self._tar = tarfile.open(path, "r:*")
        self._lock = threading.Lock()  # one file object for every member (_LockedMember)
        self._members: Dict[str, tarfile.TarInfo] = {}
        for member in self._tar.getmembers():
            self._members[_clean(member.name)] = member

    def _member(self, name: str) -> tarfile.TarInfo:
        member = self._members.get(_clean(name))
        if member is None or not (member.isfile() or member.issym() or member.islnk()):
            raise FileNotFoundError(name)
        return member

    def _target(self, name: str) -> tarfile.TarInfo:
        """The regular file ``name`` is, or links to (old `docker save` links shared layers)."""
        member = self._member(name)
        for _ in range(16):
            if member.isfile():
                return member
            if member.issym():
                link = posixpath.normpath(posixpath.join(posixpath.dirname(_clean(member.name)), member.linkname))
            else:
                link = member.linkname  # hard links name a path in the archive
            member = self._member(link)
        raise FileNotFoundError(name)  # a link loop

    def open(self, name: str) -> BinaryIO:
        with self._lock:
            fh = self._tar.extractfile(self._target(name))
        if fh is None:
            raise FileNotFoundError(name)
        return cast(BinaryIO, _LockedMember(fh, self._lock))

    def size(self, name: str) -> int:
        return self._target(name).size

    def close(self) -> None:
        self._tar.close()


class _LockedMember:
    """A member of a tar read under the archive's lock.

    Every member reads the archive's one file object (seek, then read): layers copied
    by parallel downloads (``--jobs``) would read each other's bytes without it.
    """

    def __init__(self, fh: IO[bytes], lock: threading.Lock) -> None:
        self._fh = fh
        self._lock = lock

    def read(self, size: int = -1) -> bytes:
        with self._lock:
            return self._fh.read(size)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "_LockedMember":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + digest[len("sha256:"):]


# ---------------------------------------------------------------------------
# Sources


class OfflineSource(abc.ABC):
    """An image source on local disk; blobs are addressed by digest like a registry's."""

    def __init__(self, spec: str, files: _Files) -> None:
        self.spec = spec  # "docker-archive:/abs/path", named in errors
        self._files = files
        self._memory: Dict[str, bytes] = {}  # synthesised blobs (docker-archive manifests)

    @abc.abstractmethod
    def top(self, ref: Reference) -> Tuple[bytes, str, str]:
        """The index or manifest that names ``ref`` here: ``(bytes, media type, digest)``.

        Raises:
            ResolveError: no (unambiguous) image for ``ref`` in this source.
        """

    @abc.abstractmethod
    def _locate(self, digest: str) -> Optional[str]:
        """Name of the file holding blob ``digest``, or None."""

    def close(self) -> None:
        self._files.close()

    def read_blob(self, digest: str) -> bytes:
        """A small (JSON) blob, verified.

        Raises:
            ResolveError: missing or corrupt.
        """
        if digest in self._memory:
            return self._memory[digest]
        name = self._require(digest)
        try:
            data = self._files.read(name)
        except (OSError, ValueError, tarfile.TarError) as exc:
            raise ResolveError(f"blob {digest} in {self.spec} unreadable: {exc}", _RECREATE) from None
        if sha256_digest(data) != digest:
            raise ResolveError(f"blob {digest} in {self.spec} is corrupt (its content has digest "
                               f"{sha256_digest(data)})", _RECREATE)
        return data

    def copy_blob(self, digest: str, size: Optional[int], cache: BlobCache,
                  progress: Optional[Progress] = None, layer_media_type: Optional[str] = None) -> None:
        """Stream blob ``digest`` into ``cache`` (verified); no-op if it is cached.
        ``layer_media_type``: a layer; its diff_id is learnt on the way (``BlobCache.writer``)."""
        if cache.has(digest):
            return
        if digest in self._memory:
            cache.put_bytes(self._memory[digest], digest)
            return
        name = self._require(digest)
        copied = 0
        try:
            with self._files.open(name) as src, cache.writer(digest, size, layer_media_type) as out:
                for chunk in read_pieces(src):
                    out.write(chunk)
                    copied += len(chunk)
                    if progress:
                        progress(len(chunk))
        except DigestMismatch as exc:
            if progress and copied:
                progress(-copied)
            raise ResolveError(f"{name} in {self.spec} is corrupt: {exc}", _RECREATE) from None
        except (OSError, tarfile.TarError) as exc:
            raise ResolveError(f"{name} in {self.spec} unreadable: {exc}", _RECREATE) from None

    def _require(self, digest: str) -> str:
        name = self._locate(digest)
        if name is None:
            raise ResolveError(f"blob {digest} missing from {self.spec}",
                               "re-export the image with all its blobs (for a multi-platform image, "
                               "include the platform wanted)")
        return name

    def _read_json(self, name: str) -> object:
        try:
            return json.loads(self._files.read(name))
        except FileNotFoundError:
            raise ResolveError(f"{self.spec} has no {name}", _RECREATE) from None
        except (OSError, ValueError, tarfile.TarError) as exc:
            raise ResolveError(f"{name} in {self.spec} unreadable: {exc}", _RECREATE) from None


_RECREATE = "re-create the archive/layout (docker save, skopeo copy) and check the disk"


class OciLayoutSource(OfflineSource):
    """An OCI image layout (directory or tar); manifests are used as they are."""

    def __init__(self, spec: str, files: _Files) -> None:
        super().__init__(spec, files)
        if not files.exists("oci-layout"):
            raise ResolveError(f"{spec} is not an OCI image layout (no oci-layout file)",
                               "point oci-layout: at a directory written by `skopeo copy ... oci:DIR` "
                               "or `docker buildx build --output type=oci,tar=false`")
        index = self._read_json("index.json")
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list):
            raise ResolveError(f"index.json in {spec} has no manifests list", _RECREATE)
        self._entries: List[Dict[str, object]] = [m for m in manifests if isinstance(m, dict)]

    def _locate(self, digest: str) -> Optional[str]:
        name = _blob_name(digest)
        return name if SHA256_RE.match(digest) and self._files.exists(name) else None

    def top(self, ref: Reference) -> Tuple[bytes, str, str]:
        entry = self._select(ref)
        digest = str(entry.get("digest", ""))
        if not SHA256_RE.match(digest):
            raise ResolveError(f"index.json in {self.spec} names {digest!r}, not a sha256 digest", _RECREATE)
        data = self.read_blob(digest)
        media_type = str(entry.get("mediaType") or "") or _media_type_of(data)
        return data, media_type, digest

    def _select(self, ref: Reference) -> Dict[str, object]:
        if ref.digest:
            hits = [e for e in self._entries if e.get("digest") == ref.digest]
            if not hits and self._locate(ref.digest):
                return {"digest": ref.digest}  # pinned to a blob index.json does not list
            if not hits:
                raise ResolveError(f"{self.spec} has no image {ref.digest}",
                                   "check the digest the image is pinned to, or re-export the layout")
            return hits[0]
        hits = [e for e in self._entries if _names_ref(e, ref, full=True)]
        hits = hits or [e for e in self._entries if _names_ref(e, ref, full=False)]
        if len(self._entries) == 1 and not hits:
            return self._entries[0]
        if len({str(e.get("digest")) for e in hits}) == 1:
            return hits[0]
        names = sorted({_entry_name(e) for e in self._entries})
        what = "several images named" if hits else "no image named"
        raise ResolveError(f"{self.spec} has {what} {ref}" + (f" (it has: {', '.join(names)})" if names else ""),
                           f"set the image's ref: to one of the names in its index.json ({REF_NAME})")


def _names_ref(entry: Mapping[str, object], ref: Reference, *, full: bool) -> bool:
    annotations = entry.get("annotations")
    if not isinstance(annotations, dict):
        return False
    wanted = Reference(ref.domain, ref.path, ref.tag)
    for key in (CONTAINERD_NAME, REF_NAME):
        value = annotations.get(key)
        if not isinstance(value, str) or not value:
            continue
        if not full and value == (ref.tag or "latest"):
            return True
        if full and ("/" in value or ":" in value):
            try:
                if parse_reference(value) == wanted:
                    return True
            except UsageError:
                continue
    return False


def _entry_name(entry: Mapping[str, object]) -> str:
    annotations = entry.get("annotations")
    if isinstance(annotations, dict):
        for key in (CONTAINERD_NAME, REF_NAME):
            if annotations.get(key):
                return str(annotations[key])
    return str(entry.get("digest", "?"))


def _media_type_of(data: bytes) -> str:
    try:
        obj = json.loads(data)
    except ValueError:
        return ""
    if isinstance(obj, dict):
        if obj.get("mediaType"):
            return str(obj["mediaType"])
        return MT_OCI_INDEX if "manifests" in obj else "application/vnd.oci.image.manifest.v1+json"
    return ""


class DockerArchiveSource(OfflineSource):
    """A ``docker save`` tar without an OCI index: a schema2 manifest is synthesised."""

    def __init__(self, spec: str, files: _Files) -> None:
        super().__init__(spec, files)
        entries = self._read_json("manifest.json")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or not entries:
            raise ResolveError(f"manifest.json in {spec} is not a list of images", _RECREATE)
        self._entries: List[Dict[str, object]] = entries
        self._blobs: Dict[str, str] = {}  # digest -> file in the tar

    def _locate(self, digest: str) -> Optional[str]:
        return self._blobs.get(digest)

    def top(self, ref: Reference) -> Tuple[bytes, str, str]:
        entry = self._select(ref)
        config_name = str(entry.get("Config", ""))
        config = self._read_file(config_name)
        config_digest = sha256_digest(config)
        self._blobs[config_digest] = config_name
        layers = entry.get("Layers")
        diff_ids = _diff_ids(config)
        if not isinstance(layers, list) or diff_ids is None or len(layers) != len(diff_ids):
            raise ResolveError(f"image {ref} in {self.spec}: manifest.json lists "
                               f"{len(layers) if isinstance(layers, list) else 'no'} layers but its config has "
                               f"{len(diff_ids) if diff_ids is not None else 'no'} diff_ids", _RECREATE)
        descriptors = [self._layer_descriptor(str(name), diff_id) for name, diff_id in zip(layers, diff_ids)]
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_DOCKER_MANIFEST,
            "config": {"mediaType": MT_DOCKER_CONFIG, "size": len(config), "digest": config_digest},
            "layers": descriptors,
        }
        # Fixed key order and separators: the same archive content gives the same digest.
        data = json.dumps(manifest, separators=(",", ":")).encode()
        digest = sha256_digest(data)
        self._memory[digest] = data
        return data, MT_DOCKER_MANIFEST, digest

    def _select(self, ref: Reference) -> Dict[str, object]:
        wanted = Reference(ref.domain, ref.path, ref.tag)
        hits = [e for e in self._entries if any(_same_name(t, wanted) for t in _repo_tags(e))]
        if hits:
            return hits[0]
        if len(self._entries) == 1:
            return self._entries[0]
        names = sorted({t for e in self._entries for t in _repo_tags(e)})
        raise ResolveError(f"{self.spec} has no image named {ref}"
                           + (f" (it has: {', '.join(names)})" if names else ""),
                           "set the image's ref: to one of the archive's RepoTags")

    def _read_file(self, name: str) -> bytes:
        try:
            return self._files.read(name)
        except FileNotFoundError:
            raise ResolveError(f"{self.spec} lacks {name!r}, which its manifest.json lists", _RECREATE) from None
        except (OSError, ValueError, tarfile.TarError) as exc:
            raise ResolveError(f"{name} in {self.spec} unreadable: {exc}", _RECREATE) from None

    def _layer_descriptor(self, name: str, diff_id: str) -> Dict[str, object]:
        try:
            size = self._files.size(name)
            with self._files.open(name) as fh:
                head = fh.read(MAGIC_BYTES)
        except FileNotFoundError:
            raise ResolveError(f"{self.spec} lacks layer {name!r}, which its manifest.json lists", _RECREATE) from None
        except (OSError, tarfile.TarError) as exc:
            raise ResolveError(f"layer {name} in {self.spec} unreadable: {exc}", _RECREATE) from None
        kind = classify("", head)  # the archive says nothing of a layer's compression
        if kind != NONE:
            # A compressed layer file (some tools write them): its digest is its own hash.
            digest = self._hash_file(name)
            media_type = MT_DOCKER_LAYER_GZIP if kind == GZIP else MT_OCI_LAYER_ZSTD
        else:
            # docker save writes the uncompressed tar, whose digest is the diff_id;
            # copy_blob verifies that on the way into the cache.
            digest, media_type = diff_id, MT_DOCKER_LAYER_TAR
        self._blobs[digest] = name
        return {"mediaType": media_type, "size": size, "digest": digest}

    def _hash_file(self, name: str) -> str:
        hasher = hashlib.sha256()
        with self._files.open(name) as fh:
            for chunk in read_pieces(fh):
                hasher.update(chunk)
        return "sha256:" + hasher.hexdigest()


def _repo_tags(entry: Mapping[str, object]) -> List[str]:
    tags = entry.get("RepoTags")
    return [str(t) for t in tags] if isinstance(tags, list) else []


def _same_name(text: str, wanted: Reference) -> bool:
    try:
        return parse_reference(text) == wanted
    except UsageError:
        return False


def _diff_ids(config: bytes) -> Optional[List[str]]:
    try:
        ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) and SHA256_RE.match(i) for i in ids):
        return None
    return list(ids)


# ---------------------------------------------------------------------------


SOURCE_KINDS = ("docker-archive", "oci-layout")


def open_source(source: str) -> OfflineSource:
    """Open ``docker-archive:PATH`` or ``oci-layout:PATH`` (PATH absolute or relative to cwd).

    Raises:
        ResolveError: unknown kind, missing/unreadable path, or not that kind of archive.
    """
    kind, sep, where = source.partition(":")
    if not sep or kind not in SOURCE_KINDS or not where:
        raise ResolveError(f"unknown image source {source!r}",
                           "write source: docker-archive:PATH or source: oci-layout:PATH")
    path = Path(os.path.expanduser(where))
    spec = f"{kind}:{path}"
    if not path.exists():
        raise ResolveError(f"{kind} {path} not found",
                           "check the image's source: path (relative paths start at the manifest list's directory)")
    try:
        files: _Files = _DirFiles(path) if path.is_dir() else _TarFiles(path)
    except (OSError, tarfile.TarError) as exc:
        raise ResolveError(f"{kind} {path} unreadable: {exc}",
                           "docker-archive: wants a `docker save -o FILE` tar; oci-layout: an OCI layout "
                           "directory (or a tar of one)") from None
    try:
        if kind == "docker-archive" and isinstance(files, _DirFiles):
            raise ResolveError(f"docker-archive {path} is a directory, not a tar",
                               "for an extracted OCI layout write oci-layout:PATH; else `docker save -o FILE`")
        if kind == "docker-archive" and not (files.exists("index.json") and files.exists("oci-layout")):
            return DockerArchiveSource(spec, files)
        return OciLayoutSource(spec, files)
    except BaseException:
        files.close()
        raise
