"""pack.write_bundle -> importer.import_bundle through the real loaders.

The runtimes are edgebundle's own (``ContainerdRuntime`` over ``Ctr``, ``DockerRuntime``
over ``DockerAPI``); only the daemons behind their I/O seams are models
(``fake_runtimes``): containerd is handed ctr's argv and the OCI tar on stdin, dockerd
gets the HTTP request with the chunked docker-archive. Inputs are real: small layer tars
made with ``tarfile``, gzipped with mtime=0, their real diff_ids, configs and manifests,
all in a ``BlobCache``.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import pytest
import xxhash

from edgebundle.cache import BlobCache
from edgebundle.errors import BundleFormatError, CacheError, LoadError, PrerequisiteError
from edgebundle.format import (CODEC_STORED, CODEC_ZSTD, END_MAGIC, FORMAT_VERSION, MAGIC, TAG_ENTRY,
                               TAG_FOOTER, TAG_HEADER, TAG_INDEX, BundleReader, read_index)
from edgebundle.format.framing import CHUNK_HEAD, U32, U64, pack_record
from edgebundle.holdings import Inventory
from edgebundle.image import ResolvedImage
from edgebundle.importer import import_bundle
from edgebundle.importer.containerd import TEMP_PREFIX, ContainerdRuntime, Ctr
from edgebundle.importer.docker import DockerAPI, DockerRuntime
from edgebundle.oci import MT_DOCKER_CONFIG, MT_DOCKER_LAYER_GZIP, MT_OCI_INDEX, Descriptor
from edgebundle.pack import image_record, write_bundle
from edgebundle.plan import Plan, plan_bundle
from fake_runtimes import FakeContainerd, FakeEngine
from tiny_images import APP, BASE, EXTRA, TOOL, Images


# ---------------------------------------------------------------------------
# Real runtimes over modelled daemons (fake_runtimes: the I/O seams, not our logic)


class Site:
    """A real ContainerdRuntime/DockerRuntime whose daemon is a model."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        if kind == "containerd":
            self.ctr = FakeContainerd("k8s.io")
            sock = tmp / "containerd.sock"
            sock.touch()
            self.runtime: Any = ContainerdRuntime(Ctr(str(sock), "k8s.io", runner=self.ctr))
        else:
            self.engine = FakeEngine()
            self.runtime = DockerRuntime(DockerAPI("unix:///nowhere/docker.sock", dial=self.engine.dial))

    def names(self) -> Set[str]:
        if self.kind == "containerd":
            return self.ctr.real_names()
        return {t for img in self.engine.images.values() for t in img.tags}


def do_import(path: Path, site: Site) -> Any:
    with open(path, "rb") as fh:
        return import_bundle(fh, path.name, site.runtime)


def pack(plan: Plan, cache: BlobCache, out: Path, **kw: Any) -> Any:
    with open(out, "wb") as fh:
        return write_bundle(plan, cache, fh, level=3, **kw)


def make_plan(images: Sequence[ResolvedImage], runtime: str,
              inv: Optional[Inventory] = None) -> Plan:
    ns = "k8s.io" if runtime == "containerd" else None
    return plan_bundle("gw-01", images, inv or Inventory.empty(runtime, ns), runtime=runtime,
                       namespace=ns, platform="linux/amd64")


@pytest.fixture
def built(tmp_path: Path) -> Images:
    return Images(BlobCache(tmp_path / "cache"))


def entry_digests(path: Path) -> List[str]:
    return [e.digest for e in read_index(path).index.entries]


def members(load: List[Tuple[str, bytes]]) -> List[str]:
    return [name for name, _ in load]


# ---------------------------------------------------------------------------
# containerd


