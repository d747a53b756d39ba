"""Desired models from a YAML file (``--models-file``), for clusters without the CRD or no cluster.

Accepted shapes: a list of CachedModel objects or of bare specs each with a ``name``; a mapping with
``models:``; or several YAML documents (``---``) as ``kubectl get -o yaml`` writes them
(``manifests/examples/models.yaml`` shows each). Every entry is checked against the CachedModel
CRD's schema (``agent.core.schema``): an unknown key such as ``revison`` is an error naming the key
and the model, as ``kubectl apply`` would refuse that CachedModel.

Like an API server refusing a bad update, a reload never makes things worse: an entry that turns
invalid keeps its last good spec, and a file that no longer reads or parses (bad YAML, not UTF-8)
keeps the whole last good state (losing every model because of one typo would evict a warm cache).
Each distinct error is logged once, not on every reload. A new entry that is invalid from the start
is reported as ``invalid`` in the node status; the others still apply.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import yaml
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from agent.core.desired import DesiredState
from agent.core.spec import ModelSpec, parse_model_spec
from agent.errors import ConfigError, SpecError

log = structlog.get_logger("agent.models_file")


def decode(data: bytes, source: str) -> str:
    """The file's text; anything but UTF-8 is a ConfigError naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "save it as UTF-8") from None


