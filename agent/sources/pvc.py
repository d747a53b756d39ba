"""Fill from a shared PVC that already holds a Hugging Face cache (the Download-Job pattern).

The PVC is read-only to us and may be written by others at any time, so nothing here locks it:
we resolve the ref once, list the snapshot, and follow symlinks only if they stay inside the PVC
root. A blob name of 64 hex digits is the file's expected sha256, 40 hex digits its git sha1;
plain files (as ModelExpress's client writes them) have no expected digest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.cache.hashing import copy_into
from agent.cache.layout import repo_folder_name, safe_relpath
from agent.cache.store import Fill
from agent.core.plan import FileEntry, ModelPlan, algo_for_blob_name, guess_algo
from agent.core.spec import FileFilter, is_commit
from agent.errors import NotFoundError, SourceError, UnsafePathError
from agent.sources.base import Progress, SourceRef, SourceSettings


def find_hub_dir(path: Path) -> Path:
    """Accept an HF_HOME folder (with hub/ inside) or a hub folder itself."""
    if (path / "hub").is_dir():
        return path / "hub"
    return path


class PvcSource:
    kind = "pvc"

    def __init__(self, path: Path | str, *, max_workers: int = 2) -> None:
        self.path = Path(path)
        self.max_workers = max_workers

    @property
    def label(self) -> str:
        return f"pvc:{self.path}"

    def _hub(self) -> Path:
        if not self.path.is_dir():
            raise NotFoundError(f"pvc: {self.path} is not a directory (is the PVC mounted?)")
        return find_hub_dir(self.path)

    def resolve(self, repo: str, revision: str, files: FileFilter) -> ModelPlan:
        hub = self._hub()
        repo_dir = hub / repo_folder_name(repo)
        if not repo_dir.is_dir():
            raise NotFoundError(f"pvc: repo {repo} not found: no {repo_dir}")
        if is_commit(revision):
            commit, ref = revision, None
        else:
            ref_file = repo_dir / "refs" / safe_relpath(revision)
            try:
                commit = ref_file.read_text().strip()
            except (FileNotFoundError, NotADirectoryError):
                raise NotFoundError(f"pvc: revision {revision!r} of {repo} not found: no {ref_file}") from None
            except OSError as e:
                raise SourceError(f"pvc: cannot read {ref_file}: {e.strerror}") from e
            if not is_commit(commit):
                raise SourceError(f"pvc: {ref_file} holds {commit[:60]!r}, not a 40-hex commit")
            ref = revision
        snap = repo_dir / "snapshots" / commit
        if not snap.is_dir():
            raise NotFoundError(f"pvc: commit {commit} of {repo} not found: no {snap}")
        root_real = os.path.realpath(hub)
        entries: list[FileEntry] = []
        paths: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(snap):
            for d in dirnames:
                if os.path.islink(os.path.join(dirpath, d)):
                    raise UnsafePathError(f"pvc: {os.path.join(dirpath, d)} is a symlinked directory; not followed")
            for name in filenames:
                full = os.path.join(dirpath, name)
                rel = safe_relpath(os.path.relpath(full, snap).replace(os.sep, "/"))
                if not files.matches(rel):
                    continue
                entry, real = self._entry(full, rel, root_real)
                entries.append(entry)
                paths[rel] = real
        if not entries:
            raise NotFoundError(f"pvc: {repo}@{commit} has no files matching {files.to_dict()} in {snap}")
        entries.sort(key=lambda e: e.path)
        return ModelPlan(repo, commit, tuple(entries), ref, self.label, {"pvc_paths": paths})

    def _entry(self, full: str, rel: str, root_real: str) -> tuple[FileEntry, str]:
        digest = None
        if os.path.islink(full):
            real = os.path.realpath(full)
            if os.path.commonpath([real, root_real]) != root_real:
                raise UnsafePathError(f"pvc: {full} points outside the PVC root ({real})")
            if not os.path.exists(real):
                raise NotFoundError(f"pvc: {full} points to a missing blob {real}")
            if os.path.basename(os.path.dirname(real)) == "blobs":
                digest = os.path.basename(real)
        else:
            real = full
        try:
            st = os.stat(real)
        except OSError as e:
            raise SourceError(f"pvc: cannot stat {full}: {e.strerror}") from e
        if not os.access(real, os.R_OK):
            raise SourceError(f"pvc: {full} is not readable")
        algo = algo_for_blob_name(digest) if digest else None
        if algo is None:
            return FileEntry(rel, st.st_size, guess_algo(rel, st.st_size), None), real
        return FileEntry(rel, st.st_size, algo, digest), real

    def fetch(self, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill, progress: Progress) -> None:
        paths: dict[str, str] = plan.extras["pvc_paths"]  # type: ignore[assignment]

        def one(entry: FileEntry) -> None:
            src = paths[entry.path]
            writer = fill.open(entry)
            try:
                copy_into(Path(src), writer, progress.advance)
                digests = writer.finish()
            except PermissionError as e:
                raise SourceError(f"pvc: cannot read {src}: {e.strerror}") from e
            except FileNotFoundError as e:
                raise NotFoundError(f"pvc: {src} disappeared while copying") from e
            finally:
                writer.close()
            fill.complete(entry, digests)

        ordered = sorted(entries, key=lambda e: -e.size)  # big files first: best overlap at the end
        if self.max_workers <= 1 or len(ordered) <= 1:
            for e in ordered:
                one(e)
            return
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="pvc") as pool:
            for fut in [pool.submit(one, e) for e in ordered]:
                fut.result()

    def close(self) -> None:
        pass


def open_source(ref: SourceRef, settings: SourceSettings) -> PvcSource:
    return PvcSource(ref.arg, max_workers=min(settings.max_workers, 2))
