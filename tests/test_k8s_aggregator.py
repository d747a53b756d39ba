"""The leader's CachedModel status writer, stepped on injected clocks against the emulated API server.

The test plays the agents (it writes their Nodes' labels and status annotations directly) and moves
each candidate's clock by hand; the Node and CachedModel watches are real.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from agent.k8s.aggregator import Aggregator
from agent.k8s.client import make_api
from agent.k8s.crd import GROUP, PLURAL, VERSION, CachedModelObj, parse_cached_model
from agent.k8s.events import EventRecorder, list_events
from agent.k8s.leader import ElectionTiming, Elector
from agent.k8s.lease import LeaseRecord, LeaseStore
from agent.k8s.watch import Reflector, WatchSettings, WatchTarget
from tests.conftest import ManualClock
from tests.peers.kube_emulator import KubeEmulator

P = "modelcache.dev"
NS = "model-cache"
C1, C2 = "1" * 40, "2" * 40
TIMING = ElectionTiming(duration=15.0, renew_period=7.5, renew_deadline=12.0, acquire_jitter=1.0, retry=1.0)
WATCH = WatchSettings(timeout=30)


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator(bookmark_interval=0.2) as emu:
        for i in range(4):
            emu.create_node(f"n{i}", {"gpu": "true"})
        emu.create_node("cpu", {})  # no agent: never counted
        yield emu


class Candidate:
    """One agent's leader side: its own client (named), clock, elector, CachedModel watch and aggregator."""

    def __init__(self, kube: KubeEmulator, who: str, stop: threading.Event, *, lease: str = "leader") -> None:
        self.kube = kube
        self.clock = ManualClock(0.0)
        self.api = make_api(kube.url, user_agent=who, request_timeout=2.0)
        self.elector = Elector(LeaseStore(self.api, NS, stop=stop), lease, who, timing=TIMING, stop=stop,
                               clock=self.clock, rng=random.Random(7))
        self.frozen = threading.Event()  # its watches' stop: the test's stop, or freeze()
        threading.Thread(target=self._end_with, args=(stop,), daemon=True).start()
        self.crs: Reflector[CachedModelObj] = Reflector(
            self.api, WatchTarget("cachedmodels", self.api.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL)),
            parse_cached_model, stop=self.frozen, settings=WATCH)
        self.crs.start()
        assert self.crs.synced.wait(5)
        self.agg = Aggregator(self.api, self.crs.items, self.crs.synced.is_set, self.elector,
                              EventRecorder(self.api, node_name=who), prefix=P, stop=stop, interval=5.0,
                              node_selector="gpu=true", watch=WATCH, clock=self.clock)
        self.lease = lease

    def _end_with(self, stop: threading.Event) -> None:
        stop.wait()
        self.frozen.set()
        if self.agg._nodes_stop is not None:
            self.agg._nodes_stop.set()

    def freeze(self) -> None:
        """Stop this candidate's watches where they are (what a paused process sees afterwards)."""
        self.frozen.set()
        if self.agg._nodes_stop is not None:
            self.agg._nodes_stop.set()
        for r in (self.crs, self.agg._nodes):
            if r is not None:
                r.cut()

    def lead(self) -> None:
        self.elector.observe(None if self.kube.get("leases", self.lease, group="coordination.k8s.io", namespace=NS)
                             is None else LeaseRecord.from_obj(self.kube.get("leases", self.lease,
                                                                               group="coordination.k8s.io",
                                                                               namespace=NS) or {}))
        self.clock.now += 2.0
        self.elector.step()
        assert self.elector.is_leader()

    def settle(self) -> None:
        """Let the watches catch up with the API server (the node watch of a new term, CachedModel writes)."""
        if self.agg._nodes is None and self.elector.is_leader():
            self.agg._start_nodes()  # what run_once does when a term starts, without a pass
        nodes = self.agg._nodes
        if nodes is None:
            return
        assert nodes.synced.wait(5)
        want = {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in self.kube.list(PLURAL, group=GROUP)}
        assert self.kube.wait_for(lambda: {k: v.resource_version for k, v in self.crs.items().items()} == want)
        want_nodes = {n["metadata"]["name"]: self.agg._parse_node(n) for n in self.kube.list("nodes")
                      if n["metadata"].get("labels", {}).get("gpu") == "true"}
        want_nodes = {k: v for k, v in want_nodes.items() if v is not None}
        assert self.kube.wait_for(lambda: {r.name: r for r in self.agg.node_reports()} == want_nodes)

    def step(self, dt: float = 0.0) -> None:
        self.clock.now += dt
        self.elector.step()  # renew when due (never more than 12 s apart here)
        self.settle()
        self.agg._dirty = True
        self.agg.run_once()


