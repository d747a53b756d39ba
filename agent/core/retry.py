"""One retry helper for every source and the API server: bounded, classified, jittered, stop-aware.

A policy is data (settings carry it); ``retry_call`` runs an operation under it. What is worth
retrying is decided by the error itself (``permanent`` on our error classes, ``retry_after`` when
the server named a wait), so sources and the Kubernetes adapter only translate their library's
exceptions into ours and never write a loop of their own. Waits go through ``wait`` (normally
``stop.wait``), so a SIGTERM never sits out a 300 s Retry-After.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from agent.errors import Cancelled, DiskFullError

log = structlog.get_logger("agent.retry")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the n-th wait is ``base * factor**(n-1)`` capped at ``cap``, +-``jitter``."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    max_retry_after: float = 300.0  # a server's Retry-After is honoured up to this

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        for name in ("base", "cap", "factor", "jitter", "max_retry_after"):
            v = getattr(self, name)
            if not (v == v and 0 <= v < float("inf")):  # rejects nan and inf
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.jitter >= 1:
            raise ValueError(f"jitter must be < 1, got {self.jitter}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Wait after failed try number ``attempt`` (1-based), jittered so a fleet does not retry in step."""
        nominal = min(self.cap, self.base * self.factor ** max(0, attempt - 1))
        return max(0.0, nominal * (1.0 + (rng or random).uniform(-self.jitter, self.jitter)))


def fight_pause(repairs: Sequence[float], now: float, window: float) -> float:
    """Seconds to hold back the next repair when someone keeps undoing ours (repair times, oldest first).

    The first two repairs within ``window`` go out at once (a person fixing a typo); from the third on,
    each waits 1, 2, 4 ... s after the last, up to ``window``, so a fight with another controller costs a
    handful of writes, not one per event.
    """
    recent = [t for t in repairs if now - t < window]
    if len(recent) < 3:
        return 0.0
    return max(0.0, recent[-1] + min(window, 2.0 ** (len(recent) - 3)) - now)


def is_transient(err: BaseException) -> bool:
    """Our error classes say whether trying again can help (``permanent``); anything else is final.

    A stop (``Cancelled``) and a full disk are not transient for a retry loop: waiting a few seconds
    and calling again cannot help either (the loop deals with them: eviction, waiting-for-space).
    """
    if isinstance(err, Cancelled | DiskFullError):
        return False
    return getattr(err, "permanent", True) is False


def retry_call(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    what: str,
    classify: Callable[[BaseException], BaseException] | None = None,
    retryable: Callable[[BaseException], bool] = is_transient,
    progressed: Callable[[], bool] | None = None,
    stop: threading.Event | None = None,
    wait: Callable[[float], bool] | None = None,
    rng: random.Random | None = None,
) -> T:
    """Run ``fn``; retry what ``retryable`` accepts, up to ``policy.attempts`` tries, then raise.

    ``classify`` turns a library exception into ours (raised chained with ``from``). The wait is
    the error's ``retry_after`` when it has one, else the policy's jittered delay. ``progressed``
    (called after a failure) resets the count: a flaky link that keeps delivering bytes is not
    given up on. ``wait(seconds)`` returns True when the caller is stopping (default:
    ``stop.wait``); then the last error is raised at once.
    """
    if wait is None:
        wait = stop.wait if stop is not None else threading.Event().wait
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            err = classify(exc) if classify is not None else exc
            if progressed is not None and progressed():
                attempt = 1
            stopping = stop is not None and stop.is_set()
            if not retryable(err) or attempt >= policy.attempts or stopping:
                if err is exc:
                    raise
                raise err from exc
            after = getattr(err, "retry_after", None)
            pause = min(float(after), policy.max_retry_after) if after is not None else policy.delay(attempt, rng)
            log.warning("retry", what=what, attempt=f"{attempt}/{policy.attempts}", wait=round(pause, 3),
                        error=str(err))
            if wait(pause):
                if err is exc:
                    raise
                raise err from exc
