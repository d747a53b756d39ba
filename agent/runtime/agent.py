"""``model-cache-agent run``: wires settings, store, sources, desired state, reporter, metrics, watchers.

Start: validate paths, sweep stale staging, relabel from disk in one stat-only pass. Run: the loop
thread, the hub watcher, the scrub, the metrics server. SIGTERM: stop taking work, give in-flight
fills ``termination_budget`` seconds, leave no partial state (publish is atomic), exit 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from agent.cache.fsutil import write_atomic
from agent.cache.store import Store
from agent.cache.watch import HubWatcher
from agent.config import RunSettings, check_writable_root
from agent.core.actions import Policy
from agent.core.eviction import SpacePolicy
from agent.errors import ConfigError
from agent.metrics import Health, HealthServer, Metrics, PeerCollector, StateCollector
from agent.models_file import InUseFileProvider, ModelsFileProvider
from agent.runtime.loop import Loop
from agent.runtime.scrub import Scrubber
from agent.sources.base import Source
from agent.sources.factory import open_sources

if TYPE_CHECKING:  # only cluster mode imports the kubernetes client
    from agent.k8s.wiring import ClusterParts

log = structlog.get_logger("agent.runtime.agent")


class LocalReporter:
    """No cluster: the would-be labels and annotation go to ``.agent/node-status.json`` and the log."""

    def __init__(self, path: Path, prefix: str) -> None:
        self.path = path
        self.prefix = prefix
        self._last: str | None = None
        self._ready: list[str] | None = None
        self._history: deque[dict[str, object]] = deque(maxlen=100)  # label changes, newest last

    def report(self, ready: frozenset[str], statuses: dict[str, dict[str, object]]) -> None:
        names = sorted(ready)
        if names != self._ready:
            self._ready = names
            self._history.append({"at": time.time(), "ready": names})
            log.info("labels", ready=names)
        doc = json.dumps({"labels": {f"{self.prefix}/{n}": "ready" for n in names}, "models": statuses,
                          "history": list(self._history)}, sort_keys=True)
        if doc != self._last:
            write_atomic(self.path, doc, tmp_dir=self.path.parent / "staging", fsync=False)
            self._last = doc

    def event(self, name: str, reason: str, message: str, *, warning: bool = False) -> None:
        (log.warning if warning else log.info)("event", model=name, reason=reason, message=message)

    def pin(self, name: str, commit: str, revision: str) -> str:
        return commit


def validate_cache_dir(store: Store) -> None:
    """Fail loudly at start: the cache root must be writable and hub/ and .agent/ on one filesystem."""
    lay = store.layout
    check_writable_root(lay.root, [lay.hub, lay.staging_root, lay.manifests_root, lay.locks_root, lay.records_root],
                        "--cache-dir")
    if os.stat(lay.hub).st_dev != os.stat(lay.agent_dir).st_dev:
        raise ConfigError(
            f"--cache-dir {lay.root}: hub/ and .agent/ are on different filesystems; renames would not be atomic")


def _start_peers(sources: list[Source], store: Store, loop: Loop, metrics: Metrics, settings: RunSettings,
                 cluster: ClusterParts | None, stop: threading.Event) -> None:
    """``--source peers``: start the BitTorrent service, seed what is verified, seed each new publish.

    In a cluster the origin slots are Leases whose holder identity is this agent's address, which is
    also how waiting agents find where a model is seeded (agent.k8s.slots).
    """
    svc = next((getattr(s, "service", None) for s in sources if s.kind == "peers"), None)
    if svc is None:
        return
    svc.on_corrupt = lambda repo, _commit: loop.mark_dirty(repo)
    svc.start()
    if cluster is not None:
        from agent.k8s.lease import LeaseStore
        from agent.k8s.slots import LeaseSlots
        from agent.sources.peers.settings import parse_peer_addr

        host = settings.advertise_host or socket.gethostbyname(socket.gethostname())

        def learned(key: str, addrs: list[str]) -> None:
            svc.learn_holders(key, [parse_peer_addr(a, "origin slot holder") for a in addrs])

        svc.gate.slots = LeaseSlots(LeaseStore(cluster.api, settings.kube.lease_namespace, stop=stop),
                                    f"{settings.node_name}@{host}:{svc.bt_port}", svc.settings.origin_concurrency,
                                    on_holders=learned)
    loop.published_hooks.append(lambda m: svc.seed(store, m))
    loop.evict_hooks.append(svc.unseed)
    for m in store.manifests():
        svc.seed(store, m)
    metrics.registry.register(PeerCollector(svc.stats, svc.gate.held))


def run_agent(settings: RunSettings, *, stop: threading.Event | None = None,
              ready_file: Path | None = None) -> int:
    stop = stop or threading.Event()
    loops: list[Loop] = []

    def on_signal(signum: int, _frame: object) -> None:
        log.info("agent.stopping", signal=signal.Signals(signum).name)
        stop.set()
        for lp in loops:
            lp.wake()

    # Before any API call: a SIGTERM while startup waits for the API server is a clean exit 0.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    store = Store(settings.cache_dir, reserve_bytes=0, budget_bytes=settings.disk_budget_bytes)
    validate_cache_dir(store)
    store.sweep_all()
    sources = open_sources(list(settings.sources), settings.source_settings, stop=stop)
    metrics = Metrics()
    policy = Policy(backoff=settings.fill_backoff, space=SpacePolicy(
        grace=settings.drain_grace, min_age=settings.evict_min_age, keep_undesired=settings.keep_undesired,
        high_watermark=settings.high_watermark, low_watermark=settings.low_watermark))
    loop = Loop(store, sources, LocalReporter(store.layout.agent_dir / "node-status.json", settings.label_prefix),
                workers=settings.workers, policy=policy, observer=metrics, check_interval=settings.check_interval)
    loops.append(loop)
    health = Health(max_pass_age=max(settings.check_interval * 3, 30.0), last_pass=lambda: loop.last_pass)
    if settings.kubernetes:
        health.waiting_for = "the API server (reading this Node)"
    metrics.registry.register(StateCollector(loop.view, store.layout.root, store.space.published,
                                             lambda: loop.last_pass))
    # /healthz answers from the first second (alive while waiting for the API), /readyz once the loop knows.
    server = HealthServer(metrics.registry, settings.metrics_host, settings.metrics_port, alive=health.alive,
                          ready=health.ready).start()
    if ready_file is not None:
        ready_file.write_text(str(server.port))

    parts: list[object] = []
    cluster: ClusterParts | None = None
    try:
        if settings.kubernetes:
            from agent.k8s.wiring import LoopHooks, start_cluster_parts

            loop.set_in_use((), known=False)  # nothing may be deleted until the pod watch has listed once
            hooks = LoopHooks(on_desired=loop.set_desired,
                              on_in_use=lambda u: loop.set_in_use(u.models, known=u.synced))
            cluster = start_cluster_parts(settings.kube, hooks, stop, node_name=settings.node_name,
                                          prefix=settings.label_prefix, kube_host=settings.kube_host, start=False)
            if cluster is None:  # stopped while waiting for the API server
                return 0
            loop.reporter = cluster.reporter
            cluster.start()
            parts.append(cluster)
        else:
            assert settings.models_file is not None
            models = ModelsFileProvider(settings.models_file, loop.set_desired)
            loop.set_desired(models.load())
            models.start()
            parts.append(models)
            if settings.in_use_file is not None:
                in_use = InUseFileProvider(settings.in_use_file, loop.set_in_use)
                loop.set_in_use(in_use.load())
                parts.append(in_use.start())
        health.waiting_for = ""

        _start_peers(sources, store, loop, metrics, settings, cluster, stop)
        hub_watch = HubWatcher(store.layout.hub, loop.mark_dirty, on_overflow=loop.rescan_all).start()
        parts.append(hub_watch)
        health.watch("hub watcher", hub_watch.alive)
        scrubber = Scrubber(store, loop.mark_dirty, rate=settings.scrub_bytes_per_second, on_bytes=metrics.scrubbed,
                            repos=lambda: {s.repo for s in loop.desired().models.values()})
        scrub = threading.Thread(target=scrubber.run, args=(stop,), kwargs={
            "interval": settings.scrub_interval, "full_interval": settings.full_scrub_interval}, daemon=True,
            name="scrub")
        scrub.start()
        if settings.scrub_interval > 0 or settings.full_scrub_interval > 0:
            health.watch("scrub", scrub.is_alive)
        loop_thread = threading.Thread(target=loop.run, args=(stop,), name="loop", daemon=True)
        loop_thread.start()
        health.watch("loop", loop_thread.is_alive)
        health.watch("fill workers", loop.workers_alive)
        health.ready_when(loop.initial_scan_done.is_set)
        log.info("agent.started", node=settings.node_name, cache_dir=str(settings.cache_dir),
                 sources=[s.label for s in sources], kubernetes=settings.kubernetes, metrics_port=server.port)
        # Wake up now and then: a signal delivered to another thread only runs its Python handler once the
        # main thread runs bytecode again, and a bare wait() on a lock may never return to let it.
        while not stop.wait(0.5):
            pass
        finished = loop.shutdown(settings.termination_budget)
        log.info("agent.stopped", fills_finished=finished)
        return 0
    finally:
        stop.set()
        server.stop()
        for part in reversed(parts):
            closer = getattr(part, "stop", None) or getattr(part, "close", None)
            if callable(closer):
                with contextlib.suppress(Exception):
                    closer()
        for s in sources:
            s.close()
