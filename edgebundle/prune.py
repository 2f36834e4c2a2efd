"""Which images ``edgebundle prune`` removes: the retention policy, pure.

Only images edgebundle imported are candidates (``history``): a name the runtime holds
whose record says an import set it to exactly the digest it points at now. Of those:

1. **kept**: a name in ``--keep`` (the manifest's images for the site, compared as the
   runtime spells them: containerd by the normalised name, Docker by the tag
   ``naming.docker_tag`` gives it), and any other name for the same image in the same
   repository (containerd in ``k8s.io`` names each image ``repo@sha256:...`` too, and a
   pod pinned by digest needs that name);
2. **previous**: per repository of a kept name, the ``keep_previous`` most recently
   imported other images of that repository (by import order), for a rollback;
3. **in use**: any image a container uses, running or stopped -- by name, or by digest
   (target or config), so every name of that image stays;
4. the rest is **removed**.

Docker keeps an image whose tag a newer load took, untagged ("dangling"); one that
edgebundle imported is a candidate too, under its image ID, in the repository of the
name it had (so ``--keep-previous`` may keep it for a rollback). containerd has no such
images: a name moved elsewhere leaves its old content to the garbage collector.

Pure: no I/O. Device-safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Sequence, Set, Tuple

from .errors import UsageError
from .format import RUNTIME_DOCKER, RUNTIME_PODMAN
from .history import Imported
from .naming import comparable_name, docker_tag
from .reference import parse_reference

KEPT = "kept"  # named by --keep, or the same image as one that is
PREVIOUS = "previous"  # --keep-previous
IN_USE = "in-use"
REMOVE = "remove"


@dataclass(frozen=True)
class Present:
    """An image name the runtime holds now (from its inventory)."""

    name: str
    digest: str  # containerd: target digest; Docker: image ID
    config: str = ""


@dataclass(frozen=True)
class Decision:
    name: str
    digest: str
    verdict: str  # KEPT | PREVIOUS | IN_USE | REMOVE
    seq: int  # when it was imported (the history's order)
    was: str = ""  # an untagged Docker image (``name`` is its ID): the name it had

    def to_json(self) -> object:
        return {"name": self.name, "digest": self.digest, "verdict": self.verdict,
                "was": self.was or None}


@dataclass(frozen=True)
class InUse:
    """What the runtime's containers use: image names, and digests (Docker: image IDs)."""

    names: FrozenSet[str] = frozenset()
    digests: FrozenSet[str] = frozenset()


@dataclass(frozen=True)
class PrunePlan:
    decisions: Tuple[Decision, ...]

    def of(self, verdict: str) -> List[Decision]:
        return [d for d in self.decisions if d.verdict == verdict]

    @property
    def remove(self) -> List[Decision]:
        return self.of(REMOVE)


def check_keep(names: Sequence[str]) -> None:
    """``--keep`` names must be image references; none at all is refused.

    Without any, everything edgebundle imported would go: never what a scheduled job
    means (an empty manifest list is more likely a mistake than a wish).
    """
    if not names:
        raise UsageError("prune needs at least one --keep NAME (the images that must stay)",
                         "pass the manifest's images for this site, e.g. "
                         "--keep registry.example/shop/app:v2")
    for name in names:
        parse_reference(name)  # UsageError naming the bad reference


def _repository(name: str) -> str:
    try:
        return parse_reference(name).repository
    except UsageError:  # a name a runtime holds that we would never write
        return name


@dataclass(frozen=True)
class _Candidate:
    present: Present
    seq: int
    repo: str
    was: str = ""


#: Runtimes whose images are their image ID (the config digest), with tags for names
#: (a digest-pinned reference as ``naming.docker_tag`` spells it), where a moved tag
#: leaves the older image untagged: Docker and Podman. containerd names targets.
ID_RUNTIMES = (RUNTIME_DOCKER, RUNTIME_PODMAN)


