"""The level-triggered agent loop: scan -> frozen snapshot -> pure plan -> execute.

One thread owns every model status. Everything else talks to it through its inbox: providers post
a new desired state, the hub watcher and the scrub post "this repo changed", workers post the
outcome of a fill. A pass drains the inbox, re-scans what changed (``Scanner``), asks the pure
``plan`` what to do, executes it (quarantine and eviction under the repo lock, fills into the keyed
work queue, labels and Events to the reporter), then publishes an immutable view of the statuses
for metrics. Nothing here sleeps on the clock: tests drive ``run_once`` with an injected clock.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import structlog

from agent.cache.fsutil import write_atomic
from agent.cache.manifest import Manifest
from agent.cache.store import Store
from agent.core.actions import FillAction, FillOutcome, Plan, Policy, Usage, plan
from agent.core.desired import DesiredState, ModelStatus
from agent.core.eviction import Drain
from agent.core.spec import ModelSpec, is_commit
from agent.errors import AgentError, Cancelled, DiskFullError, LockedError
from agent.runtime.fill import FillFailed, fill_model
from agent.runtime.scan import Scanner
from agent.runtime.workqueue import Workers, WorkQueue
from agent.sources.base import Source
from agent.sources.factory import for_model

log = structlog.get_logger("agent.loop")
PROGRESS_REFRESH = 1.0  # seconds between passes while fills run, so progress in metrics/annotation moves
SETTLE = 0.05  # after a wake-up, let the rest of a burst land (one publish is a dozen inotify events)


class Reporter(Protocol):
    """Where the loop's conclusions go: node labels + annotation, events, the cluster-wide pin."""

    def report(self, ready: frozenset[str], statuses: dict[str, dict[str, object]]) -> None: ...
    def event(self, name: str, reason: str, message: str, *, warning: bool = False) -> None: ...
    def pin(self, name: str, commit: str, revision: str) -> str: ...


class Observer(Protocol):
    """Metrics hooks (counters and histograms); state gauges are read from ``view``."""

    def fill_done(self, source: str, nbytes: int, seconds: float) -> None: ...
    def fill_bytes_from(self, kind: str, nbytes: int) -> None: ...
    def fill_failed(self, source: str, reason: str) -> None: ...
    def verify_failed(self, reason: str) -> None: ...
    def repaired(self) -> None: ...
    def evicted(self, reason: str, nbytes: int) -> None: ...
    def space_waited(self, seconds: float) -> None: ...


class NullObserver:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


