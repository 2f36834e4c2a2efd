"""Pure logic of edgebundle.plan and edgebundle.holdings with hand-built images and inventories."""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import pytest

from edgebundle.holdings import HeldImage, Inventory
from edgebundle.image import Layer, ResolvedImage
from edgebundle.oci import Descriptor, MT_DOCKER_CONFIG, MT_DOCKER_LAYER_GZIP, MT_DOCKER_MANIFEST, MT_OCI_INDEX, Platform, chain_ids
from edgebundle.format import Prerequisite
from edgebundle.holdings import Holdings
from edgebundle.plan import Plan, default_layer_form, plan_bundle, with_layer_info
from edgebundle.reference import parse_reference


def shipped_entries(p: Plan) -> frozenset:
    return frozenset(lp.entry for ip in p.images for lp in ip.layers if lp.ship)


def image_present(inv: Inventory, img: ResolvedImage) -> Optional[HeldImage]:
    return Holdings(inv).image(img.name, img.top.digest, img.config.digest)


def d(n: int) -> str:
    return "sha256:" + f"{n:064x}"


def layer(n: int) -> Layer:
    """Layer n: blob digest d(n), diff_id d(10_000 + n), registry size 1000 * n."""
    return Layer(MT_DOCKER_LAYER_GZIP, d(n), 1000 * n, d(10_000 + n), 3000 * n)


def image(name: str, layers: Sequence[int], *, tag: int = 0, index: bool = False) -> ResolvedImage:
    """``tag`` varies the json blobs (config 500+tag, manifest 600+tag, index 700+tag)."""
    manifest = Descriptor(MT_DOCKER_MANIFEST, d(600_000 + tag), 60 + tag)
    top = Descriptor(MT_OCI_INDEX, d(700_000 + tag), 70 + tag) if index else manifest
    config = Descriptor(MT_DOCKER_CONFIG, d(500_000 + tag), 50 + tag)
    return ResolvedImage(parse_reference(name), top, Platform.parse("linux/arm64"), manifest,
                         config, tuple(layer(n) for n in layers))


def plan(images: Sequence[ResolvedImage], inv: Inventory, runtime: Optional[str] = None):
    rt = runtime or inv.runtime
    return plan_bundle("gw-01", images, inv, runtime=rt,
                       namespace="k8s.io" if rt == "containerd" else None, platform="linux/arm64")


CTR = Inventory.empty("containerd", "k8s.io")
DOCKER = Inventory.empty("docker")


def test_chain_ids_follow_the_oci_definition() -> None:
    a, b, c = d(1), d(2), d(3)
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert chain_ids([a, b, c]) == (a, ab, abc)
    assert chain_ids([]) == ()


def test_default_layer_forms() -> None:
    assert default_layer_form("containerd") == "blob"
    assert default_layer_form("docker") == "tar"


@pytest.mark.parametrize("inv", [CTR, DOCKER])
def test_empty_site_ships_everything(inv: Inventory) -> None:
    img = image("example.test/shop/app:v1", [1, 2, 3], index=True)
    p = plan([img], inv)
    assert p.prerequisites == ()
    assert p.to_ship == p.images
    (ip,) = p.images
    assert not ip.up_to_date
    assert [lp.ship for lp in ip.layers] == [True, True, True]
    assert [lp.chain_id for lp in ip.layers] == list(img.chain_ids)
    assert p.ship_bytes == p.full_bytes == 70 + 60 + 50 + 6000
    assert p.site == "gw-01" and p.platform == "linux/arm64"


def test_containerd_counts_blob_or_chain() -> None:
    img = image("example.test/shop/app:v1", [1, 2, 3])
    chains = img.chain_ids
    inv = Inventory(runtime="containerd", namespace="k8s.io",
                    blobs=frozenset({d(1)}), chains=frozenset({chains[1]}))
    p = plan([img], inv)
    assert [lp.ship for lp in p.images[0].layers] == [False, False, True]
    assert p.prerequisites == (Prerequisite(chains[0], d(10_001), d(1)),
                               Prerequisite(chains[1], d(10_002), d(2)))
    assert shipped_entries(p) == frozenset({d(3)})
    assert p.images[0].ship_bytes == 60 + 50 + 3000


