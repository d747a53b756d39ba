"""The level-triggered agent loop: desired models + what is verified on disk -> fill, repair, label.

Events (a new desired state, a watchdog change under hub/, a finished fill, a timer) only wake the
loop; every pass recomputes from fresh state (``run_once``). Fills run on a bounded worker pool
behind a work queue keyed by model name, so a model is never filled twice at once, and failures
back off per model with jitter.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

import structlog

from agent.cache.store import Store
from agent.core.desired import DesiredState, ModelStatus, backoff_delay, plan_actions
from agent.core.eviction import Candidate, plan_eviction
from agent.core.spec import ModelSpec, is_commit
from agent.errors import AgentError, DiskFullError
from agent.runtime.fill import FillFailed, FillResult, fill_model
from agent.sources.base import Source

log = structlog.get_logger("agent.runtime.loop")


class Reporter(Protocol):
    """Where the loop's conclusions go: node labels + annotation, events, the cluster-wide pin."""

    def report(self, ready: frozenset[str], statuses: dict[str, dict[str, object]]) -> None: ...
    def event(self, name: str, reason: str, message: str, *, warning: bool = False) -> None: ...
    def pin(self, name: str, commit: str, revision: str) -> str: ...


class Observer(Protocol):
    """Metrics hooks (counters and histograms); state gauges are read from ``snapshot``."""

    def fill_done(self, source: str, nbytes: int, seconds: float) -> None: ...
    def fill_failed(self, source: str, reason: str) -> None: ...
    def verify_failed(self, reason: str) -> None: ...
    def repaired(self) -> None: ...
    def evicted(self) -> None: ...


class NullObserver:
    def fill_done(self, source: str, nbytes: int, seconds: float) -> None:
        pass

    def fill_failed(self, source: str, reason: str) -> None:
        pass

    def verify_failed(self, reason: str) -> None:
        pass

    def repaired(self) -> None:
        pass

    def evicted(self) -> None:
        pass


@dataclass
class _Progress:
    """Feeds a model's fill progress into its status (read by the annotation and metrics)."""

    status: ModelStatus
    total: int = 0
    done: int = 0

    def start(self, total_bytes: int, files: int) -> None:
        self.total, self.done = total_bytes, 0
        self.status.progress = 0.0 if total_bytes else 1.0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        self.status.progress = min(self.done / self.total, 1.0) if self.total else 1.0

    def close(self) -> None:
        pass


