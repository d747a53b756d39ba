"""Label selectors and label diffs (pure functions)."""

from __future__ import annotations

import pytest

from agent.core.selector import label_patch, matches, model_states, validate
from agent.errors import SpecError

GPU = {"nvidia.com/gpu.present": "true", "zone": "a", "pool": "h100"}


class TestMatches:
    def test_empty_selector_matches_every_node(self) -> None:
        assert matches({}, GPU)
        assert matches(None, {})
        assert matches({"matchLabels": {}, "matchExpressions": []}, {})

    def test_match_labels_need_every_pair(self) -> None:
        assert matches({"matchLabels": {"nvidia.com/gpu.present": "true"}}, GPU)
        assert not matches({"matchLabels": {"nvidia.com/gpu.present": "true", "zone": "b"}}, GPU)
        assert not matches({"matchLabels": {"missing": "x"}}, GPU)

    @pytest.mark.parametrize(
        ("expr", "expected"),
        [
            ({"key": "zone", "operator": "In", "values": ["a", "b"]}, True),
            ({"key": "zone", "operator": "In", "values": ["b"]}, False),
            ({"key": "nope", "operator": "In", "values": ["a"]}, False),
            ({"key": "zone", "operator": "NotIn", "values": ["b"]}, True),
            ({"key": "zone", "operator": "NotIn", "values": ["a"]}, False),
            ({"key": "nope", "operator": "NotIn", "values": ["a"]}, True),  # absent key is "not in"
            ({"key": "pool", "operator": "Exists"}, True),
            ({"key": "nope", "operator": "Exists"}, False),
            ({"key": "nope", "operator": "DoesNotExist"}, True),
            ({"key": "pool", "operator": "DoesNotExist"}, False),
        ],
    )
    def test_expressions(self, expr: dict, expected: bool) -> None:
        assert matches({"matchExpressions": [expr]}, GPU) is expected

    def test_labels_and_expressions_are_anded(self) -> None:
        sel = {
            "matchLabels": {"nvidia.com/gpu.present": "true"},
            "matchExpressions": [{"key": "pool", "operator": "In", "values": ["a100"]}],
        }
        assert not matches(sel, GPU)
        assert matches(sel, {**GPU, "pool": "a100"})

    def test_invalid_operator_names_the_field(self) -> None:
        sel = {
            "matchExpressions": [
                {"key": "zone", "operator": "In", "values": ["a"]},
                {"key": "zone", "operator": "Equals", "values": ["a"]},
            ]
        }
        with pytest.raises(SpecError) as e:
            matches(sel, GPU)
        assert e.value.field == "spec.nodeSelector.matchExpressions[1].operator"

    def test_invalid_expression_is_reported_even_when_an_earlier_term_mismatches(self) -> None:
        # Every node must report a bad spec, not only those where matchLabels happen to match.
        sel = {"matchLabels": {"zone": "zz"}, "matchExpressions": [{"key": "k", "operator": "Bogus"}]}
        with pytest.raises(SpecError):
            matches(sel, GPU)

    @pytest.mark.parametrize(
        ("sel", "field"),
        [
            ({"matchExpressions": [{"key": "a", "operator": "In"}]}, "spec.nodeSelector.matchExpressions[0].values"),
            (
                {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
                "spec.nodeSelector.matchExpressions[0].values",
            ),
            ({"matchExpressions": [{"operator": "Exists"}]}, "spec.nodeSelector.matchExpressions[0].key"),
            ({"matchLabels": ["a"]}, "spec.nodeSelector.matchLabels"),
            ({"matchExpressions": {"a": 1}}, "spec.nodeSelector.matchExpressions"),
            ({"nodeName": "x"}, "spec.nodeSelector"),
        ],
    )
    def test_malformed_selectors_name_the_field(self, sel: dict, field: str) -> None:
        with pytest.raises(SpecError) as e:
            validate(sel)
        assert e.value.field == field


class TestLabelPatch:
    P = "modelcache.dev"

    def test_adds_and_removes_only_prefix_keys(self) -> None:
        current = {"kubernetes.io/hostname": "n1", f"{self.P}/old": "ready", f"{self.P}/keep": "ready"}
        desired = {f"{self.P}/keep": "ready", f"{self.P}/new": "ready"}
        assert label_patch(current, desired, self.P) == {f"{self.P}/old": None, f"{self.P}/new": "ready"}

    def test_no_change_is_an_empty_patch(self) -> None:
        current = {"a": "b", f"{self.P}/m": "ready"}
        assert label_patch(current, {f"{self.P}/m": "ready"}, self.P) == {}

    def test_foreign_and_lookalike_keys_are_never_touched(self) -> None:
        current = {"modelcache.dev.evil/x": "1", "other.io/m": "ready", "modelcache.devx/m": "ready"}
        desired = {"other.io/m": None, "modelcache.devx/y": "ready"}  # a caller bug: ignored, not applied
        assert label_patch(current, desired, self.P) == {}  # type: ignore[arg-type]

    def test_status_key_is_not_a_label(self) -> None:
        assert label_patch({f"{self.P}/status": "x"}, {}, self.P) == {}

    def test_custom_prefix(self) -> None:
        assert label_patch({"modelcache.dev/a": "ready"}, {"cache.example.com/a": "ready"}, "cache.example.com") == {
            "cache.example.com/a": "ready"
        }


def test_model_states_strip_prefix() -> None:
    labels = {"modelcache.dev/a": "ready", "modelcache.dev/status": "{}", "zone": "x"}
    assert model_states(labels, "modelcache.dev") == {"a": "ready"}

