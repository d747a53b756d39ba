"""Background scrub: re-read every verified file with xxh3-128 (or the Hub digest), paced.

Pacing matters because workers read the same disk: a token-bucket limit in bytes per second keeps
the scrub from starving model loads. A mismatch is handed to the loop as a dirty blob, and the
loop's own check (which re-hashes that blob) unlabels and repairs the model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from agent.cache.inspect import VerifyReport
from agent.cache.store import Store

log = structlog.get_logger("agent.runtime.scrub")


class Pacer:
    """Sleeps just enough that the average rate stays at or below ``rate`` bytes per second."""

    def __init__(self, rate: int, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self._t0 = clock()
        self._bytes = 0

    def __call__(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        self._bytes += nbytes
        ahead = self._bytes / self.rate - (self.clock() - self._t0)
        if ahead > 0:
            self.sleep(ahead)


class Scrubber:
    def __init__(
        self,
        store: Store,
        on_damage: Callable[[str, set[str]], None],
        *,
        rate: int,
        on_bytes: Callable[[int], None] | None = None,
        repos: Callable[[], set[str] | None] = lambda: None,
    ) -> None:
        self.store = store
        self.on_damage = on_damage
        self.rate = rate
        self.on_bytes = on_bytes
        self.repos = repos  # limit to these repos (the desired ones); None = everything
        self.passes = 0

    def scrub_once(self, *, full: bool = False, stop: threading.Event | None = None) -> list[VerifyReport]:
        pacer = Pacer(self.rate)

        def count(n: int) -> None:
            pacer(n)
            if self.on_bytes is not None:
                self.on_bytes(n)

        wanted = self.repos()
        reports = []
        for m in self.store.manifests():
            if stop is not None and stop.is_set():
                break
            if wanted is not None and m.repo not in wanted:
                continue
            rep = self.store.check(m, deep=True, full=full, on_bytes=count)
            reports.append(rep)
            if not rep.ok:
                by = m.by_path()
                blobs = {by[p].digest for p in rep.damaged_paths if p in by}
                log.warning("scrub.mismatch", repo=m.repo, commit=m.commit, problems=rep.problems()[:10])
                self.on_damage(m.repo, blobs)
        self.passes += 1
        return reports

    def run(self, stop: threading.Event, *, interval: float, full_interval: float = 0.0) -> None:
        """xxh3 every ``interval`` seconds; the Hub digest every ``full_interval`` (0 = never)."""
        if interval <= 0 and full_interval <= 0:
            return
        next_quick = time.monotonic() + interval if interval > 0 else float("inf")
        next_full = time.monotonic() + full_interval if full_interval > 0 else float("inf")
        while not stop.wait(max(min(next_quick, next_full) - time.monotonic(), 0.05)):
            now = time.monotonic()
            full = now >= next_full
            try:
                self.scrub_once(full=full, stop=stop)
            except Exception:
                log.exception("scrub.failed")
            if full:
                next_full = now + full_interval
            if now >= next_quick or full:
                next_quick = now + interval if interval > 0 else float("inf")
