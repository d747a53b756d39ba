"""Everything an agent runs against the API server, built and started in one place.

``run_agent`` (cluster mode) does::

    hooks = LoopHooks(on_desired=lambda d: rec.set_desired(d),          # the Reconciler, bound late
                      on_in_use=lambda u: rec.set_in_use(u.models))     # turns the pod watch on
    parts = start_cluster_parts(settings.kube, hooks, stop, node_name=settings.node_name,
                                prefix=settings.label_prefix, kube_host=settings.kube_host,
                                start=False)                            # blocks until our Node is read
    if parts is None:                                                   # stopped while waiting
        return 0
    rec = Reconciler(..., reporter=parts.reporter, ...)                 # Reporter: report/event/pin
    parts.start()                                                       # hooks fire from here on
    ...
    stop.set(); rec.shutdown(budget); parts.close()                     # releases the leader Lease

``start_cluster_parts`` waits for the API server forever (a 403, 404 or 401 at start is logged
every attempt with the permission or setting that is missing, never an exit 1 that would put the
DaemonSet pod in CrashLoopBackOff), so call it after /healthz is served, or from a thread.

What runs (per agent, all sharing one rate-limited client):
- watches: CachedModels, our Node (``metadata.name``), our Pods (``spec.nodeName``, with
  ``on_in_use``), the leader Lease (``metadata.name``); plus, while leader, the agent Nodes;
- the desired-state provider (debounced, hands on changes only), the Node writer (started by the
  loop's first report), the elector, the aggregator (acts only while leader).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from agent.core.desired import DesiredState
from agent.core.inuse import InUse
from agent.core.retry import RetryPolicy
from agent.errors import KubeApiError
from agent.k8s.aggregator import Aggregator
from agent.k8s.client import KubeApi, make_api, name_client
from agent.k8s.crd import GROUP, PLURAL, VERSION, CachedModelObj, parse_cached_model
from agent.k8s.events import EventRecorder
from agent.k8s.leader import ElectionTiming, Elector, boottime
from agent.k8s.lease import LeaseRecord, LeaseStore
from agent.k8s.node import NodeReporter
from agent.k8s.pods import PodWatch
from agent.k8s.provider import KubeDesiredProvider
from agent.k8s.reporter import KubeReporter
from agent.k8s.settings import KubeSettings
from agent.k8s.watch import Reflector, WatchSettings, WatchTarget

log = structlog.get_logger("agent.k8s.wiring")
# Gentle growth, 10 s cap: an agent is back within seconds of an API server restart; jitter spreads a fleet.
START_BACKOFF = RetryPolicy(attempts=1_000_000, base=0.5, factor=1.5, cap=10.0)
RBAC_FILE = "manifests/rbac.yaml"


@dataclass(frozen=True)
class LoopHooks:
    """Where cluster facts go: the loop's inputs."""

    on_desired: Callable[[DesiredState], None]
    on_in_use: Callable[[InUse], None] | None = None


def watch_settings(ks: KubeSettings) -> WatchSettings:
    return WatchSettings(timeout=ks.watch_timeout, relist_jitter=min(2.0, ks.watch_timeout / 10))


def wait_for_api(node: NodeReporter, stop: threading.Event, *, policy: RetryPolicy = START_BACKOFF,
                 rng: random.Random | None = None) -> bool:
    """Read our Node until it works; False if stopped first. Never raises for API errors.

    Selectors are evaluated against this Node's labels, so nothing starts before they are known.
    Each failure is logged with what to fix: a 403 names the verb and resource the ServiceAccount
    lacks, a 404 the NODE_NAME that matches no Node, 401 the credentials; anything else (API server
    restarting) is ``agent.api_unreachable``. The pause grows to ``policy.cap`` (10 s).
    """
    attempt = 0
    one_try = RetryPolicy(attempts=1)
    while not stop.is_set():
        try:
            node.refresh(stop, policy=one_try)
            if attempt:
                log.info("agent.api_reachable", node=node.node_name, after_attempts=attempt)
            return True
        except KubeApiError as e:
            attempt += 1
            pause = policy.delay(attempt, rng)
            if e.status == 403:
                log.warning("agent.forbidden", node=node.node_name, error=str(e), retry_in=round(pause, 2),
                            need=f"get nodes (ClusterRole model-cache-agent, {RBAC_FILE})")
            elif e.status == 404:
                log.warning("agent.node_not_found", node=node.node_name, retry_in=round(pause, 2),
                            error=f"NODE_NAME={node.node_name!r} names no Node (set it from spec.nodeName)")
            elif e.status == 401:
                log.warning("agent.unauthorized", node=node.node_name, error=str(e), retry_in=round(pause, 2))
            else:
                log.warning("agent.api_unreachable", node=node.node_name, error=str(e), retry_in=round(pause, 2))
            stop.wait(pause)
    return False


