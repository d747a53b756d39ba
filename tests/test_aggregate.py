"""The CachedModel status the leader computes from the agents' Nodes (pure)."""

from __future__ import annotations

import json

from agent.core.aggregate import (
    ModelFacts,
    NodeReport,
    choose_pin,
    count,
    desired_status,
    parse_node_report,
    status_patch,
)

P = "modelcache.dev"
C1, C2, C3 = "1" * 40, "2" * 40, "3" * 40
NOW, LATER = "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z"


def node(name: str, *, ready: tuple[str, ...] = (), states: dict[str, str] | None = None,
         proposals: dict[str, tuple[str, str]] | None = None) -> NodeReport:
    return NodeReport(name, {m: "ready" for m in ready}, states or {}, proposals or {})


def conditions(status: dict) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in status["conditions"]}


def test_parse_node_report_reads_our_labels_states_and_proposals_only() -> None:
    ann = json.dumps({"a": {"state": "ready"}, "b": {"state": "pending", "propose": {"revision": "main", "commit": C1}},
                      "c": {"state": "pending", "propose": {"revision": "main", "commit": "not-a-commit"}},
                      "d": "garbage"})
    r = parse_node_report("n1", {f"{P}/a": "ready", f"{P}/status": "x", "team": "ml", f"{P}.io/x": "y"}, ann, P)
    assert r.labels == {"a": "ready"}
    assert r.states == {"a": "ready", "b": "pending", "c": "pending"}
    assert r.proposals == {"b": ("main", C1)}
    assert parse_node_report("n2", {}, "{not json", P).states == {}  # a broken annotation counts as empty


def test_counts_ready_desired_and_failed() -> None:
    nodes = [
        node("a", ready=("m",), states={"m": "ready"}),
        node("b", states={"m": "filling"}),
        node("c", states={"m": "failed"}),
        node("d", states={"m": "damaged"}),
        node("e", states={"m": "invalid"}),  # a spec error is not "wanted here"
        node("f", ready=("m",)),  # labelled but not (or no longer) in its annotation: the label is the contract
        node("g", states={"other": "ready"}),
    ]
    c = count("m", nodes)
    assert (c.ready, c.desired, c.failed, c.failed_nodes) == (2, 5, 2, ("c", "d"))


def test_pin_is_the_most_proposed_commit_for_this_revision_ties_smallest() -> None:
    nodes = [node("a", proposals={"m": ("main", C2)}), node("b", proposals={"m": ("main", C1)}),
             node("c", proposals={"m": ("v2", C3)}), node("d", proposals={"x": ("main", C3)})]
    assert choose_pin("m", "main", nodes) == C1  # one vote each: the smallest, so every leader picks the same
    assert choose_pin("m", "main", [*nodes, node("e", proposals={"m": ("main", C2)})]) == C2
    assert choose_pin("m", "v3", nodes) is None


def test_status_for_a_rollout_in_progress_and_done() -> None:
    model = ModelFacts("m", 3, "main", None, {})
    nodes = [node("a", ready=("m",), states={"m": "ready"}, proposals={}),
             node("b", states={"m": "filling"}, proposals={"m": ("main", C1)}),
             node("c", states={"m": "failed"})]
    st = desired_status(model, nodes, NOW)
    assert (st["readyNodes"], st["desiredNodes"], st["failedNodes"], st["observedGeneration"]) == (1, 3, 1, 3)
    assert (st["resolvedRevision"], st["resolvedFrom"], st["resolvedAt"]) == (C1, "main", NOW)
    assert conditions(st) == {"SpecValid": ("True", "Valid", "spec accepted"),
                              "Ready": ("False", "Filling", "1/3 nodes ready, 1 failed: c")}
    done = [node(n, ready=("m",), states={"m": "ready"}) for n in "abc"]
    st2 = desired_status(ModelFacts("m", 3, "main", None, st), done, LATER)
    assert st2["resolvedAt"] == NOW  # the pin is kept as it was
    assert conditions(st2)["Ready"] == ("True", "AllNodesReady", "3/3 nodes ready")
    assert {c["type"]: c["lastTransitionTime"] for c in st2["conditions"]} == {"SpecValid": NOW, "Ready": LATER}


def test_failing_nodes_are_named_up_to_five() -> None:
    nodes = [node(f"n{i}", states={"m": "failed"}) for i in range(8)]
    st = desired_status(ModelFacts("m", 1, "0" * 40, None, {}), nodes, NOW)
    assert conditions(st)["Ready"][2] == "0/8 nodes ready, 8 failed: n0, n1, n2, n3, n4 (+3 more)"
    assert "resolvedRevision" not in st  # a commit needs no pin


def test_invalid_spec_and_no_nodes() -> None:
    st = desired_status(ModelFacts("m", 2, None, "spec.repo: 'x' must be 'org/name'", {}), [], NOW)
    assert conditions(st)["SpecValid"] == ("False", "InvalidSpec", "spec.repo: 'x' must be 'org/name'")
    assert conditions(st)["Ready"][1] == "InvalidSpec"
    st = desired_status(ModelFacts("m", 1, "main", None, {}), [node("a")], NOW)
    assert conditions(st)["Ready"] == ("False", "NoNodes", "no agent node selects this model")
    assert st["desiredNodes"] == 0 and "resolvedRevision" not in st


def test_a_stale_pin_is_replaced_or_dropped_and_the_old_node_map_removed() -> None:
    old = {"resolvedRevision": C1, "resolvedFrom": "main", "resolvedAt": NOW, "nodes": {"a": "ready"},
           "readyNodes": 1, "desiredNodes": 1}
    st = desired_status(ModelFacts("m", 2, "v2", None, old), [node("a", states={"m": "pending"})], LATER)
    patch = status_patch(old, st)
    assert patch is not None
    assert patch["nodes"] is None and patch["resolvedRevision"] is None and patch["resolvedFrom"] is None
    st = desired_status(ModelFacts("m", 2, "v2", None, old),
                        [node("a", states={"m": "pending"}, proposals={"m": ("v2", C2)})], LATER)
    assert (st["resolvedRevision"], st["resolvedFrom"]) == (C2, "v2")


def test_no_patch_when_nothing_changed() -> None:
    nodes = [node("a", ready=("m",), states={"m": "ready"})]
    st = desired_status(ModelFacts("m", 1, "main", None, {}), nodes, NOW)
    again = desired_status(ModelFacts("m", 1, "main", None, st), nodes, LATER)
    assert status_patch(st, again) is None  # so a new leader computing the same writes nothing


def test_every_field_the_leader_writes_survives_the_crds_structural_pruning() -> None:
    """The API server silently drops status fields its CRD schema does not list."""
    from pathlib import Path

    import jsonschema
    import yaml

    crd = yaml.safe_load((Path(__file__).resolve().parents[1] / "manifests" / "crd.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    nodes = [node("a", states={"m": "failed"}, proposals={"m": ("main", C1)})]
    st = desired_status(ModelFacts("m", 4, "main", None, {}), nodes, NOW)
    jsonschema.validate(st, schema)
    assert set(st) <= set(schema["properties"])
    item = schema["properties"]["conditions"]["items"]["properties"]
    assert all(set(c) <= set(item) for c in st["conditions"])
