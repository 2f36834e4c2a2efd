"""Load the YAML manifest list: which images go to which sites (packer only).

The file is small and written by hand, so every mistake is reported as
``FILE:LINE: what is wrong`` with a hint, and unknown keys get a did-you-mean:
a typo such as ``platfrom:`` must fail loudly rather than silently pack the
wrong architecture for a device that is hours of driving away.

Line numbers come from a ``SafeLoader`` subclass whose mappings and sequences
remember the line of every key and item (see ``_Map`` / ``_Seq``).
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import yaml

from .errors import ManifestError, UsageError, type_name
from .sources import SOURCE_KINDS
from .format import RUNTIMES
from .oci import Platform
from .specs import (DEFAULT_STAGING, NAMESPACE_RE, SITE_NAME_HINT, SITE_NAME_RE, ImageSpec, ManifestList,
                    PrunePolicy, RegistryConfig, SiteSpec)
from .naming import check_reference_host, device_name, docker_tag
from .reference import DEFAULT_DOMAIN, LEGACY_DEFAULT_DOMAIN, parse_reference

MANIFEST_VERSION = 1

TOP_KEYS = ("version", "registries", "images", "sites")
IMAGE_KEYS = ("ref", "source", "platform", "sites")
SITE_KEYS = ("runtime", "platform", "namespace", "ssh", "report_command", "deltas", "address",
             "edgebundle", "staging", "prune")
PRUNE_KEYS = ("keep_previous",)
REGISTRY_KEYS = ("insecure", "mirrors", "ca_file", "client_cert", "client_key")
DEFAULT_NAMESPACE = "default"

_NAMESPACE_RE = NAMESPACE_RE  # containerd's rule, shared with the bundle's header check
# host[:port] as a registry is named in a reference; no scheme, no path.
_HOST_RE = re.compile(r"\A(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?\Z", re.ASCII)
# [user@]host[:port] or an ~/.ssh/config alias: one word, no spaces.
_SSH_RE = re.compile(r"\A(?:[^@\s]+@)?(?:\[[^\]\s]+\]|[^@:\s\[\]]+)(?::([0-9]+))?\Z")


class _Map(Dict[Any, Any]):
    """A YAML mapping that remembers its own line and the line of each key."""

    line: int = 0
    key_lines: Dict[object, int]


class _Seq(List[Any]):
    """A YAML sequence that remembers its own line and the line of each item."""

    line: int = 0
    item_lines: List[int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings/sequences carry 1-based line numbers."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)  # resolve `<<: *anchor` merges first
    out = _Map()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "found a mapping key that is not a plain value", key_node.start_mark) from None
        if key in out:
            # PyYAML silently keeps the last duplicate; a repeated site or key is a mistake.
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {out.key_lines[key]})", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


class _Ctx:
    """Where we are in the file, to prefix errors with ``FILE:LINE:``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, line: int, message: str, hint: Optional[str] = None) -> ManifestError:
        where = f"{self.path}:{line}" if line else self.path
        return ManifestError(f"{where}: {message}", hint)


def load_manifest(path: Union[str, "os.PathLike[str]"]) -> ManifestList:
    """Read and validate a manifest list file.

    Args:
        path: The YAML file.

    Returns:
        The validated ``ManifestList``; site namespaces default to ``"default"`` for
        containerd, and relative offline ``source`` paths are made absolute against the
        manifest's directory so the result does not depend on the working directory.

    Raises:
        ManifestError: The file is missing, unreadable, not YAML, or invalid; the
            message starts with ``FILE:LINE:`` where a line is known.
    """
    text = _read_text(Path(path))
    return parse_manifest(text, str(path), base_dir=Path(path).resolve().parent)


