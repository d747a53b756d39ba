"""The elected leader's job: every CachedModel's status, aggregated from the agents' Nodes.

Only while ``elector.is_leader()`` (checked right before each write, and each write's timeout is
cut to the leadership left), the aggregator:

1. watches the agent Nodes (one watch, label selector ``aggregateNodeSelector``; each Node reduced
   to a small ``NodeReport``: our labels and the status annotation), started when leadership is
   won and stopped when it is lost, so followers carry no cluster-wide watch;
2. recomputes each CachedModel's status with the pure ``agent.core.aggregate.desired_status`` when
   anything changed, and writes the difference as one merge patch guarded by the CachedModel's
   resourceVersion, at most once per ``interval`` per CachedModel (a new revision pin and the
   answer to a spec edit go out at once), and never when nothing changed;
3. records the InvalidSpec Event once for the cluster when its write flips ``SpecValid`` to False.

A new leader computes the same status from the same Nodes, so a failover writes nothing (no
flapping). A 409 means the object moved on (a user edit, a stale leader's write landing late):
nothing is resent; the CachedModel watch delivers the new version and the next pass decides again.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from agent.core.aggregate import SPEC_VALID, ModelFacts, NodeReport, desired_status, parse_node_report, status_patch
from agent.errors import KubeApiError, KubeConflictError
from agent.k8s.client import KubeApi
from agent.k8s.crd import CachedModelObj, parse_cached_model, rfc3339, write_status
from agent.k8s.events import EventRecorder
from agent.k8s.leader import Elector
from agent.k8s.threads import start_daemon
from agent.k8s.watch import Reflector, WatchSettings, WatchTarget

log = structlog.get_logger("agent.k8s.aggregator")


def facts(obj: CachedModelObj) -> ModelFacts:
    revision = obj.spec.revision if obj.spec is not None else None
    return ModelFacts(obj.name, obj.generation, revision, str(obj.error) if obj.error is not None else None,
                      obj.status)


def _spec_valid(status: Mapping[str, Any]) -> tuple[str | None, str | None]:
    for c in status.get("conditions") or []:
        if isinstance(c, Mapping) and c.get("type") == SPEC_VALID:
            return c.get("status"), c.get("message")
    return None, None


class Aggregator:
    """Writes CachedModel statuses while this agent leads; see the module docstring."""

    def __init__(
        self,
        api: KubeApi,
        objects: Callable[[], Mapping[str, CachedModelObj]],
        objects_synced: Callable[[], bool],
        elector: Elector,
        events: EventRecorder | None,
        *,
        prefix: str,
        stop: threading.Event,
        interval: float = 5.0,
        node_selector: str = "",
        watch: WatchSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.objects = objects
        self.objects_synced = objects_synced
        self.elector = elector
        self.events = events
        self.prefix = prefix
        self.stop = stop
        self.interval = interval
        self.node_selector = node_selector
        self.watch_settings = watch
        self.clock = clock
        self.wall = wall
        self._wake = threading.Event()
        self._dirty = True
        self._nodes: Reflector[NodeReport] | None = None
        self._nodes_stop: threading.Event | None = None
        self._last_write: dict[str, float] = {}
        self._own: dict[str, CachedModelObj] = {}  # the answers to our own writes, until the watch has them
        self._last_pass = float("-inf")
        self.stats: Counter[str] = Counter()  # passes, writes, conflicts, failures, events, terms

    # ---- inputs ---------------------------------------------------------------------------------
    def mark_dirty(self) -> None:
        self._dirty = True
        self._wake.set()

    def leadership_changed(self, leading: bool) -> None:
        self.mark_dirty()

    # ---- the node watch, for one term of leadership -------------------------------------------------
    def _parse_node(self, obj: Mapping[str, Any]) -> NodeReport | None:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        annotation = (meta.get("annotations") or {}).get(f"{self.prefix}/status")
        report = parse_node_report(str(meta.get("name", "")), labels, annotation, self.prefix)
        return report if report.labels or report.states or annotation is not None else None

    def _start_nodes(self) -> None:
        self._nodes_stop = threading.Event()
        target = WatchTarget("agent nodes", self.api.core.list_node, label_selector=self.node_selector or None,
                             need="list, watch nodes")
        self._nodes = Reflector(self.api, target, self._parse_node, stop=self._nodes_stop,
                                on_change=self.mark_dirty, settings=self.watch_settings, clock=self.clock)
        self._nodes.start("leader-node-watch")
        self.stats["terms"] += 1
        log.info("aggregator.leading", selector=self.node_selector or "(all nodes)")

    def _stop_nodes(self) -> None:
        if self._nodes_stop is not None:
            self._nodes_stop.set()
        self._nodes, self._nodes_stop = None, None
        self._last_write.clear()
        self._own.clear()
        log.info("aggregator.standing_down")

    def node_reports(self) -> list[NodeReport]:
        return list(self._nodes.items().values()) if self._nodes is not None else []

    # ---- one pass -------------------------------------------------------------------------------------
    def step(self, now: float | None = None) -> float | None:
        """Write what differs and is due; returns seconds until something deferred is due (None: nothing)."""
        now = self.clock() if now is None else now
        self._dirty = False
        self._last_pass = now
        self.stats["passes"] += 1
        nodes = self.node_reports()
        stamp = rfc3339(self.wall())
        next_due: float | None = None
        for name, obj in sorted(self.objects().items()):
            obj = self._newest(obj)
            want = desired_status(facts(obj), nodes, stamp)
            patch = status_patch(obj.status, want)
            if patch is None:
                continue
            # Not held back by the interval: a new pin (agents wait for it) and the answer to a spec
            # edit (a person waits for it); both happen once per change, not once per node.
            urgent = ("resolvedRevision" in patch and want.get("resolvedRevision") is not None) \
                or "observedGeneration" in patch
            due = self._last_write.get(name, float("-inf")) + self.interval
            if now < due and not urgent:
                next_due = due if next_due is None else min(next_due, due)
                continue
            if not self.elector.is_leader():
                return None
            self._write(obj, patch, now)
        if next_due is None:
            return None
        self._dirty = True  # something was deferred: the next pass is due then
        return max(0.0, next_due - now)

    def _newest(self, obj: CachedModelObj) -> CachedModelObj:
        """The watch's version, or the answer to our own last write if the watch has not caught up with it
        (writing on the older version would only earn us a 409 from ourselves)."""
        own = self._own.get(obj.name)
        if own is None or own.uid != obj.uid:
            return obj
        try:
            newer = int(own.resource_version) > int(obj.resource_version)
        except ValueError:
            newer = False
        if not newer:
            self._own.pop(obj.name, None)
        return own if newer else obj

    def _write(self, obj: CachedModelObj, patch: Mapping[str, Any], now: float) -> None:
        timeout = max(0.1, min(self.api.request_timeout, self.elector.remaining()))
        try:
            answer = write_status(self.api, obj.name, obj.resource_version, patch, timeout=timeout)
        except KubeConflictError:
            self.stats["conflicts"] += 1
            log.info("aggregator.conflict", model=obj.name, resource_version=obj.resource_version)
            return
        except KubeApiError as e:
            if e.status != 404:  # 404: deleted meanwhile, its watch event is on the way
                self.stats["failures"] += 1
                self._dirty = True
                log.warning("aggregator.write_failed", model=obj.name, error=str(e),
                            need="patch cachedmodels/status" if e.status == 403 else None)
            return
        self.stats["writes"] += 1
        self._last_write[obj.name] = now
        self._own[obj.name] = parse_cached_model(answer)
        log.info("aggregator.status_written", model=obj.name, **{k: v for k, v in patch.items()
                                                                  if k in ("readyNodes", "desiredNodes", "failedNodes",
                                                                           "resolvedRevision")})
        self._maybe_event(obj, patch)

    def _maybe_event(self, obj: CachedModelObj, patch: Mapping[str, Any]) -> None:
        """One InvalidSpec Event per cluster: by the leader whose write flipped SpecValid to False."""
        if self.events is None or "conditions" not in patch:
            return
        old_status, old_msg = _spec_valid(obj.status)
        new_status, new_msg = _spec_valid({"conditions": patch["conditions"]})
        if new_status == "False" and (old_status != "False" or old_msg != new_msg):
            self.stats["events"] += 1
            self.events.emit("CachedModel", obj.name, "InvalidSpec", str(new_msg), "Warning", uid=obj.uid or None)

    # ---- running ----------------------------------------------------------------------------------------
    def run_once(self) -> float | None:
        """Follow leadership and run a pass when dirty; returns how long to wait at most (None: until woken)."""
        leading = self.elector.is_leader()
        if leading and self._nodes is None:
            self._start_nodes()
        elif not leading and self._nodes is not None:
            self._stop_nodes()
        if not leading or self._nodes is None:
            # The elector's on_change wakes us on a new term; also look now and then, since a renewal
            # that was merely late makes us leader again without a new term.
            return self.interval
        left = max(0.05, self.elector.remaining())  # look again when leadership would lapse unrenewed
        if not (self._nodes.synced.is_set() and self.objects_synced()):
            return min(0.2, left)
        now = self.clock()
        if not self._dirty:
            return left
        gap = self._last_pass + min(1.0, self.interval / 5) - now
        if gap > 0:
            return min(gap, left)  # a storm of Node events: at most a few passes a second
        wait = self.step(now)
        return min(wait, left) if wait is not None else left

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                wait = self.run_once()
            except Exception:
                log.exception("aggregator.pass_failed")
                wait = self.interval
            self._wake.wait(wait)
            self._wake.clear()
        if self._nodes is not None:
            self._stop_nodes()

    def start(self) -> threading.Thread:
        return start_daemon(self.run, "aggregator", self.stop, self._wake.set)
