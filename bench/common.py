"""Helpers every benchmark shares: size arguments and a cold page cache."""

from __future__ import annotations

import argparse
import os

from agent.config import parse_size as _parse_size
from agent.errors import ConfigError


def parse_size(text: str) -> int:
    """'2G', '512M', '1.5GiB' or plain bytes (binary units); an argparse ``type``."""
    try:
        return _parse_size(text, "size")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def drop_caches() -> str | None:
    """Flush dirty pages and drop the page cache; returns why it could not (then "cold" is really warm)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None