def parse_manifest(text: str, path: str = "<manifest>", base_dir: Optional[Path] = None) -> ManifestList:
    """Validate manifest YAML already in memory (``path`` is used in messages only).

    Args:
        text: The YAML text.
        path: Name to print in error messages.
        base_dir: Directory that relative offline ``source`` paths are relative to;
            the current directory when ``None``.

    Raises:
        ManifestError: As for ``load_manifest``.
    """
    ctx = _Ctx(path)
    doc = _parse_yaml(ctx, text)
    _check_keys(ctx, doc, TOP_KEYS, None, doc.line)
    _check_version(ctx, doc)
    registries = _parse_registries(ctx, doc.get("registries"), doc.key_lines.get("registries", 0),
                                   base_dir or Path.cwd())
    sites = _parse_sites(ctx, doc.get("sites"), doc.key_lines.get("sites", 0))
    if "images" not in doc:
        raise ctx.error(doc.line, "no images: section", "list the images to ship under images:")
    images = _parse_images(ctx, doc["images"], doc.key_lines["images"], sites, base_dir or Path.cwd())
    return ManifestList(path=path, images=images, sites=sites, registries=registries)


# ---------------------------------------------------------------------------
# File and YAML level


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"manifest file {path} not found",
                            "check the path; manifests/example.yaml shows the format") from None
    except IsADirectoryError:
        raise ManifestError(f"manifest file {path} is a directory", "pass the YAML file itself") from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest file {path}: {exc.strerror}",
                            "check the file's permissions") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"manifest file {path} is not UTF-8 (bad byte at offset {exc.start})",
                            "save the file as UTF-8") from None


def _parse_yaml(ctx: _Ctx, text: str) -> _Map:
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        problem = exc.problem or exc.context or "malformed YAML"
        raise ctx.error(line, f"invalid YAML: {problem}",
                        "fix the syntax at that line (indentation, quotes, a missing ':')") from None
    except yaml.YAMLError as exc:
        raise ctx.error(0, f"invalid YAML: {exc}", "fix the YAML syntax") from None
    if doc is None:
        raise ctx.error(0, "manifest is empty", "start from manifests/example.yaml")
    if not isinstance(doc, _Map):
        raise ctx.error(1, f"manifest must be a mapping, not a {type_name(doc, mapping='mapping', sequence='list')}",
                        "the file starts with `version: 1` followed by images: and sites:")
    return doc


def _check_keys(ctx: _Ctx, mapping: _Map, allowed: Iterable[str], where: Optional[str], line: int) -> None:
    """Refuse keys outside ``allowed``; ``where`` is e.g. "image entry" (None: top level)."""
    allowed = tuple(allowed)
    for key in mapping:
        if key in allowed:
            continue
        guess = difflib.get_close_matches(str(key), allowed, n=1)
        hint = f"did you mean {guess[0]!r}? " if guess else ""
        what = f"unknown key {key!r} in {where}" if where else f"unknown top-level key {key!r}"
        raise ctx.error(mapping.key_lines.get(key, line), what,
                        f"{hint}allowed keys: {', '.join(allowed)}")


def _check_version(ctx: _Ctx, doc: _Map) -> None:
    if "version" not in doc:
        raise ctx.error(doc.line, "missing version", "add `version: 1` at the top of the manifest")
    version = doc["version"]
    if type(version) is not int or version != MANIFEST_VERSION:  # True == 1 and 1.0 == 1 in Python
        raise ctx.error(doc.key_lines["version"], f"unsupported manifest version {version!r}",
                        f"this edgebundle reads version {MANIFEST_VERSION}; write `version: {MANIFEST_VERSION}`")


def _want_map(ctx: _Ctx, value: object, line: int, what: str, *, allow_null: bool = True) -> _Map:
    """``value`` as a mapping; a bare ``key:`` (null) counts as empty where allowed."""
    if value is None and allow_null:
        empty = _Map()
        empty.line, empty.key_lines = line, {}
        return empty
    if not isinstance(value, _Map):
        raise ctx.error(line, f"{what} must be a mapping, not a {type_name(value, mapping='mapping', sequence='list')}",
                        "write it as indented `key: value` lines or {key: value}")
    return value


def _want_str(ctx: _Ctx, value: object, line: int, what: str, hint: Optional[str] = None) -> str:
    if not isinstance(value, str) or not value.strip():
        # YAML turns unquoted 22, 1.0, yes, or 12:30 into numbers/booleans: tell the user to quote.
        got = "empty" if isinstance(value, str) or value is None else f"a {type_name(value, mapping='mapping', sequence='list')} ({value!r})"
        raise ctx.error(line, f"{what} must be a non-empty string, not {got}",
                        hint or "quote the value if YAML read it as a number or boolean")
    return value


