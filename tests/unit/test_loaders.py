"""The runtime seams, fed recorded output: what edgebundle reports and sends.

``Replay`` answers ``Ctr`` with the exact bytes containerd 1.6.20's ``ctr`` printed, and
``replay_dial`` answers ``DockerAPI`` with the exact HTTP responses dockerd 20.10.24 sent
(tests/fixtures/runtime). The parsers, the report and the loaders run unchanged.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

import pytest

from edgebundle.errors import LoadError, RuntimeUnavailableError
from edgebundle.format import EntryHead
from edgebundle.importer.containerd import TEMP_PREFIX, Completed, ContainerdRuntime, Ctr
from edgebundle.importer.docker import DockerAPI, DockerLoader, DockerRuntime
from edgebundle.oci import MT_DOCKER_CONFIG, MT_DOCKER_MANIFEST, MT_OCI_INDEX, chain_ids
from edgebundle.report import inventory_to_json
from fake_runtimes import FIXTURES, FakeContainerd, FakeEngine, fixture, read_request, sha

CTR_MAP = json.loads(fixture("ctr_images_map.json"))


class Replay:
    """A ctr ``Runner`` answering from recorded outputs; unknown commands fail the test."""

    def __init__(self, answers: Dict[Tuple[str, ...], Completed]) -> None:
        self.answers = answers
        self.calls: List[Tuple[str, ...]] = []

    def run(self, argv: Sequence[str], input: Optional[bytes], timeout: float) -> Completed:
        args = tuple(argv[list(argv).index("--namespace") + 2:])
        self.calls.append(args)
        if args[:2] == ("content", "get") and args not in self.answers:
            return Completed(1, b"", f"ctr: content digest {args[2]}: not found\n".encode())
        return self.answers[args]

    def start(self, argv: Sequence[str], stderr: IO[bytes]) -> Any:
        raise AssertionError("no import in a report")


def recorded_ctr() -> Replay:
    answers = {
        ("images", "ls"): Completed(0, (FIXTURES / "ctr_images_ls.txt").read_bytes(), b""),
        ("content", "ls", "-q"): Completed(0, (FIXTURES / "ctr_content_ls_q.txt").read_bytes(), b""),
        ("snapshots", "--snapshotter", "overlayfs", "ls"):
            Completed(0, (FIXTURES / "ctr_snapshots_ls.txt").read_bytes(), b""),
    }
    for name, info in CTR_MAP["blobs"].items():
        if info["rc"] == 0:
            answers[("content", "get", info["digest"])] = Completed(0, (FIXTURES / name).read_bytes(), b"")
    return Replay(answers)


def runtime_for(runner: Any, tmp_path: Path, namespace: str = "rec") -> ContainerdRuntime:
    sock = tmp_path / "containerd.sock"
    sock.touch()
    return ContainerdRuntime(Ctr(str(sock), namespace, runner=runner))


# ---------------------------------------------------------------------------
# containerd report


def test_containerd_report_from_recorded_outputs(tmp_path: Path) -> None:
    inv = runtime_for(recorded_ctr(), tmp_path).inventory()
    by_name = {i.name: i for i in inv.images}
    assert set(by_name) == {"127.0.0.1:42275/shop/tools:v1", "shop/app:latest", "shop/app:v1",
                            "shop/multi:v1", "shop/nolayer:v1"}
    # Unpacked and every blob present: complete.
    for name in ("shop/app:v1", "shop/multi:v1", "127.0.0.1:42275/shop/tools:v1"):
        assert by_name[name].complete, name
    # The image whose import failed on a missing layer: listed by ctr, never complete.
    assert not by_name["shop/nolayer:v1"].complete
    multi = by_name["shop/multi:v1"]
    assert multi.target is not None and multi.target.digest == CTR_MAP["blobs"]["blob_index.json"]["digest"]
    assert multi.manifest == CTR_MAP["blobs"]["blob_manifest.json"]["digest"]
    assert multi.platform == "linux/amd64"
    config = json.loads((FIXTURES / "blob_config.json").read_text())
    assert [l.diff_id for l in multi.layers] == config["rootfs"]["diff_ids"]
    assert all(l.unpacked for l in multi.layers)
    assert "rec-active" not in inv.chains  # only committed snapshots count
    assert inv.chains >= set(chain_ids(config["rootfs"]["diff_ids"]))


@pytest.mark.parametrize("damage,complete", [
    ("nothing", True),
    ("top snapshot", False),
    ("a lower layer's blob, its chain kept", True),  # discarded blobs, as CRI leaves them
    ("a lower layer's blob and chain", False),
    ("the config", False),
    ("the manifest", False),
])
def test_containerd_report_completeness(tmp_path: Path, damage: str, complete: bool) -> None:
    model = _seeded(tmp_path)
    img = model.seeded
    if damage == "top snapshot":
        model.snapshots.discard(img["chains"][-1])
    elif damage == "a lower layer's blob, its chain kept":
        model.content.pop(img["layers"][0])
    elif damage == "a lower layer's blob and chain":
        model.content.pop(img["layers"][0])
        model.snapshots.discard(img["chains"][0])
    elif damage == "the config":
        model.content.pop(img["config"])
    elif damage == "the manifest":
        model.content.pop(img["manifest"])
    (held,) = runtime_for(model, tmp_path, "k8s.io").inventory().images
    assert held.complete is complete


def _seeded(tmp_path: Path, *, index: bool = False) -> Any:
    """A model holding one complete two-layer image, named example.test/app:v1."""
    model = FakeContainerd("k8s.io")
    tars = [b"layer one" * 100, b"layer two" * 100]
    blobs = [b"blob:" + t for t in tars]  # stand-ins: containerd never opens them for a report
    diff_ids = [sha(t) for t in tars]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_DOCKER_MANIFEST,
                           "config": {"mediaType": MT_DOCKER_CONFIG, "digest": sha(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                                       "digest": sha(b), "size": len(b)} for b in blobs]}).encode()
    for data in blobs + [config, manifest]:
        model.content[sha(data)] = data
    top_type, top = MT_DOCKER_MANIFEST, sha(manifest)
    if index:
        idx = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": [
            {"mediaType": MT_DOCKER_MANIFEST, "digest": sha(manifest), "size": len(manifest),
             "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
        model.content[sha(idx)] = idx
        top_type, top = MT_OCI_INDEX, sha(idx)
    model.images["example.test/app:v1"] = (top_type, top)
    chains = list(chain_ids(diff_ids))
    model.snapshots.update(chains)
    model.seeded = {"layers": [sha(b) for b in blobs], "config": sha(config), "manifest": sha(manifest),
                    "chains": chains, "top": top}
    return model


def test_containerd_report_never_shows_temporary_names(tmp_path: Path) -> None:
    model = _seeded(tmp_path)
    model.images[f"{TEMP_PREFIX}abc/0:pending"] = model.images["example.test/app:v1"]
    rt = runtime_for(model, tmp_path, "k8s.io")
    assert [i.name for i in rt.inventory().images] == ["example.test/app:v1"]
    assert len(rt.inventory(include_temp=True).images) == 2


@pytest.mark.parametrize("content", [
    b'{"schemaVersion": 2, "manifests": [{"mediaType": "x", "digest": "sha512:' + b"ab" * 64
    + b'", "size": 3, "platform": {"os": "linux", "architecture": "amd64"}}]}',
    b"not json at all",
    b'["a list"]',
    b'{"schemaVersion": 2, "config": "nope", "layers": 5}',
])
def test_containerd_report_survives_odd_content(tmp_path: Path, content: bytes) -> None:
    """Whatever the content store holds, the report says "incomplete", never crashes."""
    model = _seeded(tmp_path, index=True)
    model.content[sha(content)] = content
    model.images["example.test/odd:v1"] = (MT_OCI_INDEX, sha(content))
    inv = runtime_for(model, tmp_path, "k8s.io").inventory()
    by_name = {i.name: i for i in inv.images}
    assert by_name["example.test/app:v1"].complete
    assert not by_name["example.test/odd:v1"].complete
    json.dumps(inventory_to_json(inv))  # and it still serialises


def test_containerd_content_gone_between_list_and_get(tmp_path: Path) -> None:
    """A GC between `content ls` and `content get`: the image is incomplete, no error."""
    model = _seeded(tmp_path)
    rt = runtime_for(model, tmp_path, "k8s.io")
    real = model.run

    def racing(argv: Sequence[str], input: Optional[bytes], timeout: float) -> Completed:
        if list(argv)[-2:-1] == ["get"]:
            return Completed(1, b"", (FIXTURES / "ctr_content_get_missing.stderr").read_bytes())
        return real(argv, input, timeout)

    model.run = racing  # type: ignore[method-assign]
    (held,) = rt.inventory().images
    assert not held.complete and held.target is None


@pytest.mark.parametrize("stderr_file,error", [
    ("ctr_refused_images_ls.stderr", RuntimeUnavailableError),
    ("ctr_nosocket_images_ls.stderr", RuntimeUnavailableError),
    ("ctr_tag_missing_source.stderr", LoadError),
])
def test_ctr_failures_become_one_line_errors(tmp_path: Path, stderr_file: str, error: type) -> None:
    stderr = (FIXTURES / stderr_file).read_bytes()
    replay = Replay({("images", "ls"): Completed(1, b"", stderr)})
    with pytest.raises(error) as info:
        runtime_for(replay, tmp_path).ctr.images()
    assert "\n" not in str(info.value)


def test_missing_socket_is_refused_before_running_ctr(tmp_path: Path) -> None:
    replay = Replay({})
    ctr = Ctr(str(tmp_path / "absent.sock"), runner=replay)
    with pytest.raises(RuntimeUnavailableError, match="does not exist"):
        ctr.images()
    assert replay.calls == []


# ---------------------------------------------------------------------------
# Docker


def replay_dial(routes: Dict[str, str]) -> Any:
    """A ``DockerAPI`` dial whose far end answers each request path with a recorded .http file."""
    seen: List[str] = []

    def dial() -> socket.socket:
        ours, theirs = socket.socketpair()

        def serve() -> None:
            with theirs, theirs.makefile("rb") as rfile:
                req = read_request(rfile)
                seen.append(f"{req.method} {req.path}")
                name = routes.get(f"{req.method} {req.path}", "docker_get_image_inspect_missing")
                theirs.sendall((FIXTURES / f"{name}.http").read_bytes())

        threading.Thread(target=serve, daemon=True).start()
        return ours

    dial.seen = seen  # type: ignore[attr-defined]
    return dial


WORKER = "sha256:b44d7a4c89117aab0d1108d11bebab3db25b5d50c5e7babed12f7ccae5f590fd"
DANGLING = "sha256:78c5d6201207f6fdac7e669c8b552e105c07cb56b18b9ae8b5bae3a6b4f15d6b"


def test_docker_report_from_recorded_responses() -> None:
    dial = replay_dial({"GET /images/json?all=1": "docker_get_images_json_all",
                        f"GET /images/{WORKER}/json": "docker_get_image_inspect",
                        f"GET /images/{DANGLING}/json": "docker_get_image_inspect_dangling",
                        "GET /info": "docker_get_info"})
    inv = DockerRuntime(DockerAPI("unix:///x.sock", dial=dial)).inventory()
    worker = json.loads(fixture("docker_get_image_inspect.body"))
    dangling = json.loads(fixture("docker_get_image_inspect_dangling.body"))
    # Both tags of the twice-tagged image, normalised; the dangling one has no name.
    assert {i.name for i in inv.images} == {"docker.io/shop/worker:latest", "docker.io/shop/worker:v1"}
    assert all(i.config == WORKER and i.complete and i.platform == "linux/amd64" for i in inv.images)
    assert [l.diff_id for l in inv.images[0].layers] == worker["RootFS"]["Layers"]
    # Every image's chains are in the layer store, a dangling image's too.
    assert inv.chains == set(chain_ids(worker["RootFS"]["Layers"])) | \
        set(chain_ids(dangling["RootFS"]["Layers"]))
    # Images that vanished between list and inspect (recorded 404s) are simply skipped.
    assert len(dial.seen) == 8  # /info once: where the layer store is (delta bases)


def test_docker_load_error_in_a_200_response_is_a_load_error() -> None:
    dial = replay_dial({"POST /images/load?quiet=1": "docker_post_images_load_missing_layer"})
    loader = DockerLoader(DockerRuntime(DockerAPI("unix:///x.sock", dial=dial)))
    with pytest.raises(LoadError, match="docker refused the load: open .*layer.tar: no such file"):
        loader.commit([])


def test_docker_non_json_answer_is_a_load_error() -> None:
    dial = replay_dial({"GET /images/json?all=1": "docker_get_ping"})  # "OK", not JSON
    with pytest.raises(LoadError, match="not JSON"):
        DockerRuntime(DockerAPI("unix:///x.sock", dial=dial)).inventory()


def test_docker_unreachable_socket(tmp_path: Path) -> None:
    with pytest.raises(RuntimeUnavailableError, match="unreachable"):
        DockerRuntime(DockerAPI(f"unix://{tmp_path}/none.sock")).inventory()


def test_docker_loader_wants_configs_and_layers_not_manifests() -> None:
    loader = DockerLoader(DockerRuntime(DockerAPI("unix:///x.sock", dial=FakeEngine().dial)))
    d = "sha256:" + "a" * 64
    assert loader.wants(EntryHead("blob", d, 1, 0, media_type=MT_DOCKER_CONFIG))
    assert loader.wants(EntryHead("blob", d, 1, 0, media_type="application/vnd.oci.image.layer.v1.tar"))
    for manifest_type in (MT_DOCKER_MANIFEST, MT_OCI_INDEX,
                          "application/vnd.oci.image.manifest.v1+json",
                          "application/vnd.docker.distribution.manifest.list.v2+json"):
        assert not loader.wants(EntryHead("blob", d, 1, 0, media_type=manifest_type))
