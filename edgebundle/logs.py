"""``-v`` and ``--debug``: what edgebundle is doing, on stderr, with secrets redacted.

* default: warnings only (errors are the CLI's one-line messages, not log records);
* ``-v``: INFO from edgebundle: each image resolved, layers fetched, what a plan
  decided, each import step, retries and mirror fallbacks;
* ``--debug``: DEBUG from edgebundle, INFO from httpx (each request) and paramiko, and a
  traceback for an unexpected internal error.

Every record passes ``Redactor`` first, so a token, a password or a signed URL never
reaches the terminal or a CI log, whatever a library decides to print.

Device-safe: standard library only.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import List, Optional, TextIO, Tuple

# (pattern, replacement). Conservative on purpose: a redacted word too many costs nothing.
_SECRETS: List[Tuple["re.Pattern[str]", str]] = [
    # Authorization headers and their schemes, wherever they show up.
    (re.compile(r"(?i)\b(authorization\s*[:=]\s*)(\S+\s+)?\S+"), r"\1***"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 ***"),
    # user:password@ in URLs.
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@"), r"\1***@"),
    # Query or form parameters that carry secrets (tokens, passwords, signed URLs).
    (re.compile(r"(?i)([?&](?:[a-z0-9_-]*(?:token|password|passwd|secret|signature|sig|key|credential)"
                r"[a-z0-9_-]*|x-amz-[a-z-]+)=)[^&\s\"']+"), r"\1***"),
    # JSON fields of the same kind ({"token": "..."}, docker config "auth").
    (re.compile(r"(?i)(\"(?:[a-z_]*token|password|secret|auth|identitytoken)\"\s*:\s*\")[^\"]*\""),
     r"\1***\""),
]


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``***``."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class Redactor(logging.Filter):
    """Formats the record's message once and redacts it (args included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not kill the run
            message = str(record.msg)
        record.msg = redact(message)
        record.args = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in 3.11+ stubs
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(verbose: int = 0, debug: bool = False, stream: Optional[TextIO] = None) -> None:
    """Route log records to ``stream`` (stderr) at the level the flags ask for.

    Idempotent: a second call replaces the handler (tests call ``main`` many times).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _Handler):
            root.removeHandler(handler)
    handler = _Handler(stream or sys.stderr)
    handler.addFilter(Redactor())
    if debug:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    else:
        fmt = "edgebundle: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    root.addHandler(handler)
    ours = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    root.setLevel(logging.WARNING)
    logging.getLogger("edgebundle").setLevel(ours)
    # Libraries: only with --debug, and never below INFO (httpcore's DEBUG is a byte trace).
    # paramiko logs every transport failure at ERROR, traceback included, from its own
    # thread; the one-line TransportError says it better, so it stays quiet otherwise.
    logging.getLogger("httpx").setLevel(logging.INFO if debug else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("paramiko").setLevel(logging.INFO if debug else logging.CRITICAL + 1)
