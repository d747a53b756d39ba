"""The ``peers`` source: fill from other agents' torrents (one per file), checked against the origins' digests.

resolve(repo, revision):
    reference = the origin sources' plan (metadata only, trusted digests; a peer's word never counts)
    swarm = each file's torrent key and layout, derived from the reference
    some peer lists every file                          -> plan (fetch joins the swarm)
    else this node gets a free origin slot              -> NotFoundError: the next source (an origin, in a
                                                           SlottedSource) fills its stripe, sharing each file
                                                           as it lands, and takes the rest from the other holders
    else (slots held by other nodes, or peers list part) -> plan: fetch takes files as the holders list them
fetch: libtorrent downloads into staging; every file is re-hashed against the reference digest
before the store takes it. Any swarm failure other than a full disk raises a SourceError, so
``fill_model`` moves on to the next configured source.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import structlog

from agent.cache.store import Fill
from agent.core.plan import FileEntry, ModelPlan
from agent.core.spec import FileFilter
from agent.core.torrent import TorrentError
from agent.errors import NotFoundError, SourceError
from agent.sources.base import Progress, Source
from agent.sources.peers.service import PeerService, Swarm
from agent.sources.peers.slots import slot_key
from agent.sources.reference import reference_plan

log = structlog.get_logger("agent.sources.peers")
ReferencePlanner = Callable[[str, str, FileFilter], ModelPlan]


class PeerSource:
    kind = "peers"

    def __init__(self, service: PeerService, origins: Sequence[Source] = (), *,
                 reference: ReferencePlanner | None = None, owns_service: bool = False) -> None:
        """``origins``: the configured sources that describe a model (the reference) and fill it when
        no peer can; ``reference`` replaces how the trusted plan is obtained (e.g. a digest record
        written through the API server in cluster mode)."""
        self.service = service
        self.origins = list(origins)
        self._reference = reference
        self._owns_service = owns_service

    @property
    def label(self) -> str:
        return f"peers:{self.service.settings.port}"

    def reference(self, repo: str, revision: str, files: FileFilter) -> ModelPlan:
        if self._reference is not None:
            return self._reference(repo, revision, files)
        if not self.origins:
            raise SourceError("peers: no origin source to take trusted digests from (add pvc:PATH or hub)")
        return reference_plan(self.origins, repo, revision, files)

    def resolve(self, repo: str, revision: str, files: FileFilter) -> ModelPlan:
        ref = self.reference(repo, revision, files)
        untrusted = [f.path for f in ref.files if not f.trusted]
        if untrusted:
            raise SourceError(f"peers: {repo}@{ref.commit[:12]}: no trusted digest for {untrusted[0]} "
                              f"(and {len(untrusted) - 1} more); bytes from peers need a reference to be checked")
        try:
            swarm = Swarm.of(repo, ref.commit, ref.files)
        except TorrentError as e:
            raise SourceError(f"peers: {repo}@{ref.commit[:12]}: {e}") from e
        svc = self.service.start()
        skey = slot_key(repo, ref.commit)
        found = svc.find_files(swarm)
        holders = tuple(dict.fromkeys(p for peers in found.values() for p in peers))
        plan = replace(ref, source=self.label, extras={**ref.extras, "swarm": replace(swarm, holders=holders)})
        if len(found) == len(swarm.files):
            svc.gate.release(skey)  # a retry that finds peers after all gives its slot back
            log.info("peers.found", repo=repo, commit=ref.commit[:12], files=len(found),
                     holders=[str(h) for h in holders])
            return plan
        if not self.origins and self._reference is None:
            if found:
                return plan
            raise NotFoundError(f"peers: no peer has {repo}@{ref.commit[:12]}")
        if svc.gate.decide(skey) == "held":
            j, k = svc.gate.stripe(skey)
            log.info("peers.origin_slot", repo=repo, commit=ref.commit[:12], slot=j, slots=k)
            raise NotFoundError(f"peers: no peer has all of {repo}@{ref.commit[:12]} yet; this node holds origin "
                                f"slot {j} of {k} and fills from the next source")
        if found or svc.gate.slots.busy(skey):
            svc.gate.deny(skey)
            log.info("peers.following_holders", repo=repo, commit=ref.commit[:12], listed=len(found),
                     files=len(swarm.files))
            return plan
        svc.gate.deny(skey)
        raise NotFoundError(f"peers: no peer has {repo}@{ref.commit[:12]}")

    def fetch(self, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill, progress: Progress) -> None:
        swarm = plan.extras.get("swarm")
        if not isinstance(swarm, Swarm):
            raise SourceError(f"peers: plan for {plan.repo}@{plan.commit[:12]} was not resolved by the peers source")
        skey = slot_key(plan.repo, plan.commit)
        slots = self.service.gate.slots
        self.service.download(swarm, plan, entries, fill, progress, alive=lambda: slots.busy(skey))

    def with_subpath(self, subpath: str | None) -> PeerSource:
        """The same swarm, with PVC origins looking in a model's ``pvcSubpath`` (factory.for_model)."""
        origins = [o.with_subpath(subpath) if hasattr(o, "with_subpath") else o for o in self.origins]
        if all(a is b for a, b in zip(origins, self.origins, strict=True)):
            return self
        return PeerSource(self.service, origins, reference=self._reference)  # the original owns the service

    def close(self) -> None:
        if self._owns_service:
            self.service.stop()
