"""Hostile image names are refused by the format's validation, before any runtime call.

Found by a probe on real containerd and dockerd (issue 8): a name with a newline inside
passed the reference grammar, a Unicode tag was accepted, a bundle could name an image
under the importer's temporary prefix, and two different images could end up under one
runtime name. Each is a one-line ``BundleFormatError`` naming the field, from ``verify``
and from ``import`` (which must not have touched the runtime), and the packer's manifest
refuses the same names with its own ``ManifestError``.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

import edgebundle
from edgebundle.errors import BundleFormatError, ManifestError, UsageError
from edgebundle.format.records import parse_header
from edgebundle.importer import import_bundle
from edgebundle.importer.containerd import TEMP_PREFIX
from edgebundle.manifest import load_manifest
from edgebundle.naming import RESERVED_DOMAIN, check_device_name, name_clash
from edgebundle.reference import parse_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_format import craft  # noqa: E402  (the spec-level crafter)

D = {c: "sha256:" + c * 64 for c in "abcdef"}


def header(images: List[Dict[str, str]], **over: Any) -> Dict[str, Any]:
    hdr = {"created": "2026-01-01T00:00:00Z", "tool": "test", "required_features": [],
           "volume": None, "site": "gw-01", "runtime": "containerd", "namespace": "k8s.io",
           "platform": "linux/amd64", "layer_form": "blob", "prerequisites": [],
           "images": images, "content_bytes": 0}
    hdr.update(over)
    return hdr


def img(name: str, top: str = D["a"], config: str = D["b"]) -> Dict[str, str]:
    return {"name": name, "top": top, "config": config}


def refused(hdr: Dict[str, Any]) -> str:
    with pytest.raises(BundleFormatError) as info:
        parse_header(hdr, "b.ebundle")
    text = str(info.value)
    assert "\n" not in text, text  # one line, even when the name has a newline inside
    return text


# ---------------------------------------------------------------------------
# The reference grammar


@pytest.mark.parametrize("text", [
    "host.test/repo\n:v1", "host.test/repo:v1\n", "host.test/repo\n", "host.test\n/repo:v1",
    "host.test/repo@sha256:" + "a" * 64 + "\n", "host.test/repo:v\u00e9", "host.test/repo:\u0661",
    "host.test/r\u00e9po:v1", "h\u00f6st.test/repo:v1", "host.test/repo:\uff21",
])
def test_reference_grammar_refuses_newlines_and_non_ascii(text: str) -> None:
    with pytest.raises(UsageError):
        parse_reference(text)


def test_reference_grammar_still_takes_what_it_should() -> None:
    assert str(parse_reference("alpine")) == "docker.io/library/alpine:latest"
    assert parse_reference("Host.test:5000/a_b/c-d:V1.2_3").tag == "V1.2_3"


def test_no_regex_in_the_code_base_anchors_with_a_bare_dollar() -> None:
    """``$`` matches before a trailing newline; every validator must use ``\\Z``."""
    offenders = []
    for path in Path(edgebundle.__file__).parent.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"re\.(?:compile|match|fullmatch|search)\(\s*r?f?r?(['\"])(.*?)\1", text):
            if m.group(2).endswith("$"):
                offenders.append(f"{path.name}: {m.group(2)[-40:]}")
    assert not offenders


@pytest.mark.parametrize("value, check", [
    ("sha256:" + "a" * 64 + "\n", "digest"), ("gw-01\n", "site"), ("k8s.io\n", "namespace"),
])
def test_validators_refuse_a_trailing_newline(value: str, check: str) -> None:
    from edgebundle.oci import check_digest
    from edgebundle.specs import NAMESPACE_RE, SITE_NAME_RE
    if check == "digest":
        with pytest.raises(ValueError):
            check_digest(value)
    else:
        assert not (SITE_NAME_RE if check == "site" else NAMESPACE_RE).match(value)


# ---------------------------------------------------------------------------
# The bundle's header


def test_a_valid_header_is_accepted() -> None:
    parsed = parse_header(header([img("example.test/app:v1"),
                                  img("example.test/app@" + D["c"], top=D["c"])]), "b")
    assert [i.name for i in parsed.images] == ["example.test/app:v1", "example.test/app@" + D["c"]]


def test_name_with_a_newline_inside() -> None:
    text = refused(header([img("example.test/repo\n:v1")]))
    assert "header images[0] field 'name' is not a valid image name" in text


def test_unicode_tag() -> None:
    text = refused(header([img("example.test/repo:v\u00e9")]))
    assert "images[0] field 'name'" in text and "bad tag" in text


@pytest.mark.parametrize("name", [
    TEMP_PREFIX + "nonce/0:pending", RESERVED_DOMAIN + "/x:v1",
    RESERVED_DOMAIN.upper() + "/x:v1", RESERVED_DOMAIN + ":443/x:v1".replace(":443", ""),
])
def test_reserved_temporary_prefix(name: str) -> None:
    text = refused(header([img(name)]))
    assert "images[0] field 'name'" in text and RESERVED_DOMAIN in text


def test_the_reserved_host_is_the_importers_prefix() -> None:
    assert TEMP_PREFIX == RESERVED_DOMAIN + "/"


def test_two_spellings_of_one_name() -> None:
    """Why the old "unique names" check let the probe through: it compared raw strings."""
    text = refused(header([img("docker.io/library/alpine:3"), img("alpine:3", top=D["c"])]))
    assert "images[1] field 'name'" in text and "normalised form" in text


def test_docker_tag_of_a_pinned_image_meets_a_real_tag() -> None:
    pinned = "example.test/app@" + D["c"]
    tag = "example.test/app:" + D["c"].replace(":", "-")
    text = refused(header([img(pinned, top=D["c"], config=D["d"]), img(tag, top=D["e"], config=D["f"])],
                          runtime="docker", layer_form="tar", namespace=None))
    assert "header field 'images' names one image twice" in text and "Docker image" in text


def test_same_name_twice() -> None:
    text = refused(header([img("example.test/app:v1"), img("example.test/app:v1", top=D["c"])]))
    assert "field 'images' names 'example.test/app:v1' more than once" in text


def test_pinned_name_must_be_its_top() -> None:
    text = refused(header([img("example.test/app@" + D["c"], top=D["a"])]))
    assert "images[0] field 'top' is " + D["a"] in text and "named by digest " + D["c"] in text


def test_same_content_under_both_names_is_fine() -> None:
    """repo:v1 and repo@top (its CRI name) for the same content do not clash."""
    assert name_clash([("example.test/app:v1", D["c"], D["d"]),
                       ("example.test/app@" + D["c"], D["c"], D["d"])]) is None
    # CRI's name for repo:v1 is repo@<its top>: another image may not take it
    assert "containerd image 'example.test/app@" in (name_clash(
        [("example.test/app:v1", D["c"], D["d"]), ("example.test/app@" + D["c"], D["e"], D["d"])]) or "")


@pytest.mark.parametrize("field, value", [("site", "gw-01\n"), ("site", "../etc"),
                                          ("namespace", "k8s.io\n"), ("namespace", "k8s io")])
def test_site_and_namespace(field: str, value: str) -> None:
    assert f"header field {field!r}" in refused(header([], **{field: value}))


def test_check_device_name_is_what_packers_write() -> None:
    assert str(check_device_name("example.test/app:v1")) == "example.test/app:v1"
    with pytest.raises(UsageError):
        check_device_name("example.test/app:v1@" + D["a"])  # device names drop the tag


# ---------------------------------------------------------------------------
# verify and import: refused before the first entry, runtime untouched


class Untouchable:
    """A runtime that fails the test on any use."""

    kind = "containerd"

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the runtime was touched ({name}) before the names were checked")


@pytest.mark.parametrize("name", ["example.test/repo\n:v1", "example.test/repo:v\u00e9",
                                  TEMP_PREFIX + "x/0:pending"])
def test_import_refuses_before_touching_the_runtime(name: str) -> None:
    raw = craft([], header=header([img(name)]))
    with pytest.raises(BundleFormatError, match="images\\[0\\] field 'name'"):
        import_bundle(io.BytesIO(raw), "b.ebundle", Untouchable())  # type: ignore[arg-type]


def test_import_refuses_a_name_clash_before_touching_the_runtime() -> None:
    raw = craft([], header=header([img("docker.io/library/alpine:3"), img("alpine:3", top=D["c"])]))
    with pytest.raises(BundleFormatError, match="normalised form"):
        import_bundle(io.BytesIO(raw), "b.ebundle", Untouchable())  # type: ignore[arg-type]


def test_verify_cli_exit_code_and_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgebundle.cli.main import main
    path = tmp_path / "b.ebundle"
    path.write_bytes(craft([], header=header([img("example.test/repo\n:v1")])))
    assert main(["verify", str(path)]) == 5
    err = [l for l in capsys.readouterr().err.splitlines() if "error:" in l]
    assert len(err) == 1 and "field 'name' is not a valid image name" in err[0]


# ---------------------------------------------------------------------------
# The packer's manifest


def manifest(tmp_path: Path, *refs: str) -> Path:
    path = tmp_path / "m.yaml"
    lines = ["version: 1", "sites:", "  gw: {runtime: docker, platform: linux/amd64}", "images:"]
    lines += [f"  - {r!r}".replace("'", '"') for r in refs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("refs, fragment", [
    ((RESERVED_DOMAIN + "/x:v1",), RESERVED_DOMAIN),
    (("example.test/app:v\u00e9",), "bad tag"),
    (("example.test/app:v1@" + D["a"], "example.test/app@" + D["a"]), "both named"),
    (("example.test/app@" + D["a"], "example.test/app:" + D["a"].replace(":", "-")), "both named"),
])
def test_manifest_refuses(tmp_path: Path, refs: Any, fragment: str) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest(tmp_path, *refs))
    assert fragment in str(info.value) and "m.yaml:" in str(info.value)


def test_manifest_refuses_a_newline_in_a_ref(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text('version: 1\nsites:\n  gw: {runtime: docker, platform: linux/amd64}\n'
                    'images:\n  - "example.test/repo\\n:v1"\n', encoding="utf-8")
    with pytest.raises(ManifestError, match="m.yaml:5"):
        load_manifest(path)


@pytest.mark.parametrize("platform", ["linux/amd64\n", "linux\n/amd64", "Linux/AMD64", " linux/amd64",
                                      "linux/am d64", "linux/\u0430md64"])
def test_platform_must_be_as_writers_emit_it(platform: str) -> None:
    assert "header field 'platform'" in refused(header([], platform=platform))


@pytest.mark.parametrize("key_id", ["ed25519:ab\ncd", "ed25519:\u00e9", "ed25519: x", "a\x00b"])
def test_signature_key_id_is_printable_ascii(key_id: str) -> None:
    """Found by the fuzz target: a key id with a newline split the 'signed by ...' error."""
    from edgebundle.format.signature import parse_signature_record
    record = {"signatures": [{"algorithm": "ed25519", "key_id": key_id, "signature": bytes(64)}]}
    with pytest.raises(BundleFormatError, match="signatures\\[0\\] field 'key_id' is .*, not printable ASCII"):
        parse_signature_record(record, "b")
