"""The one retry helper: classified, bounded, jittered, Retry-After honoured, stop-aware, progress resets."""

from __future__ import annotations

import random
import threading

import pytest

from agent.core.retry import RetryPolicy, fight_pause, retry_call
from agent.errors import NotFoundError, TransientSourceError


class Flaky:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "ok"


def test_transient_errors_are_retried_with_policy_delays() -> None:
    waits: list[float] = []
    fn = Flaky([TransientSourceError("a"), TransientSourceError("b")])
    pol = RetryPolicy(attempts=5, base=1.0, factor=2.0, cap=10.0, jitter=0.0)
    assert retry_call(fn, policy=pol, what="x", wait=lambda s: waits.append(s) or False) == "ok"
    assert fn.calls == 3 and waits == [1.0, 2.0]


def test_permanent_error_is_raised_at_once() -> None:
    fn = Flaky([NotFoundError("gone")])
    with pytest.raises(NotFoundError):
        retry_call(fn, policy=RetryPolicy(), what="x", wait=lambda s: pytest.fail("must not wait"))
    assert fn.calls == 1


def test_attempts_bound_and_last_error_raised() -> None:
    fn = Flaky([TransientSourceError(str(i)) for i in range(10)])
    with pytest.raises(TransientSourceError, match=r"^2$"):
        retry_call(fn, policy=RetryPolicy(attempts=3, jitter=0), what="x", wait=lambda s: False)
    assert fn.calls == 3


def test_retry_after_wins_and_is_capped() -> None:
    waits: list[float] = []
    fn = Flaky([TransientSourceError("slow", retry_after=7.0), TransientSourceError("slower", retry_after=9999)])
    pol = RetryPolicy(base=0.1, jitter=0, max_retry_after=60)
    retry_call(fn, policy=pol, what="x", wait=lambda s: waits.append(s) or False)
    assert waits == [7.0, 60.0]


def test_stop_interrupts_the_wait_and_raises_the_error() -> None:
    stop = threading.Event()
    fn = Flaky([TransientSourceError("x", retry_after=300)] * 3)

    def wait(s: float) -> bool:
        stop.set()
        return True

    with pytest.raises(TransientSourceError):
        retry_call(fn, policy=RetryPolicy(), what="x", stop=stop, wait=wait)
    assert fn.calls == 1


def test_progress_resets_the_count() -> None:
    fn = Flaky([TransientSourceError(str(i)) for i in range(6)])
    retry_call(fn, policy=RetryPolicy(attempts=2, jitter=0), what="x", progressed=lambda: True, wait=lambda s: False)
    assert fn.calls == 7


def test_classify_maps_library_errors_and_chains() -> None:
    def boom() -> None:
        raise ConnectionResetError("reset")

    with pytest.raises(NotFoundError) as ei:
        retry_call(boom, policy=RetryPolicy(), what="x", classify=lambda e: NotFoundError(str(e)))
    assert isinstance(ei.value.__cause__, ConnectionResetError)


def test_jitter_spreads_delays_within_bounds() -> None:
    pol = RetryPolicy(base=10, cap=10, jitter=0.2)
    rng = random.Random(1)
    ds = [pol.delay(1, rng) for _ in range(200)]
    assert min(ds) >= 8 and max(ds) <= 12 and max(ds) - min(ds) > 2


@pytest.mark.parametrize("field", ["base", "cap", "jitter", "factor"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_policy_rejects_non_finite_and_negative(field: str, bad: float) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**{field: bad})


def test_a_fight_over_a_write_backs_off_1_2_4_seconds_up_to_the_window() -> None:
    assert fight_pause([], 100.0, 60.0) == 0.0
    assert fight_pause([99.0, 99.5], 100.0, 60.0) == 0.0  # two repairs: a person, not a fight
    assert fight_pause([98.0, 99.0, 99.5], 100.0, 60.0) == pytest.approx(0.5)  # third: 1 s after the last
    assert fight_pause([97.0, 98.0, 99.0, 99.5], 100.0, 60.0) == pytest.approx(1.5)  # then 2 s
    assert fight_pause([97.0, 98.0, 99.0, 99.5], 102.0, 60.0) == 0.0  # that much has passed already
    many = [float(t) for t in range(50, 60)]  # ten in a row: 2**7 s, capped at the 60 s window
    assert fight_pause(many, 60.0, 60.0) == pytest.approx(59.0)  # last at 59, + 60, now 60
    assert fight_pause([0.0, 1.0, 2.0], 70.0, 60.0) == 0.0  # old repairs fall out of the window
