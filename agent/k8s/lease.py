"""``coordination.k8s.io/v1`` Leases: read, acquire, renew, release, with optimistic concurrency.

The building block for the leader election (``agent.k8s.leader``) and for anything else that must
be held by at most one agent at a time, e.g. the peers source's origin slots (at most N holders
per model: N Leases ``<model>-slot-0..N-1``, each taken with ``acquire`` and given back with
``release``, expiring on their own when the holder dies).

Every write is a compare-and-swap: an update carries the resourceVersion we read, a create fails
with 409 when someone created first. Losing a race is a normal answer (``None``), not an error.

Clocks, and what we rely on
---------------------------
``renewTime`` and ``acquireTime`` are written from the *writer's* wall clock and are only for
people (``kubectl get lease -o yaml``). Agents never compare them with their own clock, so an
offset between node clocks (minutes, hours) changes nothing. Expiry is judged by the observer
alone: an :class:`Observation` records, on the observer's monotonic clock, when it last saw the
Lease change (holder, renewTime or resourceVersion); the holder is presumed alive until
``seen + leaseDurationSeconds`` by that same clock. A Lease that disappears (deleted) is not a
sign of life: its last holder is still presumed alive until its last renewal's expiry.

The holder on its side stops acting ``renew_deadline`` seconds after it *sent* its last
successful renewal (before the server stored it, so before anyone can have observed it). A
follower acts no earlier than ``duration - acquire_jitter`` after observing that renewal. With
``renew_deadline < duration - acquire_jitter`` (validated in settings) the two never overlap as
long as the clocks' *rates* differ by less than ``(duration - jitter - deadline) / duration``
(default (15 - 1 - 12) / 15 = 13 %; real clocks differ by parts per million). Offsets do not
matter at all. The leader's deadline runs on CLOCK_BOOTTIME, which keeps counting through a
suspended VM, so a leader frozen past its deadline knows it when it wakes. What still can overlap:
a process paused (SIGSTOP, a long GC) between its last deadline check and its write. Writes
guarded by resourceVersion (the CachedModel status writes) turn such a late write into a 409
instead of a lost update; tests/test_k8s_aggregator.py shows it with two leaders at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from agent.core.retry import RetryPolicy
from agent.errors import KubeApiError, KubeConflictError
from agent.k8s.client import KubeApi, request

log = structlog.get_logger("agent.k8s.lease")


def micro_time(wall: float) -> str:
    """A Kubernetes MicroTime from seconds since the epoch."""
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseRecord:
    """One Lease as read from the API server (``holder`` "" when free or released)."""

    name: str
    holder: str
    duration: float
    acquire_time: str
    renew_time: str
    transitions: int
    resource_version: str

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> LeaseRecord:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        return cls(
            name=str(meta.get("name", "")),
            holder=str(spec.get("holderIdentity") or ""),
            duration=float(spec.get("leaseDurationSeconds") or 0),
            acquire_time=str(spec.get("acquireTime") or ""),
            renew_time=str(spec.get("renewTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=str(meta.get("resourceVersion", "")),
        )

    @property
    def fingerprint(self) -> tuple[str, str, str]:
        """What changes on every write; a change is a sign of life of the holder."""
        return self.holder, self.renew_time, self.resource_version


@dataclass(frozen=True)
class Observation:
    """What this observer knows about one Lease, timed on its own monotonic clock (pure value)."""

    holder: str  # "" = free: released, or never existed
    duration: float
    seen: float  # when the holder last showed life, by the observer's clock
    record: LeaseRecord | None  # None: no Lease object (never created, or deleted)

    def expires(self) -> float:
        return self.seen + self.duration

    def free_for(self, identity: str, now: float, *, early: float = 0.0) -> bool:
        """True when ``identity`` may take the Lease at ``now`` (free, ours, or expired ``early`` seconds ago)."""
        return self.holder in ("", identity) or now >= self.expires() - early


def observe(prev: Observation | None, record: LeaseRecord | None, now: float) -> Observation:
    """Fold a fresh read (or watch event) into what we knew (pure).

    The observation time moves only when the Lease changed. A first sight counts as "just renewed"
    (we cannot know how old it is without trusting another node's clock); a deletion keeps the
    last holder and its last sign of life.
    """
    if record is None:
        if prev is None:
            return Observation("", 0.0, now, None)
        return replace(prev, record=None)
    if prev is not None and prev.record is not None and prev.record.fingerprint == record.fingerprint:
        return prev
    return Observation(record.holder, record.duration, now, record)


class LeaseLost(KubeApiError):
    """Our renewal found the Lease held by someone else (or could not recreate it)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=409, permanent=True)


ONE_TRY = RetryPolicy(attempts=1)