class Reconciler:
    def __init__(
        self,
        store: Store,
        sources: Sequence[Source],
        reporter: Reporter,
        *,
        workers: int = 2,
        backoff: tuple[float, ...] = (1.0, 2.0, 5.0, 15.0, 60.0, 300.0),
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        evict_min_age: float = 600.0,
    ) -> None:
        self.store = store
        self.sources = list(sources)
        self.reporter = reporter
        self.backoff = backoff
        self.observer = observer or NullObserver()
        self.clock = clock
        self.evict_min_age = evict_min_age
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fill")
        self._mu = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._desired = DesiredState(synced=False)
        self._statuses: dict[str, ModelStatus] = {}
        self._in_flight: dict[str, Future[None]] = {}
        self._filled_spec: dict[str, ModelSpec] = {}
        self._dirty_blobs: dict[str, set[str]] = {}  # repo -> blob names touched since last pass
        self._reported_errors: dict[str, str] = {}
        self.passes = 0
        self.last_pass = 0.0
        self.initial_scan_done = threading.Event()

    # -- inputs (any thread) -----------------------------------------------------------------------

    def set_desired(self, desired: DesiredState) -> None:
        with self._mu:
            self._desired = desired
        self.wake()

    def mark_dirty(self, repo: str, blobs: Collection[str] = ()) -> None:
        """Called by the filesystem watcher: re-check models of ``repo`` now (and re-hash these blobs)."""
        with self._mu:
            self._dirty_blobs.setdefault(repo, set()).update(blobs)
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    # -- outputs -----------------------------------------------------------------------------------

    def snapshot(self) -> list[ModelStatus]:
        with self._mu:
            return [replace(s) for s in self._statuses.values()]

    def desired(self) -> DesiredState:
        with self._mu:
            return self._desired

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, interval: float = 60.0) -> None:
        """Thin infinite loop around ``run_once``; a failed pass is logged and retried."""
        while not stop.is_set():
            self._wake.clear()
            try:
                self.run_once()
            except Exception:
                log.exception("reconcile.pass_failed")
            self._wake.wait(interval)

    def local_commit(self, spec: ModelSpec, pin: str | None) -> str | None:
        if is_commit(spec.revision):
            return spec.revision
        if pin:
            return pin
        return self.store.read_ref(spec.repo, spec.revision)

    def _verified(self, name: str, spec: ModelSpec, pin: str | None, dirty: dict[str, set[str]]) -> tuple[bool, str]:
        """(complete and verified on disk now, why not). Stat-only, plus xxh3 of blobs the watcher saw change."""
        filled = self._filled_spec.get(name)
        if filled is not None and (filled.files != spec.files or filled.repo != spec.repo):
            return False, "spec changed"
        commit = self.local_commit(spec, pin)
        if commit is None:
            return False, "not cached"
        m = self.store.manifest(spec.repo, commit)
        if m is None:
            return False, "not cached"
        rep = self.store.check(m, deep_blobs=dirty.get(spec.repo, set()))
        if not rep.ok:
            removed = self.store.quarantine(m, rep)
            if removed:
                log.warning("reconcile.quarantined", model=name, blobs=removed)
            return False, "; ".join(rep.problems()[:5])
        st = self._statuses.get(name)
        if st is not None:
            st.commit, st.bytes, st.level = m.commit, m.total_bytes, m.level
        return True, ""

    def run_once(self) -> None:
        with self._mu:
            desired = self._desired
            dirty, self._dirty_blobs = self._dirty_blobs, {}
        now = self.clock()
        verified: dict[str, bool] = {}
        for name, spec in desired.models.items():
            st = self._status(name, spec)
            if name in self._in_flight:
                verified[name] = False
                continue
            ok, why = self._verified(name, spec, desired.pins.get(name), dirty)
            verified[name] = ok
            if ok:
                st.state, st.last_error, st.attempts, st.progress = "ready", "", 0, 1.0
            elif st.state == "ready":
                st.state, st.last_error, st.next_attempt = "damaged", why, 0.0
                st.repairing = why != "spec changed"
                self.observer.verify_failed("damaged" if why != "spec changed" else "spec_changed")
                log.warning("reconcile.not_ready", model=name, reason=why)
                if why != "spec changed":
                    self.reporter.event(name, "VerifyFailed", f"{spec.repo}: {why}", warning=True)
        for name in [n for n in self._reported_errors if n not in desired.errors]:
            del self._reported_errors[name]  # fixed (or gone): the same error later is news again
        for name, err in desired.errors.items():
            st = self._statuses.setdefault(name, ModelStatus(name))
            st.state, st.last_error = "invalid", str(err)
            if self._reported_errors.get(name) != str(err):
                self._reported_errors[name] = str(err)
                self.reporter.event(name, "InvalidSpec", str(err), warning=True)
        with self._mu:
            actions = plan_actions(desired.models, verified, set(self._in_flight), self._statuses, now)
            for name in actions.forget:
                if name not in desired.errors:
                    del self._statuses[name]
                    self._filled_spec.pop(name, None)
        if desired.synced or actions.ready:
            self.reporter.report(actions.ready, {n: s.compact() for n, s in self._statuses.items()})
        for name in actions.enqueue:
            if self._stop.is_set():
                break
            self._submit(name, desired.models[name], desired.pins.get(name))
        self.passes += 1
        self.last_pass = time.time()
        if desired.synced:
            self.initial_scan_done.set()

    def _status(self, name: str, spec: ModelSpec) -> ModelStatus:
        st = self._statuses.get(name)
        if st is None:
            st = self._statuses[name] = ModelStatus(name, spec.repo, spec.revision)
        st.repo, st.revision = spec.repo, spec.revision
        return st

    # -- fills -------------------------------------------------------------------------------------

    def _sources_for(self, spec: ModelSpec) -> list[Source]:
        if not spec.sources:
            return self.sources
        return [s for kind in spec.sources for s in self.sources if s.kind == kind]

    def _submit(self, name: str, spec: ModelSpec, pin: str | None) -> None:
        with self._mu:
            if name in self._in_flight:
                return
            st = self._statuses[name]
            was_damaged = st.state == "damaged" or st.repairing
            st.state, st.progress = "filling", 0.0
            self._in_flight[name] = self._pool.submit(self._fill, name, spec, pin, was_damaged)

    def _resolve_pin(self, name: str, spec: ModelSpec, sources: list[Source]) -> str | None:
        """Branch/tag without a cluster pin: resolve once, then let the reporter pin it (first writer wins)."""
        for src in sources:
            try:
                commit = src.resolve(spec.repo, spec.revision, spec.files).commit
            except AgentError:
                continue
            return self.reporter.pin(name, commit, spec.revision)
        return None

    def _fill(self, name: str, spec: ModelSpec, pin: str | None, was_damaged: bool) -> None:
        st = self._statuses[name]
        blog = log.bind(model=name, repo=spec.repo, revision=spec.revision)
        try:
            sources = self._sources_for(spec)
            if not sources:
                raise FillFailed(spec.repo, spec.revision, [])
            if pin is None and not is_commit(spec.revision):
                pin = self._resolve_pin(name, spec, sources)
            try:
                res: FillResult = fill_model(self.store, sources, spec.repo, spec.revision, spec.files, pin=pin,
                                             progress=_Progress(st), stop=self._stop)
            except DiskFullError as e:
                if not (e.shortfall > 0 and self.store.budget_bytes > 0 and self._evict(spec, e.shortfall)):
                    raise
                res = fill_model(self.store, sources, spec.repo, spec.revision, spec.files, pin=pin,
                                 progress=_Progress(st), stop=self._stop)
            with self._mu:
                self._filled_spec[name] = spec
                st.commit, st.bytes, st.level, st.source = res.manifest.commit, res.manifest.total_bytes, \
                    res.manifest.level, res.source
                st.attempts, st.last_error, st.state, st.repairing = 0, "", "pending", False
            self.observer.fill_done(res.source, res.fetched_bytes, res.seconds)
            if was_damaged:
                self.observer.repaired()
            self.reporter.event(name, "Repaired" if was_damaged else "FillSucceeded",
                                f"{spec.repo}@{res.manifest.commit[:12]}: {res.fetched_files} files, "
                                f"{res.fetched_bytes} bytes from {res.source} in {res.seconds:.1f}s "
                                f"({res.manifest.level})")
        except (FillFailed, DiskFullError, AgentError) as e:
            if self._stop.is_set():
                blog.info("reconcile.fill_abandoned", error=str(e))
                return
            attempts = e.attempts if isinstance(e, FillFailed) else [("store", e)]
            for label, err in attempts:
                self.observer.fill_failed(label.split(":", 1)[0], getattr(err, "reason", "disk_full"
                                          if isinstance(err, DiskFullError) else "error"))
            with self._mu:
                st.attempts += 1
                st.state, st.last_error = "failed", str(e)
                st.next_attempt = self.clock() + backoff_delay(st.attempts, self.backoff)
            blog.warning("reconcile.fill_failed", error=str(e), attempt=st.attempts)
            self.reporter.event(name, "FillFailed", str(e), warning=True)
        except Exception as e:  # a bug must not kill the worker pool; surface it as a failure
            if self._stop.is_set():  # sources are being closed under us: an abandoned fill, not a bug
                blog.info("reconcile.fill_abandoned", error=str(e))
                return
            blog.exception("reconcile.fill_crashed")
            with self._mu:
                st.attempts += 1
                st.state, st.last_error = "failed", f"internal error: {e!r}"
                st.next_attempt = self.clock() + backoff_delay(st.attempts, self.backoff)
        finally:
            with self._mu:
                self._in_flight.pop(name, None)
            self.wake()

    def _evict(self, spec: ModelSpec, shortfall: int) -> bool:
        """Free ``shortfall`` bytes under the budget by the eviction policy; True if anything was removed."""
        with self._mu:
            desired = self._desired.models
            in_use = {(s.repo, st.commit) for n, s in desired.items()
                      if (st := self._statuses.get(n)) is not None and st.commit}
            busy = {desired[n].repo for n in self._in_flight if n in desired and n != spec.name}
        prio: dict[tuple[str, str], int] = {}
        for n, s in desired.items():
            st = self._statuses.get(n)
            if st is not None and st.commit:
                prio[(s.repo, st.commit)] = max(prio.get((s.repo, st.commit), -(2**31)), s.priority)
        cands = [
            Candidate(m.repo, m.commit, frozenset((f.digest, f.size) for f in m.files), m.verified_at,
                      prio.get((m.repo, m.commit)) if (m.repo, m.commit) in in_use else None)
            for m in self.store.manifests() if m.repo not in busy
        ]
        plan = plan_eviction(cands, shortfall, for_priority=spec.priority, now=time.time(),
                             min_age=self.evict_min_age)
        for c in plan:
            with self.store.lock(c.repo, timeout=5):
                freed = self.store.remove_snapshot(c.repo, c.commit)
            log.warning("reconcile.evicted", repo=c.repo, commit=c.commit, freed=freed, for_model=spec.name,
                        priority=c.priority)
            self.observer.evicted()
            for n, s in desired.items():
                st = self._statuses.get(n)
                if s.repo == c.repo and st is not None and st.commit == c.commit:
                    self.reporter.event(n, "Evicted", f"{c.repo}@{c.commit[:12]} evicted to make room for "
                                        f"{spec.name} (priority {spec.priority})", warning=True)
        if plan:
            self.wake()
        return bool(plan)

    def idle(self) -> bool:
        with self._mu:
            return not self._in_flight

    def shutdown(self, budget: float) -> bool:
        """Stop taking work; let in-flight fills finish within ``budget`` seconds. True if all finished.

        Anything abandoned leaves only staging behind (publish is atomic), swept at next start.
        """
        self._stop.set()
        deadline = time.monotonic() + budget
        with self._mu:
            futures = list(self._in_flight.values())
        for f in futures:
            with contextlib.suppress(Exception):
                f.result(timeout=max(deadline - time.monotonic(), 0))
        self._pool.shutdown(wait=False, cancel_futures=True)
        return all(f.done() for f in futures)