def _want_str_list(ctx: _Ctx, value: object, line: int, what: str) -> List[Tuple[str, int]]:
    """A list of strings with each item's line; a single string is not accepted."""
    if not isinstance(value, _Seq):
        raise ctx.error(line, f"{what} must be a list, not a {type_name(value, mapping='mapping', sequence='list')}", "write it as [a, b] or `- a` lines")
    return [(_want_str(ctx, item, item_line, f"item of {what}"), item_line)
            for item, item_line in zip(value, value.item_lines)]


# ---------------------------------------------------------------------------
# registries:


def _parse_registries(ctx: _Ctx, value: object, line: int, base_dir: Path) -> Dict[str, RegistryConfig]:
    section = _want_map(ctx, value, line, "registries")
    out: Dict[str, RegistryConfig] = {}
    for host, body in section.items():
        key_line = section.key_lines[host]
        host = _registry_host(ctx, host, key_line, f"registry {host!r}")
        if host in out:
            raise ctx.error(key_line, f"registry {host!r} is declared twice",
                            "docker.io and index.docker.io are the same registry; keep one entry")
        out[host] = _parse_registry(ctx, host, body, key_line, base_dir)
    return out


def _registry_host(ctx: _Ctx, value: object, line: int, what: str) -> str:
    host = _want_str(ctx, value, line, what)
    if not _HOST_RE.match(host):
        raise ctx.error(line, f"{what}: {host!r} is not a registry host",
                        "write host[:port] without a scheme or path, e.g. registry.local:5000")
    # Same normalisation as references, so `index.docker.io:` configures Docker Hub pulls.
    return DEFAULT_DOMAIN if host == LEGACY_DEFAULT_DOMAIN else host


def _parse_registry(ctx: _Ctx, host: str, body: object, line: int, base_dir: Path) -> RegistryConfig:
    entry = _want_map(ctx, body, line, f"registry {host!r}")
    _check_keys(ctx, entry, REGISTRY_KEYS, f"registry {host!r}", line)
    insecure = entry.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ctx.error(entry.key_lines["insecure"], f"registry {host!r}: insecure must be true or false, "
                        f"not {insecure!r}", "write `insecure: true` (unquoted) to allow plain HTTP")
    mirrors: Tuple[str, ...] = ()
    if "mirrors" in entry:
        items = _want_str_list(ctx, entry["mirrors"], entry.key_lines["mirrors"], f"registry {host!r} mirrors")
        mirrors = tuple(_registry_host(ctx, m, m_line, f"mirror of registry {host!r}") for m, m_line in items)
    files = {key: _registry_file(ctx, host, entry, key, base_dir) for key in ("ca_file", "client_cert", "client_key")}
    if (files["client_cert"] is None) != (files["client_key"] is None):
        have, lack = ("client_cert", "client_key") if files["client_cert"] else ("client_key", "client_cert")
        raise ctx.error(entry.key_lines[have], f"registry {host!r}: {have} without {lack}",
                        "a client certificate needs its key: give both (PEM files)")
    return RegistryConfig(host=host, insecure=insecure, mirrors=mirrors, ca_file=files["ca_file"],
                          client_cert=files["client_cert"], client_key=files["client_key"])


def _registry_file(ctx: _Ctx, host: str, entry: "_Map", key: str, base_dir: Path) -> Optional[str]:
    """An existing file named by ``key``, absolute (relative to the manifest's directory)."""
    if key not in entry:
        return None
    line = entry.key_lines[key]
    value = _want_str(ctx, entry[key], line, f"registry {host!r} {key}")
    path = (base_dir / os.path.expanduser(value)).resolve()
    if not path.is_file():
        raise ctx.error(line, f"registry {host!r}: {key} {path} is not a file",
                        "name a PEM file (relative paths are relative to the manifest)")
    return str(path)


# ---------------------------------------------------------------------------
# sites:


def _parse_sites(ctx: _Ctx, value: object, line: int) -> Dict[str, SiteSpec]:
    section = _want_map(ctx, value, line, "sites")
    return {name: _parse_site(ctx, name, body, section.key_lines[name]) for name, body in section.items()}


