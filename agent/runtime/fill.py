"""Fill one model: try sources in preference order, verify, publish. Used by ``fill`` and the loop.

The store does the byte-level checks; this module owns the policy: which source next, when a
digest from a more trusted source applies, when to retry a file from scratch, when to give up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace

import structlog

from agent.cache.manifest import Manifest
from agent.cache.staging import Fill
from agent.cache.store import Store
from agent.core.plan import FileEntry, ModelPlan
from agent.core.snapshot import ModelRecord, listing_digest
from agent.core.spec import FileFilter
from agent.errors import AgentError, CorruptStateError, DiskFullError, IntegrityError, SourceError, UnsafePathError
from agent.sources.base import NullProgress, Progress, Source
from agent.sources.reference import METADATA_KINDS, enrich_digests  # noqa: F401 (re-exported)

log = structlog.get_logger("agent.runtime.fill")


@dataclass(frozen=True)
class FillResult:
    manifest: Manifest
    source: str
    fetched_files: int
    fetched_bytes: int
    seconds: float
    record: ModelRecord | None = None  # written when the fill was for a named model (the agent loop)
    peer_bytes: int = 0  # of fetched_bytes, what peers delivered to a fill whose source is an origin (stripes)


def describe_attempts(attempts: Sequence[tuple[str, BaseException]]) -> str:
    """'label: error' per source, without repeating a label the error already starts with or names."""
    parts = []
    for label, err in attempts:
        msg = str(err)
        kind = label.split(":", 1)[0]
        named = msg.startswith((f"{label}:", f"{kind}:")) or label in msg
        parts.append(msg if named else f"{label}: {msg}")
    return "; ".join(parts) or "no source configured"


class FillFailed(AgentError):
    """Every source failed; ``attempts`` lists (source label, error) in order."""

    def __init__(self, repo: str, revision: str, attempts: list[tuple[str, AgentError]]) -> None:
        super().__init__(f"{repo}@{revision}: all sources failed: {describe_attempts(attempts)}")
        self.attempts = attempts
        last = attempts[-1][1] if attempts else None
        self.permanent = all(getattr(e, "permanent", True) for _, e in attempts)
        self.reason = getattr(last, "reason", "error") if last else "no_source"


def trusted_from_manifest(store: Store, plan: ModelPlan) -> ModelPlan:
    """Digests this node already verified for this commit stay trusted for a repair or a re-fill.

    Without this, repairing a Hub-verified model from a stream with no hashes (ModelExpress) would
    silently downgrade it to ``computed``, and a bad byte from that stream would go unnoticed.
    """
    if all(f.trusted for f in plan.files):
        return plan
    try:
        m = store.manifest(plan.repo, plan.commit)
    except CorruptStateError:
        return plan  # nothing this node recorded can be trusted; the content is hashed afresh
    if m is None:
        return plan
    known = {f.path: f for f in m.files if f.verified}
    return replace(plan, files=tuple(
        replace(f, algo=k.algo, digest=k.digest) if not f.trusted and (k := known.get(f.path)) and k.size == f.size
        else f
        for f in plan.files
    ))


def fill_model(
    store: Store,
    sources: Sequence[Source],
    repo: str,
    revision: str,
    files: FileFilter | None = None,
    *,
    pin: str | None = None,
    progress: Progress | None = None,
    lock_timeout: float | None = None,
    stop: threading.Event | None = None,
    record_as: str | None = None,
    pvc_subpath: str | None = None,
    distrust: Collection[str] = (),
    on_lock_wait: Callable[[str], None] | None = None,
) -> FillResult:
    """Fill ``repo`` at ``revision`` from the first source that can deliver it.

    ``pin`` forces the commit (cluster-wide pin) while ``revision`` stays the ref name written.
    ``record_as``: the model name whose file set this fill is; its record is written under the same
    repo lock as the publish, so "ready" can never see a published snapshot with a stale record.
    """
    files = files or FileFilter()
    progress = progress or NullProgress()
    attempts: list[tuple[str, AgentError]] = []
    for i, src in enumerate(sources):
        if stop is not None and stop.is_set():
            break
        blog = log.bind(repo=repo, revision=revision, source=src.label)
        try:
            plan = src.resolve(repo, pin or revision, files)
            if pin and revision != pin:
                plan = replace(plan, ref=revision)
            plan = trusted_from_manifest(store, plan)
            plan = enrich_digests(plan, [s for j, s in enumerate(sources) if j != i], files)
            return _fill_from(store, src, plan, progress, lock_timeout, blog, stop,
                              _record(record_as, revision, files, plan, pvc_subpath), on_lock_wait, distrust)
        except DiskFullError:
            raise
        except (SourceError, IntegrityError, UnsafePathError) as e:
            blog.warning("fill.source_failed", error=str(e), attempt=f"{i + 1}/{len(sources)}")
            attempts.append((src.label, e))
    raise FillFailed(repo, revision, attempts)


def _record(name: str | None, revision: str, files: FileFilter, plan: ModelPlan,
            pvc_subpath: str | None) -> ModelRecord | None:
    if name is None:
        return None
    return ModelRecord(name, plan.repo, revision, plan.commit, files, tuple(sorted(e.path for e in plan.files)),
                       listing_digest(plan.files), plan.source, time.time(), pvc_subpath)


def _fill_from(
    store: Store, src: Source, plan: ModelPlan, progress: Progress, lock_timeout: float | None,
    blog: structlog.stdlib.BoundLogger, stop: threading.Event | None = None, record: ModelRecord | None = None,
    on_lock_wait: Callable[[str], None] | None = None, distrust: Collection[str] = (),
) -> FillResult:
    t0 = time.monotonic()
    with store.lock(plan.repo, timeout=lock_timeout, on_wait=on_lock_wait):
        store.sweep_staging(plan.repo)
        if distrust:  # blobs whose content failed a check: gone before anything could reuse them by stat
            store.quarantine(plan.repo, plan.commit, distrust)
        fill = store.begin(plan, stop=stop)
        needed = fill.needed()
        total = sum(e.size for e in needed)
        blog.info("fill.start", commit=plan.commit, files=len(plan.files), needed_files=len(needed),
                  needed_bytes=total, verification=plan.level)
        try:
            with fill.reserve(needed):  # held while bytes arrive; publish only moves them (no new space)
                progress.start(total, len(needed))
                _fetch_with_one_retry(src, plan, needed, fill, progress, blog)
            manifest = fill.publish()
            if record is not None:
                store.write_record(record)
        except DiskFullError:
            fill.abort()
            raise
        except BaseException as e:
            # keep resumable partial files unless the bytes themselves were bad
            fill.abort(keep_partials=not isinstance(e, IntegrityError | UnsafePathError))
            raise
        finally:
            progress.close()
    secs = time.monotonic() - t0
    blog.info("fill.done", commit=plan.commit, files=len(needed), bytes=total, seconds=round(secs, 3),
              verification=manifest.level)
    peer_bytes = 0 if src.kind == "peers" else fill.bytes_from.get("peers", 0)
    return FillResult(manifest, src.label, len(needed), total, secs, record, peer_bytes)


def _fetch_with_one_retry(
    src: Source, plan: ModelPlan, needed: list[FileEntry], fill: Fill, progress: Progress,
    blog: structlog.stdlib.BoundLogger,
) -> None:
    """A file that fails its digest is fetched once more from scratch; a second failure is final."""
    try:
        src.fetch(plan, needed, fill, progress)
    except IntegrityError as e:
        blog.warning("fill.integrity_retry", file=e.path, error=str(e))
        done = fill.done_paths()
        src.fetch(plan, [f for f in needed if f.path not in done], fill, progress)
