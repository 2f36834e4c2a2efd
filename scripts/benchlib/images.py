"""The benchmark's images: built deterministically, cached, pushed to a local registry.

Full mode builds from real Debian packages with ``mmdebstrap`` (two "eras": bookworm
as of the first build, and bookworm + bookworm-security, rebuilt later). Quick mode
builds the same image structure from the host's files and the static busybox, in a
few seconds and without network.

Layers (both modes):

* ``base``   - the minbase rootfs (quick: busybox + /etc + a few host files);
* ``python`` - diff between the base rootfs and base + python3 (added/changed files,
  OCI ``.wh.`` whiteouts for removed ones), as ``RUN apt-get install python3`` makes;
* ``app``    - a few tens of MB of real files (a copy of /usr/lib/python3.11 and
  /usr/share/doc of the rootfs) plus /app/main.py and /app/VERSION;
* fleet-only layers ``worker`` (a copy of /usr/share/locale) and ``tools``
  (/usr/share/man, /usr/share/info, /usr/share/zoneinfo).

app:v2 = app:v1 with two files of the top layer edited (main.py, VERSION).
app:v3 = app:v2 rebuilt on the security-updated era (every digest changes).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from . import rootfs as R
from .rootfs import Node, Rootfs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))
import imagefactory  # noqa: E402

BUILDER_VERSION = "ebbench-layers-1"  # bump when layer construction changes
MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"

# Era: (SOURCE_DATE_EPOCH, apt sources). The epoch becomes every mtime in the layers.
ERAS: Dict[str, Tuple[int, Tuple[str, ...]]] = {
    "v1": (1704067200, (f"deb {MIRROR} bookworm main",)),  # 2024-01-01
    "v3": (1735689600, (f"deb {MIRROR} bookworm main",  # 2025-01-01, with security updates
                        f"deb {SECURITY} bookworm-security main")),
}

OCI = imagefactory.MEDIA["oci"]
GZIP_NOTE = "Python gzip module (zlib {zlib}), level 6, header mtime 0, no file name"


def gzip_note() -> str:
    import zlib
    return GZIP_NOTE.format(zlib=zlib.ZLIB_VERSION)


def rfc3339(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------
# layers and images


@dataclass(frozen=True)
class LayerBlob:
    name: str  # e.g. "base@v1"
    gz: bytes = field(repr=False)
    digest: str
    diff_id: str
    tar_size: int

    @property
    def size(self) -> int:
        return len(self.gz)


@dataclass
class BenchImage:
    repo: str  # "bench/app"
    tag: str
    layers: List[LayerBlob]
    config: Dict[str, Any]  # container config (Cmd, Env, ...)
    epoch: int
    built: Optional[imagefactory.BuiltImage] = None
    expect: str = ""  # what running it prints (substring)

    @property
    def ref(self) -> str:
        return f"{self.repo}:{self.tag}"

    def build(self) -> imagefactory.BuiltImage:
        if self.built is None:
            cfg = {
                "architecture": "amd64", "os": "linux", "created": rfc3339(self.epoch),
                "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                           "WorkingDir": "/", **self.config},
                "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in self.layers]},
                "history": [{"created": rfc3339(self.epoch), "created_by": f"edgebundle bench: {l.name}"}
                            for l in self.layers],
            }
            config = imagefactory.Blob(OCI["config"], imagefactory.canonical_json(cfg))
            blobs = tuple(imagefactory.Blob(OCI["layer"], l.gz) for l in self.layers)
            manifest = imagefactory.Blob(OCI["manifest"], imagefactory.canonical_json({
                "schemaVersion": 2, "mediaType": OCI["manifest"], "config": config.descriptor(),
                "layers": [b.descriptor() for b in blobs]}))
            self.built = imagefactory.BuiltImage(manifest, config, blobs, (),
                                                 tuple(l.diff_id for l in self.layers),
                                                 imagefactory.Platform(), "oci")
        return self.built

    @property
    def registry_bytes(self) -> int:
        b = self.build()
        return b.manifest.size + b.config.size + sum(l.size for l in self.layers)

    @property
    def tar_bytes(self) -> int:
        return sum(l.tar_size for l in self.layers)

    def json_blobs(self) -> Dict[str, int]:
        b = self.build()
        return {b.manifest.digest: b.manifest.size, b.config.digest: b.config.size}

    def blob_sizes(self) -> Dict[str, int]:
        out = self.json_blobs()
        out.update({l.digest: l.size for l in self.layers})
        return out


class LayerCache:
    """gzip layer blobs + their diff_id/tar size, keyed by a recipe key."""

    def __init__(self, root: Optional[Path]) -> None:
        self.root = root
        if root is not None:
            (root / "layers").mkdir(parents=True, exist_ok=True)

    def get(self, name: str, key: str, make_tar: Callable[[], bytes]) -> LayerBlob:
        kh = hashlib.sha256(f"{BUILDER_VERSION}\0{key}".encode()).hexdigest()[:32]
        if self.root is not None:
            meta_p = self.root / "layers" / f"{kh}.json"
            blob_p = self.root / "layers" / f"{kh}.tar.gz"
            if meta_p.is_file() and blob_p.is_file():
                meta = json.loads(meta_p.read_text())
                gz = blob_p.read_bytes()
                if imagefactory.sha256(gz) == meta["digest"]:
                    return LayerBlob(name, gz, meta["digest"], meta["diff_id"], meta["tar_size"])
        tar = make_tar()
        gz = imagefactory.gzip_bytes(tar)
        blob = LayerBlob(name, gz, imagefactory.sha256(gz), imagefactory.sha256(tar), len(tar))
        if self.root is not None:
            tmp = blob_p.with_suffix(".part")
            tmp.write_bytes(gz)
            os.replace(tmp, blob_p)
            meta_p.write_text(json.dumps({"name": name, "key": key, "digest": blob.digest,
                                          "diff_id": blob.diff_id, "tar_size": blob.tar_size}))
        return blob


def layer_from(fs: Rootfs, epoch: int) -> Callable[[], bytes]:
    return lambda: R.layer_tar(fs, epoch)


# --------------------------------------------------------------------------------------
# image sets


@dataclass
class ImageSet:
    mode: str
    app: Dict[str, BenchImage]  # "v1", "v2", "v3"
    fleet: List[BenchImage]
    notes: Dict[str, Any] = field(default_factory=dict)  # provenance for the doc
    # the delta scenarios' own images (not in all_images: the fleet/all-images bundles
    # stay what they were): "base-v1"/"base-v3" (a base-only security update) and
    # "big-v1"/"big-v2" (one large file edited in a few places: the device memory goal)
    extras: Dict[str, BenchImage] = field(default_factory=dict)

    def all_images(self) -> List[BenchImage]:
        seen: Dict[str, BenchImage] = {}
        for img in [*self.app.values(), *self.fleet]:
            seen[img.ref] = img
        return list(seen.values())

    def push(self, registry_host: str) -> None:
        for img in [*self.all_images(), *self.extras.values()]:
            imagefactory.push_image(registry_host, img.repo, img.tag, img.build())


BIG_FILE = {"full": 300_000_000, "quick": 24_000_000}  # bytes of the big image's one file


def big_file(version: str, size: int) -> bytes:
    """PRNG bytes (the worst case for compression); v2 edits 16 bytes in 8 places."""
    rng = random.Random("big-file")
    data = bytearray()
    while len(data) < size:  # randbytes takes at most 2**28 bytes at once
        data += rng.randbytes(min(1 << 24, size - len(data)))
    if version == "v2":
        for k in range(8):
            pos = (k * 2 + 1) * size // 17
            data[pos:pos + 16] = hashlib.sha256(f"edit {k}".encode()).digest()[:16]
    return bytes(data)


def extra_images(base: Callable[[str], LayerBlob], lc: "LayerCache", mode: str, e1: int,
                 e3: int) -> Dict[str, BenchImage]:
    size = BIG_FILE[mode]

    def big(version: str) -> LayerBlob:
        def make() -> bytes:
            fs = R.with_parents({"data/big.bin": Node("f", data=big_file(version, size)),
                                 "data/VERSION": Node("f", data=version.encode() + b"\n")})
            return R.layer_tar(fs, e1)
        return lc.get(f"big-{version}", f"big:{version}:{size}", make)

    def echo(what: str) -> Dict[str, Any]:
        return {"Cmd": ["/bin/sh", "-c", f"echo edgebundle bench {what}"]}

    return {
        "base-v1": BenchImage("bench/base", "v1", [base("v1")], echo("base"), e1,
                              expect="edgebundle bench base"),
        "base-v3": BenchImage("bench/base", "v3", [base("v3")], echo("base"), e3,
                              expect="edgebundle bench base"),
        "big-v1": BenchImage("bench/big", "v1", [base("v1"), big("v1")], echo("big"), e1,
                             expect="edgebundle bench big"),
        "big-v2": BenchImage("bench/big", "v2", [base("v1"), big("v2")], echo("big"), e1,
                             expect="edgebundle bench big"),
    }


APP_MAIN_V1 = b'''"""edgebundle benchmark app."""
import pathlib
import sys

HERE = pathlib.Path(__file__).parent
VERSION = (HERE / "VERSION").read_text().strip()


def main() -> None:
    print(f"edgebundle bench app {VERSION} (python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
'''
APP_MAIN_V2 = APP_MAIN_V1.replace(
    b'    print(f"edgebundle bench app {VERSION} (python {sys.version.split()[0]})")\n',
    b'    modules = len(list((HERE / "lib").rglob("*.py")))\n'
    b'    print(f"edgebundle bench app {VERSION} (python {sys.version.split()[0]}, {modules} modules)")\n')
APP_SH_V1 = b'#!/bin/sh\necho "edgebundle bench app $(cat /app/VERSION)"\n'
APP_SH_V2 = b'#!/bin/sh\n# v2: also count the shipped files\necho "edgebundle bench app $(cat /app/VERSION) ($(ls /app/lib | wc -l) entries)"\n'


def app_files(version: str, quick: bool) -> Rootfs:
    """The two files v2 edits (main + VERSION), plus a config file that never changes."""
    tag = {"v1": b"1", "v2": b"2", "v3": b"3"}[version]
    main = (APP_SH_V1 if version == "v1" else APP_SH_V2) if quick else \
        (APP_MAIN_V1 if version == "v1" else APP_MAIN_V2)
    name = "app/main.sh" if quick else "app/main.py"
    return {
        name: Node("f", 0o755, data=main),
        "app/VERSION": Node("f", 0o644, data=tag + b"\n"),
        "app/config.json": Node("f", 0o644, data=b'{"listen": "0.0.0.0:8080", "workers": 2}\n'),
    }


def expected_output(version: str) -> str:
    return f"edgebundle bench app {version[1:]}"


# --------------------------------------------------------------------------------------
# full mode: mmdebstrap


def app_images(base: Callable[[str], LayerBlob], python: Callable[[str], LayerBlob],
               app: Callable[[str, str], LayerBlob], run_app: Dict[str, Any],
               e1: int, e3: int) -> Dict[str, "BenchImage"]:
    """app v1, v2 (two files edited in the top layer) and v3 (rebuilt on the updated base)."""
    return {
        "v1": BenchImage("bench/app", "v1", [base("v1"), python("v1"), app("v1", "v1")], run_app, e1,
                         expect=expected_output("v1")),
        "v2": BenchImage("bench/app", "v2", [base("v1"), python("v1"), app("v1", "v2")], run_app, e1,
                         expect=expected_output("v2")),
        "v3": BenchImage("bench/app", "v3", [base("v3"), python("v3"), app("v3", "v3")], run_app, e3,
                         expect=expected_output("v3")),
    }


def _tar_excludes() -> str:
    return " ".join(f"--exclude=./{d}/*" for d in R.DROP_CHILDREN_OF)


def mmdebstrap_era(cache: Path, era: str, log: Callable[[str], None]) -> Dict[str, Any]:
    """Build (once; cached) the base and base+python3 rootfs tars of an era."""
    epoch, sources = ERAS[era]
    d = cache / "rootfs" / era
    meta_p = d / "meta.json"
    if meta_p.is_file() and (d / "base.tar").is_file() and (d / "python.tar").is_file():
        return json.loads(meta_p.read_text())
    d.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"mmdeb-{era}-", dir=d))
    ex = _tar_excludes()
    argv = ["mmdebstrap", "--mode=root", "--variant=minbase", "--format=null",
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            f"--customize-hook=tar --numeric-owner {ex} -C \"$1\" -cf {tmp}/base.tar .",
            "--customize-hook=chroot \"$1\" apt-get install -y --no-install-recommends python3",
            f"--customize-hook=tar --numeric-owner {ex} -C \"$1\" -cf {tmp}/python.tar .",
            "bookworm", "/dev/null", *sources]
    log(f"mmdebstrap {era}: bookworm minbase + python3 ({len(sources)} source(s)), cached in {d}")
    t0 = time.monotonic()
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(epoch), LC_ALL="C.UTF-8")
    with open(d / "mmdebstrap.log", "wb") as fh:
        r = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed (exit {r.returncode}); see {d / 'mmdebstrap.log'}")
    meta = {"era": era, "epoch": epoch, "sources": list(sources), "argv": argv,
            "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "seconds": round(time.monotonic() - t0, 1)}
    for name in ("base", "python"):
        os.replace(tmp / f"{name}.tar", d / f"{name}.tar")
        h = hashlib.sha256()
        with open(d / f"{name}.tar", "rb") as fh:
            for piece in iter(lambda: fh.read(1 << 20), b""):
                h.update(piece)
        meta[f"{name}_sha256"] = h.hexdigest()
    shutil.rmtree(tmp, ignore_errors=True)
    meta_p.write_text(json.dumps(meta, indent=2))
    log(f"mmdebstrap {era}: done in {meta['seconds']} s")
    return meta


def dpkg_versions(fs: Mapping[str, Node]) -> Dict[str, str]:
    node = fs.get("var/lib/dpkg/status")
    out: Dict[str, str] = {}
    if node is None:
        return out
    pkg = None
    for line in node.data.decode(errors="replace").splitlines():
        if line.startswith("Package: "):
            pkg = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and pkg:
            out[pkg] = line.split(": ", 1)[1]
    return out


def full_set(cache: Path, log: Callable[[str], None]) -> ImageSet:
    lc = LayerCache(cache)
    eras: Dict[str, Dict[str, Any]] = {}
    fs_cache: Dict[Tuple[str, str], Rootfs] = {}

    def rootfs(era: str, which: str) -> Rootfs:
        if (era, which) not in fs_cache:
            fs_cache[(era, which)] = R.read_tar(cache / "rootfs" / era / f"{which}.tar")
        return fs_cache[(era, which)]

    for era in ERAS:
        eras[era] = mmdebstrap_era(cache, era, log)

    def key(era: str, recipe: str) -> str:
        m = eras[era]
        return f"{era}:{m['base_sha256']}:{m['python_sha256']}:{recipe}"

    def base(era: str) -> LayerBlob:
        return lc.get(f"base@{era}", key(era, "base"),
                      lambda: R.layer_tar(rootfs(era, "base"), ERAS[era][0]))

    def python(era: str) -> LayerBlob:
        def make() -> bytes:
            lower, upper = rootfs(era, "base"), rootfs(era, "python")
            return R.layer_tar(R.materialise_links(R.diff(lower, upper), upper), ERAS[era][0])
        return lc.get(f"python@{era}", key(era, "python"), make)

    def app(era: str, version: str) -> LayerBlob:
        def make() -> bytes:
            py = rootfs(era, "python")
            fs = {**R.copy_tree(py, "usr/lib/python3.11", "app/lib/python3.11"),
                  **R.copy_tree(py, "usr/share/doc", "app/docs"), **app_files(version, False)}
            return R.layer_tar(R.with_parents(fs), ERAS[era][0])
        return lc.get(f"app-{version}@{era}", key(era, f"app-{version}"), make)

    def worker(era: str) -> LayerBlob:
        def make() -> bytes:
            py = rootfs(era, "python")
            fs = {**R.copy_tree(py, "usr/share/locale", "srv/worker/locale"),
                  "srv/worker/worker.py": Node("f", 0o755, data=b'print("edgebundle bench worker")\n')}
            return R.layer_tar(R.with_parents(fs), ERAS[era][0])
        return lc.get(f"worker@{era}", key(era, "worker"), make)

    def tools(era: str) -> LayerBlob:
        def make() -> bytes:
            b = rootfs(era, "base")
            fs = {**R.copy_tree(b, "usr/share/man", "opt/tools/man"),
                  **R.copy_tree(b, "usr/share/info", "opt/tools/info"),
                  **R.copy_tree(b, "usr/share/zoneinfo", "opt/tools/zoneinfo"),
                  "opt/tools/run.sh": Node("f", 0o755, data=b'#!/bin/sh\necho "edgebundle bench tools"\n')}
            return R.layer_tar(R.with_parents(fs), ERAS[era][0])
        return lc.get(f"tools@{era}", key(era, "tools"), make)

    t0 = time.monotonic()
    e1, e3 = ERAS["v1"][0], ERAS["v3"][0]
    run_app = {"Cmd": ["python3", "/app/main.py"]}
    app_imgs = app_images(base, python, app, run_app, e1, e3)
    fleet = [
        BenchImage("bench/python", "v1", [base("v1"), python("v1")],
                   {"Cmd": ["python3", "-c", "print('edgebundle bench python')"]}, e1,
                   expect="edgebundle bench python"),
        app_imgs["v1"],
        BenchImage("bench/worker", "v1", [base("v1"), python("v1"), worker("v1")],
                   {"Cmd": ["python3", "/srv/worker/worker.py"]}, e1, expect="edgebundle bench worker"),
        BenchImage("bench/tools", "v1", [base("v1"), tools("v1")], {"Cmd": ["/opt/tools/run.sh"]}, e1,
                   expect="edgebundle bench tools"),
    ]
    built_s = time.monotonic() - t0
    notes: Dict[str, Any] = {"eras": eras, "layers_seconds": round(built_s, 1)}
    # What the security rebuild really changed (package versions), for the doc.
    v1p = dpkg_versions(_status_only(cache, "v1"))
    v3p = dpkg_versions(_status_only(cache, "v3"))
    notes["security_updates"] = sorted(
        f"{p} {v1p[p]} -> {v3p[p]}" for p in v1p if p in v3p and v1p[p] != v3p[p])
    notes["packages"] = len(v3p)
    return ImageSet("full", app_imgs, fleet, notes, extra_images(base, lc, "full", e1, e3))


def _status_only(cache: Path, era: str) -> Rootfs:
    """Just var/lib/dpkg/status of an era's python rootfs (cheap: no full read needed)."""
    import tarfile
    with tarfile.open(cache / "rootfs" / era / "python.tar") as tf:
        for m in tf:
            if R.norm(m.name) == "var/lib/dpkg/status":
                f = tf.extractfile(m)
                assert f is not None
                return {"var/lib/dpkg/status": Node("f", data=f.read())}
    return {}