def _parse_site(ctx: _Ctx, name: object, body: object, line: int) -> SiteSpec:
    name = _want_str(ctx, name, line, "site name")
    if not SITE_NAME_RE.match(name):
        raise ctx.error(line, f"invalid site name {name!r}", SITE_NAME_HINT)
    entry = _want_map(ctx, body, line, f"site {name!r}", allow_null=False)
    _check_keys(ctx, entry, SITE_KEYS, f"site {name!r}", line)
    runtime = _site_runtime(ctx, name, entry, line)
    if "platform" not in entry:
        raise ctx.error(line, f"site {name!r} has no platform",
                        "add the device's platform, e.g. `platform: linux/arm64`")
    platform = _platform(ctx, entry["platform"], entry.key_lines["platform"], f"site {name!r} platform")
    return SiteSpec(
        name=name,
        runtime=runtime,
        platform=platform,
        namespace=_site_namespace(ctx, name, runtime, entry),
        ssh=_site_ssh(ctx, name, entry),
        report_command=_optional_str(ctx, entry, "report_command", f"site {name!r} report_command"),
        deltas=_site_deltas(ctx, name, entry),
        address=_site_address(ctx, name, runtime, entry),
        edgebundle=_site_command(ctx, name, entry),
        staging=_site_staging(ctx, name, entry),
        prune=_site_prune(ctx, name, entry),
        line=line,
    )


def _site_staging(ctx: _Ctx, name: str, entry: _Map) -> str:
    """The device directory ``sync`` uploads to: absolute, one line, no shell surprises."""
    staging = _optional_str(ctx, entry, "staging", f"site {name!r} staging")
    if staging is None:
        return DEFAULT_STAGING
    if not staging.startswith("/") or any(c.isspace() or ord(c) < 32 for c in staging) \
            or len(staging) > 1024 or "/../" in staging + "/":
        raise ctx.error(entry.key_lines["staging"], f"site {name!r}: staging {staging!r} is not an "
                        "absolute directory path", f"write e.g. `staging: {DEFAULT_STAGING}`")
    return staging.rstrip("/") or "/"


def _site_prune(ctx: _Ctx, name: str, entry: _Map) -> Optional[PrunePolicy]:
    """``prune: {keep_previous: N}``, or ``prune: true`` (N = 0); absent or false: never."""
    if "prune" not in entry:
        return None
    value, line = entry["prune"], entry.key_lines["prune"]
    hint = "write `prune: {keep_previous: 1}` (keep one older version per image for rollback) or `prune: false`"
    if isinstance(value, bool):
        return PrunePolicy() if value else None
    body = _want_map(ctx, value, line, f"site {name!r} prune", allow_null=False)
    _check_keys(ctx, body, PRUNE_KEYS, f"site {name!r} prune", line)
    keep = body.get("keep_previous", 0)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= 100:
        raise ctx.error(line, f"site {name!r}: prune keep_previous is {keep!r}, not a count 0..100", hint)
    return PrunePolicy(keep_previous=keep)


def _site_address(ctx: _Ctx, name: str, runtime: str, entry: _Map) -> Optional[str]:
    """The runtime's socket on the device: a path for containerd, unix://PATH for Docker."""
    address = _optional_str(ctx, entry, "address", f"site {name!r} address")
    if address is None:
        return None
    line = entry.key_lines["address"]
    if runtime == "podman":
        raise ctx.error(line, f"site {name!r}: podman has no socket to address",
                        "remove `address:` from this podman site (the device's default "
                        "podman store is used)")
    ok = (address.startswith("/") if runtime == "containerd"
          else address.startswith(("unix:///", "tcp://", "ssh://")))
    if not ok or any(c.isspace() for c in address) or len(address) > 4096:
        want = ("an absolute socket path, e.g. /run/k3s/containerd/containerd.sock"
                if runtime == "containerd" else "a Docker host, e.g. unix:///var/run/docker.sock")
        raise ctx.error(line, f"site {name!r}: invalid {runtime} address {address!r}", f"write {want}")
    return address


def _site_command(ctx: _Ctx, name: str, entry: _Map) -> str:
    """How to run edgebundle on the device, as words: e.g. ``/opt/edgebundle/bin/edgebundle``."""
    command = _optional_str(ctx, entry, "edgebundle", f"site {name!r} edgebundle")
    if command is None:
        return "edgebundle"
    try:
        shlex.split(command)  # blank is refused above, as for every string
    except ValueError as exc:
        raise ctx.error(entry.key_lines["edgebundle"], f"site {name!r}: edgebundle command "
                        f"{command!r} is not a command line ({exc})",
                        "write the command as the device's shell would, e.g. "
                        "`edgebundle: /opt/edgebundle/bin/edgebundle` or `edgebundle: sudo edgebundle`") from None
    return command


