"""watchdog observer on hub/: a change marks a model dirty for an immediate re-check.

Only the *fact* of a change crosses into the loop (repo + blob names); the loop decides what it
means by re-checking from disk, so the agent's own writes cannot cause a loop (checks never write).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent.cache.layout import repo_from_folder_name


def hub_change(hub: Path, path: str) -> tuple[str, str | None] | None:
    """Map a changed path under hub/ to (repo, blob name or None). Pure; ignores everything else."""
    try:
        rel = Path(path).relative_to(hub)
    except ValueError:
        return None
    parts = rel.parts
    if not parts:
        return None
    repo = repo_from_folder_name(parts[0])
    if repo is None:
        return None
    blob = parts[2] if len(parts) >= 3 and parts[1] == "blobs" else None
    return repo, blob


class _HubHandler(FileSystemEventHandler):
    def __init__(self, hub: Path, on_change: Callable[[str, set[str]], None]) -> None:
        self.hub = hub
        self.on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads by workers are not changes
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        for p in paths:
            if not p:
                continue
            hit = hub_change(self.hub, p if isinstance(p, str) else p.decode())
            if hit:
                repo, blob = hit
                self.on_change(repo, {blob} if blob else set())


class HubWatcher:
    """Recursive inotify watch on hub/ (created if missing)."""

    def __init__(self, hub: Path, on_change: Callable[[str, set[str]], None]) -> None:
        hub.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(_HubHandler(hub, on_change), str(hub), recursive=True)

    def start(self) -> HubWatcher:
        self._observer.start()
        return self

    def alive(self) -> bool:
        return self._observer.is_alive()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
