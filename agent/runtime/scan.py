"""scan(): the disk half of a loop pass, turned into a frozen ``NodeSnapshot`` for the pure plan.

A pass must cost what changed, not what the cache holds: the scanner keeps the last ``ModelDisk``
of every desired model and re-checks only the dirty ones (a fill finished, the watcher saw its
repo change, its spec changed), plus everything once per ``full`` pass (the periodic check).
Manifests and records are re-read only when their file changed (a stat decides).

What "ok" means for one model: its record (the file set it was filled with) exists, every file of
that record is in the snapshot's manifest and passes the stat check (symlink target, blob size,
mtime, inode; blobs the watcher saw change are re-hashed with xxh3), no unknown file sits in the
snapshot tree, and a branch or tag ref still points at the recorded commit.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from agent.cache.manifest import Manifest
from agent.cache.store import Store
from agent.core.desired import DesiredState
from agent.core.snapshot import ModelDisk, ModelRecord, NodeSnapshot, SnapshotOnDisk
from agent.core.spec import is_commit
from agent.errors import CorruptStateError

_StatKey = tuple[int, int, int]


def _stat_key(path: str) -> _StatKey | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass
class Scanner:
    store: Store
    _models: dict[str, ModelDisk] = field(default_factory=dict)
    _manifests: dict[tuple[str, str], tuple[_StatKey, Manifest]] = field(default_factory=dict)
    _records: dict[str, tuple[_StatKey, ModelRecord]] = field(default_factory=dict)
    _snapshots: dict[tuple[str, str], SnapshotOnDisk] = field(default_factory=dict)
    _all_records: dict[str, ModelRecord] = field(default_factory=dict)  # every record on disk, desired or not
    checks: int = 0  # models checked in all (tests and the bench read it: a pass costs what changed)

    def scan(
        self,
        desired: DesiredState,
        *,
        dirty: Collection[str] = (),
        dirty_repos: Mapping[str, Collection[str]] | None = None,
        full: bool = False,
        now: float = 0.0,
    ) -> NodeSnapshot:
        """Re-check the dirty models (all of them with ``full``); ``dirty_repos`` maps repo -> blobs to re-hash."""
        dirty_repos = dirty_repos or {}
        if full:
            self._snapshots = {}
            for repo in self.store.manifest_repos():
                self._refresh_repo_snapshots(repo)
            self._all_records = {r.name: r for r in self.store.records()}
        else:
            for repo in dirty_repos:
                self._refresh_repo_snapshots(repo)
        # Two desired models on one branch may hold different commits (pinned at different times): the
        # branch's ref can name only one of them, which is not damage to the other (else they refill each
        # other forever). What "main" then means to a worker is the most recent fill's commit.
        ref_owners: dict[tuple[str, str], set[str]] = {}
        for name in desired.models:
            r = self._all_records.get(name)
            if r is not None:
                ref_owners.setdefault((r.repo, r.revision), set()).add(r.commit)
        models: dict[str, ModelDisk] = {}
        for name, spec in desired.models.items():
            prev = self._models.get(name)
            if full or prev is None or name in dirty or spec.repo in dirty_repos or \
                    (prev.record is not None and prev.record.repo in dirty_repos):
                prev = self._check(name, dirty_repos, ref_owners)
            models[name] = prev
        self._models = models
        for name, disk in models.items():  # what this pass read: keep the index of every record current
            if disk.record is not None:
                self._all_records[name] = disk.record
            elif disk.problems == ("not cached",):
                self._all_records.pop(name, None)
        return NodeSnapshot(models, tuple(self._snapshots.values()), now, dict(self._all_records),
                            self.store.space.disk_use())

    def forget_repo(self, repo: str) -> None:
        """After our own eviction or quarantine: drop what we remembered of the repo's manifests and records."""
        for key in [k for k in self._manifests if k[0] == repo]:
            del self._manifests[key]
        for name in [n for n, r in self._all_records.items() if r.repo == repo]:
            if not self.store.layout.record_path(name).exists():
                del self._all_records[name]
        self._refresh_repo_snapshots(repo)

    def _refresh_repo_snapshots(self, repo: str) -> None:
        for key in [k for k in self._snapshots if k[0] == repo]:
            del self._snapshots[key]
        try:
            names = os.listdir(self.store.layout.manifest_dir(repo))
        except (FileNotFoundError, NotADirectoryError):
            return
        for n in names:
            if not n.endswith(".json"):
                continue
            try:
                m = self._manifest(repo, n[: -len(".json")])
            except CorruptStateError:
                continue  # reported by the model that needs it; eviction skips what it cannot read
            if m is not None:
                self._snapshots[(m.repo, m.commit)] = _snapshot_of(m)

    def _record(self, name: str) -> ModelRecord | None:
        key = _stat_key(str(self.store.layout.record_path(name)))
        if key is None:
            self._records.pop(name, None)
            return None
        hit = self._records.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        rec = self.store.record(name)  # may raise CorruptStateError
        if rec is not None:
            self._records[name] = (key, rec)
        return rec

    def _manifest(self, repo: str, commit: str) -> Manifest | None:
        key = _stat_key(str(self.store.layout.manifest_path(repo, commit)))
        if key is None:
            self._manifests.pop((repo, commit), None)
            return None
        hit = self._manifests.get((repo, commit))
        if hit is not None and hit[0] == key:
            return hit[1]
        m = self.store.manifest(repo, commit)  # may raise CorruptStateError
        if m is not None:
            self._manifests[(repo, commit)] = (key, m)
        return m

    def _check(self, name: str, dirty_repos: Mapping[str, Collection[str]],
               ref_owners: Mapping[tuple[str, str], set[str]] | None = None) -> ModelDisk:
        self.checks += 1
        try:
            rec = self._record(name)
        except CorruptStateError as e:
            return ModelDisk(name, None, (f"model record {e}",))
        if rec is None:
            return ModelDisk(name, None, ("not cached",))
        try:
            m = self._manifest(rec.repo, rec.commit)
        except CorruptStateError as e:
            return ModelDisk(name, rec, (f"manifest {e}",))
        if m is None:
            return ModelDisk(name, rec, (f"snapshot {rec.commit[:12]} is not in the cache",))
        rep = self.store.check(m, paths=rec.paths, deep_blobs=dirty_repos.get(rec.repo, ()))
        problems = [p for p in rep.problems() if not p.startswith("ref ")]  # refs: checked per model below
        if not is_commit(rec.revision):
            got = self.store.read_ref(rec.repo, rec.revision)
            if got != rec.commit and got not in (ref_owners or {}).get((rec.repo, rec.revision), ()):
                problems.append(f"ref {rec.revision}: points to {got or 'nothing'}, expected {rec.commit}")
        by = m.by_path()
        files = [by[p] for p in rec.paths if p in by]
        level = "verified" if files and all(f.verified for f in files) else "computed"
        return ModelDisk(name, rec, tuple(problems), tuple(sorted(set(rep.bad_blobs))), level,
                         sum(f.size for f in files))


def _snapshot_of(m: Manifest) -> SnapshotOnDisk:
    return SnapshotOnDisk(m.repo, m.commit, frozenset((f.digest, f.size) for f in m.files), m.verified_at)
