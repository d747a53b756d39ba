"""Eviction (issue 14): the pure choice, then the agent for real (file mode, ``--in-use-file``).

Never from under a worker: a model in use is never drained or deleted; deletion is drain (unlabel),
then delete once unused for the grace period; a pod arriving meanwhile brings the label back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.cache.store import Store
from agent.core.eviction import Candidate, plan_eviction
from agent.errors import DiskFullError
from agent.modelgen import MiB, make_hub_model
from agent.runtime.fill import fill_model
from agent.sources.pvc import PvcSource
from tests.agent_harness import RunningAgent, running_agent, settings_for, wait_until


def cand(name: str, mib: int, age: float, prio: int | None, shared: tuple[str, ...] = (), *,
         in_use: bool = False, last_used: float = 0.0) -> Candidate:
    blobs = frozenset({(f"{name}-w", mib * MiB), *((d, MiB) for d in shared)})
    return Candidate("org/" + name, name * 40 if len(name) == 1 else name, blobs, 1000.0 - age, prio,
                     (name,), in_use, last_used)


def repos(cs: list[Candidate]) -> list[str]:
    return [c.repo for c in cs]


def test_undesired_least_recently_used_first_then_lower_priority() -> None:
    cs = [cand("a", 2, 500, None), cand("b", 2, 900, None), cand("c", 2, 900, 10), cand("d", 2, 900, 200)]
    assert repos(plan_eviction(cs, 1 * MiB, for_priority=100, now=1000.0, min_age=60)) == ["org/b"]
    assert repos(plan_eviction(cs, 3 * MiB, for_priority=100, now=1000.0, min_age=60)) == ["org/b", "org/a"]
    assert repos(plan_eviction(cs, 5 * MiB, for_priority=100, now=1000.0, min_age=60)) == ["org/b", "org/a", "org/c"]


def test_a_recent_use_moves_a_model_to_the_back_of_the_line() -> None:
    cs = [cand("a", 2, 900, None, last_used=990.0), cand("b", 2, 500, None)]
    assert repos(plan_eviction(cs, 1 * MiB, for_priority=None, now=1000.0, min_age=0)) == ["org/b"]


def test_never_in_use_never_equal_or_higher_priority_never_too_young() -> None:
    cs = [cand("a", 2, 10, None), cand("c", 2, 900, 100), cand("u", 9, 900, None, in_use=True)]
    assert plan_eviction(cs, 1 * MiB, for_priority=100, now=1000.0, min_age=60) == []


def test_all_or_nothing_when_the_candidates_cannot_free_enough() -> None:
    cs = [cand("a", 2, 900, None), cand("b", 2, 900, 10)]
    assert plan_eviction(cs, 9 * MiB, for_priority=100, now=1000.0, min_age=0) == []


def test_shared_blobs_do_not_count_as_freed() -> None:
    one = Candidate("org/m", "1" * 40, frozenset({("x", 4 * MiB)}), 0.0, None, ("one",))
    two = Candidate("org/m", "2" * 40, frozenset({("x", 4 * MiB)}), 0.0, 100, ("two",))
    assert plan_eviction([one, two], 1, for_priority=200, now=1000.0, min_age=0) == [one, two]
    assert plan_eviction([one, two], 1, for_priority=50, now=1000.0, min_age=0) == []


def test_budget_refuses_fill_naming_the_budget(tmp_path: Path) -> None:
    make_hub_model(tmp_path / "pvc", "org/big", weight_bytes=4 * MiB)
    store = Store(tmp_path / "c", budget_bytes=2 * MiB)
    with pytest.raises(DiskFullError) as ei:
        fill_model(store, [PvcSource(tmp_path / "pvc")], "org/big", "main")
    assert "(budget 2097152)" in str(ei.value) and ei.value.shortfall > 2 * MiB


# -- the agent, for real ------------------------------------------------------------------------------


@pytest.fixture
def pvc(tmp_path: Path) -> Path:
    for i, name in enumerate(("old", "new", "one", "two", "low", "high")):
        make_hub_model(tmp_path / "pvc" / "hub", f"org/{name}", weight_bytes=3 * MiB, seed=i)
    return tmp_path / "pvc"


def write(path: Path, models: list[dict[str, object]] | list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(models) if models and isinstance(models[0], dict) else
                   "".join(f"{m}\n" for m in models))
    tmp.replace(path)


def state(agent: RunningAgent, name: str) -> str:
    return str(agent.node_status()["models"].get(name, {}).get("state", ""))


def test_model_in_use_keeps_its_files_after_removal_until_unused_plus_grace(pvc: Path, tmp_path: Path) -> None:
    mf, used = tmp_path / "models.yaml", tmp_path / "in-use"
    write(mf, [{"name": "old", "repo": "org/old"}])
    write(used, ["old"])
    cache = tmp_path / "cache"
    settings = settings_for(cache, mf, [f"pvc:{pvc}"], in_use_file=used, drain_grace=1.0, evict_min_age=0.0)
    with running_agent(settings) as agent:
        wait_until(lambda: agent.ready() == {"old"}, 15)
        write(mf, [{"name": "new", "repo": "org/new"}])  # "old" is no longer desired...
        wait_until(lambda: agent.ready() == {"new"}, 15)  # ...its label goes at once
        snap = Store(cache).layout.repo_dir("org/old")
        for _ in range(5):  # a few passes of the loop: still in use, so the files stay
            agent.stop.wait(0.3)
            assert snap.is_dir()
        write(used, [])  # the worker pod ended
        wait_until(lambda: not snap.exists(), 15)
        m = agent.metrics()
        assert m[("modelcache_evictions_total", (("reason", "undesired"),))] == 1
        assert m[("modelcache_evicted_bytes_total", ())] >= 3 * MiB


def test_pod_arriving_during_the_drain_brings_the_label_back(pvc: Path, tmp_path: Path) -> None:
    mf, used = tmp_path / "models.yaml", tmp_path / "in-use"
    write(mf, [{"name": "low", "repo": "org/low", "priority": 10}])
    write(used, [])
    settings = settings_for(tmp_path / "cache", mf, [f"pvc:{pvc}"], in_use_file=used, drain_grace=3600.0,
                            evict_min_age=0.0, disk_budget_bytes=5 * MiB)
    with running_agent(settings) as agent:
        wait_until(lambda: agent.ready() == {"low"}, 15)
        write(mf, [{"name": "low", "repo": "org/low", "priority": 10},
                   {"name": "high", "repo": "org/high", "priority": 500}])
        wait_until(lambda: state(agent, "low") == "draining" and state(agent, "high") == "waiting-for-space", 15)
        assert agent.ready() == set()  # unlabelled: no new worker lands on it
        write(used, ["low"])  # a worker arrives anyway (soft affinity): the drain is cancelled
        wait_until(lambda: agent.ready() == {"low"}, 15)
        assert state(agent, "high") in ("waiting-for-space", "filling")  # waiting, or its periodic retry
        assert agent.metrics()[("modelcache_model_in_use", (("model", "low"),))] == 1


def test_budget_for_one_with_the_other_in_use_waits_with_a_clear_state(pvc: Path, tmp_path: Path) -> None:
    mf, used = tmp_path / "models.yaml", tmp_path / "in-use"
    write(mf, [{"name": "one", "repo": "org/one", "priority": 10}])
    write(used, ["one"])
    settings = settings_for(tmp_path / "cache", mf, [f"pvc:{pvc}"], in_use_file=used, drain_grace=0.0,
                            evict_min_age=0.0, disk_budget_bytes=5 * MiB)
    with running_agent(settings) as agent:
        wait_until(lambda: agent.ready() == {"one"}, 15)
        write(mf, [{"name": "one", "repo": "org/one", "priority": 10},
                   {"name": "two", "repo": "org/two", "priority": 500}])
        wait_until(lambda: state(agent, "two") == "waiting-for-space", 15)
        st = agent.node_status()["models"]["two"]
        assert "nothing may be evicted" in st["error"] and "budget" in st["error"]
        assert agent.ready() == {"one"}  # in use: kept, whatever its priority
        write(used, [])  # the worker ends: now "one" may go, and "two" fills
        wait_until(lambda: agent.ready() == {"two"}, 15)
        assert agent.metrics()[("modelcache_evictions_total", (("reason", "priority"),))] == 1
        assert agent.metrics()[("modelcache_fill_space_wait_seconds_count", ())] == 1


def test_high_watermark_evicts_kept_models_least_recently_used_first(pvc: Path, tmp_path: Path) -> None:
    mf, used = tmp_path / "models.yaml", tmp_path / "in-use"
    write(mf, [{"name": n, "repo": f"org/{n}"} for n in ("old", "one", "two")])
    write(used, [])
    cache = tmp_path / "cache"
    settings = settings_for(cache, mf, [f"pvc:{pvc}"], in_use_file=used, drain_grace=0.0, evict_min_age=0.0,
                            keep_undesired=True, disk_budget_bytes=16 * MiB, high_watermark=0.7, low_watermark=0.5)
    with running_agent(settings) as agent:
        wait_until(lambda: agent.ready() == {"old", "one", "two"}, 20)
        write(used, ["old"])  # a worker reads "old": it becomes the most recently used
        wait_until(lambda: agent.metrics().get(("modelcache_model_in_use", (("model", "old"),))) == 1, 10)
        write(used, [])
        write(mf, [{"name": "new", "repo": "org/new"}])  # 4 x 3 MiB > 70 % of 16 MiB: two kept ones must go
        wait_until(lambda: agent.ready() == {"new"}, 20)
        hub = Store(cache).layout
        wait_until(lambda: not hub.repo_dir("org/one").exists() and not hub.repo_dir("org/two").exists(), 15)
        assert hub.repo_dir("org/old").is_dir()  # used last: kept
        assert agent.metrics()[("modelcache_evictions_total", (("reason", "watermark"),))] == 2
