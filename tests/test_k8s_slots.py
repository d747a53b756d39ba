"""Cluster-wide origin slots for the peers source (Leases), against the emulated API server.

At most ``cap`` nodes per model read the origin; the holder's identity says where the model will be
seeded (discovery); a seeding holder keeps the slot as the swarm's beacon; a failed fill gives it back
at once; a dead holder's slot frees itself after the Lease duration, judged on the waiter's own clock.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.k8s.client import KubeApi
from agent.k8s.lease import LeaseStore
from agent.k8s.slots import LeaseSlots, holder_address, slot_lease_name
from tests.conftest import ManualClock
from tests.peers.kube_emulator import KubeEmulator

NS = "model-cache"
KEY = "org/m@" + "1" * 40


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    k = KubeEmulator().start()
    yield k
    k.stop()


@pytest.fixture
def store(api: KubeApi) -> LeaseStore:
    return LeaseStore(api, NS)


def slots(store: LeaseStore, node: str, clock: ManualClock, learned: list[tuple[str, list[str]]] | None = None,
          cap: int = 1) -> LeaseSlots:
    return LeaseSlots(store, f"{node}@10.0.0.{node[-1]}:6881", cap, duration=30.0, clock=clock,
                      on_holders=((lambda k, a: learned.append((k, a))) if learned is not None else None))


def test_holder_identity_names_the_seed_address() -> None:
    assert holder_address("gpu-1@10.1.2.3:6881") == "10.1.2.3:6881"
    assert holder_address("gpu-1") is None
    assert slot_lease_name(KEY, 0) != slot_lease_name(KEY, 1) and len(slot_lease_name(KEY, 0)) < 64


def test_one_holder_per_slot_and_the_waiter_learns_where_to_find_the_model(store: LeaseStore) -> None:
    clock = ManualClock()
    learned: list[tuple[str, list[str]]] = []
    a, b = slots(store, "n1", clock), slots(store, "n2", clock, learned)
    slot = a.try_acquire(KEY)
    assert slot is not None
    assert b.try_acquire(KEY) is None and learned == [(KEY, ["10.0.0.1:6881"])]
    assert b.busy(KEY)
    slot.release()  # the fill failed: the next node may read the origin at once
    taken = b.try_acquire(KEY)
    assert taken is not None
    taken.release()


def test_a_seeding_holder_keeps_the_slot_as_the_beacon_until_it_stops_seeding(store: LeaseStore) -> None:
    clock = ManualClock()
    a, b = slots(store, "n1", clock), slots(store, "n2", clock, [])
    slot = a.try_acquire(KEY)
    assert slot is not None
    slot.seeding()
    assert b.try_acquire(KEY) is None
    clock.now += 29.0
    slot._held = store.renew(slot._held, a.identity, a.duration)  # what its renewal thread does every 10 s
    clock.now += 29.0  # 58 s after b first saw it, but 29 s after the renewal b saw: still the beacon
    assert b.try_acquire(KEY) is None
    a.drop(KEY)  # evicted or shutting down: the beacon goes
    taken = b.try_acquire(KEY)
    assert taken is not None
    taken.release()


def test_a_dead_holder_frees_its_slot_after_the_duration_on_the_waiters_clock(store: LeaseStore) -> None:
    clock = ManualClock()
    a, b = slots(store, "n1", clock), slots(store, "n2", clock, [])
    slot = a.try_acquire(KEY)
    assert slot is not None
    slot._stop.set()  # the holder's process died: no more renewals, no release
    assert b.try_acquire(KEY) is None  # first sight: presumed alive for a whole duration from now
    clock.now += 29.0
    assert b.try_acquire(KEY) is None
    clock.now += 1.0
    taken = b.try_acquire(KEY)
    assert taken is not None
    taken.release()


def test_cap_two_lets_two_nodes_read_the_origin(store: LeaseStore) -> None:
    clock = ManualClock()
    a, b, c = (slots(store, n, clock, cap=2) for n in ("n1", "n2", "n3"))
    held = [a.try_acquire(KEY), b.try_acquire(KEY)]
    assert None not in held
    assert c.try_acquire(KEY) is None
    for slot in held:
        slot.release()  # type: ignore[union-attr]