class LeaseStore:
    """Lease reads and CAS writes in one namespace.

    ``policy`` defaults to a single try: a holder's renewal must not sit in retries past its own
    deadline, so the elector paces its own retries. Other users (origin slots) may pass the API policy.
    """

    def __init__(self, api: KubeApi, namespace: str, *, stop: threading.Event | None = None,
                 wall: Callable[[], float] = time.time, policy: RetryPolicy = ONE_TRY) -> None:
        self.api = api
        self.namespace = namespace
        self.stop = stop
        self.wall = wall  # only written into the Lease for people to read (see module doc)
        self.policy = policy

    def _body(self, name: str, holder: str, duration: float, *, acquired: str, transitions: int,
              resource_version: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name, "namespace": self.namespace}
        if resource_version:
            meta["resourceVersion"] = resource_version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": max(1, round(duration)),
                "acquireTime": acquired,
                "renewTime": micro_time(self.wall()),
                "leaseTransitions": transitions,
            },
        }

    def get(self, name: str) -> LeaseRecord | None:
        try:
            obj = request(self.api, self.api.coordination.read_namespaced_lease, name, self.namespace,
                          what=f"get lease {self.namespace}/{name}", stop=self.stop, policy=self.policy)
        except KubeApiError as e:
            if e.status == 404:
                return None
            raise
        return LeaseRecord.from_obj(obj)

    def create(self, name: str, holder: str, duration: float, *, timeout: float | None = None) -> LeaseRecord | None:
        """Create the Lease held by ``holder``; None when it already exists (someone was first)."""
        body = self._body(name, holder, duration, acquired=micro_time(self.wall()), transitions=0,
                          resource_version=None)
        try:
            obj = request(self.api, self.api.coordination.create_namespaced_lease, self.namespace, body,
                          what=f"create lease {self.namespace}/{name}", stop=self.stop, timeout=timeout,
                          policy=self.policy)
        except KubeConflictError:
            return None
        return LeaseRecord.from_obj(obj)

    def update(self, current: LeaseRecord, holder: str, duration: float, *,
               timeout: float | None = None) -> LeaseRecord | None:
        """Write ``holder`` over ``current`` (CAS on its resourceVersion); None when it changed or is gone."""
        changed = holder != current.holder
        acquired = micro_time(self.wall()) if changed or not current.acquire_time else current.acquire_time
        body = self._body(current.name, holder, duration, acquired=acquired,
                          transitions=current.transitions + (1 if changed and holder else 0),
                          resource_version=current.resource_version)
        try:
            obj = request(self.api, self.api.coordination.replace_namespaced_lease, current.name,
                          self.namespace, body, what=f"update lease {self.namespace}/{current.name}",
                          stop=self.stop, timeout=timeout, policy=self.policy)
        except KubeConflictError:
            return None
        except KubeApiError as e:
            if e.status == 404:
                return None
            raise
        return LeaseRecord.from_obj(obj)

    # ---- the three operations holders use ------------------------------------------------------
    def acquire(self, name: str, identity: str, duration: float, seen: Observation, now: float, *,
                early: float = 0.0, timeout: float | None = None) -> LeaseRecord | None:
        """Take the Lease if ``seen`` says it is free or expired; None when not (yet) ours to take or lost."""
        if not seen.free_for(identity, now, early=early):
            return None
        if seen.record is None:
            return self.create(name, identity, duration, timeout=timeout)
        return self.update(seen.record, identity, duration, timeout=timeout)

    def renew(self, held: LeaseRecord, identity: str, duration: float, *,
              timeout: float | None = None) -> LeaseRecord:
        """Renew a Lease we hold; raises LeaseLost when someone else holds it now.

        A 409 is re-read once: when the Lease still names us (our previous renewal landed but its
        answer was lost) we renew on the new version. A deleted Lease is recreated (we still hold
        it by our own reckoning, and others wait out its duration since our last renewal).
        """
        rec = self.update(held, identity, duration, timeout=timeout)
        if rec is not None:
            return rec
        current = self.get(held.name)
        if current is None:
            created = self.create(held.name, identity, duration, timeout=timeout)
            if created is None:
                raise LeaseLost(f"lease {self.namespace}/{held.name}: recreated by someone else")
            log.warning("lease.recreated", lease=held.name, holder=identity)
            return created
        if current.holder != identity:
            raise LeaseLost(f"lease {self.namespace}/{held.name}: now held by {current.holder or 'nobody'}")
        rec = self.update(current, identity, duration, timeout=timeout)
        if rec is None:
            raise LeaseLost(f"lease {self.namespace}/{held.name}: still conflicting")
        return rec

    def release(self, held: LeaseRecord, identity: str) -> bool:
        """Give the Lease back (holder ""), so others need not wait out its duration; best effort."""
        try:
            return self.update(held, "", held.duration or 1, timeout=self.api.request_timeout) is not None
        except KubeApiError as e:
            log.warning("lease.release_failed", lease=held.name, holder=identity, error=str(e))
            return False
