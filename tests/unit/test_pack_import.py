"""pack.write_bundle -> importer.import_bundle against an in-memory fake runtime.

The fake implements the ``Runtime``/``Loader`` protocols of ``edgebundle.importer``:
it records every call, consumes (and so verifies) what it is given, and can be told
what it already holds. Inputs are real: small layer tars made with ``tarfile``, gzipped
with mtime=0, their real diff_ids, configs and manifests, all in a ``BlobCache``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import pytest

from edgebundle.cache import BlobCache
from edgebundle.errors import BundleFormatError, LoadError, PrerequisiteError, UsageError
from edgebundle.format import CODEC_STORED, CODEC_ZSTD, BundleReader, BundleWriter, read_index
from edgebundle.importer import import_bundle
from edgebundle.model import (
    MT_DOCKER_CONFIG,
    MT_DOCKER_LAYER_GZIP,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    Descriptor,
    HeldImage,
    Inventory,
    Layer,
    Platform,
    ResolvedImage,
    chain_ids,
    docker_tag,
)
from edgebundle.pack import image_record, write_bundle
from edgebundle.plan import Plan, plan_bundle
from edgebundle.reference import normalize_name, parse_reference


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# Real, tiny images


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


# ---------------------------------------------------------------------------
# The fake runtime


class FakeLoader:
    def __init__(self, rt: "FakeRuntime", inv: Inventory, platform: str) -> None:
        self.rt = rt
        self.inv = inv
        self.platform = platform
        self.wanted: List[Tuple[str, Optional[str]]] = []
        self.added: Dict[str, bytes] = {}
        self.committed: Optional[List[dict]] = None
        self.commits = 0
        self.aborted = 0

    def wants(self, digest: str, media_type: Optional[str]) -> bool:
        self.wanted.append((digest, media_type))
        if self.rt.kind == "docker":
            return not (media_type and ("manifest" in media_type or "index" in media_type))
        return digest not in self.rt.blobs

    def add(self, digest: str, size: int, pieces: Any) -> None:
        data = b"".join(pieces)  # running the iterator to its end verifies the entry
        assert len(data) == size
        self.added[digest] = data

    def commit(self, records: Sequence[dict]) -> List[str]:
        self.commits += 1
        self.committed = [dict(r) for r in records]
        if self.rt.forget:
            return [r["name"] for r in records]
        for rec in records:
            self.rt.chains.update(chain_ids(l["diff_id"] for l in rec["layers"]))
            if self.rt.kind == "docker":
                self.rt.images.append(HeldImage(normalize_name(docker_tag(rec["name"])),
                                                rec["config"]["digest"]))
            else:
                self.rt.images.append(HeldImage(rec["name"], rec["config"]["digest"],
                                                target=Descriptor.from_json(rec["top"])))
        if self.rt.kind == "containerd":
            self.rt.blobs.update(self.added)
        return [r["name"] for r in records]

    def abort(self) -> None:
        self.aborted += 1


class FakeRuntime:
    def __init__(self, kind: str, namespace: Optional[str] = None, *, forget: bool = False) -> None:
        self.kind = kind
        self.namespace = namespace
        self.images: List[HeldImage] = []
        self.blobs: Set[str] = set()
        self.chains: Set[str] = set()
        self.loaders: List[FakeLoader] = []
        self.forget = forget

    def inventory(self) -> Inventory:
        return Inventory(runtime=self.kind, namespace=self.namespace, images=tuple(self.images),
                         blobs=frozenset(self.blobs) if self.kind == "containerd" else frozenset(),
                         chains=frozenset(self.chains))

    def loader(self, inv: Inventory, platform: str) -> FakeLoader:
        loader = FakeLoader(self, inv, platform)
        self.loaders.append(loader)
        return loader

    @property
    def added(self) -> Dict[str, bytes]:
        out: Dict[str, bytes] = {}
        for loader in self.loaders:
            out.update(loader.added)
        return out


def do_import(path: Path, rt: FakeRuntime) -> Any:
    with open(path, "rb") as fh:
        return import_bundle(fh, path.name, rt)


def make_plan(images: Sequence[ResolvedImage], runtime: str,
              inv: Optional[Inventory] = None) -> Plan:
    ns = "k8s.io" if runtime == "containerd" else None
    return plan_bundle("gw-01", images, inv or Inventory.empty(runtime, ns), runtime=runtime,
                       namespace=ns, platform="linux/amd64")


@pytest.fixture
def built(tmp_path: Path) -> Images:
    return Images(BlobCache(tmp_path / "cache"))


def entry_digests(path: Path) -> List[str]:
    return [e["digest"] for e in read_index(path)["index"]["entries"]]


# ---------------------------------------------------------------------------
# containerd


def test_containerd_full_then_nothing(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP], index=True)
    b = built.image("example.test/shop/tool:v2", [BASE, TOOL])
    out = tmp_path / "full.ebundle"
    res = write_bundle(make_plan([a, b], "containerd"), built.cache, out, level=3)
    # a: index, manifest, config, base, app; b: manifest, config, tool (base ships once)
    assert res.entries == 8 and res.images == 2 and res.bundle_bytes == out.stat().st_size
    digests = entry_digests(out)
    assert len(set(digests)) == 8
    assert a.layers[0].digest in digests and a.layers[0].diff_id not in digests

    rt = FakeRuntime("containerd", "k8s.io")
    result = do_import(out, rt)
    assert len(rt.loaders) == 1
    loader = rt.loaders[0]
    assert loader.platform == "linux/amd64"
    assert set(loader.added) == set(digests)
    for digest, data in loader.added.items():
        assert data == built.cache.read_bytes(digest)  # blob form: registry bytes, identical
    assert loader.commits == 1 and loader.aborted == 0
    assert loader.committed == read_index(out)["index"]["images"]
    assert [r["name"] for r in loader.committed] == [a.name, b.name]
    assert result.imported == [a.name, b.name]
    assert result.already_present == []
    assert result.entries_sent == 8 and result.entries_skipped == 0
    assert result.bundle_bytes == out.stat().st_size
    assert result.inventory is not None and len(result.inventory.images) == 2

    again = do_import(out, rt)
    assert len(rt.loaders) == 1  # no loader: nothing to import
    assert again.imported == []
    assert again.already_present == [a.name, b.name]
    assert again.entries_sent == 0 and again.entries_skipped == 8


def test_containerd_one_present_one_new(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    b = built.image("example.test/shop/tool:v2", [BASE, TOOL])
    out = tmp_path / "b.ebundle"
    write_bundle(make_plan([a, b], "containerd"), built.cache, out, level=3)
    rt = FakeRuntime("containerd", "k8s.io")
    rt.images.append(HeldImage(a.name, a.config.digest, target=a.top))
    rt.blobs.update({a.top.digest, a.config.digest, *(l.digest for l in a.layers)})
    result = do_import(out, rt)
    assert result.already_present == [a.name]
    assert result.imported == [b.name]
    loader = rt.loaders[0]
    assert [r["name"] for r in loader.committed or []] == [b.name]
    assert set(loader.added) == {b.manifest.digest, b.config.digest, b.layers[1].digest}
    assert result.entries_sent == 3 and result.entries_skipped == 4  # a: manifest, config, 2 layers


def test_pinned_image_gets_its_top_digest_name(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app", [BASE], index=True, pinned=True)
    assert a.name == f"example.test/shop/app@{a.top.digest}"
    out = tmp_path / "b.ebundle"
    write_bundle(make_plan([a], "containerd"), built.cache, out, level=3)
    rt = FakeRuntime("containerd", "k8s.io")
    assert do_import(out, rt).imported == [a.name]
    assert rt.loaders[0].committed[0]["top"] == a.top.to_json()


# ---------------------------------------------------------------------------
# Docker


def test_docker_full_then_nothing(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP], index=True)
    p = built.image("example.test/shop/pinned", [BASE, EXTRA], pinned=True)
    out = tmp_path / "d.ebundle"
    plan = make_plan([a, p], "docker")
    assert plan.layer_form == "tar"
    write_bundle(plan, built.cache, out, level=3)
    digests = entry_digests(out)
    for layer in a.layers + p.layers:
        assert layer.diff_id in digests and layer.digest not in digests
    info = read_index(out)
    assert info["header"]["layer_form"] == "tar"
    assert {l["form"] for r in info["index"]["images"] for l in r["layers"]} == {"tar"}

    rt = FakeRuntime("docker")
    result = do_import(out, rt)
    loader = rt.loaders[0]
    # docker load gets configs and layer tars, never manifests or indexes
    assert set(loader.added) == {a.config.digest, p.config.digest, a.layers[0].diff_id,
                                 a.layers[1].diff_id, p.layers[1].diff_id}
    for layer in a.layers + p.layers:
        assert loader.added[layer.diff_id] == built.tars[layer.diff_id]
    assert loader.added[a.config.digest] == built.cache.read_bytes(a.config.digest)
    assert result.imported == [a.name, p.name]
    held = {h.name for h in rt.images}
    assert f"example.test/shop/pinned:sha256-{p.top.digest[7:]}" in held

    again = do_import(out, rt)
    assert len(rt.loaders) == 1
    assert again.already_present == [a.name, p.name] and again.entries_sent == 0


def test_docker_prerequisites_by_chain(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP, EXTRA])
    chains = a.chain_ids
    site = Inventory(runtime="docker", chains=frozenset(chains[:2]))
    out = tmp_path / "d.ebundle"
    write_bundle(make_plan([a], "docker", site), built.cache, out, level=3)
    assert len(read_index(out)["header"]["prerequisites"]) == 2

    rt = FakeRuntime("docker")
    rt.chains.add(chains[0])
    rt.blobs.update(l.digest for l in a.layers)  # a blob means nothing to Docker
    with pytest.raises(PrerequisiteError) as info:
        do_import(out, rt)
    assert info.value.missing == [a.layers[1].diff_id]
    assert rt.loaders == []

    rt.chains.add(chains[1])
    result = do_import(out, rt)
    assert result.imported == [a.name]
    assert a.layers[2].diff_id in rt.loaders[0].added
    assert a.layers[0].diff_id not in rt.loaders[0].added


# ---------------------------------------------------------------------------
# Refusals


def test_missing_prerequisites_refused_before_anything(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP, EXTRA])
    site = Inventory(runtime="containerd", namespace="k8s.io",
                     blobs=frozenset({a.layers[0].digest, a.layers[1].digest}))
    out = tmp_path / "delta.ebundle"
    write_bundle(make_plan([a], "containerd", site), built.cache, out, level=3)
    prereqs = read_index(out)["header"]["prerequisites"]
    assert [p["digest"] for p in prereqs] == [a.layers[0].digest, a.layers[1].digest]
    assert a.layers[0].digest not in entry_digests(out)

    rt = FakeRuntime("containerd", "k8s.io")
    with pytest.raises(PrerequisiteError) as info:
        do_import(out, rt)
    err = info.value
    assert err.exit_code == 6
    assert err.missing == [a.layers[0].digest, a.layers[1].digest]
    assert a.layers[0].digest in str(err) and a.layers[1].digest in str(err)
    assert rt.loaders == [] and rt.images == []

    # One held as a blob, the other as an unpacked chain: both satisfy containerd.
    rt.blobs.add(a.layers[0].digest)
    rt.chains.add(a.chain_ids[1])
    result = do_import(out, rt)
    assert result.imported == [a.name]
    assert a.layers[2].digest in rt.loaders[0].added
    assert a.layers[0].digest not in rt.loaders[0].added


def flip_in_last_entry(path: Path) -> None:
    info = read_index(path)
    offset = info["index"]["entries"][-1]["offset"]
    data = bytearray(path.read_bytes())
    body_len = int.from_bytes(data[offset + 1:offset + 5], "big")
    first_payload = offset + 5 + body_len + 8 + 12
    data[first_payload + 1] ^= 0x20
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_corrupted_entry_aborts(tmp_path: Path, built: Images, runtime: str) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    out = tmp_path / "b.ebundle"
    write_bundle(make_plan([a], runtime), built.cache, out, level=3)
    flip_in_last_entry(out)
    rt = FakeRuntime(runtime, "k8s.io" if runtime == "containerd" else None)
    with pytest.raises(BundleFormatError, match="corrupt"):
        do_import(out, rt)
    loader = rt.loaders[0]
    assert loader.aborted == 1 and loader.commits == 0
    assert rt.images == []


def test_corrupted_skipped_entry_aborts(tmp_path: Path, built: Images) -> None:
    """Damage in an entry the loader does not want (a manifest, for Docker) still aborts."""
    a = built.image("example.test/shop/app:v1", [BASE])
    out = tmp_path / "b.ebundle"
    write_bundle(make_plan([a], "docker"), built.cache, out, level=3)
    entries = read_index(out)["index"]["entries"]
    pos = [e["digest"] for e in entries].index(a.manifest.digest)
    data = bytearray(out.read_bytes())
    off = entries[pos]["offset"]
    body_len = int.from_bytes(data[off + 1:off + 5], "big")
    data[off + 5 + body_len + 8 + 12] ^= 1
    out.write_bytes(bytes(data))
    rt = FakeRuntime("docker")
    with pytest.raises(BundleFormatError):
        do_import(out, rt)
    assert rt.loaders[0].aborted == 1 and rt.loaders[0].commits == 0
    assert a.manifest.digest not in rt.loaders[0].added


def test_truncated_bundle_aborts_after_all_entries(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    out = tmp_path / "b.ebundle"
    write_bundle(make_plan([a], "containerd"), built.cache, out, level=3)
    n = len(entry_digests(out))
    out.write_bytes(out.read_bytes()[:-10])
    rt = FakeRuntime("containerd", "k8s.io")
    with pytest.raises(BundleFormatError, match="truncated"):
        do_import(out, rt)
    loader = rt.loaders[0]
    assert len(loader.added) == n  # every entry arrived, yet nothing was committed
    assert loader.aborted == 1 and loader.commits == 0


def test_containerd_refuses_tar_form(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE])
    out = tmp_path / "d.ebundle"
    write_bundle(make_plan([a], "docker"), built.cache, out, level=3)
    rt = FakeRuntime("containerd", "k8s.io")
    with pytest.raises(LoadError, match="tar"):
        do_import(out, rt)
    assert rt.loaders == []


def _handmade(path: Path, cache: BlobCache, header_images: List[dict], records: List[dict],
              blobs: Sequence[Descriptor]) -> None:
    with open(path, "wb") as fh:
        w = BundleWriter(fh, {"site": "gw-01", "runtime": "containerd", "namespace": "k8s.io",
                              "platform": "linux/amd64", "layer_form": "blob",
                              "prerequisites": [], "images": header_images})
        for d in blobs:
            codec = CODEC_STORED if d.media_type.endswith("gzip") else CODEC_ZSTD
            w.add_blob(d.digest, d.size, [cache.read_bytes(d.digest)], codec=codec,
                       media_type=d.media_type)
        w.finish(records)


def _all_blobs(img: ResolvedImage) -> List[Descriptor]:
    return list(img.json_blobs) + [Descriptor(l.media_type, l.digest, l.size) for l in img.layers]


def _summary(img: ResolvedImage) -> dict:
    return {"name": img.name, "top": img.top.digest, "config": img.config.digest}


@pytest.mark.parametrize("case", ["other name", "other top", "extra record", "missing record"])
def test_header_index_image_mismatch(tmp_path: Path, built: Images, case: str) -> None:
    a = built.image("example.test/shop/app:v1", [BASE])
    b = built.image("example.test/shop/app:v2", [BASE, APP])
    header = [_summary(a)]
    if case == "other name":
        records = [image_record(b, "blob")]
    elif case == "other top":
        rec = image_record(b, "blob")
        rec["name"] = a.name
        records = [rec]
    elif case == "extra record":
        records = [image_record(a, "blob"), image_record(b, "blob")]
    else:
        records = []
    out = tmp_path / "m.ebundle"
    _handmade(out, built.cache, header, records, _all_blobs(a) + _all_blobs(b)[3:])
    rt = FakeRuntime("containerd", "k8s.io")
    with pytest.raises(BundleFormatError, match="header"):
        do_import(out, rt)
    assert rt.loaders[0].aborted == 1 and rt.loaders[0].commits == 0


def test_index_record_needing_absent_content(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    out = tmp_path / "m.ebundle"
    _handmade(out, built.cache, [_summary(a)], [image_record(a, "blob")], a.json_blobs)
    rt = FakeRuntime("containerd", "k8s.io")
    with pytest.raises(PrerequisiteError) as info:
        do_import(out, rt)
    assert set(info.value.missing) == {l.digest for l in a.layers}
    assert rt.loaders[0].aborted == 1 and rt.loaders[0].commits == 0


def test_malformed_header_images(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE])
    out = tmp_path / "m.ebundle"
    _handmade(out, built.cache, [{"name": a.name}], [image_record(a, "blob")], _all_blobs(a))
    rt = FakeRuntime("containerd", "k8s.io")
    with pytest.raises(BundleFormatError, match="images"):
        do_import(out, rt)
    assert rt.loaders == []


def test_import_checks_the_runtime_afterwards(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE])
    out = tmp_path / "b.ebundle"
    write_bundle(make_plan([a], "containerd"), built.cache, out, level=3)
    rt = FakeRuntime("containerd", "k8s.io", forget=True)
    with pytest.raises(LoadError, match="does not hold"):
        do_import(out, rt)
    assert rt.loaders[0].commits == 1


def test_pack_is_atomic_on_failure(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP])
    layer = a.layers[1]
    built.cache.path(layer.digest).unlink()  # the plan ships a blob the cache lacks
    out = tmp_path / "b.ebundle"
    with pytest.raises(FileNotFoundError):
        write_bundle(make_plan([a], "containerd"), built.cache, out, level=3)
    assert not out.exists()
    assert list(tmp_path.glob("b.ebundle*")) == []


def test_bundle_reads_back_through_reader(tmp_path: Path, built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP], index=True)
    out = tmp_path / "b.ebundle"
    write_bundle(make_plan([a], "containerd"), built.cache, out, level=3)
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
    assert reader.header["images"] == [_summary(a)]
    assert reader.index["images"] == [image_record(a, "blob")]


def _set_layer(key: str, value: Any, form: Optional[str] = None) -> Any:
    def change(rec: dict) -> None:
        rec["layers"][0][key] = value
        if form:
            rec["layers"][0]["form"] = form
    return change


MALFORMED_RECORDS = {
    "layers not a list": lambda r: r.update(layers="abc"),
    "layer not a map": lambda r: r.update(layers=["abc"]),
    "top not a map": lambda r: r.update(top=["x"]),
    "top digest a map": lambda r: r["top"].update(digest={"a": 1}),
    "config missing": lambda r: r.pop("config"),
    "layer form missing": lambda r: r["layers"][0].pop("form"),
    "layer diff_id missing (tar form)": lambda r: (r["layers"][0].pop("diff_id"),
                                                   r["layers"][0].update(form="tar")),
    # Once raised KeyError/TypeError outside _check_records's try block:
    "layer digest a list": _set_layer("digest", ["x"]),
    "layer diff_id a list (tar form)": _set_layer("diff_id", ["x"], form="tar"),
    "layer digest a map": _set_layer("digest", {"a": "b"}),
    "layer digest an int": _set_layer("digest", 5),
    "layer diff_id missing (blob form)": lambda r: r["layers"][0].pop("diff_id"),
}


def _import_record(tmp_path: Path, built: Images, change: Any, runtime: str) -> FakeRuntime:
    a = built.image("example.test/shop/app:v1", [BASE])
    rec = json.loads(json.dumps(image_record(a, "blob")))
    change(rec)
    out = tmp_path / "m.ebundle"
    _handmade(out, built.cache, [_summary(a)], [rec], _all_blobs(a))
    rt = FakeRuntime(runtime, "k8s.io" if runtime == "containerd" else None)
    with pytest.raises(BundleFormatError, match="malformed"):
        do_import(out, rt)
    return rt


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
@pytest.mark.parametrize("case", sorted(MALFORMED_RECORDS))
def test_malformed_index_record(tmp_path: Path, built: Images, case: str, runtime: str) -> None:
    rt = _import_record(tmp_path, built, MALFORMED_RECORDS[case], runtime)
    assert rt.loaders[0].aborted == 1 and rt.loaders[0].commits == 0


def test_header_counts_content_bytes_and_progress_sees_them(tmp_path: Path,
                                                            built: Images) -> None:
    a = built.image("example.test/shop/app:v1", [BASE, APP], index=True)
    out = tmp_path / "b.ebundle"
    write_bundle(make_plan([a], "docker"), built.cache, out, level=3)
    info = read_index(out)
    decoded = sum(e["size"] for e in info["index"]["entries"])
    assert info["header"]["content_bytes"] == decoded

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

    rt = FakeRuntime("docker")
    with open(out, "rb") as fh:
        import_bundle(fh, "b", rt, progress=make_bar)
    assert len(bars) == 1
    assert bars[0].total == decoded and bars[0].n == decoded


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
@pytest.mark.parametrize("bad_name", ["Not A Ref!", "", "example.test/UPPER:v1"])
def test_invalid_image_name_in_bundle(tmp_path: Path, built: Images, bad_name: str,
                                      runtime: str) -> None:
    a = built.image("example.test/shop/app:v1", [BASE])
    rec = image_record(a, "blob")
    rec["name"] = bad_name
    out = tmp_path / "m.ebundle"
    _handmade(out, built.cache, [dict(_summary(a), name=bad_name)], [rec], _all_blobs(a))
    rt = FakeRuntime(runtime, "k8s.io" if runtime == "containerd" else None)
    with pytest.raises(BundleFormatError, match="name"):
        do_import(out, rt)
    assert all(l.commits == 0 for l in rt.loaders)
