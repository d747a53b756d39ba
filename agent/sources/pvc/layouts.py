"""The three shapes a shared PVC holds a model in, each planned into files with expected digests.

    hf-cache    PATH[/hub]/models--org--name/{refs,snapshots,blobs}   as huggingface_hub's cache writes it
                snapshot symlinks into blobs/: a blob name is the file's sha256 (64 hex) or git sha1
                (40 hex), so such files are ``verified``; plain files in a snapshot are ``computed``
    local-dir   PATH/org/name/ (or PATH/<subpath>/) with .cache/huggingface/download/<path>.metadata,
                as ``hf download --local-dir`` writes it: commit + etag per file -> ``verified``
    plain       PATH/org/name/ (or PATH/<subpath>/), files and nothing else -> ``computed``; the snapshot
                is named by the revision if it is a 40-hex commit, else by ``listing_id``

Every path is read through ``PvcTree`` (fds, O_NOFOLLOW, regular files only). Symlinks are followed
only to a target inside the PVC root; a snapshot symlink into the repo's own ``blobs/`` carries the
blob name as the expected digest. docs/sources.md shows each shape with an example tree.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field

from agent.cache.layout import safe_relpath
from agent.core.plan import FileEntry, HashAlgo, algo_for_blob_name, guess_algo
from agent.core.spec import FileFilter, is_commit
from agent.errors import NotFoundError, SourceError, UnsafePathError
from agent.sources.pvc.tree import Entry, Parts, PvcTree, not_regular, resolve_link

HF_META: Parts = (".cache", "huggingface")  # what ``hf download --local-dir`` keeps beside the files
NOT_MODEL_FILES = frozenset({".git", "/".join(HF_META)})  # never part of a local-dir or plain-folder model
METADATA_LIMIT = 4096
TREES_LIMIT = 64 << 20


@dataclass(frozen=True)
class Located:
    """Where a planned file's bytes are read from, and what it was when planned."""

    parts: Parts  # from the PVC root; the blob for a snapshot symlink
    shown: str  # how errors name it: the path a person knows (and the blob it points to)
    dev: int
    ino: int
    size: int


@dataclass
class Found:
    """One layout's answer: the commit, the selected files, and where each one is."""

    layout: str
    commit: str
    ref: str | None
    entries: list[FileEntry] = field(default_factory=list)
    files: dict[str, Located] = field(default_factory=dict)
    trees_json: str | None = None

    def add(self, entry: FileEntry, where: Located) -> None:
        self.entries.append(entry)
        self.files[entry.path] = where


def locate(tree: PvcTree, e: Entry, repo_blobs: Parts | None = None) -> tuple[Located, str | None]:
    """Open the file an entry names (following a symlink only inside the root); its blob digest if any."""
    shown = tree.show(e.parts)
    target, st, digest = e.parts, e.st, None
    if stat.S_ISLNK(st.st_mode):
        text = tree.readlink(e.parts)
        dest = resolve_link(e.parts, text, tree.root)
        if dest is None:
            raise UnsafePathError(f"pvc: {shown} points outside the PVC root ({text})")
        try:
            tst = tree.lstat(dest)
        except NotFoundError:
            tst = None
        if tst is None:
            raise NotFoundError(f"pvc: {shown} points to a missing blob {tree.show(dest)}")
        if stat.S_ISDIR(tst.st_mode):
            raise UnsafePathError(f"pvc: {shown} is a symlinked directory; not followed")
        if stat.S_ISLNK(tst.st_mode):
            raise UnsafePathError(f"pvc: {shown} points to another symlink ({tree.show(dest)}); not followed")
        if repo_blobs is not None and dest[:-1] == repo_blobs and algo_for_blob_name(dest[-1]):
            digest = dest[-1]
        shown, target, st = f"{shown} (-> {tree.show(dest)})", dest, tst
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(shown, st.st_mode)
    fd, fst = tree.open_file(target, shown)  # readable now, and its identity for the fetch
    os.close(fd)
    return Located(target, shown, fst.st_dev, fst.st_ino, fst.st_size), digest


def _selected(e: Entry, files: FileFilter) -> bool:
    if not files.matches(e.rel):
        return False
    safe_relpath(e.rel)
    return True


# -- hf-cache ------------------------------------------------------------------------------------


