"""Tests for edgebundle.manifest: the YAML manifest list and its error messages."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from edgebundle.errors import ManifestError
from edgebundle.manifest import load_manifest, parse_manifest
from edgebundle.oci import Platform
from edgebundle.reference import Reference
from edgebundle.registry import RegistryClient
from edgebundle.specs import DEFAULT_STAGING, ManifestList, PrunePolicy, RegistryConfig


def registry_config(ml: ManifestList, host: str) -> RegistryConfig:
    """What the client will use for ``host`` (undeclared hosts get the defaults)."""
    with RegistryClient(ml.registries) as client:
        return client.config(host)


REPO_ROOT = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "ab" * 32

FULL = f"""\
version: 1
registries:
  "127.0.0.1:5555": {{insecure: true}}
  docker.io: {{mirrors: ["mirror.internal:5000"]}}
images:
  - ref: 127.0.0.1:5555/shop/app:v2
  - ref: 127.0.0.1:5555/shop/base@{DIGEST}
  - ref: factory.local/hmi:3
    source: docker-archive:/srv/images/hmi.tar
    platform: linux/arm64
    sites: [gw-01]
  - ref: factory.local/scada:1
    source: oci-layout:layouts/scada
  - alpine:3.19
sites:
  gw-01: {{runtime: containerd, namespace: k8s.io, platform: linux/arm64, ssh: root@gw-01:22}}
  line-3: {{runtime: docker, platform: linux/amd64}}
"""


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path: Path, text: str) -> ManifestError:
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return info.value


MINIMAL_SITES = """\
sites:
  gw-01: {runtime: containerd, platform: linux/arm64}
