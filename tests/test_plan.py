"""The loop's pure decision (agent.core.actions.plan): every rule of the state machine, no I/O, no clock."""

from __future__ import annotations

import random
from collections.abc import Mapping

from agent.core.actions import FillOutcome, Plan, Policy, plan
from agent.core.desired import DesiredState, ModelStatus
from agent.core.retry import RetryPolicy
from agent.core.snapshot import ModelDisk, ModelRecord, NodeSnapshot, SnapshotOnDisk
from agent.core.spec import FileFilter, ModelSpec
from agent.errors import SpecError

C1, C2 = "1" * 40, "2" * 40
POLICY = Policy(backoff=RetryPolicy(base=10.0, factor=2.0, cap=100.0, jitter=0.0))


def spec(name: str, priority: int = 100, **kw: object) -> ModelSpec:
    return ModelSpec(name, f"org/{name}", priority=priority, **kw)  # type: ignore[arg-type]


FILES = ("config.json", "model.safetensors")


def record(s: ModelSpec, commit: str = C1, paths: tuple[str, ...] = FILES) -> ModelRecord:
    return ModelRecord(s.name, s.repo, s.revision, commit, s.files, paths, "listing")


def ok(s: ModelSpec, commit: str = C1) -> ModelDisk:
    return ModelDisk(s.name, record(s, commit), (), (), "verified", 100)


def step(models: Mapping[str, ModelSpec], disks: Mapping[str, ModelDisk], prev: Mapping[str, ModelStatus] | None = None,
         busy: frozenset[str] = frozenset(), outcomes: tuple[FillOutcome, ...] = (), now: float = 0.0,
         pins: Mapping[str, str] | None = None, errors: Mapping[str, SpecError] | None = None,
         policy: Policy = POLICY, snapshots: tuple[SnapshotOnDisk, ...] = ()) -> Plan:
    desired = DesiredState(models=models, pins=pins or {}, errors=errors or {})
    return plan(desired, NodeSnapshot(disks, snapshots), prev or {}, busy, outcomes, now, policy, random.Random(1))


def test_ready_only_when_scan_ok_and_fill_the_rest_by_priority() -> None:
    a, b, c, d = spec("a", 10), spec("b", 500), spec("c", 100), spec("d")
    p = step({"a": a, "b": b, "c": c, "d": d}, {"d": ok(d), "a": ModelDisk("a", None, ("not cached",))})
    assert p.ready == {"d"}
    assert [f.name for f in p.fills] == ["b", "c", "a"]  # higher priority first
    assert {n: s.state for n, s in p.statuses.items()} == {"a": "filling", "b": "filling", "c": "filling",
                                                          "d": "ready"}


def test_widened_file_filter_is_not_ready_until_refilled() -> None:
    """Issue 9 bug 1: the record says *.json was filled; the spec now wants every file."""
    narrow = spec("tiny", files=FileFilter(allow=("*.json",)))
    wide = spec("tiny")
    disk = ModelDisk("tiny", record(narrow, paths=("config.json",)), (), (), "verified", 10)
    p = step({"tiny": wide}, {"tiny": disk}, {"tiny": ModelStatus("tiny", state="ready")})
    assert p.ready == frozenset()
    assert [f.name for f in p.fills] == ["tiny"] and not p.fills[0].repair
    assert p.statuses["tiny"].state == "filling"
    assert ("verify_failed", ("spec_changed",)) in [(c.kind, c.args) for c in p.counts]
    assert not [e for e in p.events if e.reason == "VerifyFailed"]  # a spec change is not damage


def test_pinned_commit_other_than_recorded_is_not_ready() -> None:
    s = spec("m")
    p = step({"m": s}, {"m": ok(s, C1)}, pins={"m": C2})
    assert p.ready == frozenset() and [f.pin for f in p.fills] == [C2]


def test_damage_unlabels_repairs_at_once_and_quarantines_bad_blobs() -> None:
    s = spec("m")
    disk = ModelDisk("m", record(s), ("mismatch: model.safetensors: xxh3 x, expected y",), ("blobsha",), "", 0)
    prev = {"m": ModelStatus("m", state="ready", attempts=0, next_attempt=0.0)}
    p = step({"m": s}, {"m": disk}, prev, now=50.0)
    assert p.ready == frozenset()
    assert p.fills[0].repair and p.statuses["m"].state == "filling"
    assert [(q.repo, q.blobs) for q in p.quarantines] == [("org/m", ("blobsha",))]
    assert [e.reason for e in p.events] == ["VerifyFailed"]


def test_busy_model_waits_for_its_outcome_then_is_ready_and_reported_once() -> None:
    s = spec("m")
    prev = {"m": ModelStatus("m", state="filling")}
    mid = step({"m": s}, {"m": ok(s)}, prev, busy=frozenset({"m"}))
    assert mid.ready == frozenset() and mid.fills == () and mid.statuses["m"].state == "filling"
    done = FillOutcome("m", True, source="pvc:/x", fetched_files=2, fetched_bytes=9, commit=C1, level="verified",
                       spec=s)
    end = step({"m": s}, {"m": ok(s)}, mid.statuses, busy=frozenset({"m"}), outcomes=(done,))
    assert end.ready == {"m"} and [e.reason for e in end.events] == ["FillSucceeded"]
    assert ("fill_done", ("pvc:/x", 9, 0.0)) in [(c.kind, c.args) for c in end.counts]


