"""NodeReporter against the emulated API server with the official client: coalescing, ownership, faults."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from agent.k8s.client import Backoff, KubeApi
from agent.k8s.coverage import read_coverage
from agent.k8s.node import NodeReporter, ready_labels
from tests.conftest import ManualClock
from tests.peers.kube_emulator import KubeEmulator

P = "modelcache.dev"
NODE = "gpu-1"
FAST = Backoff(initial=0.02, maximum=0.2, jitter=0.0, attempts=4)
FOREIGN = {"kubernetes.io/hostname": NODE, "nvidia.com/gpu.present": "true", "team": "ml"}


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator() as emu:
        emu.create_node(NODE, {**FOREIGN, f"{P}/stale-model": "ready"})
        yield emu


def reporter(api: KubeApi, **kw: object) -> NodeReporter:
    kw.setdefault("backoff", FAST)
    return NodeReporter(api, NODE, P, **kw)  # type: ignore[arg-type]


def patches(kube: KubeEmulator) -> list:
    return [r for r in kube.requests_matching("PATCH", f"/api/v1/nodes/{NODE}$") if r.status == 200]


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
    assert kube.node_annotations(NODE)[f"{P}/status"] == '{"qwen":{"state":"ready"}}'
    # Nothing changed: no second write.
    assert rep.flush()
    assert len(patches(kube)) == 1


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
    rep = reporter(api)
    with pytest.raises(ValueError, match="not ours"):
        rep.set_desired({"team": "x"})


def test_remove_stale_keeps_only_verified_models(kube: KubeEmulator, api: KubeApi) -> None:
    kube.patch("nodes", NODE, {"metadata": {"labels": {f"{P}/verified": "ready", f"{P}/gone": "ready"}}})
    rep = reporter(api)
    rep.remove_stale(["verified"])
    assert rep.flush()
    assert kube.node_labels(NODE) == {**FOREIGN, f"{P}/verified": "ready"}
    assert rep.node_labels() == kube.node_labels(NODE)


def test_heartbeat_rereads_and_repairs_drift(kube: KubeEmulator, api: KubeApi) -> None:
    clock = ManualClock(1000.0)
    rep = reporter(api, clock=clock, heartbeat=60.0)
    rep.set_desired(ready_labels(P, ["a"]))
    assert rep.flush()
    gets = len(kube.requests_matching("GET", f"/nodes/{NODE}$"))
    # Someone removes our label; before the heartbeat we trust what we wrote.
    kube.patch("nodes", NODE, {"metadata": {"labels": {f"{P}/a": None}}})
    clock.now += 30
    assert rep.flush()
    assert len(kube.requests_matching("GET", f"/nodes/{NODE}$")) == gets
    clock.now += 31
    assert rep.flush()
    assert len(kube.requests_matching("GET", f"/nodes/{NODE}$")) == gets + 1
    assert kube.node_labels(NODE)[f"{P}/a"] == "ready"
    # A heartbeat with no drift reads but does not write.
    n = len(patches(kube))
    clock.now += 61
    assert rep.flush()
    assert len(patches(kube)) == n


@pytest.mark.parametrize("status", [409, 500, 503])
def test_transient_errors_are_retried(kube: KubeEmulator, api: KubeApi, status: int) -> None:
    kube.fail_next("PATCH", f"/nodes/{NODE}$", status, count=2)
    rep = reporter(api)
    rep.set_desired(ready_labels(P, ["a"]))
    with capture_logs() as logs:
        assert rep.flush()
    failed = [r for r in kube.requests_matching("PATCH", f"/nodes/{NODE}$") if r.status == status]
    assert len(failed) == 2
    assert kube.node_labels(NODE)[f"{P}/a"] == "ready"
    assert [e["attempt"] for e in logs if e["event"] == "k8s.retry"] == ["1/4", "2/4"]


def test_retry_after_is_honoured(kube: KubeEmulator, api: KubeApi) -> None:
    kube.fail_next("PATCH", f"/nodes/{NODE}$", 429, retry_after=1)
    rep = reporter(api)  # its own backoff is 20 ms: only Retry-After explains a 1 s gap
    rep.set_desired(ready_labels(P, ["a"]))
    assert rep.flush()
    sent = kube.requests_matching("PATCH", f"/nodes/{NODE}$")
    assert [r.status for r in sent] == [429, 200]
    assert sent[1].at - sent[0].at >= 0.95


def test_permanent_error_is_not_retried_and_flush_reports_failure(kube: KubeEmulator, api: KubeApi) -> None:
    rep = reporter(api, clock=ManualClock(1000.0), heartbeat=3600.0)
    rep.set_desired(ready_labels(P, ["z"]))
    assert rep.flush()
    kube.fail_next("PATCH", f"/nodes/{NODE}$", 403)
    rep.set_desired(ready_labels(P, ["a"]))
    assert not rep.flush()
    assert [r.status for r in kube.requests_matching("PATCH", f"/nodes/{NODE}$")] == [200, 403]
    st = rep.state()
    assert not st.in_sync and st.failures == 1 and "403" in (st.last_error or "")
    # The failure forces a resync: the next flush re-reads the Node, then writes.
    gets = len(kube.requests_matching("GET", f"/nodes/{NODE}$"))
    assert rep.flush()
    assert len(kube.requests_matching("GET", f"/nodes/{NODE}$")) == gets + 1
    assert rep.state().in_sync


def wait_labels(kube: KubeEmulator, want: dict[str, str], timeout: float) -> bool:
    return kube.wait_for(lambda: kube.node_labels(NODE) == want, timeout=timeout)


@pytest.mark.parametrize("mode", ["refuse", "503"])
def test_run_loop_survives_outage_and_converges(kube: KubeEmulator, api: KubeApi, mode: str) -> None:
    stop = threading.Event()
    rep = reporter(api, backoff=Backoff(initial=0.1, maximum=0.5, jitter=0.1, attempts=3))
    thread = rep.start(stop)
    try:
        rep.set_desired(ready_labels(P, ["a"]))
        assert wait_labels(kube, {**FOREIGN, f"{P}/a": "ready"}, 5)
        kube.outage(3.0, mode=mode)
        began = time.monotonic()
        for names in (["a", "b"], ["b"], ["b", "c"]):  # the loop keeps changing its mind during the outage
            rep.set_desired(ready_labels(P, names), status_annotation=json.dumps(names))
            time.sleep(0.2)
        time.sleep(0.5)
        assert rep.state().failures > 0
        assert kube.node_labels(NODE) == {**FOREIGN, f"{P}/a": "ready"}  # nothing landed during the outage
        assert wait_labels(kube, {**FOREIGN, f"{P}/b": "ready", f"{P}/c": "ready"}, 10)
        assert time.monotonic() - began < 3.0 + 2.0  # converged promptly after the API came back
        assert kube.node_annotations(NODE)[f"{P}/status"] == '["b", "c"]'
        assert kube.wait_for(lambda: rep.state().in_sync, 2)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_run_loop_coalesces_bursts(kube: KubeEmulator, api: KubeApi) -> None:
    stop = threading.Event()
    rep = reporter(api, settle=2.0)  # roomy: a loaded CI box stretches the 0.2 s burst
    rep.set_desired(ready_labels(P, []))
    assert rep.flush()
    before = len(patches(kube))
    thread = rep.start(stop)
    try:
        for i in range(20):  # a burst spread over ~0.2 s, as when a scan finishes model after model
            rep.set_desired(ready_labels(P, [f"m{i}"]))
            time.sleep(0.01)
        assert wait_labels(kube, {**FOREIGN, f"{P}/m19": "ready"}, 10)
        time.sleep(0.3)
        assert len(patches(kube)) - before <= 2
        seen = {k for _, labels in kube.labels_over_time(NODE) for k in labels if k.startswith(P)}
        assert len(seen - {f"{P}/stale-model"}) <= 2  # workers never saw most intermediate states
    finally:
        stop.set()
        thread.join(5)


def test_stop_ends_run_loop_promptly_even_with_long_heartbeat(api: KubeApi) -> None:
    stop = threading.Event()
    rep = reporter(api, heartbeat=3600.0)
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
def test_real_30s_outage_then_convergence(kube: KubeEmulator, api: KubeApi) -> None:
    """The issue's number: 30 s of API outage, default-ish backoff, labels converge after."""
    stop = threading.Event()
    rep = reporter(api, backoff=Backoff(initial=0.5, maximum=4.0, attempts=3))
    thread = rep.start(stop)
    try:
        kube.outage(30.0)
        rep.set_desired(ready_labels(P, ["big"]))
        time.sleep(29.0)
        assert f"{P}/big" not in kube.node_labels(NODE)
        assert wait_labels(kube, {**FOREIGN, f"{P}/big": "ready"}, 10)
    finally:
        stop.set()
        thread.join(5)