class _Progress:
    """A running fill's byte counter: written by its worker, read by the loop (ints: no lock needed)."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0

    def start(self, total_bytes: int, files: int) -> None:
        self.total, self.done = total_bytes, 0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes

    def close(self) -> None:
        pass

    def ratio(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0


@dataclass(frozen=True)
class _Desired:
    state: DesiredState


@dataclass(frozen=True)
class _RescanAll:
    pass


@dataclass(frozen=True)
class _InUse:
    names: frozenset[str]
    known: bool


@dataclass(frozen=True)
class _Dirty:
    repo: str
    blobs: frozenset[str]


class Loop:
    def __init__(
        self,
        store: Store,
        sources: Sequence[Source],
        reporter: Reporter,
        *,
        workers: int = 2,
        policy: Policy | None = None,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        check_interval: float = 60.0,
        rng: random.Random | None = None,
        lock_timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.sources = list(sources)
        self.reporter = reporter
        self.policy = policy or Policy()
        self.observer: Observer = observer or NullObserver()  # type: ignore[assignment]
        self.clock = clock
        self.wall = wall
        self.check_interval = check_interval
        self.rng = rng
        self.lock_timeout = lock_timeout
        self.scanner = Scanner(store)
        self.queue: WorkQueue[str, FillAction] = WorkQueue()
        self._workers = Workers(self.queue, self._work, workers, name="fill")
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # owned by the loop thread (run_once); never touched elsewhere
        self._desired = DesiredState(synced=False)
        self._statuses: dict[str, ModelStatus] = {}
        self._dirty: set[str] = set()
        self._dirty_repos: dict[str, set[str]] = {}
        self._next_full = float("-inf")
        self._wake_at: float | None = None
        self._drains: Mapping[tuple[str, str], Drain] = {}
        self._in_use: frozenset[str] = frozenset()
        self._in_use_known = True
        self._last_used: dict[str, float] = _load_usage(store.layout.agent_dir / "usage.json")
        self._reported: tuple[frozenset[str], dict[str, ModelStatus]] | None = None
        # read by other threads: replaced whole, never mutated
        self._view: tuple[ModelStatus, ...] = ()
        self._progress: dict[str, _Progress] = {}
        self.passes = 0
        self.last_pass = 0.0
        self.initial_scan_done = threading.Event()
        # hooks (set before ``run``): after a snapshot is published (peers seed it), before one is deleted
        self.published_hooks: list[Callable[[Manifest], object]] = []
        self.evict_hooks: list[Callable[[str, str], object]] = []

    # -- inputs (any thread) -----------------------------------------------------------------------

    def set_desired(self, desired: DesiredState) -> None:
        self._post(_Desired(desired))

    def mark_dirty(self, repo: str, blobs: Collection[str] = ()) -> None:
        """The filesystem watcher or the scrub: re-check models of ``repo`` now (and re-hash these blobs)."""
        self._post(_Dirty(repo, frozenset(blobs)))

    def set_in_use(self, names: Collection[str], *, known: bool = True) -> None:
        """The models pods on this node use now (pod watch, or ``--in-use-file``): never drained or evicted.

        ``known=False`` until the pod watch has listed once: until then nothing is deleted at all.
        """
        self._post(_InUse(frozenset(names), known))

    def rescan_all(self) -> None:
        """Events were lost (inotify overflow): re-check every model on the next pass."""
        self._post(_RescanAll())

    def _post(self, msg: object) -> None:
        self._inbox.put(msg)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    # -- outputs (any thread) ----------------------------------------------------------------------

    def view(self) -> tuple[ModelStatus, ...]:
        """The statuses of the last pass: an immutable snapshot (metrics, status, tests)."""
        return self._view

    def desired(self) -> DesiredState:
        return self._desired

    def start_workers(self) -> Loop:
        self._workers.start()
        return self

    def workers_alive(self) -> bool:
        return self._workers.alive()

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Thin infinite loop around ``run_once``; a failed pass is logged and retried."""
        self.start_workers()
        while not stop.is_set():
            self._wake.clear()
            try:
                self.run_once()
            except Exception:
                log.exception("loop.pass_failed")
            if self._wake.wait(self._timeout()) and not stop.is_set():
                stop.wait(SETTLE)  # one pass for the whole burst: a pass costs O(models), a burst is per fill

    def _timeout(self) -> float:
        now = self.clock()
        until = self._next_full - now
        if self._wake_at is not None:
            until = min(until, self._wake_at - now)
        if self.queue.running():
            until = min(until, PROGRESS_REFRESH)
        return max(until, 0.01)

    def _drain(self) -> list[FillOutcome]:
        outcomes: list[FillOutcome] = []
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return outcomes
            if isinstance(msg, _Desired):
                self._dirty |= _changed(self._desired, msg.state)
                self._desired = msg.state
            elif isinstance(msg, _Dirty):
                self._dirty_repos.setdefault(msg.repo, set()).update(msg.blobs)
            elif isinstance(msg, _InUse):
                self._in_use_known = msg.known
                if msg.names != self._in_use:
                    self._in_use = msg.names
                    self._touch_usage(save=True)
            elif isinstance(msg, _RescanAll):
                self._next_full = float("-inf")
            elif isinstance(msg, FillOutcome):
                outcomes.append(msg)
                self._dirty.add(msg.name)

    def run_once(self) -> Plan:
        """One pass: drain the inbox, scan what changed, plan, execute, publish the view."""
        # Busy first, then the inbox: a worker posts its outcome before it leaves the queue, so a fill
        # not busy now has its outcome in this drain (never "not busy, no outcome": a double fill).
        busy = self.queue.busy()
        outcomes = self._drain()
        desired = self._desired
        now = self.clock()
        full = now >= self._next_full
        if full:
            self._next_full = now + self.check_interval
            self.store.space.resync()
        dirty, dirty_repos = self._dirty, self._dirty_repos
        self._dirty, self._dirty_repos = set(), {}
        snap = self.scanner.scan(desired, dirty=dirty, dirty_repos=dirty_repos, full=full, now=now)
        policy = replace(self.policy, wall_now=self.wall())
        self._touch_usage(save=False)
        p = plan(desired, snap, self._statuses, busy, outcomes, now, policy, self.rng,
                 usage=Usage(self._in_use, dict(self._last_used), self._in_use_known), drains=self._drains)
        self._drains = p.drains
        self._execute(p, desired)
        statuses = dict(p.statuses)
        for name, prog in list(self._progress.items()):
            st = statuses.get(name)
            if st is not None and st.state == "filling":
                statuses[name] = replace(st, progress=prog.ratio())
        self._statuses = statuses
        self._view = tuple(statuses[n] for n in sorted(statuses))
        self._wake_at = p.wake_at
        if (desired.synced or p.ready) and (p.ready, statuses) != self._reported:
            self.reporter.report(p.ready, {n: s.compact() for n, s in sorted(statuses.items())})
            self._reported = (p.ready, statuses)
        self.passes += 1
        self.last_pass = self.wall()
        if desired.synced:
            self.initial_scan_done.set()
        return p

    # -- executing a plan (loop thread) ------------------------------------------------------------

    def _execute(self, p: Plan, desired: DesiredState) -> None:
        for name in p.cancels:
            if self.queue.cancel(name):
                log.info("loop.fill_cancelled", model=name, reason="no longer desired")
        for q in p.quarantines:  # never wait for a repo lock here: a fill holds it for the whole download
            try:
                with self.store.lock(q.repo, timeout=0):
                    removed = self.store.quarantine(q.repo, q.commit, q.blobs)
            except LockedError:
                continue  # its fill deletes them under its own lock (FillAction.distrust), or the next pass does
            except OSError as e:
                log.warning("loop.quarantine_failed", model=q.name, error=str(e))
                continue
            if removed:
                log.warning("loop.quarantined", model=q.name, repo=q.repo, blobs=removed)
            self.scanner.forget_repo(q.repo)
        for ev in p.evictions:
            try:
                with self.store.lock(ev.repo, timeout=0):
                    for hook in self.evict_hooks:
                        _run_hook(hook, ev.repo, ev.commit)
                    freed = self.store.remove_snapshot(ev.repo, ev.commit)
            except LockedError:
                continue  # a fill of the repo is running: the drain stands, the next pass deletes
            except OSError as e:
                log.warning("loop.evict_failed", repo=ev.repo, commit=ev.commit, error=str(e))
                continue
            log.warning("loop.evicted", repo=ev.repo, commit=ev.commit, freed=freed, reason=ev.reason,
                        models=list(ev.models))
            self.observer.evicted(ev.kind, freed)
            for name in ev.models:
                self.reporter.event(name, "Evicted", f"{ev.repo}@{ev.commit[:12]} deleted {ev.reason}", warning=True)
            self.scanner.forget_repo(ev.repo)
            self._dirty |= set(ev.models)
        for c in p.counts:
            getattr(self.observer, c.kind)(*c.args)
        for e in p.events:
            self.reporter.event(e.name, e.reason, e.message, warning=e.warning)
        if self._stop.is_set():
            return
        for f in p.fills:
            self.queue.add(f.name, f, priority=f.spec.priority)

    def _drop_staging(self, repo: str) -> None:
        """Partial files of a fill nobody wants any more would count against the budget until the next fill."""
        try:
            with self.store.lock(repo, timeout=0):
                self.store.sweep_staging(repo, max_partial_age=0.0)
        except (LockedError, OSError):
            pass  # another fill of the repo runs (it sweeps on its own) or the disk is gone: nothing to do now

    def _touch_usage(self, *, save: bool) -> None:
        """Remember when each model was last in use (least recently used goes first under pressure)."""
        now = self.wall()
        for name in self._in_use:
            self._last_used[name] = now
        if save:
            _save_usage(self.store.layout.agent_dir / "usage.json", self._last_used)

    # -- fills (worker threads) --------------------------------------------------------------------

    def _sources_for(self, spec: ModelSpec) -> list[Source]:
        chosen = [s for kind in spec.sources for s in self.sources if s.kind == kind] if spec.sources else self.sources
        return for_model(chosen, pvc_subpath=spec.pvc_subpath)

    def _resolve_pin(self, name: str, spec: ModelSpec, sources: list[Source]) -> str | None:
        """Branch/tag without a cluster pin: resolve once, then let the reporter pin it (first writer wins)."""
        for src in sources:
            try:
                commit = src.resolve(spec.repo, spec.revision, spec.files).commit
            except AgentError:
                continue
            return self.reporter.pin(name, commit, spec.revision)
        return None

    def _work(self, name: str, action: FillAction, cancel: threading.Event) -> None:
        outcome = self._fill(name, action, cancel)
        self._post(outcome)

    def _fill(self, name: str, action: FillAction, cancel: threading.Event) -> FillOutcome:
        spec, pin = action.spec, action.pin
        progress = self._progress[name] = _Progress()
        blog = log.bind(model=name, repo=spec.repo, revision=spec.revision)
        try:
            sources = self._sources_for(spec)
            if not sources:
                raise FillFailed(spec.repo, spec.revision, [])
            if pin is None and not is_commit(spec.revision):
                pin = self._resolve_pin(name, spec, sources)
            res = fill_model(self.store, sources, spec.repo, spec.revision, spec.files, pin=pin, progress=progress,
                             stop=cancel, record_as=name, pvc_subpath=spec.pvc_subpath, lock_timeout=None,
                             distrust=action.distrust)
            m = res.manifest
            for hook in self.published_hooks:
                _run_hook(hook, m)
            return FillOutcome(name, True, source=res.source, fetched_files=res.fetched_files,
                               fetched_bytes=res.fetched_bytes, seconds=res.seconds, commit=m.commit, level=m.level,
                               spec=spec, repair=action.repair, peer_bytes=res.peer_bytes)
        except Cancelled as e:
            blog.info("loop.fill_stopped", error=str(e))
            if not self._stop.is_set():  # dropped from the desired set (not a shutdown): its partial files go too
                self._drop_staging(spec.repo)
            return FillOutcome(name, False, cancelled=True, error=str(e), spec=spec)
        except (FillFailed, DiskFullError, AgentError) as e:
            if cancel.is_set():
                blog.info("loop.fill_abandoned", error=str(e))
                return FillOutcome(name, False, cancelled=True, error=str(e), spec=spec)
            if isinstance(e, FillFailed):
                failures = tuple((label.split(":", 1)[0], getattr(err, "reason", "error")) for label, err in e.attempts)
            else:
                failures = (("store", "disk_full" if isinstance(e, DiskFullError) else "error"),)
            blog.warning("loop.fill_failed", error=str(e))
            return FillOutcome(name, False, error=str(e), failures=failures, spec=spec,
                               shortfall=e.shortfall if isinstance(e, DiskFullError) else 0)
        except Exception as e:  # a bug must not kill the worker; surface it as a failure
            if cancel.is_set():
                blog.info("loop.fill_abandoned", error=repr(e))
                return FillOutcome(name, False, cancelled=True, error=repr(e), spec=spec)
            blog.exception("loop.fill_crashed")
            return FillOutcome(name, False, error=f"internal error: {e!r}", failures=(("agent", "internal"),),
                               spec=spec)
        finally:
            self._progress.pop(name, None)

    # -- lifecycle ---------------------------------------------------------------------------------

    def idle(self) -> bool:
        return self.queue.idle() and self._inbox.empty()

    def shutdown(self, budget: float) -> bool:
        """Stop taking work; let running fills finish within ``budget`` seconds, then stop them. True if all finished.

        Anything stopped leaves only staging behind (publish is atomic), reused or swept at next start.
        """
        self._stop.set()
        self._touch_usage(save=True)
        for name in self.queue.busy() - self.queue.running():
            self.queue.cancel(name)
        finished = self.queue.wait_idle(budget)
        self.queue.close()  # running fills are told to stop; closing the sources (next) cuts their streams
        self._workers.join(0.5)
        return finished


def _changed(old: DesiredState, new: DesiredState) -> set[str]:
    """Models whose spec or pin differs (or that are new): they need a fresh check this pass."""
    out = {n for n, s in new.models.items() if old.models.get(n) != s or old.pins.get(n) != new.pins.get(n)}
    return out | (set(old.models) - set(new.models))


def _load_usage(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def _save_usage(path: Path, last_used: Mapping[str, float]) -> None:
    try:
        write_atomic(path, json.dumps(dict(sorted(last_used.items()))), fsync=False)
    except OSError as e:
        log.warning("loop.usage_not_saved", path=str(path), error=e.strerror)


def _run_hook(hook: Callable[..., object], *args: object) -> None:
    try:
        hook(*args)
    except Exception:  # a hook (seeding to peers) must never fail a fill or a pass
        log.exception("loop.hook_failed", hook=getattr(hook, "__qualname__", repr(hook)))
