"""The ``peers`` source: a BitTorrent swarm among the agents (libtorrent), never trusted for content.

    settings.py  PeerSettings, PeerAddr (no libtorrent import: config reads these)
    slots.py     OriginSlots (LocalSlots, DirSlots), OriginGate, SlottedSource
    index.py     the HTTP torrent index (plan key -> info dict)
    service.py   PeerService: the libtorrent session (seed, download, alerts)
    source.py    PeerSource: the Source protocol on top of the service
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.errors import ConfigError

if TYPE_CHECKING:  # base.py imports settings.py from this package: keep this module free of base at import
    from agent.sources.base import Source, SourceRef, SourceSettings


def open_source(ref: SourceRef, settings: SourceSettings, **_: object) -> Source:
    raise ConfigError(f"--source {ref}: the peers source is built with its origins (agent.sources.factory)")


def open_peer_sources(refs: list[SourceRef], opened: dict[int, Source], settings: SourceSettings) -> list[Source]:
    """Sources in ``refs`` order: the peers source (with one PeerService for the agent) and the
    other sources, which become its origins and are gated by origin slots."""
    from agent.sources.peers.service import PeerService
    from agent.sources.peers.settings import PeerSettings
    from agent.sources.peers.slots import SlottedSource
    from agent.sources.peers.source import PeerSource

    service = PeerService(settings.peers or PeerSettings())
    origins = [opened[i] for i in sorted(opened)]
    peer = PeerSource(service, origins, owns_service=True)
    out: list[Source] = []
    for i, r in enumerate(refs):
        out.append(peer if r.kind == "peers" else SlottedSource(opened[i], service.gate, service))
    return out
