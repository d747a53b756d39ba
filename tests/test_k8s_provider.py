"""Desired state for this node (wake the loop only on a change, debounced), the Reporter, and the pod watch."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.core.desired import DesiredState
from agent.core.inuse import InUse
from agent.errors import SpecError
from agent.k8s.client import KubeApi
from agent.k8s.crd import GROUP, PLURAL, VERSION, CachedModelObj, parse_cached_model
from agent.k8s.events import EventRecorder, list_events
from agent.k8s.node import NodeReporter
from agent.k8s.pods import PodWatch
from agent.k8s.provider import KubeDesiredProvider, desired_for_node, same_desired
from agent.k8s.reporter import PROGRESS_STEP, KubeReporter, Outbox, annotation_statuses
from agent.k8s.watch import Reflector, WatchSettings, WatchTarget
from tests.peers.kube_emulator import KubeEmulator

P = "modelcache.dev"
NODE = "gpu-1"
GPU = "nvidia.com/gpu.present"
C1 = "a" * 40
WATCH = WatchSettings(timeout=30)


def cm(name: str, repo: str = "org/a", selector: dict[str, Any] | None = None, **status: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": name, "resourceVersion": "1"},
                           "spec": {"repo": repo, "nodeSelector": selector or {}}}
    if status:
        obj["status"] = status
    return obj


# ---- pure ------------------------------------------------------------------------------------------


def test_desired_for_node_selects_reports_errors_and_pins() -> None:
    gpu = {"matchLabels": {GPU: "true"}}
    objs = {o["metadata"]["name"]: parse_cached_model(o) for o in [
        cm("on-gpu", selector=gpu, resolvedRevision=C1, resolvedFrom="main"),
        cm("everywhere"),
        cm("bad-repo", repo="not a repo"),
        cm("bad-selector", selector={"matchExpressions": [{"key": "x", "operator": "Near"}]}),
    ]}
    on_gpu = desired_for_node(objs, {GPU: "true"}, synced=True)
    assert set(on_gpu.models) == {"on-gpu", "everywhere"} and on_gpu.pins == {"on-gpu": C1}
    assert set(on_gpu.errors) == {"bad-repo", "bad-selector"}  # a broken spec is reported on every node
    assert all(isinstance(e, SpecError) for e in on_gpu.errors.values())
    cpu = desired_for_node(objs, {}, synced=True)
    assert set(cpu.models) == {"everywhere"} and set(cpu.errors) == {"bad-repo", "bad-selector"}


def test_same_desired_ignores_everything_but_specs_pins_and_errors() -> None:
    a = parse_cached_model(cm("m"))
    counts = parse_cached_model({**cm("m"), "metadata": {"name": "m", "resourceVersion": "9"},
                                 "status": {"readyNodes": 7, "conditions": [{"type": "Ready"}]}})
    d1 = desired_for_node({"m": a}, {}, synced=True)
    assert same_desired(d1, desired_for_node({"m": counts}, {}, synced=True))  # a status-only update
    pinned = parse_cached_model(cm("m", resolvedRevision=C1, resolvedFrom="main"))
    assert not same_desired(d1, desired_for_node({"m": pinned}, {}, synced=True))
    assert not same_desired(d1, desired_for_node({"m": parse_cached_model(cm("m", repo="org/b"))}, {}, synced=True))
    assert not same_desired(None, d1)


def test_annotation_progress_moves_in_steps_and_carries_proposals() -> None:
    seen = {json.dumps(annotation_statuses({"m": {"state": "filling", "progress": i / 1000}})) for i in range(1001)}
    assert len(seen) == round(1 / PROGRESS_STEP) + 1
    assert annotation_statuses({"m": {"state": "filling", "progress": 0.299}})["m"]["progress"] == 0.2
    assert annotation_statuses({"m": {"state": "ready"}}, {"n": ("main", C1)}) == {
        "m": {"state": "ready"}, "n": {"state": "pending", "propose": {"revision": "main", "commit": C1}}}


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
    with KubeEmulator(bookmark_interval=0.2) as emu:
        emu.create_node(NODE, {GPU: "true", f"{P}/warm": "ready"})
        yield emu


class Side:
    """One agent's desired-state side: CachedModel watch, Node reporter with its watch, provider, reporter."""

    def __init__(self, api: KubeApi, stop: threading.Event, *, debounce: float = 0.2, pin_wait: float = 3.0,
                 leader_known: bool = True) -> None:
        self.desired: list[DesiredState] = []
        self.node = NodeReporter(api, NODE, P, watch=WATCH, settle=0.01)
        self.crs: Reflector[CachedModelObj] = Reflector(
            api, WatchTarget("cachedmodels", api.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL)),
            parse_cached_model, stop=stop, settings=WATCH, on_change=self._changed)
        self.provider = KubeDesiredProvider(self.crs.items, self.node.node_labels,
                                            lambda: self.crs.synced.is_set() and self.node.known(),
                                            self.desired.append, stop=stop, debounce=debounce)
        self.node.on_labels = self.provider.changed
        self.reporter = KubeReporter(api, self.node, EventRecorder(api, node_name=NODE), self.crs.items, stop=stop,
                                     pin_wait=pin_wait, leader_known=lambda: leader_known)
        self.node.watch(stop)
        self.crs.start()
        self.provider.start()

    def _changed(self) -> None:
        self.provider.changed()
        self.reporter.crs_changed()


