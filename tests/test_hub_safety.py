"""The Hub source as a user meets it in `fill` and `run`: broken listings refused before a byte is
written, credentials never shown or stored, and no wait (a 300 s Retry-After) that a stop cannot end."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

import tests.peers.hub_fixtures as hub_fixtures
from agent.cache.store import Store
from agent.core.retry import RetryPolicy
from agent.core.spec import FileFilter
from agent.errors import Cancelled
from agent.modelgen import make_model_dir
from agent.sources.base import NullProgress, SourceRef, SourceSettings
from agent.sources.factory import open_sources
from tests.conftest import agent_cmd
from tests.peers.hub_server import HubServer, wait_for

hub = hub_fixtures.hub
hub_session = hub_fixtures.hub_session
hub_models = hub_fixtures.hub_models
HubModels = hub_fixtures.HubModels
ROOT = str(Path(__file__).parents[1])
USER, PASSWORD = "alice", "s3cr3t-Passw0rd"


def cli(*args: str, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_TOKEN", None)
    return subprocess.run(agent_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def everything_under(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                     and p.stat().st_size < 1 << 20)


# -- a path that is both a file and a folder -------------------------------------------------------


def test_listing_with_a_file_that_is_also_a_folder_is_refused_before_anything_is_written(
        hub: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "clash"
    make_model_dir(src, weight_bytes=64 * 1024, nested=False)
    (tmp_path / "conf").write_text('{"a": 1}')
    (tmp_path / "inner.json").write_text('{"b": 2}')
    hub.add_repo("org/clash", src, extra={"conf": tmp_path / "conf", "conf/inner.json": tmp_path / "inner.json"})
    cache = tmp_path / "cache"
    r = cli("fill", "org/clash", "--source", "hub", "--cache-dir", str(cache), endpoint=hub.url)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'conf' both as a file and as a folder (of 'conf/inner.json')" in errors[0]
    assert "Traceback" not in r.stderr
    assert not (cache / "hub" / "models--org--clash").exists()  # no blob, no snapshot, no ref
    assert not list((cache / ".agent").rglob("*org--clash*.json")) if (cache / ".agent").exists() else True
    assert not hub.requests(path="*/resolve/*")  # not one byte was asked for


# -- credentials ---------------------------------------------------------------------------------


def test_endpoint_userinfo_and_echoed_authorization_never_shown_or_stored(
        hub: HubServer, hub_models: HubModels, tmp_path: Path) -> None:
    """HF_ENDPOINT=http://user:pass@mirror: used (Basic auth), but never printed, logged or stored."""
    endpoint = hub.url.replace("http://", f"http://{USER}:{PASSWORD}@")
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    cache = tmp_path / "cache"
    # a mirror that echoes the Authorization header in its errors, once transient (retried), then fine
    hub.add_fault("status", "*/revision/*", count=1, status=503, echo_auth=True)
    r = cli("--log-json", "fill", "org/tiny", "--source", "hub", "--allow", "*.json", "--cache-dir", str(cache),
            "--json", endpoint=endpoint)
    assert r.returncode == 0, r.stderr
    assert any(req.authorization == f"Basic {basic}" for req in hub.requests(origin="hub"))  # really used
    out = json.loads(r.stdout)
    assert out["source"] == f"hub:{hub.url}" and out["commit"] == hub_models.commit
    lines = [json.loads(line) for line in r.stderr.splitlines() if line.strip()]  # every log line is JSON
    assert any(str(e.get("event", "")).startswith("HTTP Request:") for e in lines), r.stderr  # httpx2, routed
    assert any(e.get("event") == "retry" and "Authorization: Basic ***" in e.get("error", "") for e in lines)
    # and a permanent error that echoes it goes to the terminal as one redacted line
    hub.add_fault("status", "*/revision/*", count=1, status=400, echo_auth=True)
    bad = cli("fill", "org/tiny", "--source", "hub", "--cache-dir", str(cache), endpoint=endpoint)
    assert bad.returncode == 1 and "Authorization: Basic ***" in bad.stderr
    for text in (r.stdout, r.stderr, bad.stdout, bad.stderr, everything_under(cache)):
        assert PASSWORD not in text and basic not in text and f"{USER}:" not in text
    manifest = next((cache / ".agent" / "manifests").rglob("*.json"))
    assert json.loads(manifest.read_text())["source"] == f"hub:{hub.url}"


# -- waits end with a stop --------------------------------------------------------------------------


def settings_for(hub: HubServer) -> SourceSettings:
    return SourceSettings(hf_endpoint=hub.url, timeout=5.0,
                          retry=RetryPolicy(attempts=5, base=0.01, cap=0.05, max_retry_after=300.0))


@pytest.mark.timeout(30)
def test_retry_after_during_resolve_ends_when_the_agent_stops(hub: HubServer) -> None:
    hub.add_fault("status", "*/revision/*", count=10, status=429, headers={"Retry-After": "300"})
    stop = threading.Event()
    (src,) = open_sources([SourceRef("hub")], settings_for(hub), stop=stop)
    outcome: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(outcome, lambda: src.resolve("org/tiny", "main", FileFilter())),
                         daemon=True)
    t.start()
    assert wait_for(lambda: len(hub.requests(path="*/revision/*")) == 1, 10)
    stop.set()
    t.join(5)
    assert not t.is_alive(), "resolve kept sitting out a 300 s Retry-After after the stop"
    assert isinstance(outcome[0], Cancelled) and "429" in str(outcome[0])
    assert len(hub.requests(path="*/revision/*")) == 1
    src.close()


@pytest.mark.timeout(30)
def test_retry_after_during_a_fetch_ends_when_the_fill_stops(hub: HubServer, store: Store) -> None:
    (src,) = open_sources([SourceRef("hub")], settings_for(hub))
    plan = src.resolve("org/tiny", "main", FileFilter(allow=("*.json",)))
    hub.add_fault("status", "*/resolve/*/config.json", count=10, status=503, headers={"Retry-After": "300"})
    stop = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        with store.lock(plan.repo):
            fill = store.begin(plan, stop=stop)
            _catch(outcome, lambda: src.fetch(plan, fill.needed(), fill, NullProgress()))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert wait_for(lambda: len(hub.requests(method="GET", path="*/config.json")) == 1, 10)
    stop.set()
    t.join(5)
    assert not t.is_alive(), "the fill kept sitting out a 300 s Retry-After after its stop"
    assert isinstance(outcome[0], Cancelled)
    src.close()


def _catch(out: list[BaseException], fn) -> None:  # type: ignore[no-untyped-def]
    try:
        fn()
        out.append(AssertionError("returned normally"))
    except BaseException as e:
        out.append(e)


def test_full_disk_is_not_retried_by_the_source(hub: HubServer, tmp_path: Path) -> None:
    """DiskFullError is not permanent (the loop evicts and tries again) but a source must not retry it."""
    import errno

    from agent.errors import DiskFullError

    def no_space(fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    store = Store(tmp_path / "c", write_fn=no_space)
    (src,) = open_sources([SourceRef("hub")], settings_for(hub))
    plan = src.resolve("org/tiny", "main", FileFilter(allow=("config.json",)))
    with store.lock(plan.repo), pytest.raises(DiskFullError):
        fill = store.begin(plan)
        src.fetch(plan, fill.needed(), fill, NullProgress())
    assert len(hub.requests(method="GET", path="*/config.json")) == 1
    src.close()
