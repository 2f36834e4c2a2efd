"""Pure parsers of the runtime seams, fed recorded real outputs, and the tar streamer."""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Iterator, List

import pytest

from edgebundle.errors import LoadError
from edgebundle.importer.containerd import (
    parse_content_ls_quiet,
    parse_images_ls,
    parse_snapshots_ls,
    select_manifest,
)
from edgebundle.importer.docker import parse_load_response
from edgebundle.importer.tarstream import TarStream, blob_path, last_line
from edgebundle.naming import docker_tag
from edgebundle.oci import Descriptor, Platform

# --- containerd 1.6.20 `ctr` output ----------------------------------------------

APP_DIGEST = "sha256:1e32989ecae46a022f4459a728b817a7b0887e3a65162a13ce520b5e60fe1727"
ALPINE_DIGEST = "sha256:c5b1261d6d3e43071626931fc004f70149baeba2c8ec672bd4f27761f8e1ad6b"
TEMP_DIGEST = "sha256:" + "ab" * 32

IMAGES_LS = (
    "REF                           TYPE                                                 DIGEST   "
    "                                                               SIZE    PLATFORMS            "
    "      LABELS \n"
    "127.0.0.1:33031/shop/app:v1   application/vnd.docker.distribution.manifest.v2+json "
    f"{APP_DIGEST} 2.5 MiB linux/amd64                -      \n"
    "docker.io/library/alpine:3.19 application/vnd.oci.image.index.v1+json              "
    f"{ALPINE_DIGEST} 3.3 MiB linux/386,linux/amd64,linux/arm/v6,linux/arm/v7,linux/arm64/v8 "
    "io.cri-containerd.image=managed \n"
    f"import.edgebundle.invalid/0a1b2c/0:pending application/vnd.oci.image.index.v1+json {TEMP_DIGEST} "
    "1.0 KiB linux/amd64 - \n"
)

KEY_A = "sha256:236a4d0d5ba8a1e8f8b0d4f4a0cbc3a0c4b6ab36a2f2c0cb3bb6b8bd4dfd0a6f"
KEY_B = "sha256:7508ee7d9b9dd2b4a1f24be2c8f1d3a9d9ef3c7e2a0d4c7f5e0b1a6c3d2e1f0a"
KEY_C = "sha256:c0ffee" + "0" * 58

SNAPSHOTS_LS = (
    "KEY                                                                     PARENT             "
    "                                                     KIND      \n"
    f"{KEY_A} {KEY_B} Committed \n"
    f"{KEY_B}                                                                         Committed \n"
    f"default/3/extract-123456789-abcd {KEY_A} Active    \n"
    f"{KEY_C} {KEY_A} Active    \n"
)


def test_parse_images_ls_real_output() -> None:
    rows = parse_images_ls(IMAGES_LS)
    assert rows == [
        ("127.0.0.1:33031/shop/app:v1",
         "application/vnd.docker.distribution.manifest.v2+json", APP_DIGEST),
        ("docker.io/library/alpine:3.19", "application/vnd.oci.image.index.v1+json",
         ALPINE_DIGEST),
        ("import.edgebundle.invalid/0a1b2c/0:pending", "application/vnd.oci.image.index.v1+json",
         TEMP_DIGEST),
    ]


def test_parse_images_ls_header_only_and_empty() -> None:
    header = IMAGES_LS.splitlines()[0] + "\n"
    assert parse_images_ls(header) == []
    assert parse_images_ls("") == []


def test_parse_images_ls_skips_rows_without_digest() -> None:
    text = IMAGES_LS.splitlines()[0] + "\nbroken row\n" + IMAGES_LS.splitlines()[1] + "\n"
    assert [r[0] for r in parse_images_ls(text)] == ["127.0.0.1:33031/shop/app:v1"]


def test_parse_snapshots_ls_real_output() -> None:
    assert parse_snapshots_ls(SNAPSHOTS_LS) == frozenset({KEY_A, KEY_B})


def test_parse_snapshots_ls_excludes_active_and_header() -> None:
    header = SNAPSHOTS_LS.splitlines()[0]
    only_active = header + "\n" + SNAPSHOTS_LS.splitlines()[-1] + "\n"
    assert parse_snapshots_ls(only_active) == frozenset()
    assert parse_snapshots_ls(header + "\n") == frozenset()


