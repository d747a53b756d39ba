"""Resolve: pin a revision to a commit and list its files with the Hub's digests.

    GET /api/models/{repo}/revision/{rev}          -> commit (skipped for a 40-hex commit)
    GET /api/models/{repo}/tree/{commit}?recursive -> size, oid (git sha1), lfs.oid (sha256)

Every listed path is checked before it is planned: safe (``safe_relpath``), a well-formed digest,
and no path that is both a file and a folder (``conf`` and ``conf/inner.json``), so a broken listing
is refused in one line before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

import structlog

from agent.cache.layout import safe_relpath
from agent.core.plan import FileEntry, ModelPlan, file_folder_conflict, is_hex
from agent.core.spec import FileFilter, is_commit
from agent.errors import AgentError, NotFoundError, ProtocolError
from agent.sources.hub._hf import TREE_CACHE_FORMAT_VERSION, HfApi, RepoFile, TreeCacheEntry

log = structlog.get_logger("agent.sources.hub")
T = TypeVar("T")
Retrying = Callable[[str, Callable[[], T]], T]


def resolve_plan(api: HfApi, retrying: Retrying, label: str, repo: str, revision: str, files: FileFilter, *,
                 timeout: float) -> ModelPlan:
    """``retrying(what, op)`` runs each Hub call under the source's retry policy."""
    if is_commit(revision):
        commit, ref = revision, None
    else:
        info = retrying(f"{repo}@{revision}", lambda: api.model_info(repo, revision=revision, timeout=timeout))
        commit, ref = info.sha or "", revision
        if not is_commit(commit):
            raise ProtocolError(f"{repo}@{revision} at {label}: no valid commit in the answer ({commit!r})")
    tree = retrying(f"{repo}@{commit[:12]} file list", lambda: [
        f for f in api.list_repo_tree(repo, revision=commit, recursive=True) if isinstance(f, RepoFile)])
    where = f"{repo}@{commit[:12]} at {label}"
    listing: dict[str, TreeCacheEntry] = {}
    entries: list[FileEntry] = []
    for f in tree:
        try:
            safe_relpath(f.path)
        except AgentError as e:
            raise ProtocolError(f"{where}: {e}") from e
        if f.path in listing:
            raise ProtocolError(f"{where}: the listing names {f.path!r} twice")
        if f.lfs is not None:
            digest, algo = f.lfs.sha256, "sha256"
            if not is_hex(digest, 64) or f.lfs.size != f.size:
                raise ProtocolError(f"{where}: {f.path}: bad LFS metadata {f.lfs!r}")
        else:
            digest, algo = f.blob_id, "git-sha1"
            if not is_hex(digest, 40):
                raise ProtocolError(f"{where}: {f.path}: bad git oid {f.blob_id!r}")
        listing[f.path] = TreeCacheEntry(
            size=f.size, blob_id=f.blob_id, lfs_sha256=f.lfs.sha256 if f.lfs else None,
            lfs_size=f.lfs.size if f.lfs else None, xet_hash=f.xet_hash)
        if files.matches(f.path):
            entries.append(FileEntry(f.path, f.size, algo, digest))  # type: ignore[arg-type]
    clash = file_folder_conflict(listing)
    if clash is not None:
        raise ProtocolError(f"{where}: the listing has {clash[0]!r} both as a file and as a folder "
                            f"(of {clash[1]!r}); no snapshot can hold both, refusing it")
    if not entries:
        raise NotFoundError(f"{where}: no file matches {files.to_dict()} ({len(listing)} files in the repo)")
    # Exactly what huggingface_hub 2.x writes to trees/<commit>.json (whole repo, not the filtered set).
    trees_json = json.dumps({"format_version": TREE_CACHE_FORMAT_VERSION,
                             "files": {p: listing[p].to_json() for p in sorted(listing)}}, indent=1)
    log.info("hub.resolved", repo=repo, revision=revision, commit=commit, files=len(entries),
             bytes=sum(e.size for e in entries), source=label)
    return ModelPlan(repo, commit, tuple(sorted(entries, key=lambda e: e.path)), ref=ref,
                     source=label, extras={"trees_json": trees_json})
