"""``model-cache-agent coverage`` reads Node labels from the API (emulator) and prints who is warm."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import agent_cmd
from tests.peers.kube_emulator import KubeEmulator

ROOT = str(Path(__file__).parents[1])


def test_coverage_table_and_json() -> None:
    with KubeEmulator() as kube:
        kube.create_node("gpu-0", {"modelcache.dev/qwen": "ready", "kubernetes.io/os": "linux"})
        kube.create_node("gpu-1", {"modelcache.dev/qwen": "ready", "modelcache.dev/llama": "ready"})
        kube.create_node("cpu-0", {"other.io/modelcache.dev": "x"})
        r = subprocess.run(agent_cmd("coverage", "--kube-host", kube.url), capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        lines = [line.split() for line in r.stdout.splitlines()]
        assert lines[0] == ["MODEL", "cpu-0", "gpu-0", "gpu-1", "READY"]
        assert lines[1] == ["llama", "-", "-", "ready", "1/3"]
        assert lines[2] == ["qwen", "-", "ready", "ready", "2/3"]
        j = subprocess.run(agent_cmd("coverage", "--kube-host", kube.url, "--json"), capture_output=True,
                           text=True, cwd=ROOT, timeout=60)
        assert json.loads(j.stdout) == {"cpu-0": {}, "gpu-0": {"qwen": "ready"},
                                        "gpu-1": {"llama": "ready", "qwen": "ready"}}


def test_coverage_api_down_is_a_clear_error() -> None:
    with KubeEmulator() as kube:
        url = kube.url
    r = subprocess.run(agent_cmd("coverage", "--kube-host", url), capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 1 and "error:" in r.stderr and "list nodes" in r.stderr