def parse_models(text: str, source: str) -> DesiredState:
    """Parse the file's text into a DesiredState (raises ConfigError when it is not a list of models)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from e
    items: list[Any] = []
    for d in docs:
        if isinstance(d, dict) and "models" in d:
            if not isinstance(d["models"], list) or set(d) != {"models"}:
                extra = sorted(str(k) for k in set(d) - {"models"})
                raise ConfigError(f"{source}: 'models' must be a list and the only top-level key"
                                  + (f" (also found {extra})" if extra else ""))
            items.extend(d["models"])
        elif isinstance(d, dict) and d.get("kind") == "List":
            items.extend(d.get("items") or [])
        elif isinstance(d, list):
            items.extend(d)
        elif isinstance(d, dict):
            items.append(d)
        else:
            raise ConfigError(f"{source}: expected a list of models, got {type(d).__name__}")
    models: dict[str, ModelSpec] = {}
    errors: dict[str, SpecError] = {}
    for i, item in enumerate(items):
        name = _name_of(item)
        where = f"{source}: model {name!r}: " if name else f"{source}: entry {i + 1}: "
        try:
            spec = parse_model_spec(item, where=where)
        except SpecError as e:
            errors[name or f"entry-{i + 1}"] = e
            continue
        if spec.name in models:
            errors[spec.name] = SpecError(f"{where}name", "the same name appears twice")
            continue
        models[spec.name] = spec
    return DesiredState(models=models, errors=errors, synced=True)


def _name_of(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    meta = item.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else item.get("name")
    return name if isinstance(name, str) and name else None


class _FileHandler(FileSystemEventHandler):
    def __init__(self, poke: Callable[[], None]) -> None:
        self.poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in ("opened", "closed_no_write"):
            self.poke()


class FileWatcher:
    """Calls ``on_change`` (debounced) when a file may have changed, ConfigMap symlink swaps included.

    Watches the file's folder, not the file: a ConfigMap update replaces the ``..data`` symlink, so
    the file's own inode never changes. The callback re-reads and compares content itself.
    """

    def __init__(self, path: Path, on_change: Callable[[], None], *, debounce: float = 0.2) -> None:
        self.path = path
        self.on_change = on_change
        self.debounce = debounce
        self._timer: threading.Timer | None = None
        self._mu = threading.Lock()
        self._observer = Observer()
        self._observer.daemon = True
        self._observer.schedule(_FileHandler(self._poke), str(path.parent), recursive=False)

    def _poke(self) -> None:
        with self._mu:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.debounce, self.on_change)
            self._timer.daemon = True
            self._timer.start()

    def start(self) -> FileWatcher:
        self._observer.start()
        return self

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
        with self._mu:
            if self._timer is not None:
                self._timer.cancel()


class ModelsFileProvider:
    """Reads the models file now and whenever it changes; calls ``on_change`` with each new state."""

    def __init__(self, path: Path, on_change: Callable[[DesiredState], None]) -> None:
        self.path = path
        self.on_change = on_change
        self._last_text: str | None = None
        self._last_good: DesiredState | None = None
        self._logged: set[str] = set()  # errors already logged (each once, until the file is clean)
        self._mu = threading.Lock()
        self._watcher = FileWatcher(path, self.reload)

    def _read(self) -> str:
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise ConfigError(f"--models-file {self.path}: cannot read ({e.strerror})") from e
        return decode(data, f"--models-file {self.path}")

    def _log_once(self, event: str, error: str, **kw: object) -> None:
        if error not in self._logged:
            self._logged.add(error)
            log.error(event, error=error, **kw)

    def _keep_last_good(self, state: DesiredState) -> DesiredState:
        """An entry that turned invalid keeps its last good spec (its error is logged, once)."""
        last = self._last_good.models if self._last_good else {}
        models = dict(state.models)
        errors: dict[str, SpecError] = {}
        for name, err in state.errors.items():
            if name in last and name not in models:
                models[name] = last[name]
                self._log_once("models_file.entry_invalid_kept_last_good", str(err), model=name)
            else:
                errors[name] = err
                self._log_once("models_file.entry_invalid", str(err), model=name)
        if not state.errors:
            self._logged.clear()  # clean again: the same mistake later is news
        return DesiredState(models=models, errors=errors, pins=state.pins, synced=state.synced)

    def load(self) -> DesiredState:
        """First read: a missing, unreadable, non-UTF-8 or unparsable file at start is a configuration error."""
        text = self._read()
        state = self._keep_last_good(parse_models(text, str(self.path)))
        self._last_text, self._last_good = text, state
        return state

    def reload(self) -> None:
        with self._mu:
            try:
                text = self._read()
            except ConfigError as e:
                self._log_once("models_file.unreadable_kept_last_good", str(e))
                return
            if text == self._last_text:
                return
            self._last_text = text  # a bad text is not parsed (nor logged) again on the next event
            try:
                state = parse_models(text, str(self.path))
            except ConfigError as e:
                self._log_once("models_file.invalid_kept_last_good", str(e))
                return
            state = self._keep_last_good(state)
            self._last_good = state
        log.info("models_file.reloaded", models=sorted(state.models), errors=sorted(state.errors))
        self.on_change(state)

    def start(self) -> ModelsFileProvider:
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._watcher.stop()


def parse_in_use(text: str) -> frozenset[str]:
    """Model names, one per line (blank lines and ``#`` comments ignored)."""
    names = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return frozenset(n for n in names if n)


class InUseFileProvider:
    """``--in-use-file``: the models workers use, for nodes without a pod watch; re-read on change.

    A missing file means nothing is in use. An unreadable one keeps the last set: forgetting a
    model is in use could delete it from under a worker, keeping it too long only costs disk.
    """

    def __init__(self, path: Path, on_change: Callable[[frozenset[str]], None]) -> None:
        self.path = path
        self.on_change = on_change
        self._last: frozenset[str] | None = None
        self._watcher = FileWatcher(path, self.reload)

    def load(self) -> frozenset[str]:
        try:
            self._last = parse_in_use(self.path.read_text())
        except FileNotFoundError:
            self._last = frozenset()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--in-use-file {self.path}: cannot read ({e})") from e
        return self._last

    def reload(self) -> None:
        try:
            names = parse_in_use(self.path.read_text())
        except FileNotFoundError:
            names = frozenset()
        except (OSError, UnicodeDecodeError) as e:
            log.error("in_use_file.unreadable_kept_last", path=str(self.path), error=str(e))
            return
        if names != self._last:
            self._last = names
            log.info("in_use_file.reloaded", models=sorted(names))
            self.on_change(names)

    def start(self) -> InUseFileProvider:
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._watcher.stop()
