"""Several agents' cluster sides (ClusterParts) against one emulated API server that enforces rbac.yaml.

The loop is replaced by ``StandInLoop`` (each desired model is "filled" at once after the revision pin
and reported ready), so these tests see exactly what the control plane does: who writes what, how often,
and what happens when the leader goes away. The real loop runs in e2e/ and bench/control_plane.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from agent.core.desired import DesiredState
from agent.core.inuse import InUse
from agent.k8s.client import make_api
from agent.k8s.crd import GROUP, PLURAL
from agent.k8s.node import NodeReporter
from agent.k8s.settings import KubeSettings
from agent.k8s.wiring import ClusterParts, LoopHooks, start_cluster_parts, wait_for_api
from tests.peers.kube_emulator import KubeEmulator, rules_from_manifest

ROOT = Path(__file__).resolve().parents[1]
P = "modelcache.dev"
NS = "model-cache"
GPU = "nvidia.com/gpu.present"
COMMIT = "c" * 40
FAST = KubeSettings(lease_namespace=NS, lease_duration=1.5, lease_renew_period=0.3, lease_renew_deadline=0.9,
                    lease_acquire_jitter=0.2, aggregate_interval=0.5, node_status_interval=0.5, watch_timeout=30,
                    desired_debounce=0.05)


def manifest_rules() -> list:
    return rules_from_manifest(yaml.safe_load_all((ROOT / "manifests" / "rbac.yaml").read_text()), NS)


class StandInLoop:
    """What the Reconciler does, reduced to its cluster-facing behaviour: pin, 'fill', report."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.parts: ClusterParts | None = None
        self.desired: list[DesiredState] = []
        self.in_use: list[InUse] = []
        self._lock = threading.Lock()
        self.started = threading.Event()

    def on_desired(self, d: DesiredState) -> None:
        self.desired.append(d)
        threading.Thread(target=self._converge, args=(d,), daemon=True).start()

    def _converge(self, d: DesiredState) -> None:
        assert self.started.wait(5)
        assert self.parts is not None
        rep = self.parts.reporter
        with self._lock:
            statuses: dict[str, dict[str, object]] = {n: {"state": "pending"} for n in d.models}
            rep.report(frozenset(), statuses)
            for name, spec in d.models.items():
                d.pins.get(name) or rep.pin(name, COMMIT, spec.revision)
                statuses[name] = {"state": "ready", "commit": COMMIT[:12]}
            rep.report(frozenset(d.models), statuses)


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator(bookmark_interval=0.5, rbac=manifest_rules()) as emu:
        emu.rbac_exempt = __import__("re").compile("^(admin|model-cache-agent/.*)$")  # the test itself, kubectl
        for i in range(3):
            emu.create_node(f"n{i}", {GPU: "true"})
        emu.create_node("cpu", {})
        yield emu


def agent(kube: KubeEmulator, node: str, stop: threading.Event, ks: KubeSettings = FAST) -> StandInLoop:
    loop = StandInLoop(node)
    api = make_api(kube.url, user_agent=node, request_timeout=2.0, qps=ks.qps, burst=ks.burst, retry=ks.retry)
    hooks = LoopHooks(on_desired=loop.on_desired, on_in_use=loop.in_use.append)
    parts = start_cluster_parts(ks, hooks, stop, node_name=node, prefix=P, api=api)
    assert parts is not None
    loop.parts = parts
    loop.started.set()
    return loop


def cr(name: str = "m", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name},
            "spec": {"repo": "org/m", "revision": "main", "nodeSelector": {"matchLabels": {GPU: "true"}}, **spec}}


def status(kube: KubeEmulator, name: str = "m") -> dict[str, Any]:
    return (kube.get(PLURAL, name, group=GROUP) or {}).get("status") or {}


def leader(loops: list[StandInLoop]) -> StandInLoop | None:
    now = [lp for lp in loops if lp.parts is not None and lp.parts.elector.is_leader()]
    return now[0] if len(now) == 1 else None


