"""Spec parsing: each bad field is named; good specs round-trip into ModelSpec."""

from __future__ import annotations

import pytest

from agent.core.spec import FileFilter, is_commit, name_from_repo, parse_model_spec, validate_revision
from agent.errors import SpecError

GOOD = {
    "apiVersion": "modelcache.dev/v1alpha1",
    "kind": "CachedModel",
    "metadata": {"name": "qwen3-0-6b"},
    "spec": {
        "repo": "Qwen/Qwen3-0.6B",
        "revision": "main",
        "nodeSelector": {"matchLabels": {"nvidia.com/gpu.present": "true"}},
        "files": {"allow": ["*.json", "*.safetensors", "tokenizer*"], "ignore": []},
        "sources": ["modelexpress", "pvc", "hub"],
        "priority": 100,
    },
}


def test_cachedmodel_object_parses() -> None:
    s = parse_model_spec(GOOD)
    assert (s.name, s.repo, s.revision, s.priority) == ("qwen3-0-6b", "Qwen/Qwen3-0.6B", "main", 100)
    assert s.sources == ("modelexpress", "pvc", "hub")
    assert s.files.matches("model-00001-of-00002.safetensors")
    assert not s.files.matches("README.md")


def test_bare_spec_with_name_parses() -> None:
    s = parse_model_spec({"name": "tiny", "repo": "org/tiny"})
    assert (s.name, s.revision, s.files) == ("tiny", "main", FileFilter())


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"metadata": {"name": "x" * 64}}, "metadata.name"),
        ({"metadata": {"name": "Upper"}}, "metadata.name"),
        ({"spec": {**GOOD["spec"], "repo": "no-org"}}, "spec.repo"),
        ({"spec": {**GOOD["spec"], "repo": "org/a--b"}}, "spec.repo"),
        ({"spec": {**GOOD["spec"], "revision": "a..b"}}, "spec.revision"),
        ({"spec": {**GOOD["spec"], "revision": "feature branch"}}, "spec.revision"),
        ({"spec": {**GOOD["spec"], "files": {"allow": "ok", "deny": []}}}, "spec.files"),
        ({"spec": {**GOOD["spec"], "files": {"allow": [""]}}}, "spec.files.allow"),
        ({"spec": {**GOOD["spec"], "sources": ["ftp"]}}, "spec.sources"),
        ({"spec": {**GOOD["spec"], "priority": "high"}}, "spec.priority"),
        ({"spec": {**GOOD["spec"], "nodeSelector": ["a"]}}, "spec.nodeSelector"),
    ],
)
def test_bad_field_is_named(patch: dict, field: str) -> None:
    with pytest.raises(SpecError) as ei:
        parse_model_spec({**GOOD, **patch}, where="models.yaml[3].")
    assert ei.value.field == f"models.yaml[3].{field}"
    assert str(ei.value).startswith(f"models.yaml[3].{field}:")


@pytest.mark.parametrize("rev", ["main", "v1.0", "refs/pr/1", "a" * 40, "release/2024-01"])
def test_valid_revisions(rev: str) -> None:
    assert validate_revision(rev) == rev


@pytest.mark.parametrize("rev", ["", "-x", "a..b", "x.lock", "a b", "a:b", "/abs", "tail/", "a@{1}", ".hidden"])
def test_invalid_revisions(rev: str) -> None:
    with pytest.raises(SpecError):
        validate_revision(rev)


def test_commit_detection() -> None:
    assert is_commit("0" * 40)
    assert not is_commit("0" * 39) and not is_commit("G" * 40) and not is_commit("A" * 40)


def test_name_from_repo_is_a_label() -> None:
    assert name_from_repo("Qwen/Qwen3-0.6B") == "qwen3-0-6b"
    long = name_from_repo("org/" + "x" * 90)
    assert len(long) <= 63 and long == name_from_repo("org/" + "x" * 90)
    assert name_from_repo("org/" + "x" * 90) != name_from_repo("org/" + "x" * 91)


def test_filter_trailing_slash_means_folder() -> None:
    f = FileFilter(allow=("original/",))
    assert f.matches("original/params.json") and not f.matches("config.json")
    assert not FileFilter(ignore=("*.md",)).matches("README.md")


@pytest.mark.parametrize("bad", ["org/name\n", "org/../x", "/abs", "org//name", "", "org/na me", "a" * 1025])
def test_pvc_subpath_is_a_plain_relative_folder(bad: str) -> None:
    with pytest.raises(SpecError, match=r"spec\.pvcSubpath"):
        parse_model_spec({"metadata": {"name": "m"}, "spec": {"repo": "org/name", "pvcSubpath": bad}})
    ok = parse_model_spec({"metadata": {"name": "m"}, "spec": {"repo": "org/name", "pvcSubpath": "team/org/name"}})
    assert ok.pvc_subpath == "team/org/name"
