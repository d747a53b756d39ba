"""CachedModel parsing and the two status writes (leader's CAS write, agents' fallback pin) against the emulator."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agent.core.retry import RetryPolicy
from agent.errors import KubeApiError, KubeConflictError
from agent.k8s.client import KubeApi, make_api
from agent.k8s.crd import GROUP, get_cached_model, parse_cached_model, pin_revision, write_status
from tests.peers.kube_emulator import KubeEmulator

FAST = RetryPolicy(attempts=6, base=0.01, cap=0.05, jitter=0.0)
C1, C2 = "1" * 40, "2" * 40


def cm(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"repo": "Qwen/Qwen3-0.6B", "revision": "main", **spec}}


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator() as emu:
        yield emu


def create(kube: KubeEmulator, obj: dict[str, Any]) -> dict[str, Any]:
    return kube.create("cachedmodels", obj, group=GROUP)


def test_parse_keeps_bad_specs_with_the_field_named() -> None:
    good = parse_cached_model({**cm("good", nodeSelector={"matchLabels": {"gpu": "true"}}),
                               "status": {"resolvedRevision": C1, "resolvedFrom": "main", "readyNodes": 2}})
    assert good.ok and good.resolved_revision == C1 and good.status["readyNodes"] == 2 and good.revision == "main"
    bad_op = parse_cached_model(cm("bad-op", nodeSelector={"matchExpressions": [{"key": "g", "operator": "Eq"}]}))
    assert bad_op.spec is None and bad_op.error is not None
    assert bad_op.error.field == "spec.nodeSelector.matchExpressions[0].operator"
    bad_repo = parse_cached_model(cm("bad-repo", repo="not a repo"))
    assert bad_repo.error is not None and bad_repo.error.field == "spec.repo" and bad_repo.revision == "main"


def test_a_pin_for_an_older_revision_does_not_apply() -> None:
    obj = parse_cached_model({**cm("m", revision="v2"), "status": {"resolvedRevision": C1, "resolvedFrom": "main"}})
    assert obj.resolved_revision is None
    legacy = parse_cached_model({**cm("m"), "status": {"resolvedRevision": C1}})  # written before resolvedFrom
    assert legacy.resolved_revision == C1


def test_write_status_is_guarded_by_the_version_it_was_computed_from(kube: KubeEmulator, api: KubeApi) -> None:
    obj = create(kube, cm("m"))
    rv = obj["metadata"]["resourceVersion"]
    out = write_status(api, "m", rv, {"readyNodes": 1, "desiredNodes": 2})
    assert out["status"] == {"readyNodes": 1, "desiredNodes": 2}
    with pytest.raises(KubeConflictError):  # a late write from a stale view: refused, not lost-updating
        write_status(api, "m", rv, {"readyNodes": 0})
    write_status(api, "m", out["metadata"]["resourceVersion"], {"nodes": None, "readyNodes": 2})
    assert get_cached_model(api, "m")["status"] == {"readyNodes": 2, "desiredNodes": 2}


def test_pin_race_between_two_agents_ends_on_one_commit(kube: KubeEmulator) -> None:
    create(kube, cm("qwen"))
    rv = parse_cached_model(kube.get("cachedmodels", "qwen", group=GROUP) or {}).resource_version
    apis = [make_api(kube.url, request_timeout=2.0) for _ in range(2)]
    barrier = threading.Barrier(2)
    results: dict[int, str] = {}

    def agent(i: int, commit: str) -> None:
        barrier.wait()
        results[i] = pin_revision(apis[i], "qwen", commit, rv, revision="main", policy=FAST)

    threads = [threading.Thread(target=agent, args=(i, c)) for i, c in enumerate((C1, C2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for a in apis:
        a.close()
    obj = kube.get("cachedmodels", "qwen", group=GROUP) or {}
    assert results[0] == results[1] == obj["status"]["resolvedRevision"]
    assert obj["status"]["resolvedFrom"] == "main"
    statuses = sorted(r.status for r in kube.requests_matching("PATCH", "/cachedmodels/qwen/status$"))
    assert statuses == [200, 409]  # exactly one write landed; the loser re-read and adopted it
    assert parse_cached_model(obj).resolved_revision == results[0]


def test_pin_retries_when_only_something_else_changed(kube: KubeEmulator, api: KubeApi) -> None:
    create(kube, cm("qwen"))
    rv = (kube.get("cachedmodels", "qwen", group=GROUP) or {})["metadata"]["resourceVersion"]
    kube.patch("cachedmodels", "qwen", {"metadata": {"annotations": {"x": "y"}}}, group=GROUP)  # rv moves on
    assert pin_revision(api, "qwen", C1, rv, revision="main", policy=FAST) == C1
    assert get_cached_model(api, "qwen")["status"]["resolvedRevision"] == C1


def test_pin_for_an_older_revision_is_replaced(kube: KubeEmulator, api: KubeApi) -> None:
    create(kube, cm("qwen", revision="v2"))
    kube.patch("cachedmodels", "qwen", {"status": {"resolvedRevision": C1, "resolvedFrom": "main"}}, group=GROUP,
               subresource="status")
    assert pin_revision(api, "qwen", C2, None, revision="v2", policy=FAST) == C2
    status = get_cached_model(api, "qwen")["status"]
    assert (status["resolvedRevision"], status["resolvedFrom"]) == (C2, "v2")


def test_permanent_error_surfaces_from_pin(kube: KubeEmulator, api: KubeApi) -> None:
    with pytest.raises(KubeApiError) as e:
        pin_revision(api, "missing", C1, "1", revision="main", policy=FAST)
    assert e.value.status == 404 and e.value.permanent
