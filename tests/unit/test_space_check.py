"""The disk pre-flight: the estimate, where the runtime keeps its data, the check, and a
full disk met anyway -- through the seams (a ``Disk`` answering statvfs, recorded
``ctr plugins ls -d`` and ``GET /info``, the modelled daemons of ``fake_runtimes``)."""

from __future__ import annotations

import errno
import io
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from edgebundle import space
from edgebundle.cache import BlobCache
from edgebundle.errors import LoadError, SpaceError
from edgebundle.format import read_index
from edgebundle.importer import import_bundle
from edgebundle.importer.storage import (containerd_storage, docker_storage,
                                         parse_plugin_exports, runtime_storage)
from edgebundle.pack import bundle_header, unpacked_bytes, write_bundle
from edgebundle.space import Disk, ImportSpace, Need, Storage, check_packer, estimate, shortfalls
from fake_runtimes import PLUGINS_ROOT, fixture
from test_pack_import import Site, make_plan, pack
from tiny_images import APP, BASE, TOOL, Images

MB = 1000 * 1000
MiB = 1024 * 1024

# What the runtimes said when the disk filled (tests/integration/test_space.py, on a
# tmpfs data root: containerd 1.6.20 extracting a layer, dockerd 20.10.24 loading one).
CTR_ENOSPC = ("write /var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/2/"
              "fs/data/blob.bin: no space left on device: unknown")
DOCKER_ENOSPC = "Error processing tar file(exit status 1): write /data/blob.bin: no space left on device"


class FakeDisk(Disk):
    """Filesystems by mount point: (device id, free bytes); the longest prefix wins."""

    def __init__(self, mounts: Dict[str, Tuple[int, int]]) -> None:
        self.mounts = mounts
        self.asked: List[str] = []

    def _mount(self, path: str) -> Tuple[int, int]:
        best = max((m for m in self.mounts if path == m or path.startswith(m.rstrip("/") + "/")),
                   key=len)
        return self.mounts[best]

    def free(self, path: str) -> int:
        self.asked.append(path)
        return self._mount(path)[1]

    def device(self, path: str) -> int:
        return self._mount(path)[0]

    def nearest(self, path: str) -> str:
        return path

    def visible(self, path: str) -> bool:
        return True


# ---------------------------------------------------------------------------
# Where the runtime keeps its data


def test_containerd_roots_from_the_recorded_plugin_list() -> None:
    plugins = parse_plugin_exports(fixture("ctr_plugins_ls_d.txt"))
    assert plugins[("io.containerd.content.v1", "content")] == {
        "root": f"{PLUGINS_ROOT}/io.containerd.content.v1.content"}
    assert plugins[("io.containerd.metadata.v1", "bolt")]["policy"] == "shared"
    assert plugins[("io.containerd.snapshotter.v1", "native")] == {}  # no exports recorded
    got = containerd_storage(plugins, "overlayfs")
    assert got == Storage("containerd", f"{PLUGINS_ROOT}/io.containerd.content.v1.content",
                          f"{PLUGINS_ROOT}/io.containerd.snapshotter.v1.overlayfs", "containerd")
    # A snapshotter that keeps its data elsewhere (devmapper's thin pool) is not checked
    # against its metadata root; one that exports nothing is not checked either.
    devmapper = dict(plugins)
    devmapper[("io.containerd.snapshotter.v1", "devmapper")] = {"root": "/var/lib/dm-meta"}
    assert containerd_storage(devmapper, "devmapper").unpacked is None
    assert containerd_storage(plugins, "native").unpacked is None
    assert containerd_storage({}, "overlayfs") == Storage("containerd", None, None, "containerd")


def test_containerd_storage_through_ctr(tmp_path: Path) -> None:
    site = Site("containerd", tmp_path)
    site.ctr.root = str(tmp_path / "cdroot")
    got = runtime_storage(site.runtime)
    assert got.content == f"{tmp_path}/cdroot/io.containerd.content.v1.content"
    assert ["plugins", "ls", "-d"] in site.ctr.calls


def test_docker_root_from_the_recorded_info() -> None:
    info = json.loads(fixture("docker_get_info.body"))
    got = docker_storage(info)
    root = info["DockerRootDir"]
    assert got == Storage("docker", f"{root}/tmp", f"{root}/overlay2", "docker")
    assert docker_storage({"Driver": "overlay2"}) == Storage("docker", None, None, "docker")
    assert docker_storage({"DockerRootDir": "relative"}).content is None
    assert docker_storage({"DockerRootDir": "/d", "Driver": "../x"}).unpacked == "/d"