def test_containerd_full_then_nothing(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP], index=True)
    b = built.image("example.test/shop/tool:v2", [BASE, TOOL])
    out = tmp_path / "full.ebundle"
    res = pack(make_plan([a, b], "containerd"), built.cache, out)
    # a: index, manifest, config, base, app; b: manifest, config, tool (base ships once)
    assert res.entries == 8 and res.images == 2 and res.bundle_bytes == out.stat().st_size
    digests = entry_digests(out)
    assert len(set(digests)) == 8
    assert a.layers[0].digest in digests and a.layers[0].diff_id not in digests

    site = Site("containerd", tmp_path)
    result = do_import(out, site)
    (imp,) = site.ctr.imports
    assert imp.argv[imp.argv.index("--platform") + 1] == "linux/amd64"
    # The OCI layout: oci-layout first (ctr's lease exists once it is read), every
    # blob, index.json last.
    assert imp.members[0] == "oci-layout" and imp.members[-1] == "index.json"
    assert {m for m in imp.members[1:-1]} == {"blobs/sha256/" + d[7:] for d in digests}
    for digest in digests:
        assert site.ctr.content[digest] == built.cache.read_bytes(digest)  # byte for byte
    assert [m["digest"] for m in imp.index["manifests"]] == [a.top.digest, b.top.digest]
    assert site.ctr.images[a.name] == (a.top.media_type, a.top.digest)
    assert site.ctr.images[b.name] == (b.top.media_type, b.top.digest)
    # No temporary name left behind; in k8s.io, also the repo@digest records CRI keeps.
    assert site.names() == {a.name, b.name, f"{a.ref.repository}@{a.top.digest}",
                            f"{b.ref.repository}@{b.top.digest}"}
    assert result.imported == [a.name, b.name]
    assert result.already_present == []
    assert result.entries_sent == 8 and result.entries_skipped == 0
    assert result.bundle_bytes == out.stat().st_size
    assert result.inventory is not None and {i.name for i in result.inventory.images} == site.names()
    assert all(i.complete for i in result.inventory.images)

    again = do_import(out, site)
    assert len(site.ctr.imports) == 1  # no ctr import started: nothing to import
    assert again.imported == []
    assert again.already_present == [a.name, b.name]
    assert again.entries_sent == 0 and again.entries_skipped == 8


def test_containerd_imports_under_temporary_names_then_checks_then_renames(
        tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP], index=True)
    out = tmp_path / "b.ebundle"
    pack(make_plan([a], "containerd"), built.cache, out)
    site = Site("containerd", tmp_path)
    do_import(out, site)
    (imp,) = site.ctr.imports
    (desc,) = imp.index["manifests"]
    temp = desc["annotations"]["io.containerd.image.name"]
    assert temp.startswith(TEMP_PREFIX) and temp != a.name
    # containerd created only the temporary name; the real one came by tag, after a
    # look at content and snapshots; the temporary name was then removed.
    assert site.ctr.history == [("create", temp), ("tag", temp, a.name),
                                ("tag", temp, f"{a.ref.repository}@{a.top.digest}"), ("rm", temp)]
    import_at = site.ctr.calls.index(next(c for c in site.ctr.calls if c[:2] == ["images", "import"]))
    tag_at = site.ctr.calls.index(["images", "tag", "--force", temp, a.name])
    between = site.ctr.calls[import_at + 1:tag_at]
    assert ["content", "ls", "-q"] in between and ["images", "ls"] in between
    assert any(c[0] == "snapshots" for c in between)


@pytest.mark.parametrize("damage", ["top snapshot", "layer blob and chain", "config blob"])
def test_containerd_incomplete_after_import_is_never_named(tmp_path: Path, built: Images,
                                                            damage: str) -> None:
    """ctr said yes, but the tree is not runnable (a GC raced us): no real name appears."""
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    out = tmp_path / "b.ebundle"
    pack(make_plan([a], "containerd"), built.cache, out)
    site = Site("containerd", tmp_path)

    def gc(model: FakeContainerd) -> None:
        if damage == "top snapshot":
            model.snapshots.discard(a.chain_ids[-1])
        elif damage == "layer blob and chain":
            model.content.pop(a.layers[0].digest)
            model.snapshots.discard(a.chain_ids[0])
        else:
            model.content.pop(a.config.digest)

    site.ctr.after_import = gc
    with pytest.raises(LoadError, match="left incomplete"):
        do_import(out, site)
    assert site.names() == set()
    assert site.ctr.images == {}  # the temporary name is gone too
    assert not any(call[:2] == ["images", "tag"] for call in site.ctr.calls)


