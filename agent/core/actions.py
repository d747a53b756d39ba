"""The loop's decision, pure: (desired, disk snapshot, last statuses, finished fills, now) -> plan.

Every pass of the loop calls ``plan`` once. It returns the new statuses (the loop thread is their
only owner) and the actions to execute: labels, fills to queue or cancel, blobs to quarantine,
snapshots to evict, Events and metric observations. No I/O and no clock here, so every rule of
the state machine below is a unit test:

    pending  --queue-->  filling  --fill ok + scan ok-->  ready
       ^                    |  \\--fill ok, scan not ok / fill failed-->  failed (backoff)
       |                    |                                                |
       +----- spec changed -+-- ready, then a scan finds damage --> damaged (repair at once)

A model is ``ready`` only when its scan is ok: a record of the file set it was filled with that
satisfies the spec now, and every one of those files verified. A fill that "succeeded" but whose
scan is not ok counts as a failed attempt with backoff, so no model is ever refilled in a hot loop.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from agent.core.desired import DesiredState, ModelStatus
from agent.core.eviction import Candidate, plan_eviction
from agent.core.retry import RetryPolicy
from agent.core.snapshot import ModelDisk, NodeSnapshot
from agent.core.spec import ModelSpec

# How long a failed fill waits before the next attempt: 1 s, 3 s, 9 s ... capped at 5 min, +-20 %.
FILL_BACKOFF = RetryPolicy(attempts=1_000_000, base=1.0, factor=3.0, cap=300.0, jitter=0.2)


@dataclass(frozen=True)
class FillOutcome:
    """What a worker reports when a fill ends (it never touches statuses itself)."""

    name: str
    ok: bool
    cancelled: bool = False
    error: str = ""
    failures: tuple[tuple[str, str], ...] = ()  # (source kind, reason) per failed source attempt
    source: str = ""
    fetched_files: int = 0
    fetched_bytes: int = 0
    seconds: float = 0.0
    commit: str = ""
    level: str = ""
    shortfall: int = 0  # disk full: bytes missing, which eviction may free
    spec: ModelSpec | None = None  # the spec the fill worked for (the desired one may have changed since)
    repair: bool = False  # the fill was a repair of a model that had been ready


@dataclass(frozen=True)
class FillAction:
    name: str
    spec: ModelSpec
    pin: str | None
    repair: bool


@dataclass(frozen=True)
class Quarantine:
    """Delete blobs whose content failed, under the repo lock, after re-checking them."""

    name: str
    repo: str
    commit: str
    blobs: tuple[str, ...]


@dataclass(frozen=True)
class Evict:
    repo: str
    commit: str
    reason: str  # why, for the log and the Event
    models: tuple[str, ...] = ()  # desired models that lose their copy (Events go to them)


@dataclass(frozen=True)
class Event:
    name: str
    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class Count:
    """A metric observation for the executor to pass on: ``observer.<kind>(*args)``."""

    kind: str
    args: tuple[object, ...] = ()


@dataclass(frozen=True)
class Plan:
    statuses: Mapping[str, ModelStatus]
    ready: frozenset[str]
    fills: tuple[FillAction, ...] = ()
    cancels: tuple[str, ...] = ()
    quarantines: tuple[Quarantine, ...] = ()
    evictions: tuple[Evict, ...] = ()
    events: tuple[Event, ...] = ()
    counts: tuple[Count, ...] = ()
    wake_at: float | None = None  # earliest future moment something is due (a backoff ends)


@dataclass(frozen=True)
class Policy:
    """The knobs of the plan, from settings."""

    backoff: RetryPolicy = FILL_BACKOFF
    budget_bytes: int = 0  # 0: no budget; eviction only ever runs to fit a budget
    evict_min_age: float = 600.0
    wall_now: float = 0.0  # wall-clock seconds, for snapshot ages (verified_at is wall time)


@dataclass
class _Out:
    statuses: dict[str, ModelStatus] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)
    fills: list[FillAction] = field(default_factory=list)
    quarantines: list[Quarantine] = field(default_factory=list)
    evictions: list[Evict] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    counts: list[Count] = field(default_factory=list)


def plan(
    desired: DesiredState,
    snap: NodeSnapshot,
    prev: Mapping[str, ModelStatus],
    busy: frozenset[str],
    outcomes: Sequence[FillOutcome],
    now: float,
    policy: Policy = Policy(),
    rng: random.Random | None = None,
) -> Plan:
    """One pass's decision. ``busy``: models with a queued or running fill. ``now``: the loop's clock."""
    out = _Out()
    done = {o.name: o for o in outcomes}  # the latest outcome per model
    evicting: set[tuple[str, str]] = set()
    for name, spec in sorted(desired.models.items(), key=lambda kv: (-kv[1].priority, kv[0])):
        st = prev.get(name) or ModelStatus(name)
        if st.repo != spec.repo or st.revision != spec.revision:
            st = replace(st, repo=spec.repo, revision=spec.revision)
        disk = snap.models.get(name) or ModelDisk(name, None, ("not scanned yet",))
        st = _model(out, name, spec, desired.pins.get(name), st, disk, name in busy, done.get(name), now, policy,
                    rng, desired, snap, busy, evicting)
        out.statuses[name] = st
    for name, err in desired.errors.items():
        st = prev.get(name) or ModelStatus(name)
        if not (st.state == "invalid" and st.last_error == str(err)):  # news only once per distinct error
            out.events.append(Event(name, "InvalidSpec", str(err), warning=True))
        out.statuses[name] = replace(st, state="invalid", last_error=str(err))
    cancels = tuple(sorted(n for n in busy if n not in desired.models))
    due = [s.next_attempt for n, s in out.statuses.items()
           if s.state in ("failed", "pending") and n not in busy and s.next_attempt > now]
    return Plan(out.statuses, frozenset(out.ready), tuple(out.fills), cancels, tuple(out.quarantines),
                tuple(out.evictions), tuple(out.events), tuple(out.counts), min(due) if due else None)


def _set(st: ModelStatus, **changes: object) -> ModelStatus:
    """``replace`` only when something differs: most models are unchanged in most passes (1000s of them)."""
    if all(getattr(st, k) == v for k, v in changes.items()):
        return st
    return replace(st, **changes)  # type: ignore[arg-type]


def _model(
    out: _Out, name: str, spec: ModelSpec, pin: str | None, st: ModelStatus, disk: ModelDisk, busy: bool,
    outcome: FillOutcome | None, now: float, policy: Policy, rng: random.Random | None, desired: DesiredState,
    snap: NodeSnapshot, all_busy: frozenset[str], evicting: set[tuple[str, str]],
) -> ModelStatus:
    mismatch = disk.record.mismatch(spec, pin) if disk.record is not None else None
    ok = disk.ok and mismatch is None
    busy = busy and outcome is None  # an outcome this pass means its fill has ended
    if ok and not busy and outcome is None and st.state == "ready":  # the common case, kept cheap at 1000s
        out.ready.add(name)
        rec = disk.record
        assert rec is not None
        return _set(st, commit=rec.commit, bytes=disk.bytes, level=disk.level)

    if outcome is not None and not outcome.cancelled:
        if outcome.ok:
            kind = "Repaired" if outcome.repair else "FillSucceeded"
            out.counts.append(Count("fill_done", (outcome.source, outcome.fetched_bytes, outcome.seconds)))
            if outcome.repair:
                out.counts.append(Count("repaired"))
            out.events.append(Event(name, kind, f"{spec.repo}@{outcome.commit[:12]}: {outcome.fetched_files} files, "
                                    f"{outcome.fetched_bytes} bytes from {outcome.source} in {outcome.seconds:.1f}s "
                                    f"({outcome.level})"))
            st = replace(st, source=outcome.source, filled=True, repairing=False, last_error="")
        else:
            for kind, reason in outcome.failures:
                out.counts.append(Count("fill_failed", (kind, reason)))
            freed = _evict_for(out, name, spec, outcome, desired, snap, all_busy, policy, evicting)
            attempts = st.attempts + 1
            delay = 0.0 if freed else policy.backoff.delay(attempts, rng)
            out.events.append(Event(name, "FillFailed", outcome.error, warning=True))
            st = replace(st, state="failed", last_error=outcome.error, attempts=attempts, next_attempt=now + delay,
                         filled=False, progress=0.0)

    if busy:  # a fill is under way: its outcome decides (the files may already be in place)
        return st if st.state == "filling" else replace(st, state="filling", progress=0.0)
    if ok:
        out.ready.add(name)
        rec = disk.record
        assert rec is not None
        return _set(st, state="ready", commit=rec.commit, bytes=disk.bytes, level=disk.level, progress=1.0,
                    attempts=0, last_error="", next_attempt=0.0, repairing=False, filled=False)

    why = mismatch or "; ".join(disk.problems[:5]) or "not cached"
    if st.state == "ready":  # it was ready a pass ago: unlabel now, repair at once (no backoff)
        damaged = mismatch is None
        out.counts.append(Count("verify_failed", ("damaged" if damaged else "spec_changed",)))
        if damaged:
            out.events.append(Event(name, "VerifyFailed", f"{spec.repo}: {why}", warning=True))
            if disk.damaged_blobs and disk.record is not None:
                out.quarantines.append(Quarantine(name, spec.repo, disk.record.commit, disk.damaged_blobs))
        st = replace(st, state="damaged" if damaged else "pending", last_error=why if damaged else "",
                     repairing=damaged, next_attempt=0.0, attempts=0)
    elif st.filled and outcome is not None and outcome.spec not in (None, spec):
        st = replace(st, filled=False, state="pending", next_attempt=0.0)  # filled for an older spec: go again
    elif st.filled:  # the fill said ok, the scan disagrees: a failed attempt, with backoff
        attempts = st.attempts + 1
        error = f"filled, but not verified on disk: {why}"
        out.events.append(Event(name, "FillFailed", error, warning=True))
        out.counts.append(Count("verify_failed", ("after_fill",)))
        st = replace(st, state="failed", last_error=error, attempts=attempts, filled=False,
                     next_attempt=now + policy.backoff.delay(attempts, rng))
    if st.next_attempt <= now:
        out.fills.append(FillAction(name, spec, pin, repair=st.repairing or st.state == "damaged"))
        return replace(st, state="filling", progress=0.0)
    return st


def _evict_for(
    out: _Out, name: str, spec: ModelSpec, outcome: FillOutcome, desired: DesiredState, snap: NodeSnapshot,
    busy: frozenset[str], policy: Policy, evicting: set[tuple[str, str]],
) -> bool:
    """A fill that ran out of budget: plan evictions that free its shortfall (True if any were planned)."""
    if outcome.shortfall <= 0 or policy.budget_bytes <= 0:
        return False
    holders: dict[tuple[str, str], list[str]] = {}
    for n, s in desired.models.items():
        d = snap.models.get(n)
        if d is not None and d.record is not None and d.record.repo == s.repo:
            holders.setdefault((s.repo, d.record.commit), []).append(n)
    busy_repos = {desired.models[n].repo for n in busy if n in desired.models and n != name}
    cands = []
    for s in snap.snapshots:
        key = (s.repo, s.commit)
        if s.repo in busy_repos or key in evicting:
            continue
        users = holders.get(key)
        prio = max(desired.models[n].priority for n in users) if users else None
        cands.append(Candidate(s.repo, s.commit, s.blobs, s.verified_at, prio))
    chosen = plan_eviction(cands, outcome.shortfall, for_priority=spec.priority, now=policy.wall_now,
                           min_age=policy.evict_min_age)
    for c in chosen:
        evicting.add((c.repo, c.commit))
        users = tuple(holders.get((c.repo, c.commit), ()))
        out.evictions.append(Evict(c.repo, c.commit, f"to make room for {name} (priority {spec.priority})", users))
        out.counts.append(Count("evicted"))
    return bool(chosen)