def test_docker_counts_only_chains() -> None:
    img = image("example.test/shop/app:v1", [1, 2, 3])
    chains = img.chain_ids
    # the blob digests of every layer and the diff_id as a "blob" mean nothing to Docker
    inv = Inventory(runtime="docker", blobs=frozenset({d(1), d(2), d(3), d(10_001)}),
                    chains=frozenset({chains[0]}))
    p = plan([img], inv)
    assert [lp.ship for lp in p.images[0].layers] == [False, True, True]
    assert [pr.chain_id for pr in p.prerequisites] == [chains[0]]


def test_docker_diff_id_alone_is_not_a_chain() -> None:
    """Layer 2's diff_id held as a chain at the bottom of some other image does not count."""
    img = image("example.test/shop/app:v1", [1, 2])
    inv = Inventory(runtime="docker", chains=frozenset({d(10_002)}))
    p = plan([img], inv)
    assert [lp.ship for lp in p.images[0].layers] == [True, True]
    assert p.prerequisites == ()


def test_shared_layer_ships_once() -> None:
    a = image("example.test/shop/app:v1", [1, 2], tag=1)
    b = image("example.test/shop/tool:v1", [1, 3], tag=2)
    p = plan([a, b], CTR)
    assert [lp.ship for lp in p.images[0].layers] == [True, True]
    assert [lp.ship for lp in p.images[1].layers] == [False, True]
    assert not p.images[1].up_to_date
    assert p.prerequisites == ()
    assert shipped_entries(p) == frozenset({d(1), d(2), d(3)})
    json_bytes = (51 + 61) + (52 + 62)
    assert p.ship_bytes == json_bytes + 1000 + 2000 + 3000
    assert p.full_bytes == json_bytes + 1000 + 2000 + 3000


def test_shared_layer_ships_once_in_tar_form_keyed_by_diff_id() -> None:
    a = image("example.test/shop/app:v1", [1, 2], tag=1)
    b = image("example.test/shop/tool:v1", [3, 2], tag=2)  # layer 2 on another parent
    p = plan([a, b], DOCKER)
    assert p.layer_form == "tar"
    assert [lp.entry for lp in p.images[0].layers] == [d(10_001), d(10_002)]
    assert [lp.ship for lp in p.images[1].layers] == [True, False]
    assert shipped_entries(p) == frozenset({d(10_001), d(10_002), d(10_003)})


def test_blob_form_entries_keyed_by_digest() -> None:
    p = plan([image("example.test/shop/app:v1", [1, 2])], CTR)
    assert p.layer_form == "blob"
    assert [lp.entry for lp in p.images[0].layers] == [d(1), d(2)]


def test_containerd_needs_blob_form() -> None:
    with pytest.raises(ValueError):
        plan_bundle("gw-01", [], CTR, runtime="containerd", namespace="k8s.io",
                    platform="linux/arm64", layer_form="tar")


def test_docker_may_take_blob_form_explicitly() -> None:
    p = plan_bundle("gw-01", [image("example.test/a:v1", [1])], DOCKER, runtime="docker",
                    namespace=None, platform="linux/arm64", layer_form="blob")
    assert p.layer_form == "blob" and p.images[0].layers[0].entry == d(1)


# --- up to date ----------------------------------------------------------------


def test_containerd_up_to_date_by_name_and_top() -> None:
    img = image("example.test/shop/app:v1", [1, 2], index=True)
    other = image("example.test/shop/tool:v1", [3], tag=9)
    held = HeldImage("example.test/shop/app:v1", img.config.digest, target=img.top)
    inv = Inventory(runtime="containerd", namespace="k8s.io", images=(held,),
                    blobs=frozenset({d(1), d(2)}), chains=frozenset(img.chain_ids))
    assert image_present(inv, img) == held
    p = plan([img, other], inv)
    assert p.images[0].up_to_date and not p.images[1].up_to_date
    assert p.to_ship == (p.images[1],)
    assert [lp.ship for lp in p.images[0].layers] == [False, False]
    assert p.prerequisites == ()  # an up-to-date image adds none
    assert p.images[0].ship_bytes == 0
    assert p.ship_bytes == 50 + 9 + 60 + 9 + 3000
    assert p.full_bytes == 70 + 60 + 50 + 1000 + 2000 + (50 + 9 + 60 + 9 + 3000)


def test_containerd_same_name_other_top_is_not_up_to_date() -> None:
    img = image("example.test/shop/app:v1", [1], index=True)
    held = HeldImage("example.test/shop/app:v1", img.config.digest, target=img.manifest)
    inv = Inventory(runtime="containerd", images=(held,))
    assert image_present(inv, img) is None
    assert not plan([img], inv).images[0].up_to_date