# ---------------------------------------------------------------------------
# The estimate and the check


def test_estimate_uses_the_header_or_guesses() -> None:
    assert estimate(100, 250, "blob") == space.Estimate(100, 250, True)
    assert estimate(100, None, "blob") == space.Estimate(100, 250, False)  # gzip ~2.5x
    assert estimate(100, None, "tar") == space.Estimate(100, 100, False)  # tars are tars


def test_needs_on_one_filesystem_add_up_and_keep_a_margin() -> None:
    disk = FakeDisk({"/": (1, 10**12), "/data": (2, 100 * MB)})
    needs = [Need("/data/content", "content store", content=45 * MB),
             Need("/data/snap", "snapshots", unpacked=45 * MB)]
    (short,) = shortfalls(needs, disk)  # 90 MB + 16 MiB margin > 100 MB
    assert (short.free, short.content, short.unpacked, short.margin) == (100 * MB, 45 * MB, 45 * MB,
                                                                        16 * MiB)
    assert short.where == "content store and snapshots at /data"
    # Apart, each fits.
    disk = FakeDisk({"/": (1, 10**12), "/data": (2, 100 * MB), "/data/snap": (3, 100 * MB)})
    assert shortfalls(needs, disk) == []
    # The margin grows with the bundle: 5% of 1 GB is more than 16 MiB.
    assert space.margin(1000 * MB) == 50 * MB


def test_a_path_that_cannot_be_examined_is_not_a_refusal(tmp_path: Path) -> None:
    class Unreadable(Disk):
        def device(self, path: str) -> int:
            raise PermissionError(errno.EACCES, "Permission denied")

    assert shortfalls([Need(str(tmp_path), "x", content=10**15)], Unreadable()) == []
    # A directory not made yet is judged by the filesystem it will be made on.
    assert space.existing(str(tmp_path / "no" / "such")) == str(tmp_path)


def test_the_refusal_has_both_numbers_and_a_hint() -> None:
    disk = FakeDisk({"/": (1, 1200 * MB)})
    guard = ImportSpace(lambda: Storage("containerd", "/var/lib/containerd/c",
                                        "/var/lib/containerd/s", "containerd"), disk)
    with pytest.raises(SpaceError) as err:
        guard.preflight("b.ebundle", 1100 * MB, 2300 * MB, "blob")
    assert err.value.exit_code == 14
    assert err.value.message == (
        "containerd content store and snapshots at /var/lib/containerd has 1.2 GB free; "
        "bundle b.ebundle needs about 3.6 GB (1.1 GB content + 2.3 GB unpacked + 170.0 MB kept free)")
    assert "remove unused images" in (err.value.hint or "")
    assert "--no-space-check" in (err.value.hint or "")
    # Without unpacked_bytes the message says the unpack was estimated.
    with pytest.raises(SpaceError, match=r"bundle b.ebundle \(unpacked size estimated\) needs"):
        guard.preflight("b.ebundle", 1100 * MB, None, "blob")
    guard.preflight("b.ebundle", 100 * MB, 300 * MB, "blob")  # fits


def test_a_root_not_visible_here_is_not_checked() -> None:
    """An importer in a container given only the socket: /var/lib/containerd is not there,
    and "/" here is another filesystem."""
    class Elsewhere(FakeDisk):
        def visible(self, path: str) -> bool:
            return path.startswith("/here")

    disk = Elsewhere({"/": (1, 0)})
    guard = ImportSpace(lambda: Storage("containerd", "/var/lib/containerd/c", "/here/s",
                                        "containerd"), disk)
    assert guard.storage == Storage("containerd", None, "/here/s", "containerd")
    with pytest.raises(SpaceError, match="snapshots at /here/s has 0 B free"):
        guard.preflight("b", 10, 10, "blob")


def test_unchecked_and_unknown_storage_pass() -> None:
    disk = FakeDisk({"/": (1, 0)})
    ImportSpace(lambda: Storage("docker", None, None, "docker"), disk).preflight("b", 10**12, 0, "tar")
    ImportSpace(lambda: Storage("docker", "/d/tmp", "/d/overlay2", "docker"),
                space.UNCHECKED).preflight("b", 10**12, 10**12, "tar")


# ---------------------------------------------------------------------------
# Through the importer, with the real loaders over modelled daemons


