"""The keyed work queue: client-go semantics (dirty, processing, re-run after done), priority, cancel."""

from __future__ import annotations

import threading

from agent.runtime.workqueue import Workers, WorkQueue


def test_a_key_waits_once_with_its_latest_payload() -> None:
    q: WorkQueue[str, int] = WorkQueue()
    q.add("a", 1)
    q.add("a", 2)
    q.add("b", 3)
    assert q.get(0) is not None and q.get(0) is not None
    assert q.get(0) is None  # "a" was queued once, with payload 2 (checked below)


def test_latest_payload_wins() -> None:
    q: WorkQueue[str, int] = WorkQueue()
    q.add("a", 1)
    q.add("a", 2)
    item = q.get(0)
    assert item is not None and item[:2] == ("a", 2)


def test_added_while_processing_runs_again_after_done_never_twice_at_once() -> None:
    q: WorkQueue[str, int] = WorkQueue()
    q.add("a", 1)
    item = q.get(0)
    assert item is not None
    q.add("a", 2)
    assert q.get(0) is None  # not handed to a second worker while the first runs
    assert q.busy() == {"a"}
    q.done("a")
    again = q.get(0)
    assert again is not None and again[:2] == ("a", 2)
    q.done("a")
    assert q.idle()


def test_priority_then_first_come() -> None:
    q: WorkQueue[str, None] = WorkQueue()
    for key, prio in [("low", 1), ("high", 500), ("mid", 100), ("high2", 500)]:
        q.add(key, None, priority=prio)
    order = []
    while (item := q.get(0)) is not None:
        order.append(item[0])
        q.done(item[0])
    assert order == ["high", "high2", "mid", "low"]


def test_cancel_drops_queued_and_signals_running() -> None:
    q: WorkQueue[str, int] = WorkQueue()
    q.add("run", 1)
    q.add("wait", 2)
    running = q.get(0)
    assert running is not None and running[0] == "run"
    assert q.cancel("wait") is False and q.get(0) is None  # queued work is gone
    assert q.cancel("run") is True and running[2].is_set()  # the running one is told to stop
    q.done("run")
    assert q.idle()


def test_removed_then_added_back_while_queued_is_processed_once() -> None:
    """Bug 4 of issue 9: with one worker, b queued behind a, removed, then added back: b must run."""
    q: WorkQueue[str, str] = WorkQueue()
    seen: list[str] = []
    gate = threading.Event()

    def handler(key: str, payload: str, cancel: threading.Event) -> None:
        if key == "a":
            gate.wait(5)
        seen.append(key)

    Workers(q, handler, 1).start()
    q.add("a", "a")
    q.add("b", "b")
    q.cancel("b")
    q.add("b", "b")
    gate.set()
    assert q.wait_idle(5)
    assert seen == ["a", "b"]


def test_worker_survives_a_crashing_handler() -> None:
    q: WorkQueue[str, int] = WorkQueue()
    seen: list[str] = []

    def handler(key: str, payload: int, cancel: threading.Event) -> None:
        if key == "boom":
            raise RuntimeError("bug")
        seen.append(key)

    w = Workers(q, handler, 1).start()
    q.add("boom", 0)
    q.add("ok", 0)
    assert q.wait_idle(5) and seen == ["ok"] and w.alive()
    q.close()
    assert w.join(5)
