"""Never pull a model from under a worker (issue 14), with a real agent process and worker Pods.

One ``python -m agent run`` process for node ``gpu-0`` against the Kubernetes API emulator enforcing
``manifests/rbac.yaml``; workers are Pods bound to that node (as after scheduling) that select a model
by nodeSelector, required node affinity or the ``modelcache.dev/models`` annotation. The phases share
the agent, in order: removal while in use -> a pod arriving during a drain -> a budget that cannot hold
two desired models while one is in use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.modelgen import MiB, make_hub_model
from e2e.test_three_nodes import Agent, wait_until
from tests.peers.kube_emulator import KubeEmulator, rules_from_manifest

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
GROUP, PLURAL, P, NS = "modelcache.dev", "cachedmodels", "modelcache.dev", "model-cache"
NODE = "gpu-0"
GRACE = 6.0  # drainGraceSeconds for this cluster (the default is 300): time enough to react in a test


@dataclass
class Cluster:
    kube: KubeEmulator
    agent: Agent
    tmp: Path

    def ready(self) -> set[str]:
        return {k.split("/", 1)[1] for k, v in self.kube.node_labels(NODE).items()
                if k.startswith(P + "/") and v == "ready"}

    def state(self, name: str) -> str:
        import json

        raw = self.kube.node_annotations(NODE).get(f"{P}/status") or "{}"
        return str(json.loads(raw).get(name, {}).get("state", ""))

    def repo_dir(self, repo: str) -> Path:
        return self.agent.cache / "hub" / ("models--" + repo.replace("/", "--"))


def cr(name: str, repo: str, priority: int = 100) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"repo": repo, "revision": "main", "priority": priority}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("in-use")
    pvc = tmp / "pvc"
    for i, name in enumerate(("old", "low", "high", "one", "two")):
        make_hub_model(pvc / "hub", f"org/{name}", weight_bytes=3 * MiB, seed=20 + i, workdir=tmp / f"gen-{i}")
    config = tmp / "agent.yaml"
    # a budget one 3 MiB model fits in, and two do not
    config.write_text(yaml.safe_dump({"drainGraceSeconds": GRACE, "evictMinAgeSeconds": 0,
                                      "diskBudgetBytes": 5 * MiB, "checkInterval": 5}))
    rules = rules_from_manifest(yaml.safe_load_all((ROOT / "manifests" / "rbac.yaml").read_text()), NS)
    kube = KubeEmulator(rbac=rules).start()
    kube.create_node(NODE, {"nvidia.com/gpu.present": "true"})
    cache, log = tmp / "cache", tmp / "agent.log"
    cmd = [sys.executable, "-m", "agent", "--log-json", "run", "--kube-host", kube.url, "--node-name", NODE,
           "--config", str(config), "--source", f"pvc:{pvc}", "--cache-dir", str(cache), "--metrics-host",
           "127.0.0.1", "--metrics-port", "0", "--scrub-interval", "0"]
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_NAME", "MODEL_CACHE_DIR", "KUBECONFIG")}
    env.update(PYTHONUNBUFFERED="1", POD_NAMESPACE=NS)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
    agent = Agent(NODE, cache, log, proc)
    try:
        agent.wait_started()
        yield Cluster(kube, agent, tmp)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        kube.stop()


def test_removed_while_in_use_unlabels_at_once_and_deletes_after_the_pod_plus_grace(cluster: Cluster) -> None:
    kube = cluster.kube
    kube.create(PLURAL, cr("old", "org/old"), group=GROUP)
    wait_until(lambda: "old" in cluster.ready(), 30, "old ready")
    kube.create_pod("vllm-old", NODE, node_selector={f"{P}/old": "ready"})  # a worker scheduled on the label
    wait_until(lambda: cluster.agent.metric("modelcache_model_in_use", model="old") == 1, 15, "old in use")
    kube.delete(PLURAL, "old", group=GROUP)
    wait_until(lambda: "old" not in cluster.ready(), 15, "label removed")
    time.sleep(GRACE + 3)  # past the grace period: the worker still reads these files
    assert cluster.repo_dir("org/old").is_dir() and cluster.state("old") == ""  # forgotten, not deleted
    kube.patch("pods", "vllm-old", {"status": {"phase": "Succeeded"}}, namespace="default")  # the worker ends
    wait_until(lambda: not cluster.repo_dir("org/old").exists(), 15, "files deleted after the pod + grace")
    assert cluster.agent.metric("modelcache_evictions_total", reason="undesired") == 1


def state_is(cluster: Cluster, name: str, state: str) -> bool:
    return cluster.agent.metric("modelcache_model_state", model=name, state=state) == 1


def test_a_pod_arriving_during_the_drain_brings_the_label_back(cluster: Cluster) -> None:
    kube = cluster.kube
    kube.create(PLURAL, cr("low", "org/low", priority=10), group=GROUP)
    wait_until(lambda: "low" in cluster.ready(), 30, "low ready")
    kube.create(PLURAL, cr("high", "org/high", priority=500), group=GROUP)  # both do not fit the budget
    wait_until(lambda: "low" not in cluster.ready(), 30, "low drained (unlabelled) for high")
    assert state_is(cluster, "low", "draining") and "high" not in cluster.ready()
    kube.create_pod("late", NODE, annotations={f"{P}/models": "low"})  # a worker arrives during the grace
    wait_until(lambda: "low" in cluster.ready(), 15, "drain cancelled, label back")
    assert "high" not in cluster.ready() and cluster.repo_dir("org/low").is_dir()  # still waiting for room
    kube.delete("pods", "late", namespace="default")  # the worker ends: low goes after the grace, high fills
    wait_until(lambda: "high" in cluster.ready(), 30 + GRACE, "high filled once low is unused")
    assert not cluster.repo_dir("org/low").exists()
    assert cluster.agent.metric("modelcache_evictions_total", reason="priority") == 1
    kube.delete(PLURAL, "high", group=GROUP)
    kube.delete(PLURAL, "low", group=GROUP)
    wait_until(lambda: not cluster.ready() and not cluster.repo_dir("org/high").exists(), 30 + GRACE,
               "both gone")


def test_budget_for_one_with_the_other_in_use_waits_with_a_clear_state(cluster: Cluster) -> None:
    kube = cluster.kube
    kube.create(PLURAL, cr("one", "org/one", priority=10), group=GROUP)
    wait_until(lambda: "one" in cluster.ready(), 30, "one ready")
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": f"{P}/one", "operator": "In", "values": ["ready"]}]}]}}}
    kube.create_pod("sglang-one", NODE, affinity=affinity)
    wait_until(lambda: cluster.agent.metric("modelcache_model_in_use", model="one") == 1, 15, "one in use")
    kube.create(PLURAL, cr("two", "org/two", priority=500), group=GROUP)
    wait_until(lambda: state_is(cluster, "two", "waiting-for-space"), 30, "two waits")
    events = [e for e in kube.list("events", namespace="default")
              if e.get("reason") == "WaitingForSpace" and e["involvedObject"]["name"] == "two"]
    assert len(events) == 1 and "nothing may be evicted" in events[0]["message"], events
    assert "one" in cluster.ready()  # in use: kept whatever its priority
    kube.delete("pods", "sglang-one", namespace="default")
    wait_until(lambda: "two" in cluster.ready(), 30 + GRACE, "two filled once one is unused")
    assert not cluster.repo_dir("org/one").exists()
