"""A ``--podman`` wrapper that kill -9s its parent (the import) at one podman command.

``EDGEBUNDLE_KILL_AT=sub:n:when`` (e.g. ``tag:2:after``): at the n-th ``podman sub`` the
parent edgebundle process is killed, before the command runs or after it finished.
Counts live in ``EDGEBUNDLE_KILL_DIR``. Everything else runs podman unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

SUBCOMMANDS = {"load", "tag", "untag", "rmi", "image", "images", "info"}


def main() -> int:
    argv = sys.argv[1:]
    sub = next((a for a in argv if a in SUBCOMMANDS), "")
    want, _, rest = os.environ.get("EDGEBUNDLE_KILL_AT", "").partition(":")
    nth, _, when = rest.partition(":")
    hit = False
    if sub and sub == want:
        counter = os.path.join(os.environ["EDGEBUNDLE_KILL_DIR"], sub)
        count = int(open(counter).read()) + 1 if os.path.exists(counter) else 1
        with open(counter, "w") as fh:
            fh.write(str(count))
        hit = count == int(nth)
    if hit and when == "before":
        os.kill(os.getppid(), signal.SIGKILL)
        return 137
    rc = subprocess.call(argv)
    if hit:
        os.kill(os.getppid(), signal.SIGKILL)
    return rc


if __name__ == "__main__":
    sys.exit(main())
