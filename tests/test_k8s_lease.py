"""Leases and the leader election, stepped on an injected clock against the emulated API server.

Followers learn about the Lease from its watch; here the test plays the watch (``observe``) so every
instant is chosen by the test. The threaded test at the end runs the real watch.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest

from agent.k8s.client import KubeApi, make_api
from agent.k8s.leader import ElectionTiming, Elector
from agent.k8s.lease import LeaseLost, LeaseRecord, LeaseStore, observe
from agent.k8s.watch import Reflector, WatchSettings, WatchTarget
from tests.conftest import ManualClock
from tests.peers.kube_emulator import KubeEmulator

NS, NAME = "model-cache", "leader"
TIMING = ElectionTiming(duration=15.0, renew_period=7.5, renew_deadline=12.0, acquire_jitter=1.0, retry=1.0)


def rec(holder: str, rv: str, renew: str = "t") -> LeaseRecord:
    return LeaseRecord(NAME, holder, 15.0, "a", renew, 0, rv)


# ---- pure ------------------------------------------------------------------------------------------


def test_observation_time_moves_only_when_the_lease_changes() -> None:
    first = observe(None, rec("a", "1"), 100.0)
    assert (first.holder, first.seen, first.expires()) == ("a", 100.0, 115.0)  # first sight counts as fresh
    assert observe(first, rec("a", "1"), 110.0) is first  # same record again: no sign of life
    renewed = observe(first, rec("a", "2", "t2"), 110.0)
    assert renewed.seen == 110.0
    gone = observe(renewed, None, 112.0)  # deleted: not a renewal, the holder is presumed alive until 125
    assert (gone.holder, gone.seen, gone.record) == ("a", 110.0, None)
    assert not gone.free_for("b", 123.9) and gone.free_for("b", 124.0, early=1.0)
    assert gone.free_for("a", 111.0)  # our own Lease is always ours to renew
    never = observe(None, None, 5.0)
    assert never.holder == "" and never.free_for("b", 5.0)
    released = observe(renewed, rec("", "3"), 113.0)
    assert released.free_for("b", 113.0)


def test_timing_must_leave_a_gap_between_the_old_leader_stopping_and_a_new_one_starting() -> None:
    with pytest.raises(ValueError, match="renew deadline < duration - jitter"):
        ElectionTiming(duration=15.0, renew_period=7.5, renew_deadline=14.5, acquire_jitter=1.0)
    with pytest.raises(ValueError):
        ElectionTiming(duration=15.0, renew_period=12.0, renew_deadline=10.0)


# ---- against the emulator ------------------------------------------------------------------------------


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator(bookmark_interval=0.2) as emu:
        yield emu


def candidate(kube: KubeEmulator, who: str, clock: ManualClock, stop: threading.Event, *,
              wall_offset: float = 0.0, timing: ElectionTiming = TIMING, seed: int = 1) -> Elector:
    api = make_api(kube.url, user_agent=who, request_timeout=2.0)
    store = LeaseStore(api, NS, stop=stop, wall=lambda: time.time() + wall_offset)
    return Elector(store, NAME, who, timing=timing, stop=stop, clock=clock, rng=random.Random(seed))


def watch(e: Elector, kube: KubeEmulator) -> None:
    """Play the Lease watch for ``e``: hand it the Lease as it is now."""
    obj = kube.get("leases", NAME, group="coordination.k8s.io", namespace=NS)
    e.observe(LeaseRecord.from_obj(obj) if obj else None)


def lease(kube: KubeEmulator) -> dict:
    return kube.get("leases", NAME, group="coordination.k8s.io", namespace=NS) or {}


def test_store_writes_are_compare_and_swap(kube: KubeEmulator, api: KubeApi) -> None:
    store = LeaseStore(api, NS)
    a = store.create(NAME, "a", 15)
    assert a is not None and a.holder == "a" and store.create(NAME, "b", 15) is None  # someone was first
    b_view = store.get(NAME)
    assert b_view == a
    renewed = store.renew(a, "a", 15)
    assert renewed.resource_version != a.resource_version and renewed.transitions == 0
    assert store.update(a, "b", 15) is None  # b's view is stale: refused
    taken = store.update(renewed, "b", 15)
    assert taken is not None and taken.holder == "b" and taken.transitions == 1
    with pytest.raises(LeaseLost, match="now held by b"):
        store.renew(renewed, "a", 15)
    kube.delete("leases", NAME, group="coordination.k8s.io", namespace=NS)
    again = store.renew(taken, "b", 15)  # deleted under its holder: recreated, still b's
    assert again.holder == "b"
    assert store.release(again, "b") and store.get(NAME).holder == ""  # type: ignore[union-attr]
    spec = lease(kube)["spec"]
    assert spec["leaseDurationSeconds"] == 15 and spec["renewTime"].startswith("20")


def test_a_free_lease_is_taken_by_one_candidate_the_other_waits(kube: KubeEmulator, stop: threading.Event) -> None:
    clock = ManualClock(0.0)
    a, b = candidate(kube, "a", clock, stop, seed=1), candidate(kube, "b", clock, stop, seed=2)
    a.step()  # reads: no Lease; its jittered try is due within acquire_jitter
    clock.now = 1.0
    a.step()
    assert a.is_leader() and lease(kube)["spec"]["holderIdentity"] == "a"
    watch(b, kube)
    for t in (1.0, 5.0, 10.0):
        clock.now = t
        b.step()
        assert not b.is_leader()
    assert not [r for r in kube.requests_matching("*", "/leases", client="b") if r.method != "GET"]


def a_leads_b_follows(kube: KubeEmulator, stop: threading.Event, **a_kw: float) -> tuple[ManualClock, Elector, Elector]:
    """a takes the free Lease at t=1; b has seen it (through its watch)."""
    clock = ManualClock(0.0)
    a = candidate(kube, "a", clock, stop, wall_offset=a_kw.get("a_wall", 0.0))
    b = candidate(kube, "b", clock, stop, wall_offset=a_kw.get("b_wall", 0.0))
    a.observe(None)
    clock.now = 1.0
    a.step()
    assert a.is_leader()
    watch(b, kube)
    return clock, a, b


def run_until(t_end: float, clock: ManualClock, electors: list[Elector], kube: KubeEmulator, *,
              watchers: list[Elector], dt: float = 0.25) -> list[tuple[float, tuple[bool, ...]]]:
    """Step everyone every ``dt`` up to ``t_end``; followers see the Lease each tick. Returns who led when."""
    seen = []
    while clock.now < t_end:
        clock.now = round(clock.now + dt, 6)
        for e in electors:
            e.step()
        for e in watchers:
            watch(e, kube)
        seen.append((clock.now, tuple(e.is_leader() for e in electors)))
    return seen


def test_a_leader_cut_off_from_the_api_stops_before_anyone_takes_over(kube: KubeEmulator,
                                                                      stop: threading.Event) -> None:
    clock, a, b = a_leads_b_follows(kube, stop)
    run_until(30.0, clock, [a, b], kube, watchers=[b])
    assert a.is_leader() and not b.is_leader()  # renewed every 7.5 s, b never took it
    kube.fail_for(3600, "*", "/leases", 503, client="^a$")  # a loses the API mid-term
    cut = clock.now
    history = run_until(cut + 20.0, clock, [a, b], kube, watchers=[b])
    assert all(not (la and lb) for _, (la, lb) in history), "two leaders at the same instant"
    a_stopped = next(t for t, (la, _) in history if not la)
    b_started = next(t for t, (_, lb) in history if lb)
    last_renew = max(t for t, _ in a.transitions if t <= cut) if a.transitions else cut
    assert a_stopped <= cut + TIMING.renew_deadline  # within its deadline, unrenewed
    assert b_started - a_stopped >= TIMING.duration - TIMING.acquire_jitter - TIMING.renew_deadline - 0.25
    assert b_started - cut <= TIMING.duration + 0.25  # replaced within the Lease duration
    assert last_renew <= cut
    assert lease(kube)["spec"]["holderIdentity"] == "b" and lease(kube)["spec"]["leaseTransitions"] == 1


def test_clock_offsets_between_agents_change_nothing(kube: KubeEmulator, stop: threading.Event) -> None:
    """renewTime is written from a's wall clock (an hour ahead); b's is an hour behind. b must judge
    expiry only by when it saw the Lease change on its own clock."""
    clock, a, b = a_leads_b_follows(kube, stop, a_wall=+3600.0, b_wall=-3600.0)
    history = run_until(60.0, clock, [a, b], kube, watchers=[b])
    assert all(la and not lb for _, (la, lb) in history)  # a renewed throughout: b never took it early
    died = clock.now  # a is no longer stepped: as if it died
    history = run_until(died + 20.0, clock, [b], kube, watchers=[b])
    took = next(t for t, (lb,) in history if lb)
    assert took - died <= TIMING.duration + 0.25  # nor waits an hour (or forever) for a renewTime in the future


def test_a_deleted_lease_is_recreated_by_its_holder_and_not_grabbed(kube: KubeEmulator,
                                                                      stop: threading.Event) -> None:
    clock, a, b = a_leads_b_follows(kube, stop)
    kube.delete("leases", NAME, group="coordination.k8s.io", namespace=NS)
    watch(b, kube)  # b sees it gone: not a reason to create it at once (a is presumed alive)
    history = run_until(20.0, clock, [a, b], kube, watchers=[b])
    assert all(la and not lb for _, (la, lb) in history)
    assert lease(kube)["spec"]["holderIdentity"] == "a"
    assert kube.counts(client="^b$")[("create", "leases")] == 0


def test_a_429_storm_shorter_than_the_deadline_keeps_the_leader(kube: KubeEmulator, stop: threading.Event) -> None:
    clock, a, b = a_leads_b_follows(kube, stop)
    run_until(7.0, clock, [a, b], kube, watchers=[b])
    kube.fail_for(3600, "*", "/leases", 429, retry_after=1)
    run_until(11.0, clock, [a, b], kube, watchers=[b])  # a's renewal at 8.5 and retries all get 429
    assert kube.counts(status=lambda s: s == 429)[("update", "leases")] >= 2
    kube.clear_faults()
    history = run_until(40.0, clock, [a, b], kube, watchers=[b])
    assert all(la and not lb for _, (la, lb) in history)
    assert a.terms == 1 and b.terms == 0


def test_released_lease_is_taken_within_the_jitter(kube: KubeEmulator, stop: threading.Event) -> None:
    clock, a, b = a_leads_b_follows(kube, stop)
    clock.now = 3.0
    a.release()
    assert not a.is_leader() and lease(kube)["spec"]["holderIdentity"] == ""
    watch(b, kube)
    history = run_until(3.0 + TIMING.acquire_jitter + 0.25, clock, [b], kube, watchers=[b])
    assert history[-1][1] == (True,)


def test_threaded_election_with_the_real_lease_watch(kube: KubeEmulator, stop: threading.Event) -> None:
    """Real threads, real watch, short timings: a partitioned leader is replaced, never overlapped."""
    timing = ElectionTiming(duration=1.5, renew_period=0.3, renew_deadline=0.9, acquire_jitter=0.2, retry=0.1)
    electors = []
    for who in ("a", "b"):
        api = make_api(kube.url, user_agent=who, request_timeout=1.0)
        e = Elector(LeaseStore(api, NS, stop=stop), NAME, who, timing=timing, stop=stop)
        target = WatchTarget("lease", api.coordination.list_namespaced_lease, (NS,),
                             field_selector=f"metadata.name={NAME}")
        w: Reflector[LeaseRecord] = Reflector(api, target, LeaseRecord.from_obj, stop=stop,
                                              settings=WatchSettings(timeout=30))
        w.on_change = lambda e=e, w=w: e.observe(w.get(f"{NS}/{NAME}"))  # type: ignore[misc]
        w.start()
        e.start()
        electors.append(e)
    overlap = []
    leaders: list[str] = []

    def sample(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            now = [e.identity for e in electors if e.is_leader()]
            if len(now) > 1:
                overlap.append(now)
            if now and (not leaders or leaders[-1] != now[0]):
                leaders.append(now[0])
            time.sleep(0.005)

    sample(1.0)
    assert len(leaders) == 1
    first = leaders[0]
    kube.partition(f"^{first}$", 30)
    t0 = time.monotonic()
    sample(3.0)
    assert not overlap, overlap
    assert len(leaders) == 2 and leaders[1] != first
    took = next(t for t, leading in next(e for e in electors if e.identity == leaders[1]).transitions if leading)
    assert took - t0 <= timing.duration + 1.0  # the exact bound is checked on the stepped clock above
