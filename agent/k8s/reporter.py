"""The loop's Reporter in cluster mode: this node's labels and status annotation, Events, revision pins.

The loop must never wait for the API server: ``report`` only hands the latest wish to the
NodeReporter's coalescing writer, and Events go through an ``Outbox`` (one background thread,
bounded queue). Only ``pin`` may block (a fill worker that needs the commit before it can start).

What an agent no longer writes: the CachedModel status. It used to CAS-write its own key of
``status.nodes`` plus the counts on every state change (a conflict storm on one object at 1000
nodes); now the elected leader aggregates everything from the Nodes (``agent.k8s.aggregator``),
including the ``SpecValid`` condition and its one InvalidSpec Event per cluster.

Revision pins: an agent that resolved a branch or tag proposes the commit in its status annotation
(``{"propose": {"revision", "commit"}}``, written at once) and waits for the leader to pin it;
only when no leader pinned within ``pin_wait`` (no leader, no Lease permission) does it
compare-and-swap the pin itself.
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping

import structlog

from agent.core.selector import READY, model_states
from agent.errors import AgentError
from agent.k8s.client import KubeApi
from agent.k8s.crd import CachedModelObj, pin_revision
from agent.k8s.events import EventRecorder, EventType
from agent.k8s.node import NodeReporter, ready_labels

log = structlog.get_logger("agent.k8s.reporter")

PROGRESS_STEP = 0.1  # the annotation's fill progress moves in 10 % steps


def annotation_statuses(statuses: Mapping[str, Mapping[str, object]],
                        proposals: Mapping[str, tuple[str, str]] | None = None) -> dict[str, dict[str, object]]:
    """The status annotation's content (pure): fill progress floored to ``PROGRESS_STEP``, proposals added.

    Every distinct annotation is a Node write, and every Node write fans out to every Node watcher
    in the cluster (scheduler, kube-proxy, the leader); a per-second progress tick from hundreds of
    agents would be a self-inflicted load test.
    """
    out: dict[str, dict[str, object]] = {}
    for name, st in statuses.items():
        d = dict(st)
        p = d.get("progress")
        if isinstance(p, int | float):
            d["progress"] = round(math.floor(p / PROGRESS_STEP + 1e-9) * PROGRESS_STEP, 3)
        out[name] = d
    for name, (revision, commit) in (proposals or {}).items():
        out.setdefault(name, {"state": "pending"})["propose"] = {"revision": revision, "commit": commit}
    return out


class Outbox:
    """Best-effort cluster writes off the caller's thread, in order, one at a time.

    Bounded: when the API is down for long, the oldest pending writes are dropped (and counted)
    rather than growing memory; Events are best effort by design.
    """

    def __init__(self, stop: threading.Event, *, maxsize: int = 256) -> None:
        self.stop = stop
        self._q: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue(maxsize)
        self.dropped = 0
        self.done = 0
        self._idle = threading.Condition()
        self._pending = 0

    def put(self, what: str, fn: Callable[[], None]) -> None:
        with self._idle:
            self._pending += 1
        self._enqueue((what, fn))

    def _enqueue(self, item: tuple[str, Callable[[], None]] | None) -> None:
        """Queue ``item``, dropping the oldest pending write when full; after close, writes are dropped."""
        while True:
            try:
                self._q.put_nowait(item)
                return
            except queue.Full:
                try:
                    old = self._q.get_nowait()
                except queue.Empty:
                    continue
                if old is None:  # closed: put the end marker back; a new write is dropped
                    self._q.put_nowait(None)
                    if item is not None:
                        self._finished()
                    return
                self.dropped += 1
                log.warning("reporter.outbox_dropped", what=old[0])
                self._finished()

    def _finished(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()

    def run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            what, fn = item
            try:
                fn()
            except Exception as e:  # best effort: a failed Event is logged, never raised
                log.warning("reporter.outbox_failed", what=what, error=str(e))
            finally:
                self.done += 1
                self._finished()

    def wait_idle(self, timeout: float) -> bool:
        """True once everything put so far was attempted (tests, shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def start(self) -> Outbox:
        threading.Thread(target=self.run, name="k8s-outbox", daemon=True).start()
        threading.Thread(target=lambda: (self.stop.wait(), self.close()), name="k8s-outbox-stop", daemon=True).start()
        return self

    def close(self) -> None:
        """Let the thread finish what is queued, then end (nothing queued after this runs)."""
        self._enqueue(None)


class KubeReporter:
    """Implements the loop's Reporter: ``report`` (cheap, coalesced), ``event``, ``pin``.

    It owns the NodeReporter's writer thread, started by the first ``report`` and not before: the
    writer's wish starts empty, and an empty wish means "remove every ready label". Started at
    agent start, it stripped a restarted node of all its labels until the loop had re-checked the
    disk (a flap on every DaemonSet rollout).
    """

    def __init__(
        self,
        api: KubeApi,
        node: NodeReporter,
        events: EventRecorder,
        objects: Callable[[], Mapping[str, CachedModelObj]],
        *,
        stop: threading.Event,
        pin_wait: float = 25.0,
        leader_known: Callable[[], bool] = lambda: True,
        outbox: Outbox | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.node = node
        self.events = events
        self.objects = objects
        self.stop = stop
        self.pin_wait = pin_wait
        self.leader_known = leader_known
        self.outbox = outbox or Outbox(stop).start()
        self.clock = clock
        self._lock = threading.Lock()
        self._cr_changed = threading.Condition(self._lock)
        self._writer_started = False
        self._ready: frozenset[str] | None = None
        self._statuses: dict[str, dict[str, object]] = {}
        self._proposals: dict[str, tuple[str, str]] = {}
        self.pins_by_leader = 0
        self.pins_by_us = 0

    # ---- Reporter ----------------------------------------------------------------------------
    def report(self, ready: frozenset[str], statuses: dict[str, dict[str, object]]) -> None:
        """The loop's full conclusion: labels + annotation wish (one Node patch when it changes)."""
        with self._lock:
            self._ready, self._statuses = frozenset(ready), dict(statuses)
        self._publish(urgent=False)

    def _publish(self, *, urgent: bool) -> None:
        with self._lock:
            if self._ready is None and not self._proposals:
                return
            ready = self._ready or frozenset()
            doc = annotation_statuses(self._statuses, self._proposals)
        if self._ready is None:  # a proposal before the first report: leave the labels as they are
            ready = frozenset(m for m, v in model_states(self.node.node_labels(), self.node.prefix).items()
                              if v == READY)
        self.node.set_desired(ready_labels(self.node.prefix, ready),
                              json.dumps(doc, separators=(",", ":"), sort_keys=True), urgent=urgent)
        with self._lock:
            start_writer, self._writer_started = not self._writer_started, True
        if start_writer:
            self.node.start(self.stop)

    def event(self, name: str, reason: str, message: str, *, warning: bool = False) -> None:
        if reason == "InvalidSpec":  # a property of the CachedModel: the leader records it once for the cluster
            log.info("reporter.invalid_spec", model=name, message=message)
            return
        kind: EventType = "Warning" if warning else "Normal"
        self.outbox.put(f"event {reason} {name}", lambda: self._emit(name, reason, message, kind))

    def _emit(self, name: str, reason: str, message: str, kind: EventType) -> None:
        obj = self.objects().get(name)
        self.events.emit("CachedModel", name, reason, message, kind, uid=obj.uid if obj and obj.uid else None)

    def crs_changed(self) -> None:
        """The CachedModel watch saw a change: wake pins waiting for the leader."""
        with self._cr_changed:
            self._cr_changed.notify_all()

    def _pinned(self, name: str, revision: str) -> tuple[bool, str | None]:
        """(the CachedModel still exists, the pin for ``revision`` if there is one)."""
        obj = self.objects().get(name)
        if obj is None:
            return False, None
        if obj.spec is not None and obj.spec.revision == revision and obj.resolved_revision:
            return True, obj.resolved_revision
        return True, None

    def pin(self, name: str, commit: str, revision: str) -> str:
        """The commit every node fills for ``revision``; may block up to ``pin_wait`` (stop-aware)."""
        exists, pinned = self._pinned(name, revision)
        if not exists:
            return commit
        if pinned:
            return pinned  # adopt, do not rewrite
        with self._lock:
            self._proposals[name] = (revision, commit)
        self._publish(urgent=True)
        deadline = self.clock() + (self.pin_wait if self.leader_known() else min(self.pin_wait, 2.0))
        try:
            with self._cr_changed:
                while not self.stop.is_set():
                    exists, pinned = self._pinned(name, revision)
                    left = deadline - self.clock()
                    if pinned or not exists or left <= 0:
                        break
                    self._cr_changed.wait(min(left, 0.5))
            if pinned:
                self.pins_by_leader += 1
                log.info("reporter.pin_adopted", model=name, commit=pinned, proposed=commit)
                return pinned
            if not exists or self.stop.is_set():
                return commit
            log.warning("reporter.no_leader_pin", model=name, waited=self.pin_wait)
            obj = self.objects().get(name)
            try:
                pinned = pin_revision(self.api, name, commit, obj.resource_version if obj else None,
                                      revision=revision, stop=self.stop)
            except AgentError as e:
                log.warning("reporter.pin_failed", model=name, error=str(e))
                return commit
            self.pins_by_us += 1
            return pinned
        finally:
            with self._lock:  # gone from the next write, which the fill's next state change makes anyway
                self._proposals.pop(name, None)