def plan_hf_cache(tree: PvcTree, repo_parts: Parts, repo: str, revision: str, files: FileFilter) -> Found:
    if is_commit(revision):
        commit, ref = revision, None
    else:
        ref_parts = (*repo_parts, "refs", *safe_relpath(revision).split("/"))
        try:
            raw = tree.read_small(ref_parts, METADATA_LIMIT)
        except NotFoundError:
            raise NotFoundError(f"pvc: revision {revision!r} of {repo} not found: no {tree.show(ref_parts)}") from None
        commit = raw.decode(errors="replace").strip()
        if not is_commit(commit):
            raise SourceError(f"pvc: {tree.show(ref_parts)} holds {commit[:60]!r}, not a 40-hex commit")
        ref = revision
    snap = (*repo_parts, "snapshots", commit)
    if not tree.is_dir(snap):
        raise NotFoundError(f"pvc: commit {commit} of {repo} not found: no {tree.show(snap)}")
    found = Found("hf-cache", commit, ref)
    blobs = (*repo_parts, "blobs")
    for e in tree.walk(snap):
        if _selected(e, files):
            where, digest = locate(tree, e, blobs)
            algo = algo_for_blob_name(digest) if digest else None
            found.add(FileEntry(e.rel, where.size, algo or guess_algo(e.rel, where.size), digest if algo else None),
                      where)
    if not found.entries:
        raise NotFoundError(f"pvc: {repo}@{commit} has no files matching {files.to_dict()} in {tree.show(snap)}")
    return found


# -- local-dir -----------------------------------------------------------------------------------


def is_local_dir(tree: PvcTree, model: Parts) -> bool:
    return tree.is_dir((*model, *HF_META, "download"))


def parse_download_metadata(raw: bytes, shown: str) -> tuple[str, str, HashAlgo]:
    """huggingface_hub's ``<path>.metadata``: commit, etag, timestamp on three lines -> (commit, etag, algo)."""
    lines = raw.decode(errors="replace").splitlines()
    if len(lines) < 3:
        raise SourceError(f"pvc: {shown}: expected commit, etag and timestamp lines, got {len(lines)} lines")
    commit, etag, stamp = (line.strip() for line in lines[:3])
    if not is_commit(commit):
        raise SourceError(f"pvc: {shown}: {commit[:60]!r} is not a 40-hex commit")
    algo = algo_for_blob_name(etag)
    if algo is None:
        raise SourceError(f"pvc: {shown}: etag {etag[:80]!r} is neither a sha256 nor a git sha1")
    try:
        float(stamp)
    except ValueError:
        raise SourceError(f"pvc: {shown}: timestamp {stamp[:40]!r} is not a number") from None
    return commit, etag, algo


def plan_local_dir(tree: PvcTree, model: Parts, repo: str, revision: str, files: FileFilter) -> Found:
    """Each selected file is checked against the etag its metadata names; all must name one commit."""
    planned: list[tuple[Entry, Located, str, str, HashAlgo]] = []
    for e in tree.walk(model, skip=NOT_MODEL_FILES):
        if not _selected(e, files):
            continue
        where, _ = locate(tree, e)
        *folders, name = e.rel.split("/")
        meta = (*model, *HF_META, "download", *folders, f"{name}.metadata")
        try:
            raw = tree.read_small(meta, METADATA_LIMIT)
        except NotFoundError:
            raise SourceError(
                f"pvc: {tree.show(e.parts)} has no download metadata (no {tree.show(meta)}), so it was not written by "
                "`hf download --local-dir`: remove it from the folder or leave it out with --ignore / files.ignore",
                reason="local_dir") from None
        commit, etag, algo = parse_download_metadata(raw, tree.show(meta))
        planned.append((e, where, commit, etag, algo))
    commits: dict[str, int] = {}
    for _e, _w, commit, _etag, _algo in planned:
        commits[commit] = commits.get(commit, 0) + 1
    if len(commits) > 1:
        counts = ", ".join(f"{c} ({n} files)" for c, n in sorted(commits.items(), key=lambda kv: -kv[1]))
        raise SourceError(f"pvc: {tree.show(model)} mixes files of {len(commits)} commits ({counts}): download the "
                          "whole repo at one revision again, or narrow the files selected", reason="local_dir")
    if not planned:
        raise NotFoundError(f"pvc: {tree.show(model)} has no files matching {files.to_dict()}")
    commit = next(iter(commits))
    if is_commit(revision) and revision != commit:
        raise NotFoundError(f"pvc: commit {revision} of {repo} not found: {tree.show(model)} holds commit {commit}")
    found = Found("local-dir", commit, None if is_commit(revision) else revision)
    listing = _read_trees(tree, model, commit)
    for e, where, _commit, etag, algo in planned:
        known = listing.get(e.rel) if listing else None
        if known is not None and (known.get("size") != where.size or etag not in (known.get("lfs_sha256"),
                                                                                 known.get("blob_id"))):
            raise SourceError(f"pvc: {where.shown}: size {where.size} / etag {etag} disagree with the listing in "
                              f"{tree.show((*model, *HF_META, 'trees', commit + '.json'))}", reason="local_dir")
        found.add(FileEntry(e.rel, where.size, algo, etag), where)
    if listing is not None:
        found.trees_json = json.dumps({"format_version": 1, "files": listing}, indent=1)
    return found


