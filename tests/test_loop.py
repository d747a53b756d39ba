"""The loop tells the truth (issue 9): each bug found on the old loop, as a test on an injected clock.

The loop runs for real (real store, real PVC source, real worker threads) but its clock is a
``ManualClock`` and passes are driven by hand with ``settle``: no sleeps, no timing windows.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.cache.staging import Fill
from agent.cache.store import Store
from agent.core.actions import Plan, Policy
from agent.core.desired import DesiredState
from agent.core.plan import FileEntry, ModelPlan
from agent.core.retry import RetryPolicy
from agent.core.spec import FileFilter, ModelSpec
from agent.errors import DiskFullError
from agent.metrics import StateCollector
from agent.modelgen import MiB, make_hub_model
from agent.runtime.fill import fill_model
from agent.runtime.loop import Loop
from agent.sources.base import Progress
from agent.sources.pvc import PvcSource
from tests.conftest import ManualClock

BACKOFF = RetryPolicy(base=10.0, factor=2.0, cap=100.0, jitter=0.0)


@dataclass
class Recorder:
    """The loop's Reporter: remembers every label set and event (the no-cluster reporter, in memory)."""

    ready: frozenset[str] = frozenset()
    reports: int = 0
    events: list[tuple[str, str, str]] = field(default_factory=list)

    def report(self, ready: frozenset[str], statuses: dict[str, dict[str, object]]) -> None:
        self.ready = ready
        self.reports += 1

    def event(self, name: str, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append((name, reason, message))

    def pin(self, name: str, commit: str, revision: str) -> str:
        return commit


class GatedSource:
    """A PVC source whose fetch waits at a gate and then copies in chunks, checking stop between them."""

    kind = "pvc"

    def __init__(self, inner: PvcSource) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.fetches: list[str] = []
        self.stopped: list[str] = []

    @property
    def label(self) -> str:
        return self.inner.label

    def resolve(self, repo: str, revision: str, files: FileFilter) -> ModelPlan:
        return self.inner.resolve(repo, revision, files)

    def fetch(self, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill, progress: Progress) -> None:
        self.fetches.append(plan.repo)
        self.entered.set()
        while not self.gate.wait(0.01):
            if fill.stop.is_set():
                self.stopped.append(plan.repo)
                fill.check_stop()
        self.inner.fetch(plan, entries, fill, progress)

    def close(self) -> None:
        pass


@pytest.fixture
def pvc(tmp_path: Path) -> Path:
    for i, repo in enumerate(("org/a", "org/b", "org/c")):
        make_hub_model(tmp_path / "pvc" / "hub", repo, weight_bytes=MiB // 4, shards=2, seed=i)
    return tmp_path / "pvc"


def spec(name: str, repo: str | None = None, **kw: object) -> ModelSpec:
    return ModelSpec(name, repo or f"org/{name}", **kw)  # type: ignore[arg-type]


@contextmanager
def looping(store: Store, sources: Sequence[object], *, workers: int = 2, **kw: object) -> Iterator[
        tuple[Loop, Recorder, ManualClock]]:
    rec, clock = Recorder(), ManualClock()
    kw.setdefault("policy", Policy(backoff=BACKOFF))
    loop = Loop(store, sources, rec, workers=workers, clock=clock, check_interval=3600.0, **kw)  # type: ignore[arg-type]
    loop.start_workers()
    try:
        yield loop, rec, clock
    finally:
        loop.shutdown(5.0)


def settle(loop: Loop, passes: int = 50) -> Plan:
    """Passes until no fill runs and nothing waits in the inbox (bounded; never a timing window)."""
    p = loop.run_once()
    for _ in range(passes):
        if loop.idle():
            return p
        assert loop.queue.wait_idle(30), "fills did not finish"
        p = loop.run_once()
    raise AssertionError("loop did not settle")


def desire(loop: Loop, *specs: ModelSpec) -> None:
    loop.set_desired(DesiredState(models={s.name: s for s in specs}))


def test_bug1_widened_files_after_restart_is_not_ready_until_refilled(pvc: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    src = PvcSource(pvc)
    narrow = spec("tiny", "org/a", files=FileFilter(allow=("*.json",)))
    with looping(store, [src]) as (loop, rec, _):
        desire(loop, narrow)
        settle(loop)
        assert rec.ready == {"tiny"}
    # the agent is down; the spec is widened; a new agent starts on the same disk
    wide = spec("tiny", "org/a")
    with looping(store, [src]) as (loop, rec, _):
        desire(loop, wide)
        p = loop.run_once()
        assert p.ready == frozenset() and [f.name for f in p.fills] == ["tiny"]  # not trusted from disk
        settle(loop)
        assert rec.ready == {"tiny"}
    rec_file = store.record("tiny")
    assert rec_file is not None and any(p.endswith(".safetensors") for p in rec_file.paths)
    snap = store.layout.snapshot_dir("org/a", rec_file.commit)
    assert all((snap / p).is_file() for p in rec_file.paths)


def test_bug2_sibling_refill_cannot_hide_a_damaged_file_of_another_model(pvc: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    src = PvcSource(pvc)
    full, jsons = spec("full", "org/a"), spec("jsons", "org/a", files=FileFilter(allow=("*.json",)))
    with looping(store, [src]) as (loop, rec, _):
        desire(loop, full, jsons)
        settle(loop)
        assert rec.ready == {"full", "jsons"}
    record = store.record("full")
    assert record is not None
    weights = next(p for p in record.paths if p.endswith(".safetensors"))
    m = store.manifest("org/a", record.commit)
    assert m is not None
    store.layout.blob_path("org/a", m.by_path()[weights].digest).unlink()  # damage only "full"'s file
    store.remove_record("jsons")  # force a refill of the sibling: its publish drops the damaged entry
    fill_model(store, [src], "org/a", "main", FileFilter(allow=("*.json",)), record_as="jsons")
    m2 = store.manifest("org/a", record.commit)
    assert m2 is not None and weights not in m2.by_path()  # the shared manifest no longer lists it
    with looping(store, [PvcSource(tmp_path / "nowhere")]) as (loop, rec, _):
        desire(loop, full, jsons)
        p = loop.run_once()
        assert p.ready == {"jsons"}  # "full" is missing a file: never ready, whatever the manifest says
        assert "missing" in p.statuses["full"].last_error or p.statuses["full"].state in ("filling", "failed")


def test_bug4_model_removed_and_added_back_while_queued_is_filled(pvc: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    src = GatedSource(PvcSource(pvc))
    a, b = spec("a"), spec("b")
    with looping(store, [src], workers=1) as (loop, rec, _):
        desire(loop, a, b)
        loop.run_once()
        assert src.entered.wait(10)  # a holds the only worker; b waits in the queue
        desire(loop, a)
        loop.run_once()
        desire(loop, a, b)
        loop.run_once()
        src.gate.set()
        settle(loop)
        assert rec.ready == {"a", "b"} and loop.idle()
        assert sorted(src.fetches) == ["org/a", "org/b"]


def _rot_a_blob(store: Store, loop: Loop) -> tuple[Path, bytes]:
    """Flip a bit of model a's weights, keeping size and mtime (only a content hash can tell), and say so."""
    record = store.record("a")
    assert record is not None
    m = store.manifest("org/a", record.commit)
    assert m is not None
    f = next(f for f in m.files if f.path.endswith(".safetensors"))
    blob = store.layout.blob_path("org/a", f.digest)
    good = blob.read_bytes()
    st = blob.stat()
    blob.write_bytes(bytes([good[0] ^ 1]) + good[1:])
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    loop.mark_dirty("org/a", {f.digest})  # what the watcher or the scrub reports
    return blob, good


def hold_repo_lock(store: Store, repo: str) -> tuple[threading.Thread, threading.Event, threading.Event]:
    """Another fill of the repo: holds its lock until ``release`` is set, running ``then`` first if given."""
    got, release = threading.Event(), threading.Event()

    def hold() -> None:
        with store.lock(repo):
            got.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    assert got.wait(10)
    return t, got, release


@pytest.mark.parametrize("repaired_meanwhile", [True, False])
def test_bug5_quarantine_never_races_a_fill_and_a_repair_never_reuses_a_rotten_blob(
        pvc: Path, tmp_path: Path, repaired_meanwhile: bool) -> None:
    store = Store(tmp_path / "cache")
    with looping(store, [PvcSource(pvc)]) as (loop, rec, _):
        desire(loop, spec("a"))
        settle(loop)
        blob, good = _rot_a_blob(store, loop)
        holder, _, release = hold_repo_lock(store, "org/a")  # a fill of the repo is under way
        p = loop.run_once()  # returns at once: the loop never waits for a repo lock a fill holds
        assert p.quarantines and p.fills and p.fills[0].distrust  # planned, and handed to the repair fill
        assert blob.exists() and "a" not in rec.ready  # nothing deleted under the running fill
        if repaired_meanwhile:
            blob.write_bytes(good)  # that fill restored it
        release.set()
        holder.join(10)
        settle(loop)
        assert rec.ready == {"a"}
        assert blob.read_bytes() == good  # kept when good again; deleted and fetched again when still rotten
        m = store.manifest("org/a", store.record("a").commit)  # type: ignore[union-attr]
        assert m is not None and store.check(m, full=True).ok


def test_bug6_metrics_scrape_while_models_come_and_go_never_fails(pvc: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    with looping(store, [PvcSource(tmp_path / "nowhere")]) as (loop, _rec, _):
        collector = StateCollector(loop.view, store.layout.root, store.space.published, lambda: loop.last_pass)
        errors: list[BaseException] = []
        done = threading.Event()

        def scrape() -> None:
            while not done.is_set():
                try:
                    list(collector.collect())
                except BaseException as e:
                    errors.append(e)
                    return

        t = threading.Thread(target=scrape)
        t.start()
        for i in range(300):
            desire(loop, *[spec(f"m{j}", "org/a") for j in range(i % 40)])
            loop.run_once()
        done.set()
        t.join(10)
        assert errors == []


def test_bug8_dropping_a_model_stops_its_running_fill_at_the_next_chunk(pvc: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    src = GatedSource(PvcSource(pvc))
    with looping(store, [src]) as (loop, rec, _):
        desire(loop, spec("a"))
        loop.run_once()
        assert src.entered.wait(10)
        desire(loop)  # no longer desired
        p = loop.run_once()
        assert p.cancels == ("a",)
        assert loop.queue.wait_idle(10)
        assert src.stopped == ["org/a"]
        settle(loop)
        assert rec.ready == frozenset() and store.record("a") is None
        assert not store.layout.snapshots_dir("org/a").exists()  # nothing half-published


def test_bug9_concurrent_fills_cannot_overshoot_the_budget_together(pvc: Path, tmp_path: Path) -> None:
    one = sum(f.stat().st_size for f in (pvc / "hub" / "models--org--a" / "blobs").iterdir())
    store = Store(tmp_path / "cache", budget_bytes=int(one * 1.5))  # each fits alone; two do not
    src = GatedSource(PvcSource(pvc))
    errors: list[BaseException] = []

    def first() -> None:
        fill_model(store, [src], "org/a", "main")

    t = threading.Thread(target=first)
    t.start()
    assert src.entered.wait(10)  # a's fill holds its reservation and has written nothing yet
    with pytest.raises(DiskFullError, match="reserved by fills in flight") as ei:
        fill_model(store, [PvcSource(pvc)], "org/b", "main")
    errors.append(ei.value)
    src.gate.set()
    t.join(10)
    assert store.used_bytes() <= store.budget_bytes
    fill_model(store, [PvcSource(pvc)], "org/c", "main", FileFilter(allow=("*.json",)))  # the rest still fits


class DisagreeingStore(Store):
    """A store whose checks always find one file missing: the fill says ok, the disk never agrees."""

    def check(self, manifest, **kw):  # type: ignore[no-untyped-def]
        rep = super().check(manifest, **kw)
        rep.missing.append("config.json")
        return rep


def test_bug10_a_fill_that_never_verifies_backs_off_instead_of_refilling_hot(pvc: Path, tmp_path: Path) -> None:
    store = DisagreeingStore(tmp_path / "cache")
    src = GatedSource(PvcSource(pvc))
    src.gate.set()
    with looping(store, [src]) as (loop, rec, clock):
        desire(loop, spec("a"))
        for _ in range(20):  # many passes, no time passes: one fill, then waiting
            settle(loop)
        assert len(src.fetches) == 1
        st = {s.name: s for s in loop.view()}["a"]
        assert st.state == "failed" and "not verified on disk: missing: config.json" in st.last_error
        assert st.next_attempt == clock.now + 10.0
        assert rec.ready == frozenset()
        clock.now += 10.0
        settle(loop)
        assert len(src.fetches) == 2  # the next attempt comes when the backoff says, not before


def test_bug11_a_pass_checks_what_changed_not_the_whole_cache(pvc: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    with looping(store, [PvcSource(pvc)]) as (loop, rec, _):
        models = [spec("a"), spec("b"), spec("c"), spec("a2", "org/a", files=FileFilter(allow=("*.json",)))]
        desire(loop, *models)
        settle(loop)
        assert rec.ready == {"a", "b", "c", "a2"}
        before = loop.scanner.checks
        loop.run_once()
        assert loop.scanner.checks == before  # nothing changed: nothing re-checked
        loop.mark_dirty("org/b")
        loop.run_once()
        assert loop.scanner.checks == before + 1  # one repo changed: its one model re-checked
        loop.mark_dirty("org/a")
        loop.run_once()
        assert loop.scanner.checks == before + 3  # both models of org/a


def test_refs_repointed_to_another_cached_commit_unlabels_in_file_mode(pvc: Path, tmp_path: Path) -> None:
    """Issue 10 item 9: the ref is checked against the commit the model was filled at, in every mode."""
    other = make_hub_model(pvc / "hub", "org/a", weight_bytes=MiB // 4, seed=9, refs=("v2",))
    store = Store(tmp_path / "cache")
    src = PvcSource(pvc)
    with looping(store, [src]) as (loop, rec, _):
        desire(loop, spec("a"), spec("a2", "org/a", revision="v2"))
        settle(loop)
        assert rec.ready == {"a", "a2"}
        (store.layout.refs_dir("org/a") / "main").write_text(other)  # main now names v2's commit
        loop.mark_dirty("org/a")
        p = loop.run_once()
        assert "a" not in p.ready and "a2" in p.ready
        assert any(r == "VerifyFailed" and "ref main" in m for _, r, m in rec.events)
        settle(loop)
        record = store.record("a")
        assert record is not None and store.read_ref("org/a", "main") == record.commit and rec.ready == {"a", "a2"}


def test_two_models_on_one_branch_pinned_apart_do_not_refill_each_other(tmp_path: Path) -> None:
    """Each publish moves refs/main; the other model's commit is still whole, so that is no damage to it."""
    hub = tmp_path / "pvc" / "hub"
    c1 = make_hub_model(hub, "org/a", weight_bytes=MiB // 4, seed=1)
    c2 = make_hub_model(hub, "org/a", weight_bytes=MiB // 4, seed=2)
    store = Store(tmp_path / "cache")
    src = GatedSource(PvcSource(tmp_path / "pvc"))
    src.gate.set()
    x, y = spec("x", "org/a"), spec("y", "org/a")
    with looping(store, [src]) as (loop, rec, _):
        loop.set_desired(DesiredState(models={"x": x, "y": y}, pins={"x": c1, "y": c2}))
        for _ in range(10):
            settle(loop)
            loop.mark_dirty("org/a")
        assert rec.ready == {"x", "y"} and len(src.fetches) == 2
        assert not [e for e in rec.events if e[1] == "VerifyFailed"]
