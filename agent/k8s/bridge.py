"""Connects the loop to the cluster: CachedModels -> DesiredState, loop conclusions -> Node and CRs.

The loop only sees our own types (DesiredState, ModelSpec); this is where CachedModelObj, node
labels and the pin CAS are translated.

The loop must never wait for the API server: labels and the status annotation go through the
NodeReporter's coalescing writer, and Events and CachedModel conditions through an ``Outbox`` (one
background thread, bounded queue). Only ``pin`` is synchronous, and it runs on a fill worker that
needs its answer anyway.
"""

from __future__ import annotations

import json
import math
import queue
import threading
from collections.abc import Callable, Mapping

import structlog

from agent.core import selector
from agent.core.desired import DesiredState
from agent.core.spec import ModelSpec
from agent.errors import AgentError, SpecError
from agent.k8s.client import KubeApi
from agent.k8s.crd import (
    CachedModelObj,
    CachedModelWatcher,
    get_cached_model,
    pin_revision,
    set_condition,
    set_node_state,
)
from agent.k8s.events import EventRecorder, EventType
from agent.k8s.node import NodeReporter, ready_labels

log = structlog.get_logger("agent.k8s.bridge")

SPEC_VALID = "SpecValid"
PROGRESS_STEP = 0.1  # the annotation's fill progress moves in 10 % steps: at most ~10 Node patches per fill


def desired_for_node(objs: dict[str, CachedModelObj], node_labels: dict[str, str], *, synced: bool) -> DesiredState:
    """Which CachedModels select this node (pure)."""
    models: dict[str, ModelSpec] = {}
    errors: dict[str, SpecError] = {}
    pins: dict[str, str] = {}
    for name, obj in objs.items():
        if obj.spec is None:
            if obj.error is not None:
                errors[name] = obj.error
            continue
        try:
            if not selector.matches(obj.spec.node_selector, node_labels):
                continue
        except SpecError as e:
            errors[name] = e
            continue
        models[name] = obj.spec
        if obj.resolved_revision:
            pins[name] = obj.resolved_revision
    return DesiredState(models=models, errors=errors, pins=pins, synced=synced)


def annotation_statuses(statuses: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, object]]:
    """The status annotation's content (pure): fill progress floored to ``PROGRESS_STEP``.

    Every distinct annotation is a Node write, and every Node write fans out to every Node watcher
    in the cluster (scheduler, kube-proxy, DaemonSets); a per-second progress tick from hundreds of
    agents would be a self-inflicted load test.
    """
    out: dict[str, dict[str, object]] = {}
    for name, st in statuses.items():
        d = dict(st)
        p = d.get("progress")
        if isinstance(p, int | float):
            d["progress"] = round(math.floor(p / PROGRESS_STEP + 1e-9) * PROGRESS_STEP, 3)
        out[name] = d
    return out


