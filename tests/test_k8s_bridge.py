"""The cluster bridge (CachedModels -> DesiredState, loop -> Node/CRs) against the emulated API server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.core.desired import DesiredState
from agent.errors import SpecError
from agent.k8s.bridge import (
    PROGRESS_STEP,
    KubeDesiredProvider,
    KubeReporter,
    Outbox,
    annotation_statuses,
    desired_for_node,
)
from agent.k8s.client import Backoff, KubeApi
from agent.k8s.crd import GROUP, parse_cached_model
from agent.k8s.events import EventRecorder, list_events
from agent.k8s.node import NodeReporter
from tests.peers.kube_emulator import KubeEmulator

P = "modelcache.dev"
NODE = "gpu-1"
GPU = "nvidia.com/gpu.present"
FAST = Backoff(initial=0.02, maximum=0.2, jitter=0.0, attempts=3)


def cm(name: str, repo: str = "org/a", selector: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": name, "resourceVersion": "1"},
                           "spec": {"repo": repo, "nodeSelector": selector or {}}}
    if status:
        obj["status"] = status
    return obj


def wait_until(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    assert pred(), "condition not met"


# ---- pure ------------------------------------------------------------------------------------------


def test_desired_for_node_selects_reports_errors_and_pins() -> None:
    gpu = {"matchLabels": {GPU: "true"}}
    commit = "a" * 40
    objs = {o["metadata"]["name"]: parse_cached_model(o) for o in [
        cm("on-gpu", selector=gpu, resolvedRevision=commit, resolvedFrom="main"),
        cm("everywhere"),
        cm("bad-repo", repo="not a repo"),
        cm("bad-selector", selector={"matchExpressions": [{"key": "x", "operator": "Near"}]}),
    ]}
    on_gpu = desired_for_node(objs, {GPU: "true"}, synced=True)
    assert set(on_gpu.models) == {"on-gpu", "everywhere"}
    assert on_gpu.pins == {"on-gpu": commit}
    assert set(on_gpu.errors) == {"bad-repo", "bad-selector"}  # a broken spec is reported on every node
    assert all(isinstance(e, SpecError) for e in on_gpu.errors.values())
    cpu = desired_for_node(objs, {}, synced=True)
    assert set(cpu.models) == {"everywhere"} and set(cpu.errors) == {"bad-repo", "bad-selector"}


def test_annotation_progress_moves_in_steps() -> None:
    seen = {json.dumps(annotation_statuses({"m": {"state": "filling", "progress": i / 1000}})) for i in range(1001)}
    assert len(seen) == round(1 / PROGRESS_STEP) + 1
    assert annotation_statuses({"m": {"state": "filling", "progress": 0.299}})["m"]["progress"] == 0.2
    assert annotation_statuses({"m": {"state": "filling", "progress": 0.3}})["m"]["progress"] == 0.3
    assert annotation_statuses({"m": {"state": "ready", "commit": "abc"}}) == {"m": {"state": "ready", "commit": "abc"}}


def test_outbox_runs_in_order_off_thread_and_drops_oldest_when_full() -> None:
    stop = threading.Event()
    gate = threading.Event()
    ran: list[int] = []
    box = Outbox(stop, maxsize=3)
    box.put("block", lambda: (gate.wait(5), None)[1])
    box.start()
    time.sleep(0.05)  # the blocker is running; the queue is empty
    for i in range(5):
        box.put(f"w{i}", lambda i=i: ran.append(i))
    assert box.dropped == 2
    gate.set()
    assert box.wait_idle(5)
    assert ran == [2, 3, 4]
    box.put("boom", lambda: 1 / 0)  # a failing write is logged, the thread lives on
    box.put("after", lambda: ran.append(99))
    assert box.wait_idle(5) and ran[-1] == 99
    stop.set()


# ---- against the emulator --------------------------------------------------------------------------


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator() as emu:
        emu.create_node(NODE, {GPU: "true", "team": "ml", f"{P}/warm": "ready", f"{P}/stale": "ready"})
        yield emu


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    ev = threading.Event()
    yield ev
    ev.set()


def make_reporter(api: KubeApi, stop: threading.Event, node_name: str = NODE,
                  desired: list[DesiredState] | None = None) -> tuple[KubeReporter, KubeDesiredProvider]:
    node = NodeReporter(api, node_name, P, backoff=FAST)
    node.refresh(stop)
    sink = desired if desired is not None else []
    provider = KubeDesiredProvider(api, node, sink.append, stop=stop, relabel_check=0.1)
    return KubeReporter(api, node, EventRecorder(api, node_name=node_name), provider, stop=stop), provider


def test_node_labels_are_untouched_until_the_first_report(kube: KubeEmulator, api: KubeApi,
                                                          stop: threading.Event) -> None:
    """A restarted agent must not strip ready labels before it has re-checked what it holds."""
    rep, _ = make_reporter(api, stop)
    time.sleep(0.3)
    assert kube.node_labels(NODE)[f"{P}/warm"] == "ready"
    assert not kube.requests_matching("PATCH", f"/api/v1/nodes/{NODE}$")
    rep.report(frozenset({"warm"}), {"warm": {"state": "ready"}})
    wait_until(lambda: f"{P}/stale" not in kube.node_labels(NODE))
    labels = kube.node_labels(NODE)
    assert labels[f"{P}/warm"] == "ready" and labels["team"] == "ml"
    assert all(ls.get(f"{P}/warm") == "ready" for _, ls in kube.labels_over_time(NODE))  # never flapped
    assert json.loads(kube.node_annotations(NODE)[f"{P}/status"]) == {"warm": {"state": "ready"}}
    assert rep.outbox.wait_idle(5)  # the SpecValid check for "warm" (no such CachedModel: only logged)


def test_invalid_spec_is_one_event_for_the_cluster_and_heals(kube: KubeEmulator, api: KubeApi,
                                                             stop: threading.Event) -> None:
    kube.create("cachedmodels", cm("bad", repo="not a repo"), group=GROUP)
    for n in ("gpu-2", "gpu-3"):
        kube.create_node(n, {GPU: "true"})
    reporters = [make_reporter(api, stop, n)[0] for n in (NODE, "gpu-2", "gpu-3")]
    msg = "spec.repo: 'not a repo' must be 'org/name'"
    for r in reporters:
        r.event("bad", "InvalidSpec", msg, warning=True)
    for r in reporters:
        assert r.outbox.wait_idle(10)
    events = [e for e in list_events(api) if e["reason"] == "InvalidSpec"]
    assert len(events) == 1 and events[0]["type"] == "Warning" and events[0]["message"] == msg
    cond = kube.get("cachedmodels", "bad", group=GROUP)["status"]["conditions"]  # type: ignore[index]
    assert [(c["type"], c["status"], c["reason"]) for c in cond] == [("SpecValid", "False", "InvalidSpec")]

    kube.patch("cachedmodels", "bad", {"spec": {"repo": "org/a"}}, group=GROUP)
    reporters[0].report(frozenset({"bad"}), {"bad": {"state": "ready"}})
    assert reporters[0].outbox.wait_idle(10)
    cond = kube.get("cachedmodels", "bad", group=GROUP)["status"]["conditions"]  # type: ignore[index]
    assert [(c["type"], c["status"], c["reason"]) for c in cond] == [("SpecValid", "True", "Valid")]

    # A model that never had a problem gets no condition write at all.
    kube.create("cachedmodels", cm("fine"), group=GROUP)
    reporters[1].report(frozenset({"fine"}), {"fine": {"state": "ready"}})
    assert reporters[1].outbox.wait_idle(10)
    assert "conditions" not in (kube.get("cachedmodels", "fine", group=GROUP) or {}).get("status", {})


def test_events_do_not_block_the_loop_when_the_api_is_down(kube: KubeEmulator, api: KubeApi,
                                                           stop: threading.Event) -> None:
    kube.create("cachedmodels", cm("bad", repo="not a repo"), group=GROUP)
    rep, _ = make_reporter(api, stop)
    kube.outage(1.5, mode="503")
    t0 = time.monotonic()
    for _ in range(5):
        rep.event("bad", "InvalidSpec", "spec.repo: nope", warning=True)
        rep.event("bad", "FillFailed", "pvc: nothing there", warning=True)
    assert time.monotonic() - t0 < 0.2
    stop.set()  # shutdown cuts pending retries short
    assert rep.outbox.wait_idle(10)


def test_node_label_change_reselects_models(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    kube.create_node("cpu-1", {"team": "ml"})
    kube.create("cachedmodels", cm("gpu-model", selector={"matchLabels": {GPU: "true"}}), group=GROUP)
    seen: list[DesiredState] = []
    _, provider = make_reporter(api, stop, "cpu-1", seen)
    provider.start()
    wait_until(lambda: bool(seen))
    assert not seen[-1].models
    kube.patch("nodes", "cpu-1", {"metadata": {"labels": {GPU: "true"}}})  # the GPU operator labels the node
    wait_until(lambda: "gpu-model" in seen[-1].models, 5)
    kube.patch("nodes", "cpu-1", {"metadata": {"labels": {GPU: None}}})
    wait_until(lambda: "gpu-model" not in seen[-1].models, 5)


def test_pin_adopts_a_pin_seen_since_the_loop_looked(kube: KubeEmulator, api: KubeApi,
                                                     stop: threading.Event) -> None:
    """Two agents resolve at once: the later one must adopt the visible pin, not rewrite it."""
    theirs = "c" * 40
    kube.create("cachedmodels", cm("m"), group=GROUP)
    kube.patch("cachedmodels", "m", {"status": {"resolvedRevision": theirs, "resolvedFrom": "main"}}, group=GROUP,
               subresource="status")
    rep, provider = make_reporter(api, stop)
    provider.start()
    wait_until(provider.watcher.synced.is_set)
    assert rep.pin("m", "d" * 40, "main") == theirs
    assert not kube.requests_matching("PATCH", "/cachedmodels/m/status")
    # a pin for another revision does not count: ours is written (CAS on the version we saw)
    assert rep.pin("m", "d" * 40, "v2") == "d" * 40
    assert len(kube.requests_matching("PATCH", "/cachedmodels/m/status")) == 1


def test_ready_and_desired_node_counts_in_cachedmodel_status(kube: KubeEmulator, api: KubeApi,
                                                             stop: threading.Event) -> None:
    """`kubectl get cachedmodels` READY/DESIRED come from status.nodes, one key per node, CAS-written."""
    for name in ("a", "b"):
        kube.create("cachedmodels", cm(name), group=GROUP)
    kube.patch("cachedmodels", "a", {"status": {"nodes": {"other-node": "ready"}, "readyNodes": 1,
                                                "desiredNodes": 1}}, group=GROUP, subresource="status")
    rep, _ = make_reporter(api, stop)

    def status(name: str) -> dict[str, Any]:
        return (kube.get("cachedmodels", name, group=GROUP) or {}).get("status") or {}

    rep.report(frozenset({"a"}), {"a": {"state": "ready"}, "b": {"state": "filling"}})
    wait_until(lambda: status("a").get("readyNodes") == 2 and status("b").get("desiredNodes") == 1)
    assert status("a")["nodes"] == {"other-node": "ready", NODE: "ready"} and status("a")["desiredNodes"] == 2
    assert status("b")["nodes"] == {NODE: "filling"} and status("b")["readyNodes"] == 0
    writes = len(kube.requests_matching("PATCH", "/cachedmodels/./status"))
    rep.report(frozenset({"a"}), {"a": {"state": "ready"}, "b": {"state": "filling", "progress": 0.5}})
    assert rep.outbox.wait_idle(5)
    assert len(kube.requests_matching("PATCH", "/cachedmodels/./status")) == writes  # no change, no write
    rep.report(frozenset({"a", "b"}), {"a": {"state": "ready"}})  # b no longer desired here
    wait_until(lambda: NODE not in (status("b").get("nodes") or {}))
    assert status("b").get("desiredNodes") == 0 and status("a")["readyNodes"] == 2
