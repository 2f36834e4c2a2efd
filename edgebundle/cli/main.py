"""``edgebundle`` entry point.

Device commands (import, report, verify, inspect) import only device-side modules, so
they run where only zstandard, msgpack and xxhash are installed. Packer commands
(plan, pack, inventory) import their modules lazily.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import traceback
from typing import Any, Callable, List, Optional

from .. import __version__
from ..errors import EdgebundleError, SpaceError, UsageError
from ..logs import redact, setup_logging

EPILOG = """\
packer:  plan, pack, export, sync, inventory record|pull|show, key generate|show
device:  import, report, prune, verify, inspect

Every command takes -v (what happens) and --debug (more, with library requests).

Registries (packer): CAs and client certificates from /etc/docker/certs.d/<host[:port]>/
and /etc/containers/certs.d/ (*.crt, client.cert + client.key; EDGEBUNDLE_CERTS_DIRS=a:b
replaces those roots); HTTPS_PROXY, HTTP_PROXY and NO_PROXY as Docker reads them.

Exit codes: 0 ok, 1 error, 2 usage, 3 manifest, 4 resolve, 5 bundle format,
6 prerequisite missing, 7 runtime unreachable, 8 load failed, 9 transport, 10 inventory,
11 packer cache, 12 output not writable, 13 trust policy refused the bundle,
14 not enough disk space (refused up front, or the disk filled), 15 another import
(or prune, or sync of the site) is running, 16 sync: some sites are not done.
"""

log = logging.getLogger("edgebundle")

# What `pip install 'edgebundle[packer]'` adds (pyproject.toml); yaml is PyYAML's module.
PACKER_EXTRA = ("httpx", "paramiko", "yaml", "tqdm")


def _logging_args(p: argparse.ArgumentParser, top: bool) -> None:
    # On the top parser and on every subcommand, so `edgebundle -v pack` and
    # `edgebundle pack ... -v` both work; SUPPRESS keeps a subcommand from resetting it.
    default: Any = 0 if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="say what happens (logging to stderr)")
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="log everything, library requests included (secrets are redacted)")


def _runtime_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--runtime", choices=("containerd", "docker", "podman"), required=required,
                   help="container runtime on this device")
    g.add_argument("--address", default="/run/containerd/containerd.sock",
                   help="containerd socket (default: %(default)s)")
    g.add_argument("--namespace", default="default",
                   help="containerd namespace, e.g. k8s.io for k3s/Kubernetes (default: %(default)s)")
    g.add_argument("--ctr", default="ctr", help="ctr command, e.g. 'k3s ctr' (default: %(default)s)")
    # Like ctr, $CONTAINERD_SNAPSHOTTER sets the default (so a device's `edgebundle:` command
    # line can carry it for sync, which passes no --snapshotter).
    g.add_argument("--snapshotter", default=os.environ.get("CONTAINERD_SNAPSHOTTER") or "overlayfs",
                   help="containerd snapshotter (default: $CONTAINERD_SNAPSHOTTER, else overlayfs)")
    g.add_argument("--host", default="unix:///var/run/docker.sock",
                   help="Docker Engine socket (default: %(default)s)")
    g.add_argument("--root", metavar="DIR",
                   help="podman's store, as `podman --root` means it (default: podman's own)")
    g.add_argument("--runroot", metavar="DIR",
                   help="podman's run directory, as `podman --runroot` means it")
    g.add_argument("--podman", default="podman",
                   help="podman command, e.g. 'sudo podman' (default: %(default)s)")


def _state_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", metavar="DIR",
                   help="device state (import lock, journal of a running import, so the next "
                   "import or report cleans up after an interrupted one, and the record of "
                   "imported images that prune reads); "
                   "default: $EDGEBUNDLE_STATE_DIR, else /var/lib/edgebundle")


def _trust_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trust policy")
    g.add_argument("--trust", action="append", default=[], metavar="PUBFILE",
                   help="trust bundles signed by this public key (repeatable), besides the "
                   "trust directory's *.pub; with any trusted key, unsigned bundles are refused")
    g.add_argument("--trust-dir", metavar="DIR",
                   help="directory of trusted *.pub keys (default: $EDGEBUNDLE_TRUST_DIR, "
                   "else /etc/edgebundle/trusted.d)")


def _ssh_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ssh")
    g.add_argument("--accept-new-host-key", action="store_true",
                   help="trust and remember an unknown host key (a changed key is always refused)")
    g.add_argument("--known-hosts", help="known_hosts file (default: ~/.ssh/known_hosts)")
    g.add_argument("--identity", help="private key file")
    g.add_argument("--ssh-config", help="ssh config file (default: ~/.ssh/config)")
    g.add_argument("--timeout", type=float, default=15.0,
                   help="SSH connect timeout in seconds (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgebundle", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Ship container images to edge devices as verified, delta-sized bundles.",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"edgebundle {__version__}")
    _logging_args(parser, top=True)
    parser.add_argument("--home", help="packer state directory (default: $EDGEBUNDLE_HOME, "
                        "else $XDG_DATA_HOME/edgebundle or ~/.local/share/edgebundle)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    _logging_args(common, top=False)

    p = sub.add_parser("plan", parents=[common], help="dry run: what a site lacks and what would ship")
    p.add_argument("manifest", help="manifest list YAML")
    p.add_argument("--site", required=True, help="site name from the manifest")
    p.add_argument("--no-delta", action="store_true",
                   help="plan changed layers whole, never as content deltas")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--jobs", type=int, default=3, metavar="N",
                   help="layer blobs downloaded (to compute deltas) at once, behind one progress bar (default: "
                   "%(default)s, as Docker's max-concurrent-downloads)")

    p = sub.add_parser("pack", parents=[common], help="resolve, fetch and write the bundle a site needs")
    p.add_argument("manifest", help="manifest list YAML")
    p.add_argument("--site", required=True, help="site name from the manifest")
    p.add_argument("-o", "--output", required=True,
                   help="bundle file to write (replaced atomically), or - for standard output; "
                   "a FIFO or device is written in place. Refused before any download (exit "
                   "14) when its disk, or the cache's, lacks the space the plan needs")
    vol = p.add_mutually_exclusive_group()
    vol.add_argument("--volume-size", metavar="SIZE",
                     help="split the bundle into volumes OUTPUT.001, OUTPUT.002, … of at most SIZE "
                     "bytes each (the whole file, volume header included); binary units: k, M, G, T "
                     "(1k = 1024 bytes), e.g. 700M; at least 1M")
    vol.add_argument("--fat32", action="store_true",
                     help="volumes that fit on a FAT32 USB stick: --volume-size 4294967295 "
                     "(4 GiB - 1 byte, the largest FAT32 file)")
    p.add_argument("--level", type=int, default=16, choices=range(1, 23), metavar="1-22",
                   help="zstd level for compressible entries (Docker sites' layers, JSON); "
                   "16 is the smallest level that optimally parses, see docs/BENCHMARKS.md "
                   "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="zstd worker threads (default: 0 = "
                   "one per CPU; the output is identical for any count)")
    p.add_argument("--full", action="store_true",
                   help="ignore the site's inventory: ship everything (factory seeding)")
    p.add_argument("--no-delta", action="store_true",
                   help="ship changed layers whole, never as content deltas")
    p.add_argument("--sign", action="append", default=[], metavar="KEYFILE",
                   help="sign the bundle with this private key (from `edgebundle key generate`); "
                   "repeat to co-sign with a new and an old key while rotating")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--jobs", type=int, default=3, metavar="N",
                   help="layer blobs downloaded at once, behind one progress bar (default: "
                   "%(default)s, as Docker's max-concurrent-downloads)")

    p = sub.add_parser(
        "export", parents=[common],
        help="write a site's images as an archive its runtime loads without edgebundle",
        description="Resolve the site's images for its platform as pack does (registry, "
        "offline sources, the blob cache) and write them as one archive: k3s-airgap (an OCI "
        "layout k3s imports from /var/lib/rancher/k3s/agent/images/), docker-archive "
        "(docker load, podman load) or oci-archive (ctr images import, podman load). The "
        "output's ending picks the compression where the consumer reads it: k3s-airgap "
        ".tar, .tar.zst/.tzst, .tar.gz/.tgz; docker-archive .tar or .tar.gz; oci-archive .tar.")
    p.add_argument("manifest", help="manifest list YAML")
    p.add_argument("--site", required=True, help="site name from the manifest")
    p.add_argument("--format", required=True, dest="archive_format",
                   choices=("k3s-airgap", "docker-archive", "oci-archive"),
                   help="archive format (see above)")
    p.add_argument("-o", "--output", required=True,
                   help="archive file to write (replaced atomically), or - for standard output")
    p.add_argument("--image", action="append", default=[], metavar="REF",
                   help="only this image of the site (repeatable); podman load (4.x) reads "
                   "one image per OCI archive")
    p.add_argument("--level", type=int, choices=range(1, 23), metavar="1-22",
                   help="compression level (zstd default 3, gzip 1-9, default 6)")
    p.add_argument("--threads", type=int, default=0,
                   help="zstd worker threads (default: 0 = one per CPU)")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--jobs", type=int, default=3, metavar="N",
                   help="layer blobs downloaded at once, behind one progress bar (default: "
                   "%(default)s, as Docker's max-concurrent-downloads)")

    p = sub.add_parser(
        "sync", parents=[common], help="bring sites to the manifest over SSH: report, pack, upload, import",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="For every selected site, in parallel: read the device's live report over "
        "SSH, pack the bundle its state needs (once per distinct state, cached under the packer "
        "home's bundles/), upload it to the site's staging: directory (resumable), import it "
        "there, prune when the site has prune:, and read the report again. A site is done only "
        "when that report holds every manifest image complete.",
        epilog="Exit 0 when every selected site is done; 16 when some are not (each says why "
        "in the summary); 2, 3 for bad flags or a bad manifest.")
    p.add_argument("manifest", help="manifest list YAML")
    p.add_argument("--site", action="append", default=[], metavar="SITE",
                   help="a site to sync (repeatable)")
    p.add_argument("--all", action="store_true", help="every site of the manifest")
    p.add_argument("--parallel", type=int, default=4, metavar="N",
                   help="sites worked on at once (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="read every site's report and plan: bytes per site and in total; "
                   "nothing is packed, uploaded, imported or recorded")
    p.add_argument("--limit-rate", metavar="RATE",
                   help="upload at most RATE bytes/s per site, binary units (k, M), e.g. 200k")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="further attempts for a site after a failure that may pass (link lost "
                   "or timed out, device busy or its runtime restarting, import killed), with "
                   "backoff (default: %(default)s)")
    p.add_argument("--retry-delay", type=float, default=5.0, metavar="SECONDS",
                   help="first backoff, doubled per attempt (default: %(default)s)")
    p.add_argument("--site-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="start no step or attempt for a site after this long (default: %(default)s)")
    p.add_argument("--command-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="how long a device command (the import) may stay silent (default: %(default)s)")
    p.add_argument("--sign", action="append", default=[], metavar="KEYFILE",
                   help="sign the bundles with this private key (repeatable), as for pack")
    p.add_argument("--level", type=int, default=16, choices=range(1, 23), metavar="1-22",
                   help="zstd level, as for pack (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="zstd worker threads (default: 0 = one per CPU)")
    p.add_argument("--no-delta", action="store_true", help="ship changed layers whole, never as deltas")
    p.add_argument("--jobs", type=int, default=3, metavar="N",
                   help="layer blobs downloaded at once, behind one progress bar (default: "
                   "%(default)s, as Docker's max-concurrent-downloads)")
    _ssh_args(p)
    p.add_argument("--json", action="store_true",
                   help="print {ok, sites: [{site, ok, action, error, exit_code, bytes_sent, ...}]}")
    p.add_argument("--no-progress", action="store_true", help="no progress display")

    p = sub.add_parser("import", parents=[common], help="verify a bundle and load it into the runtime")
    p.add_argument("bundle", nargs="+", help="bundle file, or - for standard input; for a bundle "
                   "in volumes: the first volume (the others are found next to it), or every "
                   "volume in order, or - with the volumes in order on standard input")
    _runtime_args(p)
    _state_args(p)
    _trust_args(p)
    p.add_argument("--allow-downgrade", action="store_true",
                   help="import a signed bundle even if it was packed before the newest one "
                   "already imported for its site")
    p.add_argument("--report", metavar="PATH", help="also write the inventory report here")
    p.add_argument("--no-space-check", action="store_true",
                   help="skip the disk pre-flight (free space where the runtime keeps its "
                   "data, read from containerd's plugin roots or Docker's DockerRootDir, vs "
                   "the bundle's content plus unpacked size); for filesystems that compress "
                   "or deduplicate, where the estimate is too high. A full disk is still "
                   "reported (exit 14)")
    p.add_argument("--stall-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="containerd: give up when ctr reads nothing of the image stream for "
                   "this long (a frozen containerd; default: %(default)s; Docker: its API "
                   "timeout, 600 s, bounds every request)")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.add_argument("--no-progress", action="store_true", help="no progress display")

    p = sub.add_parser("report", parents=[common], help="write what the runtime really holds (inventory report)")
    _runtime_args(p)
    _state_args(p)
    _trust_args(p)
    p.add_argument("-o", "--output", metavar="PATH", help="write the report to PATH")
    p.add_argument("--site", help="site name to put in the report")
    p.add_argument("--json", action="store_true", help="print the report JSON to stdout")

    p = sub.add_parser(
        "prune", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        help="remove images edgebundle imported that are no longer wanted, then report",
        description="Remove images that edgebundle imported and that are no longer wanted,\n"
        "then print the inventory report (as `edgebundle report` does).",
        epilog="Only images an import published are candidates (recorded in the state dir); "
        "images that were\non the device before, or that someone pulled or retagged since, "
        "are never touched. Kept:\nevery --keep name (and other names of the same image), "
        "the --keep-previous newest other\nimages of each kept name's repository, and every "
        "image a container uses (running or\nstopped). Holds the device lock: never runs "
        "beside an import (exit 15).")
    _runtime_args(p)
    _state_args(p)
    _trust_args(p)
    p.add_argument("--keep", action="append", default=[], metavar="NAME",
                   help="an image that must stay, as the bundle names it (repeatable; at least "
                   "one: the manifest's images for this site)")
    p.add_argument("--keep-previous", type=int, default=0, metavar="N",
                   help="also keep the N most recently imported other images of each kept "
                   "name's repository, for a rollback (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    p.add_argument("-o", "--output", metavar="PATH", help="also write the report (after pruning) to PATH")
    p.add_argument("--site", help="site name to put in the report")
    p.add_argument("--json", action="store_true",
                   help="print JSON: removed, kept, in_use, failed and the report")

    p = sub.add_parser("verify", parents=[common], help="check a bundle completely without importing it")
    p.add_argument("bundle", nargs="+", help="bundle file, or - for standard input; volumes as "
                   "for import; a single volume other than the first is checked on its own")
    _trust_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inspect", parents=[common], help="show a bundle's header and index")
    p.add_argument("bundle", help="bundle file")
    p.add_argument("--json", action="store_true")

    # No help=: hidden from the command list; the packer's resumable upload runs it on the device.
    p = sub.add_parser("staged", parents=[common],
                       description="print the size, per-block xxh3-128 digests and free space of a "
                       "staged (partly uploaded) bundle, for the packer's resumable upload")
    p.add_argument("path", help="the staged file (absent: size 0)")
    p.add_argument("--block-size", type=int, default=1024 * 1024, metavar="BYTES",
                   help="bytes per digested block (default: %(default)s)")
    p.add_argument("--hold", action="store_true",
                   help="instead: hold the staging directory's upload lock until standard input "
                   "ends (refused with exit 15 while another upload holds it)")
    p.add_argument("--json", action="store_true", help="print JSON (the only output form)")

    p = sub.add_parser("key", parents=[common], help="signing keys: generate one, show a key's id")
    ksub = p.add_subparsers(dest="key_command", metavar="ACTION")
    q = ksub.add_parser("generate", parents=[common], help="write a new Ed25519 key pair")
    q.add_argument("--out", required=True, metavar="PREFIX",
                   help="writes PREFIX.key (private, mode 0600; keep it on the packer) and "
                   "PREFIX.pub (copy it to devices' /etc/edgebundle/trusted.d/)")
    q.add_argument("--json", action="store_true")
    q = ksub.add_parser("show", parents=[common], help="print the key id of a .pub or .key file")
    q.add_argument("keyfile")
    q.add_argument("--json", action="store_true")

    p = sub.add_parser("inventory", parents=[common], help="the packer's record of what each site holds")
    isub = p.add_subparsers(dest="inventory_command", metavar="ACTION")
    q = isub.add_parser("record", parents=[common], help="record a report brought back from a device")
    q.add_argument("site")
    q.add_argument("report", help="report JSON file (from `edgebundle report`/`import --report`)")
    q.add_argument("-m", "--manifest", help="manifest list, to check the report fits the site")
    q.add_argument("--json", action="store_true")
    q = isub.add_parser("pull", parents=[common], help="fetch a site's report over SSH and record it")
    q.add_argument("site")
    q.add_argument("-m", "--manifest", help="manifest list naming the site (default: the one "
                   "last used to plan or pack it)")
    _ssh_args(q)
    q.add_argument("--path", help="fetch this report file over SFTP instead of running "
                   "`edgebundle report` on the device")
    q.add_argument("--json", action="store_true")
    q = isub.add_parser("show", parents=[common], help="print a site's recorded inventory")
    q.add_argument("site")
    q.add_argument("--json", action="store_true")
    return parser


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.debug)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return dispatch(args)
    except EdgebundleError as exc:
        log.debug("failed with %s (exit %d)", type(exc).__name__, exc.exit_code)
        sys.stderr.write(f"edgebundle: error: {redact(str(exc))}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("edgebundle: interrupted\n")
        return 130
    except BrokenPipeError as exc:
        if stdout_gone():
            # The reader of our stdout went away (`edgebundle plan | head`): not our error.
            return 1
        # Any other pipe (to ctr, the Docker socket) should have been named by its
        # seam; if one slipped through, say so in one line rather than nothing.
        sys.stderr.write(f"edgebundle: error: a pipe closed under us: {exc.strerror or exc} "
                         "(hint: the container runtime may have stopped; check it and rerun)\n")
        return 1
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a traceback
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # A write we did not expect to fill the disk (the packer's delta work files...):
            # still one line that says so, and the exit code of a full disk.
            where = f" writing {exc.filename}" if exc.filename else ""
            sys.stderr.write(f"edgebundle: error: the disk filled{where}: {exc.strerror} (hint: "
                             "free space there and run the command again)\n")
            return SpaceError.exit_code
        sys.stderr.write(f"edgebundle: internal error: {type(exc).__name__}: {redact(str(exc))} "
                         "(hint: this is a bug; rerun with --debug and report it with that output)\n")
        return 1


def stdout_gone() -> bool:
    """Whether our stdout is a pipe whose reader has gone (EPIPE on it, not elsewhere)."""
    import os
    import select
    import stat

    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode) and not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return True  # closed or replaced stdout: nothing to report to anyway


def dispatch(args: argparse.Namespace) -> int:
    handler: Callable[[argparse.Namespace], int]
    if args.command == "staged":
        from .staged import cmd_staged
        handler = cmd_staged
    elif args.command in ("import", "report", "prune", "verify", "inspect"):
        from . import device
        handler = getattr(device, "cmd_" + args.command)
    elif args.command == "key":
        from . import device
        if not args.key_command:
            raise UsageError("key needs an action: generate or show",
                             "e.g. `edgebundle key generate --out /secure/fleet`")
        handler = getattr(device, "cmd_key_" + args.key_command)
    else:
        try:
            from . import packer
        except ImportError as exc:
            if (exc.name or "").split(".")[0] not in PACKER_EXTRA:
                raise  # our own bug, not a missing extra: the last-resort handler says so
            raise UsageError(f"`edgebundle {args.command}` needs the packer extra ({exc.name} "
                             "is not installed)", "pip install 'edgebundle[packer]'") from None
        if args.command == "sync":
            from .sync import cmd_sync
            handler = cmd_sync
        elif args.command == "inventory":
            if not args.inventory_command:
                raise UsageError("inventory needs an action: record, pull or show",
                                 "e.g. `edgebundle inventory show SITE`; see `edgebundle inventory --help`")
            handler = getattr(packer, "cmd_inventory_" + args.inventory_command)
        else:
            handler = getattr(packer, "cmd_" + args.command)
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