def _site_deltas(ctx: _Ctx, name: str, entry: _Map) -> bool:
    value = entry.get("deltas", True)
    if not isinstance(value, bool):
        raise ctx.error(entry.key_lines["deltas"], f"site {name!r}: deltas is {value!r}, not a boolean",
                        "write `deltas: false` to ship changed layers whole, or leave it out")
    return value


def _site_runtime(ctx: _Ctx, name: str, entry: _Map, line: int) -> str:
    if "runtime" not in entry:
        raise ctx.error(line, f"site {name!r} has no runtime", f"add `runtime: {' or '.join(RUNTIMES)}`")
    runtime = entry["runtime"]
    if runtime not in RUNTIMES:
        guess = difflib.get_close_matches(str(runtime), RUNTIMES, n=1)
        hint = f"did you mean {guess[0]!r}? " if guess else ""
        raise ctx.error(entry.key_lines["runtime"], f"site {name!r}: unknown runtime {runtime!r}",
                        f"{hint}runtime is one of: {', '.join(RUNTIMES)}")
    return str(runtime)


def _site_namespace(ctx: _Ctx, name: str, runtime: str, entry: _Map) -> Optional[str]:
    if "namespace" not in entry:
        # Filled in here so every later stage compares namespaces without re-defaulting.
        return DEFAULT_NAMESPACE if runtime == "containerd" else None
    line = entry.key_lines["namespace"]
    if runtime != "containerd":
        raise ctx.error(line, f"site {name!r}: namespace is only valid for containerd, not {runtime}",
                        f"remove `namespace:` from this {runtime} site")
    namespace = _want_str(ctx, entry["namespace"], line, f"site {name!r} namespace")
    if not _NAMESPACE_RE.match(namespace):
        raise ctx.error(line, f"site {name!r}: invalid containerd namespace {namespace!r}",
                        "namespaces are letters and digits joined by '.', '_' or '-' (e.g. k8s.io)")
    return namespace


def _site_ssh(ctx: _Ctx, name: str, entry: _Map) -> Optional[str]:
    ssh = _optional_str(ctx, entry, "ssh", f"site {name!r} ssh")
    if ssh is None:
        return None
    match = _SSH_RE.match(ssh)
    port = match.group(1) if match else None
    if not match or (port is not None and not 0 < int(port) < 65536):
        raise ctx.error(entry.key_lines["ssh"], f"site {name!r}: invalid ssh target {ssh!r}",
                        "write [user@]host[:port] or a Host alias from ~/.ssh/config")
    return ssh


def _optional_str(ctx: _Ctx, entry: _Map, key: str, what: str) -> Optional[str]:
    if key not in entry or entry[key] is None:
        return None
    return _want_str(ctx, entry[key], entry.key_lines[key], what)


def _platform(ctx: _Ctx, value: object, line: int, what: str) -> Platform:
    text = _want_str(ctx, value, line, what, "write it as os/arch[/variant], e.g. linux/arm64")
    try:
        return Platform.parse(text)
    except UsageError as exc:
        raise ctx.error(line, f"{what}: {exc.message}", exc.hint) from None


# ---------------------------------------------------------------------------
# images:


def _parse_images(ctx: _Ctx, value: object, line: int, sites: Dict[str, SiteSpec],
                  base_dir: Path) -> Tuple[ImageSpec, ...]:
    if not isinstance(value, _Seq):
        raise ctx.error(line, f"images must be a list, not a {type_name(value, mapping='mapping', sequence='list')}",
                        "write each image as a `- ref` line under images:")
    if not value:
        raise ctx.error(line, "images is empty", "list at least one image to ship")
    images = [_parse_image(ctx, item, item_line, sites, base_dir)
              for item, item_line in zip(value, value.item_lines)]
    _check_duplicates(ctx, images)
    return tuple(images)


