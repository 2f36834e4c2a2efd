"""Plan time for many synthetic sites: ``edgebundle.plan.plan_bundle`` called directly.

50 images (5 shared bases of 3 layers, 1-6 own layers each); every site holds each image
at the current version (80%), an older version (15%) or not at all (5%), drawn from a
seeded RNG so the workload is identical on every run. Held-image objects are shared
between sites (they are immutable), so building 10,000 inventories is cheap and what is
timed is the planning.
"""

from __future__ import annotations

import cProfile
import hashlib
import io
import pstats
import random
import time
from typing import Any, Dict, List, Tuple

from edgebundle.holdings import HeldImage, HeldLayer, Inventory
from edgebundle.image import Layer, ResolvedImage
from edgebundle.naming import docker_tag
from edgebundle.oci import Descriptor, MT_OCI_CONFIG, MT_OCI_LAYER_GZIP, MT_OCI_MANIFEST, Platform, chain_ids
from edgebundle.plan import plan_bundle
from edgebundle.reference import parse_reference

REGISTRY = "registry.example.com:5000"


def _digest(*parts: object) -> str:
    return "sha256:" + hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


def _layer(*seed: object) -> Layer:
    n = int(_digest(*seed)[7:15], 16)
    return Layer(MT_OCI_LAYER_GZIP, _digest("blob", *seed), 1_000_000 + n % 50_000_000,
                 _digest("diff", *seed), 3_000_000 + n % 90_000_000)


def _image(i: int, version: int) -> ResolvedImage:
    base = i % 5
    layers = [_layer("base", base, j) for j in range(3)]
    own = 1 + i % 6
    layers += [_layer("img", i, j, version if j == own - 1 else 0) for j in range(own)]
    ref = parse_reference(f"{REGISTRY}/fleet/svc-{i:02d}:v{version}")
    manifest = Descriptor(MT_OCI_MANIFEST, _digest("manifest", i, version), 1200 + own * 160)
    config = Descriptor(MT_OCI_CONFIG, _digest("config", i, version), 3000 + own * 200)
    return ResolvedImage(ref, manifest, Platform("linux", "amd64"), manifest, config, tuple(layers))


def _held(img: ResolvedImage, runtime: str) -> Tuple[HeldImage, frozenset, frozenset]:
    ids = chain_ids(l.diff_id for l in img.layers)
    layers = tuple(HeldLayer(l.diff_id, l.digest, l.size, runtime == "containerd", True) for l in img.layers)
    name = docker_tag(img.name) if runtime == "docker" else img.name
    held = HeldImage(name=name, config=img.config.digest,
                     target=img.top if runtime == "containerd" else None,
                     manifest=img.manifest.digest, platform="linux/amd64", complete=True, layers=layers)
    blobs = frozenset([img.top.digest, img.manifest.digest, img.config.digest,
                       *(l.digest for l in img.layers)]) if runtime == "containerd" else frozenset()
    return held, blobs, frozenset(ids)


def build_workload(sites: int, images: int, runtime: str,
                   seed: int = 42) -> Tuple[List[ResolvedImage], List[Inventory]]:
    current = [_image(i, 7) for i in range(images)]
    variants = {i: {"cur": _held(current[i], runtime), "old": _held(_image(i, 6), runtime)}
                for i in range(images)}
    rng = random.Random(seed)
    invs = []
    for _ in range(sites):
        held: List[HeldImage] = []
        blobs: set = set()
        chains: set = set()
        for i in range(images):
            r = rng.random()
            if r < 0.05:
                continue
            h, b, c = variants[i]["cur" if r < 0.85 else "old"]
            held.append(h)
            blobs |= b
            chains |= c
        invs.append(Inventory(runtime=runtime, namespace="k8s.io" if runtime == "containerd" else None,
                              images=tuple(held), blobs=frozenset(blobs), chains=frozenset(chains)))
    return current, invs


def run(sites: int, images: int, runtime: str, budget_s: float) -> Dict[str, Any]:
    t0 = time.monotonic()
    imgs, invs = build_workload(sites, images, runtime)
    setup = time.monotonic() - t0
    done = 0
    ship_images = 0
    t0 = time.perf_counter()
    for n, inv in enumerate(invs):
        plan = plan_bundle(f"site-{n}", imgs, inv, runtime=runtime, namespace=inv.namespace,
                           platform="linux/amd64")
        ship_images += len(plan.to_ship)
        done += 1
        if time.perf_counter() - t0 > budget_s:
            break
    elapsed = time.perf_counter() - t0
    return {"runtime": runtime, "sites": sites, "images": images, "planned": done,
            "seconds": elapsed, "per_site_ms": 1000 * elapsed / done,
            "projected_s": elapsed / done * sites, "setup_s": setup,
            "ship_images": ship_images, "complete": done == sites}


def profile(sites: int, images: int, runtime: str, top: int = 12) -> str:
    imgs, invs = build_workload(sites, images, runtime)
    prof = cProfile.Profile()
    prof.enable()
    for n, inv in enumerate(invs):
        plan_bundle(f"site-{n}", imgs, inv, runtime=runtime, namespace=inv.namespace,
                    platform="linux/amd64")
    prof.disable()
    out = io.StringIO()
    st = pstats.Stats(prof, stream=out)
    st.sort_stats("tottime").print_stats(top)
    lines = [l.rstrip() for l in out.getvalue().splitlines()]
    # keep the table only (drop the pstats preamble)
    start = next((i for i, l in enumerate(lines) if l.strip().startswith("ncalls")), 0)
    head = next((l.strip() for l in lines if "function calls" in l), "")
    return "\n".join([f"cProfile of plan_bundle over {sites} {runtime} sites x {images} images: {head}", "",
                      *[l.replace(str(_repo_root()), "") for l in lines[start:] if l.strip()]])


def _repo_root() -> str:
    import edgebundle
    import os
    return os.path.dirname(os.path.dirname(edgebundle.__file__)) + "/"