def agent_reports(kube: KubeEmulator, node: str, model: str, state: str, *, propose: str | None = None) -> None:
    """What an agent publishes: its label (ready or not) and its status annotation."""
    entry: dict[str, Any] = {"state": state}
    if propose:
        entry["propose"] = {"revision": "main", "commit": propose}
    kube.patch("nodes", node, {"metadata": {"labels": {f"{P}/{model}": "ready" if state == "ready" else None},
                                            "annotations": {f"{P}/status": json.dumps({model: entry})}}})


def status(kube: KubeEmulator, name: str = "m") -> dict[str, Any]:
    return (kube.get(PLURAL, name, group=GROUP) or {}).get("status") or {}


def status_writes(kube: KubeEmulator, client: str | None = None) -> list:
    return [r for r in kube.requests_matching("PATCH", f"/{PLURAL}/[^/]+/status$", client=client) if r.status == 200]


def create_model(kube: KubeEmulator, name: str = "m", **spec: Any) -> None:
    kube.create(PLURAL, {"metadata": {"name": name}, "spec": {"repo": "org/m", "revision": "main", **spec}},
                group=GROUP)


def test_status_comes_from_the_nodes_and_is_written_at_most_once_per_interval(kube: KubeEmulator,
                                                                              stop: threading.Event) -> None:
    create_model(kube)
    a = Candidate(kube, "a", stop)
    a.lead()
    a.step()
    first = status(kube)
    assert (first["readyNodes"], first["desiredNodes"]) == (0, 0) and len(status_writes(kube)) == 1
    for i in range(4):
        agent_reports(kube, f"n{i}", "m", "filling")
    a.step(1.0)  # within the interval since the last write: held back
    assert len(status_writes(kube)) == 1
    agent_reports(kube, "n0", "m", "ready")
    agent_reports(kube, "n1", "m", "failed")
    a.step(4.0)  # the interval is over: one write with the latest picture
    st = status(kube)
    assert len(status_writes(kube)) == 2
    assert (st["readyNodes"], st["desiredNodes"], st["failedNodes"]) == (1, 4, 1)
    assert {c["type"]: c["message"] for c in st["conditions"]}["Ready"] == "1/4 nodes ready, 1 failed: n1"
    for _ in range(4):
        a.step(5.0)
    assert len(status_writes(kube)) == 2  # nothing changed: nothing written
    for i in range(4):
        agent_reports(kube, f"n{i}", "m", "ready")
    a.step(5.0)
    assert status(kube)["readyNodes"] == 4 and len(status_writes(kube)) == 3
    assert kube.counts()[("watch", "nodes")] >= 1 and kube.counts()[("list", "nodes")] == 1
    assert a.elector.terms == 1 and not status_writes(kube, client="^(?!a$)")


def test_a_pin_and_a_spec_edit_are_answered_at_once(kube: KubeEmulator, stop: threading.Event) -> None:
    create_model(kube)
    a = Candidate(kube, "a", stop)
    a.lead()
    a.step()
    agent_reports(kube, "n0", "m", "pending", propose=C2)
    agent_reports(kube, "n1", "m", "pending", propose=C1)
    agent_reports(kube, "n2", "m", "pending", propose=C1)
    a.step(1.0)  # within the interval, but agents are waiting for this
    assert (status(kube)["resolvedRevision"], status(kube)["resolvedFrom"]) == (C1, "main")
    kube.patch(PLURAL, "m", {"spec": {"repo": "bad repo"}}, group=GROUP)
    a.step(1.0)
    st = status(kube)
    assert {c["type"]: c["status"] for c in st["conditions"]}["SpecValid"] == "False"
    assert st["observedGeneration"] == 2 and len(status_writes(kube)) == 3


