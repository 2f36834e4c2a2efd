"""`edgebundle export` without daemons: archives from an offline OCI layout, read back whole.

The real consumers (ctr as k3s imports, docker load, podman load) are in
tests/integration/test_export_real.py; here the layouts, names, compression rules and
failures are checked through the real CLI and the archive writer's I/O seams.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

import pytest
import zstandard

from edgebundle import archive
from edgebundle.archive import ArchiveImage, ArchiveLayer
from edgebundle.cache import BlobCache
from edgebundle.cli.main import main
from edgebundle.errors import UsageError
from edgebundle.oci import Descriptor
from tiny_images import APP, BASE, TOOL, Images, write_oci_layout


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class World:
    """Two images sharing a base layer (one behind an index) in an OCI layout source."""

    def __init__(self, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp = tmp
        self.capsys = capsys
        self.images = Images(BlobCache(tmp / "build"))
        self.app = self.images.image("example.test/shop/app:v1", [BASE, APP], index=True)
        self.tool = self.images.image("example.test/shop/tool:v1", [BASE, TOOL])
        write_oci_layout(tmp / "layout", self.images.cache, [self.app, self.tool])
        self.manifest = tmp / "m.yaml"
        self.manifest.write_text(f"""version: 1
images:
  - ref: example.test/shop/app:v1
    source: oci-layout:{tmp / 'layout'}
  - ref: example.test/shop/tool:v1
    source: oci-layout:{tmp / 'layout'}
    sites: [gw]
sites:
  gw: {{runtime: containerd, namespace: k8s.io, platform: linux/amd64}}
  line: {{runtime: docker, platform: linux/amd64}}
