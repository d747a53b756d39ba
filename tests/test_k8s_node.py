"""NodeReporter against the emulated API server: coalescing, ownership, the Node watch, drift, faults."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from agent.core.retry import RetryPolicy
from agent.k8s.client import KubeApi, make_api
from agent.k8s.coverage import read_coverage
from agent.k8s.node import NodeReporter, ready_labels
from agent.k8s.watch import WatchSettings
from tests.conftest import ManualClock
from tests.peers.kube_emulator import KubeEmulator

P = "modelcache.dev"
NODE = "gpu-1"
FAST = RetryPolicy(attempts=4, base=0.02, cap=0.2, jitter=0.0)
FOREIGN = {"kubernetes.io/hostname": NODE, "nvidia.com/gpu.present": "true", "team": "ml"}
WATCH = WatchSettings(timeout=30, backoff=RetryPolicy(attempts=1000, base=0.05, cap=0.3, jitter=0.0))


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator(bookmark_interval=0.2) as emu:
        emu.create_node(NODE, {**FOREIGN, f"{P}/stale-model": "ready"})
        yield emu


@pytest.fixture
def api(kube: KubeEmulator) -> Iterator[KubeApi]:
    handle = make_api(kube.url, request_timeout=2.0, retry=FAST, user_agent=NODE)
    yield handle
    handle.close()


def reporter(api: KubeApi, **kw: object) -> NodeReporter:
    kw.setdefault("backoff", FAST)
    kw.setdefault("watch", WATCH)
    return NodeReporter(api, NODE, P, **kw)  # type: ignore[arg-type]


def patches(kube: KubeEmulator) -> list:
    return [r for r in kube.requests_matching("PATCH", f"/api/v1/nodes/{NODE}$") if r.status == 200]


def gets(kube: KubeEmulator) -> int:
    return len(kube.requests_matching("GET", f"/api/v1/nodes/{NODE}$"))


def running(rep: NodeReporter, stop: threading.Event) -> NodeReporter:
    rep.watch(stop)
    assert rep.reflector is not None and rep.reflector.synced.wait(5)
    rep.start(stop)
    return rep


def test_many_set_desired_calls_make_one_merge_patch(kube: KubeEmulator, api: KubeApi) -> None:
    rep = reporter(api)
    for i in range(20):
        rep.set_desired(ready_labels(P, [f"m{j}" for j in range(i % 5)]), status_annotation=json.dumps({"i": i}))
    rep.set_desired(ready_labels(P, ["qwen", "llama"]), '{"qwen":{"state":"ready"}}')
    assert rep.flush()
    sent = patches(kube)
    assert len(sent) == 1
    assert sent[0].content_type == "application/merge-patch+json"
    assert sent[0].body == {
        "metadata": {
            "labels": {f"{P}/qwen": "ready", f"{P}/llama": "ready", f"{P}/stale-model": None},
            "annotations": {f"{P}/status": '{"qwen":{"state":"ready"}}'},
        }
    }
    assert kube.node_labels(NODE) == {**FOREIGN, f"{P}/qwen": "ready", f"{P}/llama": "ready"}
    assert rep.flush() and len(patches(kube)) == 1  # nothing changed: no second write


def test_foreign_labels_untouched_even_when_changed_concurrently(kube: KubeEmulator, api: KubeApi) -> None:
    rep = reporter(api)
    rep.set_desired(ready_labels(P, ["a"]))
    assert rep.flush()
    kube.patch("nodes", NODE, {"metadata": {"labels": {"team": "infra", "new.io/x": "1"}}})  # someone else edits
    rep.set_desired(ready_labels(P, ["a", "b"]))
    assert rep.flush()
    assert patches(kube)[-1].body == {"metadata": {"labels": {f"{P}/b": "ready"}}}
    assert kube.node_labels(NODE) == {**FOREIGN, "team": "infra", "new.io/x": "1", f"{P}/a": "ready", f"{P}/b": "ready"}


def test_labels_outside_prefix_are_refused(api: KubeApi) -> None:
    with pytest.raises(ValueError, match="not ours"):
        reporter(api).set_desired({"team": "x"})


def test_nothing_is_written_before_the_first_wish(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    """A restarted agent must not strip ready labels before the loop has re-checked what it holds."""
    running(reporter(api), stop)
    kube.patch("nodes", NODE, {"metadata": {"labels": {"team": "infra"}}})
    time.sleep(0.3)
    assert not patches(kube) and kube.node_labels(NODE)[f"{P}/stale-model"] == "ready"


def test_a_label_someone_removed_comes_back_within_seconds_without_polling(
        kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    rep = running(reporter(api), stop)
    rep.set_desired(ready_labels(P, ["a"]))
    assert kube.wait_for(lambda: kube.node_labels(NODE).get(f"{P}/a") == "ready", 5)
    reads = gets(kube)
    with capture_logs() as logs:
        kube.patch("nodes", NODE, {"metadata": {"labels": {f"{P}/a": None}}})  # a person, another controller
        t0 = time.monotonic()
        assert kube.wait_for(lambda: kube.node_labels(NODE).get(f"{P}/a") == "ready", 5)
        assert time.monotonic() - t0 < 2.0
        kube.patch("nodes", NODE, {"metadata": {"labels": {f"{P}/a": "broken"}}})  # changed, not removed
        assert kube.wait_for(lambda: kube.node_labels(NODE).get(f"{P}/a") == "ready", 5)
    assert gets(kube) == reads  # the watch told us: no GET, no heartbeat
    assert [e["event"] for e in logs].count("node.drift_repaired") == 2
    assert rep.stats["drift_repairs"] == 2
    kube.create_node("gpu-2", {f"{P}/a": "x"})  # another node's changes are not ours to see
    time.sleep(0.3)
    assert kube.counts(client=NODE)[("list", "nodes")] == 1


def test_a_fight_over_a_label_backs_off(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    """Another controller keeps deleting our label: we keep restoring it, but slower and slower."""
    rep = running(reporter(api), stop)
    rep.set_desired(ready_labels(P, ["a"]))
    assert kube.wait_for(lambda: kube.node_labels(NODE).get(f"{P}/a") == "ready", 5)
    end = time.monotonic() + 4.0
    removals = 0
    while time.monotonic() < end:
        if kube.node_labels(NODE).get(f"{P}/a") == "ready":
            kube.patch("nodes", NODE, {"metadata": {"labels": {f"{P}/a": None}}})
            removals += 1
        time.sleep(0.01)
    # Without the backoff this is hundreds of patches (one per ~20 ms); with it: 1+1+1+2+4 s...
    assert 3 <= len(patches(kube)) <= 8, len(patches(kube))
    assert removals == len(patches(kube)) - 1 or removals == len(patches(kube))


def test_status_only_changes_wait_for_the_interval_labels_and_urgent_ones_do_not(kube: KubeEmulator,
                                                                                 api: KubeApi) -> None:
    clock = ManualClock(100.0)
    rep = reporter(api, clock=clock, status_interval=10.0)
    rep.set_desired(ready_labels(P, ["a"]), '{"a":"ready"}')
    assert rep.due(clock.now) == 0.0 and rep.flush()
    rep.set_desired(ready_labels(P, ["a"]), '{"a":"ready","b":{"progress":0.1}}')
    assert rep.due(clock.now) == 10.0  # progress only: at most once per interval
    clock.now += 4
    assert rep.due(clock.now) == 6.0
    rep.set_desired(ready_labels(P, ["a"]), '{"a":"ready","b":{"progress":0.2}}', urgent=True)
    assert rep.due(clock.now) == 0.0  # a proposal the leader waits for
    assert rep.flush()
    rep.set_desired(ready_labels(P, ["a", "b"]), '{"a":"ready","b":"ready"}')
    assert rep.due(clock.now) == 0.0  # a label change: at once
    assert rep.flush() and rep.due(clock.now) is None
    assert len(patches(kube)) == 3


@pytest.mark.parametrize("status", [409, 500, 503])
def test_transient_errors_are_retried(kube: KubeEmulator, api: KubeApi, status: int) -> None:
    kube.fail_next("PATCH", f"/nodes/{NODE}$", status, count=2)
    rep = reporter(api)
    rep.set_desired(ready_labels(P, ["a"]))
    with capture_logs() as logs:
        assert rep.flush()
    assert len([r for r in kube.requests_matching("PATCH", f"/nodes/{NODE}$") if r.status == status]) == 2
    assert kube.node_labels(NODE)[f"{P}/a"] == "ready"
    assert [e["attempt"] for e in logs if e["event"] == "retry"] == ["1/4", "2/4"]


def test_retry_after_is_honoured(kube: KubeEmulator, api: KubeApi) -> None:
    kube.fail_next("PATCH", f"/nodes/{NODE}$", 429, retry_after=1)
    rep = reporter(api)  # its own backoff is 20 ms: only Retry-After explains a 1 s gap
    rep.set_desired(ready_labels(P, ["a"]))
    assert rep.flush()
    sent = kube.requests_matching("PATCH", f"/nodes/{NODE}$")
    assert [r.status for r in sent] == [429, 200]
    assert sent[1].at - sent[0].at >= 0.95


def test_permanent_error_is_not_retried_and_the_next_flush_rereads(kube: KubeEmulator, api: KubeApi) -> None:
    rep = reporter(api)
    rep.set_desired(ready_labels(P, ["z"]))
    assert rep.flush()
    kube.fail_next("PATCH", f"/nodes/{NODE}$", 403)
    rep.set_desired(ready_labels(P, ["a"]))
    with capture_logs() as logs:
        assert not rep.flush()
    assert [r.status for r in kube.requests_matching("PATCH", f"/nodes/{NODE}$")] == [200, 403]
    assert rep.stats["failures"] == 1 and "403" in (rep.last_error or "")
    assert next(e for e in logs if e["event"] == "node.patch_failed")["need"] == "patch nodes"
    reads = gets(kube)
    assert rep.flush()
    assert gets(kube) == reads + 1 and rep.last_error is None


def wait_labels(kube: KubeEmulator, want: dict[str, str], timeout: float) -> bool:
    return kube.wait_for(lambda: kube.node_labels(NODE) == want, timeout=timeout)


@pytest.mark.parametrize("mode", ["refuse", "503"])
def test_writer_survives_an_outage_and_converges(kube: KubeEmulator, api: KubeApi, stop: threading.Event,
                                                mode: str) -> None:
    rep = running(reporter(api, backoff=RetryPolicy(attempts=1000, base=0.1, cap=0.5, jitter=0.1)), stop)
    rep.set_desired(ready_labels(P, ["a"]))
    assert wait_labels(kube, {**FOREIGN, f"{P}/a": "ready"}, 5)
    kube.outage(2.0, mode=mode)
    began = time.monotonic()
    for names in (["a", "b"], ["b"], ["b", "c"]):  # the loop keeps changing its mind during the outage
        rep.set_desired(ready_labels(P, names), status_annotation=json.dumps(names))
        time.sleep(0.2)
    time.sleep(0.3)
    assert rep.stats["failures"] > 0
    assert kube.node_labels(NODE) == {**FOREIGN, f"{P}/a": "ready"}  # nothing landed during the outage
    assert wait_labels(kube, {**FOREIGN, f"{P}/b": "ready", f"{P}/c": "ready"}, 10)
    assert time.monotonic() - began < 2.0 + 3.0  # converged promptly after the API came back
    assert kube.node_annotations(NODE)[f"{P}/status"] == '["b", "c"]'


def test_writer_coalesces_bursts(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    rep = reporter(api, settle=2.0)  # roomy: a loaded CI box stretches the 0.2 s burst
    rep.set_desired(ready_labels(P, []))
    assert rep.flush()
    before = len(patches(kube))
    running(rep, stop)
    for i in range(20):  # a burst spread over ~0.2 s, as when a scan finishes model after model
        rep.set_desired(ready_labels(P, [f"m{i}"]))
        time.sleep(0.01)
    assert wait_labels(kube, {**FOREIGN, f"{P}/m19": "ready"}, 10)
    time.sleep(0.3)
    assert len(patches(kube)) - before <= 2
    seen = {k for _, labels in kube.labels_over_time(NODE) for k in labels if k.startswith(P)}
    assert len(seen - {f"{P}/stale-model"}) <= 2  # workers never saw most intermediate states


def test_foreign_label_changes_are_announced(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    calls: list[dict[str, str]] = []
    rep = reporter(api)
    rep.on_labels = lambda: calls.append(rep.node_labels())
    running(rep, stop)
    assert kube.wait_for(lambda: len(calls) == 1)  # the first sight
    kube.patch("nodes", NODE, {"metadata": {"labels": {"nvidia.com/gpu.present": None}}})
    assert kube.wait_for(lambda: len(calls) == 2)
    assert "nvidia.com/gpu.present" not in calls[-1]
    rep.set_desired(ready_labels(P, ["x"]))  # our own label changes are not news to the selectors
    assert kube.wait_for(lambda: kube.node_labels(NODE).get(f"{P}/x") == "ready")
    time.sleep(0.2)
    assert len(calls) == 2


def test_stop_ends_the_writer_promptly(api: KubeApi) -> None:
    stop = threading.Event()
    rep = reporter(api)
    thread = rep.start(stop)
    rep.set_desired(ready_labels(P, ["a"]))
    time.sleep(0.3)
    t0 = time.monotonic()
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - t0 < 1.0


def test_read_coverage_from_node_labels(kube: KubeEmulator, api: KubeApi) -> None:
    kube.create_node("gpu-2", {f"{P}/qwen": "ready", "zone": "b"})
    kube.create_node("cpu-1", {"zone": "b"})
    cov = read_coverage(api, P, page=1)  # one node per page: the continue token is followed
    assert cov.nodes == ("cpu-1", "gpu-1", "gpu-2")
    assert {m.name: (m.ready, m.missing) for m in cov.models} == {
        "qwen": (("gpu-2",), ("cpu-1", "gpu-1")),
        "stale-model": (("gpu-1",), ("cpu-1", "gpu-2")),
    }


@pytest.mark.slow
def test_real_30s_outage_then_convergence(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    """The issue's number: 30 s of API outage, default-ish backoff, labels converge after."""
    rep = running(reporter(api, backoff=RetryPolicy(attempts=1000, base=0.5, cap=4.0)), stop)
    kube.outage(30.0)
    rep.set_desired(ready_labels(P, ["big"]))
    time.sleep(29.0)
    assert f"{P}/big" not in kube.node_labels(NODE)
    assert wait_labels(kube, {**FOREIGN, f"{P}/big": "ready"}, 10)
