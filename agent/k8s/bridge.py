"""Connects the loop to the cluster: CachedModels -> DesiredState, loop conclusions -> Node and CRs.

The loop only sees our own types (DesiredState, ModelSpec); this is where CachedModelObj, node
labels and the pin CAS are translated.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import structlog

from agent import selector
from agent.desired import DesiredState
from agent.errors import AgentError, SpecError
from agent.k8s.client import KubeApi
from agent.k8s.crd import CachedModelObj, CachedModelWatcher, pin_revision, set_condition
from agent.k8s.events import EventRecorder
from agent.k8s.node import NodeReporter, ready_labels
from agent.spec import ModelSpec

log = structlog.get_logger("agent.k8s.bridge")


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


class KubeDesiredProvider:
    """Watches CachedModels and re-evaluates node selectors when this Node's labels change."""

    def __init__(self, api: KubeApi, node: NodeReporter, on_change: Callable[[DesiredState], None], *,
                 stop: threading.Event, resync: float = 300.0, relabel_check: float = 30.0) -> None:
        self.node = node
        self.on_change = on_change
        self.stop = stop
        self.relabel_check = relabel_check
        self.watcher = CachedModelWatcher(api, self._on_snapshot, resync=resync, stop=stop)

    def _on_snapshot(self, objs: dict[str, CachedModelObj]) -> None:
        self.on_change(desired_for_node(objs, self.node.node_labels(), synced=True))

    def _relabel_loop(self) -> None:
        last = self.node.node_labels()
        while not self.stop.wait(self.relabel_check):
            now = self.node.node_labels()
            if {k: v for k, v in now.items() if not selector.owned(k, self.node.prefix)} != {
                k: v for k, v in last.items() if not selector.owned(k, self.node.prefix)
            }:
                last = now
                if self.watcher.synced.is_set():
                    self._on_snapshot(self.watcher.snapshot())

    def start(self) -> KubeDesiredProvider:
        self.watcher.start()
        threading.Thread(target=self._relabel_loop, name="node-selector", daemon=True).start()
        return self


class KubeReporter:
    """The loop's Reporter in cluster mode: labels + annotation, Events, pins, conditions."""

    def __init__(self, api: KubeApi, node: NodeReporter, events: EventRecorder, provider: KubeDesiredProvider,
                 *, stop: threading.Event) -> None:
        self.api = api
        self.node = node
        self.events = events
        self.provider = provider
        self.stop = stop

    def report(self, ready: frozenset[str], statuses: dict[str, dict[str, object]]) -> None:
        self.node.set_desired(ready_labels(self.node.prefix, ready),
                              json.dumps(statuses, separators=(",", ":"), sort_keys=True))

    def event(self, name: str, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.emit("CachedModel", name, reason, message, "Warning" if warning else "Normal")
        if reason == "InvalidSpec":
            try:
                set_condition(self.api, name, "SpecValid", "False", "InvalidSpec", message, stop=self.stop)
            except AgentError as e:
                log.warning("bridge.condition_failed", model=name, error=str(e))

    def pin(self, name: str, commit: str, revision: str) -> str:
        obj = self.provider.watcher.snapshot().get(name)
        if obj is None:
            return commit
        try:
            return pin_revision(self.api, name, commit, obj.resource_version, revision=revision, stop=self.stop)
        except AgentError as e:
            log.warning("bridge.pin_failed", model=name, error=str(e))
            return commit
