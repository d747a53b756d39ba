"""Small shared rules of the sources: what is retried, how a wait ends, which listings no snapshot can hold."""

from __future__ import annotations

import threading

import pytest

from agent.core.plan import file_folder_conflict
from agent.errors import Cancelled, DiskFullError, NotFoundError, SourceError, TransientSourceError
from agent.sources.base import retryable, stop_wait


@pytest.mark.parametrize(("paths", "clash"), [
    (["conf", "conf/inner.json"], ("conf", "conf/inner.json")),
    (["a/b", "a/b/c/d.json", "x"], ("a/b", "a/b/c/d.json")),
    (["conf.json", "conf/inner.json", "config"], None),
    (["a/b/c", "a/bc", "ab/c"], None),
])
def test_file_folder_conflict(paths: list[str], clash: tuple[str, str] | None) -> None:
    assert file_folder_conflict(paths) == clash


def test_only_a_sources_own_transient_errors_are_retried() -> None:
    assert retryable(TransientSourceError("503"))
    assert retryable(SourceError("server busy", permanent=False))
    assert not retryable(NotFoundError("gone"))
    assert not retryable(DiskFullError("full"))  # not permanent, but the loop (eviction) handles it
    assert not retryable(Cancelled())  # not permanent either: the fill stops, it is not retried here


def test_stop_wait_ends_when_any_event_is_set() -> None:
    a, b = threading.Event(), threading.Event()
    wait = stop_wait(a, b, tick=0.01)
    assert wait(0.0) is False
    b.set()
    assert wait(300.0) is True  # returns at once, not after 300 s
