"""Resumable, verified upload of a bundle to a staging directory on a device (SFTP).

``upload_bundle(site, bundle, staging_dir, ...)`` is what ``edgebundle sync`` calls
between packing and the remote import. It:

1. connects as ``inventory pull`` does (``ssh.connect``: known_hosts enforced, the
   ssh config, agent and keys);
2. runs ``EDGEBUNDLE staged DIR/NAME.part --block-size N --json`` on the device
   (``edgebundle/staged.py``): the size, an xxh3-128 digest per block of whatever an
   earlier, interrupted upload left, and the directory's free space. The packer
   compares those digests with its own blocks of the bundle and resumes at the
   first block that differs, truncating the part there, so a corrupted or
   half-flushed tail is re-sent while nothing is read back over the (metered) link.
   A device whose edgebundle lacks ``staged`` (older version): the upload restarts
   from 0 (said at ``-v``) and the free space comes from ``df -Pk``;
3. refuses up front (``SpaceError``, exit 14) when the staging directory's free
   space, plus what the part already holds past the resume offset, is less than
   what remains to be sent — both numbers in the message;
4. writes the rest to ``NAME.part`` with SFTP pipelining and a large channel window
   (paramiko otherwise waits for each 32 KiB write's ack), optionally at
   ``limit_rate`` bytes/s, calling ``progress(bytes_sent)`` as it goes;
5. verifies the complete part the same way (every block's digest, or with an old
   device ``sha256sum``, or at worst the size), then renames it to ``NAME`` with
   ``posix-rename`` (an existing ``NAME`` is replaced atomically).

Any failure is a one-line ``TransportError`` (exit 9) naming the site; a dropped
connection mid-upload leaves the ``.part`` on the device for the next call, which
resumes from its last verified block. Returns an ``UploadResult``: bytes sent,
the offset it resumed from, seconds taken.

Pure parts (``local_blocks``, ``resume_offset``, ``RateLimiter``) are apart from
the SSH I/O so unit tests can check them directly.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import shlex
import socket
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import paramiko

from ..errors import LinkError, LockedError, SpaceError, TransportError
from ..files import IO_CHUNK, read_pieces
from ..specs import SiteSpec
from ..staged import StagedFile, block_digests
from .options import SshOptions
from .ssh import _last_line, check_device_edgebundle, connect, run_device_command

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = IO_CHUNK  # resume granularity; 1 GiB costs 1,024 digests (~36 KB of JSON)
DEFAULT_COMMAND_TIMEOUT = 600.0  # hashing a multi-GB part on a slow eMMC takes a while
# paramiko's default 2 MiB window stalls a fast link every 2 MiB waiting for the
# server's window adjust; a large window lets pipelined writes flow.
WINDOW_SIZE = 64 * 1024 * 1024
MAX_PACKET_SIZE = 32768  # paramiko's SFTP writes are 32 KiB requests anyway
# Smaller than files.IO_CHUNK on purpose: progress and rate limiting step by this much,
# and a metered link limited to a few kB/s must not burst a whole MiB at once.
RATE_STEP = 256 * 1024

Progress = Callable[[int], None]


@dataclass(frozen=True)
class UploadResult:
    remote_path: str  # the final staged bundle on the device
    size: int  # the bundle's size
    bytes_sent: int  # payload bytes written this call (excludes what was resumed)
    resumed_from: int  # offset the upload started at (0: from scratch)
    seconds: float
    verified: str  # "blocks" (staged digests), "sha256" (old device), or "size"


# ---------------------------------------------------------------------------
# Pure parts


def local_blocks(path: str, block_size: int) -> Tuple[str, ...]:
    """The bundle's per-block xxh3-128 digests, as ``edgebundle staged`` computes them."""
    with open(path, "rb") as fh:
        return block_digests(fh, block_size)


def resume_offset(local: Sequence[str], remote: Sequence[str], remote_size: int, block_size: int) -> int:
    """Where to resume: the start of the first block whose digest differs.

    Only a block whose digest matches counts (a short, partly written last block
    does not: its digest differs from the full local block). The result never
    exceeds ``remote_size`` or the local size; the caller truncates the part to it.
    """
    matched = 0
    for mine, theirs in zip(local, remote):
        if mine != theirs:
            break
        matched += 1
    return min(matched * block_size, remote_size)


