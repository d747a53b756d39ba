"""Leader election on one Lease: which agent writes the cluster-wide CachedModel status.

Why not ``kubernetes.leaderelection``: its loops sleep with ``time.sleep`` (no stop, so SIGTERM
waits), it builds its own default ApiClient (no QPS limit, no node User-Agent), it measures the
renew deadline on the wall clock (a clock step is a leadership change), followers poll the Lease
with a GET every retry period (1000 agents x 1 GET / 2 s = 500 requests/s), there is no jitter, and
``onstarted_leading`` runs in a thread nobody stops when leadership is lost. This elector is small,
runs on an injected monotonic clock (tests step it deterministically), learns about the Lease from
a watch, and answers ``is_leader()`` from a deadline, so a leader that cannot renew stops acting
on time even if its thread is stuck.

Timing (defaults; ``KubeSettings`` validates ``renew_period < renew_deadline < duration - jitter``):
- the leader renews every ``renew_period`` (7.5 s) and, failing that, retries about once a second;
  it is leader until ``renew_deadline`` (12 s) after it *sent* its last successful renewal;
- a follower takes a Lease it saw unchanged for ``duration`` (15 s) at a random moment in the last
  ``acquire_jitter`` (1 s) before that, so a thousand followers do not all write at once (the first
  wins; the rest see its write on the watch and stand down); a released Lease is taken after
  ``uniform(0, acquire_jitter)``;
- on SIGTERM the leader releases the Lease: the next one takes over within ~1 s, not 15 s.
See ``agent.k8s.lease`` for what this relies on about clocks.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from agent.errors import KubeApiError
from agent.k8s.lease import LeaseLost, LeaseRecord, LeaseStore, Observation, observe
from agent.k8s.threads import start_daemon

log = structlog.get_logger("agent.k8s.leader")


def boottime() -> float:
    """A monotonic clock that keeps counting while the machine is suspended (CLOCK_BOOTTIME on Linux):
    a leader whose VM was frozen past its deadline knows it on waking, before its next write."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # not Linux
        return time.monotonic()


@dataclass(frozen=True)
class ElectionTiming:
    duration: float = 15.0
    renew_period: float = 7.5
    renew_deadline: float = 12.0
    acquire_jitter: float = 1.0
    retry: float = 1.0  # between failed renewals / acquisitions (jittered +-20 %)

    def __post_init__(self) -> None:
        if not (0 < self.renew_period < self.renew_deadline < self.duration - self.acquire_jitter):
            raise ValueError("lease timing must satisfy 0 < renew period < renew deadline < duration - jitter, "
                             f"got {self.renew_period}, {self.renew_deadline}, {self.duration}, {self.acquire_jitter}")


