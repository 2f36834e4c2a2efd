"""Where the runtime keeps what an import adds, as the runtime itself says.

containerd: ``ctr plugins ls -d`` lists each plugin's exports; the content plugin and
local snapshotters export their ``root`` (so ``root = ...`` in config.toml, or k3s's
``/var/lib/rancher/k3s/agent/containerd``, needs no flag). Docker: ``DockerRootDir`` of
``GET /info``; ``docker load`` untars into ``<root>/tmp`` and unpacks into
``<root>/<driver>``. Podman: the blobs go to edgebundle's spool in podman's image copy
temp dir, the layers into ``graphRoot`` (both from ``podman info``).

Through the runtimes' own seams (``Runner``, the Engine API transport), so unit tests
feed recorded output.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

from ..errors import LoadError
from ..space import Storage
from . import Runtime

log = logging.getLogger(__name__)

CONTENT_PLUGIN = ("io.containerd.content.v1", "content")
SNAPSHOTTER_TYPE = "io.containerd.snapshotter.v1"
#: Snapshotters whose data lives under their exported root. Others (devmapper's thin
#: pool, remote snapshotters such as stargz) put it elsewhere or fetch it lazily: their
#: unpack is not checked rather than checked against the wrong disk.
LOCAL_SNAPSHOTTERS = ("overlayfs", "native", "fuse-overlayfs")


def parse_plugin_exports(text: str) -> Dict[Tuple[str, str], Dict[str, str]]:
    """``ctr plugins ls -d`` -> {(type, id): {export: value}}.

    Blocks of ``Type:``/``ID:`` lines; ``Exports:`` is followed by indented ``key value``
    lines until the next ``Name:`` line (``Requires:``, ``Platforms:``, ``Error:``...).
    """
    plugins: Dict[Tuple[str, str], Dict[str, str]] = {}
    kind: Optional[str] = None
    exports: Dict[str, str] = {}
    in_exports = False
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            key, _, value = line.partition(":")
            value = value.strip()
            in_exports = key == "Exports"
            if key == "Type":
                kind = value
            elif key == "ID" and kind is not None:
                exports = plugins.setdefault((kind, value), {})
            continue
        if in_exports:
            parts = line.split(None, 1)
            if len(parts) == 2:
                exports[parts[0]] = parts[1].strip()
    return plugins


def containerd_storage(plugins: Dict[Tuple[str, str], Dict[str, str]],
                       snapshotter: str) -> Storage:
    content = plugins.get(CONTENT_PLUGIN, {}).get("root")
    unpacked = plugins.get((SNAPSHOTTER_TYPE, snapshotter), {}).get("root")
    if unpacked is not None and snapshotter not in LOCAL_SNAPSHOTTERS:
        log.info("snapshotter %s keeps its data outside %s: the unpack is not checked",
                 snapshotter, unpacked)
        unpacked = None
    return Storage("containerd", _abs(content), _abs(unpacked), "containerd")


def docker_storage(info: object) -> Storage:
    root = info.get("DockerRootDir") if isinstance(info, dict) else None
    driver = info.get("Driver") if isinstance(info, dict) else None
    root = _abs(root if isinstance(root, str) else None)
    if root is None:
        return Storage("docker", None, None, "docker")
    layers = os.path.join(root, driver) if isinstance(driver, str) and driver.isidentifier() \
        else root
    return Storage("docker", os.path.join(root, "tmp"), layers, "docker")


def podman_storage(spool: Optional[str], graph_root: Optional[str]) -> Storage:
    """The spool edgebundle writes the bundle's blobs into, and podman's graph root."""
    return Storage("podman", _abs(spool), _abs(graph_root), "podman")


def _abs(path: Optional[str]) -> Optional[str]:
    return path if path is not None and os.path.isabs(path) else None


def runtime_storage(runtime: Runtime) -> Storage:
    """Ask the runtime where it keeps its data; unknown parts are None (not checked)."""
    from .containerd import ContainerdRuntime
    from .docker import DockerRuntime
    from .podman import PodmanRuntime

    try:
        if isinstance(runtime, ContainerdRuntime):
            text = runtime.ctr.run("plugins", "ls", "-d").decode(errors="replace")
            return containerd_storage(parse_plugin_exports(text), runtime.ctr.snapshotter)
        if isinstance(runtime, DockerRuntime):
            return docker_storage(runtime.api.get_json("/info"))
        if isinstance(runtime, PodmanRuntime):
            return podman_storage(runtime.podman.spool_parent(), runtime.podman.graph()[0])
    except LoadError as exc:  # an odd ctr/daemon: it still imports, unchecked
        log.info("%s did not say where it keeps its data (%s)", runtime.kind, exc.message)
    return Storage(runtime.kind, None, None, runtime.kind)


__all__: List[str] = ["containerd_storage", "docker_storage", "parse_plugin_exports", "podman_storage",
                      "runtime_storage"]
