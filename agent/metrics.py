"""Prometheus metrics and the /metrics, /healthz, /readyz endpoints on one port.

State gauges come from a custom collector that reads the loop's latest snapshot at scrape time, so a
model that is no longer desired simply stops being exported (no stale series). Events are counters
and a histogram on an injected registry.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from agent.core.desired import STATES, ModelStatus

PREFIX = "modelcache_"
LEVELS = ("verified", "computed")

# Every metric family the agent exports (dashboards and alert rules are tested against this list).
METRIC_NAMES = frozenset({
    "modelcache_model_ready", "modelcache_models_desired", "modelcache_models_ready", "modelcache_model_bytes",
    "modelcache_fill_progress_ratio", "modelcache_model_verification", "modelcache_model_state",
    "modelcache_fill_bytes_total", "modelcache_fill_failures_total", "modelcache_verify_failures_total",
    "modelcache_repairs_total", "modelcache_scrub_bytes_total", "modelcache_fill_duration_seconds",
    "modelcache_cache_bytes", "modelcache_disk_free_bytes", "modelcache_disk_total_bytes",
    "modelcache_last_reconcile_timestamp_seconds", "modelcache_evictions_total", "modelcache_evicted_bytes_total",
    "modelcache_model_in_use", "modelcache_fill_space_wait_seconds",
    "modelcache_p2p_uploaded_bytes_total", "modelcache_p2p_downloaded_bytes_total", "modelcache_p2p_peers",
    "modelcache_p2p_seeding", "modelcache_p2p_rejected_bytes_total", "modelcache_origin_slots_held",
})


class StateCollector(Collector):
    """Gauges built from ``snapshot()`` at scrape time."""

    def __init__(self, snapshot: Callable[[], Sequence[ModelStatus]], cache_root: Path,
                 cache_bytes: Callable[[], int], last_pass: Callable[[], float]) -> None:
        self._snapshot = snapshot
        self._root = cache_root
        self._cache_bytes = cache_bytes
        self._last_pass = last_pass

    def collect(self) -> Iterator[Metric]:
        models = [m for m in self._snapshot() if m.state != "invalid"]
        ready = GaugeMetricFamily(f"{PREFIX}model_ready", "1 if the model is complete and verified on this node",
                                  labels=["model", "repo", "revision"])
        size = GaugeMetricFamily(f"{PREFIX}model_bytes", "Bytes of the model's verified snapshot", labels=["model"])
        prog = GaugeMetricFamily(f"{PREFIX}fill_progress_ratio", "Fraction of the current fill done",
                                 labels=["model"])
        level = GaugeMetricFamily(f"{PREFIX}model_verification",
                                  "1 for the model's verification level (verified: trusted digests)",
                                  labels=["model", "level"])
        state = GaugeMetricFamily(f"{PREFIX}model_state", "1 for the model's current state",
                                  labels=["model", "state"])
        in_use = GaugeMetricFamily(f"{PREFIX}model_in_use", "1 if a pod on this node uses the model (never evicted)",
                                   labels=["model"])
        for m in models:
            ready.add_metric([m.name, m.repo, m.revision], 1.0 if m.state == "ready" else 0.0)
            size.add_metric([m.name], float(m.bytes))
            prog.add_metric([m.name], m.progress if m.state in ("filling", "ready") else 0.0)
            for lv in LEVELS:
                level.add_metric([m.name, lv], 1.0 if m.level == lv else 0.0)
            for s in STATES:
                state.add_metric([m.name, s], 1.0 if m.state == s else 0.0)
            in_use.add_metric([m.name], 1.0 if m.in_use else 0.0)
        yield ready
        yield in_use
        yield size
        yield prog
        yield level
        yield state
        yield GaugeMetricFamily(f"{PREFIX}models_desired", "Models desired on this node", value=len(models))
        yield GaugeMetricFamily(f"{PREFIX}models_ready", "Models ready on this node",
                                value=sum(m.state == "ready" for m in models))
        yield GaugeMetricFamily(f"{PREFIX}cache_bytes", "Bytes in the cache's blobs", value=self._cache_bytes())
        try:
            du = shutil.disk_usage(self._root)
            yield GaugeMetricFamily(f"{PREFIX}disk_free_bytes", "Free bytes on the cache filesystem", value=du.free)
            yield GaugeMetricFamily(f"{PREFIX}disk_total_bytes", "Size of the cache filesystem", value=du.total)
        except OSError:
            pass
        yield GaugeMetricFamily(f"{PREFIX}last_reconcile_timestamp_seconds", "Unix time of the last loop pass",
                                value=self._last_pass())


class PeerCollector(Collector):
    """The BitTorrent side (``--source peers``): bytes up and down, peers, seeds, origin slots held here."""

    def __init__(self, stats: Callable[[], Mapping[str, int]], slots_held: Callable[[], Sequence[str]]) -> None:
        self._stats = stats
        self._slots = slots_held

    def collect(self) -> Iterator[Metric]:
        st = self._stats()
        for key, name, text in (
                ("uploaded_bytes", "p2p_uploaded_bytes", "Bytes sent to peer nodes"),
                ("downloaded_bytes", "p2p_downloaded_bytes", "Bytes received from peer nodes (wire)"),
                ("rejected_bytes", "p2p_rejected_bytes", "Bytes from peers that failed the trusted digest")):
            yield CounterMetricFamily(f"{PREFIX}{name}", text, value=st.get(key, 0))
        yield GaugeMetricFamily(f"{PREFIX}p2p_peers", "Peer nodes connected now", value=st.get("peers", 0))
        yield GaugeMetricFamily(f"{PREFIX}p2p_seeding", "Snapshots this node seeds", value=st.get("seeding", 0))
        yield GaugeMetricFamily(f"{PREFIX}origin_slots_held", "Models this node fills from the origin for the swarm",
                                value=len(self._slots()))


class Metrics:
    """Counters and histograms; implements the reconcile loop's Observer protocol."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.fill_bytes = Counter(f"{PREFIX}fill_bytes", "Bytes written into the cache by fills",
                                  ["source"], registry=r)
        self.fill_failures = Counter(f"{PREFIX}fill_failures", "Fill attempts that failed", ["source", "reason"],
                                     registry=r)
        self.verify_failures = Counter(f"{PREFIX}verify_failures", "Models found damaged or mismatched",
                                       ["reason"], registry=r)
        self.repairs = Counter(f"{PREFIX}repairs", "Damaged models repaired", registry=r)
        self.evictions = Counter(f"{PREFIX}evictions", "Snapshots deleted, by why they were drained "
                                 "(undesired, watermark, priority)", ["reason"], registry=r)
        self.evicted_bytes = Counter(f"{PREFIX}evicted_bytes", "Bytes freed by evictions", registry=r)
        self.space_wait = Histogram(f"{PREFIX}fill_space_wait_seconds", "How long a fill waited for disk space",
                                    registry=r, buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, float("inf")))
        self.scrub_bytes = Counter(f"{PREFIX}scrub_bytes", "Bytes re-read by the scrub", registry=r)
        self.fill_duration = Histogram(f"{PREFIX}fill_duration_seconds", "Duration of successful fills",
                                       ["source"], registry=r,
                                       buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600, float("inf")))

    def fill_done(self, source: str, nbytes: int, seconds: float) -> None:
        kind = source.split(":", 1)[0]
        self.fill_bytes.labels(kind).inc(nbytes)
        self.fill_duration.labels(kind).observe(seconds)

    def fill_bytes_from(self, kind: str, nbytes: int) -> None:
        """Bytes of a fill that another source delivered (an origin slot holder's other stripes, from peers)."""
        self.fill_bytes.labels(kind).inc(nbytes)

    def fill_failed(self, source: str, reason: str) -> None:
        self.fill_failures.labels(source.split(":", 1)[0], reason).inc()

    def verify_failed(self, reason: str) -> None:
        self.verify_failures.labels(reason).inc()

    def repaired(self) -> None:
        self.repairs.inc()

    def evicted(self, reason: str, nbytes: int) -> None:
        self.evictions.labels(reason).inc()
        self.evicted_bytes.inc(nbytes)

    def space_waited(self, seconds: float) -> None:
        self.space_wait.observe(seconds)

    def scrubbed(self, nbytes: int) -> None:
        self.scrub_bytes.inc(nbytes)


