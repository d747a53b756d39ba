"""Spec parsing: each bad field is named; good specs round-trip into ModelSpec."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import agent.sources
from agent import crdgen
from agent.core.schema import SOURCE_KINDS, SPEC_SCHEMA, check
from agent.core.spec import (
    FileFilter,
    is_commit,
    parse_model_spec,
    validate_glob,
    validate_label_prefix,
    validate_model_name,
    validate_repo_id,
    validate_revision,
)
from agent.errors import SpecError

CRD = Path(__file__).resolve().parents[1] / "manifests" / "crd.yaml"

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
        ({"spec": {**GOOD["spec"], "files": {"allow": "ok"}}}, "spec.files.allow"),
        ({"spec": {**GOOD["spec"], "files": {"deny": []}}}, "spec.files.deny"),
        ({"spec": {**GOOD["spec"], "files": {"allow": [""]}}}, "spec.files.allow[0]"),
        ({"spec": {**GOOD["spec"], "sources": ["ftp"]}}, "spec.sources[0]"),
        ({"spec": {**GOOD["spec"], "revison": "main"}}, "spec.revison"),
        ({"spec": {**GOOD["spec"], "priority": 10**7}}, "spec.priority"),
        ({"spec": {**GOOD["spec"], "nodeSelector": {"matchExpressions": [{"key": "k", "operator": "In"}]}}},
         "spec.nodeSelector.matchExpressions[0].values"),
        ({"kind": "Deployment"}, "kind"),
        ({"metdata": {}}, "metdata"),
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


# ------------------------------------------------------------------ hostile values: every validator, fullmatch

HOSTILE_SUFFIXES = ["\n", "\r", "\x00", "\r\n", " "]
# Cyrillic a/o, fullwidth Q/m, dotless i: written as escapes so the source shows what they are
LOOKALIKES = {"\u0430": "a", "\u043e": "o", "\uff31": "Q", "\u0131": "i", "\uff4d": "m"}


def _hostile(good: str) -> list[str]:
    out = [good + s for s in HOSTILE_SUFFIXES] + [s + good for s in HOSTILE_SUFFIXES]
    out += [good.replace(ascii_, fake, 1) for fake, ascii_ in LOOKALIKES.items() if ascii_ in good]
    return out


VALIDATORS = {
    "repo": (validate_repo_id, "Qwen/Qwen3-0.6B", "o/" + "m" * 97),
    "revision": (validate_revision, "main", "b" * 256),
    "commit revision": (validate_revision, "a" * 40, "a" * 40 + "/" + "b" * 215),
    "model name": (validate_model_name, "qwen3-0-6b", "m" * 64),
    "label prefix": (validate_label_prefix, "modelcache.dev", "a" * 254),
    "glob": (lambda v, f="allow": validate_glob(v, f), "model-*.safetensors", "*" * 1025),
}


@pytest.mark.parametrize("name", list(VALIDATORS))
def test_validators_reject_control_chars_lookalikes_and_overlong(name: str) -> None:
    fn, good, overlong = VALIDATORS[name]
    assert fn(good) == good
    bad = [v for v in _hostile(good) if not (name == "glob" and v.strip(" ") == good)] + [overlong]
    if name == "glob":  # a glob may hold spaces and any letter, but no control character or NUL
        bad = [v for v in bad if any(ord(c) < 32 for c in v)] + [overlong, "/abs/*"]
    for value in bad:
        with pytest.raises(SpecError) as ei:
            fn(value)
        assert repr(value)[:30] in str(ei.value) or "characters" in str(ei.value), str(ei.value)


def test_trailing_newline_commit_is_not_a_commit() -> None:
    assert not is_commit("a" * 40 + "\n")


@pytest.mark.parametrize("field", ["repo", "revision", "name"])
def test_spec_fields_reject_trailing_newline(field: str) -> None:
    good = {"name": "tiny", "repo": "org/tiny", "revision": "main"}
    with pytest.raises(SpecError) as ei:
        parse_model_spec({**good, field: good[field] + "\n"})
    assert ei.value.field == field


# ------------------------------------------------------------------------ the schema: one source of truth


def test_unknown_keys_are_named_with_a_suggestion() -> None:
    with pytest.raises(SpecError) as ei:
        parse_model_spec({"name": "tiny", "repo": "org/tiny", "revison": "v1", "prority": 5},
                         where="models.yaml: model 'tiny': ")
    msg = str(ei.value)
    assert msg.startswith("models.yaml: model 'tiny': revison: unknown key (did you mean 'revision'?)")
    assert "prority: unknown key (did you mean 'priority'?)" in msg


def test_source_kinds_the_agent_does_not_implement_are_rejected() -> None:
    with pytest.raises(SpecError, match=r"sources\[0\]: 'torrent' is not one of"):
        parse_model_spec({"name": "tiny", "repo": "org/tiny", "sources": ["torrent"]})
    for kind in SOURCE_KINDS:
        assert parse_model_spec({"name": "tiny", "repo": "org/tiny", "sources": [kind]}).sources == (kind,)


def test_source_kinds_is_the_factory_registry() -> None:
    """Every kind has a module with ``open_source``, and every source module is a kind: one list."""
    from agent.sources import factory

    assert set(factory._MODULES) == set(SOURCE_KINDS)
    modules = {m.name for m in pkgutil.iter_modules(agent.sources.__path__)}
    with_open = {m for m in modules - {"factory", "base"} if not m.startswith("_")
                 and hasattr(importlib.import_module(f"agent.sources.{m}"), "open_source")}
    assert with_open == set(SOURCE_KINDS), "add the new kind to agent.core.schema.SOURCE_KINDS, then run " \
                                           "python -m agent.crdgen"


def crd_spec_schema() -> dict[str, Any]:
    (crd,) = [d for d in yaml.safe_load_all(CRD.read_text()) if d]
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]  # type: ignore[no-any-return]


def test_crd_spec_schema_is_the_package_schema() -> None:
    assert crd_spec_schema() == SPEC_SCHEMA
    assert crdgen.sync(CRD.read_text()) == CRD.read_text(), "run: python -m agent.crdgen"
    assert crd_spec_schema()["properties"]["sources"]["items"]["enum"] == list(SOURCE_KINDS)


def test_crdgen_rewrites_only_the_marked_block(tmp_path: Path) -> None:
    stale = CRD.read_text().replace("maxLength: 193", "maxLength: 999")
    path = tmp_path / "crd.yaml"
    path.write_text(stale)
    assert crdgen.main([str(path), "--check"]) == 1
    assert crdgen.main([str(path)]) == 0
    assert path.read_text() == CRD.read_text()


SCHEMA_CASES: list[dict[str, Any]] = [
    {"repo": "org/m"},
    {"repo": "org/m", "revision": "v1.0", "priority": -5, "sources": ["hub", "pvc"]},
    {"repo": "org/m", "files": {"allow": ["*.json"], "ignore": ["x/"]}},
    {"repo": "org/m", "nodeSelector": {"matchLabels": {"a": "b"},
                                       "matchExpressions": [{"key": "k", "operator": "Exists"}]}},
    {},
    {"repo": 5},
    {"repo": "org/m", "revision": ""},
    {"repo": "org/m", "revision": "a" * 256},
    {"repo": "org/m", "priority": 1.5},
    {"repo": "org/m", "priority": 2_000_000},
    {"repo": "org/m", "priority": "high"},
    {"repo": "org/m", "sources": ["s3"]},
    {"repo": "org/m", "sources": "hub"},
    {"repo": "org/m", "files": {"allow": [""]}},
    {"repo": "org/m", "files": {"allow": ["x" * 1025]}},
    {"repo": "org/m", "files": {"allow": ["*"] * 257}},
    {"repo": "org/m", "nodeSelector": {"matchLabels": {"a": 1}}},
    {"repo": "org/m", "nodeSelector": {"matchExpressions": [{"key": "k", "operator": "Near"}]}},
    {"repo": "org/m", "nodeSelector": {"matchExpressions": [{"operator": "Exists"}]}},
    {"repo": "a/" + "b" * 97},
]


@pytest.mark.parametrize("i", range(len(SCHEMA_CASES)))
def test_our_schema_check_agrees_with_jsonschema(i: int) -> None:
    """The small OpenAPI checker the agent ships gives the same verdict as a full JSON Schema validator."""
    value = SCHEMA_CASES[i]
    theirs = list(jsonschema.Draft202012Validator(crd_spec_schema()).iter_errors(value))
    assert bool(check(SPEC_SCHEMA, value)) == bool(theirs), (check(SPEC_SCHEMA, value), theirs)


def test_schema_check_is_stricter_where_the_api_server_is() -> None:
    # unknown keys: kubectl's strict field validation refuses them, JSON Schema would not
    assert check(SPEC_SCHEMA, {"repo": "org/m", "revison": "x"}) == [("revison", "unknown key (did you mean "
                                                                                 "'revision'?)")]
    # Go's regexp '$' does not match before a trailing newline; Python's re.search with '$' does
    assert check(SPEC_SCHEMA, {"repo": "org/m\n"})
    assert check(SPEC_SCHEMA, {"repo": "org/m", "sources": ["hub", "hub"]}) == [("sources", "'hub' is listed twice")]
    assert check(SPEC_SCHEMA, {"repo": "org/m", "revision": None, "priority": None}) == []