def test_a_rollout_costs_each_node_two_writes_and_the_cachedmodel_a_few(kube: KubeEmulator,
                                                                      stop: threading.Event) -> None:
    loops = [agent(kube, f"n{i}", stop) for i in range(3)] + [agent(kube, "cpu", stop)]
    assert kube.wait_for(lambda: leader(loops) is not None, 5)
    for lp in loops:  # started: the first (empty) desired state is reported
        assert kube.wait_for(lambda lp=lp: f"{P}/status" in kube.node_annotations(lp.node), 5)
    kube.reset_counters()
    kube.create(PLURAL, cr(), group=GROUP)
    assert kube.wait_for(lambda: status(kube).get("readyNodes") == 3, 10)
    st = status(kube)
    assert (st["desiredNodes"], st["resolvedRevision"], st["resolvedFrom"]) == (3, COMMIT, "main")
    assert {c["type"]: c["status"] for c in st["conditions"]} == {"SpecValid": "True", "Ready": "True"}
    assert "nodes" not in st
    time.sleep(2 * FAST.aggregate_interval)
    for i in range(3):
        assert kube.node_labels(f"n{i}")[f"{P}/m"] == "ready"
        node_patches = kube.counts(client=f"^n{i}$")[("patch", "nodes")]
        assert node_patches <= 2, f"n{i}: {node_patches} Node writes for one model state change"
        annotation = json.loads(kube.node_annotations(f"n{i}")[f"{P}/status"])
        assert annotation == {"m": {"state": "ready", "commit": COMMIT[:12]}}  # the proposal is gone again
    assert f"{P}/m" not in kube.node_labels("cpu")
    writers = {r.client for r in kube.requests_matching("PATCH", "/status$") if r.status == 200}
    holder = leader(loops)
    assert holder is not None and writers == {holder.node}  # one writer for the cluster-wide status
    writes = len(kube.requests_matching("PATCH", "/status$"))
    assert writes <= 5, writes  # created, pinned, counts as nodes became ready: bounded by time, not nodes
    assert not kube.counts(status=lambda s: s == 409)
    assert all(lp.parts is not None and lp.parts.reporter.pins_by_leader == (1 if lp.node != "cpu" else 0)
               for lp in loops)
    # Every CachedModel status write reaches every agent's watch; only the two that change what a node must
    # hold (the model appears, its revision is pinned) woke its loop, the count updates did not.
    for lp in loops:
        assert [(set(d.models), dict(d.pins)) for d in lp.desired] == (
            [(set(), {}), ({"m"}, {}), ({"m"}, {"m": COMMIT})] if lp.node != "cpu" else [(set(), {})])
    assert not [r for r in kube.requests if r.status == 403]


def test_the_leader_gone_is_replaced_within_the_lease_and_nothing_flaps(kube: KubeEmulator,
                                                                      stop: threading.Event) -> None:
    loops = [agent(kube, f"n{i}", stop) for i in range(3)]
    kube.create(PLURAL, cr(), group=GROUP)
    assert kube.wait_for(lambda: status(kube).get("readyNodes") == 3, 10)
    old = leader(loops)
    assert old is not None
    before = len(kube.requests_matching("PATCH", "/status$"))
    kube.partition(f"^{old.node}$", 60)  # as the API server sees a SIGKILLed leader: silence
    t0 = time.monotonic()
    assert kube.wait_for(lambda: (lp := leader(loops)) is not None and lp is not old, FAST.lease_duration + 2)
    took = time.monotonic() - t0
    assert took <= FAST.lease_duration + 1.0, took
    time.sleep(3 * FAST.aggregate_interval)
    assert len(kube.requests_matching("PATCH", "/status$")) == before  # same Nodes, same status: no write
    new = leader(loops)
    assert new is not None
    other = next(lp.node for lp in loops if lp is not old)
    kube.patch("nodes", other, {"metadata": {"labels": {f"{P}/m": None}}})  # its agent will put it back
    assert kube.wait_for(lambda: kube.node_labels(other).get(f"{P}/m") == "ready", 5)
    ready = [r.body["status"]["readyNodes"] for r in kube.requests_matching("PATCH", "/status$")
             if r.status == 200 and "readyNodes" in r.body["status"]]
    assert all(v >= 2 for v in ready[ready.index(3):]), ready  # at most the one real dip, never to 0


