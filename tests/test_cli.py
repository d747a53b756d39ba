"""The CLI as a user runs it: exit codes, JSON output, errors that name the bad flag or file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agent.cache.store import Store
from tests.conftest import PvcModel, agent_cmd

ROOT = str(Path(__file__).parents[1])


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(agent_cmd(*args), capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_fill_status_verify_roundtrip(pvc_model: PvcModel, tmp_path: Path) -> None:
    cache = str(tmp_path / "c")
    r = run("fill", pvc_model.repo, "--revision", "v1.0", "--source", f"pvc:{pvc_model.root}",
            "--cache-dir", cache, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["commit"] == pvc_model.commit and out["level"] == "verified" and out["files"] == 10
    st = json.loads(run("status", "--cache-dir", cache, "--json").stdout)
    assert st[0]["repo"] == pvc_model.repo and st[0]["revisions"] == ["v1.0"]
    assert st[0]["level"] == "verified" and st[0]["state"] == "ok" and st[0]["bytes"] == out["bytes"]
    assert "verified_at" in st[0]
    table = run("status", "--cache-dir", cache).stdout
    assert table.splitlines()[0].split()[:3] == ["REPO", "REVISIONS", "COMMIT"] and pvc_model.commit[:12] in table
    for mode in ([], ["--full"], ["--fast"]):
        v = run("verify", "--cache-dir", cache, *mode)
        assert v.returncode == 0 and v.stdout.startswith("ok"), v.stdout + v.stderr


def test_verify_names_every_mismatch(pvc_model: PvcModel, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    assert run("fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", "--cache-dir", str(cache)).returncode == 0
    store = Store(cache)
    m = store.manifest(pvc_model.repo, pvc_model.commit)
    assert m is not None
    by = m.by_path()
    # same-size bit flip (only content hashing finds it) and a deleted blob
    blob = store.layout.blob_path(pvc_model.repo, by["config.json"].digest)
    data = bytearray(blob.read_bytes())
    data[0] ^= 1
    st = blob.stat()
    blob.write_bytes(bytes(data))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    store.layout.blob_path(pvc_model.repo, by["tokenizer.json"].digest).unlink()
    for mode in ([], ["--full"]):
        v = run("verify", "--cache-dir", str(cache), *mode)
        assert v.returncode == 1
        assert "mismatch: config.json" in v.stdout and "missing: tokenizer.json" in v.stdout
    st_json = json.loads(run("status", "--cache-dir", str(cache), "--json").stdout)
    assert st_json[0]["state"] == "damaged"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["fill", "not-a-repo", "--source", "pvc:/x"], "repo: 'not-a-repo' must be 'org/name'"),
        (["fill", "org/m", "--revision", "a..b", "--source", "pvc:/x"], "--revision: 'a..b'"),
        (["fill", "org/m", "--source", "ftp:/x"], "unknown source type 'ftp'"),
        (["fill", "org/m", "--source", "pvc:"], "pvc needs a path"),
        (["verify", "--cache-dir", "/nonexistent/cache"], "--cache-dir: /nonexistent/cache does not exist"),
        (["run", "--no-kubernetes", "--source", "hub"], "--models-file: required"),
        (["run", "--source", "hub"], "NODE_NAME: required"),
        (["demo", "--size", "lots"], "--size: 'lots' is not a size"),
    ],
)
def test_usage_errors_exit_2_and_name_the_field(args: list[str], needle: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NODE_NAME"}
    r = subprocess.run(agent_cmd(*args), capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr


def test_fill_failure_exits_1_naming_source(tmp_path: Path) -> None:
    (tmp_path / "pvc").mkdir()
    r = run("fill", "org/absent", "--source", f"pvc:{tmp_path / 'pvc'}", "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 1 and "repo org/absent not found" in r.stderr and f"pvc:{tmp_path / 'pvc'}" in r.stderr


def test_cache_dir_from_env(pvc_model: PvcModel, tmp_path: Path) -> None:
    r = run("fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", env={"MODEL_CACHE_DIR": str(tmp_path / "e")})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "e" / "hub").is_dir()


def test_non_tty_logs_are_json_lines(pvc_model: PvcModel, tmp_path: Path) -> None:
    r = run("fill", pvc_model.repo, "--source", f"pvc:{pvc_model.root}", "--cache-dir", str(tmp_path / "c"))
    events = [json.loads(line)["event"] for line in r.stderr.splitlines() if line.startswith("{")]
    assert "fill.start" in events and "fill.done" in events


def test_demo_runs_offline(tmp_path: Path) -> None:
    r = run("demo", "--size", "4M", "--dir", str(tmp_path / "d"),
            env={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 warning(s)" in r.stdout and "verified" in r.stdout and "0 mismatches" in r.stdout
