"""Root filesystems as sorted path maps, diffs between them, and deterministic layer tars.

A rootfs is ``{path: Node}`` with paths relative to ``/`` and no leading ``./``. It is
read from a tar snapshot (``mmdebstrap`` hook output) or assembled from host files.

Layer tars are deterministic: entries sorted by path, PAX format, every mtime set to the
build's SOURCE_DATE_EPOCH, numeric uid/gid kept (uname/gname empty), no xattrs. Layers
are gzip-compressed by Python's ``gzip`` module (zlib level 6, header mtime 0, no name),
which is what ``imagefactory.gzip_bytes`` does and close to what a registry push by
docker/containerd (Go compress/gzip, default level) produces.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

# Paths never part of an image: pseudo filesystems mounted by mmdebstrap, apt lists and
# caches (a good Dockerfile removes them), logs of the build itself.
DROP_CHILDREN_OF = ("dev", "proc", "sys", "run", "tmp", "var/lib/apt/lists", "var/cache/apt",
                    "var/log", "var/cache/ldconfig")


@dataclass(frozen=True)
class Node:
    kind: str  # "f" file, "d" dir, "l" symlink, "h" hardlink (target = path of the first name)
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""

    def same(self, other: "Node") -> bool:
        return (self.kind, self.mode, self.uid, self.gid, self.target, self.data) == \
            (other.kind, other.mode, other.uid, other.gid, other.target, other.data)


Rootfs = Dict[str, Node]


def norm(path: str) -> str:
    p = path
    while p.startswith("./"):
        p = p[2:]
    return p.strip("/")


def dropped(path: str) -> bool:
    return any(path.startswith(d + "/") for d in DROP_CHILDREN_OF)


def read_tar(path: "os.PathLike[str] | str") -> Rootfs:
    """A rootfs from a tar snapshot; device nodes and DROP_CHILDREN_OF are skipped."""
    fs: Rootfs = {}
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            name = norm(m.name)
            if not name or dropped(name):
                continue
            mode = m.mode & 0o7777
            if m.isdir():
                fs[name] = Node("d", mode, m.uid, m.gid)
            elif m.issym():
                fs[name] = Node("l", 0o777, m.uid, m.gid, target=m.linkname)
            elif m.islnk():
                fs[name] = Node("h", mode, m.uid, m.gid, target=norm(m.linkname))
            elif m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                fs[name] = Node("f", mode, m.uid, m.gid, data=f.read())
            # char/block devices and fifos: not image content
    return fs


def resolve_hardlink(fs: Mapping[str, Node], node: Node) -> Node:
    seen = 0
    while node.kind == "h" and seen < 64:
        node = fs[node.target]
        seen += 1
    return node


def _content_key(fs: Mapping[str, Node], node: Node) -> Tuple:
    """Compare hardlinks by what they point to, so a link to changed content changes."""
    if node.kind == "h":
        t = resolve_hardlink(fs, node)
        return ("f", node.mode, node.uid, node.gid, hashlib.sha256(t.data).digest())
    return (node.kind, node.mode, node.uid, node.gid, node.target,
            hashlib.sha256(node.data).digest() if node.data else b"")


def diff(lower: Mapping[str, Node], upper: Mapping[str, Node]) -> Rootfs:
    """The layer that turns ``lower`` into ``upper``: added/changed entries plus OCI whiteouts.

    Parent directories of every changed entry are included (as ``docker build`` does).
    A removed directory is one whiteout; its children are not listed.
    """
    out: Rootfs = {}
    for path, node in upper.items():
        old = lower.get(path)
        if old is None or _content_key(lower, old) != _content_key(upper, node):
            out[path] = node
    removed = sorted(p for p in lower if p not in upper)
    gone_dirs: List[str] = []
    for path in removed:
        if any(path.startswith(d + "/") for d in gone_dirs):
            continue
        if lower[path].kind == "d":
            gone_dirs.append(path)
        parent, _, base = path.rpartition("/")
        out[(parent + "/" if parent else "") + ".wh." + base] = Node("f", 0o644)
    # parents
    for path in list(out):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in out:
                out[parent] = upper.get(parent, Node("d", 0o755))
    return out


def copy_tree(fs: Mapping[str, Node], src: str, dst: str) -> Rootfs:
    """Entries under ``src`` re-rooted at ``dst`` (hardlinks become plain files)."""
    src, dst = norm(src), norm(dst)
    out: Rootfs = {}
    for path, node in fs.items():
        if path == src or path.startswith(src + "/"):
            new = dst + path[len(src):]
            if node.kind == "h":
                t = resolve_hardlink(fs, node)
                node = Node("f", node.mode, node.uid, node.gid, data=t.data)
            out[new] = node
    return out


def with_parents(layer: Rootfs) -> Rootfs:
    out = dict(layer)
    for path in list(layer):
        parts = path.split("/")
        for i in range(1, len(parts)):
            out.setdefault("/".join(parts[:i]), Node("d", 0o755))
    return out


def layer_tar(layer: Mapping[str, Node], mtime: int) -> bytes:
    """Deterministic, uncompressed layer tar.

    Hardlink groups are written as one regular file (the first path in sorted order) and
    LNKTYPE entries pointing at it, so a link never precedes its target. Hardlinks whose
    target is outside ``layer`` must be materialised first (``materialise_links``).
    """
    groups: Dict[str, List[str]] = {}
    for path, node in layer.items():
        if node.kind == "h":
            t = node.target
            hops = 0
            while layer.get(t) is not None and layer[t].kind == "h" and hops < 64:
                t, hops = layer[t].target, hops + 1
            if t not in layer:
                raise ValueError(f"hardlink {path} -> {node.target}: target not in the layer")
            groups.setdefault(t, [t]).append(path)
    leader: Dict[str, str] = {}
    data_of: Dict[str, bytes] = {}
    for target, members in groups.items():
        first = min(members)
        for m in members:
            leader[m] = first
        data_of[first] = layer[target].data
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(layer):
            node = layer[path]
            ti = tarfile.TarInfo(path + ("/" if node.kind == "d" else ""))
            ti.mode, ti.uid, ti.gid, ti.mtime = node.mode, node.uid, node.gid, mtime
            ti.uname = ti.gname = ""
            body: Optional[bytes] = None
            if node.kind == "d":
                ti.type = tarfile.DIRTYPE
            elif node.kind == "l":
                ti.type, ti.linkname = tarfile.SYMTYPE, node.target
            elif path in leader and leader[path] != path:
                ti.type, ti.linkname = tarfile.LNKTYPE, leader[path]
            else:
                body = data_of.get(path, node.data)
                ti.type, ti.size = tarfile.REGTYPE, len(body)
            tf.addfile(ti, io.BytesIO(body) if body is not None else None)
    return buf.getvalue()


def materialise_links(layer: Rootfs, full: Mapping[str, Node]) -> Rootfs:
    """Replace hardlinks whose target is outside ``layer`` by file copies (from ``full``)."""
    out = dict(layer)
    for path, node in layer.items():
        if node.kind == "h" and node.target not in layer:
            t = resolve_hardlink(full, node)
            out[path] = Node("f", node.mode, node.uid, node.gid, data=t.data)
    return out


def file_node(data: bytes, mode: int = 0o644) -> Node:
    return Node("f", mode, data=data)


def host_tree(src: str, dst: str, *, limit: Optional[int] = None) -> Rootfs:
    """Regular files and symlinks under host directory ``src`` (sorted walk), re-rooted at
    ``dst``; owner root, modes kept. ``limit`` caps the bytes taken (whole files)."""
    out: Rootfs = {}
    total = 0
    root = Path(src)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        base = norm(dst if rel_dir == "." else f"{dst}/{rel_dir}")
        out[base] = Node("d", 0o755)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if "__pycache__" in p.parts:
                continue
            if p.is_symlink():
                out[f"{base}/{name}"] = Node("l", 0o777, target=os.readlink(p))
                continue
            if not p.is_file():
                continue
            data = p.read_bytes()
            if limit is not None and total + len(data) > limit:
                continue
            total += len(data)
            out[f"{base}/{name}"] = Node("f", p.stat().st_mode & 0o755 | 0o644, data=data)
    return out


def size_of(layer: Mapping[str, Node]) -> int:
    return sum(len(n.data) for n in layer.values())


def iter_files(layer: Mapping[str, Node]) -> Iterator[Tuple[str, Node]]:
    for p in sorted(layer):
        if layer[p].kind == "f":
            yield p, layer[p]
