"""What this node should hold: the desired-state value and the pure planning over it.

Providers (a models file, CachedModel CRs) produce a ``DesiredState``; ``plan_actions`` compares it
with what is verified on disk and what is in flight, and returns the actions to take. No I/O here.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.core.spec import ModelSpec
from agent.errors import SpecError

ModelState = Literal["pending", "filling", "ready", "failed", "damaged", "invalid"]


@dataclass(frozen=True)
class DesiredState:
    """Models wanted on this node, specs that could not be used, and cluster-wide commit pins."""

    models: Mapping[str, ModelSpec] = field(default_factory=dict)
    errors: Mapping[str, SpecError] = field(default_factory=dict)
    pins: Mapping[str, str] = field(default_factory=dict)
    synced: bool = True  # False until the provider has listed once (labels are not removed before that)


@dataclass
class ModelStatus:
    """One model's state on this node: what the status annotation, metrics and `status` show."""

    name: str
    repo: str = ""
    revision: str = ""
    state: ModelState = "pending"
    commit: str = ""
    bytes: int = 0
    progress: float = 0.0
    level: str = ""
    last_error: str = ""
    source: str = ""
    attempts: int = 0
    next_attempt: float = 0.0  # monotonic seconds; 0 means now
    repairing: bool = False  # was ready, then damaged: the next successful fill is a repair

    def compact(self) -> dict[str, object]:
        d: dict[str, object] = {"state": self.state}
        if self.commit:
            d["commit"] = self.commit[:12]
        if self.bytes:
            d["bytes"] = self.bytes
        if self.state == "filling":
            d["progress"] = round(self.progress, 3)
        if self.level:
            d["level"] = self.level
        if self.last_error:
            d["error"] = self.last_error[:200]
        return d


@dataclass(frozen=True)
class Actions:
    ready: frozenset[str]  # names to label ready (complete and verified now)
    enqueue: tuple[str, ...]  # names to fill or repair
    forget: tuple[str, ...]  # names no longer desired


def plan_actions(
    desired: Mapping[str, ModelSpec],
    verified: Mapping[str, bool],
    in_flight: set[str],
    statuses: Mapping[str, ModelStatus],
    now: float,
) -> Actions:
    """Level-triggered decision: label what is verified, fill what is not (respecting backoff)."""
    ready = frozenset(n for n in desired if verified.get(n))
    enqueue = tuple(
        n for n in sorted(desired, key=lambda n: -desired[n].priority)
        if not verified.get(n) and n not in in_flight
        and (n not in statuses or statuses[n].next_attempt <= now)
    )
    forget = tuple(n for n in statuses if n not in desired)
    return Actions(ready, enqueue, forget)


def backoff_delay(attempts: int, steps: tuple[float, ...], rng: random.Random | None = None) -> float:
    """The n-th retry delay from the settings' sequence, with +-20 % jitter so nodes do not sync up."""
    base = steps[min(max(attempts - 1, 0), len(steps) - 1)]
    r = rng or random
    return base * (0.8 + 0.4 * r.random())