class Elector:
    """One candidate for one Lease. Drive with ``run`` (a thread) or ``step(now)`` (tests)."""

    def __init__(
        self,
        store: LeaseStore,
        name: str,
        identity: str,
        *,
        timing: ElectionTiming | None = None,
        stop: threading.Event,
        clock: Callable[[], float] = boottime,
        rng: random.Random | None = None,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.identity = identity
        self.timing = timing or ElectionTiming()
        self.stop = stop
        self.clock = clock
        self.rng = rng or random.Random()
        self.on_change = on_change
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._seen: Observation | None = None
        self._draw = self.rng.random()  # where in the jitter window this follower tries; redrawn per change
        self._held: LeaseRecord | None = None
        self._valid_until = 0.0
        self._next_renew = 0.0
        self._next_try = 0.0
        self.terms = 0  # times this candidate became leader
        self.transitions: list[tuple[float, bool]] = []  # (clock, leading) for tests and the bench

    # ---- what others ask --------------------------------------------------------------------
    def is_leader(self) -> bool:
        """True only while our last renewal is younger than the renew deadline (checked now, not cached)."""
        with self._lock:
            return self._held is not None and self.clock() < self._valid_until

    def remaining(self) -> float:
        """Seconds of leadership left (0 when not leader): the most a leader's write may take."""
        with self._lock:
            return max(0.0, self._valid_until - self.clock()) if self._held is not None else 0.0

    def holder(self) -> str:
        """Who holds the Lease as far as we know ("" if nobody)."""
        with self._lock:
            if self._held is not None:
                return self.identity
            return self._seen.holder if self._seen is not None else ""

    # ---- inputs -------------------------------------------------------------------------------
    def observe(self, record: LeaseRecord | None) -> None:
        """A fresh view of the Lease (from its watch, or a read); wakes the election thread."""
        with self._lock:
            self._observe(record, self.clock())
        self._wake.set()

    def _observe(self, record: LeaseRecord | None, now: float) -> None:
        before = self._seen
        self._seen = observe(before, record, now)
        if self._seen is not before:
            self._draw = self.rng.random()
            self._next_try = 0.0
        if self._held is not None and record is not None and record.holder != self.identity:
            log.warning("leader.taken", lease=self.name, by=record.holder)
            self._lose(now)

    # ---- the state machine ----------------------------------------------------------------------
    def _lose(self, now: float) -> None:
        self._held = None
        self._valid_until = 0.0
        self.transitions.append((now, False))

    def step(self, now: float | None = None) -> float:
        """One decision; returns the seconds until the next one is due."""
        now = self.clock() if now is None else now
        with self._lock:
            leading = self._held is not None
        if leading:
            return self._lead(now)
        return self._follow(now)

    def _lead(self, now: float) -> float:
        t = self.timing
        with self._lock:
            held, valid_until = self._held, self._valid_until
        if held is None:
            return 0.0
        if now >= valid_until:
            with self._lock:
                self._lose(now)
            log.warning("leader.lost", lease=self.name, holder=self.identity, reason="renew deadline passed")
            self._notify(False)
            return 0.0
        if now < self._next_renew:
            return min(self._next_renew, valid_until) - now
        try:
            rec = self.store.renew(held, self.identity, t.duration, timeout=max(0.1, valid_until - now))
        except LeaseLost as e:
            with self._lock:
                self._lose(now)
            log.warning("leader.lost", lease=self.name, holder=self.identity, reason=str(e))
            self._notify(False)
            return 0.0
        except KubeApiError as e:
            retry = self._retry_delay()
            if e.retry_after is not None:  # honour it, but try once more before the deadline
                retry = max(retry, min(e.retry_after, valid_until - now - 0.1 * t.renew_period))
            self._next_renew = now + retry
            log.warning("leader.renew_failed", lease=self.name, error=str(e), leader_for=round(valid_until - now, 2),
                        retry_in=round(retry, 2))
            return min(retry, max(0.0, valid_until - now))
        with self._lock:
            self._held = rec
            self._valid_until = now + t.renew_deadline  # from when we sent it: earlier than anyone saw it
            self._observe(rec, now)
        self._next_renew = now + t.renew_period
        return t.renew_period

    def _follow(self, now: float) -> float:
        t = self.timing
        with self._lock:
            seen = self._seen
        if seen is None:  # nothing from the watch yet: read once ourselves
            try:
                rec = self.store.get(self.name)
            except KubeApiError as e:
                log.warning("leader.read_failed", lease=self.name, error=str(e), need=self.need())
                return self._retry_delay(long=e.permanent)
            with self._lock:
                self._observe(rec, now)
                seen = self._seen
            assert seen is not None
        if seen.holder in ("", self.identity):
            due = seen.seen + self._draw * t.acquire_jitter if seen.holder == "" else now
        else:
            due = seen.expires() - self._draw * t.acquire_jitter
        due = max(due, self._next_try)
        if now < due:
            return due - now
        try:
            rec = self.store.acquire(self.name, self.identity, t.duration, seen, now, early=t.acquire_jitter,
                                     timeout=self.store.api.request_timeout)
        except KubeApiError as e:
            self._next_try = now + max(self._retry_delay(long=e.permanent), e.retry_after or 0.0)
            log.warning("leader.acquire_failed", lease=self.name, error=str(e), need=self.need() if e.permanent else "")
            return self._next_try - now
        if rec is None:  # someone was first (or it changed since we looked): look again
            try:
                current = self.store.get(self.name)
            except KubeApiError:
                current = seen.record
            with self._lock:
                self._observe(current, now)
                if self._seen is seen:  # nothing new to learn: do not spin
                    self._next_try = now + self._retry_delay()
            return 0.0
        with self._lock:
            previous = seen.holder
            self._held = rec
            self._valid_until = now + t.renew_deadline
            self._observe(rec, now)
            self.terms += 1
            self.transitions.append((now, True))
        self._next_renew = now + t.renew_period
        log.info("leader.acquired", lease=self.name, holder=self.identity, previous=previous or None,
                 transitions=rec.transitions)
        self._notify(True)
        return t.renew_period

    def _retry_delay(self, *, long: bool = False) -> float:
        base = self.timing.duration if long else self.timing.retry
        return base * (0.8 + 0.4 * self.rng.random())

    def need(self) -> str:
        return f"get, create, update leases in namespace {self.store.namespace} (manifests/rbac.yaml Role)"

    def _notify(self, leading: bool) -> None:
        if self.on_change is not None:
            try:
                self.on_change(leading)
            except Exception:
                log.exception("leader.on_change_failed")

    # ---- running ----------------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stop.is_set():
            try:
                delay = self.step()
            except Exception:  # never die: a dead elector thread would hold leadership until its deadline
                log.exception("leader.step_failed")
                delay = self.timing.retry
            self._wake.wait(max(0.0, delay))
            self._wake.clear()
        self.release()

    def release(self) -> None:
        """Give the Lease up (shutdown): the next leader takes over in about a second."""
        with self._lock:
            held = self._held
            self._held = None
            self._valid_until = 0.0
        if held is not None:
            self.transitions.append((self.clock(), False))
            if self.store.release(held, self.identity):
                log.info("leader.released", lease=self.name, holder=self.identity)
            self._notify(False)

    def start(self) -> threading.Thread:
        return start_daemon(self.run, "leader-election", self.stop, self._wake.set)
