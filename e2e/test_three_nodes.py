"""Three agent processes, one Kubernetes API (emulator), one shared PVC: the cluster story end to end.

Each agent is a real ``python -m agent run`` process with its own node cache, exactly as the
DaemonSet starts it (``--kube-host`` instead of in-cluster config). The emulator is the only API
server; the test acts as ``kubectl`` (creating CachedModels directly, bypassing CRD validation where
a broken object is the point) and as the scheduler (``pod_fits`` evaluates a Pod's nodeSelector
against the Node objects).

The tests share one cluster and run in file order, like the phases of one rollout: start (stale
label removed) -> converge (pin, caches, scheduling, annotation, metrics) -> damage and repair ->
ModelExpress -> invalid spec -> API outage with an agent restart -> delete -> SIGTERM mid-fill.
Each phase re-creates what it needs from earlier ones, so ``-k`` works too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.modelgen import MiB, make_hub_model
from tests.agent_harness import http_get
from tests.peers.kube_emulator import KubeEmulator

try:  # the ModelExpress test server may be absent in a partial checkout; the PVC path must still be covered
    from tests.peers.mx_server import MxServer
except ImportError:  # pragma: no cover
    MxServer = None  # type: ignore[assignment,misc]

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
GROUP = "modelcache.dev"
PREFIX = "modelcache.dev"
GPU = "nvidia.com/gpu.present"
GPU_NODES = {"node-0", "node-1"}
NODES = ("node-0", "node-1", "node-2")
REPO_A, REPO_B, REPO_MX, REPO_SLOW = "org/tiny-a", "org/tiny-b", "org/tiny-mx", "org/tiny-slow"
CONVERGE = 20.0  # seconds for labels to follow a change in desired state
TERMINATION_BUDGET = 10.0

# Labels and annotations other controllers own: the agents must never touch them.
FOREIGN_LABELS = {
    "node-0": {GPU: "true", "topology.kubernetes.io/zone": "zone-a", "modelcache.dev.example.com/keep": "x"},
    "node-1": {GPU: "true", "topology.kubernetes.io/zone": "zone-b", "modelcache.dev.example.com/keep": "y"},
    "node-2": {"topology.kubernetes.io/zone": "zone-a", "modelcache.dev.example.com/keep": "z"},
}
FOREIGN_ANNOTATIONS = {"example.com/owner": "platform-team"}
STALE = f"{PREFIX}/left-over"  # a ready label from an earlier run for a model nobody wants any more


# ---- pure helpers --------------------------------------------------------------------------------


def pod_fits(node_selector: Mapping[str, str], node_labels: Mapping[str, str]) -> bool:
    """Whether a Pod's ``spec.nodeSelector`` admits a Node with these labels (kube-scheduler's rule)."""
    return all(node_labels.get(k) == v for k, v in node_selector.items())


def test_pod_fits_is_the_scheduler_rule() -> None:
    assert pod_fits({}, {})
    assert pod_fits({"a": "1"}, {"a": "1", "b": "2"})
    assert not pod_fits({"a": "1"}, {"a": "2"})
    assert not pod_fits({"a": "1", "b": "2"}, {"a": "1"})


def wait_until(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(interval)
    if pred():
        return time.monotonic() - t0
    raise AssertionError(f"not within {timeout}s: {what}")


def ready_key(name: str) -> str:
    return f"{PREFIX}/{name}"


def cached_model(name: str, repo: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1alpha1",
        "kind": "CachedModel",
        "metadata": {"name": name},
        "spec": {"repo": repo, "revision": "main", "nodeSelector": {"matchLabels": {GPU: "true"}}, **spec},
    }


# ---- the cluster -----------------------------------------------------------------------------------


@dataclass
class Agent:
    node: str
    cache: Path
    log: Path
    proc: subprocess.Popen[bytes]
    port: int = 0

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def wait_started(self, timeout: float = 30.0) -> None:
        def started() -> bool:
            assert self.proc.poll() is None, f"{self.node} exited {self.proc.returncode}: {self.tail()}"
            for rec in self.log_lines():
                if rec.get("event") == "agent.started":
                    self.port = int(rec["metrics_port"])
                    return True
            return False

        wait_until(started, timeout, f"{self.node} started")

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.port, path)

    def metric(self, name: str, **labels: str) -> float | None:
        _, text = self.get("/metrics")
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return None

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def assert_running(self) -> None:
        assert self.proc.poll() is None, f"{self.node} exited {self.proc.returncode}:\n{self.tail()}"


@dataclass
class Cluster:
    kube: KubeEmulator
    pvc: Path
    commits: dict[str, str]
    agents: dict[str, Agent]
    mx: Any  # MxServer | None (the in-process ModelExpress server; its faults are live)
    tmp: Path
    config: Path

    @property
    def mx_address(self) -> str | None:
        return str(self.mx.address) if self.mx is not None else None
    created: list[str] = field(default_factory=list)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        out = self.kube.create("cachedmodels", obj, group=GROUP)
        self.created.append(obj["metadata"]["name"])
        return out

    def ensure_warm(self, name: str, repo: str) -> None:
        """For a phase run on its own (-k): the model earlier phases left warm on the GPU nodes."""
        if self.cr(name) is None:
            self.create(cached_model(name, repo))
        wait_until(lambda: self.warm(name) == GPU_NODES, CONVERGE, f"{name} ready on the GPU nodes")

    def cr(self, name: str) -> dict[str, Any] | None:
        return self.kube.get("cachedmodels", name, group=GROUP)

    def labels(self, node: str) -> dict[str, str]:
        return self.kube.node_labels(node)

    def warm(self, name: str) -> set[str]:
        return {n for n in NODES if self.labels(n).get(ready_key(name)) == "ready"}

    def fitting(self, pod_selector: Mapping[str, str]) -> set[str]:
        nodes = self.kube.list("nodes")
        return {n["metadata"]["name"] for n in nodes if pod_fits(pod_selector, n["metadata"].get("labels") or {})}

    def status(self, node: str) -> dict[str, Any]:
        raw = self.kube.node_annotations(node).get(f"{PREFIX}/status", "{}")
        return dict(json.loads(raw))

    def events(self, reason: str, name: str) -> list[dict[str, Any]]:
        return [
            e for e in self.kube.list("events", namespace="default")
            if e.get("reason") == reason and e.get("involvedObject", {}).get("name") == name
        ]

    def assert_all_running(self) -> None:
        for a in self.agents.values():
            a.assert_running()

    def assert_foreign_untouched(self) -> None:
        for node in NODES:
            labels = self.labels(node)
            for k, v in FOREIGN_LABELS[node].items():
                assert labels.get(k) == v, f"{node}: foreign label {k} changed: {labels}"
            extra = {k for k in labels if k not in FOREIGN_LABELS[node]}
            assert all(k.startswith(PREFIX + "/") for k in extra), f"{node}: labels nobody should add: {labels}"
            ann = self.kube.node_annotations(node)
            for k, v in FOREIGN_ANNOTATIONS.items():
                assert ann.get(k) == v, f"{node}: foreign annotation {k} changed: {ann}"


def start_agent(node: str, tmp: Path, kube_url: str, pvc: Path, mx: str | None, config: Path) -> Agent:
    cache = tmp / f"cache-{node}"
    log = tmp / f"agent-{node}.log"
    n = 1
    while log.exists():  # a restarted agent keeps its cache, gets a fresh log
        n += 1
        log = tmp / f"agent-{node}.{n}.log"
    cmd = [
        sys.executable, "-m", "agent", "--log-json", "run",
        "--kube-host", kube_url,
        "--node-name", node,
        "--config", str(config),
        "--source", f"pvc:{pvc}",
        *(["--source", f"modelexpress:{mx}"] if mx else []),
        "--cache-dir", str(cache),
        "--metrics-host", "127.0.0.1",
        "--metrics-port", "0",
        "--check-interval", "1",
        "--scrub-interval", "0",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_NAME", "MODEL_CACHE_DIR", "KUBECONFIG")}
    env["PYTHONUNBUFFERED"] = "1"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
    return Agent(node, cache, log, proc)


def stop_agents(agents: list[Agent], timeout: float) -> dict[str, tuple[int | None, float]]:
    """SIGTERM every agent at once; (exit code or None if it did not exit, seconds taken) per node."""
    t0 = time.monotonic()
    for a in agents:
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGTERM)
    out: dict[str, tuple[int | None, float]] = {}
    for a in agents:
        try:
            rc: int | None = a.proc.wait(max(0.1, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            rc = None
        out[a.node] = (rc, time.monotonic() - t0)
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("three-nodes")
    pvc = tmp / "pvc"
    hub = pvc / "hub"
    commits = {
        REPO_A: make_hub_model(hub, REPO_A, weight_bytes=3 * MiB, shards=2, seed=1, workdir=tmp / "gen-a"),
        REPO_B: make_hub_model(hub, REPO_B, weight_bytes=2 * MiB, seed=2, workdir=tmp / "gen-b"),
        REPO_MX: make_hub_model(hub, REPO_MX, weight_bytes=2 * MiB, seed=3, workdir=tmp / "gen-mx"),
        REPO_SLOW: make_hub_model(hub, REPO_SLOW, weight_bytes=2 * MiB, seed=4, workdir=tmp / "gen-slow"),
    }
    config = tmp / "agent.yaml"
    config.write_text(f"terminationBudgetSeconds: {TERMINATION_BUDGET}\nresyncSeconds: 60\n")
    mx = MxServer(hub).start() if MxServer is not None else None
    kube = KubeEmulator().start()
    agents: dict[str, Agent] = {}
    try:
        for node in NODES:
            labels = dict(FOREIGN_LABELS[node])
            if node == "node-2":
                labels[STALE] = "ready"
            kube.create_node(node, labels, dict(FOREIGN_ANNOTATIONS))
        for node in NODES:
            agents[node] = start_agent(node, tmp, kube.url, pvc, mx.address if mx else None, config)
        for a in agents.values():
            a.wait_started()
        yield Cluster(kube, pvc, commits, agents, mx, tmp, config)
    finally:
        stop_agents(list(agents.values()), 15)
        for a in agents.values():
            if a.proc.poll() is None:
                a.proc.kill()
                a.proc.wait(5)
        kube.stop()
        if mx is not None:
            mx.stop()


def snapshot_commit(cache: Path, repo: str, ref: str = "main") -> str | None:
    folder = cache / "hub" / ("models--" + repo.replace("/", "--"))
    try:
        return (folder / "refs" / ref).read_text().strip()
    except FileNotFoundError:
        return None


# ---- phases ------------------------------------------------------------------------------------------


def test_agents_start_and_remove_stale_labels(cluster: Cluster) -> None:
    """Once an agent has listed CachedModels, a ready label nobody wants any more disappears."""
    wait_until(lambda: STALE not in cluster.labels("node-2"), CONVERGE, "stale label removed from node-2")
    for a in cluster.agents.values():
        wait_until(lambda a=a: a.get("/readyz")[0] == 200, CONVERGE, f"{a.node} /readyz")  # type: ignore[misc]
        assert a.get("/healthz")[0] == 200
    cluster.assert_foreign_untouched()
    cluster.assert_all_running()


def test_cachedmodel_converges_on_selected_nodes_only(cluster: Cluster) -> None:
    t0 = time.monotonic()
    cluster.create(cached_model("tiny-a", REPO_A))
    wait_until(lambda: cluster.warm("tiny-a") == GPU_NODES, CONVERGE, "tiny-a ready on the GPU nodes")
    converged = time.monotonic() - t0
    assert converged < CONVERGE

    # Pinned once for the whole cluster, to the PVC's commit, and every warm node holds exactly that.
    cr = cluster.cr("tiny-a")
    assert cr is not None
    assert cr["status"]["resolvedRevision"] == cluster.commits[REPO_A]
    assert cr["status"]["resolvedFrom"] == "main"
    # kubectl get cachedmodels: READY 2, DESIRED 2 (node-2 is not selected and has no entry)
    wait_until(lambda: ((cluster.cr("tiny-a") or {}).get("status") or {}).get("readyNodes") == 2, CONVERGE,
               "tiny-a status.readyNodes == 2")
    st = (cluster.cr("tiny-a") or {})["status"]
    assert st["desiredNodes"] == 2 and "nodes" not in st  # per-node truth is on the Nodes, not here
    pins = [r for r in cluster.kube.requests_matching("PATCH", r"/cachedmodels/tiny-a/status$")
            if r.status == 200 and (r.body or {}).get("status", {}).get("resolvedRevision")]
    assert len(pins) == 1, "one agent pins, the other adopts its commit (compare-and-swap)"
    for node in GPU_NODES:
        cache = cluster.agents[node].cache
        assert snapshot_commit(cache, REPO_A) == cluster.commits[REPO_A]
        snap = cache / "hub" / "models--org--tiny-a" / "snapshots" / cluster.commits[REPO_A]
        assert (snap / "config.json").is_file() and (snap / "model-00002-of-00002.safetensors").is_file()
    assert not (cluster.agents["node-2"].cache / "hub" / "models--org--tiny-a").exists(), "node-2 was not selected"

    # A worker Pod that selects the warm label can only land on warm nodes.
    assert cluster.fitting({ready_key("tiny-a"): "ready"}) == GPU_NODES
    assert cluster.fitting({ready_key("tiny-a"): "ready", GPU: "true"}) == GPU_NODES

    # The per-node status annotation says why.
    for node in GPU_NODES:
        st = cluster.status(node)["tiny-a"]
        assert st["state"] == "ready", st
        assert cluster.commits[REPO_A].startswith(st["commit"])
        assert st["level"] == "verified"
    assert "tiny-a" not in cluster.status("node-2")

    # Prometheus: coverage = sum(ready) / sum(desired) = 2/2, node-2 desires nothing.
    ready_sum = desired_sum = 0.0
    for node, agent in cluster.agents.items():
        want = 1.0 if node in GPU_NODES else 0.0
        wait_until(lambda a=agent, w=want: a.metric("modelcache_models_ready") == w, 5, f"{node} models_ready")  # type: ignore[misc]
        assert agent.metric("modelcache_models_desired") == want
        ready_sum += agent.metric("modelcache_models_ready") or 0.0
        desired_sum += agent.metric("modelcache_models_desired") or 0.0
        if node in GPU_NODES:
            assert agent.metric("modelcache_model_ready", model="tiny-a", repo=REPO_A) == 1.0
            assert (agent.metric("modelcache_fill_bytes_total", source="pvc") or 0) > 3 * MiB
    assert (ready_sum, desired_sum) == (2.0, 2.0)
    # Events: a FillSucceeded per filled node.
    hosts = {e.get("source", {}).get("host") for e in cluster.events("FillSucceeded", "tiny-a")}
    assert hosts == GPU_NODES
    cluster.assert_foreign_untouched()
    cluster.assert_all_running()


def test_damaged_node_is_unlabelled_until_repaired(cluster: Cluster) -> None:
    """A blob lost on node-0 takes node-0 (only) out of the pool until the agent has repaired it."""
    cluster.ensure_warm("tiny-a", REPO_A)
    history_start = len(cluster.kube.labels_over_time("node-1"))

    def node0_fills() -> int:
        return sum(1 for r in ("FillSucceeded", "Repaired") for e in cluster.events(r, "tiny-a")
                   if e["source"]["host"] == "node-0")

    fills_before = node0_fills()
    on_pvc = cluster.pvc / "hub" / "models--org--tiny-a"
    hidden = on_pvc.with_name("models--org--tiny-a.away")
    on_pvc.rename(hidden)  # the shared copy is briefly unavailable too, so the repair cannot be instant
    try:
        blobs = cluster.agents["node-0"].cache / "hub" / "models--org--tiny-a" / "blobs"
        max(blobs.iterdir(), key=lambda p: p.stat().st_size).unlink()
        wait_until(lambda: cluster.warm("tiny-a") == {"node-1"}, CONVERGE, "node-0 unlabelled after damage")
        assert cluster.fitting({ready_key("tiny-a"): "ready"}) == {"node-1"}
        assert cluster.status("node-0")["tiny-a"]["state"] in ("damaged", "filling", "failed")
        wait_until(lambda: any(e["source"]["host"] == "node-0" for e in cluster.events("VerifyFailed", "tiny-a")),
                   CONVERGE, "VerifyFailed event from node-0")
        # Until a repair attempt has failed for want of a source: the label stays off meanwhile.
        wait_until(lambda: any(e["source"]["host"] == "node-0" for e in cluster.events("FillFailed", "tiny-a")),
                   CONVERGE, "a failed repair attempt on node-0")
        assert cluster.warm("tiny-a") == {"node-1"}
    finally:
        hidden.rename(on_pvc)
    wait_until(lambda: cluster.warm("tiny-a") == GPU_NODES, CONVERGE, "node-0 relabelled after repair")
    wait_until(lambda: node0_fills() > fills_before, 5, "node-0 recorded the refill")
    # ...as a repair, although its first attempt failed (fdebf30), and counted as one.
    assert [e for e in cluster.events("Repaired", "tiny-a") if e["source"]["host"] == "node-0"]
    assert (cluster.agents["node-0"].metric("modelcache_repairs_total") or 0) >= 1
    assert cluster.status("node-0")["tiny-a"]["state"] == "ready"
    for _, labels in cluster.kube.labels_over_time("node-1")[history_start:]:
        assert labels.get(ready_key("tiny-a")) == "ready", "node-1 was not damaged and must not flap"
    cluster.assert_all_running()


@pytest.mark.skipif(MxServer is None, reason="tests.peers.mx_server not available")
def test_model_from_modelexpress(cluster: Cluster) -> None:
    """A CachedModel that asks for ModelExpress is streamed from the server and verified by the agent."""
    assert cluster.mx_address
    cluster.create(cached_model("tiny-mx", REPO_MX, sources=["modelexpress"],
                                files={"allow": ["*.json", "*.safetensors"]}))
    wait_until(lambda: cluster.warm("tiny-mx") == GPU_NODES, CONVERGE, "tiny-mx ready on the GPU nodes")
    cr = cluster.cr("tiny-mx")
    assert cr is not None and cr["status"]["resolvedRevision"] == cluster.commits[REPO_MX]
    for node in GPU_NODES:
        snap = cluster.agents[node].cache / "hub" / "models--org--tiny-mx" / "snapshots" / cluster.commits[REPO_MX]
        assert (snap / "model.safetensors").is_file()
        assert not (snap / "README.md").exists()  # the files filter applied
        st = cluster.status(node)["tiny-mx"]
        assert st["state"] == "ready"
        assert (cluster.agents[node].metric("modelcache_fill_bytes_total", source="modelexpress") or 0) > MiB
    cluster.assert_all_running()


def test_invalid_cachedmodel_is_reported_and_agents_keep_running(cluster: Cluster) -> None:
    cluster.ensure_warm("tiny-a", REPO_A)
    # Written straight into the store, as if the CRD's OpenAPI validation were missing or older.
    bad = cached_model("broken", "not a repo id")
    cluster.create(bad)

    def reported() -> bool:
        return bool(cluster.events("InvalidSpec", "broken"))

    wait_until(reported, CONVERGE, "InvalidSpec event for 'broken'")
    evs = cluster.events("InvalidSpec", "broken")
    ev = evs[0]
    assert ev["type"] == "Warning"
    assert "spec.repo" in ev["message"], ev["message"]
    assert ev["involvedObject"]["kind"] == "CachedModel"

    def condition() -> dict[str, Any] | None:
        cr = cluster.cr("broken") or {}
        for c in (cr.get("status") or {}).get("conditions") or []:
            if c.get("type") == "SpecValid":
                return dict(c)
        return None

    wait_until(lambda: condition() is not None, CONVERGE, "SpecValid condition on 'broken'")
    cond = condition()
    assert cond is not None and cond["status"] == "False" and cond["reason"] == "InvalidSpec"

    for node in NODES:  # every agent sees it (the spec cannot even say which nodes it wants)...
        wait_until(lambda n=node: cluster.status(n).get("broken", {}).get("state") == "invalid", CONVERGE,  # type: ignore[misc]
                   f"{node} status annotation shows 'broken' invalid")
        assert "spec.repo" in cluster.status(node)["broken"]["error"]

    # ...but the cluster gets one Event, not one per node; nobody is labelled for the broken model, the good
    # one stays warm, and every agent is alive and healthy.
    time.sleep(1.5)
    assert len(cluster.events("InvalidSpec", "broken")) == 1, cluster.events("InvalidSpec", "broken")
    assert cluster.warm("broken") == set()
    assert cluster.warm("tiny-a") == GPU_NODES
    cluster.assert_all_running()
    for a in cluster.agents.values():
        assert a.get("/healthz")[0] == 200

    # Fixing the spec heals it: warm where selected, condition back to True.
    cluster.kube.patch("cachedmodels", "broken", {"spec": {"repo": REPO_A}}, group=GROUP)
    wait_until(lambda: cluster.warm("broken") == GPU_NODES, CONVERGE, "fixed 'broken' ready on the GPU nodes")
    wait_until(lambda: (condition() or {}).get("status") == "True", CONVERGE, "SpecValid back to True")
    assert all(cluster.status(n)["broken"]["state"] == "ready" for n in GPU_NODES)
    wait_until(lambda: "broken" not in cluster.status("node-2"), CONVERGE, "node-2 (not selected) forgot 'broken'")
    cluster.kube.delete("cachedmodels", "broken", group=GROUP)
    wait_until(lambda: all("broken" not in cluster.status(n) for n in NODES), CONVERGE,
               "'broken' gone from every annotation")
    assert cluster.warm("broken") == set()


def spec_valid(cluster: Cluster, name: str) -> str | None:
    for c in ((cluster.cr(name) or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == "SpecValid":
            return str(c.get("status"))
    return None


def test_spec_broken_again_is_reported_again(cluster: Cluster) -> None:
    bad = cached_model("flaky", "not a repo id")
    cluster.create(bad)
    wait_until(lambda: spec_valid(cluster, "flaky") == "False", CONVERGE, "flaky: SpecValid False")
    cluster.kube.patch("cachedmodels", "flaky", {"spec": {"repo": REPO_A}}, group=GROUP)
    wait_until(lambda: spec_valid(cluster, "flaky") == "True", CONVERGE, "flaky: SpecValid True after the fix")
    cluster.kube.patch("cachedmodels", "flaky", {"spec": {"repo": "not a repo id"}}, group=GROUP)
    try:
        wait_until(lambda: spec_valid(cluster, "flaky") == "False", 5, "flaky: SpecValid False again")
    finally:
        cluster.kube.delete("cachedmodels", "flaky", group=GROUP)


def test_api_outage_does_not_crash_agents_and_labels_converge_after(cluster: Cluster) -> None:
    cluster.ensure_warm("tiny-a", REPO_A)
    history_start = {n: len(cluster.kube.labels_over_time(n)) for n in GPU_NODES}
    # node-1's agent is being rolled (new DaemonSet revision) just as the API server restarts.
    old = cluster.agents["node-1"]
    (rc, _), = stop_agents([old], TERMINATION_BUDGET).values()
    assert rc == 0, old.tail()
    cluster.kube.outage(4.0)  # port closed, watches cut: an API server restart
    # ...and it answers 503 a few more times to the new agent's first Node reads, whatever the timing:
    # the new agent must wait for the API, not exit (a crash-looping DaemonSet pod backs off for minutes).
    cluster.kube.fail_next("GET", r"^/api/v1/nodes/node-1$", 503, count=4)
    new = start_agent("node-1", cluster.tmp, cluster.kube.url, cluster.pvc, cluster.mx_address, cluster.config)
    cluster.agents["node-1"] = new
    # While the API is down, someone adds a model (it is stored; agents cannot see it yet).
    time.sleep(1.0)
    cluster.kube.create("cachedmodels", cached_model("tiny-b", REPO_B), group=GROUP)
    cluster.created.append("tiny-b")
    wait_until(lambda: not cluster.kube.in_outage(), 10, "outage over")
    cluster.assert_all_running()  # including the agent that started while the API was unreachable
    new.wait_started()
    assert any(r.get("event") == "agent.api_unreachable" for r in new.log_lines()), new.tail()
    t0 = time.monotonic()
    wait_until(lambda: cluster.warm("tiny-b") == GPU_NODES, CONVERGE, "tiny-b ready after the outage")
    assert time.monotonic() - t0 < CONVERGE
    cr = cluster.cr("tiny-b")
    assert cr is not None and cr["status"]["resolvedRevision"] == cluster.commits[REPO_B]

    # The warm label of tiny-a never dropped during the outage (no flapping: workers keep scheduling).
    for node in GPU_NODES:
        for _, labels in cluster.kube.labels_over_time(node)[history_start[node]:]:
            assert labels.get(ready_key("tiny-a")) == "ready", f"{node} lost tiny-a during the outage: {labels}"
    for node, a in cluster.agents.items():
        want = float(len(cluster.kube.list("cachedmodels", group=GROUP))) if node in GPU_NODES else 0.0
        wait_until(lambda a=a, w=want: a.metric("modelcache_models_ready") == w, 5, f"{node} models_ready={want}")  # type: ignore[misc]
        assert a.get("/healthz")[0] == 200
    cluster.assert_foreign_untouched()
    cluster.assert_all_running()


def test_deleting_cachedmodels_removes_labels_only(cluster: Cluster) -> None:
    cluster.ensure_warm("tiny-a", REPO_A)
    names = [n for n in dict.fromkeys(cluster.created) if cluster.cr(n) is not None]
    for name in names:
        cluster.kube.delete("cachedmodels", name, group=GROUP)

    def no_model_labels() -> bool:
        return all(not any(k.startswith(PREFIX + "/") for k in cluster.labels(n)) for n in NODES)

    wait_until(no_model_labels, CONVERGE, "every modelcache.dev/ label removed")
    assert cluster.fitting({ready_key("tiny-a"): "ready"}) == set()
    cluster.assert_foreign_untouched()
    for node, a in cluster.agents.items():
        wait_until(lambda a=a: a.metric("modelcache_models_desired") == 0.0, 5, f"{node} models_desired=0")  # type: ignore[misc]
        assert a.metric("modelcache_models_ready") == 0.0
        assert cluster.status(node) == {}
    cluster.assert_all_running()


def test_sigterm_exits_zero_within_budget(cluster: Cluster) -> None:
    """SIGTERM with fills in flight: exit 0 within terminationBudgetSeconds, nothing half-published."""
    if cluster.mx is not None:  # a fill that cannot finish within the budget (7 chunks, 6 s apart)
        cluster.mx.faults.chunk_delay = 6.0
        cluster.create(cached_model("slow", REPO_SLOW, sources=["modelexpress"]))
        wait_until(lambda: all(cluster.status(n).get("slow", {}).get("state") == "filling" for n in GPU_NODES),
                   CONVERGE, "slow fill in flight on the GPU nodes")
        time.sleep(1.0)
    results = stop_agents(list(cluster.agents.values()), TERMINATION_BUDGET + 10)
    for node, (rc, took) in results.items():
        assert rc == 0, f"{node}: exit {rc} after {took:.1f}s\n{cluster.agents[node].tail()}"
        assert took < TERMINATION_BUDGET + 5.0, f"{node} took {took:.1f}s"  # the fill alone would need ~40 s
        slow = cluster.agents[node].cache / "hub" / "models--org--tiny-slow"
        assert not (slow / "refs").exists() and not (slow / "snapshots").exists(), f"{node}: partial publish"
        lines = cluster.agents[node].log_lines()
        events = [r.get("event") for r in lines]
        assert "agent.stopping" in events and "agent.stopped" in events
        stopped = next(r for r in lines if r.get("event") == "agent.stopped")
        if cluster.mx is not None:  # the budget was enforced, not waited out
            assert stopped["fills_finished"] is (node not in GPU_NODES), stopped
        # No error at all, including the fill abandoned at the budget (its source is closed under it).
        assert not [r for r in lines if r.get("level") in ("error", "critical")], cluster.agents[node].tail()
