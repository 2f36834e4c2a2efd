"""Plain-language notes on each missed goal, with this run's numbers and profiles."""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Optional

from . import report as R
from . import stages as S


def _profile(r: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    for p in r.get("profiles") or []:
        if p["name"] == name:
            return p
    return None


def _top(p: Optional[Dict[str, Any]], n: int = 3, key: str = "self") -> str:
    if not p:
        return "(no profile in this run: pass `--py-spy PATH`)"
    # frames on (nearly) every stack, like main() and dispatch(), say nothing
    items = [(k, v) for k, v in p["summary"][key] if key == "self" or v < 0.95][:n]
    return ", ".join(f"`{k}` {100 * v:.0f}%" for k, v in items)


def _incl(p: Optional[Dict[str, Any]], key: str) -> float:
    """Inclusive share of one edgebundle function (``file:function``) in a profile."""
    if not p:
        return 0.0
    return sum(v for k, v in p["summary"]["inclusive"] if k == key)


def _share(p: Optional[Dict[str, Any]], needle: str, key: str = "self") -> float:
    if not p:
        return 0.0
    return sum(v for k, v in p["summary"][key] if needle in k)


def explain(r: Dict[str, Any]) -> List[str]:
    out: List[str] = []
    try:
        rows = R.goals(r)
    except Exception as exc:  # never lose a run over the commentary
        return [f"(analysis unavailable: {exc!r})"]
    missed = {area for _, _, ok, area in rows if ok is False}
    base, bundles = r["baselines"], r["bundles"]
    if "bytes" in missed:
        ref = base["a"]["docker_save_zstd3"]
        gz = base["a"]["layer_dedup"]
        c = bundles["containerd/a"]["bundle_bytes"]
        d = bundles["docker/a"]["bundle_bytes"]
        out.append(
            f"- **Seed bytes, containerd site: {c / ref:.2f} x, by design.** The registry's gzip blobs that the "
            f"bundle must carry unchanged (so that manifest and index digests survive, FORMAT.md) are already "
            f"{gz / ref:.2f} x `docker save | zstd -3`: gzip -6 is simply a weaker compressor than zstd -3 on "
            f"these tars. Only a different entry kind (ship the tar as zstd and have the device re-gzip it "
            f"bit-exactly, which needs the same deflate implementation and level on both ends) could go below.")
        if d / ref > 0.85:
            lv = [x for x in (r.get("levels") or []) if not x.get("threads")]
            ok = [x for x in lv if x["bundle_bytes"] / ref <= 0.85]
            tail = ""
            if ok:
                first = min(ok, key=lambda x: x["level"])
                tail = (f" `--level {first['level']}` reaches {first['bundle_bytes'] / ref:.3f} x, but packs at "
                        f"{first['content_bytes'] / 1e6 / first['wall']:.1f} MB/s ({first['wall']:.0f} s for this "
                        f"image).")
            out.append(
                f"- **Seed bytes, Docker site: {d / ref:.3f} x at the default `--level {r['level']}`.** Both sides "
                f"are zstd over the same uncompressed tars, so the ratio is a matter of level (see the level "
                f"table): the default level trades the last few percent for pack speed." + tail +
                " Options for the lead: a higher default level for factory seeds (`pack --full`), or zstd "
                "long-distance matching with a larger window (the format caps the window at 8 MiB "
                "(`DEFAULT_WINDOW_LOG` 23) to bound device memory).")
    if "throughput" in missed:
        for rt in ("containerd", "docker"):
            bad = []
            floor = R.best(r["packs"], scenario="noop", runtime=rt)
            for cache in ("cold", "warm"):
                for sc in ("a", "d"):
                    x = R.throughput_ratio(r, sc, rt, cache)
                    if x is None or x >= 0.6:
                        continue
                    p = R.best(r["packs"], scenario=sc, runtime=rt, cache=cache)
                    lim = S.limits(r["stages"][sc], f"{rt}-{cache}", r["level"])
                    net = ""
                    if floor:
                        net = (f", {p['content_bytes'] / 1e6 / max(p['wall'] - floor['wall'], 1e-3):.0f} MB/s "
                               f"above the {floor['wall']:.2f} s no-op floor")
                    bad.append(f"{R.SC_NAMES[sc]} {cache}: {p['wall']:.2f} s, "
                               f"{p['content_bytes'] / 1e6 / p['wall']:.0f} MB/s{net}; slowest stage "
                               f"{lim['slowest']} {lim['slowest_mbps']:.0f} MB/s, all its stages in series "
                               f"{lim['serial_mbps']:.0f} MB/s")
            if not bad:
                continue
            cold = _profile(r, f"pack, {rt} site, seed, cold cache")
            warm = _profile(r, f"pack, {rt} site, seed, warm cache")
            text = f"- **Pack throughput, {rt} site** ({'; '.join(bad)}). "
            if rt == "containerd":
                text += ("A containerd pack only hashes and copies the registry's gzip blobs, so its pack "
                         "stages run at GB/s and fixed costs dominate: the no-op floor (interpreter start, "
                         "imports, resolve, plan) is most of a warm pack. ")
            if warm:
                startup = 1 - _incl(warm, "edgebundle/cli/packer.py:cmd_pack")
                text += (f"Warm profile: {_top(warm)}; {100 * startup:.0f}% of it is before `cmd_pack` runs "
                         f"(imports: `edgebundle/cli/packer.py` pulls in httpx, paramiko, yaml, tqdm) and "
                         f"{100 * _incl(warm, 'edgebundle/registry/client.py:RegistryClient.__init__'):.0f}% in "
                         f"`RegistryClient.__init__` (`ssl.create_default_context` is built even for a "
                         f"plain-HTTP registry). ")
            if cold:
                text += (f"Cold profile: {_top(cold)}; inclusive: fetch "
                         f"(`edgebundle/resolve.py:Resolver._download`) "
                         f"{100 * _incl(cold, 'edgebundle/resolve.py:Resolver._download'):.0f}%, then a second "
                         f"pass over every blob to inflate it and check its diff_id "
                         f"(`edgebundle/resolve.py:Resolver._inspect`) "
                         f"{100 * _incl(cold, 'edgebundle/resolve.py:Resolver._inspect'):.0f}%, then the bundle "
                         f"write (`edgebundle/pack.py:write_bundle`) "
                         f"{100 * _incl(cold, 'edgebundle/pack.py:write_bundle'):.0f}%. Likely cause: each "
                         f"blob is read three times in series (downloaded into the cache, re-read to inflate, "
                         f"re-read to write), each pass on one thread; hashing and inflating while the "
                         f"download streams (one pass, or a second thread: zlib and hashlib release the GIL) "
                         f"would take the inflate off the critical path. ")
            out.append(text.rstrip())
    if "import" in missed:
        for rt in ("containerd", "docker"):
            tool = "ctr import" if rt == "containerd" else "docker load"
            n = R.best(r["imports"], scenario="noop", runtime=rt, tool="edgebundle")
            lines = []
            for sc in ("a", "d"):
                e = R.best(r["imports"], scenario=sc, runtime=rt, tool="edgebundle")
                b = R.best(r["imports"], scenario=sc, runtime=rt, tool=tool)
                if not (e and b) or e["wall"] <= 1.1 * b["wall"]:
                    continue
                above = (f"; above the {n['wall']:.2f} s no-op floor {e['wall'] - n['wall']:.2f} s = "
                         f"{(e['wall'] - n['wall']) / b['wall']:.2f} x") if n else ""
                cpu = ""
                if "daemon_cpu" in e:
                    cpu = (f"; CPU client + daemon {e['cpu']:.2f} + {e['daemon_cpu']:.2f} s vs "
                           f"{b['cpu']:.2f} + {b.get('daemon_cpu', 0):.2f} s")
                lines.append(f"{R.SC_NAMES[sc]} {e['wall']:.2f} s vs {b['wall']:.2f} s = "
                             f"{e['wall'] / b['wall']:.2f} x{above}{cpu}")
            if not lines:
                continue
            p = _profile(r, f"import, {rt} site, seed")
            waits = "`Popen._wait` (ctr finishing the unpack)" if rt == "containerd" else \
                "`SocketIO.readinto` (dockerd loading after the body)"
            out.append(
                f"- **Import time, {rt} site** ({'; '.join(lines)}). Profile: {_top(p, 5)}; inclusive "
                f"{_top(p, 6, 'inclusive')}. Time in {waits} is the runtime's own work, the same as for "
                f"the baseline; the rest is the importer's share: the no-op floor (Python start, the "
                f"inventory read before and the read-back after) and the streaming of entries "
                f"(`edgebundle/format/reader.py`, `edgebundle/importer/tarstream.py`, "
                f"`edgebundle/importer/{rt}.py`).")
    if "deltas" in missed:
        out += _delta_misses(r)
    if "fleet" in missed:
        out += _fleet_misses(r)
    if "rss" in missed:
        worst = max((i for i in r["imports"] if i["tool"] == "edgebundle"), key=lambda i: i["hwm_kb"])
        out.append(f"- **Importer RSS**: {worst['hwm_kb'] / 1024:.1f} MiB for {R.SC_NAMES[worst['scenario']]} "
                   f"({worst['runtime']}); see the RSS table.")
    if "plan" in missed:
        worst = max(r["plan"], key=lambda p: p["projected_s"])
        out.append(
            f"- **Plan time**: up to {worst['per_site_ms']:.2f} ms per site ({worst['runtime']}), "
            f"{worst['projected_s']:.0f} s for {worst['sites']:,} sites x {worst['images']} images. The cProfile "
            "above shows where: `edgebundle/plan.py:image_present` scans every held image for every wanted "
            "image and normalises both names with `edgebundle/reference.py:parse_reference` (three regex "
            "matches) each time, so each site costs images x held-images parses. Normalising the held "
            "names once per inventory (a dict name -> held image, built once per site or cached on the "
            "Inventory) makes it one lookup per image; `ResolvedImage.chain_ids` (a sha256 per layer) is "
            "recomputed for every site and could be computed once per image.")
    return out


def _delta_misses(r: Dict[str, Any]) -> List[str]:
    d = r.get("deltas") or {}
    rows = {(x["scenario"], x["runtime"]): x for x in d.get("rows", [])}
    out: List[str] = []
    for sc, lim in R.DELTA_LIMITS:
        for rt in ("containerd", "docker"):
            x = rows.get((sc, rt))
            if not x or not x["ref_bytes"] or x["delta_bytes"] <= lim * x["ref_bytes"]:
                continue
            st = x.get("stats") or {}
            out.append(
                f"- **Delta bytes, {R.SC_NAMES[sc]} ({rt}): {x['delta_bytes'] / x['ref_bytes']:.2f} x the "
                f"reference** ({x['delta_bytes']:,} vs {x['ref_bytes']:,} bytes). Of the rebuilt tars, "
                f"{st.get('copied', 0):,} bytes came from base files or tar ranges, {st.get('patched', 0):,} "
                f"from patches and {st.get('literal', 0):,} as literal bytes. A delta carries one file op "
                f"per base file it reads (its path and 16 bytes of xxh3-128) and one zstd frame per "
                f"patched 4 MiB window; `--patch-from` matches the new image against the whole old one "
                f"as one window ({x['ref_bytes']:,} bytes, but {mib(d['refs'][sc]['create_rss_kb'])} MiB "
                f"to make and {mib(d['refs'][sc]['apply_rss_kb'])} MiB to apply).")
    rep = r.get("reproducibility") or {}
    grown = [(k, a, b) for k, a, b in rep.get("diffs", []) if k.endswith("/a") and b > a]
    if grown and str(rep.get("previous_edgebundle", "")).startswith("0.2."):
        seeds = {f"bundle {x['runtime']}/a": x for x in r.get("bundles", {}).values()
                 if x.get("scenario") == "a" and x.get("rep", 0) == 0}
        parts = []
        for k, a, b in grown:
            entries = seeds[k]["entries"] if k in seeds else 0
            # msgpack: a 32-byte bin is 34 bytes; the map, its keys and the array ~31;
            # "unpacked_bytes" and its integer ~20.
            expected = 34 * (entries + 1) + 31 + 20
            parts.append(f"{k}: +{b - a} bytes for {entries} entries (expected about {expected})")
        out.append(
            "- **Seed bundles grew by a few hundred bytes since edgebundle 0.2**, on purpose: the "
            "0.3 header commits to the sha256 of every entry record and of the image records (the "
            "commitments that let a device check a signed bundle against its signed header while it "
            "streams, FORMAT.md \"Signatures\"), and carries `unpacked_bytes` for the disk "
            "pre-flight. " + "; ".join(parts) + ". That is under 0.001% of these bundles; the "
            "entries themselves are byte-identical (the delta and whole-layer bundles grew by the "
            "same header bytes).")
    for rt in ("containerd", "docker"):
        for sc in R.DELTA_IMPORTS:
            x = rows.get((sc, rt))
            if not x or not x["import_s"] or not x["whole_import_s"] or \
                    x["import_s"] <= 1.5 * x["whole_import_s"]:
                continue
            route = ("; on containerd the rebuilt tars also enter the content store uncompressed "
                     "(the registry's gzip cannot be remade), and a second `ctr images import` lays the "
                     "registry's manifest over the committed snapshots (FORMAT.md, the snapshot route)"
                     if rt == "containerd" else "")
            small = ""
            if x["whole_import_s"] < 3.0:
                others = [f"{R.SC_NAMES[o['scenario']]} {o['import_s'] / o['whole_import_s']:.2f} x"
                          for (osc, ort), o in rows.items() if ort == rt and osc != sc
                          and osc in R.DELTA_IMPORTS and o["import_s"] and o["whole_import_s"]]
                small = (f" Here the update is small (a {x['delta_bytes']:,}-byte bundle against "
                         f"{x['whole_bytes']:,}), so the {x['import_s'] - x['whole_import_s']:.2f} s are "
                         f"that route's fixed costs, which do not grow with the layer: the second import, "
                         f"removing the throwaway image (`--sync`), and rebuilding the tar that the range ops "
                         f"read. The layer-level import is one sample of about a second. In the same run the "
                         f"other deltas on this runtime import at " + ", ".join(others) + " the layer-level time.")
            out.append(
                f"- **Delta import time, {R.SC_NAMES[sc]} ({rt}): {x['import_s']:.2f} s vs "
                f"{x['whole_import_s']:.2f} s for the layer-level bundle.** The runtime applies the same "
                f"tars either way; a delta import also rebuilds them: it reads the base files from the "
                f"runtime's layer store, checks each (xxh3), decodes the patches and hashes the result "
                f"(sha256) before the runtime may commit it{route}.{small}")
    return out


def mib(kb: float) -> str:
    return f"{kb / 1024:.0f}"


def _fleet_misses(r: Dict[str, Any]) -> List[str]:
    f = r.get("fleet") or {}
    out: List[str] = []
    up = f.get("upload")
    if up and up["ratio"] < R.UPLOAD_VS_SCP:
        size = up["bytes"] / 1e6
        text = (f"- **Upload: {up['ratio']:.2f} x scp** ({size:.1f} MB in {up['upload_median_s']:.2f} s against "
                f"{up['scp_median_s']:.2f} s).")
        if "floor_upload_s" in up:
            rest_up = max(up["upload_median_s"] - up["floor_upload_s"], 1e-3)
            rest_scp = max(up["scp_median_s"] - up["floor_scp_s"], 1e-3)
            text += (f" Fixed costs: {up['floor_upload_s']:.2f} s against scp's {up['floor_scp_s']:.2f} s (a 64 KiB "
                     f"file: connect, and the device's `edgebundle staged` twice, each a Python start on the "
                     f"device); above them {size / rest_up:.0f} MB/s against {size / rest_scp:.0f} MB/s, "
                     f"{rest_scp / rest_up:.2f} x.")
        if up.get("profile"):
            text += " Profile of the upload (py-spy): " + up["profile"]
        out.append(text)
    for s in f.get("states", []):
        if s["packed"] != s["states"] or s["max_encodes"] > 1:
            out.append(f"- **States, {s['runtime']} form**: {s['packed']} bundles packed for {s['states']} states, "
                       f"an entry encoded up to {s['max_encodes']} times.")
        sec = s["second"]
        for key, what in (("hit_s", "bundle cache hit"), ("repack_s", "repack from the encoded cache")):
            row = next((x for x in s["rows"] if x["state"] == sec["state"]), {})
            if sec[key] > R.SECOND_PACK * sec["first_s"] and row.get("delta_s", 0.0) > 0.5 * sec[key]:
                out.append(f"- **Second pack, {s['runtime']} form, {what}: {sec[key]:.2f} s against the first "
                           f"pack's {sec['first_s']:.2f} s.** The first pack of this state spent "
                           f"{row['delta_s']:.1f} s computing {row['deltas_computed']} deltas; the repack, with "
                           "the encoded cache warm, takes about as long, so it seems to compute them again: "
                           "`cache/deltas` (keyed by layer and bases) did not answer for them. Likely cause, "
                           "not yet confirmed: a delta that is computed and then refused (`check`, or a tar "
                           "error) is not cached, so every pack for that state pays it again. For the lead: "
                           "cache the refusal too, keyed the same way.")
            elif sec[key] > R.SECOND_PACK * sec["first_s"]:
                out.append(f"- **Second pack, {s['runtime']} form, {what}: {sec[key]:.2f} s against the first "
                           f"pack's {sec['first_s']:.2f} s.** A repack still plans, copies every entry into a "
                           "new file (stored blobs as they are, encoded ones decoded once to check them) and "
                           "fsyncs it; with little to encode in the first place, that copy is most of a pack.")
    sy = f.get("sync")
    if sy:
        dev = sy.get("device") or {}
        for p, v in sy["parallel"].items():
            if v["median_s"] <= v["bound_s"]:
                continue
            n = sy["sites"]
            text = (f"- **Sync of {n} sites up to date, `--parallel {p}`: {v['median_s']:.2f} s against the bound "
                    f"{v['bound_s']:.2f} s** (one site {sy['one_median_s']:.2f} s through the CLI, "
                    f"{sy['bare_median_s']:.2f} s for a bare connect + report).")
            runs = v.get("runs") or []
            if runs and "device_cpu" in runs[0]:
                pc = statistics.median(x["packer_cpu"] for x in runs)
                dc = statistics.median(x["device_cpu"] for x in runs)
                text += (f" CPU per run: packer {pc:.2f} s, devices {dc:.2f} s (sshd, shells, `edgebundle "
                         f"report`, `ctr`, containerd): {(pc + dc) / sy['cores']:.1f} s of wall time on "
                         f"{sy['cores']} cores at best, before the load other work put on the machine "
                         f"(load averages during the runs: {', '.join(x.get('load', '?') for x in runs)}).")
            elif dev:
                need = n * dev["report_cpu_s"] / sy["cores"]
                text += (f" Every device here is this machine: each round trip costs the device "
                         f"{dev['report_cpu_s']:.2f} CPU s (`edgebundle report` and `ctr`; sshd's key exchange "
                         f"comes on top), so {n} of them need {need:.1f} s of this machine's {sy['cores']} cores "
                         f"however many run at once, and {p} parallel workers cannot divide the time by {p}. "
                         "Real gateways bring their own CPU; the packer's share of a round trip is the "
                         "connection and the plan.")
            load = f.get("run", {})
            text += f" Load average during the phase: {load.get('load_start')} -> {load.get('load_end')}."
            out.append(text)
    return out