def test_failed_fill_backs_off_and_retries_when_due() -> None:
    s = spec("m")
    missing = ModelDisk("m", None, ("not cached",))
    fail = FillOutcome("m", False, error="boom", failures=(("pvc", "not_found"),), spec=s)
    p = step({"m": s}, {"m": missing}, {"m": ModelStatus("m", state="filling")}, outcomes=(fail,), now=100.0)
    st = p.statuses["m"]
    assert st.state == "failed" and st.attempts == 1 and st.next_attempt == 110.0 and p.fills == ()
    assert p.wake_at == 110.0
    assert step({"m": s}, {"m": missing}, p.statuses, now=109.9).fills == ()
    again = step({"m": s}, {"m": missing}, p.statuses, now=110.0)
    assert [f.name for f in again.fills] == ["m"]
    fail2 = step({"m": s}, {"m": missing}, again.statuses, outcomes=(fail,), now=111.0)
    assert fail2.statuses["m"].next_attempt == 131.0  # 20 s: the second step of the backoff


def test_fill_that_reports_ok_but_scan_disagrees_is_a_failed_attempt_not_a_hot_loop() -> None:
    """Issue 9 bug 10: "0 files, 0 bytes (verified)" once a second forever. Now it backs off."""
    s = spec("m")
    bad = ModelDisk("m", record(s), ("missing: config.json",))
    done = FillOutcome("m", True, commit=C1, spec=s)
    p = step({"m": s}, {"m": bad}, {"m": ModelStatus("m", state="filling")}, outcomes=(done,), now=5.0)
    st = p.statuses["m"]
    assert st.state == "failed" and st.attempts == 1 and st.next_attempt == 15.0 and p.fills == ()
    assert "not verified on disk: missing: config.json" in st.last_error


def test_outcome_for_an_older_spec_refills_at_once_without_counting_a_failure() -> None:
    old = spec("m", files=FileFilter(allow=("*.json",)))
    new = spec("m")
    disk = ModelDisk("m", record(old, paths=("config.json",)), (), (), "verified", 1)
    done = FillOutcome("m", True, commit=C1, spec=old)
    p = step({"m": new}, {"m": disk}, {"m": ModelStatus("m", state="filling")}, outcomes=(done,))
    assert [f.name for f in p.fills] == ["m"] and p.statuses["m"].attempts == 0


def test_models_no_longer_desired_are_forgotten_and_busy_ones_cancelled() -> None:
    a = spec("a")
    p = step({"a": a}, {"a": ok(a)}, {"gone": ModelStatus("gone", state="ready"), "a": ModelStatus("a")},
             busy=frozenset({"gone"}))
    assert set(p.statuses) == {"a"} and p.cancels == ("gone",) and p.ready == {"a"}


def test_invalid_spec_is_reported_once_per_distinct_error() -> None:
    err = SpecError("x.repo", "bad")
    p1 = step({}, {}, errors={"x": err})
    assert [e.reason for e in p1.events] == ["InvalidSpec"] and p1.statuses["x"].state == "invalid"
    assert step({}, {}, p1.statuses, errors={"x": err}).events == ()
    assert len(step({}, {}, p1.statuses, errors={"x": SpecError("x.repo", "worse")}).events) == 1


def test_cancelled_outcome_is_neither_success_nor_failure() -> None:
    s = spec("m")
    out = FillOutcome("m", False, cancelled=True, spec=s)
    p = step({"m": s}, {"m": ModelDisk("m", None, ("not cached",))}, {"m": ModelStatus("m", state="filling")},
             outcomes=(out,))
    assert p.events == () and p.statuses["m"].attempts == 0


def test_disk_full_plans_eviction_of_undesired_snapshot_and_retries_at_once() -> None:
    new = spec("new")
    old = SnapshotOnDisk("org/old", C2, frozenset({("w", 300)}), verified_at=0.0)
    full = FillOutcome("new", False, error="disk full", shortfall=200, spec=new, failures=(("store", "disk_full"),))
    pol = Policy(backoff=POLICY.backoff, budget_bytes=500, evict_min_age=60.0, wall_now=1000.0)
    p = step({"new": new}, {"new": ModelDisk("new", None, ("not cached",))}, {"new": ModelStatus("new")},
             outcomes=(full,), now=5.0, policy=pol, snapshots=(old,))
    assert [(e.repo, e.commit) for e in p.evictions] == [("org/old", C2)]
    assert [f.name for f in p.fills] == ["new"]  # no backoff: the space is being freed now
    assert ("evicted", ()) in [(c.kind, c.args) for c in p.counts]


def test_disk_full_never_evicts_equal_priority_and_backs_off() -> None:
    new, mine = spec("new", 100), spec("mine", 100)
    snap = SnapshotOnDisk("org/mine", C1, frozenset({("w", 300)}), verified_at=0.0)
    full = FillOutcome("new", False, error="disk full", shortfall=200, spec=new)
    pol = Policy(backoff=POLICY.backoff, budget_bytes=500, evict_min_age=0.0, wall_now=1000.0)
    p = step({"new": new, "mine": mine}, {"new": ModelDisk("new", None, ("not cached",)), "mine": ok(mine)},
             {"new": ModelStatus("new")}, outcomes=(full,), policy=pol, snapshots=(snap,))
    assert p.evictions == () and p.fills == () and p.statuses["new"].state == "failed"
