"""What the manifest list asks for, as typed values: registries, images, sites.

``manifest.py`` builds these from YAML (packer only); they are plain frozen values so
that the store, the SSH transfer and the planner can use them without YAML.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .errors import InventoryError, UsageError
from .oci import Platform
from .reference import Reference

# A site name becomes a directory name: one safe path component, never "." or "..".
SITE_NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z", re.ASCII)
# containerd's namespace rule (namespaces.Validate): labels of [A-Za-z0-9] joined by . _ -
NAMESPACE_RE = re.compile(r"\A[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*\Z", re.ASCII)
SITE_NAME_HINT = "site names are letters, digits, '.', '_' and '-', starting with a letter or digit"


def check_site_name(name: object) -> str:
    """Return ``name`` if it is a valid site name, else raise ``InventoryError``."""
    if not isinstance(name, str) or not SITE_NAME_RE.match(name):
        raise InventoryError(f"invalid site name {name!r}", SITE_NAME_HINT)
    return name


@dataclass(frozen=True)
class RegistryConfig:
    """Per-registry settings. Plain HTTP only where ``insecure`` is declared.

    ``ca_file``/``client_cert``/``client_key`` are absolute paths (the manifest's are
    resolved against its directory); they add to what certs.d holds for the host.
    """

    host: str
    insecure: bool = False
    mirrors: Tuple[str, ...] = ()
    ca_file: Optional[str] = None
    client_cert: Optional[str] = None
    client_key: Optional[str] = None


@dataclass(frozen=True)
class ImageSpec:
    """One entry of ``images:``.

    ``reference`` is the normalised name the image gets on the device. ``source`` is
    ``None`` for a registry, or ``docker-archive:PATH`` / ``oci-layout:PATH`` for offline
    sources (then ``reference`` still names the image on the device).
    """

    ref: str
    reference: Reference
    source: Optional[str] = None
    platform: Optional[Platform] = None  # overrides the site's platform
    sites: Tuple[str, ...] = ()  # empty: every site
    line: int = 0  # line in the manifest file, for error messages


DEFAULT_STAGING = "/var/lib/edgebundle/staging"


@dataclass(frozen=True)
class PrunePolicy:
    """A site's ``prune:``: after a sync, remove images edgebundle imported that the
    manifest no longer names, keeping ``keep_previous`` older versions per repository."""

    keep_previous: int = 0


@dataclass(frozen=True)
class SiteSpec:
    name: str
    runtime: str  # "containerd" | "docker"
    platform: Platform
    namespace: Optional[str] = None  # containerd only; default "default"
    ssh: Optional[str] = None  # [user@]host[:port] or a ~/.ssh/config Host alias
    report_command: Optional[str] = None  # run over SSH by `inventory pull`
    deltas: bool = True  # ship changed layers as content deltas where clearly smaller
    # On the device: the runtime's socket (containerd) or Docker host (unix://...); None:
    # the runtime's standard one. And the edgebundle command line to run there.
    address: Optional[str] = None
    edgebundle: str = "edgebundle"
    staging: str = DEFAULT_STAGING  # directory on the device that `sync` uploads bundles to
    prune: Optional[PrunePolicy] = None  # None: sync never prunes the site
    line: int = 0


@dataclass(frozen=True)
class ManifestList:
    path: str
    images: Tuple[ImageSpec, ...]
    sites: Dict[str, SiteSpec]
    registries: Dict[str, RegistryConfig]

    def images_for(self, site: str) -> Tuple[ImageSpec, ...]:
        return tuple(i for i in self.images if not i.sites or site in i.sites)

    def site(self, name: str) -> SiteSpec:
        """The site declared as ``name``; an undeclared one is a ``UsageError``."""
        site = self.sites.get(name)
        if site is None:
            known = ", ".join(sorted(self.sites)) or "none"
            raise UsageError(f"site {name!r} is not declared in {self.path} (sites: {known})",
                             "add it under `sites:` or pick one of those")
        return site
