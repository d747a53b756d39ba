"""Settings parsed once from flags, environment and an optional YAML file, then passed explicitly.

Precedence: flag > environment > config file > default. Where the config file and the
environment both set the cache dir and disagree, that is an error naming both values (a silent
mismatch between a hostPath and a setting is how other agents re-downloaded forever).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.core.actions import FILL_BACKOFF
from agent.core.retry import RetryPolicy
from agent.core.spec import LABEL_PREFIX_RE
from agent.errors import ConfigError
from agent.sources.base import SourceRef, SourceSettings, parse_source_ref

DEFAULT_CACHE_DIR = "/var/lib/model-cache"
DEFAULT_HF_TOKEN_FILE = "/var/run/secrets/hf/token"
DEFAULT_MX_TOKEN_FILE = "/var/run/secrets/tokens/modelexpress"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.I)


def parse_size(value: str | int, field_name: str) -> int:
    """'2G', '512Mi', '1048576' -> bytes (powers of 1024 either way)."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ConfigError(f"{field_name}: {value!r} is not a size like 500M, 2G or 1048576")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[(m.group(2) or "")[:1].lower()]
    return int(float(m.group(1)) * mult)


def read_hf_token(token_file: str | None, env: Mapping[str, str]) -> str | None:
    """--token-file, then HF_TOKEN, then a mounted Secret at the default path. Never logged."""
    if token_file:
        try:
            return Path(token_file).read_text().strip() or None
        except OSError as e:
            raise ConfigError(f"--token-file {token_file}: cannot read ({e.strerror})") from e
    if env.get("HF_TOKEN"):
        return env["HF_TOKEN"].strip()
    try:
        return Path(DEFAULT_HF_TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def source_settings(env: Mapping[str, str], *, token_file: str | None = None,
                    mx_token_file: str | None = None, max_workers: int = 4) -> SourceSettings:
    return SourceSettings(
        hf_endpoint=env.get("HF_ENDPOINT") or None,
        hf_token=read_hf_token(token_file, env),
        mx_address=env.get("MX_SERVER_ADDRESS") or env.get("MODEL_EXPRESS_URL") or None,
        mx_token_file=mx_token_file or env.get("MX_TOKEN_FILE") or DEFAULT_MX_TOKEN_FILE,
        max_workers=max_workers,
    )


def parse_sources(values: list[str] | tuple[str, ...]) -> tuple[SourceRef, ...]:
    refs = tuple(parse_source_ref(v) for v in values)
    kinds = [r.kind for r in refs]
    dup = {k for k in kinds if kinds.count(k) > 1 and k != "pvc"}
    if dup:
        raise ConfigError(f"--source: {sorted(dup)} given more than once")
    return refs


def cache_dir_from(flag: str | None, env: Mapping[str, str], file_value: str | None = None) -> Path:
    env_value = env.get("MODEL_CACHE_DIR") or None
    if flag:
        value = flag
    elif env_value and file_value and os.path.normpath(env_value) != os.path.normpath(file_value):
        raise ConfigError(
            f"cache dir mismatch: MODEL_CACHE_DIR={env_value} but config file cacheDir={file_value}; "
            "they must name the same hostPath"
        )
    else:
        value = env_value or file_value or DEFAULT_CACHE_DIR
    path = Path(value)
    if not path.is_absolute():
        path = Path.cwd() / path
    return path


@dataclass(frozen=True)
class RunSettings:
    """Everything ``model-cache-agent run`` needs."""

    cache_dir: Path
    sources: tuple[SourceRef, ...]
    source_settings: SourceSettings
    node_name: str
    kubernetes: bool = True
    models_file: Path | None = None
    kube_host: str | None = None  # explicit API server URL (tests, e2e); else in-cluster or kubeconfig
    label_prefix: str = "modelcache.dev"
    metrics_port: int = 9400
    metrics_host: str = "0.0.0.0"
    workers: int = 2
    resync_seconds: float = 300.0
    check_interval: float = 60.0  # fast (stat) re-check of every ready model
    scrub_interval: float = 6 * 3600.0  # xxh3 re-read of everything; 0 disables
    scrub_bytes_per_second: int = 200 * 1024 * 1024
    full_scrub_interval: float = 0.0  # sha256/git-sha1 re-read; 0 disables
    disk_budget_bytes: int = 0  # 0: no budget beyond free space
    evict_min_age: float = 600.0  # never evict a snapshot verified less than this long ago
    # eviction (issue 14): drain, then delete once unused for drain_grace; watermarks of budget or filesystem
    drain_grace: float = 300.0
    keep_undesired: bool = False
    high_watermark: float = 0.85
    low_watermark: float = 0.75
    in_use_file: Path | None = None  # file mode: model names pods use, one per line (stands in for the pod watch)
    termination_budget: float = 45.0
    fill_backoff: RetryPolicy = FILL_BACKOFF  # wait between failed fills of one model
    extra: dict[str, Any] = field(default_factory=dict)


_FILE_KEYS = {
    "cacheDir", "sources", "labelPrefix", "metricsPort", "workers", "scrubInterval", "scrubBytesPerSecond",
    "fullScrubInterval", "diskBudgetBytes", "evictMinAgeSeconds", "terminationBudgetSeconds", "checkInterval",
    "resyncSeconds", "drainGraceSeconds", "keepUndesired", "highWatermark", "lowWatermark",
}


def load_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must be a mapping")
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {sorted(unknown)} (known: {sorted(_FILE_KEYS)})")
    return data


def _num(value: Any, field_name: str, *, minimum: float = 0) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{field_name}: {value!r} is not a number") from None
    if v < minimum:
        raise ConfigError(f"{field_name}: {value!r} must be >= {minimum}")
    return v


def load_run_settings(args: Any, env: Mapping[str, str]) -> RunSettings:
    """Build RunSettings from parsed argparse args + env; every error names the flag or key."""
    f = load_config_file(getattr(args, "config", None))
    cache_dir = cache_dir_from(args.cache_dir, env, f.get("cacheDir"))
    source_values = list(args.source or []) or list(f.get("sources") or []) or [
        s for s in (env.get("MODEL_CACHE_SOURCES") or "").split(",") if s
    ]
    if not source_values:
        raise ConfigError("--source: at least one source is needed (pvc:PATH, modelexpress[:ADDR], hub)")
    sources = parse_sources(source_values)
    prefix = args.label_prefix or env.get("MODEL_CACHE_LABEL_PREFIX") or f.get("labelPrefix") or "modelcache.dev"
    if not LABEL_PREFIX_RE.match(prefix):
        raise ConfigError(f"--label-prefix: {prefix!r} is not a DNS subdomain")
    port = int(_num(args.metrics_port if args.metrics_port is not None else f.get("metricsPort", 9400),
                    "--metrics-port"))
    if port > 65535:
        raise ConfigError(f"--metrics-port: {port} is not a port")
    kubernetes = not args.no_kubernetes
    node_name = args.node_name or env.get("NODE_NAME") or ""
    if kubernetes and not node_name:
        raise ConfigError("NODE_NAME: required in cluster mode (set it from the downward API, or use --node-name)")
    models_file = Path(args.models_file) if args.models_file else None
    if not kubernetes and models_file is None:
        raise ConfigError("--models-file: required with --no-kubernetes")
    workers = int(_num(args.workers if args.workers is not None else f.get("workers", 2), "--workers", minimum=1))
    return RunSettings(
        cache_dir=cache_dir,
        sources=sources,
        source_settings=source_settings(env, token_file=args.token_file, max_workers=4),
        node_name=node_name or os.uname().nodename,
        kubernetes=kubernetes,
        models_file=models_file,
        kube_host=args.kube_host or env.get("MODEL_CACHE_KUBE_HOST") or None,
        label_prefix=prefix,
        metrics_port=port,
        metrics_host=args.metrics_host,
        workers=workers,
        resync_seconds=_num(f.get("resyncSeconds", 300), "resyncSeconds", minimum=1),
        check_interval=_num(args.check_interval if args.check_interval is not None else f.get("checkInterval", 60),
                            "--check-interval", minimum=0.1),
        scrub_interval=_num(args.scrub_interval if args.scrub_interval is not None
                            else f.get("scrubInterval", 6 * 3600), "--scrub-interval"),
        scrub_bytes_per_second=parse_size(
            args.scrub_rate if args.scrub_rate is not None else f.get("scrubBytesPerSecond", 200 << 20),
            "--scrub-rate"),
        full_scrub_interval=_num(f.get("fullScrubInterval", 0), "fullScrubInterval"),
        disk_budget_bytes=parse_size(
            args.disk_budget if args.disk_budget is not None else f.get("diskBudgetBytes", 0), "--disk-budget"),
        termination_budget=_num(f.get("terminationBudgetSeconds", 45), "terminationBudgetSeconds"),
        evict_min_age=_num(f.get("evictMinAgeSeconds", 600), "evictMinAgeSeconds"),
        **_eviction_settings(args, f),
    )


def _eviction_settings(args: Any, f: dict[str, Any]) -> dict[str, Any]:
    grace = getattr(args, "drain_grace", None)
    high = _num(f.get("highWatermark", 0.85), "highWatermark")
    low = _num(f.get("lowWatermark", 0.75), "lowWatermark")
    if not 0 < low <= high <= 1:
        raise ConfigError(f"lowWatermark {low} / highWatermark {high}: need 0 < low <= high <= 1")
    keep = f.get("keepUndesired", False)
    if not isinstance(keep, bool):
        raise ConfigError(f"keepUndesired: {keep!r} must be true or false")
    in_use = getattr(args, "in_use_file", None)
    return {
        "drain_grace": _num(grace if grace is not None else f.get("drainGraceSeconds", 300), "drainGraceSeconds"),
        "keep_undesired": keep, "high_watermark": high, "low_watermark": low,
        "in_use_file": Path(in_use) if in_use else None,
    }
