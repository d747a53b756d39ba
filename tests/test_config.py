"""Settings: every number is finite and in range wherever it comes from; cache roots are checked up front."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import pytest

from agent.cli import build_parser
from agent.config import (
    RUN_NUMBERS,
    check_readable_root,
    check_writable_root,
    load_run_settings,
    number,
    parse_size,
)
from agent.errors import ConfigError

ENV = {"NODE_NAME": "n1"}


def run_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", "--source", "hub", *extra])


def settings_with_file(tmp_path: Path, text: str) -> Any:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    return load_run_settings(run_args("--config", str(cfg)), ENV)


BAD_NUMBERS = ["nan", "NaN", "inf", "-inf", "1e999", "", "ten", "1,5", "\u0661"]  # \u0661: Arabic-Indic one


@pytest.mark.parametrize("attr", [a for a, n in RUN_NUMBERS.items() if n.flag])
@pytest.mark.parametrize("value", [*BAD_NUMBERS, "-1", "1e30"])
def test_every_numeric_flag_rejects_non_finite_and_out_of_range(attr: str, value: str) -> None:
    flag = RUN_NUMBERS[attr].flag
    assert flag is not None
    with pytest.raises(ConfigError) as ei:
        load_run_settings(run_args(f"{flag}={value}"), ENV)
    assert str(ei.value).startswith(f"{flag}: ")


@pytest.mark.parametrize("attr", list(RUN_NUMBERS))
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "-1", "1e30", "true", "[1]", "'nan'"])
def test_every_numeric_config_key_rejects_non_finite_and_out_of_range(tmp_path: Path, attr: str, value: str) -> None:
    key = RUN_NUMBERS[attr].key
    with pytest.raises(ConfigError) as ei:
        settings_with_file(tmp_path, f"{key}: {value}\n")
    assert RUN_NUMBERS[attr].name in str(ei.value)


def test_good_numbers_from_flags_and_file(tmp_path: Path) -> None:
    s = load_run_settings(run_args("--check-interval", "0.5", "--scrub-interval", "0", "--metrics-port", "0",
                                   "--disk-budget", "500G", "--scrub-rate", "64Mi", "--workers", "8"), ENV)
    assert (s.check_interval, s.scrub_interval, s.metrics_port, s.workers) == (0.5, 0.0, 0, 8)
    assert (s.disk_budget_bytes, s.scrub_bytes_per_second) == (500 << 30, 64 << 20)
    f = settings_with_file(tmp_path, "checkInterval: 30\nterminationBudgetSeconds: 10\ndiskBudgetBytes: 1073741824\n")
    assert (f.check_interval, f.termination_budget, f.disk_budget_bytes) == (30.0, 10.0, 1 << 30)
    for attr, n in RUN_NUMBERS.items():  # the defaults are themselves in range
        assert n.parse(n.default) == getattr(load_run_settings(run_args(), ENV), attr)


def test_number_and_size_edge_cases() -> None:
    assert number("  2.5 ", "x", lo=0, hi=3) == 2.5
    for bad in (math.nan, math.inf, True, None, "0x10", "2.5\n\x00"):
        with pytest.raises(ConfigError):
            number(bad, "x", lo=0, hi=10)
    with pytest.raises(ConfigError, match="whole number"):
        number("1.5", "--workers", lo=1, hi=4, integer=True)
    assert parse_size("2G", "s") == 2 << 30 and parse_size(" 512 MiB ", "s") == 512 << 20 and parse_size(7, "s") == 7
    for bad in ("-1", "1G\x00", "nan", "inf", "\u0661G", "2X", -1, 1.5, True, "99999999P"):
        with pytest.raises(ConfigError):
            parse_size(bad, "--disk-budget")


@pytest.mark.parametrize("prefix", ["modelcache.dev\n", "Modelcache.dev", "a..b", "-a.b", "a" * 254,
                                    "m\u043edelcache.dev"])
def test_label_prefix_is_a_dns_subdomain(prefix: str) -> None:
    with pytest.raises(ConfigError, match="--label-prefix"):
        load_run_settings(run_args(f"--label-prefix={prefix}"), ENV)


def test_label_prefix_from_env_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="is not a DNS subdomain"):
        load_run_settings(run_args(), {**ENV, "MODEL_CACHE_LABEL_PREFIX": "x.dev\n"})


def test_source_with_control_character_is_refused() -> None:
    with pytest.raises(ConfigError, match="control character"):
        load_run_settings(run_args("--source", "pvc:/mnt/x\n"), ENV)


# ------------------------------------------------------------------------------------------- cache roots


def test_writable_root_is_created_and_probed(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    check_writable_root(root, [root / "hub", root / ".agent" / "locks"], "--cache-dir")
    assert (root / "hub").is_dir() and not list((root / "hub").iterdir())


def test_writable_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"--cache-dir .*/f: is not a directory"):
        check_writable_root(tmp_path / "f", [], "--cache-dir")
    with pytest.raises(ConfigError, match=r"cannot create .*/f/c \(Not a directory\)"):
        check_writable_root(tmp_path / "f" / "c", [], "--cache-dir")


def test_read_only_mount_is_named(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o ro,size=1m tmpfs {ro} 2>/dev/null") != 0:
        pytest.skip("needs root and mount(2)")
    try:
        with pytest.raises(ConfigError, match=r"--cache-dir .*/ro: cannot create files in .*/ro \(Read-only file "):
            check_writable_root(ro, [ro / "hub"], "--cache-dir")
    finally:
        os.system(f"umount {ro}")


def test_readable_root_rules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        check_readable_root(tmp_path / "nope", "--cache-dir")
    assert check_readable_root(tmp_path, "--cache-dir") is False  # empty: nothing yet
    (tmp_path / "hub" / "models--org--m").mkdir(parents=True)
    assert check_readable_root(tmp_path, "--cache-dir") is True
    with pytest.raises(ConfigError, match=r"this is a hub/ folder, not the agent root; use its parent"):
        check_readable_root(tmp_path / "hub", "--cache-dir")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"not an agent cache root \(no hub/ or \.agent/ inside\)"):
        check_readable_root(tmp_path / "other", "--cache-dir")


def test_config_file_problems_name_the_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cases = {b"sources: hub\n": "sources must be a list of strings",
             b"labelPrefix: 5\n": "labelPrefix must be a string",
             b"metricsPort: 9400\ncheckIntervall: 5\n": "unknown keys ['checkIntervall']",
             b"cacheDir: /c\xff\n": "not UTF-8 text (byte 0xff at offset 12)",
             b"- a\n": "must be a mapping"}
    for text, needle in cases.items():
        cfg.write_bytes(text)
        with pytest.raises(ConfigError) as ei:
            load_run_settings(run_args("--config", str(cfg)), ENV)
        assert str(ei.value).startswith(f"--config {cfg}: ") and needle in str(ei.value)
