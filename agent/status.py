"""What is in a cache, as rows for ``status`` (table or JSON). Pure formatting over store reads.

Besides published snapshots, each row says how many bytes an unfinished fill left staged for that
repo (``.agent/staging/<repo-folder>``): after Ctrl-C this is what the next fill can build on.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from agent.cache.layout import repo_from_folder_name
from agent.cache.store import Store
from agent.errors import CorruptStateError


def staged_by_repo(store: Store) -> dict[str, int]:
    """{repo: staged bytes} for every repo with something in staging."""
    try:
        names = sorted(os.listdir(store.layout.staging_root))
    except OSError:
        return {}
    sizes = {repo: store.staged_bytes(repo) for n in names if (repo := repo_from_folder_name(n)) is not None}
    return {repo: size for repo, size in sizes.items() if size}


def corrupt_manifests(store: Store, repo: str | None = None) -> list[tuple[str, str, CorruptStateError]]:
    """(repo, commit, error) for every manifest that cannot be read or parsed: damage, not an empty cache."""
    errors: list[CorruptStateError] = []
    store.manifests(repo, errors=errors)
    out = []
    for e in errors:
        path = Path(e.path)
        out.append((repo_from_folder_name(path.parent.name) or path.parent.name, path.stem, e))
    return out


def status_rows(store: Store, repo: str | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    staged = staged_by_repo(store)
    for m in store.manifests(repo):
        rep = store.check(m)
        rows.append({
            "repo": m.repo,
            "revisions": m.refs,
            "commit": m.commit,
            "files": len(m.files),
            "bytes": m.total_bytes,
            "staged_bytes": staged.pop(m.repo, 0),
            "level": m.level,
            "verified_at": dt.datetime.fromtimestamp(m.verified_at, dt.UTC).isoformat(timespec="seconds"),
            "source": m.source,
            "state": "ok" if rep.ok else "damaged",
            "problems": rep.problems(),
        })
    for name, commit, err in corrupt_manifests(store, repo):
        rows.append({"repo": name, "revisions": [], "commit": commit, "files": 0, "bytes": 0,
                     "staged_bytes": staged.pop(name, 0), "level": "", "verified_at": "", "source": "",
                     "state": "corrupt", "problems": [str(err)]})
    for name, size in staged.items():  # a fill that never published: only staged bytes so far
        if not repo or name == repo:
            rows.append({"repo": name, "revisions": [], "commit": "", "files": 0, "bytes": 0, "staged_bytes": size,
                         "level": "", "verified_at": "", "source": "", "state": "partial", "problems": []})
    return rows


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ["REPO", "REVISIONS", "COMMIT", "FILES", "SIZE", "STAGED", "LEVEL", "VERIFIED-AT", "STATE"]
    body = [
        [r["repo"], ",".join(r["revisions"]) or "-", r["commit"][:12] or "-", str(r["files"]), human_bytes(r["bytes"]),
         human_bytes(r["staged_bytes"]) if r["staged_bytes"] else "-", r["level"] or "-", r["verified_at"] or "-",
         r["state"]]
        for r in rows
    ]
    if not body:
        return "no models in cache"
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=False)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *body]]
    return "\n".join(lines)