def test_invalid_spec_is_one_event_for_the_cluster_across_a_failover(kube: KubeEmulator,
                                                                     stop: threading.Event) -> None:
    kube.create(PLURAL, {"metadata": {"name": "bad"}, "spec": {"repo": "not a repo"}}, group=GROUP)
    a = Candidate(kube, "a", stop)
    a.lead()
    a.step()
    events = [e for e in list_events(a.api) if e["reason"] == "InvalidSpec"]
    assert len(events) == 1 and "spec.repo" in events[0]["message"] and events[0]["type"] == "Warning"
    a.elector.release()
    b = Candidate(kube, "b", stop)
    b.lead()
    b.step()
    assert len([e for e in list_events(a.api) if e["reason"] == "InvalidSpec"]) == 1
    assert not status_writes(kube, client="^b$")  # the status was current: a new leader writes nothing


def test_a_leader_that_cannot_renew_stops_writing_even_if_writes_would_work(kube: KubeEmulator,
                                                                            stop: threading.Event) -> None:
    create_model(kube)
    a = Candidate(kube, "a", stop)
    a.lead()
    a.step()
    kube.fail_for(3600, "*", "/leases", 503, client="^a$")  # only its Lease calls fail
    for t in (3.0, 3.0, 3.0, 3.0):  # renewals due at 7.5 s fail; deadline 12 s after the last good one
        a.clock.now += t
        a.elector.step()
    assert not a.elector.is_leader()
    agent_reports(kube, "n0", "m", "ready")
    a.step(10.0)
    assert len(status_writes(kube)) == 1 and status(kube)["readyNodes"] == 0
    assert a.agg._nodes is None  # and it gave up the cluster-wide Node watch


def test_two_leaders_for_an_instant_cannot_lose_or_flap_the_status(kube: KubeEmulator,
                                                                   stop: threading.Event) -> None:
    """a is frozen (a VM pause: its clock and its watches stand still, so it still believes it leads, on
    what it saw before) while b takes over and writes. When a resumes it has one pass to run on that old
    picture. Its write carries the CachedModel version it computed from, so it gets a 409 instead of
    turning READY 4 back into 1; then its renewal finds b's Lease and it stands down.
    """
    create_model(kube)
    a, b = Candidate(kube, "a", stop), Candidate(kube, "b", stop)
    a.lead()
    a.step()
    agent_reports(kube, "n0", "m", "ready")
    a.settle()  # a has seen n0 ready, but its interval is not over: nothing written yet
    a.freeze()
    b.elector.observe(LeaseRecord.from_obj(kube.get("leases", "leader", group="coordination.k8s.io", namespace=NS)
                                           or {}))
    b.clock.now += TIMING.duration + 0.1  # b saw no renewal for a whole Lease duration
    b.elector.step()
    assert a.elector.is_leader() and b.elector.is_leader()  # the instant this test is about
    for i in range(4):
        agent_reports(kube, f"n{i}", "m", "ready")
    b.step()
    assert status(kube)["readyNodes"] == 4
    a.clock.now += 5.0
    a.agg._dirty = True
    a.agg.run_once()  # a resumes: one pass on its old picture (1 ready, CachedModel as a last saw it)
    assert a.agg.stats["conflicts"] == 1 and a.agg.stats["writes"] == 1
    ready = [r.body["status"]["readyNodes"] for r in status_writes(kube) if "readyNodes" in r.body["status"]]
    assert ready == [0, 4] and status(kube)["readyNodes"] == 4  # never backwards
    a.clock.now += TIMING.renew_period
    a.elector.step()  # its renewal finds b's Lease
    assert not a.elector.is_leader()


def test_a_leader_whose_election_thread_hangs_stops_writing_at_its_deadline(kube: KubeEmulator,
                                                                           stop: threading.Event) -> None:
    """Leadership is a deadline checked at each write, not a flag a (possibly stuck) thread must clear."""
    create_model(kube)
    a = Candidate(kube, "a", stop)
    a.lead()
    a.step()
    a.clock.now += TIMING.renew_deadline + 0.1  # no renewal happened: the election thread is stuck
    agent_reports(kube, "n0", "m", "ready")
    a.settle()
    a.agg._dirty = True
    a.agg.run_once()
    assert not a.elector.is_leader()
    assert len(status_writes(kube)) == 1 and status(kube)["readyNodes"] == 0
