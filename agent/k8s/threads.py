"""The one way the Kubernetes parts run in the background: a daemon thread, woken when stop is set."""

from __future__ import annotations

import threading
from collections.abc import Callable


def start_daemon(run: Callable[[], None], name: str, stop: threading.Event,
                 on_stop: Callable[[], None]) -> threading.Thread:
    """Start ``run`` in a daemon thread; when ``stop`` is set, ``on_stop`` runs at once (set the thread's wake
    event, cut an open watch), so a thread sleeping until its next deadline ends promptly."""
    threading.Thread(target=lambda: (stop.wait(), on_stop()), name=f"{name}-stop", daemon=True).start()
    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
