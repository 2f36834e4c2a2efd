#!/usr/bin/env python3
"""The local demo: edgebundle end to end on one machine, on an embedded default.

Starts its own docker-registry, containerd and dockerd on private sockets/ports under a
temp dir, pushes small sample images (three sharing a base, one multi-arch), makes a
fleet signing key that the devices trust (their trust directory and state directory
live under the temp dir too), then:

1. shows an unsigned bundle refused; packs signed bundles for an empty containerd site
   (namespace k8s.io) and an empty Docker site, imports both and runs the images;
2. records the sites' inventory reports, publishes app:v2 (one file changed in its
   top layer), packs again: the changed layer ships as a content delta against the
   files the site holds;
3. shows a replayed older bundle refused (a downgrade);
4. syncs three gateways over SSH (each its own sshd in front of its own containerd;
   one sshd is down): `edgebundle sync --all` packs one bundle for the two in the same
   state, brings both to the manifest and reports the third as failed, exit 16, with
   the summary table; the next run finds them done in one round trip each;

and prints what was shipped against what a layer-level update (`--no-delta`) and a
full transfer would cost.

Every step runs the real `edgebundle` CLI, exactly as a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import imagefactory  # noqa: E402
import services  # noqa: E402

MANIFEST = """\
# edgebundle demo manifest (written by scripts/demo.py)
version: 1
registries:
  "{reg}": {{insecure: true}}
images:
  - ref: {reg}/shop/app:{app_tag}
  - ref: {reg}/shop/worker:v1
  - ref: {reg}/shop/tools:v1
  - ref: {reg}/shop/multi:v1
sites:
  gw-01: {{runtime: containerd, namespace: k8s.io, platform: linux/amd64}}
  line-3: {{runtime: docker, platform: linux/amd64}}
