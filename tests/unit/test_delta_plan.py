"""Deltas through the packer's real code: planner decisions, bundle format rules, rebuild.

The images are tiny but real (tiny_images): real tars, gzip blobs in a real BlobCache.
The device side is ``rebuild`` over base files in a directory, as the loaders use it.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence, Set, Tuple

import pytest

from edgebundle import bases as bases_mod
from edgebundle.bases import DeltaPlanner
from edgebundle.cache import BlobCache
from edgebundle.errors import BundleFormatError, ManifestError
from edgebundle.format import FEATURE_DELTA, BundleReader, records
from edgebundle.holdings import HeldImage, HeldLayer, Inventory
from edgebundle.image import ResolvedImage
from edgebundle.importer.containerd import parse_view_mounts
from edgebundle.manifest import load_manifest
from edgebundle.oci import chain_ids
from edgebundle.pack import write_bundle
from edgebundle.plan import Plan, plan_bundle
from edgebundle.rebuild import DirTree, rebuild
from edgebundle.report import inventory_from_json, inventory_to_json

from tiny_images import BASE, Images

RNG = random.Random(5)
LIB_V1 = {f"usr/lib/m{i}.py": RNG.randbytes(3000) for i in range(20)}
LIB_V2 = dict(LIB_V1, **{"usr/lib/m3.py": LIB_V1["usr/lib/m3.py"][:2000] + b"changed"})


def held(img: ResolvedImage, *, features: bool = True, runtime: str = "containerd") -> Inventory:
    """The site holds ``img`` complete, every layer applied (as a report would say)."""
    chains = chain_ids(l.diff_id for l in img.layers)
    layers = tuple(HeldLayer(l.diff_id, l.digest if runtime == "containerd" else None, l.size,
                             blob=runtime == "containerd", unpacked=True) for l in img.layers)
    image = HeldImage(img.name, img.config.digest, img.top, img.manifest.digest, "linux/amd64",
                      True, layers)
    return Inventory(runtime, "k8s.io" if runtime == "containerd" else None, (image,),
                     frozenset(l.digest for l in img.layers) if runtime == "containerd" else frozenset(),
                     frozenset(chains), features=frozenset({FEATURE_DELTA}) if features else frozenset())


@pytest.fixture()
def cache(tmp_path: Path) -> BlobCache:
    return BlobCache(tmp_path / "cache")


def plans(cache: BlobCache, inv: Inventory, v2: ResolvedImage) -> Tuple[Plan, Plan]:
    plain = plan_bundle("gw", [v2], inv, runtime=inv.runtime, namespace=inv.namespace,
                        platform="linux/amd64")
    with DeltaPlanner(cache) as planner:
        return plain, planner.apply(plain, inv)


def test_changed_layer_ships_as_delta_against_the_site_layers(cache: BlobCache, tmp_path: Path) -> None:
    imgs = Images(cache)
    v1 = imgs.image("example.test/app:v1", [BASE, LIB_V1])
    v2 = imgs.image("example.test/app:v2", [BASE, LIB_V2])
    plain, delta = plans(cache, held(v1), v2)
    lp = delta.images[0].layers[1]
    assert lp.ship and lp.delta is not None and lp.delta.head.target == v2.layers[1].diff_id
    assert lp.delta.stored < v2.layers[1].size / 10
    assert delta.ship_bytes < plain.ship_bytes / 5
    assert delta.required_features == (FEATURE_DELTA,)
    # The delta's base is a prerequisite (so a device without it refuses up front).
    assert {b.chain_id for b in lp.delta.bases} <= {p.chain_id for p in delta.prerequisites}
    assert plain.required_features == ()

    # The bundle carries it as a delta entry; verify passes; the device rebuilds the tar.
    out = io.BytesIO()
    with DeltaPlanner(cache) as planner:
        delta = planner.apply(plain, held(v1))
        write_bundle(delta, cache, out, delta_ops=planner.ops)
    reader = BundleReader(io.BytesIO(out.getvalue()), "b")
    assert reader.header.required_features == (FEATURE_DELTA,)
    heads, ops = [], b""
    for entry in reader.entries():
        if entry.head.delta is not None:
            heads.append(entry.head.delta)
            ops = b"".join(entry.chunks())
    assert reader.index is not None and reader.index.rebuilt == {v2.layers[1].diff_id}
    (head,) = heads
    root = tmp_path / "base"
    for path, data in LIB_V1.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    tar = b"".join(rebuild(head, [ops], [DirTree(root, "base")], "t"))
    assert tar == imgs.tars[v2.layers[1].diff_id]


def test_deltas_are_cached_across_planners(cache: BlobCache, monkeypatch: pytest.MonkeyPatch) -> None:
    imgs = Images(cache)
    v1 = imgs.image("example.test/app:v1", [BASE, LIB_V1])
    v2 = imgs.image("example.test/app:v2", [BASE, LIB_V2])
    first = plans(cache, held(v1), v2)[1]
    calls: List[int] = []
    monkeypatch.setattr(bases_mod, "encode", lambda *a, **k: calls.append(1))  # would break
    again = plans(cache, held(v1), v2)[1]
    assert calls == [] and again.images[0].layers[1].delta == first.images[0].layers[1].delta


def test_whole_with_a_reason(cache: BlobCache) -> None:
    imgs = Images(cache)
    v1 = imgs.image("example.test/app:v1", [BASE, LIB_V1])
    other = {f"srv/x{i}": RNG.randbytes(3000) for i in range(20)}  # nothing in common
    v2 = imgs.image("example.test/app:v2", [BASE, other])

    old_device = plans(cache, held(v1, features=False), v2)[1]
    assert "does not read deltas" in old_device.images[0].layers[1].note
    assert old_device.images[0].layers[1].delta is None

    unrelated = plans(cache, held(v1), v2)[1].images[0].layers[1]
    assert unrelated.delta is None and "not clearly smaller" in unrelated.note

    # A base the packer has no bytes for: say so, ship whole.
    v2b = imgs.image("example.test/app:v2b", [BASE, LIB_V2])
    cache.path(v1.layers[1].digest).unlink()
    cache.path(v1.layers[0].digest).unlink()
    missing = plans(cache, held(v1), v2b)[1].images[0].layers[1]
    assert missing.delta is None and "no base layer of the site is in the packer cache" in missing.note


def test_docker_site_finds_base_blobs_by_diff_id(cache: BlobCache) -> None:
    imgs = Images(cache)
    v1 = imgs.image("example.test/app:v1", [BASE, LIB_V1])
    v2 = imgs.image("example.test/app:v2", [BASE, LIB_V2])
    for l in v1.layers:  # what fetching records for every layer blob it decompressed
        cache.set_layer_info(l.digest, l.diff_id, l.tar_size)
    lp = plans(cache, held(v1, runtime="docker"), v2)[1].images[0].layers[1]
    assert lp.delta is not None and lp.delta.bases[0].digest == v1.layers[1].digest


# ---------------------------------------------------------------------------
# Format rules for delta entries


def _delta_bundle(cache: BlobCache) -> Tuple[bytes, Plan]:
    imgs = Images(cache)
    v1 = imgs.image("example.test/app:v1", [BASE, LIB_V1])
    v2 = imgs.image("example.test/app:v2", [BASE, LIB_V2])
    out = io.BytesIO()
    with DeltaPlanner(cache) as planner:
        plan = planner.apply(plan_bundle("gw", [v2], held(v1), runtime="containerd",
                                         namespace="k8s.io", platform="linux/amd64"), held(v1))
        write_bundle(plan, cache, out, delta_ops=planner.ops)
    return out.getvalue(), plan


def _read_all(data: bytes) -> None:
    reader = BundleReader(io.BytesIO(data), "b")
    for entry in reader.entries():
        entry.skip()


def test_reader_without_the_feature_says_upgrade(cache: BlobCache,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data, _ = _delta_bundle(cache)
    monkeypatch.setattr(records, "KNOWN_FEATURES", frozenset())  # an edgebundle 0.1 reader
    with pytest.raises(BundleFormatError, match="requires unsupported features: .tar-delta-v1") as info:
        BundleReader(io.BytesIO(data), "b")
    assert "upgrade edgebundle" in str(info.value)


def test_writer_refuses_deltas_the_header_does_not_allow(cache: BlobCache) -> None:
    _, plan = _delta_bundle(cache)
    lp = plan.images[0].layers[1]
    assert lp.delta is not None
    for broken in (replace(plan, images=()), replace(plan, prerequisites=())):
        # Without the feature (no image ships a delta) or without the base as a prerequisite.
        from edgebundle.format import BundleWriter
        from edgebundle.pack import bundle_header
        header = replace(bundle_header(broken), required_features=broken.required_features)
        writer = BundleWriter(io.BytesIO(), header)
        with pytest.raises(ValueError, match="refusing a delta"):
            writer.add_delta(lp.delta.head, lp.delta.entry, lp.delta.size, [b""])


@pytest.mark.parametrize("field,value,fragment", [
    ("target", "sha256:zz", "'target'"),
    ("bases", [{"chain_id": "x"}], "'chain_id'"),
    ("bases", [{"chain_id": "sha256:" + "3" * 64, "diff_id": "sha256:" + "4" * 64, "tar": 1}],
     "'tar' is an integer, not a boolean"),
])
def test_bad_delta_head_fields(field: str, value: object, fragment: str) -> None:
    base = {"kind": "delta", "digest": "sha256:" + "1" * 64, "size": 1, "codec": 1,
            "target": "sha256:" + "2" * 64, "target_size": 1,
            "bases": [{"chain_id": "sha256:" + "3" * 64, "diff_id": "sha256:" + "4" * 64,
                       "tar": False}]}
    with pytest.raises(BundleFormatError, match=fragment):
        records.parse_entry_head(dict(base, **{field: value}), "entry")


@pytest.mark.parametrize("op,fragment", [
    ([4, 0, "../etc/shadow", 1, b"\0" * 16], "not relative and normalised"),
    ([4, 0, "/etc/shadow", 1, b"\0" * 16], "not relative and normalised"),
    ([4, 0, "a", 1, b"\0" * 32], "unknown or malformed op"),  # a sha256, not an xxh3-128
    ([4, 1, "a", 1, b"\0" * 16], "names base 1, but the entry has 1"),
    ([1, 0], "op names base file 0, but only 0 are defined"),
    ([3, 0, 0, 10], "does not declare as a tar base"),
    ([9], "unknown or malformed op"),
])
def test_bad_ops_are_format_errors(op: list, fragment: str, tmp_path: Path) -> None:
    import msgpack
    from edgebundle.format import BaseLayer, DeltaHead
    head = DeltaHead("sha256:" + "2" * 64, 1, (BaseLayer("sha256:" + "3" * 64, "sha256:" + "4" * 64),))
    with pytest.raises(BundleFormatError, match=fragment):
        list(rebuild(head, [msgpack.packb(op, use_bin_type=True)], [DirTree(tmp_path, "t")], "t"))


def test_delta_of_a_layer_no_image_has_is_refused(cache: BlobCache) -> None:
    data, plan = _delta_bundle(cache)
    index = records.Index((records.IndexEntry("sha256:" + "1" * 64, "delta", 1, 1, 1, 1,
                                              "sha256:" + "5" * 64),), ())
    header = replace(records.parse_header(BundleReader(io.BytesIO(data), "b").header.to_wire(), "b"),
                     images=())
    with pytest.raises(BundleFormatError, match="a layer of no image"):
        records.check_index(index, header, "b")


# ---------------------------------------------------------------------------
# Inputs: the manifest switch, the report's features, ctr's view mounts


def test_site_deltas_switch(tmp_path: Path) -> None:
    text = ("version: 1\nimages:\n  - ref: example.test/a:1\nsites:\n"
            "  gw: {runtime: docker, platform: linux/amd64, deltas: %s}\n")
    (tmp_path / "m.yaml").write_text(text % "false")
    assert load_manifest(tmp_path / "m.yaml").sites["gw"].deltas is False
    (tmp_path / "m.yaml").write_text(text % "'no'")
    with pytest.raises(ManifestError, match="deltas is 'no', not a boolean"):
        load_manifest(tmp_path / "m.yaml")


def test_report_features_round_trip_and_default() -> None:
    inv = Inventory("docker", features=frozenset({FEATURE_DELTA}))
    obj = inventory_to_json(inv)
    assert obj["features"] == [FEATURE_DELTA]
    assert inventory_from_json(obj).features == {FEATURE_DELTA}
    del obj["features"]  # a report from edgebundle 0.1
    assert inventory_from_json(obj).features == frozenset()


def test_view_mounts() -> None:
    overlay = json.dumps([{"Type": "overlay", "Source": "overlay", "Options": [
        "index=off", "lowerdir=/var/lib/c/snapshots/4/fs:/var/lib/c/snapshots/3/fs"]}])
    assert parse_view_mounts(overlay) == "/var/lib/c/snapshots/4/fs"
    bind = json.dumps([{"Type": "bind", "Source": "/var/lib/c/snapshots/1/fs",
                        "Options": ["ro", "rbind"]}])
    assert parse_view_mounts(bind) == "/var/lib/c/snapshots/1/fs"
    for odd in ("", "[]", "{}", json.dumps([{"Type": "bind", "Source": "relative"}]),
                json.dumps([{"Type": "tmpfs"}])):
        assert parse_view_mounts(odd) is None


def test_report_offers_deltas_only_where_the_runtime_can_serve_bases(tmp_path: Path) -> None:
    from edgebundle.importer.docker import DockerAPI, DockerRuntime
    from edgebundle.usecases.device import take_report
    from fake_runtimes import FakeEngine

    runtime = DockerRuntime(DockerAPI("unix:///x.sock", dial=FakeEngine().dial))
    assert not runtime.reads_bases()  # its /info names a data root this machine lacks
    assert FEATURE_DELTA not in take_report(runtime).features
    runtime._info = (str(tmp_path), "overlay2")  # a readable layer store
    assert FEATURE_DELTA in take_report(runtime).features
    runtime._info = (str(tmp_path), "zfs")  # a graph driver whose layers we cannot read
    assert FEATURE_DELTA not in take_report(runtime).features


@pytest.mark.parametrize("site,deltas,want", [("gw", True, "delta"), ("gw", False, "whole"),
                                               ("nodelta", True, "whole")])
def test_plan_use_case_honours_no_delta_and_the_sites_switch(tmp_path: Path, site: str,
                                                             deltas: bool, want: str) -> None:
    from edgebundle.usecases.packer import plan_site
    from edgebundle.store import InventoryStore
    from tiny_images import write_oci_layout

    home = tmp_path / "home"
    imgs = Images(BlobCache(home / "cache"))  # the packer's own cache holds v1 (it shipped it)
    v1 = imgs.image("example.test/app:v1", [BASE, LIB_V1])
    v2 = imgs.image("example.test/app:v2", [BASE, LIB_V2])
    write_oci_layout(tmp_path / "layout", imgs.cache, [v2])
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"""version: 1
images:
  - ref: example.test/app:v2
    source: oci-layout:{tmp_path / 'layout'}
