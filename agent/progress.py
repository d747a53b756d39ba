"""Fill progress for people: a tqdm bar on a TTY, periodic structured log lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import structlog


class LogProgress:
    """Logs bytes, rate and ETA every ``interval`` seconds; thread-safe."""

    def __init__(self, name: str, interval: float = 5.0) -> None:
        self.name = name
        self.interval = interval
        self.done = 0
        self.total = 0
        self._t0 = self._last = time.monotonic()
        self._mu = threading.Lock()
        self._log = structlog.get_logger("agent.progress")

    def start(self, total_bytes: int, files: int) -> None:
        self.total = total_bytes
        self._t0 = self._last = time.monotonic()

    def advance(self, nbytes: int) -> None:
        with self._mu:
            self.done += nbytes
            now = time.monotonic()
            if now - self._last < self.interval:
                return
            self._last = now
        self._emit(now)

    def _emit(self, now: float) -> None:
        rate = self.done / max(now - self._t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else None
        self._log.info("fill.progress", model=self.name, bytes=self.done, total=self.total,
                       rate_mib_s=round(rate / 2**20, 1), eta_s=None if eta is None else round(eta, 1))

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar (bytes, rate, ETA) on stderr."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._bar: Any = None
        self._mu = threading.Lock()

    def start(self, total_bytes: int, files: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=f"{self.name} ({files} files)", file=sys.stderr)

    def advance(self, nbytes: int) -> None:
        with self._mu:
            if self._bar is not None:
                self._bar.update(nbytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def for_terminal(name: str) -> BarProgress | LogProgress:
    return BarProgress(name) if sys.stderr.isatty() else LogProgress(name)
