"""The Podman runtime's pure parts and its loader, through the ``Runner`` seam.

The store files and ``podman image inspect`` outputs below have the shapes Podman 4.3
wrote and printed in tests/integration/test_podman_real.py's stores (abridged).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import pytest

from edgebundle.errors import InventoryError, LoadError
from edgebundle.format import CODEC_STORED, KIND_BLOB, EntryHead, ImageRecord, LayerRecord
from edgebundle.holdings import Holdings, Inventory
from edgebundle.importer.podman import Completed, Podman, PodmanRuntime
from edgebundle.importer.podmanstore import (held_images, is_temp_name, layer_blobs, layer_chain,
                                             parse_layers, stored_image)
from edgebundle.oci import Descriptor, chain_ids
from edgebundle.report import inventory_from_json, inventory_to_json

D = {n: "sha256:" + (c * 64) for n, c in
     (("diff0", "a"), ("diff1", "b"), ("blob0", "c"), ("blob1", "d"), ("cfg", "e"),
      ("man", "f"), ("idx", "1"), ("other", "2"))}


def layers_json(incomplete: bool = False) -> str:
    return json.dumps([
        {"id": "L0", "compressed-diff-digest": D["blob0"], "compressed-size": 10,
         "diff-digest": D["diff0"], "diff-size": 20},
        {"id": "L1", "parent": "L0", "compressed-diff-digest": D["blob1"], "compressed-size": 11,
         "diff-digest": D["diff1"], "diff-size": 21,
         **({"flags": {"incomplete": True}} if incomplete else {})},
    ])


def detail(names: Sequence[str] = ("127.0.0.1:5000/shop/app:v1",)) -> Dict[str, Any]:
    return {"Id": D["cfg"][7:], "Digest": D["idx"],
            "RepoDigests": [f"127.0.0.1:5000/shop/app@{D['idx']}", f"127.0.0.1:5000/shop/app@{D['man']}"],
            "RepoTags": list(names), "Os": "linux", "Architecture": "amd64",
            "RootFS": {"Type": "layers", "Layers": [D["diff0"], D["diff1"]]}}


def test_layer_chain_walks_from_the_top_and_refuses_gaps() -> None:
    layers = parse_layers(layers_json())
    chain = layer_chain("L1", layers)
    assert chain is not None and [l.id for l in chain] == ["L0", "L1"]
    assert layer_chain("L1", parse_layers(layers_json(incomplete=True))) is None
    assert layer_chain("L1", {k: v for k, v in layers.items() if k != "L0"}) is None
    # The blobs podman reuses a layer for: compressed digests and diff_ids, complete only.
    assert layer_blobs(parse_layers(layers_json(incomplete=True))) == {D["blob0"], D["diff0"]}


def test_held_images_one_per_recorded_digest_and_never_a_temporary_name() -> None:
    temp = "localhost/tmp/x/edgebundle-import-abc-1/0:latest"
    image = stored_image(detail(["127.0.0.1:5000/shop/app:v1", temp]),
                         layer_chain("L1", parse_layers(layers_json())))
    assert image is not None and image.complete and is_temp_name(temp)
    held = held_images(image)
    assert {(h.name, h.manifest) for h in held} == {("127.0.0.1:5000/shop/app:v1", D["idx"]),
                                                    ("127.0.0.1:5000/shop/app:v1", D["man"])}
    assert all(h.config == D["cfg"] and h.complete for h in held)
    assert [l.digest for l in held[0].layers] == [D["blob0"], D["blob1"]]
    # Layers that do not match the config's diff_ids: listed, not complete.
    broken = stored_image(detail(), layer_chain("L0", parse_layers(layers_json())))
    assert broken is not None and not broken.complete
    assert not any(h.complete for h in held_images(broken))


def test_podman_holdings_and_report_rules() -> None:
    image = stored_image(detail(), layer_chain("L1", parse_layers(layers_json())))
    assert image is not None
    inv = Inventory(runtime="podman", images=tuple(held_images(image)),
                    blobs=layer_blobs(parse_layers(layers_json())),
                    chains=frozenset(chain_ids(image.diff_ids)))
    h = Holdings(inv)
    assert h.image("127.0.0.1:5000/shop/app:v1", D["man"], D["cfg"]) is not None
    assert h.image("127.0.0.1:5000/shop/app:v1", D["idx"], D["cfg"]) is not None
    assert h.image("127.0.0.1:5000/shop/app:v1", D["other"], D["cfg"]) is None
    assert h.image("127.0.0.1:5000/shop/app:v1", D["man"], D["other"]) is None
    # Held by the blob podman reuses, never by chain alone.
    assert h.layer(D["blob0"], "sha256:" + "9" * 64)
    assert not h.layer(D["other"], chain_ids([D["diff0"]])[0])
    back = inventory_from_json(json.loads(json.dumps(inventory_to_json(inv))))
    assert back.runtime == "podman" and len(back.images) == 2
    # A report calling an image complete whose blob is not in blobs is refused.
    obj = inventory_to_json(inv)
    obj["blobs"] = [b for b in obj["blobs"] if b != D["blob1"]]
    with pytest.raises(InventoryError, match="its blob in blobs"):
        inventory_from_json(obj)


class FakePodman:
    """Answers the podman commands the runtime runs; ``load`` does what ``loads`` says."""

    def __init__(self, tmp: Path, inspect: Dict[str, Any], complete_after_load: bool) -> None:
        self.calls: List[List[str]] = []
        self.root = tmp / "root"
        (self.root / "overlay-layers").mkdir(parents=True)
        (self.root / "overlay-images").mkdir(parents=True)
        self.tmp = tmp / "spool"
        self.tmp.mkdir()
        self.inspect = inspect
        self.complete = complete_after_load
        self.arch = "amd64"

    def run(self, argv: Sequence[str], timeout: float) -> Completed:
        args = list(argv[1:])
        if args[:1] == ["--root"]:
            args = args[4:]  # after --root R --runroot RR
        self.calls.append(args)
        if args[:1] == ["info"]:
            return self._ok({"host": {"os": "linux", "arch": self.arch},
                             "store": {"graphRoot": str(self.root), "graphDriverName": "overlay",
                                       "imageCopyTmpDir": str(self.tmp)}})
        if args[:1] == ["load"]:
            self.inspect["RepoTags"] = [f"localhost{args[-1]}:latest"]  # as podman names it
            (self.root / "overlay-layers" / "layers.json").write_text(
                layers_json(incomplete=not self.complete))
            (self.root / "overlay-images" / "images.json").write_text(
                json.dumps([{"id": D["cfg"][7:], "layer": "L1"}]))
            return self._ok(None)
        if args[:2] == ["image", "inspect"]:
            return self._ok([self.inspect])
        if args[:1] == ["images"]:
            return self._ok([{"Id": D["cfg"][7:], "Names": self.inspect["RepoTags"]}])
        return self._ok(None)

    @staticmethod
    def _ok(obj: Optional[Any]) -> Completed:
        return Completed(0, json.dumps(obj).encode() if obj is not None else b"", b"")


def record() -> ImageRecord:
    man = Descriptor("application/vnd.oci.image.manifest.v1+json", D["man"], 100)
    gz = "application/vnd.oci.image.layer.v1.tar+gzip"
    return ImageRecord(
        name="127.0.0.1:5000/shop/app:v1", ref="127.0.0.1:5000/shop/app:v1", platform="linux/amd64",
        top=man, manifest=man,
        config=Descriptor("application/vnd.oci.image.config.v1+json", D["cfg"], 50),
        layers=(LayerRecord(gz, D["blob0"], 10, D["diff0"], -1, "blob"),
                LayerRecord(gz, D["blob1"], 11, D["diff1"], -1, "blob")))


@pytest.mark.parametrize("complete", [True, False])
def test_loader_names_an_image_only_once_it_is_read_back_complete(tmp_path: Path, complete: bool) -> None:
    fake = FakePodman(tmp_path, detail([]), complete)
    runtime = PodmanRuntime(Podman("podman", "/r", "/rr", runner=fake))
    loader = runtime.loader(runtime.inventory(), "linux/amd64")
    head = EntryHead(KIND_BLOB, D["blob1"], 3, CODEC_STORED,
                     media_type="application/vnd.oci.image.layer.v1.tar+gzip")
    assert loader.wants(head)
    loader.add(D["blob1"], 3, iter([b"abc"]))
    spool = next(fake.tmp.glob("edgebundle-import-*"))
    assert (spool / "blobs" / "sha256" / D["blob1"][7:]).read_bytes() == b"abc"
    if complete:
        assert loader.commit([record()]) == [record().name]
        assert ["tag", D["cfg"][7:], record().name] in fake.calls
    else:
        with pytest.raises(LoadError, match="left incomplete"):
            loader.commit([record()])
        assert not any(c[:1] == ["tag"] for c in fake.calls)
        loader.abort()
        temp = f"localhost{spool}/0:latest"
        assert ["untag", D["cfg"][7:], temp] in fake.calls  # the temporary name goes
    assert list(fake.tmp.glob("edgebundle-import-*")) == []  # and the spool


def test_an_index_for_another_platform_is_refused_before_podman_loads(tmp_path: Path) -> None:
    fake = FakePodman(tmp_path, detail([]), True)
    fake.arch = "arm64"
    runtime = PodmanRuntime(Podman("podman", runner=fake))
    rec = record()
    index = Descriptor("application/vnd.oci.image.index.v1+json", D["idx"], 80)
    loader = runtime.loader(runtime.inventory(), "linux/amd64")
    with pytest.raises(LoadError, match="packed for linux/amd64, but podman here loads linux/arm64"):
        loader.commit([dataclasses.replace(rec, top=index)])
    assert not any(c[:1] == ["load"] for c in fake.calls)
    assert loader.commit([rec]) == [rec.name]  # a single manifest loads whatever its platform


def test_space_needs_count_the_spool_twice_and_the_layers_in_the_graph_root() -> None:
    from edgebundle.importer.storage import podman_storage
    from edgebundle.space import Estimate, import_needs

    needs = import_needs(podman_storage("/var/tmp", "/var/lib/containers/storage"),
                         Estimate(100, 300, True))
    by_path: Dict[str, int] = {}
    for n in needs:
        by_path[n.path] = by_path.get(n.path, 0) + n.total
    # edgebundle's spool and containers/image's copy of each blob while it loads
    assert by_path == {"/var/tmp": 200, "/var/lib/containers/storage": 300}


def test_spool_parent_is_a_path_podman_can_name_an_image_after(tmp_path: Path) -> None:
    fake = FakePodman(tmp_path, detail([]), True)
    upper = tmp_path / "Spool"
    upper.mkdir()
    fake.tmp = upper
    # podman would name the image localhost<path>, which must be lowercase words
    assert Podman("podman", runner=fake).spool_parent() == "/var/tmp"
    fake2 = FakePodman(tmp_path / "b", detail([]), True)
    assert Podman("podman", runner=fake2).spool_parent() == str(fake2.tmp)


def test_spool_dirs_spell_a_repository_name(tmp_path: Path) -> None:
    """podman names the loaded image localhost<spool>/<i>: every spool must spell one
    (mkdtemp's random names hold '_', which fails at `-_` or at the end: seen in tests)."""
    import re

    component = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*")
    fake = FakePodman(tmp_path, detail([]), True)
    runtime = PodmanRuntime(Podman("podman", runner=fake))
    for _ in range(200):
        loader = runtime.loader(runtime.inventory(), "linux/amd64")
        loader.add(D["blob1"], 3, iter([b"abc"]))
        spool = next(iter(fake.tmp.glob("edgebundle-import-*")))
        assert component.fullmatch(spool.name), spool.name
        loader.abort()
