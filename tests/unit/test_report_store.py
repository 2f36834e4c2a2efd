"""Tests for edgebundle.report (the report JSON codec) and edgebundle.store (the per-site store)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from edgebundle.errors import InventoryError
from edgebundle.report import REPORT_KIND, inventory_from_json, inventory_to_json, now_rfc3339, report_site
from edgebundle.specs import check_site_name
from edgebundle.store import InventoryStore
from edgebundle.holdings import HeldImage, HeldLayer, Inventory
from edgebundle.oci import Descriptor, Platform, chain_ids
from edgebundle.specs import SiteSpec


def d(n: int) -> str:
    return "sha256:" + f"{n:064x}"


INV = Inventory(
    runtime="containerd",
    namespace="k8s.io",
    images=(
        HeldImage(
            name="docker.io/library/alpine:3.19",
            config=d(1),
            target=Descriptor("application/vnd.oci.image.index.v1+json", d(2), 1234),
            manifest=d(3),
            platform="linux/arm64",
            complete=True,
            layers=(HeldLayer(d(4), d(5), 3000, blob=True, unpacked=True),
                    HeldLayer(d(6), None, None, blob=False, unpacked=True)),
        ),
        HeldImage(name="factory.local/hmi:3", config=d(7), complete=False),
    ),
    blobs=frozenset({d(5), d(2), d(3), d(1)}),
    # A complete image's layers are held (blob or chain) and its top chain is unpacked.
    chains=frozenset(chain_ids([d(4), d(6)])),
    generated_at="2024-05-01T12:00:00Z",
    host="gw-01",
    extra={"containerd_version": "1.7.2"},
)

GW = SiteSpec("gw-01", "containerd", Platform.parse("linux/arm64"), namespace="k8s.io")


def report(**changes: Any) -> Dict[str, Any]:
    obj = inventory_to_json(INV, "gw-01")
    obj.update(changes)
    return obj


# ---------------------------------------------------------------------------
# Codec


def test_round_trip() -> None:
    obj = inventory_to_json(INV, "gw-01")
    assert obj["version"] == 1 and obj["kind"] == REPORT_KIND and obj["site"] == "gw-01"
    assert obj["runtime"] == {"kind": "containerd", "namespace": "k8s.io"}
    assert obj["blobs"] == sorted(obj["blobs"])  # stable order: reports diff cleanly
    back = inventory_from_json(json.loads(json.dumps(obj)))
    assert back == INV
    assert back.extra == INV.extra and back.generated_at == INV.generated_at and back.host == "gw-01"


def test_schema_shape() -> None:
    image = inventory_to_json(INV)["images"][0]
    assert image["target"] == {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d(2), "size": 1234}
    assert image["layers"][1] == {"diff_id": d(6), "digest": None, "size": None, "blob": False, "unpacked": True,
                                  "tar": False}
    assert inventory_to_json(INV)["site"] is None


def test_docker_inventory_round_trip() -> None:
    inv = Inventory(runtime="docker", chains=frozenset({d(1)}),
                    images=(HeldImage("docker.io/library/busybox:latest", d(2), layers=(HeldLayer(d(1)),)),))
    obj = inventory_to_json(inv)
    assert obj["runtime"] == {"kind": "docker", "namespace": None}
    assert inventory_from_json(obj) == inv


def test_optional_fields_may_be_absent() -> None:
    obj = {"version": 1, "kind": REPORT_KIND, "runtime": {"kind": "docker"}, "images": [
        {"name": "a:1", "config": d(1), "complete": True, "layers": [{"diff_id": d(2)}]}],
        "blobs": [], "chains": [d(2)]}
    inv = inventory_from_json(obj)
    assert inv.namespace is None and inv.host == "" and inv.extra == {}
    assert inv.images[0].layers[0] == HeldLayer(d(2))
    assert report_site(obj) is None


def test_unknown_keys_are_ignored() -> None:
    assert inventory_from_json(report(future_field={"x": 1})) == INV


def mutated(path: str, value: Any) -> Dict[str, Any]:
    """The report with the field at dotted ``path`` set to ``value`` (``...`` deletes it)."""
    obj = copy.deepcopy(report())
    parts = path.split(".")
    node: Any = obj
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is ...:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return obj


@pytest.mark.parametrize("path, value, expect", [
    ("version", 2, "inventory report version 2 is not supported"),
    ("version", True, "inventory report version True is not supported"),
    ("version", ..., "inventory report version None is not supported"),
    ("kind", "something", "inventory report kind is 'something'"),
    ("runtime", ..., "field runtime: missing"),
    ("runtime.kind", "cri-o", "field runtime.kind: unknown runtime 'cri-o'"),
    ("runtime.namespace", 3, "field runtime.namespace: expected a string, got number"),
    ("images", {}, "field images: expected an array, got object"),
    ("images.0.name", "", "field images[0].name: is empty"),
    ("images.0.config", "sha256:xyz", "field images[0].config: 'sha256:xyz' is not sha256"),
    ("images.0.config", "sha512:" + "a" * 128, "field images[0].config"),
    ("images.0.manifest", d(1).upper(), "field images[0].manifest"),
    ("images.0.complete", "yes", "field images[0].complete: expected true/false, got string"),
    ("images.0.complete", ..., "field images[0].complete: missing"),
    ("images.0.platform", "arm64", "field images[0].platform: invalid platform 'arm64'"),
    ("images.0.target.size", True, "field images[0].target.size: expected an integer, got boolean"),
    ("images.0.target.size", -1, "field images[0].target.size: negative size -1"),
    ("images.0.target.digest", None, "field images[0].target.digest: is null"),
    ("images.0.target", [], "field images[0].target: expected an object or null"),
    ("images.0.layers.0.diff_id", ..., "field images[0].layers[0].diff_id: missing"),
    ("images.0.layers.0.digest", "md5:00", "field images[0].layers[0].digest"),
    ("images.0.layers.0.size", 1.5, "field images[0].layers[0].size: expected an integer, got number"),
    ("images.0.layers.0.blob", 1, "field images[0].layers[0].blob: expected true/false"),
    ("blobs", [d(1), "nope"], "field blobs[1]: 'nope' is not sha256"),
    ("chains", ..., "field chains: missing"),
    ("extra", [], "field extra: expected an object, got array"),
    ("generated_at", 5, "field generated_at: expected a string"),
])
def test_invalid_reports_name_the_field(path: str, value: Any, expect: str) -> None:
    with pytest.raises(InventoryError) as info:
        inventory_from_json(mutated(path, value))
    assert expect in info.value.message, info.value.message
    assert info.value.hint and info.value.exit_code == 10


@pytest.mark.parametrize("obj, expect", [
    ([], "is a JSON array, not an object"),
    (None, "is a JSON null"),
    ({"kind": REPORT_KIND, "version": 1, "runtime": {"kind": "docker"}, "images": [7], "blobs": [], "chains": []},
     "field images[0]: expected an object, got number"),
])
def test_invalid_report_shapes(obj: Any, expect: str) -> None:
    with pytest.raises(InventoryError, match="inventory report") as info:
        inventory_from_json(obj)
    assert expect in info.value.message


def test_codec_module_is_device_safe() -> None:
    # The device imports this module: it must not pull in packer-only dependencies.
    code = ("import sys, edgebundle.report; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('yaml', 'paramiko', 'httpx', 'tqdm')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stdout + result.stderr


def test_now_rfc3339() -> None:
    stamp = now_rfc3339()
    assert len(stamp) == 20 and stamp.endswith("Z") and stamp[10] == "T"


@pytest.mark.parametrize("name", ["gw-01", "a", "Line_3.b", "9"])
def test_valid_site_names(name: str) -> None:
    assert check_site_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "-a", ".hidden", "a b", "x" * 200, 5])
def test_invalid_site_names(name: Any) -> None:
    with pytest.raises(InventoryError, match="invalid site name"):
        check_site_name(name)


# ---------------------------------------------------------------------------
# Store


def test_unrecorded_site_is_empty(tmp_path: Path) -> None:
    store = InventoryStore(tmp_path)
    assert store.sites() == []
    assert store.load("gw-01", "containerd", "k8s.io") == Inventory.empty("containerd", "k8s.io")
    with pytest.raises(InventoryError, match="no inventory recorded for site 'gw-01'") as info:
        store.load("gw-01")
    assert "inventory pull gw-01" in (info.value.hint or "")


def test_record_and_load(tmp_path: Path) -> None:
    store = InventoryStore(tmp_path)
    assert store.record("gw-01", report(), GW) == INV
    path = tmp_path / "sites" / "gw-01" / "inventory.json"
    assert store.path("gw-01") == path and path.is_file()
    assert store.load("gw-01", "containerd", "k8s.io") == INV
    assert store.load("gw-01") == INV
    assert store.sites() == ["gw-01"]
    text = path.read_text()
    assert text.endswith("\n") and json.loads(text)["site"] == "gw-01"
    assert not (path.parent / "inventory.prev.json").exists()
    assert [p.name for p in path.parent.iterdir()] == ["inventory.json"]  # no temp files left


def test_record_keeps_previous(tmp_path: Path) -> None:
    store = InventoryStore(tmp_path)
    store.record("gw-01", report())
    first = store.path("gw-01").read_bytes()
    newer = Inventory(runtime="containerd", namespace="k8s.io", generated_at="2024-06-01T00:00:00Z")
    store.record("gw-01", newer)
    assert (store.path("gw-01").parent / "inventory.prev.json").read_bytes() == first
    assert store.load("gw-01") == newer
    assert json.loads(store.path("gw-01").read_text())["site"] == "gw-01"  # stamped on record
    store.record("gw-01", report())
    assert store.load("gw-01") == INV
    assert store.load_json("gw-01") == inventory_to_json(INV, "gw-01")


def test_record_rejects_runtime_mismatch(tmp_path: Path) -> None:
    store = InventoryStore(tmp_path)
    docker = inventory_to_json(Inventory(runtime="docker"), None)
    with pytest.raises(InventoryError) as info:
        store.record("gw-01", docker, GW)
    assert "is from a docker device, but site gw-01 is containerd" in info.value.message
    assert "runtime:" in (info.value.hint or "")
    assert store.sites() == []  # nothing was written


def test_record_rejects_namespace_mismatch(tmp_path: Path) -> None:
    store = InventoryStore(tmp_path)
    obj = report(runtime={"kind": "containerd", "namespace": "default"})
    with pytest.raises(InventoryError, match="namespace 'default', but site gw-01 uses 'k8s.io'") as info:
        store.record("gw-01", obj, GW)
    assert "--namespace k8s.io" in (info.value.hint or "")
    # a site that declares no namespace accepts any
    store.record("gw-01", obj, SiteSpec("gw-01", "containerd", Platform.parse("linux/arm64")))


def test_record_rejects_report_of_other_site(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="report is for site 'gw-02', not 'gw-01'"):
        InventoryStore(tmp_path).record("gw-01", report(site="gw-02"))


def test_record_rejects_invalid_report(tmp_path: Path) -> None:
    store = InventoryStore(tmp_path)
    with pytest.raises(InventoryError, match="kind"):
        store.record("gw-01", {"kind": "nope"})
    with pytest.raises(InventoryError, match="invalid site name"):
        store.record("../evil", report())
    assert not (tmp_path / "evil").exists()


def test_load_rejects_stale_runtime(tmp_path: Path) -> None:
    store = InventoryStore(tmp_path)
    store.record("gw-01", report())
    with pytest.raises(InventoryError, match="is from a containerd device, but the site is docker"):
        store.load("gw-01", "docker")
    with pytest.raises(InventoryError, match="namespace 'k8s.io', not 'default'"):
        store.load("gw-01", "containerd", "default")


def test_load_corrupt_file(tmp_path: Path) -> None:
    store = InventoryStore(tmp_path)
    store.record("gw-01", report())
    store.path("gw-01").write_text("{not json")
    with pytest.raises(InventoryError, match="is not valid JSON") as info:
        store.load("gw-01", "containerd")
    assert "inventory.prev.json" in (info.value.hint or "")


def test_sites_lists_only_recorded(tmp_path: Path) -> None:
    store = InventoryStore(tmp_path)
    store.record("b", Inventory(runtime="docker"))
    store.record("a", Inventory(runtime="docker"))
    (tmp_path / "sites" / "empty").mkdir()
    assert store.sites() == ["a", "b"]
