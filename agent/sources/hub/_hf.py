"""Every huggingface_hub name the Hub source uses, in one place, with the private ones listed.

huggingface_hub gives no stability promise for underscore modules, yet three things we need live
only there: the tree-cache format (so a snapshot we publish is one huggingface_hub 2.x treats as
complete), its request hook (offline mode, request ids) for the bounded client we install, and the
Xet availability probe. ``PRIVATE`` lists them; ``tests/test_hf_private_api.py`` imports each one by
name and checks the shape we rely on, so an upgrade that moves one fails there, naming it, instead of
somewhere in a fill. pyproject.toml pins the range those tests ran against.
"""

from __future__ import annotations

import logging

import httpx2
from huggingface_hub import HfApi, set_client_factory
from huggingface_hub._tree_cache import TREE_CACHE_FORMAT_VERSION, TreeCacheEntry
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.file_download import xet_get
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils import build_hf_headers, parse_xet_file_data_from_response
from huggingface_hub.utils._runtime import is_xet_available

# (module, name): the non-public names imported above (or used through ``hf_http``)
PRIVATE: tuple[tuple[str, str], ...] = (
    ("huggingface_hub._tree_cache", "TREE_CACHE_FORMAT_VERSION"),
    ("huggingface_hub._tree_cache", "TreeCacheEntry"),
    ("huggingface_hub.utils._http", "hf_request_event_hook"),
    ("huggingface_hub.utils._runtime", "is_xet_available"),
    ("huggingface_hub.file_download", "xet_get"),  # public module, but not in the package's __all__
)

__all__ = [
    "TREE_CACHE_FORMAT_VERSION", "HfApi", "HfHubHTTPError", "OfflineModeIsEnabled", "RepoFile", "TreeCacheEntry",
    "bound_hub_session", "build_hf_headers", "is_xet_available", "parse_xet_file_data_from_response", "xet_get",
]


class _BoundedTransport(httpx2.HTTPTransport):
    """Applies a timeout to requests that were sent with none (``timeout=None`` disables the client's)."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self._timeout = httpx2.Timeout(seconds).as_dict()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        current = request.extensions.get("timeout") or {}
        if all(v is None for v in current.values()):
            request.extensions["timeout"] = self._timeout
        return super().handle_request(request)


def bound_hub_session(seconds: float) -> None:
    """Give huggingface_hub's shared HTTP client a timeout (its default is None).

    ``list_repo_tree`` pages are fetched with ``timeout=None``, so a server that accepts the connection and
    never answers would hang the fill forever. The client is process-wide, so this setting is too.
    """

    def factory() -> httpx2.Client:
        return httpx2.Client(event_hooks={"request": [hf_http.hf_request_event_hook]}, follow_redirects=True,
                             timeout=httpx2.Timeout(seconds), transport=_BoundedTransport(seconds))

    set_client_factory(factory)


def route_library_logs() -> None:
    """Drop the plain-text stderr handler huggingface_hub attaches at import: its records still propagate
    to the root logger, which ``agent.log`` renders (JSON or console, redacted) like our own lines."""
    lib = logging.getLogger("huggingface_hub")
    for handler in [h for h in lib.handlers if type(h) is logging.StreamHandler]:
        lib.removeHandler(handler)


route_library_logs()