def _bundle(tmp: Path, runtime: str, *, lie: bool = False) -> Path:
    built = Images(BlobCache(tmp / f"cache-{runtime}"))
    img = built.image("example.test/shop/app:v1", [BASE, APP])
    plan = make_plan([img], runtime)
    out = tmp / f"{runtime}.ebundle"
    if not lie:
        pack(plan, built.cache, out)
        return out
    import edgebundle.pack as pack_module

    mp = pytest.MonkeyPatch()
    mp.setattr(pack_module, "content_bytes", lambda plan: 0)
    mp.setattr(pack_module, "unpacked_bytes", lambda plan: 0)
    try:
        pack(plan, built.cache, out)
    finally:
        mp.undo()
    return out


def _guard(site: Site, free: int) -> Tuple[ImportSpace, FakeDisk]:
    disk = FakeDisk({"/": (1, free)})
    if site.kind == "containerd":
        storage = Storage("containerd", "/cd/content", "/cd/snapshots", "containerd")
    else:
        storage = Storage("docker", "/dk/tmp", "/dk/overlay2", "docker")
    return ImportSpace(lambda: storage, disk, tempdir=lambda: "/tmp"), disk


def _sent(site: Site) -> int:
    return len(site.ctr.imports) if site.kind == "containerd" else len(site.engine.loads) + \
        site.engine.aborted


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_refused_before_the_runtime_sees_a_byte(tmp_path: Path, runtime: str) -> None:
    out = _bundle(tmp_path, runtime)
    site = Site(runtime, tmp_path)
    guard, disk = _guard(site, 10 * MiB)  # less than the 16 MiB margin alone
    with open(out, "rb") as fh, pytest.raises(SpaceError, match=r"has 10\.5 MB free; bundle b needs"):
        import_bundle(fh, "b", site.runtime, space=guard)
    assert _sent(site) == 0 and site.names() == set()
    if runtime == "containerd":
        assert site.ctr.content == {}
    assert disk.asked  # statvfs was asked, not skipped


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_the_preflight_judges_the_whole_bundle(tmp_path: Path, runtime: str) -> None:
    """Room for any one entry (and the unpack), not for all of them: refused up front."""
    out = _bundle(tmp_path, runtime)
    info = read_index(out)
    header = info.header
    assert header.unpacked_bytes is not None
    biggest = max(e.size for e in info.index.entries)
    assert header.content_bytes > biggest + 1
    site = Site(runtime, tmp_path)
    guard, _ = _guard(site, space.MIN_MARGIN + header.unpacked_bytes + biggest + 1)
    with open(out, "rb") as fh, pytest.raises(SpaceError, match=r"bundle b needs about"):
        import_bundle(fh, "b", site.runtime, space=guard)
    assert _sent(site) == 0 and site.names() == set()


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_a_header_that_understates_is_caught_per_entry(tmp_path: Path, runtime: str) -> None:
    out = _bundle(tmp_path, runtime, lie=True)
    assert read_index(out).header.content_bytes == 0
    site = Site(runtime, tmp_path)
    guard, _ = _guard(site, 16 * MiB + 100)  # the pre-flight (0 bytes + margin) passes
    with open(out, "rb") as fh, pytest.raises(SpaceError, match=r"bundle b entry sha256:\w+ needs"):
        import_bundle(fh, "b", site.runtime, space=guard)
    assert site.names() == set()
    if runtime == "docker":
        site.engine.join()
        assert site.engine.images == {}


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_enospc_in_the_runtime_is_one_space_error(tmp_path: Path, runtime: str) -> None:
    out = _bundle(tmp_path, runtime)
    site = Site(runtime, tmp_path)
    if runtime == "containerd":
        site.ctr.unpack_fails_with = CTR_ENOSPC
    else:
        site.engine.load_fails_with = DOCKER_ENOSPC
    guard, _ = _guard(site, 10**12)
    with open(out, "rb") as fh, pytest.raises(SpaceError) as err:
        import_bundle(fh, "b", site.runtime, space=guard)
    where = "/cd" if runtime == "containerd" else "/dk"
    assert err.value.message.startswith(f"the disk filled while importing bundle b into {runtime} "
                                        f"at {where} (")
    assert "no space left on device" in err.value.message
    assert err.value.message.endswith("nothing was imported")
    assert "\n" not in str(err.value)
    real = site.names() - {n for n in site.names() if n.startswith("import.edgebundle.invalid/")}
    assert real == set()  # the real name never appeared
    # Without a guard the runtime's own error stands (the loaders are unchanged).
    site = Site(runtime, tmp_path)
    if runtime == "containerd":
        site.ctr.unpack_fails_with = CTR_ENOSPC
    else:
        site.engine.load_fails_with = DOCKER_ENOSPC
    with open(out, "rb") as fh, pytest.raises(LoadError, match="no space left"):
        import_bundle(fh, "b", site.runtime)