class RateLimiter:
    """Keeps the average rate since the first byte at or under ``rate`` bytes/s.

    ``sent(n)`` is called after each write; it sleeps until the schedule of a
    steady ``rate`` has caught up with the bytes sent so far. The clock and sleep
    are parameters so the unit tests need not wait.
    """

    def __init__(self, rate: Optional[float], clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("limit_rate must be positive")
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.start: Optional[float] = None
        self.total = 0

    def sent(self, n: int) -> None:
        if self.rate is None:
            return
        if self.start is None:
            self.start = self.clock()
        self.total += n
        due = self.start + self.total / self.rate
        delay = due - self.clock()
        if delay > 0:
            self.sleep(delay)


def parse_staged(data: bytes, block_size: int) -> StagedFile:
    """The device's ``staged --json`` output, checked (it decides what we trust)."""
    try:
        obj = json.loads(data.decode("utf-8"))
        blocks = tuple(str(b) for b in obj["blocks"])
        staged = StagedFile(path=str(obj["path"]), exists=bool(obj["exists"]), size=int(obj["size"]),
                            block_size=int(obj["block_size"]), blocks=blocks, free_bytes=int(obj["free_bytes"]))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not a staged-file description ({exc})") from None
    want = -(-staged.size // block_size)
    if staged.block_size != block_size or len(blocks) != want:
        raise ValueError(f"block size {staged.block_size} / {len(blocks)} blocks do not fit size {staged.size}")
    return staged


def parse_df(data: bytes) -> int:
    """Available bytes from ``df -Pk DIR`` (POSIX format: 1024-byte units, 4th column)."""
    lines = data.decode("utf-8", "replace").strip().splitlines()
    if len(lines) < 2:
        raise ValueError("no data line")
    fields = " ".join(lines[1:]).split()  # a long device name may wrap the line
    return int(fields[3]) * 1024


def _human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n} bytes"


# ---------------------------------------------------------------------------
# SSH I/O


def upload_bundle(
    site: SiteSpec,
    bundle: str,
    staging_dir: str,
    options: SshOptions = SshOptions(),
    *,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    block_size: int = DEFAULT_BLOCK_SIZE,
    limit_rate: Optional[float] = None,
    progress: Optional[Progress] = None,
) -> UploadResult:
    """Upload ``bundle`` to ``staging_dir/<name>`` on ``site``'s device; see the module doc.

    Opens its own connection (``ssh.connect`` with ``options``, bulk ciphers); ``sync``,
    which reuses one connection per site, calls ``upload_over`` instead.
    """
    with connect(site, options, bulk=True) as client:
        return upload_over(client, site, bundle, staging_dir, timeout=options.timeout,
                           command_timeout=command_timeout, block_size=block_size,
                           limit_rate=limit_rate, progress=progress)


def upload_over(
    client: paramiko.SSHClient,
    site: SiteSpec,
    bundle: str,
    staging_dir: str,
    *,
    timeout: float = SshOptions.timeout,
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    block_size: int = DEFAULT_BLOCK_SIZE,
    limit_rate: Optional[float] = None,
    progress: Optional[Progress] = None,
) -> UploadResult:
    """``upload_bundle`` over an open connection (``ssh.connect(..., bulk=True)``).

    Args:
        client: The connection to ``site``'s device.
        site: The site; ``edgebundle`` is the command there.
        bundle: Local bundle file.
        staging_dir: Directory on the device (created if missing).
        timeout: Seconds for opening a channel (as ``SshOptions.timeout``).
        command_timeout: Seconds a device command or SFTP reply may take.
        block_size: Resume and verification granularity (4 KiB..64 MiB).
        limit_rate: Average upload rate cap in bytes/s (``None``: unlimited).
        progress: Called with the bytes sent so far by this call.

    Raises:
        TransportError: Device command, SFTP or verification failure.
        SpaceError: The staging directory cannot hold the rest of the bundle.
    """
    name = os.path.basename(bundle)
    final = posixpath.join(staging_dir, name)
    part = final + ".part"
    limiter = RateLimiter(limit_rate)
    started = time.monotonic()
    try:
        size = os.stat(bundle).st_size
        local = local_blocks(bundle, block_size)
    except OSError as exc:
        raise TransportError(f"cannot read bundle {bundle}: {exc.strerror or exc}", "check the path") from None
    transport = client.get_transport()
    assert transport is not None  # connect() succeeded
    sftp = paramiko.SFTPClient.from_transport(transport, window_size=WINDOW_SIZE,
                                              max_packet_size=MAX_PACKET_SIZE)
    assert sftp is not None
    holder: Optional[paramiko.Channel] = None
    try:
        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(command_timeout)
        _makedirs(sftp, site, staging_dir)
        holder = _hold_upload_lock(client, site, part, timeout, command_timeout)
        staged = _staged(client, site, part, block_size, timeout, command_timeout)
        if staged is None:
            offset, held = 0, 0
            free = _df_free(client, site, staging_dir, timeout, command_timeout)
        else:
            offset = resume_offset(local, staged.blocks, staged.size, block_size)
            held, free = staged.size, staged.free_bytes
            log.info("site %s: %s on the device holds %d bytes, %d verified; resuming at %d",
                     site.name, part, staged.size, offset, offset)
        # What the part holds past the offset is freed by the truncation.
        if free is not None and free + max(0, held - offset) < size - offset:
            raise SpaceError(
                f"staging directory {staging_dir} on site {site.name} has {_human(free)} free "
                f"({free} bytes); the bundle needs {_human(size - offset)} ({size - offset} bytes) more",
                "free space on the device or choose another staging directory")
        sent = _send(sftp, site, bundle, part, offset, size, limiter, progress)
        verified = _verify(client, sftp, site, bundle, part, size, local, block_size, timeout,
                           command_timeout)
        try:
            sftp.posix_rename(part, final)
        except OSError as exc:
            raise TransportError(f"cannot rename {part} to {final} on site {site.name}: "
                                 f"{exc.strerror or exc}",
                                 "check the staging directory's permissions on the device") from None
    finally:
        _release(holder)
        # On a dead link closing fails too; that must not replace the error that says why.
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            sftp.close()
    seconds = time.monotonic() - started
    log.info("site %s: uploaded %s (%d bytes sent, resumed from %d) in %.1fs", site.name, final, sent, offset,
             seconds)
    return UploadResult(final, size, sent, offset, seconds, verified)


def _hold_upload_lock(client: paramiko.SSHClient, site: SiteSpec, part: str, timeout: float,
                      command_timeout: float) -> Optional[paramiko.Channel]:
    """Hold the staging directory's upload lock on the device for the rest of the upload.

    ``edgebundle staged PART --hold`` keeps the lock until its channel closes (ours, or
    the connection's when we die), so two packers never write one part at once; the
    second gets LockedError (exit 15 there). A device whose edgebundle predates
    ``--hold`` uploads without it (said at -v). Returns the channel to close.
    """
    command = f"{site.edgebundle} staged {shlex.quote(part)} --hold --json"
    transport = client.get_transport()
    assert transport is not None
    chan = transport.open_session(timeout=timeout)
    chan.settimeout(command_timeout)
    chan.exec_command(command)
    line = b""
    try:
        while not line.endswith(b"\n"):
            data = chan.recv(1)
            if not data:
                break
            line += data
    except socket.timeout:
        chan.close()
        raise LinkError(f"`{command}` on site {site.name} did not answer in {command_timeout:.0f}s",
                        "check the device, or raise the command timeout") from None
    if line.endswith(b"\n"):
        return chan  # held
    chan.status_event.wait(command_timeout)
    status = chan.exit_status if chan.status_event.is_set() else -1
    tail = b""
    while chan.recv_stderr_ready():
        tail += chan.recv_stderr(65536)
    chan.close()
    last = _last_line(tail)
    if status == LockedError.exit_code:
        raise LockedError(f"site {site.name}: {last.removeprefix('edgebundle: error: ') or 'its upload lock is held'}",
                          "another packer is uploading to this device; sync again later")
    try:
        check_device_edgebundle(site, status, last)
    except TransportError as exc:
        if status == 127:
            raise
        log.info("site %s: %s; uploading without the device's upload lock", site.name, exc.message)
        return None
    raise TransportError(f"`{command}` on site {site.name} exited with status {status}: {last or '(no stderr)'}",
                         f"run it by hand on the device: {command}")


def _release(chan: Optional[paramiko.Channel]) -> None:
    if chan is not None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            chan.shutdown_write()  # EOF on its stdin: the device lets go of the lock
            chan.close()


def _makedirs(sftp: paramiko.SFTPClient, site: SiteSpec, path: str) -> None:
    parts: List[str] = []
    head = path.rstrip("/") or "/"
    while head not in ("", "/", "."):
        parts.append(head)
        head = posixpath.dirname(head)
    for d in reversed(parts):
        try:
            sftp.stat(d)
            continue
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _sftp_error(site, f"cannot check {d}", exc) from None
        try:
            sftp.mkdir(d)
        except OSError as exc:
            raise _sftp_error(site, f"cannot create staging directory {d}", exc) from None


def _sftp_error(site: SiteSpec, what: str, exc: OSError) -> TransportError:
    return TransportError(f"{what} on site {site.name}: {exc.strerror or exc}",
                          "make the staging directory writable by the SSH user, or choose another")


def _staged(client: paramiko.SSHClient, site: SiteSpec, part: str, block_size: int, timeout: float,
            command_timeout: float) -> Optional[StagedFile]:
    """The device's view of the part, or None when its edgebundle has no ``staged``."""
    command = f"{site.edgebundle} staged {shlex.quote(part)} --block-size {block_size} --json"
    result = run_device_command(client, site, command, timeout, command_timeout, "`edgebundle staged`")
    status, out, last = result.status, result.stdout, result.stderr_tail
    if status != 0:
        try:
            check_device_edgebundle(site, status, last)
        except TransportError as exc:
            if status == 127:
                raise  # no edgebundle at all: sync could not import anyway
            log.info("site %s: %s; the upload restarts from 0 instead of resuming", site.name, exc.message)
            return None
        raise TransportError(f"`{command}` on site {site.name} exited with status {status}: "
                             f"{last or '(no stderr)'}", f"run it by hand on the device: {command}")
    try:
        return parse_staged(out, block_size)
    except ValueError as exc:
        raise TransportError(f"`{command}` on site {site.name} printed something unexpected: {exc}",
                             "check the edgebundle version on the device (pip install -U edgebundle)") from None


def _df_free(client: paramiko.SSHClient, site: SiteSpec, directory: str, timeout: float,
             command_timeout: float) -> Optional[int]:
    result = run_device_command(client, site, f"df -Pk -- {shlex.quote(directory)}", timeout,
                                command_timeout, "df")
    status, out, last = result.status, result.stdout, result.stderr_tail
    try:
        if status != 0:
            raise ValueError(last or f"status {status}")
        return parse_df(out)
    except (ValueError, IndexError) as exc:
        log.warning("site %s: cannot read free space of %s with df (%s); uploading without the pre-flight",
                    site.name, directory, exc)
        return None


def _send(sftp: paramiko.SFTPClient, site: SiteSpec, bundle: str, part: str, offset: int, size: int,
          limiter: RateLimiter, progress: Optional[Progress]) -> int:
    sent = 0
    try:
        if offset == 0:
            fh = sftp.open(part, "wb")
        else:
            sftp.truncate(part, offset)  # drop the unverified tail before appending after it
            fh = sftp.open(part, "r+b")
            fh.seek(offset)
        with fh, open(bundle, "rb") as src:
            # Without pipelining paramiko waits for every 32 KiB write's reply: a round
            # trip per request. Errors still surface, at latest when the file is closed.
            fh.set_pipelined(True)
            src.seek(offset)
            while True:
                data = src.read(RATE_STEP)
                if not data:
                    break
                fh.write(data)
                sent += len(data)
                if progress is not None:
                    progress(sent)
                limiter.sent(len(data))
    except (OSError, EOFError, paramiko.SSHException) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM):
            raise _sftp_error(site, f"cannot write {part}", exc) from None
        cause = str(exc) or type(exc).__name__
        if isinstance(exc, socket.timeout):
            cause = "the device stopped answering"
        raise LinkError(f"upload of {os.path.basename(bundle)} to site {site.name} failed after "
                             f"{offset + sent} of {size} bytes: {cause}; {part} is kept on the device",
                             "run the upload again: it resumes from the last verified block") from None
    return sent