sites:
  gw: {{runtime: containerd, namespace: k8s.io, platform: linux/amd64}}
  nodelta: {{runtime: containerd, namespace: k8s.io, platform: linux/amd64, deltas: false}}
""")
    InventoryStore(home).record(site, held(v1))
    plan = plan_site(home, str(manifest), site, deltas=deltas)
    lp = plan.images[0].layers[1]
    assert lp.ship and ("delta" if lp.delta is not None else "whole") == want


def test_missing_base_blobs_are_fetched_for_the_repositories_that_ship(cache: BlobCache,
                                                                      tmp_path: Path) -> None:
    imgs = Images(BlobCache(tmp_path / "registry"))  # the blobs live "in the registry"
    v1 = imgs.image("example.test/app:v1", [BASE, LIB_V1])
    other = imgs.image("example.test/other:v1", [{"x/y": RNG.randbytes(2000)}])
    v2 = imgs.image("example.test/app:v2", [BASE, LIB_V2])
    for l in v2.layers:  # the packer fetched what ships; not the bases
        cache.put_bytes(imgs.cache.read_bytes(l.digest))
    asked: List[Tuple[str, str]] = []

    def fetch(wanted: Sequence[Tuple[str, str, Optional[int]]]) -> Set[str]:
        for image, digest, _ in wanted:
            asked.append((image, digest))
            cache.put_bytes(imgs.cache.read_bytes(digest))
        return {digest for _, digest, _ in wanted}

    site = held(v1)
    site = replace(site, images=site.images + held(other).images,
                   blobs=site.blobs | held(other).blobs, chains=site.chains | held(other).chains)
    plain = plan_bundle("gw", [v2], site, runtime="containerd", namespace="k8s.io",
                        platform="linux/amd64")
    with DeltaPlanner(cache, fetch=fetch) as planner:
        lp = planner.apply(plain, site).images[0].layers[1]
    assert lp.delta is not None
    # Only app's layers were fetched (the repository being shipped), not other's.
    assert {image for image, _ in asked} == {v1.name}

    refused: List[str] = []

    def refuse(wanted: Sequence[Tuple[str, str, Optional[int]]]) -> Set[str]:
        refused.extend(digest for _, digest, _ in wanted)
        return set()

    with DeltaPlanner(BlobCache(tmp_path / "empty"), fetch=refuse) as planner:
        for l in v2.layers:
            planner.cache.put_bytes(imgs.cache.read_bytes(l.digest))
        lp = planner.apply(plain, site).images[0].layers[1]
    # The libs base could not be had: the changed layer ships whole, and says why.
    assert refused == [v1.layers[1].digest]
    assert lp.delta is None and lp.note.startswith("whole: ")


@pytest.mark.parametrize("field,value", [("target", "sha256:" + "e" * 64), ("target_size", 1),
                                          ("bases", [])])
def test_signed_delta_entries_are_covered_by_the_signature(cache: BlobCache, tmp_path: Path,
                                                           field: str, value: object) -> None:
    """A delta's target, size and bases are in its record, which the signed header pins."""
    from edgebundle.errors import TrustError
    from edgebundle.format import TAG_ENTRY
    from edgebundle.trust import TrustPolicy, generate_key, load_public_key, load_signing_key
    from forge import replace_record

    imgs = Images(cache)
    v1 = imgs.image("example.test/app:v1", [BASE, LIB_V1])
    v2 = imgs.image("example.test/app:v2", [BASE, LIB_V2])
    key = generate_key(str(tmp_path / "k"))
    policy = TrustPolicy((load_public_key(key.public_path),), "")
    out = tmp_path / "signed.ebundle"
    with DeltaPlanner(cache) as planner:
        plain = plan_bundle("gw", [v2], held(v1), runtime="containerd", namespace="k8s.io",
                            platform="linux/amd64")
        with open(out, "wb") as fh:
            write_bundle(planner.apply(plain, held(v1)), cache, fh, delta_ops=planner.ops,
                         signers=[load_signing_key(key.private_path)])

    def read_all() -> None:
        reader = BundleReader(open(out, "rb"), "signed", policy.admit)
        for entry in reader.entries():
            entry.skip()
    read_all()  # as packed: fine
    replace_record(out, lambda tag, body: tag == TAG_ENTRY and body["kind"] == "delta",
                   lambda e: dict(e, **{field: value}))
    with pytest.raises(TrustError, match="not the entry its header commits to"):
        read_all()
