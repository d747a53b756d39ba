"""This node's ready labels and status annotation, kept in step with what the loop wants.

The Node is *watched* (one watch, ``fieldSelector=metadata.name=<node>``), not polled: the agent
always knows its Node's labels, re-evaluates CachedModel selectors when someone relabels the node,
and repairs within a second a ready label that someone else removed or changed.

Writes are coalesced, level-based, like node-problem-detector's condition manager: ``set_desired``
only records the latest wish (cheap, any thread, any rate); the writer thread sends at most one
JSON merge patch whenever the wish differs from the Node as last seen:

- labels differ (a model became ready or stopped being ready, or drift), or the caller marked the
  wish urgent (a revision proposal the leader is waiting for): patch now (after ``settle``, so a
  burst of wishes is one patch);
- only the status annotation differs (fill progress, a state the labels do not show): patch at
  most once per ``status_interval``, so a node filling ten models does not write every second;
- after a failure, back off; a drift repaired again and again (someone insists on removing our
  label) backs off too, so two controllers never fight at full speed.

The patch names only keys under ``<prefix>/`` (null deletes), so labels owned by kubelet, GPU
operators or people are never touched, and concurrent writers of other keys never conflict.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.core.retry import RetryPolicy, fight_pause
from agent.core.selector import READY, label_patch, status_key
from agent.errors import KubeApiError
from agent.k8s.client import MERGE_PATCH, KubeApi, request
from agent.k8s.threads import start_daemon
from agent.k8s.watch import Reflector, WatchSettings, WatchTarget

log = structlog.get_logger("agent.k8s.node")
WRITE_BACKOFF = RetryPolicy(attempts=1_000_000, base=0.5, cap=30.0)
DRIFT_WINDOW = 60.0  # repairs within this many seconds of each other count as one fight


def ready_labels(prefix: str, names: Iterable[str]) -> dict[str, str]:
    """The desired label set for the models that are complete and verified on this node."""
    return {f"{prefix}/{name}": READY for name in names}


@dataclass(frozen=True)
class NodeView:
    """The parts of our Node the agent reads."""

    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any]) -> NodeView:
        meta = obj.get("metadata") or {}
        return cls(dict(meta.get("labels") or {}), dict(meta.get("annotations") or {}),
                   str(meta.get("resourceVersion", "")))


def _older(a: str, b: str) -> bool:
    """a is an older resourceVersion than b (they are opaque, but integers on every real API server)."""
    try:
        return int(a) < int(b)
    except ValueError:
        return False


class NodeReporter:
    """Publishes ``<prefix>/<model>=ready`` labels and the ``<prefix>/status`` annotation for one Node."""

    def __init__(
        self,
        api: KubeApi,
        node_name: str,
        prefix: str = "modelcache.dev",
        *,
        clock: Callable[[], float] = time.monotonic,
        settle: float = 0.05,
        status_interval: float = 10.0,
        backoff: RetryPolicy = WRITE_BACKOFF,
        watch: WatchSettings | None = None,
        on_labels: Callable[[], None] | None = None,
    ) -> None:
        self.api = api
        self.node_name = node_name
        self.prefix = prefix
        self.clock = clock
        self.settle = settle
        self.status_interval = status_interval
        self.backoff = backoff
        self.watch_settings = watch
        self.on_labels = on_labels  # called when labels not ours changed (selectors must be re-evaluated)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._desired: dict[str, str] | None = None  # None until the loop's first report
        self._desired_status: str | None = None
        self._urgent = False
        self._seen: NodeView | None = None
        self._last_write = float("-inf")
        self._failures = 0
        self._need_get = False
        self._repairs: list[float] = []
        self._written: dict[str, str] = {}  # our labels as of our last successful write
        self.stats: Counter[str] = Counter()  # patches, failures, drift_repairs
        self.last_error: str | None = None
        self.reflector: Reflector[NodeView] | None = None

    # ---- called by the loop (any thread) ------------------------------------------------------
    def set_desired(self, labels: Mapping[str, str], status_annotation: str | None = None, *,
                    urgent: bool = False) -> None:
        """Record the full desired set of prefix labels (and the status JSON); cheap, thread-safe.

        Anything under the prefix that is not in ``labels`` is removed on the next write: passing the
        set of models verified on disk at start removes stale ready labels from an earlier run.
        ``status_annotation=None`` leaves the annotation as it is.
        """
        wanted = {k: v for k, v in labels.items() if k.startswith(self.prefix + "/") and k != status_key(self.prefix)}
        if len(wanted) != len(labels):
            raise ValueError(f"labels outside {self.prefix}/ are not ours to set: {sorted(set(labels) - set(wanted))}")
        with self._lock:
            if wanted == self._desired and status_annotation == self._desired_status and not urgent:
                return
            self._desired = wanted
            self._desired_status = status_annotation
            self._urgent = self._urgent or urgent
        self._wake.set()

    def node_labels(self) -> dict[str, str]:
        """All labels of the Node as last seen (watch, read or our own write); a copy."""
        with self._lock:
            return dict(self._seen.labels) if self._seen is not None else {}

    def known(self) -> bool:
        with self._lock:
            return self._seen is not None

    # ---- what the Node looks like -------------------------------------------------------------
    def _remember(self, view: NodeView, *, from_watch: bool) -> None:
        with self._lock:
            old = self._seen
            if old is not None and _older(view.resource_version, old.resource_version):
                return  # a watch event older than our own write's answer
            self._seen = view
        if old is None or self._foreign(old.labels) != self._foreign(view.labels):
            if old is not None:
                log.info("node.labels_changed", node=self.node_name, labels=self._foreign(view.labels))
            if self.on_labels is not None:
                self.on_labels()
        if from_watch and self._pending(view):
            self._wake.set()  # drift (or a wish the last write could not finish): look again

    def _foreign(self, labels: Mapping[str, str]) -> dict[str, str]:
        return {k: v for k, v in labels.items() if not k.startswith(self.prefix + "/")}

    def refresh(self, stop: threading.Event | None = None, *, policy: RetryPolicy | None = None) -> dict[str, str]:
        """GET the Node (start-up, and after a failed write); raises KubeApiError after retries."""
        node = request(self.api, self.api.core.read_node, self.node_name, what=f"get node {self.node_name}",
                       stop=stop, policy=policy)
        self._remember(NodeView.from_obj(node), from_watch=False)
        return self.node_labels()

    def watch(self, stop: threading.Event) -> Reflector[NodeView]:
        """Start the one watch on our Node (fieldSelector=metadata.name=<node>)."""
        target = WatchTarget(f"node {self.node_name}", self.api.core.list_node,
                             field_selector=f"metadata.name={self.node_name}", need="list, watch nodes")
        self.reflector = Reflector(self.api, target, NodeView.from_obj, stop=stop, settings=self.watch_settings,
                                   clock=self.clock, on_change=self._on_watch)
        self.reflector.start(f"node-watch-{self.node_name}")
        return self.reflector

    def _on_watch(self) -> None:
        assert self.reflector is not None
        view = self.reflector.get(self.node_name)
        if view is not None:
            self._remember(view, from_watch=True)

    # ---- writing ------------------------------------------------------------------------------
    def _patch_for(self, seen: NodeView) -> dict[str, Any]:
        with self._lock:
            desired, status = self._desired, self._desired_status
        meta: dict[str, Any] = {}
        if desired is None:
            return meta
        labels = label_patch(seen.labels, desired, self.prefix)
        if labels:
            meta["labels"] = labels
        skey = status_key(self.prefix)
        if status is not None and seen.annotations.get(skey) != status:
            meta["annotations"] = {skey: status}
        return meta

    def _pending(self, seen: NodeView) -> bool:
        return bool(self._patch_for(seen))

    def due(self, now: float) -> float | None:
        """Seconds until a write is due (0: now), None when the Node already shows the wish."""
        with self._lock:
            seen, urgent, last = self._seen, self._urgent, self._last_write
        if seen is None:
            return 0.0 if self._desired is not None else None
        meta = self._patch_for(seen)
        if not meta:
            return None
        if "labels" in meta or urgent:
            return 0.0
        return max(0.0, last + self.status_interval - now)

    def flush(self, stop: threading.Event | None = None) -> bool:
        """Write once if anything differs; False only when the API failed (the wish stays pending).

        Never raises for API errors: a failure is remembered (the next flush re-reads the Node) and
        the writer retries, so the loop can keep filling models through an API outage.
        """
        with self._lock:
            has_wish = self._desired is not None
        if not has_wish:
            return True
        try:
            if self._need_get or not self.known():
                self.refresh(stop)
                self._need_get = False
            with self._lock:
                seen = self._seen
                drift_only = not self._urgent
                wanted = dict(self._desired or {})
            assert seen is not None
            meta = self._patch_for(seen)
            if not meta:
                with self._lock:
                    self._urgent = False
                return True
            what = f"patch node {self.node_name}"
            node = request(self.api, self.api.core.patch_node, self.node_name, {"metadata": meta}, what=what,
                           stop=stop, retry_conflicts=True, _content_type=MERGE_PATCH)
        except KubeApiError as e:
            with self._lock:
                self._need_get = True
                self._failures += 1
                self.last_error = str(e)
            self.stats["failures"] += 1
            log.warning("node.patch_failed", node=self.node_name, error=str(e), permanent=e.permanent,
                        need="patch nodes" if e.status == 403 else None)
            return False
        now = self.clock()
        repair = drift_only and "labels" in meta and self._was_repair(seen)
        with self._lock:
            self._urgent = False
            self._failures = 0
            self.last_error = None
            self._last_write = now
            self._written = wanted
        self.stats["patches"] += 1
        if repair:
            self.stats["drift_repairs"] += 1
            self._repairs = [t for t in self._repairs if now - t < DRIFT_WINDOW] + [now]
            log.warning("node.drift_repaired", node=self.node_name, labels=meta["labels"])
        self._remember(NodeView.from_obj(node), from_watch=False)
        log.info("node.patched", node=self.node_name, labels=meta.get("labels"),
                 status=status_key(self.prefix) in meta.get("annotations", {}))
        return True

    def _was_repair(self, seen: NodeView) -> bool:
        """Did someone else remove or change one of our labels (rather than us wanting something new)?"""
        with self._lock:
            desired = self._desired or {}
            written = self._written
        return any(written.get(k) == v and seen.labels.get(k) != v for k, v in desired.items())

    def _repair_pause(self, now: float) -> float:
        """Back off repeated drift repairs: 1 s, 2 s, 4 s ... up to 60 s while the fight goes on."""
        return fight_pause(self._repairs, now, DRIFT_WINDOW)

    def run(self, stop: threading.Event) -> None:
        """The writer thread: flush when due; back off after failures and repeated repairs."""
        while not stop.is_set():
            now = self.clock()
            due = self.due(now)
            if due is not None and due <= 0:
                due = self._repair_pause(now)
            if due is None or due > 0:
                self._wake.wait(due)
                self._wake.clear()
                continue
            stop.wait(self.settle)  # let a burst of set_desired calls land: one patch for all
            if stop.is_set():
                return
            if not self.flush(stop):
                self._wake.wait(self.backoff.delay(min(self._failures, 30)))
                self._wake.clear()

    def start(self, stop: threading.Event) -> threading.Thread:
        return start_daemon(lambda: self.run(stop), f"node-reporter-{self.node_name}", stop, self._wake.set)
