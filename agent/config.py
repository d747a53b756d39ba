"""Settings parsed once from flags, environment and an optional YAML file, then passed explicitly.

Precedence: flag > environment > config file > default. Where the config file and the
environment both set the cache dir and disagree, that is an error naming both values (a silent
mismatch between a hostPath and a setting is how other agents re-downloaded forever).

Every number goes through ``number`` or ``parse_size`` wherever it comes from (flag, file, env):
nan, inf and values out of range are a ConfigError naming the setting, before anything starts
(with nan a timer never fires, with inf a thread dies on ``OverflowError``).
"""

from __future__ import annotations

import errno
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.cache.fsutil import disk_full_as_error
from agent.core.actions import FILL_BACKOFF
from agent.core.retry import RetryPolicy
from agent.core.spec import LABEL_NAME_RE, validate_label_prefix
from agent.errors import ConfigError, SpecError
from agent.k8s.settings import KubeSettings, default_namespace
from agent.sources.base import SourceRef, SourceSettings, parse_source_ref
from agent.sources.peers.settings import DEFAULT_P2P_PORT, PeerSettings, parse_peer_addr

DEFAULT_CACHE_DIR = "/var/lib/model-cache"
DEFAULT_HF_TOKEN_FILE = "/var/run/secrets/hf/token"
DEFAULT_MX_TOKEN_FILE = "/var/run/secrets/tokens/modelexpress"
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]i?)?b?\s*", re.I | re.ASCII)
SIZE_MAX = 1 << 60  # 1 EiB: anything bigger is a typo
DAY = 86400.0
YEAR = 365 * DAY
LOG_LEVELS = ("debug", "info", "warning", "error")


def number(value: object, field_name: str, *, lo: float, hi: float, integer: bool = False) -> float:
    """A finite number in [lo, hi] from a flag, file or env value; anything else names the setting."""
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{field_name}: {value!r} is not {kind}")
    try:
        if isinstance(value, str) and not value.strip().isascii():
            raise ValueError(value)
        v = float(value.strip()) if isinstance(value, str) else float(value)
    except ValueError:
        raise ConfigError(f"{field_name}: {value!r} is not {kind}") from None
    if not math.isfinite(v):
        raise ConfigError(f"{field_name}: {value!r} is not a finite number")
    if integer and v != int(v):
        raise ConfigError(f"{field_name}: {value!r} is not a whole number")
    if not lo <= v <= hi:
        raise ConfigError(f"{field_name}: {value!r} is out of range ({_fmt(lo)} to {_fmt(hi)})")
    return v


