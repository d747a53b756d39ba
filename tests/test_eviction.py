"""Disk budget: the plan (pure) and the agent enforcing it for real."""

from __future__ import annotations

from pathlib import Path

import yaml

from agent.cache.store import Store
from agent.core.eviction import Candidate, plan_eviction
from agent.errors import DiskFullError
from agent.modelgen import MiB, make_hub_model
from agent.runtime.fill import fill_model
from agent.sources.pvc import PvcSource
from tests.agent_harness import running_agent, settings_for, wait_until


def cand(name: str, mib: int, age: float, prio: int | None, shared: tuple[str, ...] = ()) -> Candidate:
    blobs = frozenset({(f"{name}-w", mib * MiB), *((d, MiB) for d in shared)})
    return Candidate("org/" + name, name * 40 if len(name) == 1 else name, blobs, 1000.0 - age, prio)


def test_undesired_oldest_first_then_lower_priority() -> None:
    cs = [cand("a", 2, 500, None), cand("b", 2, 900, None), cand("c", 2, 900, 10), cand("d", 2, 900, 200)]
    assert [c.repo for c in plan_eviction(cs, 1 * MiB, for_priority=100, now=1000.0, min_age=60)] == ["org/b"]
    assert [c.repo for c in plan_eviction(cs, 3 * MiB, for_priority=100, now=1000.0, min_age=60)] == [
        "org/b", "org/a"]
    assert [c.repo for c in plan_eviction(cs, 5 * MiB, for_priority=100, now=1000.0, min_age=60)] == [
        "org/b", "org/a", "org/c"]


def test_never_equal_or_higher_priority_and_never_too_young() -> None:
    cs = [cand("a", 2, 10, None), cand("c", 2, 900, 100)]
    assert plan_eviction(cs, 1 * MiB, for_priority=100, now=1000.0, min_age=60) == []


def test_shared_blobs_do_not_count_as_freed() -> None:
    one = Candidate("org/m", "1" * 40, frozenset({("x", 4 * MiB)}), 0.0, None)
    two = Candidate("org/m", "2" * 40, frozenset({("x", 4 * MiB)}), 0.0, 100)
    assert plan_eviction([one, two], 1, for_priority=200, now=1000.0, min_age=0) == [one, two]
    assert plan_eviction([one, two], 1, for_priority=50, now=1000.0, min_age=0) == []


def test_budget_refuses_fill_naming_the_budget(tmp_path: Path) -> None:
    make_hub_model(tmp_path / "pvc", "org/big", weight_bytes=4 * MiB)
    store = Store(tmp_path / "c", budget_bytes=2 * MiB)
    try:
        fill_model(store, [PvcSource(tmp_path / "pvc")], "org/big", "main")
    except DiskFullError as e:
        assert "(budget 2097152)" in str(e) and e.shortfall > 2 * MiB
    else:
        raise AssertionError("fill over budget succeeded")


def test_agent_evicts_undesired_model_to_fit_a_desired_one(tmp_path: Path) -> None:
    pvc = tmp_path / "pvc"
    make_hub_model(pvc / "hub", "org/old", weight_bytes=3 * MiB, seed=1)
    make_hub_model(pvc / "hub", "org/new", weight_bytes=3 * MiB, seed=2)
    cache = tmp_path / "cache"
    mf = tmp_path / "models.yaml"
    mf.write_text(yaml.safe_dump([{"name": "old", "repo": "org/old"}]))
    settings = settings_for(cache, mf, [f"pvc:{pvc}"], disk_budget_bytes=5 * MiB, evict_min_age=0.0)
    with running_agent(settings) as agent:
        wait_until(lambda: agent.ready() == {"old"}, 15)
        mf.write_text(yaml.safe_dump([{"name": "new", "repo": "org/new"}]))
        wait_until(lambda: agent.ready() == {"new"}, 15)
        assert agent.metrics()[("modelcache_evictions_total", ())] == 1
    store = Store(cache)
    assert [m.repo for m in store.manifests()] == ["org/new"]
    assert not store.layout.repo_dir("org/old").exists()
    assert store.used_bytes() <= 5 * MiB


def test_agent_does_not_evict_equal_priority(tmp_path: Path) -> None:
    pvc = tmp_path / "pvc"
    make_hub_model(pvc / "hub", "org/one", weight_bytes=3 * MiB, seed=1)
    make_hub_model(pvc / "hub", "org/two", weight_bytes=3 * MiB, seed=2)
    mf = tmp_path / "models.yaml"
    mf.write_text(yaml.safe_dump([{"name": "one", "repo": "org/one"}]))
    settings = settings_for(tmp_path / "cache", mf, [f"pvc:{pvc}"], disk_budget_bytes=5 * MiB, evict_min_age=0.0)
    with running_agent(settings) as agent:
        wait_until(lambda: agent.ready() == {"one"}, 15)
        mf.write_text(yaml.safe_dump([{"name": "one", "repo": "org/one"}, {"name": "two", "repo": "org/two"}]))
        wait_until(lambda: agent.node_status()["models"].get("two", {}).get("state") == "failed", 15)
        assert "budget" in agent.node_status()["models"]["two"]["error"]
        assert agent.ready() == {"one"}
