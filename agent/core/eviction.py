"""Which snapshots to evict when the disk budget is hit (pure; the store executes the plan).

Policy, after kubelet's image GC: models no longer desired go first, oldest first, but never one
verified less than ``min_age`` ago; then, only to make room for a model of higher priority, desired
models of strictly lower priority (lowest first). Equal or higher priority is never evicted, so two
models that do not fit together cannot take turns evicting each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    repo: str
    commit: str
    blobs: frozenset[tuple[str, int]]  # (digest, size) of every file
    verified_at: float
    priority: int | None  # None: no desired model uses it


def plan_eviction(
    candidates: Sequence[Candidate], shortfall: int, *, for_priority: int, now: float, min_age: float,
) -> list[Candidate]:
    """The snapshots to remove, in order, to free at least ``shortfall`` bytes ([] if impossible)."""
    undesired = sorted((c for c in candidates if c.priority is None and now - c.verified_at >= min_age),
                       key=lambda c: c.verified_at)
    lower = sorted((c for c in candidates if c.priority is not None and c.priority < for_priority),
                   key=lambda c: (c.priority, c.verified_at))
    chosen: list[Candidate] = []
    for c in [*undesired, *lower]:
        if _freed(chosen, candidates) >= shortfall:
            break
        chosen.append(c)
    return chosen if _freed(chosen, candidates) >= shortfall else []


def _freed(chosen: Sequence[Candidate], everything: Sequence[Candidate]) -> int:
    """Bytes freed by removing ``chosen``: blobs no remaining snapshot of the same repo still uses."""
    gone = {(c.repo, c.commit) for c in chosen}
    kept: set[tuple[str, str]] = {(c.repo, d) for c in everything if (c.repo, c.commit) not in gone
                                  for d, _ in c.blobs}
    freed: dict[tuple[str, str], int] = {}
    for c in chosen:
        for d, size in c.blobs:
            if (c.repo, d) not in kept:
                freed[(c.repo, d)] = size
    return sum(freed.values())
