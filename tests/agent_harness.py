"""Run the real agent (``run_agent``) in-process on a thread, with no cluster, for loop tests."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from agent.config import RunSettings
from agent.core.retry import RetryPolicy
from agent.runtime.agent import run_agent
from agent.sources.base import SourceRef, SourceSettings


@dataclass
class RunningAgent:
    settings: RunSettings
    stop: threading.Event
    thread: threading.Thread
    port: int
    result: list[int] = field(default_factory=list)

    @property
    def status_file(self) -> Path:
        return self.settings.cache_dir / ".agent" / "node-status.json"

    def node_status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"labels": {}, "models": {}}

    def ready(self) -> set[str]:
        return {k.split("/", 1)[1] for k in self.node_status()["labels"]}

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.port, path)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        _, text = self.get("/metrics")
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a GET on an agent's metrics port; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> float:
    """Poll until ``pred`` holds; returns seconds waited, raises AssertionError on timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def settings_for(cache: Path, models_file: Path, sources: list[str], **kw: Any) -> RunSettings:
    base = RunSettings(
        cache_dir=cache,
        sources=tuple(SourceRef(*s.split(":", 1)) if ":" in s else SourceRef(s) for s in sources),
        source_settings=SourceSettings(),
        node_name="test-node",
        kubernetes=False,
        models_file=models_file,
        metrics_host="127.0.0.1",
        metrics_port=0,
        check_interval=0.5,
        scrub_interval=0.0,
        fill_backoff=RetryPolicy(base=0.2, factor=2.5, cap=1.0, jitter=0.2),
        termination_budget=5.0,
    )
    return replace(base, **kw)


@contextmanager
def running_agent(settings: RunSettings) -> Iterator[RunningAgent]:
    stop = threading.Event()
    ready_file = settings.cache_dir.parent / f".port-{settings.cache_dir.name}"
    ready_file.unlink(missing_ok=True)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(run_agent(settings, stop=stop, ready_file=ready_file)),
                         daemon=True)
    t.start()
    wait_until(lambda: ready_file.exists() and ready_file.read_text() != "", 15)
    agent = RunningAgent(settings, stop, t, int(ready_file.read_text()), result)
    try:
        yield agent
    finally:
        stop.set()
        t.join(timeout=20)
