"""``model-cache-agent coverage``: READY n/m per model over the nodes its CachedModel selects (API emulator)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from agent.k8s.coverage import compute, format_coverage
from tests.conftest import agent_cmd
from tests.peers.kube_emulator import KubeEmulator

ROOT = str(Path(__file__).parents[1])
GPU = {"matchLabels": {"nvidia.com/gpu.present": "true"}}


def cached_model(name: str, selector: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "modelcache.dev/v1alpha1", "kind": "CachedModel", "metadata": {"name": name},
            "spec": {"repo": f"org/{name}", **({"nodeSelector": selector} if selector else {}), **spec}}


def coverage(kube_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(agent_cmd("coverage", "--kube-host", kube_url, *extra), capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def cluster(kube: KubeEmulator) -> None:
    gpu = {"nvidia.com/gpu.present": "true"}
    kube.create_node("gpu-0", {**gpu, "modelcache.dev/qwen": "ready"})
    kube.create_node("gpu-1", {**gpu, "modelcache.dev/qwen": "ready", "modelcache.dev/llama": "ready"})
    kube.create_node("cpu-0", {"modelcache.dev/llama": "ready", "modelcache.dev/orphan": "ready",
                               "other.io/modelcache.dev": "x"})
    for obj in (cached_model("qwen", GPU), cached_model("llama", GPU), cached_model("everywhere")):
        kube.create("cachedmodels", obj, group="modelcache.dev")


def test_counts_only_the_nodes_each_model_is_meant_for() -> None:
    with KubeEmulator() as kube:
        cluster(kube)
        r = coverage(kube.url)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert [line.split() for line in lines[:5]] == [
            ["MODEL", "READY", "cpu-0", "gpu-0", "gpu-1"],
            ["everywhere", "0/3", "-", "-", "-"],
            ["llama", "1/2", ".", "-", "ready"],
            ["orphan", "1/3", "ready", "-", "-"],
            ["qwen", "2/2", ".", "ready", "ready"],
        ]
        assert "llama: labelled ready on cpu-0, which its nodeSelector does not select" in lines
        assert "orphan: no CachedModel: counted over every node" in lines
        j = coverage(kube.url, "--json")
        assert j.returncode == 0, j.stderr
        data = json.loads(j.stdout)
        assert data["nodes"] == ["cpu-0", "gpu-0", "gpu-1"]
        assert data["models"]["llama"] == {"ready": 1, "desired": 2, "readyNodes": ["gpu-1"],
                                           "missingNodes": ["gpu-0"], "strayNodes": ["cpu-0"]}
        assert data["models"]["qwen"]["ready"] == 2 and data["models"]["qwen"]["desired"] == 2


def test_without_the_crd_every_node_counts_and_says_so() -> None:
    with KubeEmulator() as kube:
        cluster(kube)
        del kube.resources[("modelcache.dev", "cachedmodels")]
        r = coverage(kube.url)
        assert r.returncode == 0, r.stderr
        rows = {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()[1:5]}
        assert rows["qwen"] == ["2/3", "-", "ready", "ready"] and rows["llama"] == ["2/3", "ready", "-", "ready"]
        assert "CachedModels not readable: each model counted over every node" in r.stdout


def test_api_down_is_one_clear_line_at_once() -> None:
    with KubeEmulator() as kube:
        url = kube.url
    t0 = time.monotonic()
    r = coverage(url)
    assert time.monotonic() - t0 < 15
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"error: cannot reach the Kubernetes API at {url}: Connection refused\n"


def test_many_nodes_collapse_into_a_not_ready_column() -> None:
    nodes = [(f"n{i:02d}", {"modelcache.dev/m": "ready"} if i % 2 else {}) for i in range(20)]
    text = format_coverage(compute(nodes, {"m": {}}, "modelcache.dev"))
    head, row = (line.split() for line in text.splitlines()[:2])
    assert head == ["MODEL", "READY", "NOT-READY"]
    assert row[:2] == ["m", "10/20"] and row[2] == "n00,n02,n04,n06,n08,+5"
