"""Upload throughput vs OpenSSH scp, same file, same loopback sshd, same run.

    .venv/bin/python scripts/upload_vs_scp.py [MB] [ROUNDS] [TMPDIR]

Starts the test sshd (tests/integration/services.py start_sshd) under TMPDIR,
writes an MB-sized random file, then per round times `scp` and
`transfer.upload.upload_bundle` (connect, staged check, send, verify, rename:
everything sync pays) of it. Not yet part of scripts/bench (issue 9's goal:
upload >= 0.5 x scp).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
import services  # noqa: E402

from edgebundle.oci import Platform  # noqa: E402
from edgebundle.specs import SiteSpec  # noqa: E402
from edgebundle.transfer.options import SshOptions  # noqa: E402
from edgebundle.transfer.upload import upload_bundle  # noqa: E402


def main() -> None:
    mb = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    tmp = Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/upload-bench")
    tmp.mkdir(parents=True, exist_ok=True)
    sd = services.start_sshd(tmp / "sshd")
    try:
        kh = tmp / "known_hosts"
        kh.write_text(sd.known_hosts_line() + "\n")
        f = tmp / f"b{mb}.ebundle"
        if not f.exists() or f.stat().st_size != mb * 2**20:
            f.write_bytes(os.urandom(mb * 2**20))
        out = tmp / "dest"
        out.mkdir(exist_ok=True)
        site = SiteSpec(name="bench", runtime="containerd", platform=Platform.parse("linux/amd64"),
                        ssh=f"{sd.user}@{sd.host}:{sd.port}", edgebundle=f"{sys.executable} -m edgebundle")
        for rnd in range(rounds):
            for p in out.iterdir():
                p.unlink()
            t = time.monotonic()
            subprocess.run(["scp", "-q", "-P", str(sd.port), "-i", str(sd.client_key_path),
                            "-o", f"UserKnownHostsFile={kh}", "-o", "BatchMode=yes", str(f),
                            f"{sd.user}@{sd.host}:{out}/scp.bin"], check=True, env=services.clean_env())
            scp = time.monotonic() - t
            t = time.monotonic()
            upload_bundle(site, str(f), str(out), SshOptions(known_hosts=str(kh), key_filename=str(sd.client_key_path),
                                                             ssh_config_path=os.devnull))
            up = time.monotonic() - t
            size = f.stat().st_size / 1e6
            print(f"round {rnd}: scp {size / scp:.1f} MB/s ({scp:.2f}s); upload_bundle {size / up:.1f} MB/s "
                  f"({up:.2f}s); ratio {scp / up:.2f}", flush=True)
    finally:
        sd.stop()


if __name__ == "__main__":
    main()
