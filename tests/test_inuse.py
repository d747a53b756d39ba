"""Which models the pods on a node use (the three in-use rules), pure."""

from __future__ import annotations

from typing import Any

from agent.core.inuse import InUse, models_in_use, pod_view, track

P = "modelcache.dev"


def pod(name: str = "p", phase: str = "Running", *, selector: dict[str, str] | None = None,
        affinity: list[list[dict[str, Any]]] | None = None, preferred: list[dict[str, Any]] | None = None,
        annotations: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"nodeName": "n1"}
    if selector is not None:
        spec["nodeSelector"] = selector
    node_affinity: dict[str, Any] = {}
    if affinity is not None:
        node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = {
            "nodeSelectorTerms": [{"matchExpressions": term} for term in affinity]}
    if preferred is not None:
        node_affinity["preferredDuringSchedulingIgnoredDuringExecution"] = [
            {"weight": 1, "preference": {"matchExpressions": preferred}}]
    if node_affinity:
        spec["affinity"] = {"nodeAffinity": node_affinity}
    return {"metadata": {"name": name, "namespace": "ml", "annotations": annotations or {}}, "spec": spec,
            "status": {"phase": phase}}


def used(*pods: dict[str, Any]) -> frozenset[str]:
    return models_in_use([pod_view(p, P) for p in pods], P)


def test_rule_1_node_selector_on_the_model_label() -> None:
    assert used(pod(selector={f"{P}/qwen": "ready", "gpu": "true"})) == {"qwen"}
    assert used(pod(selector={f"{P}/qwen": "anything"})) == {"qwen"}  # the key is what matters
    assert used(pod(selector={"gpu": "true", f"{P}.io/x": "y", f"{P}/status": "x"})) == frozenset()


def test_rule_2_required_affinity_in_or_exists_only() -> None:
    assert used(pod(affinity=[[{"key": f"{P}/a", "operator": "In", "values": ["ready"]}],
                              [{"key": f"{P}/b", "operator": "Exists"}]])) == {"a", "b"}
    assert used(pod(affinity=[[{"key": f"{P}/a", "operator": "NotIn", "values": ["ready"]},
                               {"key": f"{P}/b", "operator": "DoesNotExist"}]])) == frozenset()
    assert used(pod(preferred=[{"key": f"{P}/a", "operator": "In", "values": ["ready"]}])) == frozenset()


def test_rule_3_models_annotation() -> None:
    assert used(pod(annotations={f"{P}/models": " a, b ,,c"})) == {"a", "b", "c"}
    assert used(pod(annotations={"other.io/models": "a"})) == frozenset()


def test_finished_pods_use_nothing_pending_ones_do() -> None:
    sel = {f"{P}/m": "ready"}
    assert used(pod(phase="Succeeded", selector=sel), pod(phase="Failed", selector=sel)) == frozenset()
    assert used(pod(phase="Pending", selector=sel)) == {"m"}
    assert used(pod(phase="", selector=sel)) == {"m"}  # no phase yet: just bound


def test_malformed_pods_add_nothing_and_do_not_raise() -> None:
    terms = {"nodeSelectorTerms": ["x", {"matchExpressions": 3}]}
    bad = {"metadata": {"name": "x", "annotations": {f"{P}/models": 7}},
           "spec": {"nodeSelector": ["x"],
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": terms}}}}
    assert used(bad) == frozenset()


def test_track_remembers_when_each_model_was_last_used() -> None:
    s = track(InUse(), frozenset({"a", "b"}), 100.0)
    assert s.synced and s.models == {"a", "b"} and s.last_used == {"a": 100.0, "b": 100.0}
    s = track(s, frozenset({"a"}), 200.0)  # b's last user went away now
    assert s.last_used == {"a": 200.0, "b": 200.0}
    s = track(s, frozenset({"a"}), 300.0)
    assert s.last_used == {"a": 300.0, "b": 200.0}
