"""Client construction, error classification, Retry-After, the QPS limiter, and the emulator's contract."""

from __future__ import annotations

import email.utils
import itertools
import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.core.retry import RetryPolicy
from agent.errors import ConfigError, KubeApiError, KubeConflictError
from agent.k8s.client import TokenBucket, call, make_api, parse_retry_after, request, request_kind
from tests.conftest import ManualClock
from tests.peers.kube_emulator import KubeEmulator, Rule


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("100000") == 120.0  # capped: a broken proxy must not park us for a day
    date = email.utils.formatdate(1_000_010.0, usegmt=True)
    assert parse_retry_after(date, now=1_000_000.0) == pytest.approx(10.0)


def test_token_bucket_allows_a_burst_then_paces_at_qps() -> None:
    clock = ManualClock(0.0)
    bucket = TokenBucket(qps=2.0, burst=3, clock=clock)
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert bucket.reserve() == pytest.approx(0.5)  # then one token every 1/qps, queued in order
    assert bucket.reserve() == pytest.approx(1.0)
    clock.now += 10.0  # idle: the bank refills, but never beyond the burst
    assert [bucket.reserve() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve() > 0
    assert TokenBucket(qps=0, burst=1, clock=clock).reserve() == 0.0  # 0: no limit


def test_request_kind_names_verb_and_resource() -> None:
    assert request_kind("GET", "/api/v1/nodes", {}) == ("list", "nodes")
    assert request_kind("GET", "/api/v1/nodes", {"watch": ["true"]}) == ("watch", "nodes")
    assert request_kind("GET", "/api/v1/nodes/n1", {}) == ("get", "nodes")
    assert request_kind("PATCH", "/apis/modelcache.dev/v1alpha1/cachedmodels/m/status", {}) == \
        ("patch", "cachedmodels/status")
    assert request_kind("PUT", "/apis/coordination.k8s.io/v1/namespaces/x/leases/l", {}) == ("update", "leases")
    assert request_kind("GET", "/api/v1/pods", {"watch": ["1"]}) == ("watch", "pods")
    assert request_kind("POST", "/api/v1/namespaces/default/events", {}) == ("create", "events")


def test_every_request_is_paced_and_counted_and_names_the_node() -> None:
    with KubeEmulator() as kube:
        kube.create_node("n1")
        api = make_api(kube.url, qps=20.0, burst=1, user_agent="gpu-7")
        for _ in range(5):
            call(api.core.read_node, "n1", what="x")
        api.close()
        sent = kube.requests_matching("GET", "/nodes/n1$")
        assert [r.client for r in sent] == ["gpu-7"] * 5
        gaps = [b.at - a.at for a, b in itertools.pairwise(sent)]
        assert min(gaps) >= 0.04, gaps  # 20 per second after a burst of 1
        assert api.stats.snapshot() == {("get", "nodes"): 5}
        assert kube.counts(client="gpu-7") == {("get", "nodes"): 5}


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


def test_request_retries_transient_errors_but_not_conflicts_or_permanent_ones() -> None:
    fast = RetryPolicy(attempts=3, base=0.001, jitter=0.0)
    with KubeEmulator() as kube:
        kube.create_node("n1")
        api = make_api(kube.url, retry=fast)
        kube.fail_next("GET", "/nodes/n1$", 503, count=2)
        with capture_logs() as logs:
            assert request(api, api.core.read_node, "n1", what="get n1")["metadata"]["name"] == "n1"
        assert [e["attempt"] for e in logs if e["event"] == "retry"] == ["1/3", "2/3"]
        kube.fail_next("GET", "/nodes/n1$", 503, count=3)
        with pytest.raises(KubeApiError):  # attempts are bounded
            request(api, api.core.read_node, "n1", what="get n1")
        for status, cls in ((409, KubeConflictError), (403, KubeApiError)):
            before = len(kube.requests_matching("GET", "/nodes/n1$"))
            kube.fail_next("GET", "/nodes/n1$", status)
            with pytest.raises(cls):
                request(api, api.core.read_node, "n1", what="get n1")
            assert len(kube.requests_matching("GET", "/nodes/n1$")) == before + 1, f"{status} must not be resent"
        kube.fail_next("GET", "/nodes/n1$", 409)  # a write without a precondition may resend a 409
        assert request(api, api.core.read_node, "n1", what="x", retry_conflicts=True)["metadata"]["name"] == "n1"
        api.close()


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


def test_emulator_selectors_paging_rbac_and_counters() -> None:
    """What the watch helper and the scale bench assume of the emulator, through the official client."""
    from kubernetes.client.exceptions import ApiException

    with KubeEmulator() as kube:
        for i in range(5):
            kube.create_node(f"n{i}", {"gpu": "true" if i % 2 else "false", "zone": f"z{i % 3}"})
        kube.create_pod("p1", "n1")
        kube.create_pod("p2", "n2", namespace="team", phase="Succeeded")
        api = make_api(kube.url, user_agent="tester")

        def names(body: dict) -> list[str]:
            return [o["metadata"]["name"] for o in body["items"]]

        assert names(call(api.core.list_node, what="x", field_selector="metadata.name=n3")) == ["n3"]
        assert names(call(api.core.list_node, what="x", label_selector="gpu=true")) == ["n1", "n3"]
        assert names(call(api.core.list_node, what="x", label_selector="zone in (z0,z2),gpu!=true")) == ["n0", "n2"]
        assert names(call(api.core.list_node, what="x", label_selector="!gpu")) == []
        assert names(call(api.core.list_pod_for_all_namespaces, what="x", field_selector="spec.nodeName=n2")) == ["p2"]
        assert names(call(api.core.list_pod_for_all_namespaces, what="x",
                          field_selector="status.phase!=Succeeded")) == ["p1"]
        first = call(api.core.list_node, what="x", limit=2)
        assert names(first) == ["n0", "n1"] and first["metadata"]["continue"]
        rest = call(api.core.list_node, what="x", limit=10, _continue=first["metadata"]["continue"])
        assert names(rest) == ["n2", "n3", "n4"] and not rest["metadata"].get("continue")
        assert kube.counts(client="tester")[("list", "nodes")] == 6
        assert kube.counts(client="tester")[("list", "pods")] == 2

        kube.rbac = [Rule(frozenset([""]), frozenset(["nodes"]), frozenset(["get"]))]
        call(api.core.read_node, "n1", what="x")
        with pytest.raises(ApiException) as e:
            api.core.list_node()
        assert e.value.status == 403
        msg = json.loads(e.value.body)["message"]
        assert 'cannot list resource "nodes" in API group "" at the cluster scope' in msg
        kube.grant("coordination.k8s.io", "leases", ["get"], namespace="ns1")
        with pytest.raises(ApiException) as e:
            api.coordination.read_namespaced_lease("l", "ns2")
        assert e.value.status == 403 and 'in the namespace "ns2"' in json.loads(e.value.body)["message"]
        with pytest.raises(ApiException) as e:
            api.coordination.read_namespaced_lease("l", "ns1")
        assert e.value.status == 404  # allowed, just not there
        api.close()
