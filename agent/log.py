"""structlog setup: readable lines on a TTY, one JSON object per line otherwise (for log shippers).

Libraries log through the standard ``logging`` module (httpx2's ``HTTP Request:`` lines,
huggingface_hub's warnings); their records go through the same processors and renderer as ours, so
a JSON log stays one JSON object per line. Every line, ours or theirs, passes ``redact`` last:
URL userinfo, Authorization values, Hub tokens and the secrets registered here never reach the log.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from agent.core.redact import redact

_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Mask this exact string in every log line from now on (a token read from a file or the env)."""
    if value:
        _secrets.add(value)


def redact_text(text: str) -> str:
    """``redact`` with every registered secret: for messages built outside the log (errors, output)."""
    return redact(text, _secrets)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value, _secrets)
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, BaseException):
        return redact(str(value), _secrets)
    return value


def _redact_event(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        event[key] = _scrub(value)
    return event


class _AgentHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler ``configure`` installed, so a second call replaces it instead of doubling lines."""


def configure(*, level: str = "info", stream: TextIO | None = None, json: bool | None = None) -> None:
    stream = stream or sys.stderr
    if json is None:
        json = not stream.isatty()
    lvl = getattr(logging, level.upper(), logging.INFO)
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    handler = _AgentHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, structlog.processors.add_log_level, timestamper],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
        ],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _AgentHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(lvl)