def test_containerd_failed_unpack_leaves_no_image(tmp_path: Path, built: Images) -> None:
    """A real containerd keeps the record of an image whose unpack failed; we remove it."""
    a = built.image("example.test/shop/app:v1", [BASE, APP, EXTRA])
    # The packer believed the device holds the EXTRA layer's blob; it does not.
    inv = Inventory(runtime="containerd", namespace="k8s.io", blobs=frozenset({a.layers[2].digest}))
    out = tmp_path / "b.ebundle"
    pack(make_plan([a], "containerd", inv), built.cache, out)
    site = Site("containerd", tmp_path)
    site.ctr.content[a.layers[2].digest] = built.cache.read_bytes(a.layers[2].digest)

    # The device held it at report time, but it vanishes once the prerequisite check passed.
    original = site.ctr._unpack

    def unpack(desc: Dict[str, Any], platform: str) -> Optional[str]:
        site.ctr.content.pop(a.layers[2].digest, None)
        return original(desc, platform)

    site.ctr._unpack = unpack  # type: ignore[method-assign]
    with pytest.raises(LoadError, match="refused the import"):
        do_import(out, site)
    assert site.ctr.images == {}


def test_containerd_one_present_one_new(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    b = built.image("example.test/shop/tool:v2", [BASE, TOOL])
    first = tmp_path / "a.ebundle"
    pack(make_plan([a], "containerd"), built.cache, first)
    site = Site("containerd", tmp_path)
    do_import(first, site)
    out = tmp_path / "b.ebundle"
    pack(make_plan([a, b], "containerd"), built.cache, out)
    result = do_import(out, site)
    assert result.already_present == [a.name]
    assert result.imported == [b.name]
    imp = site.ctr.imports[-1]
    sent = {"sha256:" + m.rsplit("/", 1)[1] for m in imp.members if m.startswith("blobs/")}
    # The base layer is in the content store already: verified, not sent again.
    assert sent == {b.manifest.digest, b.config.digest, b.layers[1].digest}
    assert [m["digest"] for m in imp.index["manifests"]] == [b.top.digest]
    assert result.entries_sent == 3 and result.entries_skipped == 4  # a: manifest, config, 2 layers


def test_pinned_image_gets_its_top_digest_name(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app", [BASE], index=True, pinned=True)
    assert a.name == f"example.test/shop/app@{a.top.digest}"
    out = tmp_path / "b.ebundle"
    pack(make_plan([a], "containerd"), built.cache, out)
    site = Site("containerd", tmp_path)
    assert do_import(out, site).imported == [a.name]
    assert site.ctr.images[a.name] == (a.top.media_type, a.top.digest)


# ---------------------------------------------------------------------------
# Docker


def test_docker_full_then_nothing(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP], index=True)
    p = built.image("example.test/shop/pinned", [BASE, EXTRA], pinned=True)
    out = tmp_path / "d.ebundle"
    plan = make_plan([a, p], "docker")
    assert plan.layer_form == "tar"
    pack(plan, built.cache, out)
    digests = entry_digests(out)
    for layer in a.layers + p.layers:
        assert layer.diff_id in digests and layer.digest not in digests
    info = read_index(out)
    assert info.header.layer_form == "tar"
    assert {l.form for r in info.index.images for l in r.layers} == {"tar"}

    site = Site("docker", tmp_path)
    result = do_import(out, site)
    site.engine.join()
    (load,) = site.engine.loads
    files = dict(load)
    # docker load gets configs and layer tars, never manifests or indexes
    assert set(files) - {"manifest.json"} == {"blobs/sha256/" + d[7:] for d in (
        a.config.digest, p.config.digest, a.layers[0].diff_id, a.layers[1].diff_id, p.layers[1].diff_id)}
    assert members(load)[-1] == "manifest.json"  # last: a cut stream loads nothing
    for layer in a.layers + p.layers:
        assert files["blobs/sha256/" + layer.diff_id[7:]] == built.tars[layer.diff_id]
    manifest = json.loads(files["manifest.json"])
    assert [m["RepoTags"] for m in manifest] == [
        ["example.test/shop/app:v1"], [f"example.test/shop/pinned:sha256-{p.top.digest[7:]}"]]
    assert manifest[1]["Layers"] == ["blobs/sha256/" + l.diff_id[7:] for l in p.layers]
    assert manifest[1]["Config"] == "blobs/sha256/" + p.config.digest[7:]
    assert result.imported == [a.name, p.name]
    # Image ID == config digest
    assert {img.id for img in site.engine.images.values()} == {a.config.digest, p.config.digest}

    again = do_import(out, site)
    assert len(site.engine.loads) == 1
    assert again.already_present == [a.name, p.name] and again.entries_sent == 0


def test_docker_load_request_is_chunked_http(tmp_path: Path, built: Images) -> None:
    """The archive goes out as HTTP/1.1 chunked encoding the daemon can parse strictly."""
    a = built.image("example.test/shop/app:v1", [BASE, APP, EXTRA])
    out = tmp_path / "d.ebundle"
    pack(make_plan([a], "docker"), built.cache, out)
    site = Site("docker", tmp_path)
    do_import(out, site)
    site.engine.join()  # raises ChunkError if the framing were off
    load = next(r for r in site.engine.requests if r.method == "POST")
    assert load.chunked and load.headers["content-type"] == "application/x-tar"
    assert load.path == "/images/load?quiet=1"
    assert tarfile.open(fileobj=io.BytesIO(load.body)).getnames()[-1] == "manifest.json"


def test_docker_prerequisites_by_chain(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP, EXTRA])
    chains = a.chain_ids
    inv = Inventory(runtime="docker", chains=frozenset(chains[:2]))
    out = tmp_path / "d.ebundle"
    pack(make_plan([a], "docker", inv), built.cache, out)
    assert len(read_index(out).header.prerequisites) == 2

    site = Site("docker", tmp_path)
    base = built.image("example.test/shop/base:v1", [BASE])
    site.engine.add_image(built.cache.read_bytes(base.config.digest), ["example.test/shop/base:v1"])
    with pytest.raises(PrerequisiteError) as info:
        do_import(out, site)
    assert info.value.missing == [a.layers[1].diff_id]
    assert site.engine.loads == []

    two = built.image("example.test/shop/two:v1", [BASE, APP])
    site.engine.add_image(built.cache.read_bytes(two.config.digest), ["example.test/shop/two:v1"])
    result = do_import(out, site)
    assert result.imported == [a.name]
    names = members(site.engine.loads[0])
    assert "blobs/sha256/" + a.layers[2].diff_id[7:] in names
    assert "blobs/sha256/" + a.layers[0].diff_id[7:] not in names


