"""Build sources from ``--source`` values. Imports are lazy so an unused source costs nothing."""

from __future__ import annotations

import importlib

from agent.errors import ConfigError
from agent.sources.base import Source, SourceRef, SourceSettings

_MODULES = {"pvc": "agent.sources.pvc", "hub": "agent.sources.hub", "modelexpress": "agent.sources.modelexpress"}


def open_source(ref: SourceRef, settings: SourceSettings) -> Source:
    module_name = _MODULES.get(ref.kind)
    if module_name is None:
        raise ConfigError(f"--source {ref}: source type {ref.kind!r} is not available in this build")
    module = importlib.import_module(module_name)
    return module.open_source(ref, settings)  # type: ignore[no-any-return]


def open_sources(refs: list[SourceRef], settings: SourceSettings) -> list[Source]:
    return [open_source(r, settings) for r in refs]
