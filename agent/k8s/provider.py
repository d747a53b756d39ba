"""The desired state of this node from CachedModels: selectors evaluated against our Node's labels.

The loop is woken only when the desired state *for this node* changed. Every CachedModel event
(including the leader's status writes, which reach every agent) and every change of our Node's
labels only marks the provider dirty; a debounce thread then recomputes ``desired_for_node`` and
compares it with what the loop last got (parsed specs, pins, spec errors): equal -> nothing, so a
status-only update, a resync or a relabel that selects the same models costs no loop pass. A burst
of events within ``debounce`` seconds becomes one recomputation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import structlog

from agent.core import selector
from agent.core.desired import DesiredState
from agent.core.spec import ModelSpec
from agent.errors import SpecError
from agent.k8s.crd import CachedModelObj
from agent.k8s.threads import start_daemon

log = structlog.get_logger("agent.k8s.provider")


def desired_for_node(objs: Mapping[str, CachedModelObj], node_labels: Mapping[str, str], *,
                     synced: bool) -> DesiredState:
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


def same_desired(a: DesiredState | None, b: DesiredState) -> bool:
    """Equal for the loop's purposes (pure): specs, pins, spec errors (by message) and sync state."""
    if a is None:
        return False
    return (dict(a.models) == dict(b.models) and dict(a.pins) == dict(b.pins) and a.synced == b.synced
            and {k: str(v) for k, v in a.errors.items()} == {k: str(v) for k, v in b.errors.items()})


class KubeDesiredProvider:
    """Calls ``on_change(DesiredState)`` when the desired state for this node changed, debounced.

    ``objects()`` gives the current CachedModels (from the CachedModel watch), ``node_labels()`` our
    Node's labels; ``synced()`` says both have been read once (before that nothing is handed on:
    an empty desired state would strip every ready label).
    """

    def __init__(
        self,
        objects: Callable[[], Mapping[str, CachedModelObj]],
        node_labels: Callable[[], Mapping[str, str]],
        synced: Callable[[], bool],
        on_change: Callable[[DesiredState], None],
        *,
        stop: threading.Event,
        debounce: float = 0.2,
    ) -> None:
        self.objects = objects
        self.node_labels = node_labels
        self.synced = synced
        self.on_change = on_change
        self.stop = stop
        self.debounce = debounce
        self._dirty = threading.Event()
        self._last: DesiredState | None = None
        self.recomputed = 0  # how often the state was recomputed (events after debouncing)
        self.delivered = 0  # how often the loop was told (changes)

    def changed(self) -> None:
        """Something this node's desired state depends on may have changed (any thread, cheap)."""
        self._dirty.set()

    def current(self) -> DesiredState | None:
        return self._last

    def recompute(self) -> bool:
        """Recompute now; hand it on if it differs from the last one. True when handed on."""
        if not self.synced():
            return False
        desired = desired_for_node(self.objects(), self.node_labels(), synced=True)
        self.recomputed += 1
        if same_desired(self._last, desired):
            return False
        self._last = desired
        self.delivered += 1
        log.info("desired.changed", models=sorted(desired.models), errors=sorted(desired.errors),
                 pins=len(desired.pins))
        try:
            self.on_change(desired)
        except Exception:  # the loop's bug must not kill the provider
            log.exception("desired.on_change_failed")
        return True

    def run(self) -> None:
        while not self.stop.is_set():
            self._dirty.wait()
            if self.stop.is_set():
                return
            self.stop.wait(self.debounce)  # let the burst land
            self._dirty.clear()
            self.recompute()

    def start(self) -> threading.Thread:
        return start_daemon(self.run, "desired-state", self.stop, self._dirty.set)
