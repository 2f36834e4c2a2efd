"""What an image is called inside each runtime.

Pure: no I/O, used on both the packer and the device.
"""

from __future__ import annotations

import functools
from typing import Dict, Iterable, Optional, Tuple

from .errors import UsageError
from .reference import Reference, normalize_name, parse_reference


def device_name(ref: Reference) -> str:
    """Name an image gets in the runtime: ``repo:tag``, or ``repo@digest`` when pinned.

    This is what ``ctr pull``/CRI name a pull by tag or by digest.
    """
    if ref.digest:
        return f"{ref.repository}@{ref.digest}"
    return f"{ref.repository}:{ref.tag or 'latest'}"


CRI_NAMESPACE = "k8s.io"  # where kubelet (and k3s) look for images


def cri_digest_name(name: str, top: str) -> Optional[str]:
    """The ``repo@sha256:...`` record CRI keeps beside ``repo:tag`` after a pull.

    CRI's ImageStatus finds an image by ``repo@digest`` only through a record of that
    exact name (measured on containerd 1.6), so a pod spec pinned by digest needs it.
    None when ``name`` is pinned already.
    """
    ref = parse_reference(name)
    return None if ref.digest else f"{ref.repository}@{top}"


@functools.lru_cache(maxsize=65536)
def docker_tag(name: str) -> str:
    """The tag an image named ``name`` gets in Docker.

    ``docker load`` can only tag, not record a registry digest, so ``repo@sha256:hex``
    becomes ``repo:sha256-hex`` (a tag keeps it safe from ``docker image prune``).
    """
    ref = parse_reference(name)
    if ref.digest:
        return f"{ref.repository}:{ref.digest.replace(':', '-')}"
    return f"{ref.repository}:{ref.tag}"


@functools.lru_cache(maxsize=65536)
def comparable_name(name: str) -> str:
    """``name`` normalised for comparison; a name we could not write is kept as it is.

    Cached: a fleet's inventories repeat the same few names thousands of times.
    """
    try:
        return normalize_name(name)
    except Exception:  # noqa: BLE001 - a runtime may hold names we would never write
        return name


# The registry host of the containerd importer's temporary names (``TEMP_PREFIX`` in
# importer/containerd.py is "<this>/"). ``.invalid`` is reserved (RFC 2606), so no real
# registry has it; a bundle or manifest naming an image there could plant an image that
# ``report`` hides and a rerun's cleanup removes, so such names are refused everywhere.
RESERVED_DOMAIN = "import.edgebundle.invalid"


def check_device_name(name: str) -> Reference:
    """``name`` as a bundle may name an image on the device; ``UsageError`` if it may not.

    It must be a valid reference (ASCII, no newline: see ``reference``), in the exact form
    ``device_name`` gives it (so two spellings of one image cannot both ship), and outside
    the importer's reserved namespace.
    """
    ref = parse_reference(name)
    if ref.domain.lower() == RESERVED_DOMAIN:
        raise UsageError(f"image name {name!r} uses the registry host {RESERVED_DOMAIN}, "
                         "which edgebundle reserves for its temporary import names",
                         "name the image after the registry it comes from")
    canonical = device_name(ref)
    if canonical != name:
        raise UsageError(f"image name {name!r} is not in its normalised form {canonical!r}")
    return ref


def check_reference_host(ref: Reference, text: str) -> None:
    """Refuse a reference to the reserved host (the packer's manifest check)."""
    if ref.domain.lower() == RESERVED_DOMAIN:
        raise UsageError(f"image {text!r} uses the registry host {RESERVED_DOMAIN}, "
                         "which edgebundle reserves for its temporary import names",
                         "name the image after the registry it comes from")


def name_clash(images: Iterable[Tuple[str, str, str]]) -> Optional[str]:
    """The first name two images would both take in a runtime, with different content.

    ``images`` are ``(device name, top digest, config digest)``. containerd names an
    image ``name`` (and, for CRI, ``repo@top``) pointing at ``top``; Docker tags it
    ``docker_tag(name)`` pointing at the config. Distinct device names can still meet:
    ``repo@sha256:X`` is tagged ``repo:sha256-X`` in Docker, which is also a valid tag
    of its own. Returns a one-line description, or None when no two collide.
    """
    taken: Dict[Tuple[str, str], Tuple[str, str]] = {}  # (runtime, name) -> (content, image)
    for name, top, config in images:
        ref = parse_reference(name)
        for runtime, runtime_name, content in (
                ("containerd", name, top),
                ("containerd", f"{ref.repository}@{top}", top),
                ("Docker", docker_tag(name), config)):
            other, first = taken.setdefault((runtime, runtime_name), (content, name))
            if other != content:
                return (f"{name!r} and {first!r} would both be {runtime} image "
                        f"{runtime_name!r}, with different content")
    return None
