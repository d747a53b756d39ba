"""Transitional: the names today's ``run_agent`` imports, backed by ``agent.k8s.wiring``.

``run_agent`` still builds ``NodeReporter``, ``KubeDesiredProvider(api, node, on_change, ...)`` and
``KubeReporter(api, node, events, provider, ...)`` itself. These two classes keep that working on the
new control plane (watches, leader election, aggregation) with ``KubeSettings`` defaults (the
namespace from POD_NAMESPACE or the ServiceAccount). Delete this module once ``run_agent`` calls
``wiring.start_cluster_parts`` (which also passes the config file's Kubernetes settings).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from agent.core.desired import DesiredState
from agent.core.inuse import InUse
from agent.k8s.client import KubeApi
from agent.k8s.events import EventRecorder
from agent.k8s.node import NodeReporter
from agent.k8s.provider import desired_for_node  # noqa: F401  (re-exported for older imports)
from agent.k8s.reporter import PROGRESS_STEP, Outbox, annotation_statuses  # noqa: F401
from agent.k8s.settings import KubeSettings, default_namespace
from agent.k8s.wiring import ClusterParts, LoopHooks


class KubeDesiredProvider:
    """Owns a ClusterParts built from the pieces run_agent made; ``start`` starts all of it."""

    def __init__(self, api: KubeApi, node: NodeReporter, on_change: Callable[[DesiredState], None], *,
                 stop: threading.Event, resync: float = 300.0,
                 on_in_use: Callable[[InUse], None] | None = None) -> None:
        """``on_in_use`` (e.g. ``lambda u: loop.set_in_use(u.models)``) turns on the pod watch."""
        ks = KubeSettings(lease_namespace=default_namespace(os.environ))
        self.parts = ClusterParts(api, ks, node.node_name, node.prefix, LoopHooks(on_change, on_in_use), stop,
                                  node=node)

    def start(self) -> KubeDesiredProvider:
        self.parts.start()
        return self


class KubeReporter:
    """The loop's Reporter: delegates to the ClusterParts' reporter."""

    def __init__(self, api: KubeApi, node: NodeReporter, events: EventRecorder, provider: KubeDesiredProvider, *,
                 stop: threading.Event) -> None:
        self._reporter = provider.parts.reporter

    def report(self, ready: frozenset[str], statuses: dict[str, dict[str, object]]) -> None:
        self._reporter.report(ready, statuses)

    def event(self, name: str, reason: str, message: str, *, warning: bool = False) -> None:
        self._reporter.event(name, reason, message, warning=warning)

    def pin(self, name: str, commit: str, revision: str) -> str:
        return self._reporter.pin(name, commit, revision)
