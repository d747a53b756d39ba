"""``model-cache-agent demo``: the whole fill path with no cluster and no network.

Makes a small real model in Hub cache layout inside a temporary "PVC", fills a temporary node
cache from it, verifies every byte, proves huggingface_hub loads it offline, and prints status.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from agent.cache.store import Store
from agent.core.spec import FileFilter
from agent.modelgen import MiB, make_hub_model
from agent.progress import for_terminal
from agent.runtime.fill import fill_model
from agent.sources.pvc import PvcSource
from agent.status import format_table, status_rows

DEMO_REPO = "demo/tiny-llama"


def run_demo(workdir: Path | None = None, *, size: int = 50 * MiB, keep: bool = False) -> int:
    base = workdir or Path(tempfile.mkdtemp(prefix="model-cache-demo-"))
    try:
        pvc = base / "pvc"
        cache = base / "cache"
        print(f"1. writing a tiny real model ({size // MiB} MiB of safetensors) as an HF cache in {pvc}")
        commit = make_hub_model(pvc / "hub", DEMO_REPO, weight_bytes=size, shards=2, refs=("main", "v1.0"))
        store = Store(cache)
        print(f"2. filling {cache} from pvc:{pvc} (one read pass: copy + sha256/git-sha1 + xxh3)")
        res = fill_model(store, [PvcSource(pvc)], DEMO_REPO, "main", FileFilter(),
                         progress=for_terminal(DEMO_REPO))
        print(f"   {res.fetched_files} files, {res.fetched_bytes} bytes in {res.seconds:.2f}s "
              f"from {res.source}; level={res.manifest.level}")
        fill_model(store, [PvcSource(pvc)], DEMO_REPO, "v1.0", FileFilter())
        print("3. verifying every file against its Hub digest (verify --full)")
        rep = store.check(res.manifest, full=True)
        if not rep.ok:
            print("   FAILED: " + "; ".join(rep.problems()))
            return 1
        print(f"   ok: {rep.bytes_read} bytes re-read, 0 mismatches")
        print("4. loading it the way workers do (huggingface_hub, HF_HUB_OFFLINE style, local files only)")
        from huggingface_hub import scan_cache_dir, snapshot_download

        path = snapshot_download(DEMO_REPO, revision="main", cache_dir=cache / "hub", local_files_only=True)
        scan = scan_cache_dir(cache / "hub")
        assert Path(path).name == commit, (path, commit)
        print(f"   snapshot_download -> {path}")
        print(f"   scan_cache_dir: {len(scan.repos)} repo(s), {len(scan.warnings)} warning(s)")
        print("5. status")
        print(format_table(status_rows(store)))
        return 0 if not scan.warnings else 1
    finally:
        if workdir is None and not keep:
            shutil.rmtree(base, ignore_errors=True)
        elif keep:
            print(f"(kept {base})")