""")
        self.home = tmp / "home"

    def eb(self, *argv: str, code: int = 0) -> Tuple[str, str]:
        self.capsys.readouterr()
        rc = main(["--home", str(self.home), *argv])
        out, err = self.capsys.readouterr()
        assert rc == code, err
        return out, err

    def export(self, site: str, fmt: str, name: str, *extra: str) -> Tuple[Dict[str, Any], Path]:
        path = self.tmp / name
        out, _ = self.eb("export", str(self.manifest), "--site", site, "--format", fmt,
                         "-o", str(path), "--json", *extra)
        return json.loads(out), path


def members(data: bytes) -> List[Tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]  # type: ignore[union-attr]


def check_blobs(files: Iterable[Tuple[str, bytes]]) -> None:
    """Every blobs/sha256/<hex> member is what its name says."""
    for name, data in files:
        if name.startswith("blobs/sha256/"):
            assert sha(data)[7:] == name.rsplit("/", 1)[1], name


@pytest.fixture()
def world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> World:
    return World(tmp_path, capsys)


def test_oci_archive_holds_the_registry_blobs_once_and_names_the_top(world: World) -> None:
    summary, path = world.export("gw", "oci-archive", "gw.tar")
    files = members(path.read_bytes())
    names = [n for n, _ in files]
    assert names[0] == "oci-layout" and names[-1] == "index.json"
    assert len(names) == len(set(names))  # the shared base layer once
    check_blobs(files)
    index = json.loads(dict(files)["index.json"])
    by_name = {m["annotations"][archive.ANNOTATION_CONTAINERD_NAME]: m for m in index["manifests"]}
    assert {n: m["digest"] for n, m in by_name.items()} == {
        "example.test/shop/app:v1": world.app.top.digest,  # the index, kept
        "example.test/shop/tool:v1": world.tool.top.digest}
    for n, m in by_name.items():
        assert m["annotations"][archive.ANNOTATION_REF_NAME] == n
    blobs = {n.rsplit("/", 1)[1] for n in names if n.startswith("blobs/")}
    wanted = {d.digest[7:] for img in (world.app, world.tool)
              for d in list(img.json_blobs) + [Descriptor(la.media_type, la.digest, la.size)
                                               for la in img.layers]}
    assert blobs == wanted
    assert summary["format"] == "oci-archive" and summary["compression"] == "none"
    assert summary["bytes"] == path.stat().st_size
    assert [i["named"] for i in summary["images"]] == [world.app.top.digest, world.tool.top.digest]


def test_k3s_airgap_names_platform_manifests_and_fits_k3s_zstd_window(world: World) -> None:
    # level 22 would pick a 128 MiB window: k3s decodes at most 32 MiB
    summary, path = world.export("gw", "k3s-airgap", "images.tar.zst", "--level", "22")
    raw = path.read_bytes()
    assert zstandard.get_frame_parameters(raw).window_size <= 1 << archive.K3S_MAX_WINDOW_LOG
    data = zstandard.ZstdDecompressor(max_window_size=1 << archive.K3S_MAX_WINDOW_LOG) \
        .stream_reader(io.BytesIO(raw)).read()
    files = members(data)
    check_blobs(files)
    index = json.loads(dict(files)["index.json"])
    assert [m["digest"] for m in index["manifests"]] == [world.app.manifest.digest,
                                                          world.tool.manifest.digest]
    assert f"blobs/sha256/{world.app.top.digest[7:]}" not in dict(files)  # no half index
    assert summary["compression"] == "zstd"


def test_k3s_airgap_gzip(world: World) -> None:
    summary, path = world.export("gw", "k3s-airgap", "images.tgz")
    import gzip
    check_blobs(members(gzip.decompress(path.read_bytes())))
    assert summary["compression"] == "gzip"


def test_docker_archive_has_configs_layers_and_manifest_json_last(world: World) -> None:
    summary, path = world.export("line", "docker-archive", "line.tar.gz")
    import gzip
    files = members(gzip.decompress(path.read_bytes()))
    assert files[-1][0] == "manifest.json"
    check_blobs(files)
    content = dict(files)
    manifest = json.loads(content["manifest.json"])
    assert manifest == [{"Config": f"blobs/sha256/{world.app.config.digest[7:]}",
                         "RepoTags": ["example.test/shop/app:v1"],
                         "Layers": [f"blobs/sha256/{la.digest[7:]}" for la in world.app.layers]}]
    assert not any(n.endswith(world.app.manifest.digest[7:]) for n in content)  # docker: no manifests
    assert [i["named"] for i in summary["images"]] == [None]


def test_export_to_stdout(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    world = World(tmp_path, capsysbinary)  # type: ignore[arg-type]  # binary: stdout is the tar
    capsysbinary.readouterr()
    assert main(["--home", str(world.home), "export", str(world.manifest), "--site", "line",
                 "--format", "docker-archive", "-o", "-"]) == 0
    out, err = capsysbinary.readouterr()
    check_blobs(members(out))
    assert b"wrote standard output: docker-archive" in err


def test_docker_archive_carries_a_zstd_layer_as_its_tar() -> None:
    tar = b"tar bytes" * 100
    blob = zstandard.ZstdCompressor().compress(tar)
    layer = ArchiveLayer("application/vnd.oci.image.layer.v1.tar+zstd", sha(blob), len(blob),
                         sha(tar), len(tar), docker_readable=False)
    config = b'{"rootfs":{}}'
    img = ArchiveImage("example.test/z:1", Descriptor("m", sha(b"m"), 1),
                       Descriptor("m", sha(b"m"), 1), Descriptor("c", sha(config), len(config)),
                       (layer,), "linux/amd64")

    class Source:
        def blob(self, digest: str) -> Iterable[bytes]:
            assert digest == sha(config), "only the config is read as a blob"
            return [config]

        def layer_tar(self, la: ArchiveLayer) -> Iterable[bytes]:
            return [tar[:10], tar[10:]]

    out = io.BytesIO()
    archive.write_docker([img], Source(), out)
    content = dict(members(out.getvalue()))
    assert content[f"blobs/sha256/{sha(tar)[7:]}"] == tar
    assert json.loads(content["manifest.json"])[0]["Layers"] == [f"blobs/sha256/{sha(tar)[7:]}"]


def test_docker_archive_tags_a_pinned_name() -> None:
    digest = sha(b"top")
    img = ArchiveImage(f"example.test/a@{digest}", Descriptor("m", digest, 3),
                       Descriptor("m", digest, 3), Descriptor("c", sha(b"c"), 1), (), "linux/amd64")
    assert json.loads(archive.docker_manifest([img]))[0]["RepoTags"] == \
        [f"example.test/a:{digest.replace(':', '-')}"]


@pytest.mark.parametrize("fmt,path,kind", [
    ("k3s-airgap", "x.tar", "none"), ("k3s-airgap", "x.tar.zst", "zstd"),
    ("k3s-airgap", "x.tzst", "zstd"), ("k3s-airgap", "d/x.tar.gz", "gzip"),
    ("k3s-airgap", "x.tgz", "gzip"), ("docker-archive", "x.tar", "none"),
    ("docker-archive", "x.tar.gz", "gzip"), ("docker-archive", "-", "none"),
    ("oci-archive", "x.tar", "none"), ("oci-archive", "x", "none"),
])
def test_compression_by_name(fmt: str, path: str, kind: str) -> None:
    assert archive.compression_for(fmt, path) == kind


@pytest.mark.parametrize("fmt,path,words", [
    ("k3s-airgap", "images.img", "k3s ignores images.img"),
    ("k3s-airgap", "images.TAR", "k3s ignores"),  # its watcher matches endings case-sensitively
    ("k3s-airgap", "images.zst", "k3s ignores"),
    ("docker-archive", "x.tar.zst", "reads no zstd"),
    ("oci-archive", "x.tar.gz", "reads only a plain tar"),
    ("oci-archive", "x.tar.zst", "reads only a plain tar"),
])
def test_compression_refused(fmt: str, path: str, words: str) -> None:
    with pytest.raises(UsageError) as exc:
        archive.compression_for(fmt, path)
    assert words in str(exc.value)


def test_refused_name_fails_before_any_fetch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.yaml"  # a registry nobody listens on: no request may be made
    manifest.write_text('version: 1\nregistries:\n  "127.0.0.1:1": {insecure: true}\n'
                        'images:\n  - ref: 127.0.0.1:1/a:v1\n'
                        'sites:\n  s: {runtime: docker, platform: linux/amd64}\n')
    rc = main(["--home", str(tmp_path / "h"), "export", str(manifest), "--site", "s",
               "--format", "docker-archive", "-o", str(tmp_path / "a.tar.zst")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "docker load cannot read a.tar.zst" in err
    assert not (tmp_path / "a.tar.zst").exists()
    rc = main(["--home", str(tmp_path / "h"), "export", str(manifest), "--site", "s",
               "--format", "k3s-airgap", "-o", str(tmp_path / "a.tgz"), "--level", "12"])
    assert rc == 2 and "not a gzip level" in capsys.readouterr().err


def test_unknown_site_is_one_line(world: World) -> None:
    _, err = world.eb("export", str(world.manifest), "--site", "nope", "--format", "oci-archive",
                      "-o", str(world.tmp / "x.tar"), code=2)
    assert "site 'nope' is not declared" in err and err.count("\n") == 1


def test_damaged_cache_blob_never_ships(world: World) -> None:
    world.export("gw", "oci-archive", "first.tar")
    cache = BlobCache(world.home / "cache")
    digest = world.tool.layers[-1].digest
    path = cache.path(digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _, err = world.eb("export", str(world.manifest), "--site", "gw", "--format", "oci-archive",
                      "-o", str(world.tmp / "second.tar"), code=11)
    assert f"blob {digest} in the packer cache" in err and err.count("\n") == 1
    assert not (world.tmp / "second.tar").exists()  # no partial archive left
    assert not cache.has(digest)  # removed: the next run fetches it again
    world.export("gw", "oci-archive", "third.tar")


def test_image_selects_of_the_sites_images(world: World) -> None:
    summary, path = world.export("gw", "oci-archive", "one.tar", "--image", "example.test/shop/tool:v1")
    assert [i["name"] for i in summary["images"]] == ["example.test/shop/tool:v1"]
    index = json.loads(dict(members(path.read_bytes()))["index.json"])
    assert [m["digest"] for m in index["manifests"]] == [world.tool.top.digest]
    _, err = world.eb("export", str(world.manifest), "--site", "line", "--format", "oci-archive",
                      "-o", str(world.tmp / "x.tar"), "--image", "example.test/shop/tool:v1", code=2)
    assert "site line has no image example.test/shop/tool:v1" in err and err.count("\n") == 1


def test_archive_writer_needs_only_the_standard_library() -> None:
    """The podman runtime may write archives on the device: nothing beyond the stdlib."""
    import subprocess
    import sys

    code = ("import sys; before = set(sys.modules); import edgebundle.archive; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - "
            "set(sys.stdlib_module_names) - {'edgebundle'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_same_inputs_give_the_same_archive(world: World) -> None:
    for fmt, name in (("k3s-airgap", "a.tar.zst"), ("docker-archive", "d.tar.gz")):
        _, first = world.export("gw", fmt, name)
        data = first.read_bytes()
        _, second = world.export("gw", fmt, name)
        assert second.read_bytes() == data, fmt
