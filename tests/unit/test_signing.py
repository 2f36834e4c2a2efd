"""Signed bundles: keys, the device's trust policy, every way to forge one, downgrades.

Bundles are real (``pack.write_bundle`` over real tiny images); the runtimes are
edgebundle's own over modelled daemons (``test_pack_import.Site``), so "nothing reached
the runtime" is what ctr/dockerd were handed. Forgeries are made the way an attacker
would: edit a record, then recompute every checksum that is not a signature.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Dict, List

import pytest

from edgebundle.cache import BlobCache
from edgebundle.errors import BundleFormatError, TrustError, UsageError
from edgebundle.format import FEATURE_SIGNATURE, TAG_ENTRY, TAG_HEADER, TAG_INDEX, TAG_SIGNATURE, \
    read_index
from edgebundle.holdings import Inventory
from edgebundle.plan import plan_bundle
from edgebundle.state import StateDir
from edgebundle.trust import TrustPolicy, generate_key, load_public_key, load_signing_key
from edgebundle.usecases.device import import_file, verify_bundle
from forge import is_tag, records, replace_record
from test_pack_import import Site, make_plan, pack
from tiny_images import APP, BASE, Images


@pytest.fixture
def built(tmp_path: Path) -> Images:
    return Images(BlobCache(tmp_path / "cache"))


@pytest.fixture
def keys(tmp_path: Path) -> Dict[str, Any]:
    out = {}
    for name in ("fleet", "other", "next"):
        gen = generate_key(str(tmp_path / name))
        out[name] = load_signing_key(gen.private_path)
        out[name + ".pub"] = gen.public_path
    return out


def policy(*pubs: str) -> TrustPolicy:
    return TrustPolicy(tuple(load_public_key(p) for p in pubs), "/nonexistent")


def signed_bundle(tmp_path: Path, built: Images, runtime: str, signers: List[Any],
                  name: str = "b.ebundle", created: str = "2026-12-01T10:00:00Z") -> Path:
    img = built.image("example.test/shop/app:v1", [BASE, APP])
    out = tmp_path / name
    pack(make_plan([img], runtime), built.cache, out, signers=signers, created=created)
    return out


# --- keys ----------------------------------------------------------------------------


def test_key_generate_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    gen = generate_key(str(tmp_path / "k"))
    assert stat.S_IMODE(os.stat(gen.private_path).st_mode) == 0o600
    assert load_public_key(gen.public_path).key_id == load_signing_key(gen.private_path).key_id == gen.key_id
    assert gen.key_id.startswith("ed25519:") and len(gen.key_id) == 8 + 32
    with pytest.raises(UsageError, match="already exists"):
        generate_key(str(tmp_path / "k"))  # never over an existing key


def test_signing_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    gen = generate_key(str(tmp_path / "k"))
    os.chmod(gen.private_path, 0o644)
    with pytest.raises(UsageError, match="readable by others"):
        load_signing_key(gen.private_path)


def test_a_trust_file_that_is_not_a_key_fails_closed(tmp_path: Path) -> None:
    d = tmp_path / "trusted.d"
    d.mkdir()
    assert not TrustPolicy.load((), str(d)).enforced  # empty: no policy
    (d / "typo.pub").write_text("not a key\n")
    with pytest.raises(UsageError, match="typo.pub is not a PEM public key"):
        TrustPolicy.load((), str(d))


# --- the device decides before the runtime sees anything -----------------------------


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_signed_bundle_by_a_trusted_key_imports(tmp_path: Path, built: Images, keys: Dict[str, Any],
                                                runtime: str) -> None:
    out = signed_bundle(tmp_path, built, runtime, [keys["fleet"]])
    site = Site(runtime, tmp_path)
    result = import_file(str(out), site.runtime, trust=policy(keys["fleet.pub"]),
                         state=StateDir(tmp_path / "state"))
    assert result.signed_by == keys["fleet"].key_id
    assert "example.test/shop/app:v1" in site.names()


def untouched(site: Site) -> bool:
    if site.kind == "containerd":
        return site.ctr.imports == [] and site.ctr.images == {}
    return site.engine.loads == [] and site.engine.images == {} and site.engine.aborted == 0


def refused(out: Path, site: Site, trust: TrustPolicy, tmp_path: Path, match: str,
            error: type = TrustError) -> None:
    with pytest.raises(error, match=match):
        import_file(str(out), site.runtime, trust=trust, state=StateDir(tmp_path / "state"))
    assert untouched(site)


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_unsigned_bundle_refused_where_signatures_are_enforced(tmp_path: Path, built: Images,
                                                               keys: Dict[str, Any], runtime: str) -> None:
    out = signed_bundle(tmp_path, built, runtime, [])
    refused(out, Site(runtime, tmp_path), policy(keys["fleet.pub"]), tmp_path, "is not signed")


def test_unsigned_bundle_imports_without_a_policy(tmp_path: Path, built: Images) -> None:
    out = signed_bundle(tmp_path, built, "containerd", [])
    site = Site("containerd", tmp_path)
    result = import_file(str(out), site.runtime, trust=TrustPolicy((), ""), state=StateDir(tmp_path / "s"))
    assert result.signed_by is None and "example.test/shop/app:v1" in site.names()


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_bundle_signed_by_an_untrusted_key_is_refused(tmp_path: Path, built: Images,
                                                      keys: Dict[str, Any], runtime: str) -> None:
    out = signed_bundle(tmp_path, built, runtime, [keys["other"]])
    refused(out, Site(runtime, tmp_path), policy(keys["fleet.pub"]), tmp_path,
            "a key this device does not trust")


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_tampered_header_breaks_the_signature(tmp_path: Path, built: Images, keys: Dict[str, Any],
                                              runtime: str) -> None:
    out = signed_bundle(tmp_path, built, runtime, [keys["fleet"]])
    replace_record(out, is_tag(TAG_HEADER), lambda h: dict(h, site="gw-99"))
    refused(out, Site(runtime, tmp_path), policy(keys["fleet.pub"]), tmp_path,
            "does not match its header")


def test_stripped_signature_record_is_malformed(tmp_path: Path, built: Images,
                                                keys: Dict[str, Any]) -> None:
    out = signed_bundle(tmp_path, built, "containerd", [keys["fleet"]])
    replace_record(out, is_tag(TAG_SIGNATURE), lambda s: None)
    refused(out, Site("containerd", tmp_path), policy(keys["fleet.pub"]), tmp_path,
            "expected signature record", BundleFormatError)


def test_stripped_signature_and_feature_is_an_unsigned_bundle(tmp_path: Path, built: Images,
                                                              keys: Dict[str, Any]) -> None:
    out = signed_bundle(tmp_path, built, "containerd", [keys["fleet"]])
    replace_record(out, is_tag(TAG_SIGNATURE), lambda s: None)
    replace_record(out, is_tag(TAG_HEADER), lambda h: dict(h, required_features=[
        f for f in h["required_features"] if f != FEATURE_SIGNATURE]))
    refused(out, Site("containerd", tmp_path), policy(keys["fleet.pub"]), tmp_path, "is not signed")


def test_re_signed_by_an_unknown_key_is_refused(tmp_path: Path, built: Images,
                                                keys: Dict[str, Any]) -> None:
    out = signed_bundle(tmp_path, built, "containerd", [keys["fleet"]])
    forged = signed_bundle(tmp_path, built, "containerd", [keys["other"]], name="forged.ebundle")
    their_sig = [r for r in records(forged.read_bytes()) if r[0] == TAG_SIGNATURE][0][3]
    replace_record(out, is_tag(TAG_SIGNATURE), lambda s: their_sig)
    refused(out, Site("containerd", tmp_path), policy(keys["fleet.pub"]), tmp_path,
            "a key this device does not trust")


def test_signature_claiming_a_trusted_key_id_is_checked(tmp_path: Path, built: Images,
                                                        keys: Dict[str, Any]) -> None:
    out = signed_bundle(tmp_path, built, "containerd", [keys["other"]])
    replace_record(out, is_tag(TAG_SIGNATURE), lambda s: {"signatures": [
        dict(s["signatures"][0], key_id=keys["fleet"].key_id)]})
    refused(out, Site("containerd", tmp_path), policy(keys["fleet.pub"]), tmp_path,
            "does not match its header")


@pytest.mark.parametrize("runtime", ["containerd", "docker"])
def test_tampered_entry_record_refused_before_its_bytes(tmp_path: Path, built: Images,
                                                        keys: Dict[str, Any], runtime: str) -> None:
    out = signed_bundle(tmp_path, built, runtime, [keys["fleet"]])
    # The first entry: nothing has been streamed to the runtime when it is refused.
    replace_record(out, is_tag(TAG_ENTRY), lambda e: dict(e, media_type="application/x-evil"))
    refused(out, Site(runtime, tmp_path), policy(keys["fleet.pub"]), tmp_path,
            "is not the entry its header commits to at position 0")


def test_tampered_entry_record_without_signature_is_a_format_error(tmp_path: Path, built: Images) -> None:
    out = signed_bundle(tmp_path, built, "containerd", [])
    replace_record(out, is_tag(TAG_ENTRY), lambda e: dict(e, media_type="application/x-evil"))
    with pytest.raises(BundleFormatError, match="commits to at position 0"):
        verify_bundle(str(out))


def test_tampered_image_record_refused_before_any_image(tmp_path: Path, built: Images,
                                                        keys: Dict[str, Any]) -> None:
    out = signed_bundle(tmp_path, built, "containerd", [keys["fleet"]])

    def evil(index: Any) -> Any:
        index["images"][0]["ref"] = "example.test/shop/evil:v1"
        return index
    replace_record(out, is_tag(TAG_INDEX), evil)
    site = Site("containerd", tmp_path)
    with pytest.raises(TrustError, match="image records are not the ones"):
        import_file(str(out), site.runtime, trust=policy(keys["fleet.pub"]),
                    state=StateDir(tmp_path / "state"))
    assert site.ctr.images == {} and site.names() == set()


def test_co_signed_bundle_passes_either_trust(tmp_path: Path, built: Images, keys: Dict[str, Any]) -> None:
    out = signed_bundle(tmp_path, built, "containerd", [keys["fleet"], keys["next"]])
    for pub, key in (("fleet.pub", "fleet"), ("next.pub", "next")):
        assert verify_bundle(str(out), policy(keys[pub])).signed_by == keys[key].key_id
    assert [s.key_id for s in read_index(out).signatures] == [keys["fleet"].key_id, keys["next"].key_id]


def test_verify_without_policy_reports_the_signers(tmp_path: Path, built: Images,
                                                   keys: Dict[str, Any]) -> None:
    out = signed_bundle(tmp_path, built, "containerd", [keys["fleet"]])
    result = verify_bundle(str(out))
    assert result.signatures == [keys["fleet"].key_id] and result.signed_by is None


# --- downgrades ----------------------------------------------------------------------


def test_older_signed_bundle_is_refused_after_a_newer_one(tmp_path: Path, built: Images,
                                                          keys: Dict[str, Any]) -> None:
    new = signed_bundle(tmp_path, built, "containerd", [keys["fleet"]], "new.ebundle",
                        created="2026-12-01T12:00:00Z")
    old = signed_bundle(tmp_path, built, "containerd", [keys["fleet"]], "old.ebundle",
                        created="2026-11-30T12:00:00Z")
    site, state, trust = Site("containerd", tmp_path), StateDir(tmp_path / "state"), policy(keys["fleet.pub"])
    import_file(str(new), site.runtime, trust=trust, state=state)
    imports = len(site.ctr.imports)
    with pytest.raises(TrustError, match="refusing a downgrade") as info:
        import_file(str(old), site.runtime, trust=trust, state=state)
    assert "new.ebundle" in str(info.value) and "--allow-downgrade" in str(info.value)
    assert len(site.ctr.imports) == imports  # refused before the runtime
    import_file(str(old), site.runtime, trust=trust, state=state, allow_downgrade=True)
    with pytest.raises(TrustError, match="refusing a downgrade"):  # the newest stays the mark
        import_file(str(old), site.runtime, trust=trust, state=state)
    import_file(str(new), site.runtime, trust=trust, state=state)  # same age again: fine


def test_downgrade_mark_is_per_site(tmp_path: Path, built: Images, keys: Dict[str, Any]) -> None:
    img = built.image("example.test/shop/app:v1", [BASE, APP])
    new = signed_bundle(tmp_path, built, "containerd", [keys["fleet"]], "new.ebundle",
                        created="2026-12-01T12:00:00Z")
    other = tmp_path / "other-site.ebundle"
    plan = plan_bundle("gw-02", [img], Inventory.empty("containerd", "k8s.io"), runtime="containerd",
                       namespace="k8s.io", platform="linux/amd64")
    pack(plan, built.cache, other, signers=[keys["fleet"]], created="2026-11-30T12:00:00Z")
    site, state, trust = Site("containerd", tmp_path), StateDir(tmp_path / "state"), policy(keys["fleet.pub"])
    import_file(str(new), site.runtime, trust=trust, state=state)
    # Older, but for another site this device also serves: no newer bundle of gw-02 seen.
    assert import_file(str(other), site.runtime, trust=trust, state=state).signed_by
    old = signed_bundle(tmp_path, built, "containerd", [keys["fleet"]], "old.ebundle",
                        created="2026-11-30T12:00:00Z")
    with pytest.raises(TrustError, match="refusing a downgrade"):  # gw-01's mark survived gw-02's
        import_file(str(old), site.runtime, trust=trust, state=state)


def test_a_device_without_cryptography_reads_its_policy_and_refuses_what_it_cannot_check(
        tmp_path: Path, built: Images, keys: Dict[str, Any]) -> None:
    """Keys load (and are reported) without the library; checking a signature needs it."""
    import subprocess
    import sys
    out = signed_bundle(tmp_path, built, "containerd", [keys["fleet"]])
    code = f"""
import sys
sys.modules["cryptography"] = None  # as on a device where it is not installed
from edgebundle.errors import TrustError
from edgebundle.trust import TrustPolicy
from edgebundle.usecases.device import verify_bundle
policy = TrustPolicy.load([{keys['fleet.pub']!r}], "/nonexistent")
print(policy.key_ids[0])
try:
    verify_bundle({str(out)!r}, policy)
except TrustError as exc:
    print("refused:", exc)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.splitlines()
    assert first == keys["fleet"].key_id
    assert second.startswith("refused:") and "python3-cryptography" in second