def test_our_own_spool_filling_the_temp_dir_names_it() -> None:
    guard = ImportSpace(lambda: Storage("docker", None, None, "docker"), FakeDisk({"/": (1, 0)}),
                        tempdir=lambda: "/var/tmp")
    full = guard.disk_full(OSError(errno.ENOSPC, "No space left on device"), "b")
    assert full is not None and full.message.startswith("the temp dir /var/tmp filled")
    assert guard.disk_full(OSError(errno.EPIPE, "Broken pipe"), "b") is None
    assert guard.disk_full(LoadError("ctr: unexpected EOF"), "b") is None
    with pytest.raises(SpaceError, match="temp dir at /var/tmp has 0 B free"):
        guard.before_spool("bundle b delta entry x", 5 * MB)


# ---------------------------------------------------------------------------
# The packer


def test_header_unpacked_bytes_is_the_shipped_tars(tmp_path: Path) -> None:
    built = Images(BlobCache(tmp_path / "cache"))
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    b = built.image("example.test/shop/tool:v1", [BASE, TOOL])
    plan = make_plan([a, b], "containerd")
    tars = {l.digest: l.tar_size for img in (a, b) for l in img.layers}  # BASE once
    assert all(t > 0 for t in tars.values())
    assert unpacked_bytes(plan) == sum(tars.values())
    out = tmp_path / "b.ebundle"
    pack(plan, built.cache, out)
    assert read_index(out).header.unpacked_bytes == sum(tars.values())
    assert bundle_header(plan).to_wire()["unpacked_bytes"] == sum(tars.values())
    # A layer never decompressed (tar_size -1): unknown, and the key is left out.
    from dataclasses import replace

    unknown = replace(a, layers=(replace(a.layers[0], tar_size=-1),) + a.layers[1:])
    plan = make_plan([unknown], "containerd")
    assert unpacked_bytes(plan) is None and "unpacked_bytes" not in bundle_header(plan).to_wire()


def test_packer_refuses_cache_and_output_that_do_not_fit() -> None:
    disk = FakeDisk({"/": (1, 10**12), "/home": (2, 50 * MB), "/stick": (3, 30 * MB)})
    check_packer("/home/eb/cache", 30 * MB, "/stick/b.ebundle", 10 * MB, disk)
    with pytest.raises(SpaceError) as err:
        check_packer("/home/eb/cache", 40 * MB, "/stick/b.ebundle", 20 * MB, disk)
    assert str(err.value).startswith(
        "packer cache at /home/eb/cache has 50.0 MB free; this pack needs about 56.8 MB (40.0 MB "
        "content + 16.8 MB kept free); bundle output at /stick/b.ebundle has 30.0 MB free; this "
        "pack needs about 36.8 MB")
    # Cache and output on one disk: they add up. A stream output counts nothing.
    disk = FakeDisk({"/": (1, 60 * MB)})
    with pytest.raises(SpaceError, match="packer cache and bundle output at /home/eb/cache, "
                       "/stick/b.ebundle has 60.0 MB free; this pack needs about 66.8 MB"):
        check_packer("/home/eb/cache", 30 * MB, "/stick/b.ebundle", 20 * MB, disk)
    check_packer("/home/eb/cache", 30 * MB, None, 20 * MB, disk)