def plan_prune(runtime: str, present: Iterable[Present], history: Iterable[Imported],
               keep: Sequence[str], keep_previous: int = 0,
               in_use: InUse = InUse(), untagged: Iterable[str] = ()) -> PrunePlan:
    """Decide, for every image edgebundle imported that the runtime still holds.

    ``untagged``: the image IDs no tag names (Docker's ``GET /images/json``, Podman's
    dangling images).
    """
    if keep_previous < 0:
        raise UsageError(f"--keep-previous {keep_previous} is negative", "pass 0 or more")
    by_id = runtime in ID_RUNTIMES
    present = list(present)
    history = list(history)
    wanted = {comparable_name(docker_tag(k) if by_id else k) for k in keep}
    ours: Dict[Tuple[str, str], int] = {}  # (comparable name, digest) -> import seq
    for entry in history:
        key = (comparable_name(entry.name), entry.digest)
        ours[key] = max(ours.get(key, 0), entry.seq)

    candidates: List[_Candidate] = []
    for p in present:
        seq = ours.get((comparable_name(p.name), p.digest))
        if seq is not None:
            candidates.append(_Candidate(p, seq, _repository(p.name)))
    orphaned = frozenset(untagged) - {p.digest for p in present} if by_id else frozenset()
    orphans: Dict[str, Imported] = {}  # image ID -> its newest entry
    for entry in history:
        if entry.digest in orphaned:
            if entry.digest not in orphans or orphans[entry.digest].seq < entry.seq:
                orphans[entry.digest] = entry
    for digest, entry in sorted(orphans.items()):
        candidates.append(_Candidate(Present(digest, digest, digest), entry.seq,
                                     _repository(entry.name), entry.name))

    # 1. kept: named, or the same image in the same repository as a named one
    kept_images: Set[Tuple[str, str]] = set()  # (repository, digest)
    kept_repos: Set[str] = set()
    for p in present:
        if comparable_name(p.name) in wanted:
            kept_images.add((_repository(p.name), p.digest))
            kept_repos.add(_repository(p.name))
    for k in keep:  # a kept name absent from the device still keeps its repository's previous
        kept_repos.add(_repository(docker_tag(k) if by_id else k))

    verdicts: Dict[str, str] = {}
    for c in candidates:
        if (c.repo, c.present.digest) in kept_images:
            verdicts[c.present.name] = KEPT

    # 2. previous: per kept repository, the newest other images (by digest), newest first
    newest: Dict[Tuple[str, str], int] = {}
    for c in candidates:
        if c.present.name not in verdicts:
            key = (c.repo, c.present.digest)
            newest[key] = max(newest.get(key, 0), c.seq)
    for repo in kept_repos:
        others = sorted((seq, digest) for (r, digest), seq in newest.items() if r == repo)
        chosen = {digest for _, digest in others[::-1][:keep_previous]}
        for c in candidates:
            if c.present.name not in verdicts and c.repo == repo and c.present.digest in chosen:
                verdicts[c.present.name] = PREVIOUS

    # 3. in use: a container's image by name, and every name of the same image
    used_names = {comparable_name(n) for n in in_use.names}
    # CRI also names an image by its bare ID (``sha256:<config>``), and may give that.
    used = set(in_use.digests) | {n for n in in_use.names if n.startswith("sha256:")}
    for p in present:
        if comparable_name(p.name) in used_names:
            used.add(p.digest)
            if p.config:
                used.add(p.config)
    decisions = []
    for c in candidates:
        p = c.present
        verdict = verdicts.get(p.name)
        if verdict is None:
            busy = comparable_name(p.name) in used_names or p.digest in used or \
                (bool(p.config) and p.config in used)
            verdict = IN_USE if busy else REMOVE
        decisions.append(Decision(p.name, p.digest, verdict, c.seq, c.was))
    decisions.sort(key=lambda d: (d.name, d.digest))
    return PrunePlan(tuple(decisions))
