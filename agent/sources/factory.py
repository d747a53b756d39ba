"""Build sources from ``--source`` values. Imports are lazy so an unused source costs nothing."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence

from agent.core.schema import SOURCE_KINDS
from agent.errors import ConfigError
from agent.sources.base import Source, SourceRef, SourceSettings

# One module per kind, ``agent.sources.<kind>`` with an ``open_source``; SOURCE_KINDS is the one list
# (the CRD enum and the spec parser accept exactly these).
_MODULES = {kind: f"agent.sources.{kind}" for kind in SOURCE_KINDS}


def open_source(ref: SourceRef, settings: SourceSettings, *, stop: threading.Event | None = None) -> Source:
    """``stop`` is the agent's stop event: a source waiting to retry outside a fill (resolve) ends with it."""
    module_name = _MODULES.get(ref.kind)
    if module_name is None:
        raise ConfigError(f"--source {ref}: source type {ref.kind!r} is not available in this build")
    module = importlib.import_module(module_name)
    return module.open_source(ref, settings, stop=stop)  # type: ignore[no-any-return]


def open_sources(refs: list[SourceRef], settings: SourceSettings, *,
                 stop: threading.Event | None = None) -> list[Source]:
    if not any(r.kind == "peers" for r in refs):
        return [open_source(r, settings, stop=stop) for r in refs]
    # peers: the other sources are its origins (trusted digests, fills when no peer can), gated by slots
    from agent.sources.peers import open_peer_sources

    opened = {i: open_source(r, settings, stop=stop) for i, r in enumerate(refs) if r.kind != "peers"}
    return open_peer_sources(refs, opened, settings)


def for_model(sources: Sequence[Source], *, pvc_subpath: str | None = None) -> list[Source]:
    """The agent's sources as one model uses them: a PVC source looks in the model's ``pvcSubpath``
    (the peers source's PVC origin too)."""
    if not pvc_subpath:
        return list(sources)
    return [s.with_subpath(pvc_subpath) if s.kind in ("pvc", "peers") else s  # type: ignore[attr-defined]
            for s in sources]
