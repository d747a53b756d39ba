"""Client construction, error classification and Retry-After parsing."""

from __future__ import annotations

import email.utils
import random
from pathlib import Path

import pytest

from agent.errors import ConfigError, KubeApiError, KubeConflictError
from agent.k8s.client import Backoff, call, make_api, parse_retry_after, retrying
from tests.peers.kube_emulator import KubeEmulator


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("100000") == 120.0  # capped: a broken proxy must not park us for a day
    date = email.utils.formatdate(1_000_010.0, usegmt=True)
    assert parse_retry_after(date, now=1_000_000.0) == pytest.approx(10.0)


def test_backoff_grows_caps_and_jitters() -> None:
    b = Backoff(initial=1.0, factor=2.0, maximum=5.0, jitter=0.2)
    rng = random.Random(1)
    delays = [b.delay(n, rng) for n in range(1, 8)]
    assert 0.8 <= delays[0] <= 1.2 and 1.6 <= delays[1] <= 2.4
    assert all(d <= 6.0 for d in delays) and delays[-1] >= 4.0
    assert len({round(b.delay(3), 6) for _ in range(20)}) > 1  # jittered


def test_errors_are_classified_through_the_real_client() -> None:
    with KubeEmulator() as kube:
        api = make_api(kube.url, request_timeout=2.0)
        kube.create_node("n1")
        for status, cls, permanent in [
            (409, KubeConflictError, False),
            (429, KubeApiError, False),
            (500, KubeApiError, False),
            (404, KubeApiError, True),
            (403, KubeApiError, True),
        ]:
            kube.fail_next("GET", "/nodes/n1$", status, retry_after=2 if status == 429 else None, message="nope")
            with pytest.raises(KubeApiError) as e:
                call(api.core.read_node, "n1", what="get node n1")
            assert type(e.value) is cls and e.value.status == status and e.value.permanent is permanent
            assert "get node n1: HTTP" in str(e.value) and "nope" in str(e.value)
        kube.fail_next("GET", "/nodes/n1$", 429, retry_after=2)
        with pytest.raises(KubeApiError) as e:
            call(api.core.read_node, "n1", what="x")
        assert e.value.retry_after == 2.0
        assert call(api.core.read_node, "n1", what="x")["metadata"]["name"] == "n1"
        port = kube.port
        api.close()
    api = make_api(f"http://127.0.0.1:{port}", request_timeout=1.0)
    with pytest.raises(KubeApiError) as e:  # nobody listening: transient, status 0
        call(api.core.read_node, "n1", what="x")
    assert e.value.status == 0 and not e.value.permanent


def test_retrying_stops_on_permanent_and_after_attempts() -> None:
    calls = []

    def fail(err: KubeApiError) -> None:
        calls.append(1)
        raise err

    fast = Backoff(initial=0.001, jitter=0.0, attempts=3)
    with pytest.raises(KubeApiError):
        retrying(lambda: fail(KubeApiError("x", status=500, permanent=False)), what="x", backoff=fast)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(KubeApiError):
        retrying(lambda: fail(KubeApiError("x", status=400)), what="x", backoff=fast)
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(KubeConflictError):
        retrying(lambda: fail(KubeConflictError("x")), what="x", backoff=fast, retry_conflicts=False)
    assert len(calls) == 1


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="in-cluster"):
        make_api(in_cluster=True)
    with pytest.raises(ConfigError, match="kubeconfig"):
        make_api(in_cluster=False, kubeconfig=str(tmp_path / "missing"))


def test_kubeconfig_is_loaded(tmp_path: Path) -> None:
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    api = make_api(in_cluster=False, kubeconfig=str(cfg))
    assert api.api_client.configuration.host == "http://127.0.0.1:1"


def test_emulator_contract_the_agent_relies_on() -> None:
    """What the e2e tests assume of the emulator, through the official client."""
    from kubernetes.client.exceptions import ApiException

    with KubeEmulator() as kube:
        api = make_api(kube.url, request_timeout=2.0)
        kube.create_node("n1", {"a": "1"})
        # The client's default patch type for a dict is strategic merge: labels merge, not replace.
        api.core.patch_node("n1", {"metadata": {"labels": {"b": "2"}}}, _preload_content=False)
        assert kube.requests[-1].content_type == "application/strategic-merge-patch+json"
        assert kube.node_labels("n1") == {"a": "1", "b": "2"}
        assert [labels for _, labels in kube.labels_over_time("n1")] == [{"a": "1"}, {"a": "1", "b": "2"}]
        # Status subresource: a replace with a stale resourceVersion is a 409; status is separate from spec.
        obj = api.custom.create_cluster_custom_object(
            "modelcache.dev",
            "v1alpha1",
            "cachedmodels",
            {"metadata": {"name": "m"}, "spec": {"repo": "a/b"}, "status": {"ignored": True}},
        )
        assert "status" not in obj and obj["metadata"]["generation"] == 1
        stale = obj["metadata"]["resourceVersion"]
        api.custom.patch_cluster_custom_object(
            "modelcache.dev", "v1alpha1", "cachedmodels", "m", {"spec": {"revision": "v1"}, "status": {"x": 1}}
        )
        cur = api.custom.get_cluster_custom_object("modelcache.dev", "v1alpha1", "cachedmodels", "m")
        assert cur["metadata"]["generation"] == 2 and "status" not in cur
        with pytest.raises(ApiException) as e:
            api.custom.replace_cluster_custom_object_status(
                "modelcache.dev",
                "v1alpha1",
                "cachedmodels",
                "m",
                {**cur, "metadata": {**cur["metadata"], "resourceVersion": stale}, "status": {"x": 1}},
            )
        assert e.value.status == 409
        done = api.custom.replace_cluster_custom_object_status(
            "modelcache.dev", "v1alpha1", "cachedmodels", "m", {**cur, "status": {"x": 1}}
        )
        assert done["status"] == {"x": 1} and done["metadata"]["generation"] == 2
        api.close()
