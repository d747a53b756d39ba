"""What this node should hold (``DesiredState``) and what the loop concluded per model (``ModelStatus``).

Providers (a models file, CachedModel CRs) produce a ``DesiredState``; the pure plan
(``agent.core.actions``) turns it, the disk snapshot and the last statuses into new statuses and
actions. Statuses are frozen: only the loop thread makes new ones; everyone else reads a snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent.core.spec import ModelSpec
from agent.errors import SpecError

ModelState = Literal["pending", "filling", "ready", "failed", "damaged", "invalid", "draining", "waiting-for-space"]
STATES: tuple[ModelState, ...] = ("pending", "filling", "ready", "failed", "damaged", "invalid", "draining",
                                  "waiting-for-space")


@dataclass(frozen=True)
class DesiredState:
    """Models wanted on this node, specs that could not be used, and cluster-wide commit pins."""

    models: Mapping[str, ModelSpec] = field(default_factory=dict)
    errors: Mapping[str, SpecError] = field(default_factory=dict)
    pins: Mapping[str, str] = field(default_factory=dict)
    synced: bool = True  # False until the provider has listed once (labels are not removed before that)


@dataclass(frozen=True)
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
    next_attempt: float = 0.0  # loop clock seconds; 0 means now
    repairing: bool = False  # was ready, then damaged: the next successful fill is a repair
    filled: bool = False  # a fill just reported success: the next scan must confirm it (else it failed)
    need_bytes: int = 0  # waiting-for-space: how many more bytes the fill needs
    waiting_since: float = 0.0  # loop clock when it started waiting for space (for the wait-time metric)
    in_use: bool = False  # a pod on this node uses it (never drained or evicted)

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
        if self.source:
            d["source"] = self.source.split(":", 1)[0]  # the kind only: a label could name a host
        if self.last_error:
            d["error"] = self.last_error[:200]
        if self.in_use:
            d["inUse"] = True
        return d
