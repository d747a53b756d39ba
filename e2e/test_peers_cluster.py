"""The swarm in cluster mode (issue 13): three real agents, origin slots as Leases, peers found through them.

Three ``python -m agent run --source peers --source pvc:...`` processes against the Kubernetes API
emulator (RBAC of ``manifests/rbac.yaml`` enforced), each with its own BitTorrent port on 127.0.0.1 and
no ``--peer`` at all: the only way to find each other is the origin-slot Lease's holder identity. One
CachedModel for all three: two slot holders read one stripe each from the origin (the PVC) and swap, the
third fills from the swarm; the origin is read once in all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.modelgen import MiB, make_hub_model
from e2e.test_three_nodes import Agent, wait_until
from tests.peers.kube_emulator import KubeEmulator, rules_from_manifest
from tests.peers.net import free_port_pair

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
GROUP, PLURAL, P, NS = "modelcache.dev", "cachedmodels", "modelcache.dev", "model-cache"
NODES = ("gpu-0", "gpu-1", "gpu-2")
REPO = "org/swarm"


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KubeEmulator, dict[str, Agent]]]:
    tmp = tmp_path_factory.mktemp("swarm")
    pvc = tmp / "pvc"
    make_hub_model(pvc / "hub", REPO, weight_bytes=6 * MiB, shards=2, seed=31, workdir=tmp / "gen")
    rules = rules_from_manifest(yaml.safe_load_all((ROOT / "manifests" / "rbac.yaml").read_text()), NS)
    kube = KubeEmulator(rbac=rules).start()
    out: dict[str, Agent] = {}
    try:
        for node in NODES:
            kube.create_node(node, {"nvidia.com/gpu.present": "true"})
        for node in NODES:
            cache, log = tmp / f"cache-{node}", tmp / f"agent-{node}.log"
            cmd = [sys.executable, "-m", "agent", "--log-json", "run", "--kube-host", kube.url, "--node-name", node,
                   "--source", "peers", "--source", f"pvc:{pvc}", "--p2p-port", str(free_port_pair()),
                   "--cache-dir", str(cache), "--metrics-host", "127.0.0.1", "--metrics-port", "0",
                   "--scrub-interval", "0"]
            env = {k: v for k, v in os.environ.items() if k not in ("NODE_NAME", "MODEL_CACHE_DIR", "KUBECONFIG")}
            env.update(PYTHONUNBUFFERED="1", POD_NAMESPACE=NS, POD_IP="127.0.0.1")
            with log.open("wb") as f:
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
            out[node] = Agent(node, cache, log, proc)
        for a in out.values():
            a.wait_started()
        yield kube, out
    finally:
        for a in out.values():
            if a.proc.poll() is None:
                a.proc.send_signal(signal.SIGTERM)
        for a in out.values():
            try:
                a.proc.wait(15)
            except subprocess.TimeoutExpired:
                a.proc.kill()
        kube.stop()


def test_the_origin_is_read_once_and_the_swarm_warms_the_rest(
        agents: tuple[KubeEmulator, dict[str, Agent]]) -> None:
    kube, nodes = agents
    kube.create(PLURAL, {"metadata": {"name": "swarm"}, "spec": {"repo": REPO, "revision": "main"}}, group=GROUP)

    def warm() -> set[str]:
        return {n for n in NODES if kube.node_labels(n).get(f"{P}/swarm") == "ready"}

    wait_until(lambda: warm() == set(NODES), 90, "warm on every node")
    origin = {n: a.metric("modelcache_fill_bytes_total", source="pvc") or 0.0 for n, a in nodes.items()}
    peers = {n: a.metric("modelcache_fill_bytes_total", source="peers") or 0.0 for n, a in nodes.items()}
    totals = {origin[n] + peers[n] for n in NODES}
    assert len(totals) == 1, (origin, peers)  # every node got the whole model
    size = totals.pop()
    assert size >= 6 * MiB
    holders = sorted(n for n, v in origin.items() if v > 0)
    assert len(holders) == 2, (origin, peers)  # originConcurrency 2: two slot holders, a stripe each
    assert sum(origin.values()) == size, (origin, peers)  # the origin sent the model once in all
    assert sorted(peers.values())[-1] == size  # the third node: every byte from peers
    leases = kube.list("leases", group="coordination.k8s.io", namespace=NS)
    beacons = sorted(le["spec"]["holderIdentity"] for le in leases if le["metadata"]["name"].startswith("mc-origin-"))
    assert [b.split("@")[0] for b in beacons] == holders  # the holders seed, and say where
    assert all(b.split("@")[1].startswith("127.0.0.1:") for b in beacons)