"""


# ---------------------------------------------------------------------------
# Valid manifests


def test_full_manifest_loads(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    ml = load_manifest(path)
    assert ml.path == str(path)
    assert [i.ref for i in ml.images] == [
        "127.0.0.1:5555/shop/app:v2", f"127.0.0.1:5555/shop/base@{DIGEST}", "factory.local/hmi:3",
        "factory.local/scada:1", "alpine:3.19"]
    app, base, hmi, scada, alpine = ml.images
    assert app.reference == Reference("127.0.0.1:5555", "shop/app", "v2")
    assert base.reference.digest == DIGEST and base.reference.tag is None
    assert alpine.reference == Reference("docker.io", "library/alpine", "3.19")
    assert hmi.source == "docker-archive:/srv/images/hmi.tar"
    assert hmi.platform == Platform("linux", "arm64")
    assert hmi.sites == ("gw-01",)
    # relative offline paths are anchored at the manifest's directory
    assert scada.source == f"oci-layout:{tmp_path.resolve() / 'layouts' / 'scada'}"
    assert app.source is None and app.platform is None and app.sites == ()
    assert app.line == 6 and hmi.line == 8 and alpine.line == 14


def test_sites_and_registries(tmp_path: Path) -> None:
    ml = load_manifest(write(tmp_path, FULL))
    gw, line3 = ml.sites["gw-01"], ml.sites["line-3"]
    assert (gw.runtime, gw.namespace, gw.platform, gw.ssh) == ("containerd", "k8s.io", Platform("linux", "arm64"),
                                                               "root@gw-01:22")
    assert gw.line == 16
    assert (line3.runtime, line3.namespace, line3.ssh) == ("docker", None, None)
    assert registry_config(ml, "127.0.0.1:5555").insecure is True
    assert registry_config(ml, "docker.io").mirrors == ("mirror.internal:5000",)
    assert registry_config(ml, "docker.io").insecure is False
    assert registry_config(ml, "elsewhere.io").insecure is False  # undeclared: HTTPS only
    assert [i.ref for i in ml.images_for("line-3")] == [
        "127.0.0.1:5555/shop/app:v2", f"127.0.0.1:5555/shop/base@{DIGEST}", "factory.local/scada:1", "alpine:3.19"]
    assert len(ml.images_for("gw-01")) == 5


def test_containerd_namespace_defaults(tmp_path: Path) -> None:
    ml = load_manifest(write(tmp_path, "version: 1\nimages: [alpine]\n" + MINIMAL_SITES))
    assert ml.sites["gw-01"].namespace == "default"
    assert ml.images[0].reference.tag == "latest"
    assert ml.registries == {}


def test_report_command_and_block_style(tmp_path: Path) -> None:
    ml = load_manifest(write(tmp_path, """\
        version: 1
        images:
          - ref: alpine:3.19
            platform: linux/arm/v7
        sites:
          pi:
            runtime: docker
            platform: linux/armhf
            ssh: pi
            report_command: sudo edgebundle report --runtime docker --json
        """))
    site = ml.sites["pi"]
    assert site.platform == Platform("linux", "arm", "v7")
    assert site.ssh == "pi"
    assert site.report_command == "sudo edgebundle report --runtime docker --json"
    assert ml.images[0].platform == Platform("linux", "arm", "v7")


def test_site_address_and_edgebundle_command(tmp_path: Path) -> None:
    ml = load_manifest(write(tmp_path, """\
        version: 1
        images: [alpine:3.19]
        sites:
          k3s: {runtime: containerd, namespace: k8s.io, platform: linux/arm64, ssh: root@gw,
                address: /run/k3s/containerd/containerd.sock, edgebundle: /opt/eb/bin/edgebundle}
          line: {runtime: docker, platform: linux/amd64, address: "unix:///run/docker.sock"}
          plain: {runtime: docker, platform: linux/amd64}
        """))
    assert ml.sites["k3s"].address == "/run/k3s/containerd/containerd.sock"
    assert ml.sites["k3s"].edgebundle == "/opt/eb/bin/edgebundle"
    assert ml.sites["line"].address == "unix:///run/docker.sock"
    assert (ml.sites["plain"].address, ml.sites["plain"].edgebundle) == (None, "edgebundle")


@pytest.mark.parametrize("entry,fragment", [
    ("{runtime: containerd, platform: linux/amd64, address: run/containerd.sock}", "invalid containerd address"),
    ("{runtime: docker, platform: linux/amd64, address: /var/run/docker.sock}", "invalid docker address"),
    ("{runtime: docker, platform: linux/amd64, edgebundle: \"'unclosed\"}", "is not a command line"),
])
def test_bad_site_address_or_command(tmp_path: Path, entry: str, fragment: str) -> None:
    with pytest.raises(ManifestError, match=fragment) as info:
        load_manifest(write(tmp_path, f"""\
            version: 1
            images: [alpine:3.19]
            sites:
              gw: {entry}
            """))
    assert info.value.hint


def test_site_staging_and_prune(tmp_path: Path) -> None:
    ml = load_manifest(write(tmp_path, """\
        version: 1
        images: [alpine:3.19]
        sites:
          a: {runtime: docker, platform: linux/amd64, staging: /data/eb/staging/, prune: {keep_previous: 2}}
          b: {runtime: docker, platform: linux/amd64, prune: true}
          c: {runtime: docker, platform: linux/amd64, prune: false}
          d: {runtime: docker, platform: linux/amd64}
        """))
    assert (ml.sites["a"].staging, ml.sites["a"].prune) == ("/data/eb/staging", PrunePolicy(2))
    assert ml.sites["b"].prune == PrunePolicy(0)
    assert ml.sites["c"].prune is None and ml.sites["d"].prune is None
    assert ml.sites["d"].staging == DEFAULT_STAGING == "/var/lib/edgebundle/staging"


@pytest.mark.parametrize("entry,fragment", [
    ("staging: relative/dir", "staging 'relative/dir' is not an absolute directory path"),
    ("staging: '/a b'", "is not an absolute directory path"),
    ("staging: /a/../etc", "is not an absolute directory path"),
    ("prune: {keep_previous: -1}", "prune keep_previous is -1, not a count 0..100"),
    ("prune: {keep_previous: yes}", "prune keep_previous is True"),
    ("prune: {keep: 1}", "keep"),
    ("prune: 3", "prune"),
])
def test_bad_site_staging_or_prune(tmp_path: Path, entry: str, fragment: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(fragment)) as info:
        load_manifest(write(tmp_path, f"""\
            version: 1
            images: [alpine:3.19]
            sites:
              gw: {{runtime: docker, platform: linux/amd64, {entry}}}
            """))
    assert info.value.hint


def test_legacy_docker_hub_registry_key_is_normalised(tmp_path: Path) -> None:
    ml = load_manifest(write(tmp_path, """\
        version: 1
        registries:
          index.docker.io: {mirrors: [m.local]}
        images: [alpine]
        """))
    assert registry_config(ml, "docker.io").mirrors == ("m.local",)


def test_same_ref_allowed_for_disjoint_sites(tmp_path: Path) -> None:
    ml = load_manifest(write(tmp_path, """\
        version: 1
        images:
          - {ref: app:1, platform: linux/arm/v6, sites: [a]}
          - {ref: docker.io/library/app:1, sites: [b]}
        sites:
          a: {runtime: docker, platform: linux/arm/v7}
          b: {runtime: docker, platform: linux/amd64}
        """))
    assert [len(ml.images_for(s)) for s in ("a", "b")] == [1, 1]


def test_shipped_example_loads() -> None:
    ml = load_manifest(REPO_ROOT / "manifests" / "example.yaml")
    assert ml.images and ml.sites and ml.registries
    kinds = {i.source.split(":")[0] for i in ml.images if i.source}
    assert kinds == {"docker-archive", "oci-layout"}
    assert {s.runtime for s in ml.sites.values()} == {"containerd", "docker", "podman"}


def test_parse_manifest_from_text() -> None:
    ml = parse_manifest("version: 1\nimages: [busybox]\n", "inline.yaml")
    assert ml.path == "inline.yaml" and ml.images[0].ref == "busybox"


# ---------------------------------------------------------------------------
# Errors: each names the file and line, and hints at the fix


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "nope.yaml")
    assert "nope.yaml not found" in info.value.message
    assert info.value.hint and info.value.exit_code == 3


def test_malformed_yaml_reports_line(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nimages:\n  - ref: a\n   bad: [\n")
    assert err.message.startswith(f"{tmp_path / 'm.yaml'}:4: invalid YAML")


def test_unclosed_flow_reports_line(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nimages: [alpine\nsites: {}\n")
    assert ":3: invalid YAML" in err.message or ":4: invalid YAML" in err.message


def test_empty_and_non_mapping(tmp_path: Path) -> None:
    assert "empty" in error_of(tmp_path, "").message
    assert "must be a mapping" in error_of(tmp_path, "- a\n- b\n").message


def test_unknown_top_level_key_did_you_mean(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nimages: [alpine]\nsite:\n  x: {}\n")
    assert err.message.endswith("m.yaml:3: unknown top-level key 'site'")
    assert "did you mean 'sites'" in (err.hint or "")


def test_unknown_image_key_did_you_mean(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nimages:\n  - ref: alpine\n    platfrom: linux/arm64\n")
    assert ":4: unknown key 'platfrom' in image entry" in err.message
    assert "did you mean 'platform'" in (err.hint or "")


def test_unknown_site_key(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nimages: [a]\nsites:\n  s:\n    runtime: docker\n"
                             "    platform: linux/amd64\n    namspace: x\n")
    assert ":7: unknown key 'namspace' in site 's'" in err.message
    assert "did you mean 'namespace'" in (err.hint or "")


def test_unknown_registry_key(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nregistries:\n  r.io: {insecur: true}\nimages: [a]\n")
    assert ":3: unknown key 'insecur' in registry 'r.io'" in err.message
    assert "did you mean 'insecure'" in (err.hint or "")


@pytest.mark.parametrize("text, expect", [
    ("images: [a]\n", ":1: missing version"),
    ("version: 2\nimages: [a]\n", ":1: unsupported manifest version 2"),
    ("version: '1'\nimages: [a]\n", "unsupported manifest version '1'"),
    ("version: true\nimages: [a]\n", "unsupported manifest version True"),
])
def test_version(tmp_path: Path, text: str, expect: str) -> None:
    err = error_of(tmp_path, text)
    assert expect in err.message
    assert "version: 1" in (err.hint or "")


@pytest.mark.parametrize("entry, expect", [
    ("- ref: 'Alpine:3'", ":3: invalid image reference 'Alpine:3'"),
    ("- ref: 'alpine:'", ":3: invalid image reference 'alpine:': bad tag"),
    ("- ref: alpine@sha256:abc", ":3: invalid image reference"),
    ("- {source: 'docker-archive:/x.tar'}", ":3: image entry has no ref"),
    ("- ref: 42", ":3: image ref must be a non-empty string"),
    ("- ''", ":3: image ref must be a non-empty string"),
    ("- [a, b]", ":3: image entry must be a mapping"),
    (f"- ref: a@md5:{'a' * 32}", "only sha256 digests are supported"),
])
def test_bad_refs(tmp_path: Path, entry: str, expect: str) -> None:
    err = error_of(tmp_path, f"version: 1\nimages:\n  {entry}\n")
    assert expect in err.message, err.message
    assert err.hint


def test_ref_error_keeps_reference_hint(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nimages:\n  - 'shop/App'\n")
    assert "bad repository path" in err.message and err.hint == "repository names are lowercase"


def test_duplicate_image(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nimages:\n  - alpine\n  - docker.io/library/alpine:latest\n")
    assert ":4: duplicate image 'docker.io/library/alpine:latest' (also on line 3)" in err.message
    assert "sites:" in (err.hint or "")


def test_duplicate_image_with_overlapping_sites(tmp_path: Path) -> None:
    err = error_of(tmp_path, """\
        version: 1
        images:
          - {ref: app:1, sites: [a, b]}
          - {ref: app:1, sites: [b]}
        sites:
          a: {runtime: docker, platform: linux/amd64}
          b: {runtime: docker, platform: linux/amd64}
        """)
    assert ":4: duplicate image" in err.message


def test_undeclared_site(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nimages:\n  - ref: a\n    sites: [gw-1]\n" + MINIMAL_SITES)
    assert ":4: image 'a': site 'gw-1' is not declared under sites:" in err.message
    assert "did you mean 'gw-01'" in (err.hint or "")


def test_undeclared_site_without_sites_section(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nimages:\n  - {ref: a, sites: [x]}\n")
    assert "site 'x' is not declared" in err.message and "declared sites: none" in (err.hint or "")


@pytest.mark.parametrize("site, expect", [
    ("{runtime: pod, platform: linux/amd64}", ":4: site 's': unknown runtime 'pod'"),
    ("{runtime: podman, platform: linux/amd64, address: /run/podman.sock}", ":4: site 's': podman has no socket to address"),
    ("{runtime: containrd, platform: linux/amd64}", "did you mean 'containerd'"),
    ("{platform: linux/amd64}", ":4: site 's' has no runtime"),
    ("{runtime: docker}", ":4: site 's' has no platform"),
    ("{runtime: docker, platform: arm64}", ":4: site 's' platform: invalid platform 'arm64'"),
    ("{runtime: docker, platform: linux/amd64, namespace: x}", "namespace is only valid for containerd"),
    ("{runtime: containerd, platform: linux/amd64, namespace: 'a b'}", "invalid containerd namespace"),
    ("{runtime: docker, platform: linux/amd64, ssh: 'root@host:99999'}", "invalid ssh target"),
    ("{runtime: docker, platform: linux/amd64, ssh: 'a b'}", "invalid ssh target"),
    ("{runtime: docker, platform: linux/amd64, ssh: 22}", "site 's' ssh must be a non-empty string"),
    ("null", ":4: site 's' must be a mapping"),
])
def test_bad_sites(tmp_path: Path, site: str, expect: str) -> None:
    err = error_of(tmp_path, f"version: 1\nimages: [a]\nsites:\n  s: {site}\n")
    assert expect in err.message + " " + (err.hint or ""), str(err)


def test_bad_site_name(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nimages: [a]\nsites:\n  ../etc: {runtime: docker, platform: linux/amd64}\n")
    assert ":4: invalid site name '../etc'" in err.message


def test_insecure_must_be_bool(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nregistries:\n  r.io:\n    insecure: 'true'\nimages: [a]\n")
    assert ":4: registry 'r.io': insecure must be true or false" in err.message


def test_bad_registry_host(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nregistries:\n  https://r.io: {}\nimages: [a]\n")
    assert "is not a registry host" in err.message and "without a scheme" in (err.hint or "")


def test_bad_source(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nimages:\n  - ref: a\n    source: tarball:/x.tar\n")
    assert ":4: image 'a': invalid source 'tarball:/x.tar'" in err.message


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    err = error_of(tmp_path, "version: 1\nimages: [a]\nsites:\n  s: {runtime: docker, platform: linux/amd64}\n"
                             "  s: {runtime: docker, platform: linux/arm64}\n")
    assert ":5: invalid YAML: duplicate key 's' (first on line 4)" in err.message


def test_images_missing_or_empty(tmp_path: Path) -> None:
    assert "no images: section" in error_of(tmp_path, "version: 1\n").message
    assert ":2: images is empty" in error_of(tmp_path, "version: 1\nimages: []\n").message
    assert ":2: images must be a list" in error_of(tmp_path, "version: 1\nimages: alpine\n").message
