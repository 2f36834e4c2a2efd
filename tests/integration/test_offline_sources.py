"""Offline sources end to end: a `docker save` archive and an OCI layout as pack sources,
imported into real containerd and Docker, and the images run."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

import imagefactory
from test_core_loop import ctr_images, ctr_run, docker, eb


def test_docker_archive_and_oci_layout_sources(tmp_path: Path, containerd: Any, dockerd: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    saved = imagefactory.build_app_image("offline-saved", "v1")
    archive = tmp_path / "saved.tar"
    archive.write_bytes(imagefactory.docker_archive_tar(saved, ["factory.local/saved:v1"]))
    layout_img = imagefactory.build_app_image("offline-layout", "v1", media="oci")
    layout = tmp_path / "layout.tar"
    layout.write_bytes(imagefactory.oci_layout_tar(layout_img, "v1"))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"""version: 1
images:
  - ref: factory.local/saved:v1
    source: docker-archive:{archive}
  - ref: factory.local/layout:v1
    source: oci-layout:{layout}
sites:
  ctr-site: {{runtime: containerd, namespace: offline, platform: linux/amd64}}
  dock-site: {{runtime: docker, platform: linux/amd64}}
""")
    home = ["--home", str(tmp_path / "home")]
    expected = {"factory.local/saved:v1": imagefactory.message_for("shop/offline-saved:v1"),
                "factory.local/layout:v1": imagefactory.message_for("shop/offline-layout:v1")}

    b1 = tmp_path / "ctr.ebundle"
    eb(capsys, *home, "pack", str(manifest), "--site", "ctr-site", "-o", str(b1))
    eb(capsys, "import", str(b1), "--runtime", "containerd", "--address", containerd.address,
       "--namespace", "offline", "--snapshotter", containerd.snapshotter)
    listed = ctr_images(containerd, "offline")
    # An OCI layout keeps its real manifest digest.
    assert listed["factory.local/layout:v1"] == layout_img.manifest_digest
    for i, (name, message) in enumerate(expected.items()):
        assert ctr_run(containerd, "offline", name, f"offline-{i}").strip() == message.strip()

    b2 = tmp_path / "docker.ebundle"
    eb(capsys, *home, "pack", str(manifest), "--site", "dock-site", "-o", str(b2))
    eb(capsys, "import", str(b2), "--runtime", "docker", "--host", dockerd.host)
    for name, message in expected.items():
        assert docker(dockerd, "run", "--rm", "--network", "none", name).strip() == message.strip()
    assert docker(dockerd, "image", "inspect", "--format", "{{.Id}}",
                  "factory.local/saved:v1").strip() == saved.config_digest
