"""Who is warm, read from Node labels: the data behind ``model-cache-agent coverage``.

Labels are the contract workers schedule on, so coverage is read from them (not from agents'
own reports): what this shows is exactly what a ``nodeSelector`` would see.
"""

from __future__ import annotations

from typing import Any

from agent.core.selector import model_states
from agent.k8s.client import READ_BACKOFF, Backoff, KubeApi, call, retrying


def read_coverage(
    api: KubeApi, prefix: str = "modelcache.dev", *, page: int = 500, backoff: Backoff = READ_BACKOFF
) -> list[tuple[str, dict[str, str]]]:
    """[(node name, {model: label value})] for every Node, sorted by node; paged so big clusters work."""
    nodes: list[tuple[str, dict[str, str]]] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"limit": page}
        if token:
            kwargs["_continue"] = token
        body = retrying(
            lambda kw=kwargs: call(api.core.list_node, what="list nodes", timeout=api.request_timeout, **kw),  # type: ignore[misc]
            what="list nodes",
            backoff=backoff,
        )
        for item in body.get("items") or []:
            meta = item.get("metadata") or {}
            nodes.append((str(meta.get("name", "")), model_states(meta.get("labels") or {}, prefix)))
        token = (body.get("metadata") or {}).get("continue") or None
        if not token:
            break
    return sorted(nodes)
