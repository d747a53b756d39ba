"""``PvcSource``: a shared PVC (read-only to us, written by others at any time) behind the source interface.

Nothing here locks the PVC. Resolve finds the model's layout (``layouts``), records every folder's
identity and every file's (dev, ino, size); fetch re-opens the same folders through fds
(``tree.PvcTree``), refuses anything that was swapped since, and copies each file with fstat before
and after: a file rewritten while it was read is copied again once, then the fill fails naming it.
Every OSError becomes a SourceError naming the path, so ``fill_model`` moves on to the next source.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.cache.hashing import ReadFn, copy_into
from agent.cache.layout import repo_folder_name, safe_relpath
from agent.cache.store import Fill
from agent.core.plan import FileEntry, ModelPlan
from agent.core.spec import FileFilter
from agent.errors import NotFoundError, SourceError
from agent.sources.base import Progress, SourceRef, SourceSettings
from agent.sources.pvc.layouts import Found, Located, is_local_dir, plan_hf_cache, plan_local_dir, plan_plain
from agent.sources.pvc.tree import Identity, Parts, PvcTree

log = structlog.get_logger("agent.sources.pvc")


@dataclass(frozen=True)
class PvcPlan:
    """What fetch needs from resolve (``ModelPlan.extras['pvc']``)."""

    root: str
    layout: str  # "hf-cache" | "local-dir" | "plain"
    dirs: dict[Parts, Identity]
    files: dict[str, Located]


class PvcSource:
    """``--source pvc:PATH``; ``subpath`` names the model folder under PATH (``--pvc-subpath``, ``pvcSubpath``)."""

    kind = "pvc"

    def __init__(self, path: Path | str, *, max_workers: int = 2, subpath: str | None = None,
                 read_fn: ReadFn = os.readv) -> None:
        self.path = Path(path)
        self.max_workers = max_workers
        self.subpath = safe_relpath(subpath.strip("/")) if subpath else None
        self._read_fn = read_fn

    @property
    def label(self) -> str:
        return f"pvc:{self.path}"

    def with_subpath(self, subpath: str | None) -> PvcSource:
        """The same PVC, with the model's folder named explicitly (a per-model spec field)."""
        if subpath == self.subpath:
            return self
        return PvcSource(self.path, max_workers=self.max_workers, subpath=subpath, read_fn=self._read_fn)

    def close(self) -> None:
        pass

    # -- resolve ---------------------------------------------------------------------------------

    def resolve(self, repo: str, revision: str, files: FileFilter) -> ModelPlan:
        with PvcTree(self.path) as tree:
            found = self._find(tree, repo, revision, files)
            extras: dict[str, object] = {"pvc": PvcPlan(str(self.path), found.layout, dict(tree.ids), found.files)}
        if found.trees_json is not None:
            extras["trees_json"] = found.trees_json
        entries = tuple(sorted(found.entries, key=lambda e: e.path))
        log.debug("pvc.resolved", repo=repo, revision=revision, commit=found.commit, layout=found.layout,
                  files=len(entries), source=self.label)
        return ModelPlan(repo, found.commit, entries, found.ref, self.label, extras)

    def _find(self, tree: PvcTree, repo: str, revision: str, files: FileFilter) -> Found:
        """The first layout that holds ``repo``; if none does, the error names every place looked at."""
        tried: list[str] = []
        if self.subpath is None:
            for hub in (("hub",), ()):
                repo_parts = (*hub, repo_folder_name(repo))
                tried.append(f"HF cache {tree.show(repo_parts)}")
                if tree.is_dir(repo_parts):
                    return plan_hf_cache(tree, repo_parts, repo, revision, files)
            model: Parts = tuple(repo.split("/"))
        else:
            model = tuple(self.subpath.split("/"))
        tried.append(f"local-dir download or plain folder {tree.show(model)}")
        if tree.is_dir(model):
            if is_local_dir(tree, model):
                return plan_local_dir(tree, model, repo, revision, files)
            return plan_plain(tree, model, repo, revision, files)
        raise NotFoundError(f"pvc: repo {repo} not found under {self.path}; tried: {'; '.join(tried)}")

    # -- fetch -----------------------------------------------------------------------------------

    def fetch(self, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill, progress: Progress) -> None:
        pvc: PvcPlan = plan.extras["pvc"]  # type: ignore[assignment]
        ordered = sorted(entries, key=lambda e: -e.size)  # big files first: best overlap at the end
        with PvcTree(Path(pvc.root), expect=pvc.dirs) as tree:
            def one(entry: FileEntry) -> None:
                self._copy_checked(tree, pvc.files[entry.path], entry, fill, progress.advance)

            if self.max_workers <= 1 or len(ordered) <= 1:
                for e in ordered:
                    one(e)
                return
            with ThreadPoolExecutor(self.max_workers, thread_name_prefix="pvc") as pool:
                for fut in [pool.submit(one, e) for e in ordered]:
                    fut.result()

    def _copy_checked(self, tree: PvcTree, where: Located, entry: FileEntry, fill: Fill,
                      advance: Callable[[int], None]) -> None:
        """Copy once; a file that changed while it was read is copied once more, then refused by name."""
        for attempt in (1, 2):
            fill.check_stop()
            if self._copy_once(tree, where, entry, fill, advance):
                return
            log.warning("pvc.torn_read", path=where.shown, attempt=f"{attempt}/2")
        raise SourceError(f"pvc: {where.shown} changed while it was copied, twice; nothing of it was kept "
                          "(is something still writing the PVC?)", permanent=False, reason="torn_read")

    def _copy_once(self, tree: PvcTree, where: Located, entry: FileEntry, fill: Fill,
                   advance: Callable[[int], None]) -> bool:
        """True when the copy is complete and the file stood still while it was read."""
        fd, before = tree.open_file(where.parts, where.shown)
        try:
            if (before.st_dev, before.st_ino, before.st_size) != (where.dev, where.ino, where.size):
                raise SourceError(f"pvc: {where.shown} was replaced or resized since the fill was planned "
                                  f"({where.size} -> {before.st_size} bytes)", permanent=False, reason="changed")
            def read(src: int, bufs: list[mmap.mmap]) -> int:  # source-side errors name the source file
                try:
                    return self._read_fn(src, bufs)
                except OSError as e:
                    raise tree.error(e, where.parts, "read", where.shown) from e

            writer = fill.open(entry)
            try:
                copied = copy_into(fd, writer, advance, between_chunks=fill.check_stop, read_fn=read)
                after = os.fstat(fd)
                stood_still = copied == before.st_size and _stamp(before) == _stamp(after)
                digests = writer.finish() if stood_still else None
            finally:
                writer.close()
            if digests is None:
                fill.part_path(entry).unlink(missing_ok=True)
                return False
        finally:
            os.close(fd)
        fill.complete(entry, digests)
        return True


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def open_source(ref: SourceRef, settings: SourceSettings, **_: object) -> PvcSource:
    return PvcSource(ref.arg, max_workers=min(settings.max_workers, 2))

