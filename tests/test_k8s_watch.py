"""The one list+watch helper (Reflector) against the emulated API server: versions, bookmarks, 410, faults."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.core.retry import RetryPolicy
from agent.k8s.client import KubeApi
from agent.k8s.crd import GROUP, PLURAL, VERSION, CachedModelObj, parse_cached_model
from agent.k8s.watch import Reflector, WatchSettings, WatchTarget
from tests.peers.kube_emulator import KubeEmulator, Rule

FAST = WatchSettings(timeout=30, backoff=RetryPolicy(attempts=1000, base=0.05, cap=0.3, jitter=0.0),
                     relist_jitter=0.05)
SHORT = WatchSettings(timeout=1, backoff=FAST.backoff, relist_jitter=0.0)


def cm(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"repo": "Qwen/Qwen3-0.6B", "revision": "main", **spec}}


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator(bookmark_interval=0.2) as emu:
        yield emu


def crs(api: KubeApi, stop: threading.Event, settings: WatchSettings = FAST, **kw: Any) -> Reflector[CachedModelObj]:
    target = WatchTarget("cachedmodels", api.custom.list_cluster_custom_object, (GROUP, VERSION, PLURAL),
                         need="list, watch cachedmodels")
    return Reflector(api, target, parse_cached_model, stop=stop, settings=settings, **kw)


def create(kube: KubeEmulator, obj: dict[str, Any]) -> None:
    kube.create("cachedmodels", obj, group=GROUP)


def lists(kube: KubeEmulator) -> int:
    return kube.counts()[("list", "cachedmodels")]


def test_list_then_watch_from_the_lists_version(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    changes: list[int] = []
    r = crs(api, stop, on_change=lambda: changes.append(1))
    thread = r.start()
    assert r.synced.wait(5)
    create(kube, cm("a"))
    assert kube.wait_for(lambda: set(r.items()) == {"a"})
    create(kube, cm("b", revision="1" * 40))
    kube.patch("cachedmodels", "a", {"spec": {"priority": 5}}, group=GROUP)
    assert kube.wait_for(lambda: (s := r.get("a")) is not None and s.spec is not None and s.spec.priority == 5)
    kube.delete("cachedmodels", "b", group=GROUP)
    assert kube.wait_for(lambda: set(r.items()) == {"a"})
    assert r.stats["lists"] == 1 and lists(kube) == 1
    watch = next(q for q in kube.requests if q.verb == "watch")
    assert watch.query["allowWatchBookmarks"] == "true"
    assert watch.query["resourceVersion"]  # from the list, not a replay of everything
    assert 30 <= int(watch.query["timeoutSeconds"]) < 60  # [timeout, 2*timeout): fleets do not reconnect in step
    assert len(changes) == 1 + 4  # the list, then each change
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def test_dropped_watch_resumes_from_its_version_without_relisting(kube: KubeEmulator, api: KubeApi,
                                                                  stop: threading.Event) -> None:
    r = crs(api, stop)
    r.start()
    create(kube, cm("a"))
    assert kube.wait_for(lambda: "a" in r.items())
    assert kube.wait_for(lambda: kube.watch_count == 1)
    assert kube.drop_watches(abrupt=True) == 1
    create(kube, cm("b"))  # happens while no watch is open: must still be seen
    assert kube.wait_for(lambda: set(r.items()) == {"a", "b"})
    assert lists(kube) == 1
    assert kube.counts()[("watch", "cachedmodels")] >= 2


def test_a_watch_dropped_every_few_hundred_ms_loses_nothing_and_never_relists(
        kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    r = crs(api, stop)
    r.start()
    assert r.synced.wait(5)
    kube.drop_watches_every(0.3, jitter=0.1)
    try:
        for i in range(12):
            create(kube, cm(f"m{i}"))
            if i % 3 == 0:
                kube.delete("cachedmodels", f"m{i}", group=GROUP)
            time.sleep(0.1)
        want = {f"m{i}" for i in range(12) if i % 3}
        assert kube.wait_for(lambda: set(r.items()) == want, timeout=10)
    finally:
        kube.stop_dropping()
    assert r.stats["cut"] >= 2  # it was dropped, and resumed each time...
    assert lists(kube) == 1  # ...from its resourceVersion: no relist, no backoff growth
    assert r.stats["failures"] == 0


def test_expired_version_relists_deterministically(kube: KubeEmulator, api: KubeApi) -> None:
    """run_once step by step: a watch from a compacted version gets 410 and the next step relists."""
    r = crs(api, threading.Event(), SHORT)
    create(kube, cm("a"))
    r.run_once()  # list + a 1 s watch
    kube.delete("cachedmodels", "a", group=GROUP)
    create(kube, cm("b"))
    kube.compact()
    r._rv = "1"  # as if disconnected for a long time
    with capture_logs() as logs:
        r.run_once()  # watch -> 410 Expired -> marks relist
    assert [e["event"] for e in logs if e["event"].startswith("watch.")] == ["watch.expired"]
    assert r.stats["lists"] == 1 and r.stats["expired"] == 1
    r.run_once()  # relist
    assert r.stats["lists"] == 2 and set(r.items()) == {"b"}


def test_bookmarks_advance_the_version_so_no_relist_is_needed(kube: KubeEmulator, api: KubeApi) -> None:
    r = crs(api, threading.Event(), SHORT)
    create(kube, cm("a"))
    kube.create_node("n0")
    r.run_once()
    listed = int(r.resource_version or 0)
    for i in range(5):
        kube.create_node(f"n{i + 1}")  # other resources move the global resourceVersion
    r.run_once()  # a quiet watch: only bookmarks arrive
    assert int(r.resource_version or 0) > listed and r.stats["bookmarks"] > 0
    kube.compact()
    r.run_once()
    assert r.stats["lists"] == 1  # without bookmark handling this watch would be 410 and relist


def test_lists_are_paged(kube: KubeEmulator, api: KubeApi) -> None:
    for i in range(5):
        create(kube, cm(f"m{i}"))
    r = crs(api, threading.Event(), WatchSettings(timeout=1, page=2, backoff=FAST.backoff))
    r._list()
    assert set(r.items()) == {f"m{i}" for i in range(5)}
    pages = [q for q in kube.requests if q.verb == "list"]
    assert [q.query.get("limit") for q in pages] == ["2", "2", "2"] and "continue" in pages[1].query


def test_field_selector_keeps_one_object_and_leaving_the_selection_is_a_delete(
        kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    kube.create_node("gpu-1", {"pool": "a"})
    kube.create_node("gpu-2", {"pool": "a"})
    target = WatchTarget("pool a", api.core.list_node, label_selector="pool=a")
    r: Reflector[dict] = Reflector(api, target, lambda o: dict(o["metadata"]["labels"]), stop=stop, settings=FAST)
    r.start()
    assert kube.wait_for(lambda: set(r.items()) == {"gpu-1", "gpu-2"})
    kube.patch("nodes", "gpu-2", {"metadata": {"labels": {"pool": "b"}}})
    assert kube.wait_for(lambda: set(r.items()) == {"gpu-1"})
    kube.patch("nodes", "gpu-2", {"metadata": {"labels": {"pool": "a", "x": "1"}}})
    assert kube.wait_for(lambda: r.get("gpu-2") == {"pool": "a", "x": "1"})
    assert lists(kube) == 0 and kube.counts()[("list", "nodes")] == 1


def test_a_change_the_projection_does_not_see_calls_nobody(kube: KubeEmulator, api: KubeApi,
                                                           stop: threading.Event) -> None:
    kube.create_node("gpu-1", {"a": "1"})
    calls: list[int] = []
    target = WatchTarget("node gpu-1", api.core.list_node, field_selector="metadata.name=gpu-1")
    r: Reflector[dict] = Reflector(api, target, lambda o: dict(o["metadata"]["labels"]), stop=stop, settings=FAST,
                                   on_change=lambda: calls.append(1))
    r.start()
    assert r.synced.wait(5)
    for i in range(5):  # kubelet's status updates, a taint, an annotation: not what we watch for
        kube.patch("nodes", "gpu-1", {"metadata": {"annotations": {"beat": str(i)}}})
    kube.patch("nodes", "gpu-1", {"metadata": {"labels": {"a": "2"}}})
    assert kube.wait_for(lambda: r.get("gpu-1") == {"a": "2"})
    assert r.stats["events"] == 6 and len(calls) == 2  # the list, and the one label change


def test_forbidden_is_logged_with_the_permission_and_retried_at_the_cap(kube: KubeEmulator, api: KubeApi,
                                                                          stop: threading.Event) -> None:
    kube.rbac = [Rule(frozenset(["modelcache.dev"]), frozenset(["cachedmodels"]), frozenset(["get"]))]
    create(kube, cm("a"))
    r = crs(api, stop)
    with capture_logs() as logs:
        r.start()
        assert kube.wait_for(lambda: any(e["event"] == "watch.forbidden" for e in logs))
        kube.grant("modelcache.dev", "cachedmodels", ["list", "watch"])
        assert kube.wait_for(lambda: "a" in r.items(), timeout=5)
    forbidden = next(e for e in logs if e["event"] == "watch.forbidden")
    assert forbidden["need"] == "list, watch cachedmodels" and "403" in forbidden["error"]
    assert forbidden["retry_in"] == FAST.backoff.cap  # a permanent error is not hammered


def test_list_errors_back_off_and_recover(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    create(kube, cm("a"))
    kube.fail_next("GET", "/cachedmodels$", 500, count=3)
    r = crs(api, stop)
    r.start()
    assert r.synced.wait(5) and set(r.items()) == {"a"}
    assert [q.status for q in kube.requests if q.verb == "list"] == [500, 500, 500, 200]


def test_watch_survives_an_outage_and_sees_changes_after(kube: KubeEmulator, api: KubeApi,
                                                         stop: threading.Event) -> None:
    r = crs(api, stop)
    r.start()
    create(kube, cm("a"))
    assert kube.wait_for(lambda: "a" in r.items())
    kube.outage(1.0)
    assert set(r.items()) == {"a"}  # the last known set is kept through the outage
    kube.wait_for(lambda: not kube.in_outage(), timeout=5)
    create(kube, cm("b"))
    assert kube.wait_for(lambda: set(r.items()) == {"a", "b"}, timeout=5)


def test_stop_cuts_an_open_watch_at_once(kube: KubeEmulator, api: KubeApi) -> None:
    stop = threading.Event()
    r = crs(api, stop, WatchSettings(timeout=300))
    thread = r.start()
    assert kube.wait_for(lambda: kube.watch_count == 1)
    t0 = time.monotonic()
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - t0 < 1.0


def test_a_429_on_the_list_waits_what_retry_after_says(kube: KubeEmulator, api: KubeApi, stop: threading.Event) -> None:
    kube.fail_next("GET", "/cachedmodels$", 429, retry_after=1)
    r = crs(api, stop)  # its own backoff would retry after 50 ms
    r.start()
    assert r.synced.wait(5)
    lists = [q for q in kube.requests if q.verb == "list"]
    assert [q.status for q in lists] == [429, 200] and lists[1].at - lists[0].at >= 0.95