def test_containerd_same_top_other_name_is_not_up_to_date() -> None:
    img = image("example.test/shop/app:v1", [1])
    held = HeldImage("example.test/shop/app:v0", img.config.digest, target=img.top)
    inv = Inventory(runtime="containerd", images=(held,))
    assert image_present(inv, img) is None


def test_containerd_names_are_normalised() -> None:
    img = image("alpine:3.19", [1])
    held = HeldImage("docker.io/library/alpine:3.19", img.config.digest, target=img.top)
    assert image_present(Inventory(runtime="containerd", images=(held,)), img) == held
    held2 = HeldImage("alpine:3.19", img.config.digest, target=img.top)
    assert image_present(Inventory(runtime="containerd", images=(held2,)), img) == held2


def test_containerd_pinned_image_up_to_date() -> None:
    base = image("example.test/shop/app:v1", [1], index=True)
    ref = parse_reference(f"example.test/shop/app@{base.top.digest}")
    img = ResolvedImage(ref, base.top, base.platform, base.manifest, base.config, base.layers)
    assert img.name == f"example.test/shop/app@{base.top.digest}"
    held = HeldImage(img.name, img.config.digest, target=img.top)
    assert image_present(Inventory(runtime="containerd", images=(held,)), img) == held


def test_incomplete_image_is_not_up_to_date() -> None:
    img = image("example.test/shop/app:v1", [1, 2])
    held = HeldImage(img.name, img.config.digest, target=img.top, complete=False)
    inv = Inventory(runtime="containerd", images=(held,), blobs=frozenset({d(1)}))
    assert image_present(inv, img) is None
    p = plan([img], inv)
    assert not p.images[0].up_to_date
    assert [lp.ship for lp in p.images[0].layers] == [False, True]
    assert len(p.prerequisites) == 1
    dheld = HeldImage(img.name, img.config.digest, complete=False)
    assert image_present(Inventory(runtime="docker", images=(dheld,)), img) is None


def test_docker_up_to_date_by_tag_and_config() -> None:
    img = image("example.test/shop/app:v1", [1, 2])
    held = HeldImage("example.test/shop/app:v1", img.config.digest)  # Docker: no target
    inv = Inventory(runtime="docker", images=(held,), chains=frozenset(img.chain_ids))
    assert image_present(inv, img) == held
    p = plan([img], inv)
    assert p.images[0].up_to_date and p.prerequisites == () and p.to_ship == ()
    assert p.ship_bytes == 0


def test_docker_other_config_is_not_up_to_date() -> None:
    img = image("example.test/shop/app:v1", [1])
    held = HeldImage("example.test/shop/app:v1", d(42))
    assert image_present(Inventory(runtime="docker", images=(held,)), img) is None


def test_docker_pinned_name_matches_sha256_tag() -> None:
    base = image("example.test/shop/app:v1", [1], index=True)
    ref = parse_reference(f"example.test/shop/app@{base.top.digest}")
    img = ResolvedImage(ref, base.top, base.platform, base.manifest, base.config, base.layers)
    tag = f"example.test/shop/app:sha256-{base.top.digest[7:]}"
    held = HeldImage(tag, img.config.digest)
    assert image_present(Inventory(runtime="docker", images=(held,)), img) == held
    # the pinned name itself is not what Docker holds
    held_at = HeldImage(img.name, img.config.digest)
    assert image_present(Inventory(runtime="docker", images=(held_at,)), img) is None
    # the plain tag of another version is not it either
    held_v1 = HeldImage("example.test/shop/app:v1", img.config.digest)
    assert image_present(Inventory(runtime="docker", images=(held_v1,)), img) is None


# --- prerequisites -------------------------------------------------------------


def test_prerequisites_dedup_by_chain() -> None:
    a = image("example.test/shop/app:v1", [1, 2], tag=1)
    b = image("example.test/shop/tool:v1", [1, 3], tag=2)
    c = image("example.test/shop/odd:v1", [4, 1], tag=3)  # layer 1 on another chain
    inv = Inventory(runtime="containerd", blobs=frozenset({d(1)}))
    p = plan([a, b, c], inv)
    chains = [pr.chain_id for pr in p.prerequisites]
    assert len(chains) == len(set(chains)) == 2
    assert set(chains) == {a.chain_ids[0], c.chain_ids[1]}
    assert all(pr.digest == d(1) and pr.diff_id == d(10_001) for pr in p.prerequisites)
    assert p.prerequisites[0].to_wire() == {"chain_id": a.chain_ids[0], "diff_id": d(10_001),
                                            "digest": d(1)}