# ---------------------------------------------------------------------------
# Refusals


def test_missing_prerequisites_refused_before_anything(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP, EXTRA])
    inv = Inventory(runtime="containerd", namespace="k8s.io",
                    blobs=frozenset({a.layers[0].digest, a.layers[1].digest}))
    out = tmp_path / "delta.ebundle"
    pack(make_plan([a], "containerd", inv), built.cache, out)
    prereqs = read_index(out).header.prerequisites
    assert [p.digest for p in prereqs] == [a.layers[0].digest, a.layers[1].digest]
    assert a.layers[0].digest not in entry_digests(out)

    site = Site("containerd", tmp_path)
    with pytest.raises(PrerequisiteError) as info:
        do_import(out, site)
    err = info.value
    assert err.exit_code == 6
    assert err.missing == [a.layers[0].digest, a.layers[1].digest]
    assert a.layers[0].digest in str(err) and a.layers[1].digest in str(err)
    assert site.ctr.imports == [] and site.ctr.images == {}

    # One held as a blob, the other as an unpacked chain: both satisfy containerd.
    site.ctr.content[a.layers[0].digest] = built.cache.read_bytes(a.layers[0].digest)
    site.ctr.snapshots.update(a.chain_ids[:2])
    result = do_import(out, site)
    assert result.imported == [a.name]
    sent = site.ctr.imports[0].members
    assert "blobs/sha256/" + a.layers[2].digest[7:] in sent
    assert "blobs/sha256/" + a.layers[0].digest[7:] not in sent


