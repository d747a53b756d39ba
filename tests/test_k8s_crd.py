"""CachedModelWatcher, revision pin and conditions against the emulated API server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.errors import KubeApiError
from agent.k8s.client import Backoff, KubeApi, make_api
from agent.k8s.crd import (
    GROUP,
    CachedModelObj,
    CachedModelWatcher,
    get_cached_model,
    parse_cached_model,
    pin_revision,
    set_condition,
)
from tests.peers.kube_emulator import KubeEmulator

FAST = Backoff(initial=0.05, maximum=0.3, jitter=0.0, attempts=4)
C1, C2 = "1" * 40, "2" * 40


def cm(name: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"repo": "Qwen/Qwen3-0.6B", "revision": "main", **spec}}


class Recorder:
    """The loop's side: keeps every snapshot it was handed."""

    def __init__(self) -> None:
        self.snaps: list[dict[str, CachedModelObj]] = []
        self.lock = threading.Lock()

    def __call__(self, snap: dict[str, CachedModelObj]) -> None:
        with self.lock:
            self.snaps.append(snap)

    @property
    def last(self) -> dict[str, CachedModelObj]:
        with self.lock:
            return self.snaps[-1] if self.snaps else {}


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    with KubeEmulator(bookmark_interval=0.2) as emu:
        yield emu


@pytest.fixture
def watching(kube: KubeEmulator, api: KubeApi) -> Iterator[tuple[CachedModelWatcher, Recorder]]:
    stop = threading.Event()
    rec = Recorder()
    watcher = CachedModelWatcher(api, rec, stop=stop, backoff=FAST, resync=300.0, watch_timeout=30.0)
    thread = watcher.start()
    yield watcher, rec
    stop.set()
    thread.join(5)
    assert not thread.is_alive(), "watcher did not stop promptly"


def create(kube: KubeEmulator, obj: dict[str, Any]) -> dict[str, Any]:
    return kube.create("cachedmodels", obj, group=GROUP)


def lists(kube: KubeEmulator) -> int:
    return len([r for r in kube.requests_matching("GET", "/cachedmodels$") if r.query.get("watch") != "true"])


def test_list_then_watch_hands_full_snapshots(kube: KubeEmulator, watching: tuple) -> None:
    watcher, rec = watching
    create(kube, cm("a"))
    assert kube.wait_for(lambda: set(rec.last) == {"a"})
    create(kube, cm("b", revision=C1))
    assert kube.wait_for(lambda: set(rec.last) == {"a", "b"})  # the whole set, not a delta
    kube.patch("cachedmodels", "a", {"spec": {"priority": 5}}, group=GROUP)
    assert kube.wait_for(lambda: rec.last["a"].spec is not None and rec.last["a"].spec.priority == 5)
    assert rec.last["a"].generation == 2
    kube.delete("cachedmodels", "b", group=GROUP)
    assert kube.wait_for(lambda: set(rec.last) == {"a"})
    assert watcher.lists == 1
    watches = [r for r in kube.requests_matching("GET", "/cachedmodels$") if r.query.get("watch") == "true"]
    assert watches[0].query["allowWatchBookmarks"] == "true"
    assert watches[0].query["resourceVersion"]  # from the list, not a fresh replay


def test_existing_objects_and_spec_errors_are_in_first_snapshot(kube: KubeEmulator, api: KubeApi) -> None:
    create(kube, cm("good", nodeSelector={"matchLabels": {"gpu": "true"}}))
    create(kube, cm("bad-op", nodeSelector={"matchExpressions": [{"key": "gpu", "operator": "Equals"}]}))
    create(kube, cm("bad-repo", repo="not a repo"))
    rec = Recorder()
    stop = threading.Event()
    watcher = CachedModelWatcher(api, rec, stop=stop, backoff=FAST)
    thread = watcher.start()
    try:
        assert watcher.synced.wait(5)
        snap = rec.snaps[0]
        assert snap["good"].ok and snap["good"].spec is not None
        assert snap["good"].spec.node_selector == {"matchLabels": {"gpu": "true"}}
        assert snap["bad-op"].spec is None and snap["bad-op"].error is not None
        assert snap["bad-op"].error.field == "spec.nodeSelector.matchExpressions[0].operator"
        assert snap["bad-repo"].error is not None and snap["bad-repo"].error.field == "spec.repo"
    finally:
        stop.set()
        thread.join(5)


def test_dropped_watch_reconnects_from_last_version(kube: KubeEmulator, watching: tuple) -> None:
    watcher, rec = watching
    create(kube, cm("a"))
    assert kube.wait_for(lambda: "a" in rec.last)
    assert kube.wait_for(lambda: kube.watch_count == 1)
    assert kube.drop_watches(abrupt=True) == 1
    create(kube, cm("b"))  # happens while no watch is open: must still be seen
    assert kube.wait_for(lambda: set(rec.last) == {"a", "b"})
    assert watcher.lists == 1  # resumed from the resourceVersion, no relist needed
    watches = [r for r in kube.requests_matching("GET", "/cachedmodels$") if r.query.get("watch") == "true"]
    assert len(watches) >= 2