def test_status_only_updates_never_wake_the_loop(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    kube.create(PLURAL, cm("m"), group=GROUP)
    side = Side(api, stop)
    assert kube.wait_for(lambda: len(side.desired) == 1)
    for i in range(20):  # the leader's count updates, conditions: they reach every agent's watch
        kube.patch(PLURAL, "m", {"status": {"readyNodes": i, "desiredNodes": 20}}, group=GROUP, subresource="status")
        time.sleep(0.02)
    kube.patch(PLURAL, "m", {"metadata": {"annotations": {"note": "x"}}}, group=GROUP)
    assert kube.wait_for(lambda: side.crs.get("m") is not None and side.crs.get("m").status.get("readyNodes") == 19)
    time.sleep(0.4)
    assert len(side.desired) == 1 and side.provider.recomputed >= 2  # looked, found nothing new
    kube.patch(PLURAL, "m", {"status": {"resolvedRevision": C1, "resolvedFrom": "main"}}, group=GROUP,
               subresource="status")
    assert kube.wait_for(lambda: len(side.desired) == 2)
    assert side.desired[-1].pins == {"m": C1}


def test_a_burst_of_changes_is_one_recomputation(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    side = Side(api, stop, debounce=0.5)
    assert kube.wait_for(lambda: len(side.desired) == 1)
    for i in range(10):
        kube.create(PLURAL, cm(f"m{i}"), group=GROUP)
    assert kube.wait_for(lambda: len(side.desired[-1].models) == 10, 5)
    assert len(side.desired) <= 3, [sorted(d.models) for d in side.desired]


def test_a_relabelled_node_reselects_models(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    kube.create(PLURAL, cm("gpu-model", selector={"matchLabels": {GPU: "true"}}), group=GROUP)
    side = Side(api, stop)
    assert kube.wait_for(lambda: side.desired and "gpu-model" in side.desired[-1].models)
    kube.patch("nodes", NODE, {"metadata": {"labels": {GPU: None}}})
    assert kube.wait_for(lambda: "gpu-model" not in side.desired[-1].models, 5)
    kube.patch("nodes", NODE, {"metadata": {"labels": {GPU: "true"}}})
    assert kube.wait_for(lambda: "gpu-model" in side.desired[-1].models, 5)
    assert kube.counts()[("get", "nodes")] == 0  # the watch, no polling


def test_report_is_one_node_write_and_waits_for_the_first_report(kube: KubeEmulator, api: KubeApi,
                                                                 stop: threading.Event) -> None:
    side = Side(api, stop)
    time.sleep(0.3)
    assert not kube.requests_matching("PATCH", "/nodes/")  # a restarted agent strips nothing before its report
    side.reporter.report(frozenset({"warm", "new"}), {"warm": {"state": "ready"}, "new": {"state": "ready"}})
    assert kube.wait_for(lambda: kube.node_labels(NODE).get(f"{P}/new") == "ready")
    assert len(kube.requests_matching("PATCH", "/nodes/")) == 1
    assert all(ls.get(f"{P}/warm") == "ready" for _, ls in kube.labels_over_time(NODE))  # never flapped


def test_invalid_spec_is_left_to_the_leader_other_events_are_written(kube: KubeEmulator, api: KubeApi,
                                                                     stop: threading.Event) -> None:
    kube.create(PLURAL, cm("m"), group=GROUP)
    side = Side(api, stop)
    assert side.crs.synced.wait(5)
    side.reporter.event("m", "InvalidSpec", "spec.repo: nope", warning=True)
    side.reporter.event("m", "FillFailed", "pvc: nothing there", warning=True)
    assert side.reporter.outbox.wait_idle(5)
    events = list_events(api)
    assert [(e["reason"], e["involvedObject"]["uid"]) for e in events] == [
        ("FillFailed", kube.get(PLURAL, "m", group=GROUP)["metadata"]["uid"])]  # type: ignore[index]
    assert not kube.requests_matching("PATCH", "/status$")  # no condition writes by agents any more


def test_events_do_not_block_the_loop_when_the_api_is_down(kube: KubeEmulator, api: KubeApi,
                                                           stop: threading.Event) -> None:
    side = Side(api, stop)
    kube.outage(1.5, mode="503")
    t0 = time.monotonic()
    for _ in range(5):
        side.reporter.event("bad", "FillFailed", "pvc: nothing there", warning=True)
    assert time.monotonic() - t0 < 0.2
    stop.set()  # shutdown cuts pending retries short
    assert side.reporter.outbox.wait_idle(10)


def test_pin_proposes_and_adopts_the_leaders_pin(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    kube.create(PLURAL, cm("m"), group=GROUP)
    side = Side(api, stop, pin_wait=10.0)
    assert side.crs.synced.wait(5)
    side.reporter.report(frozenset(), {"m": {"state": "pending"}})
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(side.reporter.pin("m", "b" * 40, "main")))
    t.start()

    def proposal() -> Any:
        return json.loads(kube.node_annotations(NODE).get(f"{P}/status", "{}")).get("m", {}).get("propose")

    assert kube.wait_for(lambda: proposal() == {"revision": "main", "commit": "b" * 40})
    # The leader (the test, here) pins another agent's proposal: everyone fills that one.
    kube.patch(PLURAL, "m", {"status": {"resolvedRevision": C1, "resolvedFrom": "main"}}, group=GROUP,
               subresource="status")
    t.join(5)
    assert got == [C1] and side.reporter.pins_by_leader == 1
    assert [r for r in kube.requests_matching("PATCH", "/status$") if r.client != "admin"] == []
    assert side.reporter.pin("m", "b" * 40, "main") == C1  # already pinned: adopted without a word
    assert side.reporter.pin("gone", "b" * 40, "main") == "b" * 40


def test_without_a_leader_the_agent_pins_itself(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    kube.create(PLURAL, cm("m"), group=GROUP)
    side = Side(api, stop, pin_wait=30.0, leader_known=False)
    assert side.crs.synced.wait(5)
    with capture_logs() as logs:
        t0 = time.monotonic()
        assert side.reporter.pin("m", C1, "main") == C1
    assert time.monotonic() - t0 < 5.0  # no leader known: a short wait, not pin_wait
    assert any(e["event"] == "reporter.no_leader_pin" for e in logs)
    status = kube.get(PLURAL, "m", group=GROUP)["status"]  # type: ignore[index]
    assert (status["resolvedRevision"], status["resolvedFrom"]) == (C1, "main") and side.reporter.pins_by_us == 1


def test_pods_on_this_node_make_models_in_use(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    seen: list[InUse] = []
    kube.create_pod("old", NODE, node_selector={f"{P}/a": "ready"})
    watch = PodWatch(api, NODE, P, seen.append, stop=stop, watch=WATCH)
    watch.start()
    assert kube.wait_for(lambda: bool(seen)) and seen[0].synced and seen[0].models == {"a"}
    kube.create_pod("w", NODE, namespace="ml", annotations={f"{P}/models": "b"})
    kube.create_pod("elsewhere", "gpu-2", node_selector={f"{P}/c": "ready"})
    assert kube.wait_for(lambda: seen[-1].models == {"a", "b"})
    kube.patch("pods", "old", {"status": {"phase": "Succeeded"}}, namespace="default")
    assert kube.wait_for(lambda: seen[-1].models == {"b"})
    assert seen[-1].last_used["a"] >= seen[0].last_used["a"]
    kube.delete("pods", "w", namespace="ml")
    assert kube.wait_for(lambda: seen[-1].models == frozenset())
    n = len(seen)
    kube.patch("pods", "old", {"metadata": {"labels": {"x": "y"}}}, namespace="default")  # not about models
    time.sleep(0.3)
    assert len(seen) == n
    watch_req = next(r for r in kube.requests if r.verb == "watch" and r.resource == "pods")
    assert watch_req.query["fieldSelector"] == f"spec.nodeName={NODE}"
