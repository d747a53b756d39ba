"""Trusted digests for a plan: the reference every fill is checked against.

``enrich_digests`` adds digests from sources whose metadata we trust (Hub listing, PVC blob names) to
a plan that lacks them. ``reference_plan`` is the peers source's reference: the plan as the origin
sources describe it (metadata only), never as a peer does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import structlog

from agent.core.plan import FileEntry, ModelPlan
from agent.core.spec import FileFilter
from agent.errors import AgentError, NotFoundError
from agent.sources.base import Source

log = structlog.get_logger("agent.sources.reference")
METADATA_KINDS = ("pvc", "hub")  # sources whose digests we trust (blob names, Hub tree API)


def enrich_digests(plan: ModelPlan, others: Sequence[Source], files: FileFilter) -> ModelPlan:
    """Fill in expected digests from a more trusted source for a plan that lacks them.

    Only entries whose path and size match get a digest, so a disagreeing source cannot make a
    good file fail; when a trusted digest does apply, a wrong byte from the streaming source will.
    """
    if all(f.trusted for f in plan.files):
        return plan
    for other in others:
        if other.kind not in METADATA_KINDS:
            continue
        try:
            ref_plan = other.resolve(plan.repo, plan.commit, files)
        except AgentError as e:
            log.debug("fill.enrich_skipped", source=other.label, error=str(e))
            continue
        known = {f.path: f for f in ref_plan.files if f.trusted}
        new_files: list[FileEntry] = []
        for f in plan.files:
            k = known.get(f.path)
            usable = k is not None and not f.trusted and k.size == f.size
            new_files.append(replace(f, algo=k.algo, digest=k.digest) if usable and k else f)
        plan = replace(plan, files=tuple(new_files))
        if all(f.trusted for f in plan.files):
            break
    return plan


def reference_plan(origins: Sequence[Source], repo: str, revision: str, files: FileFilter) -> ModelPlan:
    """The first origin that resolves ``revision``, its digests completed from the others."""
    errors: list[str] = []
    for i, src in enumerate(origins):
        try:
            plan = src.resolve(repo, revision, files)
        except AgentError as e:
            errors.append(f"{src.label}: {e}")
            continue
        return enrich_digests(plan, [s for j, s in enumerate(origins) if j != i], files)
    raise NotFoundError(f"no origin could describe {repo}@{revision}: " + ("; ".join(errors) or "none configured"))