def test_relist_on_410_gone(kube: KubeEmulator, watching: tuple) -> None:
    watcher, rec = watching
    create(kube, cm("a"))
    assert kube.wait_for(lambda: "a" in rec.last)
    # The API server goes away; meanwhile things change and etcd history is compacted, so the
    # watcher's resourceVersion is too old when it comes back.
    kube.outage(1.0, mode="503")
    kube.delete("cachedmodels", "a", group=GROUP)
    create(kube, cm("c"))
    kube.compact()
    assert kube.wait_for(lambda: set(rec.last) == {"c"}, timeout=5)
    assert watcher.lists == 2


def test_relist_on_410_gone_deterministic(kube: KubeEmulator, api: KubeApi) -> None:
    """run_once step by step: a watch from a compacted version gets 410 and the next step relists."""
    rec = Recorder()
    watcher = CachedModelWatcher(api, rec, stop=threading.Event(), backoff=FAST, watch_timeout=1)
    create(kube, cm("a"))
    watcher.run_once()  # list + a 1 s watch
    assert watcher.lists == 1
    kube.delete("cachedmodels", "a", group=GROUP)
    create(kube, cm("b"))
    kube.compact()
    kube.create_node("n1")  # moves the global version past the watcher's
    kube.compact()
    watcher._rv = "1"  # as if the watcher had been disconnected for a long time
    watcher.run_once()  # watch -> 410 Expired -> marks relist
    assert watcher.lists == 1 and watcher._need_list
    watcher.run_once()  # relist
    assert watcher.lists == 2
    assert set(rec.last) == {"b"}
    assert lists(kube) == 2


def test_bookmarks_advance_the_version_so_no_relist_is_needed(kube: KubeEmulator, api: KubeApi) -> None:
    rec = Recorder()
    watcher = CachedModelWatcher(api, rec, stop=threading.Event(), backoff=FAST, watch_timeout=1)
    create(kube, cm("a"))
    kube.create_node("n0")
    watcher.run_once()
    listed_rv = watcher._rv
    for i in range(5):
        kube.create_node(f"n{i + 1}")  # other resources move the global resourceVersion
    watcher.run_once()  # a quiet watch: only bookmarks arrive
    assert int(watcher._rv or 0) > int(listed_rv or 0)
    kube.compact()
    watcher.run_once()
    assert watcher.lists == 1  # without bookmark handling this watch would be 410 and relist


def test_periodic_resync_relists_and_hands_the_full_set_again(kube: KubeEmulator, api: KubeApi) -> None:
    now = [0.0]
    rec = Recorder()
    watcher = CachedModelWatcher(
        api, rec, stop=threading.Event(), backoff=FAST, resync=10.0, watch_timeout=1, clock=lambda: now[0]
    )
    create(kube, cm("a"))
    watcher.run_once()
    watcher.run_once()
    assert watcher.lists == 1
    now[0] += 11
    watcher.run_once()
    assert watcher.lists == 2
    assert [set(s) for s in rec.snaps] == [{"a"}, {"a"}]  # level-triggered: the loop re-checks everything


def test_list_errors_back_off_and_recover(kube: KubeEmulator, api: KubeApi) -> None:
    create(kube, cm("a"))
    kube.fail_next("GET", "/cachedmodels$", 500, count=3)
    rec = Recorder()
    stop = threading.Event()
    watcher = CachedModelWatcher(api, rec, stop=stop, backoff=FAST)
    thread = watcher.start()
    try:
        assert watcher.synced.wait(5)
        assert set(rec.last) == {"a"}
        assert [r.status for r in kube.requests_matching("GET", "/cachedmodels$")][:4] == [500, 500, 500, 200]
    finally:
        stop.set()
        thread.join(5)


def test_watch_survives_outage_and_sees_changes_after(kube: KubeEmulator, watching: tuple) -> None:
    _watcher, rec = watching
    create(kube, cm("a"))
    assert kube.wait_for(lambda: "a" in rec.last)
    kube.outage(2.0)
    time.sleep(0.5)
    assert set(rec.last) == {"a"}  # the last known set is kept through the outage
    kube.wait_for(lambda: not kube.in_outage(), timeout=5)
    create(kube, cm("b"))
    assert kube.wait_for(lambda: set(rec.last) == {"a", "b"}, timeout=5)


