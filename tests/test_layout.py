"""Path math and path-trick rejection (pure)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.cache.layout import CacheLayout, blob_link_target, repo_folder_name, repo_from_folder_name, safe_relpath
from agent.errors import UnsafePathError


def test_repo_folder_roundtrip() -> None:
    assert repo_folder_name("Qwen/Qwen3-0.6B") == "models--Qwen--Qwen3-0.6B"
    assert repo_from_folder_name("models--Qwen--Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    assert repo_from_folder_name("datasets--a--b") is None


@pytest.mark.parametrize(
    "bad",
    ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a\\..\\b", "a\x00b", "x/", "a/\nb", "a/" + "b" * 300],
)
def test_unsafe_paths_rejected(bad: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_relpath(bad)


@pytest.mark.parametrize("good", ["config.json", "original/params.json", "a/b/c.d", "..hidden-but-ok", "x..y"])
def test_safe_paths_accepted(good: str) -> None:
    assert safe_relpath(good) == good


def test_blob_link_target_resolves_into_blobs(tmp_path: Path) -> None:
    lay = CacheLayout(tmp_path)
    for rel in ["config.json", "original/params.json", "a/b/c/d.bin"]:
        link = lay.snapshot_file("org/m", "c" * 40, rel)
        target = blob_link_target(rel, "e" * 40)
        resolved = os.path.normpath(os.path.join(link.parent, target))
        assert resolved == str(lay.blob_path("org/m", "e" * 40))
