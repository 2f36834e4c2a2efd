"""Device-side runtimes for the benchmark: fresh containerd / dockerd instances.

Each "timeline" gets a fresh runtime (its own containerd root, or its own dockerd data
root), so a full import always starts from the state of a new device.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import List

from . import proc

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "integration"))
import services  # noqa: E402

NAMESPACE = "k8s.io"
_counter = itertools.count()


class Device:
    """One fresh runtime instance."""

    kind = ""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def import_args(self) -> List[str]:
        raise NotImplementedError

    def names(self) -> List[str]:
        raise NotImplementedError

    def run_image(self, ref: str) -> str:
        raise NotImplementedError

    def baseline_import(self, archive: Path) -> proc.Run:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def daemon_pids(self) -> List[int]:
        raise NotImplementedError


class ContainerdDevice(Device):
    kind = "containerd"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        d = tmp / f"c{next(_counter)}"
        self.cd = services.start_containerd(d)

    def ctr(self, *args: str) -> List[str]:
        return self.cd.ctr_argv(NAMESPACE) + list(args)

    def import_args(self) -> List[str]:
        return ["--runtime", "containerd", "--address", self.cd.address, "--namespace", NAMESPACE,
                "--snapshotter", self.cd.snapshotter]

    def names(self) -> List[str]:
        out = subprocess.run(self.ctr("images", "ls", "-q"), capture_output=True, text=True,
                             env=self.cd.env(), check=True).stdout
        return [l.strip() for l in out.splitlines() if l.strip()]

    def run_image(self, ref: str) -> str:
        cid = f"bench-{next(_counter)}"
        r = subprocess.run(self.ctr("run", "--rm", "--snapshotter", self.cd.snapshotter, ref, cid),
                           capture_output=True, text=True, env=self.cd.env(), timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"ctr run {ref} failed: {r.stderr.strip()}")
        return r.stdout

    def baseline_import(self, archive: Path) -> proc.Run:
        """``ctr images import`` of an archive written by ``ctr images export`` (unpacks)."""
        return proc.run(self.ctr("images", "import", "--platform", "linux/amd64",
                                 "--snapshotter", self.cd.snapshotter, str(archive)),
                        env=self.cd.env()).check()

    def baseline_argv(self, archive: Path) -> str:
        return proc.shell_join(["ctr", "-n", NAMESPACE, "images", "import", "--platform", "linux/amd64",
                                "--snapshotter", self.cd.snapshotter, str(archive.name)])

    def stop(self) -> None:
        self.cd.stop()

    def daemon_pids(self) -> List[int]:
        return [self.cd.pid]


class DockerDevice(Device):
    kind = "docker"

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        d = tmp / f"d{next(_counter)}"
        self.dk = services.start_dockerd(d)

    def docker(self, *args: str) -> List[str]:
        return self.dk.docker_argv() + list(args)

    def import_args(self) -> List[str]:
        return ["--runtime", "docker", "--host", self.dk.host]

    def names(self) -> List[str]:
        out = subprocess.run(self.docker("images", "--format", "{{.Repository}}:{{.Tag}}"),
                             capture_output=True, text=True, check=True).stdout
        return [l.strip() for l in out.splitlines() if l.strip()]

    def run_image(self, ref: str) -> str:
        r = subprocess.run(self.docker("run", "--rm", "--network", "none", ref), capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"docker run {ref} failed: {r.stderr.strip()}")
        return r.stdout

    def baseline_import(self, archive: Path) -> proc.Run:
        """``docker load -i`` of a ``docker save`` tar (uncompressed)."""
        return proc.run(self.docker("load", "-q", "-i", str(archive))).check()

    def baseline_import_zstd(self, archive_zst: Path) -> proc.Run:
        """``zstd -dc save.tar.zst | docker load``: the shipped (compressed) form."""
        cmd = f"zstd -qdc {archive_zst} | {proc.shell_join(self.docker('load', '-q'))}"
        return proc.sh(cmd).check()

    def stop(self) -> None:
        self.dk.stop()

    def daemon_pids(self) -> List[int]:
        return [self.dk.pid, self.dk.containerd.pid]


def start(kind: str, tmp: Path) -> Device:
    return ContainerdDevice(tmp) if kind == "containerd" else DockerDevice(tmp)