class HealthServer:
    """/metrics, /healthz (loop passed recently), /readyz (initial scan done) on one port."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, *,
                 alive: Callable[[], tuple[bool, str]], ready: Callable[[], tuple[bool, str]]) -> None:
        registry_ = registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(registry_), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    ok, why = (alive if path == "/healthz" else ready)()
                    self._send(200 if ok else 503, why.encode() + b"\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Health:
    """What /healthz and /readyz answer: every agent thread alive and the loop passing; ready once it knows.

    Alive from the first second (a process waiting for the API server is healthy, not stuck), so the
    liveness probe never restarts an agent for being patient. A thread of the agent that died (the
    loop, a fill worker, the watcher, the scrub) makes /healthz fail: restarting is then the fix.
    """

    def __init__(self, *, max_pass_age: float, last_pass: Callable[[], float],
                 clock: Callable[[], float] = time.time) -> None:
        self.max_pass_age = max_pass_age
        self.last_pass = last_pass
        self.clock = clock
        self.waiting_for = ""  # shown by /readyz while start-up waits (e.g. for the API server)
        self._checks: list[tuple[str, Callable[[], bool]]] = []
        self._ready: Callable[[], bool] = lambda: False

    def watch(self, name: str, is_alive: Callable[[], bool]) -> None:
        self._checks.append((name, is_alive))

    def ready_when(self, pred: Callable[[], bool]) -> None:
        self._ready = pred

    def alive(self) -> tuple[bool, str]:
        dead = [name for name, ok in list(self._checks) if not ok()]
        if dead:
            return False, "dead: " + ", ".join(dead)
        last = self.last_pass()
        if last and self.clock() - last > self.max_pass_age:
            return False, f"loop stalled: last pass {self.clock() - last:.0f}s ago"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self.waiting_for:
            return False, f"waiting for {self.waiting_for}"
        if not self._ready():
            return False, "initial scan not done"
        return self.alive()