class Outbox:
    """Best-effort cluster writes off the caller's thread, in order, one at a time.

    Bounded: when the API is down for long, the oldest pending writes are dropped (and counted)
    rather than growing memory; Events are best effort by design and conditions are re-derived
    from the loop's state on its next report.
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
                log.warning("bridge.outbox_dropped", what=old[0])
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
            except Exception as e:  # best effort: a failed Event or condition is logged, never raised
                log.warning("bridge.outbox_failed", what=what, error=str(e))
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


class KubeDesiredProvider:
    """Watches CachedModels and re-evaluates node selectors when this Node's labels change.

    The Node's labels are re-read every ``relabel_check`` seconds (one GET): someone labelling a
    node ``nvidia.com/gpu.present=true`` must not wait for the label writer's heartbeat.
    """

    def __init__(
        self,
        api: KubeApi,
        node: NodeReporter,
        on_change: Callable[[DesiredState], None],
        *,
        stop: threading.Event,
        resync: float = 300.0,
        relabel_check: float = 30.0,
    ) -> None:
        self.node = node
        self.on_change = on_change
        self.stop = stop
        self.relabel_check = relabel_check
        self.watcher = CachedModelWatcher(api, self._on_snapshot, resync=resync, stop=stop)

    def _on_snapshot(self, objs: dict[str, CachedModelObj]) -> None:
        self.on_change(desired_for_node(objs, self.node.node_labels(), synced=True))

    def _foreign(self, labels: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in labels.items() if not selector.owned(k, self.node.prefix)}

    def check_node_labels(self, last: dict[str, str]) -> dict[str, str]:
        """Re-read the Node; re-evaluate selectors if labels not ours changed. Returns the labels now known."""
        try:
            now = self._foreign(self.node.refresh(self.stop))
        except AgentError as e:
            log.warning("bridge.node_read_failed", error=str(e))
            return last
        if now != last:
            log.info("bridge.node_labels_changed", labels=now)
            if self.watcher.synced.is_set():
                self._on_snapshot(self.watcher.snapshot())
        return now

    def _relabel_loop(self) -> None:
        last = self._foreign(self.node.node_labels())
        while not self.stop.wait(self.relabel_check):
            last = self.check_node_labels(last)

    def start(self) -> KubeDesiredProvider:
        self.watcher.start()
        threading.Thread(target=self._relabel_loop, name="node-selector", daemon=True).start()
        return self


def coarse_state(ready: bool, state: str) -> str:
    """What ``status.nodes`` records per node: few values, so it changes (and is written) rarely."""
    if ready:
        return "ready"
    return "failed" if state in ("failed", "damaged") else "filling"


class KubeReporter:
    """The loop's Reporter in cluster mode: labels + annotation, Events, pins, conditions.

    It owns the NodeReporter's writer thread (started by the first ``report``).

    ``InvalidSpec`` is a property of the CachedModel, not of a node: every agent sees it, but only
    the one whose write flips the ``SpecValid`` condition records the Event, so a bad spec costs one
    Event for the cluster, not one per node. When a model becomes ready again after such a problem,
    the condition is set back to True (checked once per model per agent lifetime).
    """

    def __init__(
        self,
        api: KubeApi,
        node: NodeReporter,
        events: EventRecorder,
        provider: KubeDesiredProvider,
        *,
        stop: threading.Event,
        outbox: Outbox | None = None,
    ) -> None:
        self.api = api
        self.node = node
        self.events = events
        self.provider = provider
        self.stop = stop
        self.outbox = outbox or Outbox(stop).start()
        self._lock = threading.Lock()
        self._valid_checked: set[str] = set()
        self._writer_started = False
        self._node_states: dict[str, str] = {}  # model -> coarse state last written to its status.nodes

    def report(self, ready: frozenset[str], statuses: dict[str, dict[str, object]]) -> None:
        """The loop's full conclusion; the first call also starts the Node writer.

        Not before: the writer's wish starts empty, and an empty wish means "remove every ready
        label". Started at agent start, it stripped a restarted node of all its labels until the
        loop had listed CachedModels and re-checked the disk (a flap on every DaemonSet rollout).
        """
        self.node.set_desired(
            ready_labels(self.node.prefix, ready),
            json.dumps(annotation_statuses(statuses), separators=(",", ":"), sort_keys=True),
        )
        with self._lock:
            start_writer, self._writer_started = not self._writer_started, True
            fresh = sorted(ready - self._valid_checked)
            self._valid_checked |= set(fresh)
        if start_writer:
            self.node.start(self.stop)
        for name in fresh:
            self.outbox.put(f"condition {name}", lambda n=name: self._mark_valid(n))  # type: ignore[misc]
        for name, state in self._node_state_changes(ready, statuses):
            self.outbox.put(f"nodes {name}", lambda n=name, s=state: self._set_node(n, s))  # type: ignore[misc]

    def _node_state_changes(self, ready: frozenset[str], statuses: dict[str, dict[str, object]]
                            ) -> list[tuple[str, str | None]]:
        """Models whose coarse state on this node changed since last written (None: no longer here)."""
        now = {n: coarse_state(n in ready, str(st.get("state", ""))) for n, st in statuses.items()
               if st.get("state") != "invalid"}
        with self._lock:
            changes: list[tuple[str, str | None]] = [(n, s) for n, s in now.items() if self._node_states.get(n) != s]
            changes += [(n, None) for n in self._node_states if n not in now]
            for n, s in changes:
                if s is None:
                    self._node_states.pop(n, None)
                else:
                    self._node_states[n] = s
        return changes

    def _set_node(self, name: str, state: str | None) -> None:
        try:
            set_node_state(self.api, name, self.node.node_name, state, stop=self.stop)
        except AgentError as e:
            log.warning("bridge.node_state_failed", model=name, error=str(e))
            with self._lock:  # forget it, so the next report writes it again
                if self._node_states.get(name) == state:
                    self._node_states.pop(name, None)

    def event(self, name: str, reason: str, message: str, *, warning: bool = False) -> None:
        kind: EventType = "Warning" if warning else "Normal"
        if reason == "InvalidSpec":
            with self._lock:
                self._valid_checked.discard(name)
            self.outbox.put(f"invalid {name}", lambda: self._mark_invalid(name, message, kind))
        else:
            self.outbox.put(f"event {reason} {name}", lambda: self._emit(name, reason, message, kind))

    def _emit(self, name: str, reason: str, message: str, kind: EventType) -> None:
        obj = self.provider.watcher.snapshot().get(name)
        self.events.emit("CachedModel", name, reason, message, kind, uid=obj.uid if obj and obj.uid else None)

    def _mark_invalid(self, name: str, message: str, kind: EventType) -> None:
        try:
            first = set_condition(self.api, name, SPEC_VALID, "False", "InvalidSpec", message, stop=self.stop)
        except AgentError as e:
            log.warning("bridge.condition_failed", model=name, error=str(e))
            first = True  # could not tell whether another agent reported it: better twice than never
        if first:
            self._emit(name, "InvalidSpec", message, kind)

    def _mark_valid(self, name: str) -> None:
        """Flip a SpecValid=False left by an earlier spec back to True (no write when there is none)."""
        try:
            obj = get_cached_model(self.api, name)
            conditions = (obj.get("status") or {}).get("conditions") or []
            if any(c.get("type") == SPEC_VALID and c.get("status") != "True" for c in conditions):
                set_condition(self.api, name, SPEC_VALID, "True", "Valid", "spec accepted", stop=self.stop)
        except AgentError as e:
            log.warning("bridge.condition_failed", model=name, error=str(e))
            with self._lock:
                self._valid_checked.discard(name)  # try again on a later report

    def pin(self, name: str, commit: str, revision: str) -> str:
        obj = self.provider.watcher.snapshot().get(name)
        if obj is None:
            return commit
        if obj.resolved_revision and obj.spec is not None and obj.spec.revision == revision:
            return obj.resolved_revision  # another agent pinned it since our loop looked: adopt, do not rewrite
        try:
            return pin_revision(self.api, name, commit, obj.resource_version, revision=revision, stop=self.stop)
        except AgentError as e:
            log.warning("bridge.pin_failed", model=name, error=str(e))
            return commit
