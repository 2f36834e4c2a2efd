"""Image references, parsed and normalised as the distribution project does.

Grammar (github.com/distribution/reference)::

    reference      := name [ ":" tag ] [ "@" digest ]
    name           := [domain "/"] path-component ["/" path-component]*
    domain         := host [":" port]
    path-component := [a-z0-9]+ (separator [a-z0-9]+)*
    separator      := [_.] | "__" | "-"+
    tag            := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest         := algorithm ":" hex

Normalisation (``ParseNormalizedNamed``): a first component that has no ``.`` or
``:`` and is not ``localhost`` is a Docker Hub path, so ``alpine`` becomes
``docker.io/library/alpine``; a bare name gets the tag ``latest``.

Pure: no I/O, used on both the packer and the device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .errors import UsageError

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
NAME_TOTAL_LENGTH_MAX = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[_.]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"  # ASCII only, as distribution's grammar
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

# Anchored with \A...\Z, never ^...$: "$" also matches before a trailing newline, so
# "host/repo\n:v1" or "sha256:<hex>\n" would pass. re.ASCII keeps every class ASCII.
_PATH_RE = re.compile(rf"\A{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*\Z", re.ASCII)
_DOMAIN_RE = re.compile(rf"\A{_DOMAIN}\Z", re.ASCII)
_TAG_RE = re.compile(rf"\A{_TAG}\Z", re.ASCII)
_DIGEST_RE = re.compile(rf"\A{_DIGEST}\Z", re.ASCII)
SHA256_RE = re.compile(r"\Asha256:[0-9a-f]{64}\Z", re.ASCII)


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: Optional[str] = None
    digest: Optional[str] = None

    @property
    def repository(self) -> str:
        """``domain/path``, the name without tag or digest."""
        return f"{self.domain}/{self.path}"

    def __str__(self) -> str:
        out = self.repository
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out

    def with_digest(self, digest: str) -> "Reference":
        return Reference(self.domain, self.path, self.tag, digest)


def parse_reference(text: str, default_tag: bool = True) -> Reference:
    """Parse and normalise ``text``; raise ``UsageError`` naming what is wrong.

    With ``default_tag`` a reference with neither tag nor digest gets ``latest``.
    """
    original = text
    if not text or text != text.strip():
        raise UsageError(f"invalid image reference {original!r}: empty or surrounded by spaces",
                         "write it as [registry/]repository[:tag][@sha256:digest]")
    digest: Optional[str] = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise UsageError(f"invalid image reference {original!r}: bad digest {digest!r}",
                             "a digest looks like sha256:<64 lowercase hex digits>")
        if digest.startswith("sha256:") and not SHA256_RE.match(digest):
            raise UsageError(f"invalid image reference {original!r}: sha256 digest must be 64 lowercase hex digits")
    tag: Optional[str] = None
    # A ':' after the last '/' separates the tag; one before it is a port.
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash:
        text, tag = text[:colon], text[colon + 1:]
        if not _TAG_RE.match(tag):
            raise UsageError(f"invalid image reference {original!r}: bad tag {tag!r}",
                             "tags are 1-128 of [A-Za-z0-9_.-] and cannot start with . or -")
    first, sep, rest = text.partition("/")
    if sep and (("." in first or ":" in first or first == "localhost") or first.lower() != first):
        domain, path = first, rest
        if not _DOMAIN_RE.match(domain):
            raise UsageError(f"invalid image reference {original!r}: bad registry host {domain!r}")
    else:
        domain, path = DEFAULT_DOMAIN, text
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_REPO_PREFIX + path
    if not _PATH_RE.match(path):
        hint = "repository names are lowercase" if path.lower() != path else \
            "repository path components are [a-z0-9] joined by '.', '_', '__' or '-'"
        raise UsageError(f"invalid image reference {original!r}: bad repository path {path!r}", hint)
    if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise UsageError(f"invalid image reference {original!r}: name longer than {NAME_TOTAL_LENGTH_MAX} characters")
    if default_tag and tag is None and digest is None:
        tag = "latest"
    return Reference(domain, path, tag, digest)


def normalize_name(text: str) -> str:
    """Normalised string form of a reference, for comparing names across runtimes."""
    return str(parse_reference(text))