def flip_in_last_entry(path: Path) -> None:
    info = read_index(path)
    offset = info.index.entries[-1].offset
    data = bytearray(path.read_bytes())
    body_len = int.from_bytes(data[offset + 1:offset + 5], "big")
    first_payload = offset + 5 + body_len + 8 + 12
    data[first_payload + 1] ^= 0x20
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_corrupted_entry_aborts(tmp_path: Path, built: Images, runtime: str) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    out = tmp_path / "b.ebundle"
    pack(make_plan([a], runtime), built.cache, out)
    flip_in_last_entry(out)
    site = Site(runtime, tmp_path)
    with pytest.raises(BundleFormatError, match="corrupt"):
        do_import(out, site)
    assert site.names() == set()
    if runtime == "containerd":
        # Ended gracefully (not killed): ctr failed on the poisoned tar and its lease
        # went with it; the partial ingests were collected at once.
        assert [i.returncode for i in site.ctr.imports] == [1]
        assert site.ctr.leases == {} and site.ctr.collections >= 1
        assert site.ctr.images == {}
    else:
        site.engine.join()
        assert site.engine.images == {} and site.engine.loads == []
        assert site.engine.aborted == 1  # the load request was cut off mid-archive


def test_corrupted_skipped_entry_aborts(tmp_path: Path, built: Images) -> None:
    """Damage in an entry the loader does not want (a manifest, for Docker) still aborts."""
    a = built.image("example.test/shop/app:v1", [BASE])
    out = tmp_path / "b.ebundle"
    pack(make_plan([a], "docker"), built.cache, out)
    entries = read_index(out).index.entries
    pos = [e.digest for e in entries].index(a.manifest.digest)
    data = bytearray(out.read_bytes())
    off = entries[pos].offset
    body_len = int.from_bytes(data[off + 1:off + 5], "big")
    data[off + 5 + body_len + 8 + 12] ^= 1
    out.write_bytes(bytes(data))
    site = Site("docker", tmp_path)
    with pytest.raises(BundleFormatError):
        do_import(out, site)
    site.engine.join()
    assert site.engine.images == {} and site.engine.loads == []


def test_truncated_bundle_aborts_after_all_entries(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    out = tmp_path / "b.ebundle"
    pack(make_plan([a], "containerd"), built.cache, out)
    out.write_bytes(out.read_bytes()[:-10])
    site = Site("containerd", tmp_path)
    with pytest.raises(BundleFormatError, match="truncated"):
        do_import(out, site)
    assert [i.returncode for i in site.ctr.imports] == [1] and site.ctr.leases == {}
    assert site.ctr.images == {}


def test_containerd_refuses_tar_form(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE])
    out = tmp_path / "d.ebundle"
    pack(make_plan([a], "docker"), built.cache, out)
    site = Site("containerd", tmp_path)
    with pytest.raises(LoadError, match="tar"):
        do_import(out, site)
    assert site.ctr.calls == []  # refused before even asking containerd


def test_import_checks_the_runtime_afterwards(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE])
    out = tmp_path / "b.ebundle"
    pack(make_plan([a], "docker"), built.cache, out)
    site = Site("docker", tmp_path)
    site.engine.forget_loads = True
    with pytest.raises(LoadError, match="does not hold"):
        do_import(out, site)
    assert len(site.engine.loads) == 1