# --------------------------------------------------------------------------------------
# quick mode: host files + busybox, no network


def _busybox_fs() -> Rootfs:
    fs: Rootfs = {}
    for path, entry in imagefactory.busybox_layer().items():
        if isinstance(entry, imagefactory.File):
            fs[path] = Node("f", entry.mode, data=entry.data)
        elif isinstance(entry, imagefactory.Symlink):
            fs[path] = Node("l", 0o777, target=entry.target)
    for path, entry in imagefactory.BASE_ETC.items():
        if isinstance(entry, imagefactory.Dir):
            fs[path] = Node("d", entry.mode)
        else:
            fs[path] = Node("f", 0o644, data=entry.encode() if isinstance(entry, str) else entry)
    return fs


def quick_set(log: Callable[[str], None]) -> ImageSet:
    lc = LayerCache(None)
    py = "/usr/lib/python3.11"

    def base_fs(era: str) -> Rootfs:
        fs = _busybox_fs()
        fs.update(R.host_tree(f"{py}/encodings", "usr/lib/encodings", limit=1_000_000))
        fs["etc/motd"] = Node("f", data=b"removed by the python layer (whiteout)\n")
        fs["usr/lib/libfake-ssl.so"] = Node("f", 0o755, data=imagefactory.pseudo_random_bytes(
            "ssl-" + ("patched" if era == "v3" else "orig"), 300_000))
        if era == "v3":
            fs["etc/os-release"] = Node("f", data=b'NAME="edgebundle test base"\nID=edgebundle-test\n'
                                                  b'VERSION="security update 1"\n')
        return R.with_parents(fs)

    def python_fs(era: str) -> Rootfs:
        fs = dict(base_fs(era))
        del fs["etc/motd"]
        for sub in ("json", "email", "http"):
            fs.update(R.host_tree(f"{py}/{sub}", f"usr/lib/python3.11/{sub}", limit=800_000))
        fs["etc/os-release"] = Node("f", data=fs["etc/os-release"].data + b"PYTHON=3.11\n")
        return R.with_parents(fs)

    def epoch(era: str) -> int:
        return ERAS[era][0]

    layers: Dict[str, LayerBlob] = {}

    def memo(name: str, make: Callable[[], bytes]) -> LayerBlob:
        if name not in layers:
            layers[name] = lc.get(name, "", make)
        return layers[name]

    def base(era: str) -> LayerBlob:
        return memo(f"base@{era}", layer_from(base_fs(era), epoch(era)))

    def python(era: str) -> LayerBlob:
        def make() -> bytes:
            return R.layer_tar(R.diff(base_fs(era), python_fs(era)), epoch(era))
        return memo(f"python@{era}", make)

    def app(era: str, version: str) -> LayerBlob:
        def make() -> bytes:
            fs = {**R.host_tree(f"{py}/asyncio", "app/lib/asyncio", limit=1_500_000),
                  **R.host_tree(f"{py}/unittest", "app/lib/unittest", limit=800_000),
                  "app/lib/data.bin": Node("f", data=imagefactory.pseudo_random_bytes("app-data", 1_000_000)),
                  **app_files(version, True)}
            return R.layer_tar(R.with_parents(fs), epoch(era))
        return memo(f"app-{version}@{era}", make)

    def extra(name: str, src: str, limit: int) -> LayerBlob:
        def make() -> bytes:
            fs = {**R.host_tree(src, f"srv/{name}/files", limit=limit),
                  f"srv/{name}/run.sh": Node("f", 0o755, data=f'#!/bin/sh\necho "edgebundle bench {name}"\n'.encode())}
            return R.layer_tar(R.with_parents(fs), epoch("v1"))
        return memo(name, make)

    run_app = {"Cmd": ["/bin/sh", "/app/main.sh"]}
    e1, e3 = epoch("v1"), epoch("v3")
    app_imgs = app_images(base, python, app, run_app, e1, e3)
    fleet = [
        BenchImage("bench/python", "v1", [base("v1"), python("v1")],
                   {"Cmd": ["/bin/echo", "edgebundle bench python"]}, e1, expect="edgebundle bench python"),
        app_imgs["v1"],
        BenchImage("bench/worker", "v1", [base("v1"), python("v1"), extra("worker", "/usr/lib/python3.11/email", 600_000)],
                   {"Cmd": ["/bin/sh", "/srv/worker/run.sh"]}, e1, expect="edgebundle bench worker"),
        BenchImage("bench/tools", "v1", [base("v1"), extra("tools", "/usr/lib/python3.11/xml", 600_000)],
                   {"Cmd": ["/bin/sh", "/srv/tools/run.sh"]}, e1, expect="edgebundle bench tools"),
    ]
    return ImageSet("quick", app_imgs, fleet, {"source": "host /usr/lib/python3.11 + /bin/busybox"},
                    extra_images(base, lc, "quick", e1, e3))