def test_parse_content_ls_quiet() -> None:
    text = f"{APP_DIGEST}\n{ALPINE_DIGEST}\n\n  {KEY_A}  \n"
    assert parse_content_ls_quiet(text) == frozenset({APP_DIGEST, ALPINE_DIGEST, KEY_A})
    assert parse_content_ls_quiet("") == frozenset()


# --- select_manifest ----------------------------------------------------------------


def _m(n: int, plat: object) -> dict:
    out = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
           "digest": "sha256:" + f"{n:064x}", "size": 400 + n}
    if plat is not None:
        out["platform"] = plat
    return out


INDEX = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
    _m(1, {"os": "linux", "architecture": "amd64"}),
    _m(2, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
    _m(3, {"os": "linux", "architecture": "arm"}),
    _m(4, {"os": "unknown", "architecture": "unknown"}),  # attestation manifest
    _m(5, None),
]}


def d(n: int) -> str:
    return "sha256:" + f"{n:064x}"


def test_select_manifest_by_platform() -> None:
    desc, plat = select_manifest(INDEX, Platform.parse("linux/amd64"), frozenset())
    assert desc == Descriptor("application/vnd.oci.image.manifest.v1+json", d(1), 401)
    assert plat == "linux/amd64"
    desc, plat = select_manifest(INDEX, Platform.parse("linux/arm64"), frozenset())
    assert desc.digest == d(2) and plat == "linux/arm64"
    desc, plat = select_manifest(INDEX, Platform.parse("linux/aarch64/v8"), frozenset())
    assert desc.digest == d(2)
    desc, plat = select_manifest(INDEX, Platform.parse("linux/arm/v7"), frozenset())
    assert desc.digest == d(3) and plat == "linux/arm/v7"


def test_select_manifest_no_match() -> None:
    assert select_manifest(INDEX, Platform.parse("linux/riscv64"), frozenset({d(1)})) is None
    assert select_manifest(INDEX, Platform.parse("windows/amd64"), frozenset()) is None
    assert select_manifest({"manifests": []}, Platform.parse("linux/amd64"), frozenset()) is None


def test_select_manifest_without_platform_takes_first_held() -> None:
    desc, plat = select_manifest(INDEX, None, frozenset({d(3), d(2)}))
    assert desc.digest == d(2) and plat == "linux/arm64"
    desc, plat = select_manifest(INDEX, None, frozenset({d(5)}))
    assert desc.digest == d(5) and plat is None
    assert select_manifest(INDEX, None, frozenset()) is None


# --- docker ---------------------------------------------------------------------------


def test_parse_load_response_success() -> None:
    body = b'{"stream":"Loaded image: example.test/shop/app:v1\\n"}\r\n'
    assert parse_load_response(body) == ["Loaded image: example.test/shop/app:v1"]


def test_parse_load_response_several_lines() -> None:
    body = (b'{"stream":"Loaded image: example.test/shop/app:v1\\n"}\n'
            b'\n'
            b'{"stream":"Loaded image ID: sha256:' + b"1" * 64 + b'\\n"}\n')
    assert parse_load_response(body) == ["Loaded image: example.test/shop/app:v1",
                                         "Loaded image ID: sha256:" + "1" * 64]


def test_parse_load_response_error_with_http_200() -> None:
    body = (b'{"errorDetail":{"message":"open /x/layer.tar: no such file or directory"},'
            b'"error":"open /x/layer.tar: no such file or directory"}\r\n')
    with pytest.raises(LoadError) as info:
        parse_load_response(body)
    assert "open /x/layer.tar: no such file or directory" in str(info.value)
    assert info.value.exit_code == 8


def test_parse_load_response_error_after_progress() -> None:
    body = (b'{"stream":"Loaded image: example.test/shop/app:v1\\n"}\n'
            b'{"error":"invalid tar header"}\n')
    with pytest.raises(LoadError, match="invalid tar header"):
        parse_load_response(body)


def test_parse_load_response_empty() -> None:
    assert parse_load_response(b"") == []


@pytest.mark.parametrize("name, tag", [
    ("example.test/shop/app:v1", "example.test/shop/app:v1"),
    ("alpine", "docker.io/library/alpine:latest"),
    ("alpine:3.19", "docker.io/library/alpine:3.19"),
    ("127.0.0.1:5000/shop/app", "127.0.0.1:5000/shop/app:latest"),
    ("example.test/shop/app@sha256:" + "ab" * 32, "example.test/shop/app:sha256-" + "ab" * 32),
    ("example.test:5000/app:v2@sha256:" + "cd" * 32, "example.test:5000/app:sha256-" + "cd" * 32),
])
def test_docker_tag(name: str, tag: str) -> None:
    assert docker_tag(name) == tag