def _read_trees(tree: PvcTree, model: Parts, commit: str) -> dict[str, dict[str, object]] | None:
    """huggingface_hub 2.x's cached listing of the commit (``trees/<commit>.json``), when it left one."""
    parts = (*model, *HF_META, "trees", f"{commit}.json")
    try:
        data = json.loads(tree.read_small(parts, TREES_LIMIT))
    except NotFoundError:
        return None
    except ValueError as e:
        raise SourceError(f"pvc: {tree.show(parts)}: not a tree listing ({e})") from e
    listing = data.get("files") if isinstance(data, dict) and data.get("format_version") == 1 else None
    if not isinstance(listing, dict) or not all(isinstance(v, dict) for v in listing.values()):
        raise SourceError(f"pvc: {tree.show(parts)}: not a tree listing of format_version 1")
    return listing


# -- plain folder ----------------------------------------------------------------------------------


LISTING_ID_PREFIX = "00000000"  # marks a listing id: a real git commit starts so with odds of 1 in 4 billion


def listing_id(items: list[tuple[str, str, int, int]]) -> str:
    """A 40-hex name for a plain folder's current state, from (path, type, size, mtime_ns) of every file.

    Paths, sizes and mtimes, not content: naming the snapshot must not cost a read of the whole model
    at every resolve, and mtime is what changes when a file is rewritten in place with the same size
    (a re-trained checkpoint). Inode and ctime are left out so a copy made with ``cp -a`` or
    ``rsync -a`` on another PVC gets the same name. ``LISTING_ID_PREFIX`` and 128 bits of sha1 follow,
    so a pinned id can be told from a commit and checked against the folder again (``plan_plain``).
    """
    h = hashlib.sha1(b"model-cache-agent plain-folder v1\n")
    for path, kind, size, mtime_ns in sorted(items):
        h.update(f"{path}\0{kind}\0{size}\0{mtime_ns}\n".encode())
    return LISTING_ID_PREFIX + h.hexdigest()[: 40 - len(LISTING_ID_PREFIX)]


def is_listing_id(revision: str) -> bool:
    return is_commit(revision) and revision.startswith(LISTING_ID_PREFIX)


def _id_item(tree: PvcTree, e: Entry) -> tuple[str, str, int, int]:
    st = e.st
    if stat.S_ISLNK(st.st_mode):  # what the link points at, when that is inside the root
        dest = resolve_link(e.parts, tree.readlink(e.parts), tree.root)
        try:
            target = tree.lstat(dest) if dest is not None else None
        except (NotFoundError, UnsafePathError, SourceError):
            target = None
        st = target or st
    return e.rel, stat.filemode(st.st_mode)[0], st.st_size, st.st_mtime_ns


def plan_plain(tree: PvcTree, model: Parts, repo: str, revision: str, files: FileFilter) -> Found:
    """Named by a commit given by the user, else by the folder's listing id; a pinned listing id (another
    node resolved it, or an earlier fill) must still be the folder's state, or the pinned snapshot no
    longer exists there: filling the folder's new bytes under the old name would give nodes different
    bytes under one name."""
    listing = list(tree.walk(model, skip=NOT_MODEL_FILES))
    current = listing_id([_id_item(tree, e) for e in listing])
    if is_listing_id(revision) and revision != current:
        raise NotFoundError(f"pvc: {tree.show(model)} changed since it was pinned as {revision} (its files now "
                            f"name {current}); clear the pin (or re-run fill) to fill the new state")
    found = Found("plain", revision, None) if is_commit(revision) else Found("plain", current, revision)
    for e in listing:
        if _selected(e, files):
            where, _ = locate(tree, e)
            found.add(FileEntry(e.rel, where.size, guess_algo(e.rel, where.size)), where)
    if not found.entries:
        raise NotFoundError(f"pvc: {tree.show(model)} has no files matching {files.to_dict()} (plain folder of {repo})")
    return found