@pytest.mark.parametrize("runtime,message", [
    ("docker", "closed the load stream|docker load failed"),  # the daemon hangs up
    ("containerd", "stopped reading"),  # ctr dies
])
def test_runtime_going_away_mid_stream_is_a_load_error(tmp_path: Path, built: Images,
                                                       runtime: str, message: str) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, {"big": bytes(range(256)) * 8192}])
    out = tmp_path / "b.ebundle"
    pack(make_plan([a], runtime), built.cache, out)
    site = Site(runtime, tmp_path)
    if runtime == "docker":
        site.engine.hang_up_after = 4096
    else:
        site.ctr.import_dies_after = 4096
    with pytest.raises(LoadError, match=message):
        do_import(out, site)
    assert site.names() == set()


def test_missing_cache_blob_is_a_cache_error(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    built.cache.path(a.layers[1].digest).unlink()  # the plan ships a blob the cache lacks
    with pytest.raises(CacheError, match="missing from the packer cache"):
        write_bundle(make_plan([a], "containerd"), built.cache, io.BytesIO(), level=3)


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_damaged_cache_blob_is_removed_and_reported(tmp_path: Path, built: Images,
                                                    runtime: str) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    path = built.cache.path(a.layers[1].digest)
    path.write_bytes(gzip.compress(b"something else entirely", mtime=0))
    with pytest.raises(CacheError, match="damaged and has been removed"):
        write_bundle(make_plan([a], runtime), built.cache, io.BytesIO(), level=3)
    assert not path.exists()  # the next pack fetches it afresh


def test_damaged_cache_json_is_removed_and_reported(built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE])
    path = built.cache.path(a.config.digest)
    path.write_bytes(b"{}")
    with pytest.raises(CacheError, match="damaged"):
        write_bundle(make_plan([a], "containerd"), built.cache, io.BytesIO(), level=3)
    assert not path.exists()


def test_bundle_reads_back_through_reader(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP], index=True)
    out = tmp_path / "b.ebundle"
    pack(make_plan([a], "containerd"), built.cache, out)
    with open(out, "rb") as fh:
        reader = BundleReader(fh)
        codecs = {}
        for entry in reader.entries():
            data = b"".join(entry.chunks())
            assert data == built.cache.read_bytes(entry.digest)
            codecs[entry.digest] = (entry.codec, entry.media_type)
    # JSON is zstd; already-gzipped layer blobs are stored as they are
    assert codecs[a.config.digest] == (CODEC_ZSTD, MT_DOCKER_CONFIG)
    assert codecs[a.top.digest] == (CODEC_ZSTD, MT_OCI_INDEX)
    assert codecs[a.layers[0].digest] == (CODEC_STORED, MT_DOCKER_LAYER_GZIP)
    assert [s.to_wire() for s in reader.header.images] == [_summary(a)]
    assert reader.index is not None and reader.index.images == (image_record(a, "blob"),)


def test_header_counts_content_bytes_and_progress_sees_them(tmp_path: Path,
                                                            built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP], index=True)
    out = tmp_path / "b.ebundle"
    pack(make_plan([a], "docker"), built.cache, out)
    info = read_index(out)
    decoded = sum(e.size for e in info.index.entries)
    assert info.header.content_bytes == decoded

    class Bar:
        def __init__(self, total: Optional[int]) -> None:
            self.total = total
            self.n = 0

        def update(self, n: int) -> None:
            self.n += n

    bars: List[Bar] = []

    def make_bar(total: Optional[int]) -> Bar:
        bars.append(Bar(total))
        return bars[-1]

    site = Site("docker", tmp_path)
    with open(out, "rb") as fh:
        import_bundle(fh, "b", site.runtime, progress=make_bar)
    assert len(bars) == 1
    assert bars[0].total == decoded and bars[0].n == decoded


# ---------------------------------------------------------------------------
# Bundles that break the format: refused before any image exists


def _summary(img: ResolvedImage) -> Dict[str, Any]:
    return {"name": img.name, "top": img.top.digest, "config": img.config.digest}


def _all_blobs(img: ResolvedImage) -> List[Descriptor]:
    return list(img.json_blobs) + [Descriptor(l.media_type, l.digest, l.size) for l in img.layers]