def test_docker_tag_is_a_valid_tag() -> None:
    from edgebundle.reference import parse_reference

    tag = docker_tag("example.test/shop/app@sha256:" + "ef" * 32)
    ref = parse_reference(tag)
    assert ref.digest is None and ref.tag == "sha256-" + "ef" * 32


# --- TarStream ----------------------------------------------------------------------


class Sink:
    """Write-only, non-seekable: what a process's stdin or an HTTP body is."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes) -> int:
        self.data += b
        return len(b)


def pieces(data: bytes, sizes: List[int]) -> Iterator[bytes]:
    pos = 0
    i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        i += 1
        yield data[pos:pos + n]
        if n == 0:
            continue
        pos += n


def test_tarstream_round_trip() -> None:
    big = bytes(range(256)) * 9000  # > 2 MiB, crosses tarfile's 1 MiB buffer
    blobs = {
        blob_path("sha256:" + hashlib.sha256(big).hexdigest()): big,
        "blobs/sha256/empty": b"",
        "index.json": b'{"schemaVersion":2}',
        "odd": b"x" * 513,
    }
    sink = Sink()
    ts = TarStream(sink)  # type: ignore[arg-type]
    for name, data in blobs.items():
        if name == "index.json":
            ts.add_bytes(name, data)
        else:
            ts.add(name, len(data), pieces(data, [1, 0, 7, 4096, 1 << 20]))
    ts.close()
    assert len(sink.data) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(bytes(sink.data)), mode="r:") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == list(blobs)
        for m in members:
            assert m.isfile() and m.size == len(blobs[m.name])
            assert m.mode == 0o644
            f = tf.extractfile(m)
            assert f is not None and f.read() == blobs[m.name]


def test_tarstream_is_deterministic() -> None:
    outs = []
    for _ in range(2):
        sink = Sink()
        ts = TarStream(sink)  # type: ignore[arg-type]
        ts.add_bytes("a", b"hello")
        ts.close()
        outs.append(bytes(sink.data))
    assert outs[0] == outs[1]


def test_tarstream_propagates_iterator_error() -> None:
    class Boom(Exception):
        pass

    def failing() -> Iterator[bytes]:
        yield b"a" * 1000
        raise Boom("entry corrupt mid-way")

    ts = TarStream(Sink())  # type: ignore[arg-type]
    with pytest.raises(Boom, match="mid-way"):
        ts.add("blobs/sha256/x", 5000, failing())


def test_tarstream_refuses_more_bytes_than_announced() -> None:
    ts = TarStream(Sink())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ts.add("a", 3, iter([b"abc", b"d"]))


def test_tarstream_refuses_fewer_bytes_than_announced() -> None:
    ts = TarStream(Sink())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="3 of its 10 bytes"):
        ts.add("a", 10, iter([b"abc"]))


def test_tarstream_runs_iterator_to_its_end() -> None:
    """The entry's digest is verified when its iterator ends: the tar must drive it there."""
    finished = []

    def verified() -> Iterator[bytes]:
        yield b"abcd"
        finished.append(True)

    ts = TarStream(Sink())  # type: ignore[arg-type]
    ts.add("a", 4, verified())
    assert finished == [True]


def test_blob_path_and_last_line() -> None:
    assert blob_path("sha256:" + "0f" * 32) == "blobs/sha256/" + "0f" * 32
    assert last_line("a\nb\n\n  c  \n\n") == "c"
    assert last_line("") == "" and last_line(None) == ""


def test_threaded_sink_keeps_order_and_reports_writer_errors() -> None:
    from edgebundle.importer.tarstream import ThreadedSink

    got: list = []

    class Collect:
        def write(self, data: bytes) -> int:
            got.append(data)
            return len(data)

    sink = ThreadedSink(Collect(), depth=2)
    for i in range(50):
        sink.write(bytes([i]) * 10)
    sink.close()
    assert got == [bytes([i]) * 10 for i in range(50)]

    class Broken:
        def write(self, data: bytes) -> int:
            raise BrokenPipeError("ctr went away")

    bad = ThreadedSink(Broken(), depth=2)
    with pytest.raises(BrokenPipeError):
        for _ in range(100):  # the error surfaces on a later write or at close
            bad.write(b"x")
        bad.close()