def _verify(client: paramiko.SSHClient, sftp: paramiko.SFTPClient, site: SiteSpec, bundle: str, part: str,
            size: int, local: Sequence[str], block_size: int, timeout: float, command_timeout: float) -> str:
    """Check the finished part on the device; return how ("blocks", "sha256" or "size")."""
    staged = _staged(client, site, part, block_size, timeout, command_timeout)
    if staged is not None:
        bad = resume_offset(local, staged.blocks, staged.size, block_size)
        if staged.size == size and tuple(staged.blocks) == tuple(local):
            return "blocks"
        raise TransportError(f"{part} on site {site.name} differs from {bundle} after the upload "
                             f"(from byte {bad}; {staged.size} of {size} bytes)",
                             "run the upload again: it re-sends from the first differing block; if it "
                             "repeats, check the device's storage")
    result = run_device_command(client, site, f"sha256sum -- {shlex.quote(part)}", timeout,
                                command_timeout, "sha256sum")
    status, out = result.status, result.stdout
    if status == 0 and out.split()[:1]:
        with open(bundle, "rb") as fh:
            digest = hashlib.sha256()
            for data in read_pieces(fh):
                digest.update(data)
        if out.split()[0].decode("ascii", "replace") != digest.hexdigest():
            raise TransportError(f"{part} on site {site.name} differs from {bundle} after the upload (sha256)",
                                 "run the upload again; if it repeats, check the device's storage")
        return "sha256"
    remote = sftp.stat(part).st_size
    if remote != size:
        raise TransportError(f"{part} on site {site.name} has {remote} bytes after the upload, not {size}",
                             "run the upload again")
    log.warning("site %s: %s checked by size only (no `edgebundle staged` or sha256sum on the device)",
                site.name, part)
    return "size"
