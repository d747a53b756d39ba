"""``HubSource``: the Hub (or an HF_ENDPOINT mirror) behind the one source interface.

Wires the parts: ``metadata`` resolves through huggingface_hub, ``client`` streams bytes with
Range resume, ``transfer`` runs hf_transfer for large files, ``xet`` covers Xet-only servers.
Retries are ``retry_call`` under ``settings.retry``, and every wait (a backoff, a 300 s
Retry-After) ends as soon as the fill stops, the agent stops or the source is closed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TypeVar

import structlog

from agent.cache.store import Fill
from agent.core.plan import FileEntry, ModelPlan
from agent.core.redact import strip_userinfo
from agent.core.spec import FileFilter
from agent.errors import Cancelled, IntegrityError, SourceError, TransientSourceError
from agent.log import register_secret
from agent.sources.base import Progress, SourceRef, SourceSettings, retry_source_call
from agent.sources.hub._hf import HfApi, bound_hub_session
from agent.sources.hub.classify import Abandoned, classify
from agent.sources.hub.client import HubClient, what_of
from agent.sources.hub.metadata import resolve_plan
from agent.sources.hub.transfer import HfTransfer, hf_transfer_installed
from agent.sources.hub.xet import fetch_xet

log = structlog.get_logger("agent.sources.hub")
T = TypeVar("T")
DEFAULT_ENDPOINT = "https://huggingface.co"
MiB = 1024 * 1024


class HubSource:
    """Satisfies ``agent.sources.base.Source`` for ``--source hub``.

    ``stop`` is the agent's stop event (waits outside a fill, such as resolve, end with it); ``wait``
    replaces the stop-aware wait between retries (tests record the delays instead of sleeping).
    """

    kind = "hub"

    def __init__(
        self,
        settings: SourceSettings,
        *,
        hf_transfer_min_size: int = 16 * MiB,
        hf_transfer_chunk_size: int = 16 * MiB,
        hf_transfer_max_files: int = 8,
        stop: threading.Event | None = None,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.endpoint = (settings.hf_endpoint or DEFAULT_ENDPOINT).rstrip("/")
        self.hf_transfer_min_size = hf_transfer_min_size
        self._token = settings.hf_token or None
        register_secret(self._token)
        self._stop = stop or threading.Event()
        self._closing = threading.Event()
        self._wait = wait
        # token=False: never fall back to HF_TOKEN or ~/.cache/huggingface/token behind config's back.
        self._api = HfApi(endpoint=self.endpoint, token=self._token or False, library_name="model-cache-agent")
        bound_hub_session(settings.timeout)
        self._client = HubClient(self.endpoint, self._token, self.label, timeout=settings.timeout,
                                 max_connections=max(settings.max_workers * 2, 8))
        self._transfer = HfTransfer(
            self._client, timeout=settings.timeout, attempts=settings.retry.attempts,
            chunk_size=hf_transfer_chunk_size, max_files=hf_transfer_max_files,
            threads=max(1, min(4, (os.cpu_count() or 1) // max(settings.max_workers, 1))))
        self._hf_transfer_ok = hf_transfer_installed()

    @property
    def label(self) -> str:
        """'hub', or 'hub:<mirror URL>' without any userinfo (the label is logged and stored in manifests)."""
        return "hub" if self.endpoint == DEFAULT_ENDPOINT else f"hub:{strip_userinfo(self.endpoint)}"

    def close(self) -> None:
        self._closing.set()
        self._transfer.kill_all()
        self._client.close()

    # -- retries ---------------------------------------------------------------------------------

    def _retrying(self, what: str, op: Callable[[], T], *, fill: Fill | None = None,
                  abandon: threading.Event | None = None, progressed: Callable[[], bool] | None = None) -> T:
        """``op`` under ``settings.retry``; a stop (the fill's, the agent's, ``close``) ends any wait at once."""
        return retry_source_call(
            op, policy=self.settings.retry, what=f"{what} at {self.label}", stop=self._stop, fill=fill,
            also=[e for e in (abandon, self._closing) if e is not None], wait=self._wait, progressed=progressed,
            classify=lambda e: classify(e, f"{what} at {self.label}", has_token=bool(self._token)))

    # -- metadata ----------------------------------------------------------------------------------

    def resolve(self, repo: str, revision: str, files: FileFilter) -> ModelPlan:
        """Pin ``revision`` to a commit and list the selected files with their Hub digests."""
        return resolve_plan(self._api, self._retrying, self.label, repo, revision, files,
                            timeout=self.settings.timeout)

    # -- bytes -------------------------------------------------------------------------------------

    def fetch(self, plan: ModelPlan, entries: Sequence[FileEntry], fill: Fill, progress: Progress) -> None:
        """Fetch ``entries`` with at most ``settings.max_workers`` files in flight; first error wins."""
        if not entries:
            return
        abandon = threading.Event()
        order = sorted(entries, key=lambda e: -e.size)  # big files first: they bound the total time
        with ThreadPoolExecutor(max(1, min(self.settings.max_workers, len(order))),
                                thread_name_prefix="hub-fetch") as pool:
            futures: list[Future[None]] = [
                pool.submit(self._fetch_file, plan, e, fill, progress, abandon) for e in order]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if not failed:
                return
            abandon.set()
            for f in futures:
                f.cancel()
            wait(futures)
        fill.check_stop()  # stopped: Cancelled, staged bytes kept
        errors = [f.exception() for f in futures if f.done() and not f.cancelled()
                  and f.exception() is not None and not isinstance(f.exception(), Abandoned | Cancelled)]
        if not errors:  # only abandoned files: close() was called (shutdown)
            raise TransientSourceError(f"{plan.repo}@{plan.commit[:12]} at {self.label}: source closed "
                                       "mid-fill; staged bytes are kept for a resume")
        raise errors[0]  # type: ignore[misc]

    def _fetch_file(self, plan: ModelPlan, entry: FileEntry, fill: Fill, progress: Progress,
                    abandon: threading.Event) -> None:
        """One file; a digest mismatch is retried once from scratch, then the model fails naming it."""
        blog = log.bind(repo=plan.repo, commit=plan.commit[:12], path=entry.path)
        for attempt in (1, 2):
            try:
                self._fetch_verified(plan, entry, fill, progress, abandon, careful=attempt == 2)
                return
            except IntegrityError as e:
                self._transfer.discard(fill, entry)
                if attempt == 2:
                    blog.error("hub.integrity_failed", error=str(e))
                    raise
                blog.warning("hub.integrity_retry", error=str(e))

    def _fetch_verified(self, plan: ModelPlan, entry: FileEntry, fill: Fill, progress: Progress,
                        abandon: threading.Event, *, careful: bool = False) -> None:
        staged = [fill.resume_offset(entry)]
        use_hf_transfer = [self._hf_transfer_ok and entry.size >= self.hf_transfer_min_size]

        def abandoned() -> bool:
            return abandon.is_set() or self._closing.is_set()

        def progressed() -> bool:
            now = fill.resume_offset(entry)
            moved = now > staged[0]
            staged[0] = now
            return moved

        def attempt() -> None:
            fill.check_stop()
            if abandoned():
                raise Abandoned(entry.path)
            self._transfer.salvage(fill, entry)
            offset = fill.resume_offset(entry)
            if offset == entry.size and entry.size > 0:
                fill.adopt(entry)  # staged in full by an earlier run, just never verified
            elif offset == 0 and use_hf_transfer[0]:
                use_hf_transfer[0] = False  # whatever happens, a retry streams (and resumes) over plain HTTP
                self._transfer.fetch(plan, entry, fill, progress, abandoned, hash_while_writing=not careful)
            else:
                try:
                    self._client.stream_into(plan, entry, fill, progress, offset, abandoned)
                except SourceError as e:
                    if e.reason.startswith("http_4") and fetch_xet(self._client, self._token, plan, entry, fill,
                                                                   progress):
                        return  # a Xet-only server refuses plain GETs
                    raise

        self._retrying(what_of(plan, entry), attempt, fill=fill, abandon=abandon, progressed=progressed)


def open_source(ref: SourceRef, settings: SourceSettings, *, stop: threading.Event | None = None) -> HubSource:
    """Factory used by the runtime for ``--source hub``."""
    if ref.kind != "hub":
        raise ValueError(f"not a hub source: {ref}")
    return HubSource(settings, stop=stop)
