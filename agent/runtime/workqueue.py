"""A keyed work queue with client-go's semantics, plus the bounded worker pool that drains it.

- dirty set: a key waits at most once, with the latest payload (adding it again only updates it);
- processing set: a key is never worked on by two workers at once; one added while it is being
  processed runs again right after (so a spec changed mid-fill is filled again, never lost);
- ``cancel``: forget queued work for a key and tell a running worker to stop at its next chunk.

Keys wait in priority order (highest first, then first come): a few important models must not
sit behind a bulk rollout (OME #838). Workers never touch the loop's state: they run the handler
and the handler posts its outcome back to the loop.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger("agent.workqueue")
K = TypeVar("K")
T = TypeVar("T")


class WorkQueue(Generic[K, T]):
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._heap: list[tuple[int, int, K]] = []
        self._queued: dict[K, int] = {}  # key -> sequence number of its live heap entry
        self._dirty: dict[K, tuple[T, int]] = {}  # key -> (latest payload, priority)
        self._processing: dict[K, threading.Event] = {}  # key -> its cancel event
        self._seq = itertools.count()
        self._closed = False

    def add(self, key: K, payload: T, *, priority: int = 0) -> None:
        with self._cv:
            if self._closed:
                return
            self._dirty[key] = (payload, priority)
            if key in self._processing:
                return  # runs again when the current run is done
            self._push(key, priority)

    def _push(self, key: K, priority: int) -> None:
        seq = next(self._seq)
        self._queued[key] = seq
        heapq.heappush(self._heap, (-priority, seq, key))
        self._cv.notify()

    def get(self, timeout: float | None = None) -> tuple[K, T, threading.Event] | None:
        """The next key, its payload and its cancel event; None when closed or on timeout."""
        with self._cv:
            while True:
                while self._heap:
                    _, seq, key = heapq.heappop(self._heap)
                    if self._queued.get(key) != seq:
                        continue  # a stale entry (discarded or re-prioritised)
                    del self._queued[key]
                    payload, _prio = self._dirty.pop(key)
                    cancel = threading.Event()
                    self._processing[key] = cancel
                    return key, payload, cancel
                if self._closed or not self._cv.wait(timeout):
                    return None

    def done(self, key: K) -> None:
        with self._cv:
            self._processing.pop(key, None)
            if key in self._dirty and key not in self._queued and not self._closed:
                self._push(key, self._dirty[key][1])
            self._cv.notify_all()

    def cancel(self, key: K) -> bool:
        """Drop queued work for ``key``; signal a running one to stop. True if it was running."""
        with self._cv:
            self._dirty.pop(key, None)
            self._queued.pop(key, None)
            ev = self._processing.get(key)
            if ev is not None:
                ev.set()
            return ev is not None

    def busy(self) -> frozenset[K]:
        """Keys queued or being processed."""
        with self._cv:
            return frozenset(self._dirty) | frozenset(self._processing)

    def running(self) -> frozenset[K]:
        with self._cv:
            return frozenset(self._processing)

    def idle(self) -> bool:
        with self._cv:
            return not self._dirty and not self._processing

    def close(self) -> None:
        """Stop: queued work is dropped, running work is told to stop, ``get`` returns None from now on."""
        with self._cv:
            self._closed = True
            self._heap.clear()
            self._queued.clear()
            self._dirty.clear()
            for ev in self._processing.values():
                ev.set()
            self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: not self._processing and (self._closed or not self._dirty), timeout)


class Workers(Generic[K, T]):
    """``n`` threads draining a WorkQueue through ``handler(key, payload, cancel)``; a crash is logged."""

    def __init__(self, queue: WorkQueue[K, T], handler: Callable[[K, T, threading.Event], None], n: int,
                 *, name: str = "worker") -> None:
        self.queue = queue
        self.handler = handler
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(n)]

    def start(self) -> Workers[K, T]:
        for t in self._threads:
            t.start()
        return self

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            key, payload, cancel = item
            try:
                self.handler(key, payload, cancel)
            except Exception:  # the handler reports its own failures; this is a bug, keep the worker alive
                log.exception("worker.crashed", key=str(key))
            finally:
                self.queue.done(key)

    def alive(self) -> bool:
        """Every worker thread is running (False before ``start`` too: call it once they should be)."""
        return all(t.is_alive() for t in self._threads)

    def join(self, timeout: float) -> bool:
        for t in self._threads:
            if t.ident is not None:  # never started: nothing to wait for
                t.join(timeout)
        return not any(t.is_alive() for t in self._threads)