def _handmade(path: Path, cache: BlobCache, header_images: List[Any], records: List[Any],
              blobs: Sequence[Descriptor], runtime: str = "containerd") -> None:
    """A bundle built byte by byte from FORMAT.md (the writer refuses to write such things)."""
    header = {"created": "2026-01-01T00:00:00Z", "tool": "test", "required_features": [],
              "volume": None, "site": "gw-01", "runtime": runtime,
              "namespace": "k8s.io" if runtime == "containerd" else None,
              "platform": "linux/amd64", "layer_form": "blob" if runtime == "containerd" else "tar",
              "prerequisites": [], "images": header_images, "content_bytes": 0}
    out = bytearray(MAGIC + FORMAT_VERSION.to_bytes(2, "big")) + pack_record(TAG_HEADER, header)
    listed = []
    for d in blobs:
        data = cache.read_bytes(d.digest)
        offset = len(out)
        out += pack_record(TAG_ENTRY, {"kind": "blob", "digest": d.digest, "size": len(data),
                                       "codec": CODEC_STORED, "media_type": d.media_type})
        out += CHUNK_HEAD.pack(len(data), xxhash.xxh3_64_intdigest(data)) + data + U32.pack(0)
        listed.append({"digest": d.digest, "kind": "blob", "size": len(data),
                       "codec": CODEC_STORED, "stored_size": len(data), "offset": offset})
    index_offset = len(out)
    out += pack_record(TAG_INDEX, {"entries": listed, "images": records})
    out += bytes([TAG_FOOTER]) + U64.pack(index_offset)
    out += xxhash.xxh3_128_digest(bytes(out)) + END_MAGIC
    path.write_bytes(bytes(out))


def _records_for(img: ResolvedImage, form: str = "blob") -> Dict[str, Any]:
    return image_record(img, form).to_wire()


def _refused(out: Path, site: Site, fragment: str) -> None:
    with pytest.raises(BundleFormatError, match=fragment):
        do_import(out, site)
    assert site.names() == set()
    if site.kind == "containerd":
        assert site.ctr.images == {}
        # ended gracefully, never killed: no lease of ctr's outlives the refusal
        assert all(i.returncode == 1 for i in site.ctr.imports) and site.ctr.leases == {}


def test_handmade_valid_bundle_imports(tmp_path: Path, built: Images) -> None:
    """The crafter below makes valid bundles when nothing is broken."""
    a = built.image("example.test/shop/app:v1", [BASE])
    out = tmp_path / "m.ebundle"
    _handmade(out, built.cache, [_summary(a)], [_records_for(a)], _all_blobs(a))
    assert do_import(out, Site("containerd", tmp_path)).imported == [a.name]


@pytest.mark.parametrize("case,fragment", [
    ("other name", "disagree with the header"),
    ("other top", "differs from the header"),
    ("extra record", "disagree with the header"),
    ("missing record", "disagree with the header"),
])
def test_header_index_image_mismatch(tmp_path: Path, built: Images, case: str, fragment: str) -> None:
    a = built.image("example.test/shop/app:v1", [BASE])
    b = built.image("example.test/shop/app:v2", [BASE, APP])
    if case == "other name":
        records = [_records_for(b)]
    elif case == "other top":
        records = [dict(_records_for(b), name=a.name)]
    elif case == "extra record":
        records = [_records_for(a), _records_for(b)]
    else:
        records = []
    out = tmp_path / "m.ebundle"
    _handmade(out, built.cache, [_summary(a)], records,
              _all_blobs(a) + _all_blobs(b)[:2] + _all_blobs(b)[3:])
    _refused(out, Site("containerd", tmp_path), fragment)


def test_index_record_needing_absent_content(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    out = tmp_path / "m.ebundle"
    _handmade(out, built.cache, [_summary(a)], [_records_for(a)], a.json_blobs)
    _refused(out, Site("containerd", tmp_path), "neither an entry of the bundle, nor rebuilt by one, nor a prerequisite")


def test_malformed_header_images(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE])
    out = tmp_path / "m.ebundle"
    _handmade(out, built.cache, [{"name": a.name}], [_records_for(a)], _all_blobs(a))
    site = Site("containerd", tmp_path)
    with pytest.raises(BundleFormatError, match=r"header images\[0\] field 'top' is missing"):
        do_import(out, site)
    assert site.ctr.calls == []  # refused from the header alone