"""


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Demo:
    def __init__(self, tmp: Path, sign: List[str]) -> None:
        self.tmp = tmp
        self.sign = sign  # ["--sign", KEYFILE]
        self.env = services.clean_env({"EDGEBUNDLE_HOME": str(tmp / "packer-home")})
        self.rows: List[Dict[str, Any]] = []
        self.started: List[Any] = []  # services to stop at the end

    def eb(self, *args: str, capture_json: bool = False, expect: int = 0) -> Any:
        argv = [sys.executable, "-m", "edgebundle", *args]
        print("$ edgebundle " + " ".join(args), flush=True)
        if expect:
            out = subprocess.run(argv, env=self.env, capture_output=True, text=True)
            if out.returncode != expect:
                raise SystemExit(f"demo: expected exit {expect}, got {out.returncode}: {out.stderr}")
            for line in out.stdout.splitlines():  # e.g. sync's summary table
                print(f"   {line}")
            print(f"   (exit {out.returncode}) {out.stderr.strip().splitlines()[-1]}")
            return None
        if capture_json:
            out = subprocess.run(argv, env=self.env, check=True, capture_output=True, text=True)
            return json.loads(out.stdout)
        subprocess.run(argv, env=self.env, check=True)
        return None

    def pack(self, manifest: Path, site: str, label: str, *, compare: bool = False) -> Path:
        """Pack for ``site``; with ``compare``, also layer-level (``--no-delta``) to compare."""
        out = self.tmp / f"{site}-{len(self.rows)}.ebundle"
        layer_level = None
        if compare:
            whole = self.tmp / f"{site}-{len(self.rows)}-no-delta.ebundle"
            layer_level = self.eb("pack", str(manifest), "--site", site, "--no-delta", "-o",
                                  str(whole), *self.sign, "--json", capture_json=True)["bundle_bytes"]
        res = self.eb("pack", str(manifest), "--site", site, "-o", str(out), *self.sign, "--json",
                      capture_json=True)
        plan = res["plan"]
        shipped = [i["name"] for i in plan["images"] if i["status"] == "ship"]
        for img in plan["images"]:
            for layer in img["layers"]:
                if layer["how"] == "delta":
                    print(f"   {img['name']}: layer {layer['digest'][7:19]} ships as a delta of "
                          f"{layer['delta']['bytes']:,} bytes instead of {layer['size']:,}")
        print(f"   wrote {out.name}: {res['bundle_bytes']:,} bytes for {len(shipped)} image(s); "
              + (f"layer-level {layer_level:,} bytes; " if layer_level is not None else "")
              + f"a full transfer is {res['full_registry_bytes']:,} bytes")
        self.rows.append({"scenario": label, "site": site, "bundle": res["bundle_bytes"],
                          "layer_level": layer_level,
                          "full": res["full_registry_bytes"], "images": len(shipped)})
        return out


def run(keep: bool) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="edgebundle-demo-"))
    started: List[Any] = []
    demo: Optional[Demo] = None
    try:
        say("starting a private docker-registry, containerd and dockerd under " + str(tmp))
        reg = services.start_registry(tmp / "registry"); started.append(reg)
        cd = services.start_containerd(tmp / "containerd"); started.append(cd)
        dk = services.start_dockerd(tmp / "dockerd"); started.append(dk); started.append(dk.containerd)
        print(f"   registry http://{reg.host}  containerd {cd.address}  dockerd {dk.host}")

        say("pushing sample images (app, worker, tools share a base; multi is amd64+arm64)")
        info = imagefactory.standard_set(reg.host, include_v2=False)
        for ref in info["images"]:
            print(f"   {reg.host}/{ref}")
        print(f"   {reg.host}/shop/multi:v1 (index {info['multi']['index_digest'][:19]}...)")

        say("a signing key for the fleet; the devices trust its public half")
        keys, trusted = tmp / "packer-keys", tmp / "device" / "trusted.d"
        keys.mkdir()
        trusted.mkdir(parents=True)
        demo = Demo(tmp, ["--sign", str(keys / "fleet.key")])
        demo.eb("key", "generate", "--out", str(keys / "fleet"))
        shutil.copy(keys / "fleet.pub", trusted / "fleet.pub")
        print(f"   device trust directory: {trusted} (on a real device /etc/edgebundle/trusted.d)")
        device = ["--trust-dir", str(trusted), "--state-dir", str(tmp / "device" / "state")]
        manifest = tmp / "manifest.yaml"
        manifest.write_text(MANIFEST.format(reg=reg.host, app_tag="v1"))
        ctr_args = ["--runtime", "containerd", "--address", cd.address, "--namespace", "k8s.io",
                    "--snapshotter", cd.snapshotter, *device]
        docker_args = ["--runtime", "docker", "--host", dk.host, *device]

        say("1. an unsigned bundle never reaches the runtime")
        unsigned = tmp / "unsigned.ebundle"
        demo.eb("pack", str(manifest), "--site", "gw-01", "-o", str(unsigned), "--no-progress")
        demo.eb("import", str(unsigned), *ctr_args, expect=13)

        say("factory seed: empty sites get everything, signed")
        demo.eb("plan", str(manifest), "--site", "gw-01")
        b1 = demo.pack(manifest, "gw-01", "seed containerd site")
        report1 = tmp / "gw-01-report.json"
        demo.eb("import", str(b1), *ctr_args, "--report", str(report1))
        b2 = demo.pack(manifest, "line-3", "seed docker site")
        report2 = tmp / "line-3-report.json"
        demo.eb("import", str(b2), *docker_args, "--report", str(report2))

        say("the images run as if pulled")
        out = subprocess.run(cd.ctr_argv("k8s.io") + ["run", "--rm", "--snapshotter", cd.snapshotter,
                                                      f"{reg.host}/shop/app:v1", "demo-app"],
                             capture_output=True, text=True, env=cd.env(), check=True)
        print(f"   containerd: {out.stdout.strip()}")
        out = subprocess.run(dk.docker_argv() + ["run", "--rm", "--network", "none",
                                                 f"{reg.host}/shop/worker:v1"],
                             capture_output=True, text=True, check=True)
        print(f"   docker:     {out.stdout.strip()}")

        say("2. the reports come back (USB stick or `inventory pull` over SSH)")
        demo.eb("inventory", "record", "gw-01", str(report1))
        demo.eb("inventory", "record", "line-3", str(report2))

        say("app:v2 is published: one file changed in its top layer")
        imagefactory.push_app_v2(reg.host)
        manifest.write_text(MANIFEST.format(reg=reg.host, app_tag="v2"))
        demo.eb("plan", str(manifest), "--site", "gw-01")
        b3 = demo.pack(manifest, "gw-01", "update containerd site", compare=True)
        demo.eb("import", str(b3), *ctr_args)
        out = subprocess.run(cd.ctr_argv("k8s.io") + ["run", "--rm", "--snapshotter", cd.snapshotter,
                                                      f"{reg.host}/shop/app:v2", "demo-app-v2"],
                             capture_output=True, text=True, env=cd.env(), check=True)
        print(f"   containerd runs app:v2: {out.stdout.strip()}")
        b4 = demo.pack(manifest, "line-3", "update docker site", compare=True)
        demo.eb("import", str(b4), *docker_args)
        out = subprocess.run(dk.docker_argv() + ["run", "--rm", "--network", "none",
                                                 f"{reg.host}/shop/app:v2"],
                             capture_output=True, text=True, check=True)
        print(f"   docker runs app:v2: {out.stdout.strip()}")

        say("importing the same bundle again is a clean no-op")
        demo.eb("import", str(b3), *ctr_args)

        say("replaying the older seed bundle is a downgrade: refused")
        demo.eb("import", str(b1), *ctr_args, expect=13)

        fleet_sync(demo, tmp, reg, keys)
        factory_export(demo, tmp, manifest, cd)

        say("what was shipped against a layer-level update and a full transfer")
        print(f"   {'scenario':<26} {'images':>6} {'bundle bytes':>14} {'layer-level':>14} "
              f"{'full transfer':>14} {'ratio':>7}")
        for r in demo.rows:
            level = f"{r['layer_level']:>14,}" if r["layer_level"] is not None else f"{'-':>14}"
            print(f"   {r['scenario']:<26} {r['images']:>6} {r['bundle']:>14,} {level} {r['full']:>14,} "
                  f"{r['bundle'] / r['full']:>7.1%}")
        return 0
    finally:
        for svc in reversed(started + (demo.started if demo else [])):
            svc.stop()
        if keep:
            print(f"\n(kept {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def factory_export(demo: Demo, tmp: Path, manifest: Path, cd: Any) -> None:
    """A k3s node that never runs edgebundle: an airgap tarball, imported as k3s does."""
    say("5. factory seed for a k3s node without edgebundle: an airgap tarball for its images dir")
    images_dir = tmp / "k3s-node" / "agent" / "images"  # /var/lib/rancher/k3s/agent/images/
    images_dir.mkdir(parents=True)
    archive = images_dir / "edgebundle-gw-01.tar.zst"
    demo.eb("export", str(manifest), "--site", "gw-01", "--format", "k3s-airgap", "-o", str(archive),
            "--no-progress")
    print(f"   {archive.name}: {archive.stat().st_size:,} bytes; k3s decompresses it by name and "
          "imports it into k8s.io at start (here: a namespace of its own)")
    with subprocess.Popen(["zstd", "-d", "-c", "--memory=32MB", str(archive)], stdout=subprocess.PIPE) as src:
        subprocess.run(cd.ctr_argv("k3s-node") + ["images", "import", "--all-platforms", "-"],
                       stdin=src.stdout, env=cd.env(), check=True, capture_output=True)
        if src.wait(timeout=60) != 0:
            raise SystemExit("demo: zstd could not decompress the export")
    ref = next(line.split()[0] for line in subprocess.run(
        cd.ctr_argv("k3s-node") + ["images", "ls", "-q"], env=cd.env(), check=True,
        capture_output=True, text=True).stdout.splitlines() if "/shop/app:" in line)
    out = subprocess.run(cd.ctr_argv("k3s-node") + ["run", "--rm", "--snapshotter", cd.snapshotter,
                                                    ref, "demo-k3s-app"],
                         capture_output=True, text=True, env=cd.env(), check=True)
    print(f"   the node runs {ref.rsplit('/', 1)[-1]}: {out.stdout.strip()}")


FLEET = """\
# three gateways for the sync demo (written by scripts/demo.py)
version: 1
registries:
  "{reg}": {{insecure: true}}
