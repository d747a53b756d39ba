"""The pods bound to this node, reduced to the models they use (in-use protection against eviction).

One watch, ``fieldSelector=spec.nodeName=<node>`` across namespaces (the API server indexes this
field for kubelet, so it is cheap at any cluster size). Each Pod is reduced to a ``PodView`` by the
pure rules in ``agent.core.inuse``; ``on_in_use(InUse)`` is called with the set of models in use
and the last time each was seen in use, whenever the set changes (and once after the first list,
with ``synced=True``). RBAC: pods list, watch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from agent.core.inuse import InUse, PodView, models_in_use, pod_view, track
from agent.k8s.client import KubeApi
from agent.k8s.watch import Reflector, WatchSettings, WatchTarget

log = structlog.get_logger("agent.k8s.pods")


class PodWatch:
    """Follows this node's pods; see the module docstring."""

    def __init__(
        self,
        api: KubeApi,
        node_name: str,
        prefix: str,
        on_in_use: Callable[[InUse], None],
        *,
        stop: threading.Event,
        watch: WatchSettings | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.prefix = prefix
        self.on_in_use = on_in_use
        self.wall = wall
        self._lock = threading.Lock()
        self._in_use = InUse()
        target = WatchTarget(f"pods on {node_name}", api.core.list_pod_for_all_namespaces,
                             field_selector=f"spec.nodeName={node_name}", need="list, watch pods")
        self.reflector: Reflector[PodView] = Reflector(api, target, lambda o: pod_view(o, prefix), stop=stop,
                                                       on_change=self._changed, settings=watch)

    def current(self) -> InUse:
        with self._lock:
            return self._in_use

    def _changed(self) -> None:
        models = models_in_use(self.reflector.items().values(), self.prefix)
        with self._lock:
            if self._in_use.synced and models == self._in_use.models:
                return
            self._in_use = track(self._in_use, models, self.wall())
            current = self._in_use
        log.info("pods.in_use", models=sorted(models))
        self.on_in_use(current)

    def start(self) -> threading.Thread:
        return self.reflector.start("pod-watch")