class ClusterParts:
    """The agent's cluster side; ``start`` it, hand ``reporter`` to the loop, ``close`` it after stop."""

    def __init__(
        self,
        api: KubeApi,
        ks: KubeSettings,
        node_name: str,
        prefix: str,
        hooks: LoopHooks,
        stop: threading.Event,
        *,
        node: NodeReporter | None = None,
        events: EventRecorder | None = None,
        clock: Callable[[], float] = time.monotonic,
        elector_clock: Callable[[], float] | None = None,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.api = api
        self.ks = ks
        self.node_name = node_name
        self.stop = stop
        ws = watch_settings(ks)
        name_client(api, node_name)
        self.node = node or NodeReporter(api, node_name, prefix, status_interval=ks.node_status_interval, watch=ws,
                                         clock=clock)
        self.node.watch_settings = ws
        self.node.on_labels = self._node_labels_changed
        self.events = events or EventRecorder(api, node_name=node_name)
        self.crs: Reflector[CachedModelObj] = Reflector(
            api, WatchTarget("cachedmodels", api.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL),
                             need="list, watch cachedmodels"),
            parse_cached_model, stop=stop, on_change=self._crs_changed, settings=ws, clock=clock)
        self.provider = KubeDesiredProvider(self.objects, self.node.node_labels, self._synced, hooks.on_desired,
                                            stop=stop, debounce=ks.desired_debounce)
        self.lease_api = api.fork()  # renewals never wait behind a burst of status writes
        self.elector = Elector(
            LeaseStore(self.lease_api, ks.lease_namespace, stop=stop, wall=wall), ks.lease_name, node_name,
            timing=ElectionTiming(ks.lease_duration, ks.lease_renew_period, ks.lease_renew_deadline,
                                  ks.lease_acquire_jitter, retry=min(1.0, ks.lease_renew_period / 4)),
            stop=stop, clock=elector_clock or boottime, rng=rng, on_change=self._leadership_changed)
        self.lease_key = f"{ks.lease_namespace}/{ks.lease_name}"
        self.lease_watch: Reflector[LeaseRecord] = Reflector(
            api, WatchTarget(f"lease {self.lease_key}", api.coordination.list_namespaced_lease,
                             (ks.lease_namespace,), field_selector=f"metadata.name={ks.lease_name}",
                             need=f"list, watch leases in namespace {ks.lease_namespace}"),
            LeaseRecord.from_obj, stop=stop, on_change=self._lease_changed, settings=ws, clock=clock)
        self.aggregator = Aggregator(api, self.objects, self.crs.synced.is_set, self.elector, self.events,
                                     prefix=prefix, stop=stop, interval=ks.aggregate_interval,
                                     node_selector=ks.aggregate_node_selector, watch=ws, clock=clock, wall=wall)
        self.reporter = KubeReporter(api, self.node, self.events, self.objects, stop=stop, pin_wait=ks.pin_wait,
                                     leader_known=lambda: self.elector.holder() != "", clock=clock)
        self.pods = PodWatch(api, node_name, prefix, hooks.on_in_use, stop=stop, watch=ws, wall=wall) \
            if hooks.on_in_use is not None else None
        self._threads: list[threading.Thread] = []

    # ---- fan-out of watch changes ----------------------------------------------------------------
    def objects(self) -> dict[str, CachedModelObj]:
        return self.crs.items()

    def _synced(self) -> bool:
        return self.crs.synced.is_set() and self.node.known()

    def _crs_changed(self) -> None:
        self.provider.changed()
        self.reporter.crs_changed()
        self.aggregator.mark_dirty()

    def _node_labels_changed(self) -> None:
        self.provider.changed()

    def _lease_changed(self) -> None:
        self.elector.observe(self.lease_watch.get(self.lease_key))

    def _leadership_changed(self, leading: bool) -> None:
        self.aggregator.leadership_changed(leading)

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> ClusterParts:
        self.node.watch(self.stop)
        self._threads += [self.crs.start("cachedmodel-watch"), self.provider.start(),
                          self.lease_watch.start("lease-watch"), self.elector.start(), self.aggregator.start()]
        if self.pods is not None:
            self._threads.append(self.pods.start())
        return self

    def health(self) -> dict[str, Any]:
        """For /readyz and logs: which watches have synced, and who leads."""
        return {
            "node_watch": bool(self.node.reflector and self.node.reflector.synced.is_set()),
            "cachedmodels_watch": self.crs.synced.is_set(),
            "pods_watch": self.pods.reflector.synced.is_set() if self.pods is not None else None,
            "leader": self.elector.is_leader(),
            "holder": self.elector.holder(),
        }

    def stats(self) -> Mapping[str, Any]:
        return {"requests": self.api.stats.snapshot(), "aggregator": dict(self.aggregator.stats),
                "node": dict(self.node.stats), "desired_delivered": self.provider.delivered,
                "desired_recomputed": self.provider.recomputed, "terms": self.elector.terms}

    def close(self, timeout: float = 5.0) -> None:
        """After ``stop`` is set: let the elector release the Lease, then close the client."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.lease_api.close()
        self.api.close()


def start_cluster_parts(ks: KubeSettings, hooks: LoopHooks, stop: threading.Event, *, node_name: str,
                        prefix: str, kube_host: str | None = None, api: KubeApi | None = None,
                        start: bool = True) -> ClusterParts | None:
    """Build the client, wait for the API server (forever, logging why), build and (unless ``start=False``)
    start everything. ``start=False`` lets the caller build its loop around ``parts.reporter`` first and
    call ``parts.start()`` after, so ``hooks`` never fire before the loop exists.

    Returns None when ``stop`` was set while waiting (exit 0, nothing to clean up).
    """
    api = api or make_api(kube_host, request_timeout=ks.request_timeout, qps=ks.qps, burst=ks.burst,
                          user_agent=node_name, retry=ks.retry)
    node = NodeReporter(api, node_name, prefix, status_interval=ks.node_status_interval, watch=watch_settings(ks))
    if not wait_for_api(node, stop):
        api.close()
        return None
    parts = ClusterParts(api, ks, node_name, prefix, hooks, stop, node=node)
    return parts.start() if start else parts
