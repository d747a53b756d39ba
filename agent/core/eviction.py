"""Which snapshots to drain and delete (pure; the loop executes the result under the repo lock).

A model in use (a pod on this node selects it) is never drained or deleted, whatever its priority.
Deletion is always drain-then-delete: a snapshot chosen for eviction is unlabelled first (no new pod
lands there), then deleted only once no pod uses it and ``grace`` seconds have passed since the
drain began and since its last use; a pod that shows up meanwhile cancels the drain and the label
comes back. What gets drained, after kubelet's image GC:

1. models no longer desired (at once, unless ``keep_undesired``: then only under pressure, least
   recently used first);
2. above the high watermark: undesired models, least recently used first, down to the low watermark;
3. for a fill that needs room: undesired models first (LRU), then desired models of *strictly*
   lower priority than the one filling (lowest first). Equal or higher priority is never taken, so
   two models that do not fit together cannot take turns evicting each other; if the candidates
   cannot free enough, nothing is drained and the fill waits (``waiting-for-space``).

Desired models are never evicted by a watermark alone: they would only be filled again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """One snapshot on disk and who holds it."""

    repo: str
    commit: str
    blobs: frozenset[tuple[str, int]]  # (digest, size) of every file
    verified_at: float
    priority: int | None  # highest priority of the desired models that use it; None: no desired model does
    models: tuple[str, ...] = ()  # every model record that points at it (desired or not)
    in_use: bool = False
    last_used: float = 0.0  # wall time a pod last used one of its models (0: never seen in use)

    @property
    def key(self) -> tuple[str, str]:
        return (self.repo, self.commit)

    @property
    def lru(self) -> float:
        return max(self.last_used, self.verified_at)


@dataclass(frozen=True)
class Drain:
    """A snapshot being emptied of users before deletion: unlabelled since ``since`` (wall time)."""

    since: float
    reason: str
    kind: str = "undesired"  # undesired | watermark | priority (the evictions metric's reason label)


@dataclass(frozen=True)
class SpacePolicy:
    grace: float = 300.0  # seconds a drained snapshot waits, unused, before deletion
    min_age: float = 600.0  # never delete a snapshot verified less than this long ago
    keep_undesired: bool = False  # keep models no longer desired until space is needed
    high_watermark: float = 0.85  # of the budget (if set) or of the cache filesystem
    low_watermark: float = 0.75


@dataclass(frozen=True)
class Need:
    """A fill that ran out of room: ``shortfall`` more bytes for model ``name`` of ``priority``."""

    name: str
    priority: int
    shortfall: int


@dataclass
class SpacePlan:
    drains: dict[tuple[str, str], Drain] = field(default_factory=dict)
    delete: list[tuple[Candidate, Drain]] = field(default_factory=list)
    started: list[tuple[Candidate, Drain]] = field(default_factory=list)  # drains begun this pass
    cancelled: list[Candidate] = field(default_factory=list)  # drains ended by a pod using it again
    unmet: list[Need] = field(default_factory=list)  # fills that must wait: nothing may make room


def freed_by(chosen: Iterable[Candidate], everything: Sequence[Candidate]) -> int:
    """Bytes freed by removing ``chosen``: blobs no remaining snapshot of the same repo still uses."""
    gone = {c.key for c in chosen}
    kept: set[tuple[str, str]] = {(c.repo, d) for c in everything if c.key not in gone for d, _ in c.blobs}
    freed: dict[tuple[str, str], int] = {}
    for c in everything:
        if c.key in gone:
            for d, size in c.blobs:
                if (c.repo, d) not in kept:
                    freed[(c.repo, d)] = size
    return sum(freed.values())


def plan_eviction(
    candidates: Sequence[Candidate], shortfall: int, *, for_priority: int | None, now: float, min_age: float,
    already: Iterable[Candidate] = (),
) -> list[Candidate]:
    """Snapshots to drain, in order, so that with ``already`` (drains under way) ``shortfall`` bytes are freed.

    ``[]`` when even every eligible candidate would not free enough (draining some would only
    unlabel models for nothing). Undesired first, least recently used; then, only for a fill of
    ``for_priority``, desired ones of strictly lower priority, lowest first.
    """
    pool = [c for c in candidates if not c.in_use and now - c.verified_at >= min_age]
    undesired = sorted((c for c in pool if c.priority is None), key=lambda c: c.lru)
    lower = sorted((c for c in pool if c.priority is not None and for_priority is not None
                    and c.priority < for_priority), key=lambda c: (c.priority, c.lru))
    chosen = list(already)
    taken = {c.key for c in chosen}
    if freed_by(chosen, candidates) >= shortfall:
        return []
    added: list[Candidate] = []
    for c in [*undesired, *lower]:
        if c.key in taken:
            continue
        chosen.append(c)
        added.append(c)
        taken.add(c.key)
        if freed_by(chosen, candidates) >= shortfall:
            return added
    return []


def plan_space(
    candidates: Sequence[Candidate],
    drains: Mapping[tuple[str, str], Drain],
    needs: Sequence[Need],
    *,
    used: int,
    capacity: int,
    now: float,
    policy: SpacePolicy,
) -> SpacePlan:
    """Drains to start, keep or cancel, and snapshots to delete now. ``used``/``capacity``: watermark inputs."""
    out = SpacePlan()
    by_key = {c.key: c for c in candidates}
    for key, d in drains.items():  # keep drains whose snapshot still exists, nobody uses and is still unwanted
        c = by_key.get(key)
        if c is None:
            continue
        unwanted_again = d.kind in ("undesired", "watermark") and c.priority is not None
        no_need = d.kind == "priority" and not any(n.priority > (c.priority or 0) for n in needs)
        if c.in_use or unwanted_again or no_need:
            out.cancelled.append(c)  # a pod uses it, a desired model wants it again, or nobody needs the room now
            continue
        out.drains[key] = d

    def start(c: Candidate, reason: str, kind: str) -> None:
        if c.key not in out.drains and not c.in_use:
            d = Drain(now, reason, kind)
            out.drains[c.key] = d
            out.started.append((c, d))

    if not policy.keep_undesired:
        for c in candidates:
            if c.priority is None:
                start(c, "no longer desired", "undesired")
    if capacity > 0 and used > policy.high_watermark * capacity:
        excess = int(used - policy.low_watermark * capacity)
        draining = [by_key[k] for k in out.drains]
        if freed_by(draining, candidates) < excess:
            for c in plan_eviction(candidates, excess, for_priority=None, now=now, min_age=policy.min_age,
                                   already=draining) or _best_effort(candidates, now, policy):
                start(c, f"disk above the high watermark ({used} of {capacity} bytes used)", "watermark")
    for need in sorted(needs, key=lambda n: (-n.priority, n.name)):
        draining = [by_key[k] for k in out.drains]
        chosen = plan_eviction(candidates, need.shortfall, for_priority=need.priority, now=now,
                               min_age=policy.min_age, already=draining)
        if not chosen and freed_by(draining, candidates) < need.shortfall:
            out.unmet.append(need)
            continue
        for c in chosen:
            kind = "undesired" if c.priority is None else "priority"
            start(c, f"to make room for {need.name} (priority {need.priority})", kind)
    for key, d in out.drains.items():
        c = by_key[key]
        idle_since = max(d.since, c.last_used)
        if now - idle_since >= policy.grace and now - c.verified_at >= policy.min_age:
            out.delete.append((c, d))
    return out


def _best_effort(candidates: Sequence[Candidate], now: float, policy: SpacePolicy) -> list[Candidate]:
    """Above the high watermark and the low one is out of reach: still free what undesired models hold."""
    return [c for c in candidates if c.priority is None and not c.in_use and now - c.verified_at >= policy.min_age]
