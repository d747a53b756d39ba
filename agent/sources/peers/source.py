"""The ``peers`` source: fill from other agents' torrents, checked against the origins' digests.

resolve(repo, revision):
    reference = the origin sources' plan (metadata only, trusted digests; a peer's word never counts)
    key, layout = plan_key(reference), layout(reference)
    loop: a peer serves an info dict matching the layout        -> plan (fetch joins the swarm)
          no torrent, and this node gets an origin slot         -> NotFoundError: the next source
                                                                   (an origin) fills, and this node
                                                                   seeds afterwards
          no torrent, all origin slots held by other nodes      -> wait for their torrent (polling)
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
from agent.core.torrent import TorrentError, layout, plan_key
from agent.errors import NotFoundError, SourceError, TransientSourceError
from agent.sources.base import Progress, Source
from agent.sources.peers.service import PeerService, TorrentRef
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
            key = plan_key(repo, ref.commit, ref.files)
            lay = layout(repo, ref.commit, ref.files)
        except TorrentError as e:
            raise SourceError(f"peers: {repo}@{ref.commit[:12]}: {e}") from e
        svc = self.service.start()
        skey = slot_key(repo, ref.commit)
        waited_since = svc.clock()
        announced = False
        while True:
            torrent = svc.find_info(key, lay)
            if torrent is not None:
                svc.gate.release(skey)  # a retry that finds peers after all gives its slot back
                log.info("peers.found", repo=repo, commit=ref.commit[:12], info_hash=torrent.info_hash[:12],
                         holders=[str(h) for h in torrent.holders])
                return replace(ref, source=self.label, extras={**ref.extras, "torrent": torrent})
            if not self.origins and self._reference is None:
                break
            if svc.gate.decide(skey) == "held":
                # A holder serves its torrent before it gives its slot back: asking once more after taking
                # the slot closes the window between our last look and the slot coming free.
                torrent = svc.find_info(key, lay)
                if torrent is not None:
                    continue
                log.info("peers.origin_slot", repo=repo, commit=ref.commit[:12], slots=svc.gate.slots.cap)
                raise NotFoundError(f"peers: no peer has {repo}@{ref.commit[:12]} yet; this node holds an origin "
                                    "slot and fills from the next source")
            if not announced:
                log.info("peers.waiting_for_holder", repo=repo, commit=ref.commit[:12])
                announced = True
            if svc.clock() - waited_since > svc.settings.holder_wait:
                svc.gate.deny(skey)
                raise TransientSourceError(f"peers: {repo}@{ref.commit[:12]}: origin slots held by other nodes for "
                                           f"{svc.settings.holder_wait:g}s and still no torrent; retrying later")
            if svc.closing.wait(svc.settings.poll_interval):
                break
        svc.gate.deny(skey)
        raise NotFoundError(f"peers: no peer has {repo}@{ref.commit[:12]}")

    def fetch(self, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill, progress: Progress) -> None:
        torrent = plan.extras.get("torrent")
        if not isinstance(torrent, TorrentRef):
            raise SourceError(f"peers: plan for {plan.repo}@{plan.commit[:12]} was not resolved by the peers source")
        self.service.download(torrent, plan, entries, fill, progress)

    def with_subpath(self, subpath: str | None) -> PeerSource:
        """The same swarm, with PVC origins looking in a model's ``pvcSubpath`` (factory.for_model)."""
        origins = [o.with_subpath(subpath) if hasattr(o, "with_subpath") else o for o in self.origins]
        if all(a is b for a, b in zip(origins, self.origins, strict=True)):
            return self
        return PeerSource(self.service, origins, reference=self._reference)  # the original owns the service

    def close(self) -> None:
        if self._owns_service:
            self.service.stop()