def test_cache_filling_is_a_space_error_and_leaves_no_temp(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cache = BlobCache(tmp_path / "cache")

    class Full(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            raise OSError(errno.ENOSPC, "No space left on device")

    real_fdopen = os.fdopen
    monkeypatch.setattr("edgebundle.files.os.fdopen",
                        lambda fd, mode: (real_fdopen(fd, mode).close(), Full())[1])
    with pytest.raises(SpaceError, match=r"cannot write blob sha256:\w+ into the packer cache at "
                       rf"{tmp_path}/cache: no space left on the device"):
        cache.put_bytes(b"layer bytes")
    assert os.listdir(tmp_path / "cache" / "tmp") == []


# ---------------------------------------------------------------------------
# The CLI: the check is on by default, --no-space-check skips it


def test_cli_import_checks_space_unless_told_not_to(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from test_cli import World

    world = World(tmp_path, capsys)
    bundle = world.pack()
    for plugin in ("io.containerd.content.v1.content", "io.containerd.snapshotter.v1.overlayfs"):
        (world.device / "root" / plugin).mkdir(parents=True)  # containerd makes them at start
    monkeypatch.setattr(space.Disk, "free", lambda self, path: 4096)
    _, err = world.run("import", str(bundle), *world.ctr_args(), code=14)
    # fakectr reports its data root under the device dir, as containerd reports its own
    assert f"containerd content store and snapshots at {world.device}/root has 4.1 kB free" in err
    assert world.device_images() == {}
    out, _ = world.run("import", str(bundle), *world.ctr_args(), "--no-space-check", "--json")
    assert json.loads(out)["imported"] == [world.app.name, world.tool.name]


def test_an_unexpected_full_disk_is_one_line_not_an_internal_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A write no check foresaw (say, the packer's delta work files) fills the disk."""
    from edgebundle.cli import main as cli

    def full(args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/home/eb/cache/tmp/deltas-1/x")

    monkeypatch.setattr(cli, "dispatch", full)
    assert cli.main(["plan", "m.yaml", "--site", "gw"]) == 14
    err = capsys.readouterr().err
    assert err == ("edgebundle: error: the disk filled writing /home/eb/cache/tmp/deltas-1/x: No "
                   "space left on device (hint: free space there and run the command again)\n")


def test_a_delta_checks_its_rebuilt_size_and_the_spool_of_its_tar_bases(tmp_path: Path) -> None:
    """Before a delta whose ops copy ranges of a base layer's tar is applied: the rebuilt
    tar must fit where the runtime keeps data, and the base tars where they are spooled."""
    from dataclasses import replace as dc_replace

    from edgebundle.bases import DeltaPlanner
    from edgebundle.holdings import Inventory as Inv
    from test_delta_plan import LIB_V1, LIB_V2, held

    cache = BlobCache(tmp_path / "cache")
    imgs = Images(cache)
    v1 = imgs.image("example.test/app:v1", [BASE, LIB_V1])
    v2 = imgs.image("example.test/app:v2", [BASE, LIB_V2])
    inv = held(v1)  # ... and the device can rebuild its layers' tars (containerd: from blobs)
    inv = dc_replace(inv, images=tuple(dc_replace(i, layers=tuple(dc_replace(l, tar=True)
                                                                  for l in i.layers))
                                       for i in inv.images))
    plain = make_plan([v2], "containerd", inv)
    out = tmp_path / "delta.ebundle"
    with DeltaPlanner(cache) as planner:
        plan = planner.apply(plain, inv)
        (lp,) = [lp for lp in plan.images[0].layers if lp.delta is not None]
        assert any(b.tar for b in lp.delta.head.bases), "the delta must copy from a base tar"
        with open(out, "wb") as fh:
            write_bundle(plan, cache, fh, level=3, delta_ops=planner.ops)
    target = lp.delta.head.target_size

    class Device:
        """Holds v1; wants every entry; records what the importer asked of it."""

        kind, namespace = "containerd", "k8s.io"

        def __init__(self) -> None:
            self.asked: List[str] = []

        def inventory(self) -> Inv:
            return inv

        def loader(self, inv: Inv, platform: str) -> "Device":
            return self

        def wants(self, head: object) -> bool:
            return True

        def add(self, digest: str, size: int, pieces: object) -> None:
            self.asked.append(f"add {digest}")
            for _ in pieces:  # type: ignore[attr-defined]
                pass

        def abort(self) -> None:
            self.asked.append("abort")

        def base_tree(self, chain_id: str, diff_id: str) -> object:
            self.asked.append("base_tree")
            raise AssertionError("the spool check comes first")

    def attempt(runtime_free: int, temp_free: int) -> SpaceError:
        disk = FakeDisk({"/": (1, runtime_free), "/tmp": (2, temp_free)})
        guard = ImportSpace(lambda: Storage("containerd", "/cd/c", "/cd/s", "containerd"), disk,
                            tempdir=lambda: "/tmp")
        device = Device()
        with open(out, "rb") as fh, pytest.raises(SpaceError) as err:
            import_bundle(fh, "b", device, space=_Preflighted(guard))  # type: ignore[arg-type]
        assert "base_tree" not in device.asked and device.asked[-1] == "abort"
        return err.value

    err = attempt(runtime_free=target, temp_free=10**12)  # the rebuilt tar + 1 B reserve
    assert re.search(r"bundle b delta entry sha256:\w+ needs", err.message), err.message
    err = attempt(runtime_free=10**12, temp_free=target)
    assert err.message.startswith("temp dir at /tmp has "), err.message


class _Preflighted(ImportSpace):
    """The guard with its whole-bundle pre-flight passed (the per-entry checks stay)."""

    def __init__(self, inner: ImportSpace) -> None:
        self.__dict__.update(inner.__dict__)

    def preflight(self, name: str, content_bytes: int, unpacked_bytes: object,
                  layer_form: str) -> None:
        self._reserve = 1  # a 1-byte margin, no unpack reserved: only the entry counts
