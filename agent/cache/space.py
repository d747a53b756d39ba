"""Disk space as the agent counts it: published blobs, staging, and what in-flight fills reserved.

Two fills that each fit alone must not together overshoot the budget or the disk, so a fill
reserves the bytes it still has to write before it writes any, and gives them back when it ends.
Published bytes are walked once and then kept current by the store's own publishes and removals
(``resync`` re-walks, e.g. once per full check of the loop), so a fill's space check costs what
the in-flight fills cost, not what the whole cache holds.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from agent.cache.layout import CacheLayout
from agent.core.snapshot import DiskUse
from agent.errors import DiskFullError


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


@dataclass
class _Hold:
    need: int
    staging: Path
    base: int  # bytes already in ``staging`` when the reservation was made (not part of ``need``)


def tree_bytes(top: Path) -> int:
    """Bytes of the files below ``top`` (0 if it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(top):
        for n in files:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except FileNotFoundError:
                continue
    return total


def blob_bytes(layout: CacheLayout) -> int:
    """Bytes of every published blob (the one walker of the cache; O(blobs))."""
    total = 0
    try:
        repos = list(os.scandir(layout.hub))
    except FileNotFoundError:
        return 0
    for repo in repos:
        try:
            blobs = list(os.scandir(os.path.join(repo.path, "blobs")))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for b in blobs:
            try:
                total += b.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return total


class SpaceLedger:
    """Budget and free-space checks shared by every fill of this process."""

    def __init__(self, layout: CacheLayout, *, budget: int = 0, reserve: int = 0,
                 disk_usage: Callable[[Path], DiskUsage] = shutil.disk_usage) -> None:  # type: ignore[assignment]
        self.layout = layout
        self.budget = budget  # 0: no budget beyond the filesystem
        self.reserve_bytes = reserve  # always leave this much free
        self._disk_usage = disk_usage
        self._mu = threading.Lock()
        self._published: int | None = None
        self._holds: dict[int, _Hold] = {}
        self._next = 0

    def published(self) -> int:
        with self._mu:
            if self._published is None:
                self._published = blob_bytes(self.layout)
            return self._published

    def resync(self) -> int:
        """Re-walk the published blobs (others may have changed the disk)."""
        n = blob_bytes(self.layout)
        with self._mu:
            self._published = n
        return n

    def published_changed(self, delta: int) -> None:
        with self._mu:
            if self._published is not None:
                self._published = max(0, self._published + delta)

    def _outstanding(self) -> int:
        """Bytes in-flight fills reserved and have not written yet (call with ``_mu`` held)."""
        return sum(max(0, h.need - (tree_bytes(h.staging) - h.base)) for h in self._holds.values())

    def used(self) -> int:
        """What counts against the budget: published blobs, everything in staging, outstanding reservations."""
        published = self.published()
        with self._mu:
            return published + tree_bytes(self.layout.staging_root) + self._outstanding()

    def free(self) -> int:
        """Free bytes for a new fill: the filesystem's minus reservations, capped by the budget."""
        published = self.published()
        with self._mu:
            out = self._outstanding()
            free = self._disk_usage(self.layout.root).free - out - self.reserve_bytes
            if self.budget > 0:
                free = min(free, self.budget - published - tree_bytes(self.layout.staging_root) - out)
        return free

    @contextmanager
    def reserve(self, repo: str, commit: str, need: int, staging: Path) -> Iterator[int]:
        """Reserve ``need`` more bytes for a fill writing into ``staging`` until the block ends."""
        published = self.published()
        with self._mu:
            out = self._outstanding()
            fs_free = self._disk_usage(self.layout.root).free - out - self.reserve_bytes
            free = fs_free
            where = f"under {self.layout.root}"
            if self.budget > 0:
                budget_free = self.budget - published - tree_bytes(self.layout.staging_root) - out
                if budget_free < free:
                    free, where = budget_free, f"{where} (budget {self.budget})"
            if need > free:
                held = f", {out} reserved by fills in flight" if out else ""
                raise DiskFullError(
                    f"{repo}@{commit[:12]} needs {need} bytes more to fill; only {max(free, 0)} free {where}{held}",
                    shortfall=need - free)
            key = self._next
            self._next += 1
            self._holds[key] = _Hold(need, staging, tree_bytes(staging))
        try:
            yield need
        finally:
            with self._mu:
                self._holds.pop(key, None)

    def disk_use(self) -> DiskUse:
        """What the watermarks compare: of the budget when set, else of the filesystem (reservations included)."""
        if self.budget > 0:
            return DiskUse(self.used(), self.budget)
        try:
            du = self._disk_usage(self.layout.root)
        except OSError:
            return DiskUse()  # no cache root yet: nothing to compare
        with self._mu:
            out = self._outstanding()
        return DiskUse(du.used + out, du.total)

    def usage(self) -> DiskUsage:
        du = self._disk_usage(self.layout.root)
        return DiskUsage(du.total, du.used, du.free)
