"""huggingface_hub names the Hub source relies on that the library does not promise to keep.

When an upgrade moves or reshapes one, this file fails naming it (instead of a fill failing in
production), and pyproject.toml's range is the one these tests passed on.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from agent.sources.hub._hf import PRIVATE

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(("module", "name"), PRIVATE, ids=[f"{m}.{n}" for m, n in PRIVATE])
def test_private_name_still_exists(module: str, name: str) -> None:
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"huggingface_hub {version('huggingface_hub')} no longer has {module}.{name} ({e}); "
                    "agent/sources/hub/_hf.py depends on it")
    assert obj is not None


def test_private_names_keep_the_shape_we_use() -> None:
    from huggingface_hub._tree_cache import TREE_CACHE_FORMAT_VERSION, TreeCacheEntry
    from huggingface_hub.file_download import xet_get
    from huggingface_hub.utils._http import hf_request_event_hook

    assert TREE_CACHE_FORMAT_VERSION == 1, "trees/<commit>.json format changed: check Fill.publish's trees_json"
    fields = {f.name for f in dataclasses.fields(TreeCacheEntry)}
    assert {"size", "blob_id", "lfs_sha256", "lfs_size", "xet_hash"} <= fields, fields
    assert TreeCacheEntry(size=1, blob_id="a" * 40).to_json() == {"size": 1, "blob_id": "a" * 40}
    assert {"incomplete_path", "xet_file_data", "headers", "expected_size", "displayed_filename"} <= set(
        inspect.signature(xet_get).parameters)
    assert list(inspect.signature(hf_request_event_hook).parameters) == ["request"]


def test_installed_version_is_inside_the_pinned_range() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name.replace("_", "-") == "huggingface-hub"]
    assert req.specifier.contains(version("huggingface_hub")), (req, version("huggingface_hub"))
    assert req.specifier.contains("9.0") is False, "the range must have an upper bound: private names move"