def test_missing_prerequisites() -> None:
    img = image("example.test/shop/app:v1", [1, 2, 3])
    chains = img.chain_ids
    prereqs = [Prerequisite(c, l.diff_id, l.digest) for c, l in zip(chains, img.layers)]
    ctr = Inventory(runtime="containerd", blobs=frozenset({d(1)}), chains=frozenset({chains[2]}))
    assert Holdings(ctr).missing(prereqs) == [prereqs[1]]
    assert Holdings(ctr).missing_names(prereqs) == [d(2)]
    docker = Inventory(runtime="docker", blobs=frozenset({d(1), d(2), d(3)}),
                       chains=frozenset({chains[1]}))
    assert Holdings(docker).missing(prereqs) == [prereqs[0], prereqs[2]]
    assert Holdings(docker).missing_names(prereqs) == [d(10_001), d(10_003)]
    assert Holdings(CTR).missing([]) == []
    assert Holdings(CTR).missing(prereqs) == prereqs


def test_plan_round_trips_through_the_device_check() -> None:
    """What the packer assumed held, the device check finds held (same inventory)."""
    img = image("example.test/shop/app:v1", [1, 2, 3, 4])
    chains = img.chain_ids
    for inv in (Inventory(runtime="containerd", blobs=frozenset({d(1), d(3)}),
                          chains=frozenset({chains[1]})),
                Inventory(runtime="docker", chains=frozenset(chains[:3]))):
        p = plan([img], inv)
        assert p.prerequisites
        assert Holdings(inv).missing(p.prerequisites) == []
        assert Holdings(Inventory.empty(inv.runtime)).missing(p.prerequisites) == \
            list(p.prerequisites)


# --- arithmetic ----------------------------------------------------------------


def test_ship_and_full_bytes() -> None:
    a = image("example.test/shop/app:v1", [1, 2, 3], tag=1, index=True)
    b = image("example.test/shop/tool:v1", [1, 4], tag=2)
    inv = Inventory(runtime="containerd", blobs=frozenset({d(2)}))
    p = plan([a, b], inv)
    a_json = (70 + 1) + (60 + 1) + (50 + 1)
    b_json = (60 + 2) + (50 + 2)
    assert p.images[0].full_bytes == a_json + 1000 + 2000 + 3000
    assert p.images[0].ship_bytes == a_json + 1000 + 3000
    assert p.images[1].full_bytes == b_json + 1000 + 4000
    assert p.images[1].ship_bytes == b_json + 4000  # layer 1 already counted for a
    assert p.ship_bytes == a_json + b_json + 1000 + 3000 + 4000
    assert p.full_bytes == a_json + b_json + 1000 + 2000 + 3000 + 4000


def test_ship_bytes_never_exceed_full_bytes_for_two_tags_of_one_image() -> None:
    a = image("example.test/shop/app:v1", [1, 2])
    b = image("example.test/shop/app:stable", [1, 2])  # same content, another tag
    p = plan([a, b], CTR)
    assert p.full_bytes == 60 + 50 + 1000 + 2000
    assert p.ship_bytes == p.full_bytes


def test_with_layer_info_keeps_decisions_and_fills_tar_sizes() -> None:
    """Pack plans once: fetched layer info refines the plan without re-deciding anything."""
    a = image("example.test/shop/app:v1", [1, 2, 3])
    unknown = ResolvedImage(a.ref, a.top, a.platform, a.manifest, a.config,
                            tuple(Layer(l.media_type, l.digest, l.size, l.diff_id, -1) for l in a.layers))
    inv = Inventory(runtime="docker", chains=frozenset(a.chain_ids[:1]))
    p = plan([unknown], inv, runtime="docker")
    refined = with_layer_info(p, [a])
    assert [lp.ship for lp in refined.images[0].layers] == [lp.ship for lp in p.images[0].layers]
    assert refined.prerequisites == p.prerequisites
    assert [l.tar_size for l in refined.images[0].image.layers] == [3000, 6000, 9000]
    assert [lp.layer.tar_size for lp in refined.images[0].layers] == [3000, 6000, 9000]
    # A layer with another diff_id under the same digest is not taken over.
    odd = ResolvedImage(a.ref, a.top, a.platform, a.manifest, a.config,
                        (Layer(MT_DOCKER_LAYER_GZIP, d(1), 1000, d(99), 5),) + a.layers[1:])
    assert with_layer_info(p, [odd]).images[0].layers[0].layer.tar_size == -1
