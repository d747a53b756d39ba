"""The loop's decision, pure: (desired, disk snapshot, last statuses, finished fills, now) -> plan.

Every pass of the loop calls ``plan`` once. It returns the new statuses (the loop thread is their
only owner) and the actions to execute: labels, fills to queue or cancel, blobs to quarantine,
snapshots to evict, Events and metric observations. No I/O and no clock here, so every rule of
the state machine below is a unit test:

    pending  --queue-->  filling  --fill ok + scan ok-->  ready  --chosen for eviction-->  draining
       ^                    |  \\--fill ok, scan not ok / fill failed-->  failed (backoff)       |
       |                    \\--out of room-->  waiting-for-space (until an eviction frees it)  |
       +----- spec changed -+-- ready, then a scan finds damage --> damaged (repair at once)   |
                                                   a pod uses it again: drain cancelled, ready <+

A model is ``ready`` only when its scan is ok: a record of the file set it was filled with that
satisfies the spec now, and every one of those files verified. A fill that "succeeded" but whose
scan is not ok counts as a failed attempt with backoff, so no model is ever refilled in a hot loop.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from agent.core.desired import DesiredState, ModelStatus
from agent.core.eviction import Candidate, Drain, Need, SpacePlan, SpacePolicy, plan_space
from agent.core.retry import RetryPolicy
from agent.core.snapshot import ModelDisk, NodeSnapshot
from agent.core.spec import ModelSpec, is_commit

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
    shortfall: int = 0  # out of room: bytes missing, which eviction may free
    spec: ModelSpec | None = None  # the spec the fill worked for (the desired one may have changed since)
    repair: bool = False  # the fill was a repair of a model that had been ready
    peer_bytes: int = 0  # of fetched_bytes, delivered by peers though the fill's source is an origin


@dataclass(frozen=True)
class FillAction:
    name: str
    spec: ModelSpec
    pin: str | None
    repair: bool
    distrust: tuple[str, ...] = ()  # blobs whose content failed: deleted under the fill's lock, never reused


@dataclass(frozen=True)
class Quarantine:
    """Delete blobs whose content failed, under the repo lock, after re-checking them."""

    name: str
    repo: str
    commit: str
    blobs: tuple[str, ...]


@dataclass(frozen=True)
class Evict:
    """Delete one drained snapshot (under the repo lock) and the records of ``models``."""

    repo: str
    commit: str
    reason: str  # why, for the log and the Event
    models: tuple[str, ...] = ()  # the model records that pointed at it
    kind: str = "undesired"  # undesired | watermark | priority: the evictions metric's reason


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
    drains: Mapping[tuple[str, str], Drain] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    """The knobs of the plan, from settings."""

    backoff: RetryPolicy = FILL_BACKOFF
    space: SpacePolicy = field(default_factory=SpacePolicy)
    wall_now: float = 0.0  # wall-clock seconds: snapshot ages, drains and last use are wall time


@dataclass(frozen=True)
class Usage:
    """Who uses what on this node: models a pod selects now, and when each was last seen in use."""

    in_use: frozenset[str] = frozenset()
    last_used: Mapping[str, float] = field(default_factory=dict)
    known: bool = True  # False until the pod watch listed once: drains may start, nothing is deleted


@dataclass
class _Out:
    statuses: dict[str, ModelStatus] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)
    fills: list[FillAction] = field(default_factory=list)
    quarantines: list[Quarantine] = field(default_factory=list)
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
    *,
    usage: Usage = Usage(),
    drains: Mapping[tuple[str, str], Drain] | None = None,
) -> Plan:
    """One pass's decision. ``busy``: models with a queued or running fill. ``now``: the loop's clock."""
    out = _Out()
    done = {o.name: o for o in outcomes}  # the latest outcome per model
    cands = candidates(desired, snap, usage)
    needs = [Need(n, s.priority, st.need_bytes) for n, s in desired.models.items()
             if (st := prev.get(n)) is not None and st.state == "waiting-for-space" and st.need_bytes > 0]
    needs += [Need(o.name, desired.models[o.name].priority, o.shortfall) for o in outcomes
              if o.shortfall > 0 and o.name in desired.models and not o.cancelled]
    if desired.synced:
        space = plan_space(cands, drains or {}, needs, used=snap.disk.used, capacity=snap.disk.capacity,
                           now=policy.wall_now, policy=policy.space)
    else:  # the desired set is not known yet (no list from the API so far): nothing is unwanted yet
        space = SpacePlan(drains=dict(drains or {}))
    if not usage.known:
        space.delete = []  # who uses what is not known yet: a model in use must never be deleted
    unmet = {n.name for n in space.unmet}
    freeing = bool(space.delete)
    for name, spec in sorted(desired.models.items(), key=lambda kv: (-kv[1].priority, kv[0])):
        st = prev.get(name) or ModelStatus(name)
        if st.repo != spec.repo or st.revision != spec.revision:
            st = replace(st, repo=spec.repo, revision=spec.revision)
        in_use = name in usage.in_use
        if st.in_use != in_use:
            st = replace(st, in_use=in_use)
        disk = snap.models.get(name) or ModelDisk(name, None, ("not scanned yet",))
        draining = disk.record is not None and (disk.record.repo, disk.record.commit) in space.drains \
            and disk.record.same_commit(spec, desired.pins.get(name))
        st = _model(out, name, spec, desired.pins.get(name), st, disk, name in busy, done.get(name), now, policy,
                    rng, draining=draining, unmet=name in unmet, freeing=freeing)
        out.statuses[name] = st
    for name, err in desired.errors.items():
        st = prev.get(name) or ModelStatus(name)
        if not (st.state == "invalid" and st.last_error == str(err)):  # news only once per distinct error
            out.events.append(Event(name, "InvalidSpec", str(err), warning=True))
        out.statuses[name] = replace(st, state="invalid", last_error=str(err))
    evictions = _space_actions(out, space, desired)
    cancels = tuple(sorted(n for n in busy if n not in desired.models))
    due = [s.next_attempt for n, s in out.statuses.items()
           if s.state in ("failed", "pending", "waiting-for-space") and n not in busy and s.next_attempt > now]
    return Plan(out.statuses, frozenset(out.ready), tuple(out.fills), cancels, tuple(out.quarantines),
                evictions, tuple(out.events), tuple(out.counts), min(due) if due else None, space.drains)


def candidates(desired: DesiredState, snap: NodeSnapshot, usage: Usage) -> list[Candidate]:
    """Every snapshot on disk with its holders: which records point at it, which desired models want it.

    A desired model holds a snapshot when its record points there and it still wants that commit, or
    when it wants exactly that commit (pinned, or a 40-hex revision) and is waiting to be (re)filled. A
    repo none of whose snapshots has any record (a cache from before records existed) is held whole by its
    desired models until their first fill writes records; after that an old commit is just undesired.
    """
    holders: dict[tuple[str, str], list[str]] = {}
    recorded_repos: set[str] = set()
    for name, rec in snap.records.items():
        holders.setdefault((rec.repo, rec.commit), []).append(name)
        recorded_repos.add(rec.repo)
    wanted: dict[tuple[str, str], list[int]] = {}  # (repo, commit) -> priorities of desired models wanting it
    legacy: dict[str, int] = {}
    for n, s in desired.models.items():
        rec = snap.records.get(n)
        if rec is not None and rec.same_commit(s, desired.pins.get(n)):
            wanted.setdefault((rec.repo, rec.commit), []).append(s.priority)
        commit = s.revision if is_commit(s.revision) else desired.pins.get(n)
        if commit:
            wanted.setdefault((s.repo, commit), []).append(s.priority)
        if s.repo not in recorded_repos:
            legacy[s.repo] = max(legacy.get(s.repo, s.priority), s.priority)
    out = []
    for sn in snap.snapshots:
        models = tuple(sorted(holders.get((sn.repo, sn.commit), [])))
        prios = wanted.get((sn.repo, sn.commit), [])
        if not prios and sn.repo in legacy:
            prios = [legacy[sn.repo]]
        last = max((usage.last_used.get(n, 0.0) for n in models), default=0.0)
        out.append(Candidate(sn.repo, sn.commit, sn.blobs, sn.verified_at, max(prios) if prios else None,
                             models, any(n in usage.in_use for n in models), last))
    return out


def _space_actions(out: _Out, space: SpacePlan, desired: DesiredState) -> tuple[Evict, ...]:
    for c, d in space.started:
        for n in c.models:
            if n in desired.models:
                out.events.append(Event(n, "Draining", f"{c.repo}@{c.commit[:12]} unlabelled for eviction "
                                        f"{d.reason}; deleted once no pod uses it", warning=True))
    for c in space.cancelled:
        for n in c.models:
            if n in desired.models:
                out.events.append(Event(n, "DrainCancelled", f"{c.repo}@{c.commit[:12]} is in use again: kept"))
    # the executor reports "Evicted" once the delete really happened (the repo lock may be busy this pass)
    return tuple(Evict(c.repo, c.commit, d.reason, tuple(n for n in c.models if n in desired.models), d.kind)
                 for c, d in space.delete)


def _set(st: ModelStatus, **changes: object) -> ModelStatus:
    """``replace`` only when something differs: most models are unchanged in most passes (1000s of them)."""
    if all(getattr(st, k) == v for k, v in changes.items()):
        return st
    return replace(st, **changes)  # type: ignore[arg-type]


def _model(
    out: _Out, name: str, spec: ModelSpec, pin: str | None, st: ModelStatus, disk: ModelDisk, busy: bool,
    outcome: FillOutcome | None, now: float, policy: Policy, rng: random.Random | None, *,
    draining: bool, unmet: bool, freeing: bool,
) -> ModelStatus:
    mismatch = disk.record.mismatch(spec, pin) if disk.record is not None else None
    ok = disk.ok and mismatch is None
    busy = busy and outcome is None  # an outcome this pass means its fill has ended
    if ok and not draining and not busy and outcome is None and st.state == "ready":  # the common case, cheap
        out.ready.add(name)
        rec = disk.record
        assert rec is not None
        return _set(st, commit=rec.commit, bytes=disk.bytes, level=disk.level)

    if outcome is not None and not outcome.cancelled:
        if outcome.ok:
            kind = "Repaired" if outcome.repair else "FillSucceeded"
            out.counts.append(Count("fill_done", (outcome.source, outcome.fetched_bytes - outcome.peer_bytes,
                                                  outcome.seconds)))
            if outcome.peer_bytes:
                out.counts.append(Count("fill_bytes_from", ("peers", outcome.peer_bytes)))
            if outcome.repair:
                out.counts.append(Count("repaired"))
            if st.waiting_since:
                out.counts.append(Count("space_waited", (max(now - st.waiting_since, 0.0),)))
            out.events.append(Event(name, kind, f"{spec.repo}@{outcome.commit[:12]}: {outcome.fetched_files} files, "
                                    f"{outcome.fetched_bytes} bytes from {outcome.source} in {outcome.seconds:.1f}s "
                                    f"({outcome.level})"))
            st = replace(st, source=outcome.source, filled=True, repairing=False, last_error="", need_bytes=0,
                         waiting_since=0.0)
        elif outcome.shortfall > 0:  # out of room: wait for an eviction (or for space freed by others)
            if not st.need_bytes or unmet != st.last_error.startswith("nothing may be evicted"):  # news once
                why = ("nothing may be evicted for it (models in use, or of equal or higher priority)" if unmet
                       else "models are being drained to make room")
                out.events.append(Event(name, "WaitingForSpace", f"{outcome.error}; {why}", warning=True))
                st = replace(st, last_error=("nothing may be evicted: " if unmet else "") + outcome.error)
            for kind, reason in outcome.failures:
                out.counts.append(Count("fill_failed", (kind, reason)))
            attempts = st.attempts + 1  # each retry waits longer (up to a minute): an eviction retries at once
            st = replace(st, state="waiting-for-space", need_bytes=outcome.shortfall, filled=False, progress=0.0,
                         waiting_since=st.waiting_since or now, attempts=attempts,
                         next_attempt=now + min(policy.backoff.delay(attempts, rng), 60.0))
        else:
            for kind, reason in outcome.failures:
                out.counts.append(Count("fill_failed", (kind, reason)))
            attempts = st.attempts + 1
            out.events.append(Event(name, "FillFailed", outcome.error, warning=True))
            st = replace(st, state="failed", last_error=outcome.error, attempts=attempts, filled=False, progress=0.0,
                         next_attempt=now + policy.backoff.delay(attempts, rng), need_bytes=0, waiting_since=0.0)

    if busy:  # a fill is under way: its outcome decides (the files may already be in place)
        return st if st.state == "filling" else replace(st, state="filling", progress=0.0)
    if draining:  # unlabelled until deleted, unless a pod uses it again (the drain is then cancelled)
        return _set(st, state="draining", filled=False)
    if ok:
        out.ready.add(name)
        rec = disk.record
        assert rec is not None
        return _set(st, state="ready", commit=rec.commit, bytes=disk.bytes, level=disk.level, progress=1.0,
                    attempts=0, last_error="", next_attempt=0.0, repairing=False, filled=False, need_bytes=0,
                    waiting_since=0.0)
    if st.state == "waiting-for-space":
        if freeing or st.next_attempt <= now:  # an eviction runs this pass (before fills), or a periodic retry
            out.fills.append(FillAction(name, spec, pin, repair=st.repairing, distrust=disk.damaged_blobs))
            return replace(st, state="filling", progress=0.0, next_attempt=0.0)
        return st

    why = mismatch or "; ".join(disk.problems[:5]) or "not cached"
    if disk.damaged_blobs and disk.record is not None and st.state != "ready":  # (ready: planned just below)
        out.quarantines.append(Quarantine(name, spec.repo, disk.record.commit, disk.damaged_blobs))
    if st.state == "draining":  # evicted (its record went with the snapshot): it waits for room, it does not
        # race the model it made room for (its first retry comes after the normal backoff, or an eviction)
        st = replace(st, state="waiting-for-space", need_bytes=max(st.bytes, 1), waiting_since=now, attempts=1,
                     last_error="evicted to make room; waiting for space", next_attempt=now + min(
                         policy.backoff.delay(1, rng), 60.0))
        return st
    elif st.state == "ready":  # labelled a pass ago: unlabel now, repair at once (no backoff)
        damaged = mismatch is None and disk.record is not None
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
        out.fills.append(FillAction(name, spec, pin, repair=st.repairing or st.state == "damaged",
                                    distrust=disk.damaged_blobs))
        return replace(st, state="filling", progress=0.0)
    return st
