"""Shared fixtures: generated models in a PVC-like HF cache, and an empty node cache."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

from agent.cache.store import Store
from agent.modelgen import MiB, make_hub_model

REPO = "org/tiny-model"


@dataclass
class PvcModel:
    root: Path  # the PVC mount (HF_HOME style: hub/ inside)
    hub: Path
    repo: str
    commit: str


@pytest.fixture
def pvc_model(tmp_path: Path) -> PvcModel:
    """A 2-shard model (~2 MiB) with refs main and v1.0, blobs + symlinks, as a Download Job leaves it."""
    hub = tmp_path / "pvc" / "hub"
    commit = make_hub_model(hub, REPO, weight_bytes=2 * MiB, shards=2, refs=("main", "v1.0"))
    return PvcModel(tmp_path / "pvc", hub, REPO, commit)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "cache")


def agent_cmd(*args: str) -> list[str]:
    """Run the CLI exactly as a user would, via the installed package's entry module."""
    return [sys.executable, "-m", "agent", *args]


class ManualClock:
    """A clock tests move by hand (``clock.now += 5``) instead of sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def api(kube):  # type: ignore[no-untyped-def]  # each module's own ``kube`` fixture decides the cluster
    """An official-client API handle on the module's Kubernetes emulator."""
    from agent.k8s.client import make_api

    handle = make_api(kube.url, request_timeout=2.0)
    yield handle
    handle.close()


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    """A stop event for the test's background threads, set at teardown."""
    ev = threading.Event()
    yield ev
    ev.set()


@pytest.fixture(autouse=True)
def _no_leaked_peer_sessions() -> Iterator[None]:
    """A libtorrent session a test leaves running can abort the interpreter at exit: name the test."""
    before = _live_peer_services()
    yield
    leaked = _live_peer_services() - before
    for svc in leaked:
        svc.stop()
    assert not leaked, f"{len(leaked)} PeerService(s) left running"


def _live_peer_services() -> set[object]:
    mod = sys.modules.get("agent.sources.peers.service")
    return set(mod.live_services()) if mod is not None else set()


_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Name the threads still running at the end: a daemon thread inside native code (libtorrent, grpc,
    hf_transfer) when the interpreter finalizes can abort the whole run after every test passed."""
    session.config.stash[_EXIT_STATUS] = int(exitstatus)
    left = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    if left:
        names = ", ".join(sorted(f"{t.name}{'' if t.daemon else ' (non-daemon)'} [{_runs(t)}]" for t in left))
        sys.stderr.write(f"\nthreads still running after the tests: {names}\n")


def _runs(t: threading.Thread) -> str:
    target = getattr(t, "_target", None)  # what a thread runs, to find who started it
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(t).__name__)}"


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process with pytest's verdict, skipping interpreter finalization.

    One CI run passed every test and then died with SIGABRT (exit 134) at exit: glibc unwinds a daemon
    thread that wakes inside native code during finalization, and a noexcept C++ frame turns that into
    abort(). What finalization would still do here is tear down test servers' threads; the agent's own
    exit is tested where it matters, as real processes (e2e/, tests/test_cli.py), so nothing is lost.
    """
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