def _fmt(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def parse_size(value: object, field_name: str, *, lo: int = 0, hi: int = SIZE_MAX) -> int:
    """'2G', '512Mi', '1048576' -> bytes (powers of 1024 either way), in [lo, hi]."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(number(value, field_name, lo=lo, hi=hi, integer=True))
    m = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if not m:
        raise ConfigError(f"{field_name}: {value!r} is not a size like 500M, 2G or 1048576")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}[
        (m.group(2) or "")[:1].lower()]
    size = int(float(m.group(1)) * mult)
    if not lo <= size <= hi:
        raise ConfigError(f"{field_name}: {value!r} is out of range ({lo} to {hi} bytes)")
    return size


def log_level(value: str | None, field_name: str = "--log-level") -> str | None:
    if value is None:
        return None
    if value.strip().lower() not in LOG_LEVELS:
        raise ConfigError(f"{field_name}: {value!r} is not a log level ({', '.join(LOG_LEVELS)})")
    return value.strip().lower()


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
                    mx_token_file: str | None = None, max_workers: int = 4,
                    peers: PeerSettings | None = None) -> SourceSettings:
    return SourceSettings(
        hf_endpoint=env.get("HF_ENDPOINT") or None,
        hf_token=read_hf_token(token_file, env),
        mx_address=env.get("MX_SERVER_ADDRESS") or env.get("MODEL_EXPRESS_URL") or None,
        mx_token_file=mx_token_file or env.get("MX_TOKEN_FILE") or DEFAULT_MX_TOKEN_FILE,
        max_workers=max_workers,
        peers=peers,
    )


def parse_sources(values: list[str] | tuple[str, ...]) -> tuple[SourceRef, ...]:
    for v in values:
        if not isinstance(v, str) or any(ord(c) < 32 or ord(c) == 0x7F for c in v):
            raise ConfigError(f"--source {v!r}: holds a control character")
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
    if any(ord(c) < 32 for c in value):
        raise ConfigError(f"--cache-dir {value!r}: holds a control character")
    path = Path(value)
    if not path.is_absolute():
        path = Path.cwd() / path
    return path


def cache_dir_origin(flag: str | None, env: Mapping[str, str], file_value: str | None = None) -> str:
    """Where the cache dir came from, for error messages ('--cache-dir', 'MODEL_CACHE_DIR', ...)."""
    if flag:
        return "--cache-dir"
    if env.get("MODEL_CACHE_DIR"):
        return "MODEL_CACHE_DIR"
    if file_value:
        return "config cacheDir"
    return "cache dir (the default; set --cache-dir or MODEL_CACHE_DIR)"


def _why(e: OSError) -> str:
    return e.strerror or type(e).__name__


def check_writable_root(root: Path, dirs: list[Path], origin: str) -> None:
    """The cache root can be created and written: one ConfigError naming the path and the cause.

    ``dirs`` (hub/, .agent/staging, .agent/locks, ...) are created, and a file is created and
    removed in each, so a read-only mount, a full inode table or a locks folder we may not write
    is reported now, not as a traceback halfway through a fill (no space or inodes left: DiskFullError).
    """
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{origin} {root}: is not a directory")
    for d in [root, *dirs]:
        try:
            with disk_full_as_error(f"creating {d}"):  # out of inodes or quota: exit 1, as for any fill step
                d.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"{origin} {root}: cannot create {d}: a file is in the way") from None
        except OSError as e:
            raise ConfigError(f"{origin} {root}: cannot create {e.filename or d} ({_why(e)})") from e
        probe = d / f".write-test-{os.getpid()}"
        try:
            with disk_full_as_error(f"creating a file in {d}"):
                os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            probe.unlink()
        except OSError as e:
            who = f" by uid {os.getuid()}" if e.errno in (errno.EACCES, errno.EPERM) else ""
            raise ConfigError(f"{origin} {root}: cannot create files in {d}{who} ({_why(e)})") from e


def check_readable_root(root: Path, origin: str) -> bool:
    """The path is an agent root we can read; False when it holds nothing yet (a fresh, empty root).

    The common mistake is pointing at ``hub/`` (what workers mount) instead of its parent.
    """
    if not root.exists():
        raise ConfigError(f"{origin} {root}: does not exist")
    if not root.is_dir():
        raise ConfigError(f"{origin} {root}: is not a directory")
    try:
        names = set(os.listdir(root))
    except OSError as e:
        raise ConfigError(f"{origin} {root}: cannot read ({_why(e)})") from e
    if "hub" in names or ".agent" in names:
        return True
    if any(n.startswith(("models--", "datasets--", "spaces--")) for n in names):
        raise ConfigError(f"{origin} {root}: this is a hub/ folder, not the agent root; use its parent "
                          f"{root.parent}")
    if names:
        raise ConfigError(f"{origin} {root}: not an agent cache root (no hub/ or .agent/ inside)")
    return False


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
    advertise_host: str | None = None  # peers, cluster mode: where other agents reach this one (env POD_IP)
    termination_budget: float = 45.0
    fill_backoff: RetryPolicy = FILL_BACKOFF  # wait between failed fills of one model
    kube: KubeSettings = field(default_factory=lambda: KubeSettings())
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Numeric:
    """One numeric setting of ``run``: its flag (if any), config-file key, default and allowed range."""

    flag: str | None
    key: str
    default: float
    lo: float
    hi: float
    integer: bool = False
    size: bool = False  # bytes, written like 500M / 2G

    @property
    def name(self) -> str:
        return self.flag or self.key

    def parse(self, value: object) -> float:
        if self.size:
            return parse_size(value, self.name, lo=int(self.lo), hi=int(self.hi))
        v = number(value, self.name, lo=self.lo, hi=self.hi, integer=self.integer)
        return int(v) if self.integer else v


# RunSettings field -> how to read it. Every numeric setting of `run` is here, so each is range-checked.
RUN_NUMBERS: dict[str, Numeric] = {
    "metrics_port": Numeric("--metrics-port", "metricsPort", 9400, 0, 65535, integer=True),
    "workers": Numeric("--workers", "workers", 2, 1, 64, integer=True),
    "check_interval": Numeric("--check-interval", "checkInterval", 60.0, 0.1, DAY),
    "scrub_interval": Numeric("--scrub-interval", "scrubInterval", 6 * 3600.0, 0, YEAR),
    "scrub_bytes_per_second": Numeric("--scrub-rate", "scrubBytesPerSecond", 200 << 20, 0, SIZE_MAX, size=True),
    "disk_budget_bytes": Numeric("--disk-budget", "diskBudgetBytes", 0, 0, SIZE_MAX, size=True),
    "resync_seconds": Numeric(None, "resyncSeconds", 300.0, 1, DAY),
    "full_scrub_interval": Numeric(None, "fullScrubInterval", 0.0, 0, YEAR),
    "termination_budget": Numeric(None, "terminationBudgetSeconds", 45.0, 0, 3600),
    "evict_min_age": Numeric(None, "evictMinAgeSeconds", 600.0, 0, YEAR),
    "drain_grace": Numeric("--drain-grace", "drainGraceSeconds", 300.0, 0, YEAR),
    "high_watermark": Numeric(None, "highWatermark", 0.85, 0, 1),
    "low_watermark": Numeric(None, "lowWatermark", 0.75, 0, 1),
}


# ---- Kubernetes control plane (agent.k8s): API politeness, leader election, aggregation ------------
# One block so the rest of config.py stays untouched by it. The KubeSettings dataclass lives in
# agent/k8s/settings.py (plain data, no kubernetes import) so agent.k8s never imports config.py.
# Each field has a config-file key; every number goes through Numeric (finite, in range), and the
# Lease timings are checked against each other.

KUBE_NUMBERS: dict[str, Numeric] = {  # KubeSettings field -> its key and range
    "qps": Numeric(None, "apiQps", 5.0, 0, 10_000),
    "burst": Numeric(None, "apiBurst", 10, 1, 100_000, integer=True),
    "request_timeout": Numeric(None, "apiRequestTimeoutSeconds", 10.0, 0.1, 600),
    "retry.attempts": Numeric(None, "apiRetryAttempts", 4, 1, 100, integer=True),
    "retry.base": Numeric(None, "apiRetryBaseSeconds", 0.5, 0, 600),
    "retry.cap": Numeric(None, "apiRetryCapSeconds", 15.0, 0, 3600),
    "lease_duration": Numeric(None, "leaseDurationSeconds", 15.0, 0.1, 3600),
    "lease_renew_period": Numeric(None, "leaseRenewPeriodSeconds", 7.5, 0.01, 3600),
    "lease_renew_deadline": Numeric(None, "leaseRenewDeadlineSeconds", 12.0, 0.01, 3600),
    "lease_acquire_jitter": Numeric(None, "leaseAcquireJitterSeconds", 1.0, 0, 600),
    "aggregate_interval": Numeric(None, "aggregateIntervalSeconds", 5.0, 0.01, 3600),
    "node_status_interval": Numeric(None, "nodeStatusIntervalSeconds", 10.0, 0, 3600),
    "watch_timeout": Numeric(None, "watchTimeoutSeconds", 900.0, 1, DAY),
    "desired_debounce": Numeric(None, "desiredDebounceSeconds", 0.2, 0, 60),
}
_KUBE_STRINGS = {"leaseNamespace", "leaseName", "aggregateNodeSelector"}


def kube_settings_from(f: Mapping[str, Any], env: Mapping[str, str]) -> KubeSettings:
    """KubeSettings from the config file's keys; every error names the key."""
    v = {name: setting.parse(f.get(setting.key, setting.default)) for name, setting in KUBE_NUMBERS.items()}
    if not v["lease_acquire_jitter"] < v["lease_duration"]:
        raise ConfigError("leaseAcquireJitterSeconds: must be less than leaseDurationSeconds")
    if not v["lease_renew_period"] < v["lease_renew_deadline"] < v["lease_duration"] - v["lease_acquire_jitter"]:
        raise ConfigError(
            "leaseRenewPeriodSeconds < leaseRenewDeadlineSeconds < leaseDurationSeconds - leaseAcquireJitterSeconds "
            f"must hold (got {v['lease_renew_period']}, {v['lease_renew_deadline']}, {v['lease_duration']}, "
            f"{v['lease_acquire_jitter']}): a leader must stop acting before another may take over")
    strings: dict[str, str] = {}
    for key, default in (("leaseNamespace", default_namespace(env)), ("leaseName", KubeSettings.lease_name),
                         ("aggregateNodeSelector", "")):
        value = f.get(key, default) or default
        selector = key == "aggregateNodeSelector"
        if not isinstance(value, str) or (not selector and not LABEL_NAME_RE.fullmatch(value)):
            kind = "a label selector" if selector else "a DNS-1123 label"
            raise ConfigError(f"{key}: {value!r} is not valid ({kind})")
        strings[key] = value
    return KubeSettings(
        qps=v["qps"], burst=int(v["burst"]), request_timeout=v["request_timeout"],
        retry=RetryPolicy(attempts=int(v["retry.attempts"]), base=v["retry.base"], cap=v["retry.cap"]),
        lease_namespace=strings["leaseNamespace"], lease_name=strings["leaseName"],
        lease_duration=v["lease_duration"], lease_renew_period=v["lease_renew_period"],
        lease_renew_deadline=v["lease_renew_deadline"], lease_acquire_jitter=v["lease_acquire_jitter"],
        aggregate_interval=v["aggregate_interval"], aggregate_node_selector=strings["aggregateNodeSelector"],
        node_status_interval=v["node_status_interval"], watch_timeout=v["watch_timeout"],
        desired_debounce=v["desired_debounce"],
    )


_FILE_KEYS = {"cacheDir", "sources", "labelPrefix", "keepUndesired", *(n.key for n in RUN_NUMBERS.values()),
              *(n.key for n in KUBE_NUMBERS.values()), *_KUBE_STRINGS}


def load_config_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        raw = Path(path).read_bytes()
        data = yaml.safe_load(raw.decode("utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must be a mapping")
    unknown = set(data) - _FILE_KEYS
    if unknown:
        raise ConfigError(f"--config {path}: unknown keys {sorted(map(str, unknown))} (known: {sorted(_FILE_KEYS)})")
    sources = data.get("sources")
    if sources is not None and (not isinstance(sources, list) or not all(isinstance(x, str) for x in sources)):
        raise ConfigError(f"--config {path}: sources must be a list of strings like [pvc:/mnt/shared, hub]")
    for key in ("cacheDir", "labelPrefix"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"--config {path}: {key} must be a string")
    return data


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
    try:
        validate_label_prefix(prefix)
    except SpecError as e:
        raise ConfigError(str(e)) from None
    numbers: dict[str, Any] = {}
    for attr, setting in RUN_NUMBERS.items():
        flag_value = getattr(args, attr, None) if setting.flag else None
        numbers[attr] = setting.parse(flag_value if flag_value is not None else f.get(setting.key, setting.default))
    kubernetes = not args.no_kubernetes
    node_name = args.node_name or env.get("NODE_NAME") or ""
    if kubernetes and not node_name:
        raise ConfigError("NODE_NAME: required in cluster mode (set it from the downward API, or use --node-name)")
    models_file = Path(args.models_file) if args.models_file else None
    if not kubernetes and models_file is None:
        raise ConfigError("--models-file: required with --no-kubernetes")
    return RunSettings(
        cache_dir=cache_dir,
        sources=sources,
        source_settings=source_settings(env, token_file=args.token_file, max_workers=4,
                                        peers=peer_settings(args, env, f)),
        node_name=node_name or os.uname().nodename,
        kubernetes=kubernetes,
        models_file=models_file,
        kube_host=args.kube_host or env.get("MODEL_CACHE_KUBE_HOST") or None,
        label_prefix=prefix,
        metrics_host=args.metrics_host,
        **numbers,
        **_eviction_settings(args, f, numbers["high_watermark"], numbers["low_watermark"]),
        kube=kube_settings_from(f, env),
        advertise_host=env.get("POD_IP") or None,
    )


def _eviction_settings(args: Any, f: dict[str, Any], high: float, low: float) -> dict[str, Any]:
    if not 0 < low <= high <= 1:
        raise ConfigError(f"lowWatermark {low} / highWatermark {high}: need 0 < low <= high <= 1")
    keep = f.get("keepUndesired", False)
    if not isinstance(keep, bool):
        raise ConfigError(f"keepUndesired: {keep!r} must be true or false")
    in_use = getattr(args, "in_use_file", None)
    if in_use is not None and any(ord(c) < 32 for c in in_use):
        raise ConfigError(f"--in-use-file {in_use!r}: holds a control character")
    return {"keep_undesired": keep, "in_use_file": Path(in_use) if in_use else None}


# -- peers source (issue 13): --peer, --p2p-port, rates, origin slots ---------------------------------

_FILE_KEYS.update({"peers", "p2pPort", "p2pUploadRate", "p2pDownloadRate", "originConcurrency"})


def peer_settings(args: Any, env: Mapping[str, str], f: Mapping[str, Any]) -> PeerSettings:
    """Flag > env (MODEL_CACHE_PEERS comma-separated, MODEL_CACHE_P2P_PORT) > config file > default."""
    peer_values = list(getattr(args, "peer", None) or []) or [
        p for p in (env.get("MODEL_CACHE_PEERS") or "").split(",") if p.strip()] or list(f.get("peers") or [])
    if not isinstance(peer_values, list) or not all(isinstance(p, str) for p in peer_values):
        raise ConfigError(f"peers: {peer_values!r} must be a list of HOST:PORT strings")
    port = getattr(args, "p2p_port", None)
    if port is None:
        port = env.get("MODEL_CACHE_P2P_PORT") or f.get("p2pPort", DEFAULT_P2P_PORT)
    up = getattr(args, "p2p_upload_rate", None)
    down = getattr(args, "p2p_download_rate", None)
    slots = getattr(args, "origin_slots_dir", None)
    conc = getattr(args, "origin_concurrency", None)
    return PeerSettings(
        port=int(number(port, "--p2p-port", lo=0, hi=65534, integer=True)),
        peers=tuple(parse_peer_addr(p) for p in peer_values),
        upload_rate=parse_size(up if up is not None else f.get("p2pUploadRate", 0), "--p2p-upload-rate"),
        download_rate=parse_size(down if down is not None else f.get("p2pDownloadRate", 0), "--p2p-download-rate"),
        origin_concurrency=int(number(conc if conc is not None else f.get("originConcurrency", 2),
                                      "--origin-concurrency", lo=1, hi=1000, integer=True)),
        slots_dir=Path(slots) if slots else None,
    )
