#!/usr/bin/env python3
"""Break each guarded behaviour once, in a scratch copy, and check that a test fails.

"No test that cannot fail": every entry below is a one-line change that undoes a rule the
tests claim to cover (from the model-and-seams review), plus the tests that must then
fail. The tree under test is copied to a temp dir, so the checkout is never touched.

    .venv/bin/python scripts/mutants.py            # all, ~3 minutes
    .venv/bin/python scripts/mutants.py docker     # those whose name contains "docker"

Exit 0 when every mutant is killed; otherwise the survivors are listed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: str  # pytest selection (paths and -k), relative to the checkout


MUTANTS: List[Mutant] = [
    # verify checks every rule of FORMAT.md
    Mutant("header volume may be set", "edgebundle/format/records.py",
           '    f.nil("volume", ', '    (lambda *a: None)("volume", ', "tests/unit/test_cli.py -k spec_breaking"),
    Mutant("header runtime unchecked", "edgebundle/format/records.py",
           'runtime = f.choice("runtime", RUNTIMES)', 'runtime = f.text("runtime")',
           "tests/unit/test_cli.py -k spec_breaking"),
    Mutant("header layer_form unchecked", "edgebundle/format/records.py",
           'layer_form = f.choice("layer_form", LAYER_FORMS)', 'layer_form = f.text("layer_form")',
           "tests/unit/test_cli.py -k spec_breaking"),
    Mutant("header prerequisites shape unchecked", "edgebundle/format/records.py",
           'for i, item in enumerate(f.items("prerequisites", MAX_PREREQUISITES)))',
           'for i, item in enumerate(f.obj["prerequisites"] if isinstance(f.obj["prerequisites"], list) else []))',
           "tests/unit/test_cli.py -k spec_breaking"),
    Mutant("record layers shape unchecked", "edgebundle/format/records.py",
           'for i, item in enumerate(f.items("layers", MAX_LAYERS)))',
           'for i, item in enumerate(f.obj["layers"] if isinstance(f.obj["layers"], list) else []))',
           "tests/unit/test_cli.py -k spec_breaking"),
    Mutant("record may differ from header", "edgebundle/format/records.py",
           "        if rec.summary != summary:", "        if False:",
           "tests/unit/test_cli.py tests/unit/test_pack_import.py -k 'spec_breaking or mismatch'"),
    Mutant("layer coverage unchecked", "edgebundle/format/records.py",
           "            if (layer.entry not in carried and layer.diff_id not in carried\n",
           "            if (False\n", "tests/unit/test_pack_import.py -k absent_content"),
    # content deltas
    Mutant("base file used unverified", "edgebundle/rebuild.py",
           "            self._verify(f, fh)\n", "            pass\n",
           "tests/property/test_delta_property.py -k prerequisite_error"),
    Mutant("rebuilt tar not held to its target", "edgebundle/rebuild.py",
           "    if total != head.target_size or actual != head.target:", "    if False:",
           "tests/property/test_delta_property.py -k damaged"),
    Mutant("delta base need not be a prerequisite", "edgebundle/format/records.py",
           "        if (base.chain_id, base.diff_id) not in header.prerequisite_chains:", "        if False:",
           "tests/unit/test_delta_plan.py -k refuses_deltas"),
    Mutant("delta bases not made prerequisites", "edgebundle/plan.py",
           "                    prereqs.setdefault((base.chain_id, base.digest), base)",
           "                    pass", "tests/unit/test_delta_plan.py -k against_the_site_layers"),
    Mutant("delta shipped though not smaller", "edgebundle/bases.py",
           "        if stored > layer.size * SHIP_DELTA_BELOW:", "        if False:",
           "tests/unit/test_delta_plan.py -k reason"),
    Mutant("unknown required feature accepted", "edgebundle/format/records.py",
           "    unknown = sorted(f for f in features if f not in KNOWN_FEATURES)", "    unknown = []",
           "tests/unit/test_delta_plan.py -k upgrade"),
    Mutant("base tree follows symlinks", "edgebundle/rebuild.py",
           '_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)', "_O_NOFOLLOW = 0",
           "tests/property/test_delta_property.py -k symlink"),
    Mutant("deltas offered by a runtime that cannot serve bases", "edgebundle/usecases/device.py",
           "    features = KNOWN_FEATURES if runtime.reads_bases() else KNOWN_FEATURES - {FEATURE_DELTA}",
           "    features = KNOWN_FEATURES", "tests/unit/test_delta_plan.py -k serve_bases"),
    Mutant("unchanged members not copied from a tar base", "edgebundle/delta.py",
           "            if hit is not None and length >= MIN_RANGE:", "            if False:",
           "tests/property/test_delta_property.py -k ranges"),
    Mutant("a tar base for a few unchanged headers", "edgebundle/delta.py",
           "MIN_RANGE_SHARE = 0.25 ", "MIN_RANGE_SHARE = 0.0 ",
           "tests/property/test_delta_property.py -k cover"),
    Mutant("device ignores the site's deltas: false", "edgebundle/usecases/packer.py",
           "        with_deltas = deltas and site.deltas and bool(plan.shipped_layers())",
           "        with_deltas = deltas and bool(plan.shipped_layers())",
           "tests/unit/test_delta_plan.py -k honours"),
    # the real loaders, through their seams
    Mutant("docker tag for pinned images", "edgebundle/importer/docker.py",
           '"RepoTags": [docker_tag(rec.name)]', '"RepoTags": [rec.name]',
           "tests/unit/test_pack_import.py -k docker"),
    Mutant("docker load gets manifests", "edgebundle/importer/docker.py",
           'return head.delta is not None or not is_manifest_or_index(head.media_type or "")',
           "return True",
           "tests/unit/test_pack_import.py tests/unit/test_loaders.py -k docker"),
    Mutant("containerd imports under real names", "edgebundle/importer/containerd.py",
           "                        first.append(_named(rec.top, names[rec.name]))",
           "                        first.append(_named(rec.top, rec.name))",
           "tests/unit/test_pack_import.py -k containerd"),
    Mutant("containerd publishes without the completeness check", "edgebundle/importer/containerd.py",
           "if held.complete and dg == rec.top.digest:", "if True:",
           "tests/unit/test_pack_import.py -k incomplete"),
    Mutant("containerd report: every image complete", "edgebundle/importer/containerd.py",
           "complete = bool(tree.config and layers and chains[-1] in snaps",
           "complete = True or bool(tree.config and layers and chains[-1] in snaps",
           "tests/unit/test_loaders.py -k containerd"),
    Mutant("docker report without chains", "edgebundle/importer/docker.py",
           "            chains.update(ids)", "            pass",
           "tests/unit/test_loaders.py -k docker_report"),
    Mutant("temporary names in the report", "edgebundle/importer/containerd.py",
           "if name.startswith(TEMP_PREFIX) and not include_temp:", "if False:",
           "tests/unit/test_loaders.py -k temporary"),
    Mutant("pack --full ignored", "edgebundle/usecases/packer.py",
           "        if full:\n", "        if False:\n", "tests/unit/test_cli.py -k full"),
    Mutant("offline-source path traversal", "edgebundle/sources.py",
           "        if self.root.resolve() not in path.parents:", "        if False:",
           "tests/unit/test_sources.py -k outside"),
    Mutant("docker chunked framing", "edgebundle/importer/docker.py",
           'sock.sendall(b"%x\\r\\n" % len(data))', 'sock.sendall(b"%d\\r\\n" % len(data))',
           "tests/unit/test_pack_import.py -k docker"),
    Mutant("single-threaded zstd", "edgebundle/format/writer.py",
           "threads=max(1, threads)", "threads=0", "tests/unit/test_format.py -k thread"),
    Mutant("report key drifts from FORMAT.md", "edgebundle/report.py",
           '"generated_at": inv.generated_at,', '"generated": inv.generated_at,',
           "tests/unit/test_format_spec.py -k report_keys"),
    # no traceback
    Mutant("corrupt stored inventory", "edgebundle/report.py",
           "        return load_json_object(text, what, hint)\n    except ValueError as exc:",
           "        return load_json_object(text, what, hint)\n    except KeyError as exc:",
           "tests/unit/test_cli.py -k corrupt"),
    Mutant("non-sha256 digest in a containerd index", "edgebundle/importer/containerd.py",
           "            desc = Descriptor.from_json(m)\n        except ValueError:\n            continue",
           "            desc = Descriptor.from_json(m)\n        except KeyError:\n            continue",
           "tests/unit/test_loaders.py tests/unit/test_cli.py -k 'odd or sha256'"),
    Mutant("damaged cache blob", "edgebundle/pack.py",
           "        except EntryMismatch:\n            # The writer hashes what it packs",
           "        except KeyError:\n            # The writer hashes what it packs",
           "tests/unit/test_pack_import.py -k damaged"),
    Mutant("missing cache blob", "edgebundle/cache.py",
           "        except FileNotFoundError:\n            raise CacheError",
           "        except KeyError:\n            raise CacheError",
           "tests/unit/test_pack_import.py -k missing_cache"),
    # signed bundles and the device's trust policy (issue 8)
    Mutant("trust: any signature verifies", "edgebundle/trust.py",
           "            return False\n        return True", "            return True\n        return True",
           "tests/unit/test_signing.py"),
    Mutant("trust: unsigned accepted under a policy", "edgebundle/trust.py",
           "        if not reader.signatures:", "        if not reader.signatures and False:",
           "tests/unit/test_signing.py"),
    Mutant("trust: entry records not held to the signed header", "edgebundle/format/signature.py",
           "    if entry_commitment(head) != commits.entries[position]:", "    if False:",
           "tests/unit/test_signing.py"),
    Mutant("trust: image records not held to the signed header", "edgebundle/format/signature.py",
           "    if images_commitment(images) != commits.images:", "    if False:",
           "tests/unit/test_signing.py"),
    Mutant("trust: an older signed bundle accepted", "edgebundle/trust.py",
           "    if _created(header, name) < newest:", "    if False:",
           "tests/unit/test_signing.py -k downgrade"),
    Mutant("trust: one downgrade mark for every site", "edgebundle/trust.py",
           '    key = site if site is not None else ""', '    key = ""',
           "tests/unit/test_signing.py -k per_site"),
    Mutant("trust: pack writes what an enforcing site refuses", "edgebundle/usecases/packer.py",
           "        trusted = inventory.trusted_keys\n", "        trusted = None\n",
           "tests/unit/test_cli.py -k signed"),
    # interrupted imports (issue 8)
    Mutant("recovery: import without the device lock", "edgebundle/usecases/device.py",
           "    with open_bundle(path, more) as fh, state.lock():", "    with open_bundle(path, more) as fh:",
           "tests/unit/test_recovery.py"),
    Mutant("recovery: a started publication not rolled forward", "edgebundle/importer/ctrsurvival.py",
           "        published = _roll_forward(runtime, journal.renames, listed)", "        published = []",
           "tests/unit/test_recovery.py"),
    # one home per concept, outputs, logging
    Mutant("a second classifier", "edgebundle/pack.py",
           "kind = classify(layer.media_type, fh.read(MAGIC_BYTES))",
           'kind = "gzip" if layer.media_type.endswith("gzip") else classify(layer.media_type, fh.read(MAGIC_BYTES))',
           "tests/unit/test_compression.py"),
    Mutant("a hand-rolled atomic write", "edgebundle/store.py",
           "        atomic_write(path, text.encode())",
           "        path.with_suffix('.tmp').write_text(text); os.replace(path.with_suffix('.tmp'), path)",
           "tests/unit/test_files.py"),
    Mutant("pack -o renames over a FIFO", "edgebundle/files.py",
           "    return True  # FIFO, character or block device, socket",
           "    return False  # FIFO, character or block device, socket",
           "tests/unit/test_files.py tests/unit/test_cli.py -k 'fifo or stream or dev_full'"),
    Mutant("-v shows nothing", "edgebundle/logs.py",
           "logging.INFO if verbose else logging.WARNING", "logging.WARNING",
           "tests/unit/test_cli.py -k verbose"),
    Mutant("secrets in logs", "edgebundle/logs.py",
           "    for pattern, replacement in _SECRETS:", "    for pattern, replacement in []:",
           "tests/unit/test_cli.py -k secret"),
    Mutant("a secret pattern missing", "edgebundle/logs.py",
           '(re.compile(r"(?i)\\b(bearer|basic)\\s+[A-Za-z0-9._~+/=-]{8,}"), r"\\1 ***"),', "",
           "tests/unit/test_cli.py -k secret"),
    Mutant("pack plans twice", "edgebundle/usecases/packer.py",
           "        return with_layer_info(plan, fetched)",
           "        return with_layer_info(self.plan(self.site(plan.site), deltas=False), fetched)",
           "tests/unit/test_cli.py -k plans_once"),
    Mutant("registry client left open", "edgebundle/usecases/packer.py",
           "        if self._own_client:\n            self.client.close()",
           "        if False:\n            self.client.close()",
           "tests/unit/test_cli.py -k plans_once"),
    Mutant("/dev/stdout renamed over", "edgebundle/files.py",
           "        if _links_through_proc(path):\n            return True",
           "        if False:\n            return True",
           "tests/unit/test_files.py -k stream_targets"),
    Mutant("full disk is a traceback", "edgebundle/files.py",
           "            return self._raw.write(data)\n        except OSError as exc:",
           "            return self._raw.write(data)\n        except KeyError as exc:",
           "tests/unit/test_files.py tests/unit/test_cli.py -k 'dev_full or full_disk'"),
    # hostile input (issue 8): names, record bounds, reports
    Mutant("a newline before the end of a name passes", "edgebundle/reference.py",
           '_PATH_RE = re.compile(rf"\\A{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*\\Z", re.ASCII)',
           '_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$", re.ASCII)',
           "tests/unit/test_hostile_names.py -k newline"),
    Mutant("Unicode tags pass", "edgebundle/reference.py",
           '_TAG_RE = re.compile(rf"\\A{_TAG}\\Z", re.ASCII)', '_TAG_RE = re.compile(r"\\A\\w[\\w.-]{0,127}\\Z")',
           "tests/unit/test_hostile_names.py -k unicode"),
    Mutant("a bundle names an image under the importer's prefix", "edgebundle/naming.py",
           "    if ref.domain.lower() == RESERVED_DOMAIN:\n        raise UsageError(f\"image name",
           "    if False:\n        raise UsageError(f\"image name",
           "tests/unit/test_hostile_names.py -k reserved"),
    Mutant("two spellings of one name", "edgebundle/naming.py",
           "    if canonical != name:", "    if False:", "tests/unit/test_hostile_names.py -k spellings"),
    Mutant("two images take one runtime name", "edgebundle/format/records.py",
           "    if clash is not None:", "    if False:", "tests/unit/test_hostile_names.py -k docker_tag"),
    Mutant("no object budget for records", "edgebundle/format/framing.py",
           "list_hook=budget.list_hook, object_hook=budget.object_hook,", "",
           "tests/unit/test_hostile_bounds.py -k budget"),
    Mutant("lists unbounded", "edgebundle/format/records.py",
           "        if len(value) > maximum:", "        if False:",
           "tests/unit/test_hostile_bounds.py -k bounded"),
    Mutant("nested arrays in delta ops", "edgebundle/format/delta.py",
           "        if arrays[0] > 1:", "        if False:", "tests/unit/test_hostile_bounds.py -k nested"),
    Mutant("deep report is a traceback", "edgebundle/report.py",
           "    except RecursionError:", "    except KeyError:", "tests/unit/test_hostile_reports.py -k deep"),
    Mutant("report size unbounded", "edgebundle/report.py",
           "    if len(text) > MAX_REPORT_BYTES:", "    if False:",
           "tests/unit/test_hostile_reports.py -k 'size_limit or bytes'"),
    Mutant("complete image need not hold its layers", "edgebundle/report.py",
           "    _check_complete_images_are_held(inv)\n", "\n",
           "tests/unit/test_hostile_reports.py -k 'held or layer'"),
    Mutant("zstd errors escape the reader", "edgebundle/format/reader.py",
           "    except zstandard.ZstdError as exc:", "    except KeyError as exc:",
           "tests/property/test_fuzz.py -k records"),
    Mutant("plan and importer disagree on held layers", "edgebundle/holdings.py",
           "        return digest in self.inventory.blobs or chain_id in self.inventory.chains",
           "        return digest in self.inventory.blobs",
           "tests/unit/test_plan.py tests/unit/test_pack_import.py"),
    # disk pre-flight and a full disk met anyway (space.py; tests/integration/test_space.py
    # breaks the same rules against real daemons on a tmpfs)
    Mutant("import pre-flight skipped", "edgebundle/importer/__init__.py",
           "        space.preflight(name, header.content_bytes, header.unpacked_bytes, header.layer_form)",
           "        pass", "tests/unit/test_space_check.py -k 'whole or refused'"),
    Mutant("entries not checked as they stream", "edgebundle/importer/__init__.py",
           '                    space.before_entry(f"bundle {name} entry {entry.digest}", entry.size)',
           "                    pass", "tests/unit/test_space_check.py -k understates"),
    Mutant("runtime ENOSPC not reported as a full disk", "edgebundle/importer/__init__.py",
           "        if full is not None:", "        if False:", "tests/unit/test_space_check.py -k enospc"),
    Mutant("unpack not counted", "edgebundle/space.py",
           '        needs.append(Need(storage.unpacked, "snapshots" if containerd\n'
           '                          else "podman storage" if podman else storage.label,\n'
           "                          unpacked=est.unpacked))", "        pass",
           "tests/unit/test_space_check.py -k both_numbers"),
    Mutant("no safety margin", "edgebundle/space.py",
           "    return max(MIN_MARGIN, int(total * MARGIN_FRACTION))", "    return 0",
           "tests/unit/test_space_check.py -k margin"),
    Mutant("needs on one filesystem not added up", "edgebundle/space.py",
           "        groups.setdefault(dev, []).append((need, path))",
           "        groups.setdefault(id(need), []).append((need, path))",
           "tests/unit/test_space_check.py -k add_up"),
    Mutant("docker load's temp copy not counted", "edgebundle/importer/storage.py",
           '    return Storage("docker", os.path.join(root, "tmp"), layers, "docker")',
           '    return Storage("docker", None, layers, "docker")',
           "tests/unit/test_space_check.py -k recorded_info"),
    Mutant("packer cache ENOSPC left raw", "edgebundle/cache.py",
           "            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):", "            if True:",
           "tests/unit/test_space_check.py -k cache_filling"),
    # the encoded-entry cache: a layer compressed once, never shipped unchecked
    Mutant("cached entry not decoded before reuse", "edgebundle/format/writer.py",
           "decoded = raw() if head.codec == CODEC_STORED else zstd_decoded(raw(), what)",
           "decoded = raw()", "tests/unit/test_encoded_cache.py"),
    Mutant("cached entry's digest unchecked", "edgebundle/format/writer.py",
           "    if actual != head.digest or seen != head.size:\n        raise EncodedRefused",
           "    if False:\n        raise EncodedRefused", "tests/unit/test_encoded_cache.py"),
    Mutant("cached chunk bounds unchecked", "edgebundle/format/writer.py",
           "            if not 0 < len(chunk) <= MAX_CHUNK_SIZE:  # 0 would end the entry early",
           "            if not 0 <= len(chunk) <= 2 * MAX_CHUNK_SIZE:", "tests/unit/test_encoded_cache.py"),
    Mutant("cached entry's second pass unchecked", "edgebundle/format/writer.py",
           "    if hasher.hexdigest() != stored:  # raised", "    if False:  # raised", "tests/unit/test_encoded_cache.py"),
    Mutant("cached entry at another level accepted", "edgebundle/format/writer.py",
           "        if head.level != (self.level if head.codec == CODEC_ZSTD else None):",
           "        if False:", "tests/unit/test_encoded_cache.py"),
    Mutant("encoded cache key without the level", "edgebundle/encoded.py",
           "ident = json.dumps([ENCODED_VERSION, head.codec, encoding.level,",
           "ident = json.dumps([ENCODED_VERSION, head.codec,", "tests/unit/test_encoded_cache.py"),
    Mutant("encoded cache never reused", "edgebundle/encoded.py",
           "        if not path.is_file():\n            return None",
           "        if True:\n            return None", "tests/unit/test_encoded_cache.py"),
    Mutant("damaged cached entry kept", "edgebundle/pack.py",
           "            store.discard(head, writer.encoding, str(exc))", "            pass", "tests/unit/test_encoded_cache.py"),
    Mutant("encoded entry kept when its entry failed", "edgebundle/encoded.py",
           "        except BaseException:\n            tee.abandon()\n            raise",
           "        except BaseException:\n            tee.commit()\n            raise", "tests/unit/test_encoded_cache.py"),
    # fleet sync: done means the fresh report says so; one bundle per state; failures per site
    Mutant("sync done without the fresh report", "edgebundle/sync/run.py",
           "        if not state.after.done:", "        if False:",
           "tests/unit/test_sync.py -k fresh_report"),
    Mutant("sync state key ignores the inventory", "edgebundle/sync/states.py",
           '        "inventory": inventory_fingerprint(inventory),', '        "inventory": None,',
           "tests/unit/test_sync.py -k state_key"),
    Mutant("sync state key sees the report's time", "edgebundle/sync/states.py",
           '_VOLATILE = ("generated_at", "host", "site", "extra", "signatures")',
           '_VOLATILE = ("host", "site", "extra", "signatures")', "tests/unit/test_sync.py -k state_key"),
    Mutant("fleet bundle packed for every site", "edgebundle/sync/bundles.py",
           "            bundle = self.lookup(key)\n", "            bundle = None\n",
           "tests/unit/test_sync.py -k 'packs_once'"),
    Mutant("fleet bundle collected while needed", "edgebundle/sync/bundles.py",
           "                if not self.needed_by(key):", "                if True:",
           "tests/unit/test_sync.py -k 'packs_once or refusal_is_not'"),
    Mutant("sync retries nothing", "edgebundle/sync/run.py",
           "    return isinstance(exc, (LinkError, LockedError))", "    return False",
           "tests/unit/test_sync.py -k 'retried'"),
    Mutant("sync retries a refusal", "edgebundle/sync/device.py",
           "        return self.device_status in RETRY_EXIT_CODES", "        return True",
           "tests/unit/test_sync.py -k 'retried'"),
    Mutant("sync staged files never removed", "edgebundle/sync/run.py",
           "        device.clear_staging()\n", "        pass\n", "tests/unit/test_sync.py -k fresh_report"),
    Mutant("sync ignores the site lock", "edgebundle/sync/run.py",
           '"sync.lock", f"a sync of site {site.name}", "on this packer"):',
           '"sync.lock." + str(random.random()), f"a sync of site {site.name}", "on this packer"):',
           "tests/unit/test_sync.py -k another_sync"),
    Mutant("sync never finishes an interrupted site", "edgebundle/sync/run.py",
           "                if not opts.dry_run and self.packer.bundles.claimed(site.name):",
           "                if False:", "tests/unit/test_sync.py -k failed_prune"),
    Mutant("upload without the device's upload lock", "edgebundle/transfer/upload.py",
           "        holder = _hold_upload_lock(client, site, part, timeout, command_timeout)",
           "        holder = None", "tests/integration/test_upload_real.py -k another_packer"),
    Mutant("fleet bundle names a site", "edgebundle/sync/run.py",
           "            plan = dataclasses.replace(plan, site=None)\n", "            pass\n",
           "tests/unit/test_sync.py -k fresh_report"),
    # exports (edgebundle export)
    Mutant("k3s zstd window not held to 32 MiB", "edgebundle/usecases/export.py",
           "if params.window_log > archive.K3S_MAX_WINDOW_LOG:", "if False:",
           "tests/unit/test_export.py -k zstd_window"),
    Mutant("k3s archive names the half index", "edgebundle/usecases/export.py",
           "progress=progress,\n                          platform_manifests=fmt == archive.K3S_AIRGAP)",
           "progress=progress,\n                          platform_manifests=False)",
           "tests/unit/test_export.py -k k3s_airgap_names"),
    Mutant("damaged cache blob exported", "edgebundle/usecases/export.py",
           'if "sha256:" + hasher.hexdigest() != digest:', "if False:",
           "tests/unit/test_export.py -k damaged"),
    Mutant("zstd docker-archive accepted", "edgebundle/archive.py",
           "if fmt == DOCKER_ARCHIVE and kind == ZSTD:", "if False:",
           "tests/unit/test_export.py -k compression_refused"),
    Mutant("zstd layer in a docker-archive as it is", "edgebundle/archive.py",
           "    if layer.docker_readable:", "    if True:",
           "tests/unit/test_export.py -k zstd_layer"),
    # registries as people run them (issue 10)
    Mutant("NO_PROXY ignored", "edgebundle/registry/proxy.py",
           '    for raw in no_proxy.split(","):', '    for raw in "".split(","):',
           "tests/integration/test_proxy_netns_real.py"),
    Mutant("certs.d CA not loaded", "edgebundle/registry/tls.py",
           "            ctx.load_verify_locations(cafile=ca)", "            pass",
           "tests/integration/test_registry_tls_real.py -k 'private_ca or ca_file'"),
    Mutant("downloads run one at a time", "edgebundle/resolve.py",
           "max_workers=max(1, min(jobs, len(order)))", "max_workers=1",
           "tests/integration/test_parallel_fetch.py -k at_once"),
    Mutant("delta bases fetched one at a time", "edgebundle/resolve.py",
           "            _in_parallel(self.jobs, todo,", "            _in_parallel(1, todo,",
           "tests/integration/test_parallel_fetch.py -k delta_bases"),
    Mutant("a base the registry lacks fails the plan", "edgebundle/resolve.py",
           "                except EdgebundleError as exc:\n                    log.info(\"%s of %s not fetched",
           "                except KeyError as exc:\n                    log.info(\"%s of %s not fetched",
           "tests/integration/test_parallel_fetch.py -k delta_bases"),
    # podman: a name only on a complete image
    Mutant("podman names an incomplete image", "edgebundle/importer/podman.py",
           "        broken = [rec.name for rec in records if not _complete(stored, rec)]",
           "        broken: List[str] = []", "tests/unit/test_podman.py -k read_back"),
    Mutant("podman prune ignores containers", "edgebundle/importer/prune.py",
           '        return parse_podman_containers(self.podman.json("ps", "-a", "--format", "json"))',
           "        return InUse()", "tests/unit/test_prune.py -k podman_images_seam"),
]


def run(mutant: Mutant, scratch: Path) -> bool:
    """True when the mutant is killed (some selected test fails)."""
    target = scratch / mutant.path
    original = target.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"mutant {mutant.name!r}: the text to change occurs "
                         f"{original.count(mutant.old)} times in {mutant.path}")
    target.write_text(original.replace(mutant.old, mutant.new))
    try:
        proc = subprocess.run(f"{sys.executable} -m pytest -q -x -p no:cacheprovider {mutant.tests}",
                              shell=True, cwd=scratch, capture_output=True, text=True, timeout=300,
                              # No bytecode: a mutant of the same size written within the
                              # second of an earlier one would import that one's stale .pyc
                              # (pyc checks mtime seconds and size): a false survivor.
                              env={"PYTHONPATH": str(scratch), "PATH": "/usr/bin:/bin",
                                   "HOME": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"})
    except subprocess.TimeoutExpired:
        return True  # a hang is a failing test too (the suite would time out)
    finally:
        target.write_text(original)
    return proc.returncode != 0


def main() -> int:
    wanted = sys.argv[1] if len(sys.argv) > 1 else ""
    selected = [m for m in MUTANTS if wanted in m.name]
    with tempfile.TemporaryDirectory(prefix="edgebundle-mutants-") as tmp:
        scratch = Path(tmp) / "tree"
        shutil.copytree(ROOT, scratch, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__"))
        # The unmutated tree must pass, or a "kill" proves nothing.
        proc = subprocess.run(f"{sys.executable} -m pytest -q -p no:cacheprovider tests/unit",
                              shell=True, cwd=scratch, capture_output=True, text=True,
                              # No bytecode: a mutant of the same size written within the
                              # second of an earlier one would import that one's stale .pyc
                              # (pyc checks mtime seconds and size): a false survivor.
                              env={"PYTHONPATH": str(scratch), "PATH": "/usr/bin:/bin",
                                   "HOME": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"})
        if proc.returncode != 0:
            print(f"the unmutated unit tests fail:\n{proc.stdout[-3000:]}")
            return 2
        survivors = []
        for mutant in selected:
            start = time.monotonic()
            killed = run(mutant, scratch)
            print(f"{'killed ' if killed else 'SURVIVED'}  {mutant.name}  ({time.monotonic() - start:.1f}s)",
                  flush=True)
            if not killed:
                survivors.append(mutant.name)
    print(f"{len(selected) - len(survivors)} of {len(selected)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
