"""What is in a cache, as rows for ``status`` (table or JSON). Pure formatting over store reads."""

from __future__ import annotations

import datetime as dt
from typing import Any

from agent.cache.store import Store


def status_rows(store: Store, repo: str | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for m in store.manifests():
        if repo and m.repo != repo:
            continue
        rep = store.check(m)
        rows.append({
            "repo": m.repo,
            "revisions": m.refs,
            "commit": m.commit,
            "files": len(m.files),
            "bytes": m.total_bytes,
            "level": m.level,
            "verified_at": dt.datetime.fromtimestamp(m.verified_at, dt.UTC).isoformat(timespec="seconds"),
            "source": m.source,
            "state": "ok" if rep.ok else "damaged",
            "problems": rep.problems(),
        })
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["REPO", "REVISIONS", "COMMIT", "FILES", "SIZE", "LEVEL", "VERIFIED-AT", "STATE"]
    body = [
        [r["repo"], ",".join(r["revisions"]) or "-", r["commit"][:12], str(r["files"]), human_bytes(r["bytes"]),
         r["level"], r["verified_at"], r["state"]]
        for r in rows
    ]
    if not body:
        return "no models in cache"
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *body]]
    return "\n".join(lines)