def test_the_agent_uses_exactly_what_rbac_yaml_grants(kube: KubeEmulator, stop: threading.Event) -> None:
    loops = [agent(kube, f"n{i}", stop) for i in range(2)]
    kube.create(PLURAL, cr(), group=GROUP)
    kube.create(PLURAL, cr("bad", repo="not a repo"), group=GROUP)
    kube.create_pod("worker", "n0", node_selector={f"{P}/m": "ready"})
    assert kube.wait_for(lambda: status(kube).get("readyNodes") == 2, 10)
    assert kube.wait_for(lambda: any(e.get("reason") == "InvalidSpec" for e in kube.list("events")), 5)
    assert kube.wait_for(lambda: loops[0].in_use and loops[0].in_use[-1].models == {"m"}, 5)
    lp = leader(loops)
    assert lp is not None and lp.parts is not None
    lp.parts.events.emit("CachedModel", "m", "FillFailed", "x", "Warning")
    lp.parts.events.emit("CachedModel", "m", "FillFailed", "x", "Warning")  # aggregated: events patch
    lp.parts.reporter.pin("bad", COMMIT, "main")  # no CachedModel to pin: nothing to do
    assert not [(r.verb, r.resource) for r in kube.requests if r.status == 403]
    used = {(r.verb, r.resource) for r in kube.requests if r.client.startswith("n")}
    granted = {(v, res) for rule in manifest_rules() for res in rule.resources for v in rule.verbs}
    unused = granted - used
    # Used only off the happy path (exercised in their own tests): the fallback pin's re-read.
    assert unused <= {("get", "cachedmodels")}, unused


def test_forbidden_at_start_waits_naming_the_permission_then_starts(kube: KubeEmulator,
                                                                    stop: threading.Event) -> None:
    kube.revoke("", "nodes", "get")
    api = make_api(kube.url, user_agent="n0", request_timeout=2.0)
    node = NodeReporter(api, "n0", P)
    done: list[bool] = []
    with capture_logs() as logs:
        t = threading.Thread(target=lambda: done.append(wait_for_api(node, stop, policy=FAST.retry)))
        t.start()
        assert kube.wait_for(lambda: sum(e["event"] == "agent.forbidden" for e in logs) >= 2, 10)
        assert not done  # still waiting, not exited
        kube.grant("", "nodes", ["get"])
        t.join(10)
    assert done == [True] and node.known()
    forbidden = next(e for e in logs if e["event"] == "agent.forbidden")
    assert "get nodes" in forbidden["need"] and "403" in forbidden["error"]
    assert any(e["event"] == "agent.api_reachable" for e in logs)


def test_a_node_name_that_matches_no_node_is_waited_out(kube: KubeEmulator, stop: threading.Event) -> None:
    api = make_api(kube.url, user_agent="n9", request_timeout=2.0)
    node = NodeReporter(api, "n9", P)
    done: list[bool] = []
    with capture_logs() as logs:
        t = threading.Thread(target=lambda: done.append(wait_for_api(node, stop, policy=FAST.retry)))
        t.start()
        assert kube.wait_for(lambda: any(e["event"] == "agent.node_not_found" for e in logs), 10)
        stop.set()  # SIGTERM while waiting: a clean False, not an exception
        t.join(10)
    assert done == [False]
    assert "NODE_NAME='n9'" in next(e for e in logs if e["event"] == "agent.node_not_found")["error"]


def test_a_relabelled_node_gets_its_models_within_a_second(kube: KubeEmulator, stop: threading.Event) -> None:
    loops = [agent(kube, "cpu", stop)]
    kube.create(PLURAL, cr(), group=GROUP)
    time.sleep(0.5)
    assert not any(d.models for d in loops[0].desired)
    kube.patch("nodes", "cpu", {"metadata": {"labels": {GPU: "true"}}})  # the GPU operator labels the node
    assert kube.wait_for(lambda: kube.node_labels("cpu").get(f"{P}/m") == "ready", 3)
    assert kube.counts(client="^cpu$")[("get", "nodes")] == 1  # read once at start; the watch did the rest