def test_pin_race_between_two_agents_ends_on_one_commit(kube: KubeEmulator) -> None:
    create(kube, cm("qwen"))
    rv = parse_cached_model(kube.get("cachedmodels", "qwen", group=GROUP) or {}).resource_version
    apis = [make_api(kube.url, request_timeout=2.0) for _ in range(2)]
    barrier = threading.Barrier(2)
    results: dict[int, str] = {}

    def agent(i: int, commit: str) -> None:
        barrier.wait()
        results[i] = pin_revision(apis[i], "qwen", commit, rv, revision="main", backoff=FAST)

    threads = [threading.Thread(target=agent, args=(i, c)) for i, c in enumerate((C1, C2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for a in apis:
        a.close()
    obj = kube.get("cachedmodels", "qwen", group=GROUP) or {}
    assert results[0] == results[1] == obj["status"]["resolvedRevision"]
    assert obj["status"]["resolvedFrom"] == "main"
    statuses = sorted(r.status for r in kube.requests_matching("PATCH", "/cachedmodels/qwen/status$"))
    assert statuses == [200, 409]  # exactly one write landed; the loser adopted it
    assert parse_cached_model(obj).resolved_revision == results[0]


def test_pin_retries_when_only_something_else_changed(kube: KubeEmulator, api: KubeApi) -> None:
    create(kube, cm("qwen"))
    rv = (kube.get("cachedmodels", "qwen", group=GROUP) or {})["metadata"]["resourceVersion"]
    kube.patch("cachedmodels", "qwen", {"metadata": {"annotations": {"x": "y"}}}, group=GROUP)  # rv moves on
    assert pin_revision(api, "qwen", C1, rv, revision="main", backoff=FAST) == C1
    assert get_cached_model(api, "qwen")["status"]["resolvedRevision"] == C1


def test_pin_for_an_older_revision_is_replaced(kube: KubeEmulator, api: KubeApi) -> None:
    create(kube, cm("qwen", revision="v2"))
    rv = get_cached_model(api, "qwen")["metadata"]["resourceVersion"]
    # A pin left from when the spec said 'main' does not apply to 'v2'...
    kube.patch(
        "cachedmodels",
        "qwen",
        {"status": {"resolvedRevision": C1, "resolvedFrom": "main"}},
        group=GROUP,
        subresource="status",
    )
    assert parse_cached_model(kube.get("cachedmodels", "qwen", group=GROUP) or {}).resolved_revision is None
    # ...so after the 409 the agent pins v2 on the new version instead of adopting it.
    assert pin_revision(api, "qwen", C2, rv, revision="v2", backoff=FAST) == C2
    assert parse_cached_model(get_cached_model(api, "qwen")).resolved_revision == C2
    statuses = [r.status for r in kube.requests_matching("PATCH", "/cachedmodels/qwen/status$")]
    assert statuses == [409, 200]


def test_pin_transient_errors_are_retried(kube: KubeEmulator, api: KubeApi) -> None:
    create(kube, cm("qwen"))
    rv = (kube.get("cachedmodels", "qwen", group=GROUP) or {})["metadata"]["resourceVersion"]
    kube.fail_next("PATCH", "/status$", 503, count=2)
    assert pin_revision(api, "qwen", C1, rv, revision="main", backoff=FAST) == C1


def test_set_condition_names_field_and_skips_identical_writes(kube: KubeEmulator, api: KubeApi) -> None:
    create(kube, cm("bad", nodeSelector={"matchExpressions": [{"key": "k", "operator": "Bogus"}]}))
    obj = parse_cached_model(get_cached_model(api, "bad"))
    assert obj.error is not None
    msg = str(obj.error)
    assert set_condition(api, "bad", "SpecValid", "False", "InvalidSpec", msg, observed_generation=obj.generation)
    cond = get_cached_model(api, "bad")["status"]["conditions"]
    assert cond[0]["type"] == "SpecValid" and cond[0]["status"] == "False"
    assert "spec.nodeSelector.matchExpressions[0].operator" in cond[0]["message"]
    # 100 agents report the same problem: only the first writes.
    writes = len(kube.requests_matching("PATCH", "/cachedmodels/bad/status$"))
    assert not set_condition(api, "bad", "SpecValid", "False", "InvalidSpec", msg, observed_generation=obj.generation)
    assert len(kube.requests_matching("PATCH", "/cachedmodels/bad/status$")) == writes
    # A conflicting writer in between: re-read and write again on the new version.
    kube.fail_next("PATCH", "/cachedmodels/bad/status$", 409)
    assert set_condition(api, "bad", "SpecValid", "True", "Valid", "ok", observed_generation=obj.generation)
    cond = get_cached_model(api, "bad")["status"]["conditions"]
    assert [(c["type"], c["status"]) for c in cond] == [("SpecValid", "True")]


def test_condition_keeps_pin_and_pin_keeps_conditions(kube: KubeEmulator, api: KubeApi) -> None:
    create(kube, cm("qwen"))
    set_condition(api, "qwen", "Ready", "False", "Filling", "0/3 nodes")
    rv = get_cached_model(api, "qwen")["metadata"]["resourceVersion"]
    pin_revision(api, "qwen", C1, rv, revision="main", backoff=FAST)
    status = get_cached_model(api, "qwen")["status"]
    assert status["resolvedRevision"] == C1 and status["conditions"][0]["reason"] == "Filling"


def test_permanent_error_surfaces_from_pin(kube: KubeEmulator, api: KubeApi) -> None:
    with pytest.raises(KubeApiError) as e:
        pin_revision(api, "missing", C1, "1", backoff=FAST)
    assert e.value.status == 404 and e.value.permanent
