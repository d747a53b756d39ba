"""Xet-only servers: huggingface_hub's own Xet download, then we hash like any other staged file.

Best effort and untested against a real Xet-only server (the loopback Hub never advertises Xet): it
runs only when a plain GET was refused with a 4xx and the resolve answer carries Xet metadata.
"""

from __future__ import annotations

from agent.cache.store import Fill
from agent.core.plan import FileEntry, ModelPlan
from agent.sources.base import Progress
from agent.sources.hub._hf import build_hf_headers, is_xet_available, parse_xet_file_data_from_response, xet_get
from agent.sources.hub.classify import classify
from agent.sources.hub.client import HubClient, what_of


def fetch_xet(client: HubClient, token: str | None, plan: ModelPlan, entry: FileEntry, fill: Fill,
              progress: Progress) -> bool:
    """True when the file was fetched over Xet; False when the server offers no Xet (or hf_xet is missing)."""
    if not is_xet_available():
        return False
    what = what_of(plan, entry)
    with client.request("HEAD", client.resolve_url(plan, entry), what, stop_at_foreign_redirect=True) as resp:
        xet = parse_xet_file_data_from_response(resp, endpoint=client.endpoint)  # type: ignore[arg-type]
    if xet is None:
        return False
    part = fill.part_path(entry)
    part.unlink(missing_ok=True)
    try:
        xet_get(incomplete_path=part, xet_file_data=xet, expected_size=entry.size,
                headers=build_hf_headers(token=token or False, library_name="model-cache-agent"),
                displayed_filename=entry.path)
    except Exception as exc:
        part.unlink(missing_ok=True)
        raise classify(exc, f"{what} (xet) at {client.label}", has_token=bool(token)) from exc
    progress.advance(entry.size)
    fill.adopt(entry)
    return True
