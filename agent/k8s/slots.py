"""Origin slots for the peers source, cluster-wide: at most ``cap`` nodes per model read the origin.

Slot ``i`` of a model is the Lease ``mc-origin-<hash of repo@commit>-<i>`` in the agent namespace.
Its ``holderIdentity`` is ``<node>@<host>:<port>``: the holder's BitTorrent address, so the same read
that says "the origin is taken" tells a waiting node where the model will be seeded (it asks that
node's torrent index, downloads, and learns the rest of the swarm from peer exchange). No separate
discovery service, and no O(nodes) list: one GET per slot per poll, by the nodes that wait.

A holder renews its Lease every ``duration / 3`` while it fills, and keeps it while it seeds the model
(``seeding``): nodes that come later find a seed there instead of taking a slot and reading the origin
again. A failed fill ``release``s the slot at once; a dead holder's slot frees itself after ``duration``
(judged on the observer's own clock, see ``agent.k8s.lease``).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

import structlog

from agent.errors import KubeApiError
from agent.k8s.lease import LeaseRecord, LeaseStore, Observation, observe

log = structlog.get_logger("agent.k8s.slots")


def slot_lease_name(key: str, i: int) -> str:
    return f"mc-origin-{hashlib.sha256(key.encode()).hexdigest()[:24]}-{i}"


def holder_address(identity: str) -> str | None:
    """'node@host:port' -> 'host:port' (None for an identity without an address)."""
    _, sep, addr = identity.partition("@")
    return addr if sep and ":" in addr else None


class LeaseSlot:
    """One held slot: renewed on its own thread until released (or handed over to seeding)."""

    def __init__(self, owner: LeaseSlots, key: str, held: LeaseRecord, index: int = 0) -> None:
        self.owner, self.key, self._held = owner, key, held
        self.index = index
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"origin-slot-{held.name}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        o = self.owner
        while not self._stop.wait(o.duration / 3):
            try:
                self._held = o.store.renew(self._held, o.identity, o.duration)
            except KubeApiError as e:  # lost (someone took it after we looked dead) or the API is away
                log.warning("slots.renew_failed", lease=self._held.name, error=str(e))
                if e.permanent:
                    return

    def release(self) -> None:
        """The fill failed or went elsewhere: let another node take the slot now."""
        if not self._stop.is_set():
            self._stop.set()
            self.owner.store.release(self._held, self.owner.identity)

    def seeding(self) -> None:
        """The model is published and seeded here: keep the Lease (renewed) as the swarm's beacon."""
        self.owner.seeding[self.key] = self

    def drop(self) -> None:
        """Stop seeding (eviction, shutdown): give the beacon back."""
        self.owner.seeding.pop(self.key, None)
        self.release()


class LeaseSlots:
    """Satisfies the peers source's ``OriginSlots``; ``on_holders(key, addresses)`` learns where each model is
    filled and seeded."""

    def __init__(self, store: LeaseStore, identity: str, cap: int, *, duration: float = 30.0,
                 on_holders: Callable[[str, list[str]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.identity = identity
        self.cap = cap
        self.duration = duration
        self.on_holders = on_holders
        self.clock = clock
        self.seeding: dict[str, LeaseSlot] = {}
        self._seen: dict[str, Observation] = {}

    def _look(self, name: str) -> Observation:
        rec = self.store.get(name)
        obs = observe(self._seen.get(name), rec, self.clock())
        self._seen[name] = obs
        return obs

    def try_acquire(self, key: str) -> LeaseSlot | None:
        now = self.clock()
        holders = []
        for i in range(self.cap):
            name = slot_lease_name(key, i)
            try:
                obs = self._look(name)
                if obs.free_for(self.identity, now):
                    held = self.store.acquire(name, self.identity, self.duration, obs, now)
                    if held is not None:
                        log.info("slots.acquired", lease=name, key=key[:80])
                        return LeaseSlot(self, key, held, i)
                    obs = self._look(name)  # lost the race: whoever won is a holder to learn about
            except KubeApiError as e:
                log.warning("slots.read_failed", lease=name, error=str(e))
                continue
            if obs.holder and obs.holder != self.identity and (addr := holder_address(obs.holder)):
                holders.append(addr)
        if holders and self.on_holders is not None:
            self.on_holders(key, holders)
        return None

    def busy(self, key: str) -> bool:
        return self.held_count(key) > 0

    def held_count(self, key: str) -> int:
        """Slots of ``key`` held (an unreadable one counts as held: better wait than send everyone to the
        origin). The holders' addresses go to ``on_holders``: a holder learns where the other stripes are."""
        now = self.clock()
        held, holders = 0, []
        for i in range(self.cap):
            try:
                obs = self._look(slot_lease_name(key, i))
            except KubeApiError:
                held += 1
                continue
            if not obs.free_for("", now):
                held += 1
                if obs.holder and obs.holder != self.identity and (addr := holder_address(obs.holder)):
                    holders.append(addr)
        if holders and self.on_holders is not None:
            self.on_holders(key, holders)
        return held

    def drop(self, key: str) -> None:
        slot = self.seeding.get(key)
        if slot is not None:
            slot.drop()

    def drop_all(self) -> None:
        for slot in list(self.seeding.values()):
            slot.drop()
