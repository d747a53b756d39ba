"""The loop's pure decision (agent.core.actions.plan): every rule of the state machine, no I/O, no clock."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import replace

from agent.core.actions import FillOutcome, Plan, Policy, Usage, plan
from agent.core.desired import DesiredState, ModelStatus
from agent.core.eviction import Drain, SpacePolicy
from agent.core.retry import RetryPolicy
from agent.core.snapshot import DiskUse, ModelDisk, ModelRecord, NodeSnapshot, SnapshotOnDisk
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
    assert not any(c.kind == "fill_bytes_from" for c in end.counts)


def test_a_slot_holders_bytes_are_counted_by_where_they_came_from() -> None:
    """An origin slot holder read one stripe from the PVC and took the rest from peers: the metrics say so."""
    s = spec("m")
    prev = {"m": ModelStatus("m", state="filling")}
    done = FillOutcome("m", True, source="pvc:/x", fetched_files=4, fetched_bytes=100, commit=C1, level="verified",
                       spec=s, peer_bytes=60)
    end = step({"m": s}, {"m": ok(s)}, prev, busy=frozenset({"m"}), outcomes=(done,))
    counts = [(c.kind, c.args) for c in end.counts]
    assert ("fill_done", ("pvc:/x", 40, 0.0)) in counts and ("fill_bytes_from", ("peers", 60)) in counts


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


GRACE = SpacePolicy(grace=60.0, min_age=0.0)


def space_step(models: Mapping[str, ModelSpec], disks: Mapping[str, ModelDisk], records: Mapping[str, ModelRecord],
               snapshots: tuple[SnapshotOnDisk, ...], *, wall: float, prev: Mapping[str, ModelStatus] | None = None,
               drains: Mapping[tuple[str, str], Drain] | None = None, in_use: frozenset[str] = frozenset(),
               outcomes: tuple[FillOutcome, ...] = (), disk: DiskUse | None = None,
               space: SpacePolicy = GRACE) -> Plan:
    desired = DesiredState(models=models)
    snap = NodeSnapshot(disks, snapshots, 0.0, records, disk or DiskUse())
    return plan(desired, snap, prev or {}, frozenset(), outcomes, 0.0,
                Policy(backoff=POLICY.backoff, space=space, wall_now=wall), random.Random(1),
                usage=Usage(in_use, {n: wall for n in in_use}), drains=drains or {})


def snapshot_of(s: ModelSpec, commit: str = C1, size: int = 300) -> SnapshotOnDisk:
    return SnapshotOnDisk(s.repo, commit, frozenset({(f"{s.name}-w", size)}), verified_at=0.0)


def test_undesired_model_is_drained_then_deleted_after_the_grace_period() -> None:
    gone = spec("gone")
    rec = {"gone": record(gone)}
    p1 = space_step({}, {}, rec, (snapshot_of(gone),), wall=1000.0)
    assert list(p1.drains) == [("org/gone", C1)] and p1.evictions == ()
    p2 = space_step({}, {}, rec, (snapshot_of(gone),), wall=1059.0, drains=p1.drains)
    assert p2.evictions == ()  # not before the grace period
    p3 = space_step({}, {}, rec, (snapshot_of(gone),), wall=1060.0, drains=p2.drains)
    assert [(e.repo, e.kind) for e in p3.evictions] == [("org/gone", "undesired")]


def test_model_in_use_is_never_drained_and_its_grace_counts_from_the_last_use() -> None:
    gone = spec("gone")
    rec, snaps = {"gone": record(gone)}, (snapshot_of(gone),)
    p1 = space_step({}, {}, rec, snaps, wall=1000.0, in_use=frozenset({"gone"}))
    assert p1.drains == {} and p1.evictions == ()
    p2 = space_step({}, {}, rec, snaps, wall=5000.0, drains=p1.drains)  # the pod ended just now
    p3 = space_step({}, {}, rec, snaps, wall=5059.0, drains=p2.drains)
    assert p3.evictions == ()
    assert space_step({}, {}, rec, snaps, wall=5060.0, drains=p3.drains).evictions != ()


def test_pod_arriving_during_the_drain_cancels_it_and_the_label_comes_back() -> None:
    low, high = spec("low", 10), spec("high", 500)
    rec = {"low": record(low)}
    snaps = (snapshot_of(low),)
    need = FillOutcome("high", False, error="disk full", shortfall=200, spec=high)
    disks = {"low": ok(low), "high": ModelDisk("high", None, ("not cached",))}
    prev = {"low": ModelStatus("low", state="ready"), "high": ModelStatus("high", state="filling")}
    p1 = space_step({"low": low, "high": high}, disks, rec, snaps, wall=1000.0, prev=prev, outcomes=(need,))
    assert p1.statuses["low"].state == "draining" and "low" not in p1.ready
    assert p1.statuses["high"].state == "waiting-for-space"
    assert [e.reason for e in p1.events if e.name == "low"] == ["Draining"]
    p2 = space_step({"low": low, "high": high}, disks, rec, snaps, wall=1010.0, prev=p1.statuses, drains=p1.drains,
                    in_use=frozenset({"low"}))
    assert p2.drains == {} and "low" in p2.ready and p2.statuses["low"].in_use
    assert [e.reason for e in p2.events if e.name == "low"] == ["DrainCancelled"]


def test_fill_out_of_room_drains_lower_priority_then_fills_when_it_is_deleted() -> None:
    low, high = spec("low", 10), spec("high", 500)
    rec, snaps = {"low": record(low)}, (snapshot_of(low),)
    need = FillOutcome("high", False, error="disk full", shortfall=200, spec=high)
    disks = {"low": ok(low), "high": ModelDisk("high", None, ("not cached",))}
    prev = {"low": ModelStatus("low", state="ready"), "high": ModelStatus("high", state="filling")}
    models = {"low": low, "high": high}
    p1 = space_step(models, disks, rec, snaps, wall=1000.0, prev=prev, outcomes=(need,))
    assert p1.fills == () and [e.reason for e in p1.events if e.name == "high"] == ["WaitingForSpace"]
    p2 = space_step(models, disks, rec, snaps, wall=1060.0, prev=p1.statuses, drains=p1.drains)
    assert [(e.repo, e.kind) for e in p2.evictions] == [("org/low", "priority")]
    assert [f.name for f in p2.fills] == ["high"]  # deleted first in the same pass, then filled


def test_nothing_evictable_means_the_fill_waits_and_nobody_is_unlabelled() -> None:
    mine, other = spec("mine", 100), spec("other", 100)
    rec, snaps = {"mine": record(mine)}, (snapshot_of(mine),)
    need = FillOutcome("other", False, error="disk full: needs 200", shortfall=200, spec=other)
    disks = {"mine": ok(mine), "other": ModelDisk("other", None, ("not cached",))}
    prev = {"mine": ModelStatus("mine", state="ready"), "other": ModelStatus("other", state="filling")}
    p = space_step({"mine": mine, "other": other}, disks, rec, snaps, wall=1000.0, prev=prev, outcomes=(need,))
    assert p.drains == {} and p.ready == {"mine"}  # equal priority is never taken
    st = p.statuses["other"]
    assert st.state == "waiting-for-space" and st.need_bytes == 200 and "nothing may be evicted" in st.last_error
    assert p.events[-1].reason == "WaitingForSpace" and p.fills == ()


def test_high_watermark_drains_kept_undesired_models_lru_down_to_the_low_one() -> None:
    a, b, c = spec("a"), spec("b"), spec("c")
    recs = {"a": record(a), "b": record(b), "c": record(c)}
    snaps = tuple(SnapshotOnDisk(s.repo, C1, frozenset({(s.name, 100)}), verified_at=t)
                  for s, t in ((a, 30.0), (b, 10.0), (c, 20.0)))
    keep = SpacePolicy(grace=0.0, min_age=0.0, keep_undesired=True, high_watermark=0.85, low_watermark=0.75)
    quiet = space_step({}, {}, recs, snaps, wall=1000.0, disk=DiskUse(800, 1000), space=keep)
    assert quiet.drains == {}  # below the high watermark: kept as a cache
    p = space_step({}, {}, recs, snaps, wall=1000.0, disk=DiskUse(900, 1000), space=keep)
    assert [e.repo for e in p.evictions] == ["org/b", "org/c"]  # least recently used first, 150 bytes needed


def test_watermark_never_takes_a_desired_model() -> None:
    a = spec("a")
    p = space_step({"a": a}, {"a": ok(a)}, {"a": record(a)}, (snapshot_of(a),), wall=1000.0,
                   prev={"a": ModelStatus("a", state="ready")}, disk=DiskUse(990, 1000))
    assert p.drains == {} and p.ready == {"a"}


def test_nothing_is_drained_before_the_desired_set_is_known() -> None:
    """At start in a cluster the first pass runs before the CachedModels are listed: no drain may start."""
    a = spec("a")
    desired = DesiredState(models={}, synced=False)
    snap = NodeSnapshot({}, (snapshot_of(a),), 0.0, {"a": record(a)})
    p = plan(desired, snap, {}, frozenset(), (), 0.0, Policy(space=GRACE, wall_now=1000.0))
    assert p.drains == {} and p.evictions == ()


def test_an_undesired_drain_ends_when_the_model_is_desired_again() -> None:
    a = spec("a")
    rec, snaps = {"a": record(a)}, (snapshot_of(a),)
    p1 = space_step({}, {}, rec, snaps, wall=1000.0)
    assert p1.drains
    p2 = space_step({"a": a}, {"a": ok(a)}, rec, snaps, wall=1010.0, drains=p1.drains)
    assert p2.drains == {} and p2.ready == {"a"}


def test_nothing_is_deleted_before_the_pod_watch_has_listed() -> None:
    gone = spec("gone")
    rec, snaps = {"gone": record(gone)}, (snapshot_of(gone),)
    p1 = space_step({}, {}, rec, snaps, wall=1000.0)
    desired = DesiredState(models={})
    snap = NodeSnapshot({}, snaps, 0.0, rec)
    p2 = plan(desired, snap, {}, frozenset(), (), 0.0, Policy(space=GRACE, wall_now=5000.0),
              usage=Usage(known=False), drains=p1.drains)
    assert p2.evictions == () and p2.drains == p1.drains  # drained, but not deleted blind


def test_waiting_for_space_is_news_once_not_on_every_retry() -> None:
    mine, other = spec("mine", 100), spec("other", 100)
    rec, snaps = {"mine": record(mine)}, (snapshot_of(mine),)
    need = FillOutcome("other", False, error="disk full", shortfall=200, spec=other)
    disks = {"mine": ok(mine), "other": ModelDisk("other", None, ("not cached",))}
    models = {"mine": mine, "other": other}
    p1 = space_step(models, disks, rec, snaps, wall=1000.0, prev={"other": ModelStatus("other", state="filling")},
                    outcomes=(need,))
    retrying = {**p1.statuses, "other": replace(p1.statuses["other"], state="filling")}  # the periodic retry
    p2 = space_step(models, disks, rec, snaps, wall=1060.0, prev=retrying, outcomes=(need,))
    assert [e.reason for e in p1.events] == ["WaitingForSpace"] and p2.events == ()


def test_waiting_for_space_retries_back_off_up_to_a_minute() -> None:
    mine, other = spec("mine", 100), spec("other", 100)
    rec, snaps = {"mine": record(mine)}, (snapshot_of(mine),)
    disks = {"mine": ok(mine), "other": ModelDisk("other", None, ("not cached",))}
    models = {"mine": mine, "other": other}
    need = FillOutcome("other", False, error="disk full", shortfall=200, spec=other)
    st = ModelStatus("other", state="filling")
    waits = []
    for k in range(8):
        p = space_step(models, disks, rec, snaps, wall=1000.0 + k, prev={"other": st}, outcomes=(need,))
        st = replace(p.statuses["other"], state="filling")
        waits.append(p.statuses["other"].next_attempt)
    assert waits == sorted(waits) and waits[0] == 10.0 and waits[-1] == 60.0  # 10, 20, 40, 60, 60 ...


def test_an_old_commit_is_undesired_once_its_model_moved_on() -> None:
    """A branch moved: the model's record names the new commit; the old snapshot may now go."""
    m = spec("m")
    rec = {"m": record(m, C2)}
    old, new = snapshot_of(m, C1), snapshot_of(m, C2)
    p = space_step({"m": m}, {"m": ok(m, C2)}, rec, (old, new), wall=1000.0,
                   prev={"m": ModelStatus("m", state="ready")})
    assert list(p.drains) == [("org/m", C1)] and p.ready == {"m"}


