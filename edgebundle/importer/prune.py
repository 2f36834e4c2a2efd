"""What ``prune`` asks of the runtimes: which images containers use, and removing names.

Through the importer's own seams: ``Ctr`` (the ``Runner``) for containerd, ``DockerAPI``
(its dial) for Docker, so unit tests replay recorded outputs (tests/fixtures/runtime).

- containerd: ``ctr containers ls`` lists every container of the namespace, CRI's (k3s,
  kubelet in ``k8s.io``) included, with the image *name* it was created from.
  ``ctr images rm`` does not refuse an image a container uses (recorded: rc 0, the name
  goes), so the check is ours. ``--sync`` waits for the garbage collection the removal
  triggers: when it returns, the content no other image holds is gone, and a report
  read next lists neither the name nor its blobs.
- Docker: ``GET /containers/json?all=1`` lists running and stopped containers with the
  image ID they use. ``DELETE /images/<name>`` (never ``force``) untags the name, and
  deletes the image when that was its last tag; a container created meanwhile makes it
  answer 409, which is reported as in use, not as a failure. An image a newer load took
  the tag of stays, untagged: ``DELETE /images/<ID>`` removes it.
- Podman: ``podman ps -a --format json`` lists every container with its image name and
  ID. ``podman rmi NAME`` (never ``--force``) untags, and deletes the image with its
  last tag -- but refuses (exit 2, "image is in use by a container") when a container
  uses it, which is reported as in use. Like Docker, a tag a newer load took leaves the
  older image dangling (``podman images --filter dangling=true``): ``rmi <ID>`` removes it.

Device-safe: standard library only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import FrozenSet, List, Sequence, Union
from urllib.parse import quote

from ..errors import LoadError
from ..prune import InUse
from .containerd import ContainerdRuntime, Ctr
from .docker import DockerAPI, DockerRuntime
from .podman import Podman, PodmanRuntime
from .tarstream import last_line

log = logging.getLogger(__name__)

GONE = "removed"
BUSY = "in-use"


def parse_containers_ls(text: str) -> FrozenSet[str]:
    """``ctr containers ls`` -> the image names containers were created from."""
    names = set()
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[1] != "-":
            names.add(parts[1])
    return frozenset(names)


def parse_containers_json(body: object, source: str = "docker API /containers/json answered",
                          hint: str = "check that the host is a docker daemon") -> InUse:
    """``GET /containers/json?all=1`` (or ``podman ps -a --format json``: the same two
    fields, the ID without its ``sha256:``) -> the image IDs and names containers use."""
    if not isinstance(body, list):
        raise LoadError(f"{source} {type(body).__name__}, not a list", hint)
    ids, names = set(), set()
    for c in body:
        if not isinstance(c, dict):
            continue
        image_id, image = c.get("ImageID"), c.get("Image")
        if isinstance(image_id, str) and image_id:
            ids.add(image_id if image_id.startswith("sha256:") else "sha256:" + image_id)
        if isinstance(image, str) and image:
            names.add(image)
    return InUse(names=frozenset(names), digests=frozenset(ids))


def parse_untagged(body: object) -> FrozenSet[str]:
    """``GET /images/json?all=1`` -> IDs of images without a tag (``<none>:<none>``)."""
    if not isinstance(body, list):
        raise LoadError(f"docker API /images/json answered {type(body).__name__}, not a list",
                        "check that the host is a docker daemon")
    out = set()
    for summary in body:
        if not isinstance(summary, dict) or not isinstance(summary.get("Id"), str):
            continue
        tags = summary.get("RepoTags") or []
        if all(t == "<none>:<none>" for t in tags if isinstance(t, str)):
            out.add(str(summary["Id"]))
    return frozenset(out)


@dataclass(frozen=True)
class Removal:
    name: str
    outcome: str  # GONE | BUSY
    detail: str = ""


class ContainerdImages:
    def __init__(self, ctr: Ctr) -> None:
        self.ctr = ctr

    @property
    def target(self) -> str:
        return f"containerd:{self.ctr.address}#{self.ctr.namespace}"

    def describe(self) -> str:
        return f"containerd at {self.ctr.address} namespace {self.ctr.namespace}"

    def in_use(self) -> InUse:
        return InUse(names=parse_containers_ls(self.ctr.run("containers", "ls")
                                               .decode(errors="replace")))

    def untagged(self) -> FrozenSet[str]:
        """containerd has no image without a name."""
        return frozenset()

    def remove(self, names: Sequence[str]) -> List[Removal]:
        """One ``ctr images rm --sync`` for all; the caller reads the runtime back to see."""
        if not names:
            return []
        self.ctr.run("images", "rm", "--sync", *names)
        return [Removal(n, GONE) for n in names]


class DockerImages:
    def __init__(self, api: DockerAPI) -> None:
        self.api = api

    @property
    def target(self) -> str:
        return f"docker:{self.api.host}"

    def describe(self) -> str:
        return f"docker at {self.api.host}"

    def in_use(self) -> InUse:
        return parse_containers_json(self.api.get_json("/containers/json?all=1"))

    def untagged(self) -> FrozenSet[str]:
        """Image IDs no tag names (a newer load took their tag)."""
        return parse_untagged(self.api.get_json("/images/json?all=1"))

    def remove(self, names: Sequence[str]) -> List[Removal]:
        """Each name (a tag, or an untagged image's ID) by ``DELETE /images/NAME``."""
        out = []
        for name in names:
            status, body = self.api.delete(f"/images/{quote(name, safe='/:@')}")
            if status in (200, 404):  # 404: gone already, which is what we wanted
                out.append(Removal(name, GONE))
            elif status == 409:
                out.append(Removal(name, BUSY, _message(body)))
            else:
                raise LoadError(f"docker API DELETE /images/{name} returned {status}: "
                                f"{_message(body)}", "check the docker daemon's logs")
        return out


def parse_podman_containers(body: object) -> InUse:
    """``podman ps -a --format json`` (nothing printed: no containers)."""
    if body is None:
        return InUse()
    return parse_containers_json(body, "podman ps printed", "check the --podman command")


def parse_podman_dangling(body: object) -> FrozenSet[str]:
    """``podman images --filter dangling=true --format json`` -> their image IDs."""
    if body is None:
        return frozenset()
    if not isinstance(body, list):
        raise LoadError(f"podman images printed {type(body).__name__}, not a list",
                        "check the --podman command")
    out = set()
    for image in body:
        ident = image.get("Id") if isinstance(image, dict) else None
        if isinstance(ident, str) and ident:
            out.add(ident if ident.startswith("sha256:") else "sha256:" + ident)
    return frozenset(out)


class PodmanImages:
    def __init__(self, podman: Podman) -> None:
        self.podman = podman

    @property
    def target(self) -> str:
        return f"podman:{self.podman.graph()[0]}"

    def describe(self) -> str:
        return self.podman.describe()

    def in_use(self) -> InUse:
        return parse_podman_containers(self.podman.json("ps", "-a", "--format", "json"))

    def untagged(self) -> FrozenSet[str]:
        return parse_podman_dangling(self.podman.json("images", "--filter", "dangling=true",
                                                      "--format", "json"))

    def remove(self, names: Sequence[str]) -> List[Removal]:
        """Each name (a tag, or a dangling image's ID) by ``podman rmi`` (never forced)."""
        out = []
        for name in names:
            ident = name[len("sha256:"):] if name.startswith("sha256:") else name
            done = self.podman.runner.run(self.podman.argv("rmi", ident), self.podman.timeout)
            text = last_line(done.stderr.decode(errors="replace"))
            if done.returncode == 0 or "image not known" in text:  # gone already: fine
                out.append(Removal(name, GONE))
            elif "in use by a container" in text:
                out.append(Removal(name, BUSY, text[:300]))
            else:
                raise LoadError(f"podman rmi {name} failed (exit {done.returncode}): "
                                f"{text or 'no message'}", "check podman's storage")
        return out


def _message(body: object) -> str:
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:300]
    return repr(body)[:300]


Images = Union[ContainerdImages, DockerImages, PodmanImages]


def images_of(runtime: object) -> Images:
    """The pruning side of a runtime ``usecases.device.open_runtime`` made."""
    if isinstance(runtime, ContainerdRuntime):
        return ContainerdImages(runtime.ctr)
    if isinstance(runtime, DockerRuntime):
        return DockerImages(runtime.api)
    if isinstance(runtime, PodmanRuntime):
        return PodmanImages(runtime.podman)
    raise TypeError(f"cannot prune a {type(runtime).__name__}")


__all__ = ["ContainerdImages", "DockerImages", "PodmanImages", "Images", "InUse", "Removal",
           "images_of", "parse_containers_json", "parse_containers_ls", "parse_untagged",
           "parse_podman_containers", "parse_podman_dangling", "GONE", "BUSY"]
