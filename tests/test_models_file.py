"""The models file: checked against the CRD schema, never made worse by a bad edit, each error logged once."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml
from structlog.testing import capture_logs

from agent.core.desired import DesiredState
from agent.errors import ConfigError
from agent.models_file import ModelsFileProvider, parse_models
from tests.test_spec import crd_spec_schema

EXAMPLE = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "models.yaml"


def test_unknown_keys_name_the_key_and_the_model() -> None:
    state = parse_models("- {name: tiny, repo: org/tiny, revison: v1}\n"
                         "- {name: other, repo: org/other, prority: 5}\n"
                         "- {name: fine, repo: org/fine}\n", "models.yaml")
    assert sorted(state.models) == ["fine"]
    assert str(state.errors["tiny"]) == "models.yaml: model 'tiny': revison: unknown key (did you mean 'revision'?)"
    assert str(state.errors["other"]) == "models.yaml: model 'other': prority: unknown key (did you mean 'priority'?)"


def test_cachedmodel_objects_are_checked_like_the_api_server_would() -> None:
    doc = {"apiVersion": "modelcache.dev/v1alpha1", "kind": "CachedModel", "metadata": {"name": "q"},
           "spec": {"repo": "org/q", "sources": ["peerz"]}}
    state = parse_models(yaml.safe_dump_all([doc, {**doc, "metadata": {"name": "k"}, "kind": "Deployment"}]), "m.yaml")
    assert "spec.sources[0]: 'peerz' is not one of" in str(state.errors["q"])
    assert str(state.errors["k"]) == "m.yaml: model 'k': kind: 'Deployment' is not CachedModel"


def test_a_nameless_entry_is_named_by_position() -> None:
    state = parse_models("- {repo: org/x}\n", "m.yaml")
    assert str(state.errors["entry-1"]) == "m.yaml: entry 1: name: is required"


def test_models_mapping_allows_no_other_key() -> None:
    with pytest.raises(ConfigError, match=r"'models' must be a list and the only top-level key \(also found \['modl"):
        parse_models("models: []\nmodles: []\n", "m.yaml")


def test_example_file_is_valid_and_each_entry_is_a_valid_cachedmodel_spec() -> None:
    state = parse_models(EXAMPLE.read_text(), str(EXAMPLE))
    assert not state.errors and len(state.models) >= 3
    validator = jsonschema.Draft202012Validator(crd_spec_schema())
    for entry in yaml.safe_load(EXAMPLE.read_text()):
        spec = {k: v for k, v in entry.items() if k != "name"}
        assert list(validator.iter_errors(spec)) == []


# ------------------------------------------------------------------------------------ the provider, in run


class Recorder:
    def __init__(self) -> None:
        self.states: list[DesiredState] = []

    def __call__(self, state: DesiredState) -> None:
        self.states.append(state)


def provider(tmp_path: Path, text: str | bytes) -> tuple[Path, ModelsFileProvider, Recorder, DesiredState]:
    path = tmp_path / "models.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    rec = Recorder()
    p = ModelsFileProvider(path, rec)
    return path, p, rec, p.load()


GOOD = "- {name: a, repo: org/a, revision: v1}\n- {name: b, repo: org/b}\n"


def test_non_utf8_file_at_start_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models.yaml: not UTF-8 text \(byte 0xff at offset 9\)"):
        provider(tmp_path, b"- name: a\xff\n")


def test_an_entry_that_turns_invalid_keeps_its_last_good_spec_and_is_logged_once(tmp_path: Path) -> None:
    path, p, rec, first = provider(tmp_path, GOOD)
    assert first.models["a"].revision == "v1"
    with capture_logs() as logs:
        path.write_text("- {name: a, repo: org/a, revison: v2}\n- {name: b, repo: org/b, priority: 7}\n")
        p.reload()
        p.reload()  # the watcher fires again (atime, ConfigMap symlink swaps): nothing new
        path.write_text("- {name: a, repo: org/a, revison: v2}\n- {name: b, repo: org/b, priority: 8}\n")
        p.reload()  # another model changed; a's error is the same, not logged again
    latest = rec.states[-1]
    assert latest.models["a"].revision == "v1" and "a" not in latest.errors  # last good spec in force
    assert latest.models["b"].priority == 8
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [(e["event"], e["model"]) for e in errors] == [("models_file.entry_invalid_kept_last_good", "a")]
    assert "revison: unknown key" in errors[0]["error"]


def test_a_new_invalid_entry_is_reported_and_the_others_apply(tmp_path: Path) -> None:
    path, p, rec, _ = provider(tmp_path, GOOD)
    path.write_text(GOOD + "- {name: c, repo: org/c, sources: [torrent]}\n")
    p.reload()
    assert sorted(rec.states[-1].models) == ["a", "b"] and "c" in rec.states[-1].errors


@pytest.mark.parametrize("bad", [b"- name: [unclosed\n", b"- {name: a, repo: org/a}\n\xff\xfe", b"just text\n"])
def test_a_file_that_no_longer_parses_keeps_the_last_good_state_and_is_logged_once(tmp_path: Path, bad: bytes) -> None:
    path, p, rec, _ = provider(tmp_path, GOOD)
    with capture_logs() as logs:
        for _ in range(3):
            path.write_bytes(bad)
            p.reload()
    assert rec.states == []  # nothing replaced the last good state
    assert len([e for e in logs if e["log_level"] == "error"]) == 1, logs
    path.write_text(GOOD.replace("v1", "v3"))
    p.reload()
    assert rec.states[-1].models["a"].revision == "v3"


def test_an_unreadable_file_on_reload_is_logged_once(tmp_path: Path) -> None:
    path, p, rec, _ = provider(tmp_path, GOOD)
    path.unlink()
    path.mkdir()
    with capture_logs() as logs:
        p.reload()
        p.reload()
    assert rec.states == []
    assert [e["event"] for e in logs] == ["models_file.unreadable_kept_last_good"]
