"""EventRecorder against the emulated API server: written, aggregated, and never raising."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.k8s.client import KubeApi
from agent.k8s.events import EventRecorder, list_events
from tests.conftest import ManualClock
from tests.peers.kube_emulator import KubeEmulator


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator() as emu:
        yield emu


def test_event_names_object_reason_and_node(kube: KubeEmulator, api: KubeApi) -> None:
    rec = EventRecorder(api, node_name="gpu-1")
    assert rec.emit("CachedModel", "qwen", "FillFinished", "3 files, 1.2 GiB from pvc in 4.1s", uid="u-1")
    assert rec.emit("Node", "gpu-1", "VerifyFailed", "qwen: model.safetensors sha256 mismatch", "Warning")
    events = list_events(api)
    assert len(events) == 2
    first = next(e for e in events if e["reason"] == "FillFinished")
    assert first["involvedObject"] == {
        "kind": "CachedModel",
        "name": "qwen",
        "apiVersion": "modelcache.dev/v1alpha1",
        "uid": "u-1",
    }
    assert first["type"] == "Normal" and first["count"] == 1
    assert first["source"] == {"component": "model-cache-agent", "host": "gpu-1"}
    assert first["metadata"]["namespace"] == "default"
    warn = next(e for e in events if e["reason"] == "VerifyFailed")
    assert warn["type"] == "Warning" and warn["involvedObject"]["apiVersion"] == "v1"


def test_repeats_within_window_are_aggregated_with_count(kube: KubeEmulator, api: KubeApi) -> None:
    clock = ManualClock(50.0)
    rec = EventRecorder(api, node_name="gpu-1", clock=clock, window=60.0)
    for _ in range(3):
        assert rec.emit("CachedModel", "qwen", "FillFailed", "hub: HTTP 503", "Warning")
        clock.now += 10
    events = list_events(api)
    assert len(events) == 1 and events[0]["count"] == 3
    assert len(kube.requests_matching("POST", "/events$")) == 1
    assert len(kube.requests_matching("PATCH", "/events/")) == 2
    # A different message is a different event; after the window a new Event starts at count 1.
    rec.emit("CachedModel", "qwen", "FillFailed", "hub: HTTP 404", "Warning")
    clock.now += 60
    rec.emit("CachedModel", "qwen", "FillFailed", "hub: HTTP 503", "Warning")
    counts = sorted((e["message"], e["count"]) for e in list_events(api))
    assert counts == [("hub: HTTP 404", 1), ("hub: HTTP 503", 1), ("hub: HTTP 503", 3)]


def test_aggregated_event_deleted_meanwhile_is_recreated(kube: KubeEmulator, api: KubeApi) -> None:
    rec = EventRecorder(api, node_name="gpu-1", clock=ManualClock(50.0))
    rec.emit("Node", "gpu-1", "DiskFull", "need 4 GiB")
    name = list_events(api)[0]["metadata"]["name"]
    kube.delete("events", name, namespace="default")  # the API server's event TTL
    assert rec.emit("Node", "gpu-1", "DiskFull", "need 4 GiB")
    assert [e["count"] for e in list_events(api)] == [1]


@pytest.mark.parametrize("status", [500, 403, 429])
def test_api_errors_never_raise(kube: KubeEmulator, api: KubeApi, status: int) -> None:
    kube.fail_next("POST", "/events$", status)
    rec = EventRecorder(api, node_name="gpu-1")
    assert rec.emit("CachedModel", "qwen", "FillFinished", "ok") is False
    assert rec.emit("CachedModel", "qwen", "FillFinished", "ok") is True


def test_outage_never_raises(kube: KubeEmulator, api: KubeApi) -> None:
    rec = EventRecorder(api, node_name="gpu-1", timeout=0.5)
    kube.outage(2.0)
    assert rec.emit("CachedModel", "qwen", "FillFailed", "boom", "Warning") is False


def test_both_event_apis_are_served(kube: KubeEmulator, api: KubeApi) -> None:
    """events.k8s.io/v1 is there too (kubectl events reads it), sharing nothing with core/v1 storage."""
    body = {
        "metadata": {"name": "x.1", "namespace": "default"},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "model-cache-agent",
        "reportingInstance": "gpu-1",
        "action": "Fill",
        "reason": "FillFinished",
        "regarding": {"kind": "CachedModel", "name": "qwen"},
        "type": "Normal",
    }
    resp = api.events.create_namespaced_event("default", body, _preload_content=False)
    assert resp.status == 201
    listed = api.events.list_namespaced_event("default", _preload_content=False)
    assert '"FillFinished"' in listed.data.decode()