images:
  - ref: {reg}/shop/app:v2
  - ref: {reg}/shop/worker:v1
sites:
{sites}"""


def fleet_sync(demo: Demo, tmp: Path, reg: Any, keys: Path) -> None:
    """Three gateways, each its own sshd and containerd (one of them down), one `edgebundle sync`."""
    say("4. fleet sync over SSH: three k3s-like gateways, each its own sshd and containerd; "
        "gw-c's sshd is down")
    fleet = tmp / "fleet"
    known_hosts, ssh_config = fleet / "known_hosts", fleet / "ssh_config"
    fleet.mkdir()
    entries, hosts, config = [], [], []
    runtimes: Dict[str, Any] = {}
    for name in ("gw-a", "gw-b", "gw-c"):
        cd = runtimes[name] = services.start_containerd(fleet / name / "containerd")
        demo.started.append(cd)
        sshd = services.start_sshd(fleet / name / "sshd")
        demo.started.append(sshd)
        hosts.append(sshd.known_hosts_line())
        config.append(f"Host {name}\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User root\n"
                      f"  IdentityFile {sshd.client_key_path}\n")
        if name == "gw-c":
            sshd.stop()  # the gateway that is offline today
        device = fleet / name / "device"
        (device / "trusted.d").mkdir(parents=True)
        shutil.copy(keys / "fleet.pub", device / "trusted.d" / "fleet.pub")
        command = (f"env EDGEBUNDLE_STATE_DIR={device / 'state'} EDGEBUNDLE_TRUST_DIR={device / 'trusted.d'} "
                   f"CONTAINERD_SNAPSHOTTER={cd.snapshotter} {sys.executable} -m edgebundle")
        entries.append(f"  {name}: {{runtime: containerd, namespace: k8s.io, platform: linux/amd64, "
                       f"ssh: {name}, address: '{cd.address}', staging: '{device / 'staging'}', "
                       f"edgebundle: '{command}'}}")
    known_hosts.write_text("\n".join(hosts) + "\n")
    ssh_config.write_text("\n".join(config))
    fleet_manifest = fleet / "fleet.yaml"
    fleet_manifest.write_text(FLEET.format(reg=reg.host, sites="\n".join(entries) + "\n"))
    print(f"   manifest {fleet_manifest}: app:v2 and worker:v1 for gw-a, gw-b, gw-c")
    ssh = ["--known-hosts", str(known_hosts), "--ssh-config", str(ssh_config)]
    demo.eb("sync", str(fleet_manifest), "--all", "--dry-run", "--retries", "0", *ssh, expect=16)
    demo.eb("sync", str(fleet_manifest), "--all", "--retries", "1", "--retry-delay", "1",
            "--no-progress", *demo.sign, *ssh, expect=16)
    cd = runtimes["gw-a"]
    out = subprocess.run(cd.ctr_argv("k8s.io") + ["run", "--rm", "--snapshotter", cd.snapshotter,
                                                  f"{reg.host}/shop/app:v2", "demo-gw-a"],
                         capture_output=True, text=True, env=cd.env(), check=True)
    print(f"   gw-a runs app:v2: {out.stdout.strip()}")
    say("the next run finds gw-a and gw-b done in one round trip each")
    demo.eb("sync", str(fleet_manifest), "--site", "gw-a", "--site", "gw-b", *demo.sign, *ssh)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temp dir for inspection")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("demo: needs root (it starts containerd and dockerd)", file=sys.stderr)
        return 2
    return run(args.keep)


if __name__ == "__main__":
    sys.exit(main())
