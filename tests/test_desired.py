"""The loop's pure decision: what to label, what to fill, what to forget."""

from __future__ import annotations

import random

from agent.core.desired import ModelStatus, backoff_delay, plan_actions
from agent.core.spec import ModelSpec


def spec(name: str, priority: int = 100) -> ModelSpec:
    return ModelSpec(name, f"org/{name}", priority=priority)


def test_labels_verified_fills_the_rest_by_priority() -> None:
    desired = {"a": spec("a", 10), "b": spec("b", 500), "c": spec("c", 100), "d": spec("d")}
    acts = plan_actions(desired, {"d": True}, set(), {}, now=0.0)
    assert acts.ready == frozenset({"d"})
    assert acts.enqueue == ("b", "c", "a")  # higher priority first
    assert acts.forget == ()


def test_in_flight_and_backing_off_models_wait() -> None:
    desired = {"a": spec("a"), "b": spec("b"), "c": spec("c")}
    statuses = {"b": ModelStatus("b", next_attempt=10.0), "c": ModelStatus("c", next_attempt=5.0)}
    acts = plan_actions(desired, {}, {"a"}, statuses, now=6.0)
    assert acts.enqueue == ("c",)


def test_models_no_longer_desired_are_forgotten_and_unlabelled() -> None:
    acts = plan_actions({"a": spec("a")}, {"a": True, "gone": True}, set(), {"gone": ModelStatus("gone")}, now=0.0)
    assert acts.ready == frozenset({"a"}) and acts.forget == ("gone",)


def test_backoff_follows_the_steps_with_bounded_jitter() -> None:
    rng = random.Random(7)
    steps = (1.0, 10.0, 100.0)
    for attempts, base in [(1, 1.0), (2, 10.0), (3, 100.0), (9, 100.0)]:
        for _ in range(50):
            assert 0.8 * base <= backoff_delay(attempts, steps, rng) <= 1.2 * base
    assert len({round(backoff_delay(2, steps, rng), 6) for _ in range(20)}) > 1  # jittered, not constant