def test_a_pinned_commit_without_a_record_is_held_for_its_model() -> None:
    """Renamed or not yet filled: a desired model pinned to a commit on disk protects it from deletion."""
    m, gone = spec("m"), spec("gone", "org/m")
    rec = {"gone": record(gone, C1)}
    desired = DesiredState(models={"m": m}, pins={"m": C1})
    snap = NodeSnapshot({"m": ModelDisk("m", None, ("not cached",))}, (snapshot_of(m, C1),), 0.0, rec)
    p = plan(desired, snap, {}, frozenset(), (), 0.0, Policy(space=GRACE, wall_now=1000.0))
    assert p.drains == {}


def test_a_priority_drain_ends_when_nobody_needs_the_room_any_more() -> None:
    low, high = spec("low", 10), spec("high", 500)
    rec, snaps = {"low": record(low)}, (snapshot_of(low),)
    need = FillOutcome("high", False, error="disk full", shortfall=200, spec=high)
    disks = {"low": ok(low), "high": ModelDisk("high", None, ("not cached",))}
    prev = {"low": ModelStatus("low", state="ready"), "high": ModelStatus("high", state="filling")}
    p1 = space_step({"low": low, "high": high}, disks, rec, snaps, wall=1000.0, prev=prev, outcomes=(need,))
    assert p1.statuses["low"].state == "draining"
    p2 = space_step({"low": low}, {"low": ok(low)}, rec, snaps, wall=1010.0, prev=p1.statuses, drains=p1.drains)
    assert p2.drains == {} and p2.ready == {"low"}  # "high" was deleted: "low" keeps its files and label


def test_a_model_evicted_for_a_higher_priority_waits_instead_of_racing_it() -> None:
    low = spec("low", 10)
    prev = {"low": ModelStatus("low", state="draining", bytes=300)}
    p = space_step({"low": low}, {"low": ModelDisk("low", None, ("not cached",))}, {}, (), wall=2000.0, prev=prev)
    st = p.statuses["low"]
    assert p.fills == () and st.state == "waiting-for-space" and st.need_bytes == 300 and st.next_attempt > 0
