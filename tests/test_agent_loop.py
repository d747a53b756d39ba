"""The node agent without a cluster: models file -> fill -> labels, metrics, health, restarts, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from agent.cache.store import Store
from agent.modelgen import MiB, make_hub_model
from tests.agent_harness import running_agent, settings_for, wait_until
from tests.conftest import agent_cmd


@pytest.fixture
def pvc(tmp_path: Path) -> Path:
    hub = tmp_path / "pvc" / "hub"
    make_hub_model(hub, "org/a", weight_bytes=1 * MiB, seed=1)
    make_hub_model(hub, "org/b", weight_bytes=1 * MiB, seed=2)
    return tmp_path / "pvc"


def write_models(path: Path, models: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(models))
    os.replace(tmp, path)


def test_fills_labels_and_exports_metrics(pvc: Path, tmp_path: Path) -> None:
    mf = tmp_path / "models.yaml"
    write_models(mf, [{"name": "model-a", "repo": "org/a"}, {"name": "model-b", "repo": "org/b"}])
    with running_agent(settings_for(tmp_path / "cache", mf, [f"pvc:{pvc}"])) as agent:
        wait_until(lambda: agent.ready() == {"model-a", "model-b"}, 15)
        assert agent.get("/healthz")[0] == 200 and agent.get("/readyz")[0] == 200
        st = agent.node_status()["models"]["model-a"]
        assert st["state"] == "ready" and st["level"] == "verified" and st["bytes"] > MiB
        m = agent.metrics()
        assert m[("modelcache_models_desired", ())] == 2 and m[("modelcache_models_ready", ())] == 2
        assert m[("modelcache_model_ready", (("model", "model-a"), ("repo", "org/a"), ("revision", "main")))] == 1
        assert m[("modelcache_fill_bytes_total", (("source", "pvc"),))] >= 2 * MiB
        assert m[("modelcache_model_verification", (("level", "verified"), ("model", "model-b")))] == 1
        assert m[("modelcache_cache_bytes", ())] >= 2 * MiB
        assert m[("modelcache_disk_free_bytes", ())] > 0
        assert agent.get("/nope")[0] == 404


def test_models_file_configmap_swap_adds_and_removes(pvc: Path, tmp_path: Path) -> None:
    """A ConfigMap volume updates by swapping the ..data symlink; the agent must follow it."""
    cm = tmp_path / "cm"
    cm.mkdir()

    def publish(version: int, models: list[dict]) -> None:
        d = cm / f"..v{version}"
        d.mkdir()
        (d / "models.yaml").write_text(yaml.safe_dump(models))
        tmp = cm / "..data_tmp"
        os.symlink(d.name, tmp)
        os.replace(tmp, cm / "..data")
        if not (cm / "models.yaml").is_symlink():
            os.symlink("..data/models.yaml", cm / "models.yaml")

    publish(1, [{"name": "model-a", "repo": "org/a"}])
    with running_agent(settings_for(tmp_path / "cache", cm / "models.yaml", [f"pvc:{pvc}"])) as agent:
        wait_until(lambda: agent.ready() == {"model-a"}, 15)
        publish(2, [{"name": "model-b", "repo": "org/b"}])
        wait_until(lambda: agent.ready() == {"model-b"}, 15)
        assert ("modelcache_model_ready", (("model", "model-a"), ("repo", "org/a"), ("revision", "main"))) \
            not in agent.metrics()  # no stale series for a model no longer desired


def test_bad_entry_is_named_and_others_still_fill(pvc: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    mf = tmp_path / "models.yaml"
    write_models(mf, [{"name": "model-a", "repo": "org/a"}, {"name": "broken", "repo": "no-org"}])
    with running_agent(settings_for(tmp_path / "cache", mf, [f"pvc:{pvc}"])) as agent:
        wait_until(lambda: agent.ready() == {"model-a"}, 15)
        err = agent.node_status()["models"]["broken"]
        assert err["state"] == "invalid" and "model 'broken': repo" in err["error"]
        # a file that no longer parses keeps the last good state: the reload ran, said so, changed nothing
        mf.write_text("- name: [unclosed\n")
        wait_until(lambda: "models_file.invalid_kept_last_good" in capsys.readouterr().out, 10)
        assert agent.ready() == {"model-a"}
        assert agent.node_status()["models"]["model-a"]["state"] == "ready"


def test_failing_source_falls_through_to_the_next_and_reports_the_failure(pvc: Path, tmp_path: Path) -> None:
    """Backoff timing itself is tested on an injected clock (tests/test_loop.py, tests/test_plan.py)."""
    mf = tmp_path / "models.yaml"
    write_models(mf, [{"name": "model-a", "repo": "org/a"}, {"name": "ghost", "repo": "org/ghost"}])
    empty = tmp_path / "empty"
    empty.mkdir()
    with running_agent(settings_for(tmp_path / "cache", mf, [f"pvc:{empty}", f"pvc:{pvc}"])) as agent:
        wait_until(lambda: agent.ready() == {"model-a"}, 15)
        wait_until(lambda: agent.node_status()["models"]["ghost"].get("state") == "failed", 10)
        assert "org/ghost" in agent.node_status()["models"]["ghost"]["error"]
        fails = agent.metrics()[("modelcache_fill_failures_total", (("reason", "not_found"), ("source", "pvc")))]
        assert fails >= 2  # both sources were tried and counted


def test_widened_files_after_restart_is_not_ready_until_weights_are_on_disk(pvc: Path, tmp_path: Path) -> None:
    """Issue 9 bug 1 at the CLI: ready with *.json, stop, drop the filter, start: not ready until refilled."""
    mf = tmp_path / "models.yaml"
    cache = tmp_path / "cache"
    write_models(mf, [{"name": "tiny", "repo": "org/a", "files": {"allow": ["*.json"]}}])
    status = cache / ".agent" / "node-status.json"

    def run_until_ready(source: Path) -> tuple[int, str]:
        proc = subprocess.Popen(
            agent_cmd("--log-json", "run", "--no-kubernetes", "--models-file", str(mf), "--source", f"pvc:{source}",
                      "--cache-dir", str(cache), "--metrics-port", "0", "--metrics-host", "127.0.0.1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(Path(__file__).parents[1]))
        try:
            wait_until(lambda: status.exists() and '"modelcache.dev/tiny"' in status.read_text(), 30)
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
        return proc.returncode, err

    rc, _ = run_until_ready(pvc)
    assert rc == 0
    store = Store(cache)
    assert not [p for m in store.manifests() for p in m.by_path() if p.endswith(".safetensors")]
    status.unlink()
    write_models(mf, [{"name": "tiny", "repo": "org/a"}])  # every file now
    rc, _err = run_until_ready(pvc)
    assert rc == 0
    weights = [f for m in store.manifests() for f in m.files if f.path.endswith(".safetensors")]
    assert weights, "labelled ready with no weights on disk"
    m = store.manifests()[0]
    assert store.check(m, full=True).ok
    snap = store.layout.snapshot_dir("org/a", m.commit)
    assert all((snap / f.path).resolve().is_file() for f in weights)


def test_restart_relabels_from_disk_without_any_source(pvc: Path, tmp_path: Path) -> None:
    """After a restart a warm cache is trusted by stat alone: no source is needed to relabel."""
    mf = tmp_path / "models.yaml"
    write_models(mf, [{"name": "model-a", "repo": "org/a"}, {"name": "model-b", "repo": "org/b"}])
    cache = tmp_path / "cache"
    with running_agent(settings_for(cache, mf, [f"pvc:{pvc}"])) as agent:
        wait_until(lambda: agent.ready() == {"model-a", "model-b"}, 15)
    (cache / ".agent" / "node-status.json").unlink()
    gone = tmp_path / "gone"
    gone.mkdir()
    with running_agent(settings_for(cache, mf, [f"pvc:{gone}"])) as agent:
        waited = wait_until(lambda: agent.ready() == {"model-a", "model-b"}, 5)
        assert waited < 2.0
        assert agent.metrics().get(("modelcache_fill_bytes_total", (("source", "pvc"),)), 0) == 0


def test_sigterm_stops_cleanly(pvc: Path, tmp_path: Path) -> None:
    mf = tmp_path / "models.yaml"
    write_models(mf, [{"name": "model-a", "repo": "org/a"}])
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        agent_cmd("run", "--no-kubernetes", "--models-file", str(mf), "--source", f"pvc:{pvc}", "--cache-dir",
                  str(cache), "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--check-interval", "0.5"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(Path(__file__).parents[1]))
    try:
        wait_until(lambda: (cache / ".agent" / "node-status.json").exists()
                   and "model-a" in (cache / ".agent" / "node-status.json").read_text()
                   and '"ready"' in (cache / ".agent" / "node-status.json").read_text(), 20)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert '"agent.stopped"' in err
    store = Store(cache)
    assert all(store.check(m).ok for m in store.manifests())


_TGKILL = {"x86_64": 234, "aarch64": 131}


@pytest.mark.skipif(os.uname().machine not in _TGKILL, reason="tgkill syscall number unknown for this machine")
def test_sigterm_delivered_to_a_worker_thread_still_stops(pvc: Path, tmp_path: Path) -> None:
    """The kernel may hand SIGTERM to any thread; the main thread must still notice and stop."""
    import ctypes

    mf = tmp_path / "models.yaml"
    write_models(mf, [{"name": "model-a", "repo": "org/a"}])
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        agent_cmd("run", "--no-kubernetes", "--models-file", str(mf), "--source", f"pvc:{pvc}", "--cache-dir",
                  str(cache), "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--check-interval", "30"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(Path(__file__).parents[1]))
    try:
        status = cache / ".agent" / "node-status.json"
        wait_until(lambda: status.exists() and '"ready"' in status.read_text(), 20)
        tids = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid)
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(_TGKILL[os.uname().machine], proc.pid, tids[-1], signal.SIGTERM) == 0
        _out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert '"agent.stopped"' in err