def _parse_image(ctx: _Ctx, item: object, line: int, sites: Dict[str, SiteSpec], base_dir: Path) -> ImageSpec:
    if isinstance(item, str):
        item_map = _Map({"ref": item})
        item_map.line, item_map.key_lines = line, {"ref": line}
        item = item_map
    entry = _want_map(ctx, item, line, "image entry", allow_null=False)
    _check_keys(ctx, entry, IMAGE_KEYS, "image entry", line)
    if "ref" not in entry:
        raise ctx.error(line, "image entry has no ref",
                        "add `ref: registry/repository:tag` (offline sources need it too: it names the image)")
    ref_line = entry.key_lines["ref"]
    ref = _want_str(ctx, entry["ref"], ref_line, "image ref")
    try:
        reference = parse_reference(ref)
    except UsageError as exc:
        raise ctx.error(ref_line, exc.message, exc.hint) from None
    try:
        check_reference_host(reference, ref)
    except UsageError as exc:
        raise ctx.error(ref_line, exc.message, exc.hint) from None
    if reference.digest and not reference.digest.startswith("sha256:"):
        raise ctx.error(ref_line, f"image {ref!r}: only sha256 digests are supported",
                        "pin the image by its sha256 digest")
    return ImageSpec(
        ref=ref,
        reference=reference,
        source=_image_source(ctx, ref, entry, base_dir),
        platform=_platform(ctx, entry["platform"], entry.key_lines["platform"], f"image {ref!r} platform")
        if entry.get("platform") is not None else None,
        sites=_image_sites(ctx, ref, entry, sites),
        line=line,
    )


def _image_source(ctx: _Ctx, ref: str, entry: _Map, base_dir: Path) -> Optional[str]:
    source = _optional_str(ctx, entry, "source", f"image {ref!r} source")
    if source is None:
        return None
    kind, sep, where = source.partition(":")
    if not sep or kind not in SOURCE_KINDS or not where.strip():
        raise ctx.error(entry.key_lines["source"], f"image {ref!r}: invalid source {source!r}",
                        "write docker-archive:/path/to/image.tar or oci-layout:/path/to/layout-dir")
    path = Path(os.path.expanduser(where))
    if not path.is_absolute():
        # Relative to the manifest, not the cwd: the same file must work from any directory.
        path = base_dir / path
    return f"{kind}:{os.path.normpath(path)}"


def _image_sites(ctx: _Ctx, ref: str, entry: _Map, sites: Dict[str, SiteSpec]) -> Tuple[str, ...]:
    if entry.get("sites") is None:
        return ()
    line = entry.key_lines["sites"]
    names = _want_str_list(ctx, entry["sites"], line, f"image {ref!r} sites")
    if not names:
        raise ctx.error(line, f"image {ref!r}: sites is empty",
                        "list the sites that get this image, or remove sites: to send it everywhere")
    for name, name_line in names:
        if name not in sites:
            guess = difflib.get_close_matches(name, list(sites), n=1)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            declared = ", ".join(sorted(sites)) or "none"
            raise ctx.error(name_line, f"image {ref!r}: site {name!r} is not declared under sites:",
                            f"{hint}declared sites: {declared}")
    return tuple(dict.fromkeys(name for name, _ in names))


def _check_duplicates(ctx: _Ctx, images: List[ImageSpec]) -> None:
    """Refuse two entries that would give one site the same image name twice.

    The same reference may appear twice only with disjoint ``sites:`` lists (e.g. a
    different platform or source per site), since a site can then never get both.
    """
    seen: Dict[str, List[ImageSpec]] = {}
    for image in images:
        # Keyed by every name the image takes on a device, not by the reference text:
        # repo:v1@sha256:X and repo@sha256:X are both repo@sha256:X on containerd, and
        # repo@sha256:X is Docker's tag repo:sha256-X, which may also be listed as a tag.
        name = device_name(image.reference)
        for key in dict.fromkeys((name, docker_tag(name))):
            for other in seen.get(key, []):
                if not image.sites or not other.sites or set(image.sites) & set(other.sites):
                    same = "" if str(other.reference) == str(image.reference) else \
                        f", both named {key!r} on a device"
                    raise ctx.error(image.line, f"duplicate image {image.ref!r} (also on line "
                                    f"{other.line}{same})",
                                    "list each image once; use sites: to split one image between sites")
            seen.setdefault(key, []).append(image)