def _set_layer(key: str, value: Any, form: Optional[str] = None) -> Any:
    def change(rec: Dict[str, Any]) -> None:
        rec["layers"][0][key] = value
        if form:
            rec["layers"][0]["form"] = form
    return change


MALFORMED_RECORDS = {
    "layers not a list": (lambda r: r.update(layers="abc"), "field 'layers' is a string, not a list"),
    "layer not a map": (lambda r: r.update(layers=["abc"]), r"layers\[0\] is a string, not a map"),
    "top not a map": (lambda r: r.update(top=["x"]), "field 'top' is a list, not a map"),
    "top digest a map": (lambda r: r["top"].update(digest={"a": 1}), "field 'digest' is"),
    "config missing": (lambda r: r.pop("config"), "field 'config' is missing"),
    "layer form missing": (lambda r: r["layers"][0].pop("form"), "field 'form' is missing"),
    "layer form unknown": (_set_layer("form", "weird"), "field 'form' is 'weird'"),
    "layer form other than header's": (_set_layer("form", "tar"), "header's layer_form is 'blob'"),
    "layer diff_id missing": (lambda r: r["layers"][0].pop("diff_id"), "field 'diff_id' is missing"),
    "layer digest a list": (_set_layer("digest", ["x"]), "field 'digest' is"),
    "layer digest a map": (_set_layer("digest", {"a": "b"}), "field 'digest' is"),
    "layer digest an int": (_set_layer("digest", 5), "field 'digest' is 5"),
    "layer tar_size a string": (_set_layer("tar_size", "5"), "field 'tar_size' is a string"),
    "platform not a platform": (lambda r: r.update(platform="amd64"), "field 'platform' is 'amd64'"),
    "ref not a reference": (lambda r: r.update(ref="Not A Ref"), "field 'ref' is not a valid image name"),
}


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
@pytest.mark.parametrize("case", sorted(MALFORMED_RECORDS))
def test_malformed_index_record(tmp_path: Path, built: Images, case: str, runtime: str) -> None:
    change, fragment = MALFORMED_RECORDS[case]
    a = built.image("example.test/shop/app:v1", [BASE])
    form = "blob" if runtime == "containerd" else "tar"
    rec = json.loads(json.dumps(_records_for(a, form)))
    if case == "layer form other than header's" and runtime == "docker":
        change, fragment = _set_layer("form", "blob"), "header's layer_form is 'tar'"
    change(rec)
    out = tmp_path / "m.ebundle"
    blobs = list(a.json_blobs) + ([Descriptor(l.media_type, l.digest, l.size) for l in a.layers]
                                  if runtime == "containerd" else [])
    if runtime == "docker":
        for l in a.layers:  # docker bundles carry the tars, by diff_id
            built.cache.put_bytes(built.tars[l.diff_id])
        blobs += [Descriptor("application/vnd.oci.image.layer.v1.tar", l.diff_id, 0) for l in a.layers]
    _handmade(out, built.cache, [_summary(a)], [rec], blobs, runtime)
    _refused(out, Site(runtime, tmp_path), fragment)


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
@pytest.mark.parametrize("bad_name", ["Not A Ref!", "", "example.test/UPPER:v1"])
def test_invalid_image_name_in_bundle(tmp_path: Path, built: Images, bad_name: str,
                                      runtime: str) -> None:
    a = built.image("example.test/shop/app:v1", [BASE])
    rec = dict(_records_for(a), name=bad_name)
    out = tmp_path / "m.ebundle"
    _handmade(out, built.cache, [dict(_summary(a), name=bad_name)], [rec], _all_blobs(a), runtime)
    site = Site(runtime, tmp_path)
    with pytest.raises(BundleFormatError, match="field 'name' is not a valid image name"):
        do_import(out, site)
    assert site.names() == set()
