"""Origin slots: at most ``originConcurrency`` nodes per model fetch it from the configured sources.

Everyone else waits for a slot holder's torrent and fills from peers. The decision is taken by the
peers source when it finds no torrent (``OriginGate``); origin sources are wrapped in
``SlottedSource``, which lets a fetch through only for a node that holds a slot for that model, or
for a fill that never consulted the peers source (a spec with ``sources: [pvc]`` is never gated).

Implementations of ``OriginSlots``:
- ``LocalSlots``: this process only (file mode on one node, ``fill``).
- ``DirSlots``: flock files in a directory shared by the agents of one host (the swarm lab); a
  holder that dies releases its slot with its file descriptors, as a Lease expires.
- a ``coordination.k8s.io`` Lease per model and slot (``agent/k8s``, cluster mode) comes later.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import structlog

from agent.cache.store import Fill
from agent.core.plan import FileEntry, ModelPlan
from agent.core.spec import FileFilter
from agent.core.torrent import TorrentError, share_batches, stripe
from agent.errors import IntegrityError, SourceError, TransientSourceError
from agent.sources.base import Progress, Source

if TYPE_CHECKING:
    from agent.sources.peers.service import PeerService

log = structlog.get_logger("agent.sources.peers")


def slot_key(repo: str, commit: str) -> str:
    return f"{repo}@{commit}"


class Slot(Protocol):
    index: int  # which of the model's ``cap`` slots: the holder's stripe of the model (core.torrent.stripe)

    def release(self) -> None: ...


class OriginSlots(Protocol):
    """A cluster-wide cap per model on concurrent origin fills."""

    cap: int

    def try_acquire(self, key: str) -> Slot | None:
        """A slot for ``key`` if fewer than ``cap`` are held (by anyone), else None. Never blocks."""
        ...

    def busy(self, key: str) -> bool:
        """True while some node (this one included) holds a slot for ``key``."""
        ...

    def held_count(self, key: str) -> int:
        """How many of ``key``'s slots are held (this node's included)."""
        ...


class _LocalSlot:
    def __init__(self, owner: LocalSlots, key: str, index: int) -> None:
        self._owner, self._key, self._done = owner, key, False
        self.index = index

    def release(self) -> None:
        with self._owner._mu:
            if not self._done:
                self._done = True
                self._owner._held[self._key] -= 1


class LocalSlots:
    """Slots counted in this process: right for one node, no coordination between nodes."""

    def __init__(self, cap: int = 1) -> None:
        self.cap = cap
        self._mu = threading.Lock()
        self._held: dict[str, int] = {}

    def try_acquire(self, key: str) -> Slot | None:
        with self._mu:
            if self._held.get(key, 0) >= self.cap:
                return None
            n = self._held.get(key, 0)
            self._held[key] = n + 1
            return _LocalSlot(self, key, n)

    def busy(self, key: str) -> bool:
        return self.held_count(key) > 0

    def held_count(self, key: str) -> int:
        with self._mu:
            return self._held.get(key, 0)


class _DirSlot:
    def __init__(self, fd: int, index: int) -> None:
        self._fd = fd
        self.index = index

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing drops the flock
            self._fd = -1


class DirSlots:
    """``cap`` flock files per model in a directory on a local filesystem shared by the agents.

    flock is per open file description, so two holders in one process also exclude each other. Not
    for NFS (flock there is not reliable); across hosts, use the Lease implementation.
    """

    def __init__(self, directory: Path, cap: int = 1) -> None:
        self.dir = directory
        self.cap = cap
        self.dir.mkdir(parents=True, exist_ok=True)

    def _paths(self, key: str) -> list[Path]:
        stem = hashlib.sha256(key.encode()).hexdigest()[:24]
        return [self.dir / f"{stem}.{i}.lock" for i in range(self.cap)]

    def try_acquire(self, key: str) -> Slot | None:
        for i, p in enumerate(self._paths(key)):
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return _DirSlot(fd, i)
        return None

    def busy(self, key: str) -> bool:
        return self.held_count(key) > 0

    def held_count(self, key: str) -> int:
        n = 0
        for p in self._paths(key):
            try:
                fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                n += 1
            finally:
                os.close(fd)
        return n


Decision = Literal["held", "denied"]


class OriginGate:
    """What the peers source decided for each model on this node: fetch from the origin or wait.

    A held slot stays held after the origin fetch, until this node seeds the model (``release`` from
    ``PeerService.seed``): releasing at the end of the fetch would let other nodes see neither a slot
    holder nor a torrent while this one publishes and hashes, and send them to the origin too.
    """

    def __init__(self, slots: OriginSlots) -> None:
        self.slots = slots
        self._mu = threading.Lock()
        self._held: dict[str, Slot] = {}
        self._denied: set[str] = set()

    def decide(self, key: str) -> Decision | None:
        """Hold a slot (kept if this node already has one) or record that the origin is closed to us."""
        with self._mu:
            self._denied.discard(key)
            if key in self._held:
                return "held"
            slot = self.slots.try_acquire(key)
            if slot is None:
                return None
            self._held[key] = slot
            return "held"

    def deny(self, key: str) -> None:
        with self._mu:
            self._denied.add(key)

    def decision(self, key: str) -> Decision | None:
        with self._mu:
            if key in self._held:
                return "held"
            return "denied" if key in self._denied else None

    def release(self, key: str) -> None:
        with self._mu:
            slot = self._held.pop(key, None)
            self._denied.discard(key)
        if slot is not None:
            slot.release()

    def seeded(self, key: str) -> None:
        """This node seeds the model now: its slot becomes the swarm's beacon where the slots support it
        (cluster Leases keep naming this node as the place to find the model), else it is released."""
        with self._mu:
            slot = self._held.pop(key, None)
            self._denied.discard(key)
        if slot is not None:
            getattr(slot, "seeding", slot.release)()

    def unseeded(self, key: str) -> None:
        drop = getattr(self.slots, "drop", None)
        if drop is not None:
            drop(key)

    def release_repo(self, repo: str) -> None:
        with self._mu:
            keys = [k for k in self._held if k.startswith(repo + "@")]
        for k in keys:
            self.release(k)

    def release_all(self) -> None:
        with self._mu:
            keys = list(self._held)
        for k in keys:
            self.release(k)
        drop_all = getattr(self.slots, "drop_all", None)
        if drop_all is not None:
            drop_all()

    def others_filling(self, key: str) -> bool:
        """Another node holds a slot for ``key`` besides this one (its stripe may still arrive)."""
        return self.slots.held_count(key) > (1 if self.decision(key) == "held" else 0)

    def stripe(self, key: str) -> tuple[int, int]:
        """(slot index, cap) of the slot held for ``key``; (0, 1) when none is held (fetch everything)."""
        with self._mu:
            slot = self._held.get(key)
        return (getattr(slot, "index", 0), self.slots.cap) if slot is not None else (0, 1)

    def held(self) -> list[str]:
        with self._mu:
            return sorted(self._held)


class SlottedSource:
    """An origin source whose fetch runs only where the gate allows it; metadata calls pass through.

    With a peer service, a slot holder shares every file as soon as it is verified, reads only its own
    stripe of the model from the origin (``core.torrent.stripe``: holder ``j`` of ``k`` takes the
    ``j``-th contiguous share of the files, by path) and takes the other stripes from the other holders;
    what none of them delivers (a holder died, peers failed) it reads from the origin after all.
    """

    def __init__(self, inner: Source, gate: OriginGate, peers: PeerService | None = None) -> None:
        self.inner = inner
        self.gate = gate
        self.peers = peers
        self.kind = inner.kind
        self._bad: set[str] = set()  # slot keys whose fetch already failed a digest once (fill_model retries once)

    @property
    def label(self) -> str:
        return self.inner.label

    def resolve(self, repo: str, revision: str, files: FileFilter) -> ModelPlan:
        try:
            return self.inner.resolve(repo, revision, files)
        except Exception:
            self.gate.release_repo(repo)  # not filling from here after all: let another node take the slot
            raise

    def fetch(self, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill, progress: Progress) -> None:
        key = slot_key(plan.repo, plan.commit)
        decision = self.gate.decision(key)
        if decision == "denied":
            raise TransientSourceError(
                f"{self.label}: the {self.gate.slots.cap} origin slot(s) for {key[:80]} are held by other nodes; "
                "this node fills from peers once one of them seeds")
        try:
            if self.peers is None or decision != "held":
                self.inner.fetch(plan, entries, fill, progress)
            else:
                self._fetch_as_holder(plan, entries, fill, progress, key)
            self._bad.discard(key)
        except IntegrityError:
            # fill_model fetches once more at once: keep the slot (and this holder's stripe) for that retry,
            # or the retry would read the other stripes from the origin without one; give it up after a second.
            if key in self._bad or decision != "held":
                self._bad.discard(key)
                self.gate.release(key)
            else:
                self._bad.add(key)
            raise
        except BaseException:
            self._bad.discard(key)
            self.gate.release(key)
            raise

    def _fetch_as_holder(self, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill, progress: Progress,
                         key: str) -> None:
        from agent.sources.peers.service import Swarm

        assert self.peers is not None
        try:
            swarm = Swarm.of(plan.repo, plan.commit, plan.files)
        except TorrentError:  # a file without a trusted digest: nothing can be shared, fill it all here
            self.inner.fetch(plan, entries, fill, progress)
            return
        self.peers.share_fill(fill)
        j, k = self.gate.stripe(key)
        # Ownership over the plan's whole file list, which every holder derives alike; what this fill needs
        # (files reused or resumed here are not) is then cut from each part. Empty files cost nothing: ours.
        mine, others = stripe([ft.entry for ft in swarm.files], j, k)
        needed = {e.path: e for e in entries}
        own = [needed[e.path] for e in mine if e.path in needed] + [e for e in entries if e.size == 0]
        rest = [needed[e.path] for e in others if e.path in needed]
        log.info("peers.origin_stripe", repo=plan.repo, commit=plan.commit[:12], slot=j, slots=k,
                 files=len(own), others=len(rest))
        for batch in share_batches(own):  # big files one at a time: each is shared as soon as it can be
            self.inner.fetch(plan, batch, fill, progress)
        if not rest:
            return
        keys = {ft.entry.path: ft.key for ft in swarm.files}
        listed = set(self.peers.find_files(swarm)) & {keys.get(e.path) for e in rest}
        if not listed and not self.gate.others_filling(key):
            for batch in share_batches(rest):  # alone after all: nobody else will bring the rest
                self.inner.fetch(plan, batch, fill, progress)
            return
        try:
            self.peers.download(swarm, plan, rest, fill, progress, alive=lambda: self.gate.others_filling(key))
        except (SourceError, IntegrityError) as err:  # not a full disk, not Cancelled: those end the fill
            left = [e for e in rest if e.path not in fill.done_paths()]
            log.info("peers.stripe_fallback", repo=plan.repo, commit=plan.commit[:12], files=len(left), error=str(err))
            self.inner.fetch(plan, left, fill, progress)

    def with_subpath(self, subpath: str | None) -> SlottedSource:
        """A PVC origin looking in a model's ``pvcSubpath`` (factory.for_model), still gated."""
        inner = getattr(self.inner, "with_subpath", None)
        return SlottedSource(inner(subpath), self.gate, self.peers) if inner is not None else self

    def close(self) -> None:
        self.inner.close()
