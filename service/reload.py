"""Live reload of the configuration: the config file and every file it names are watched, and
read again when they change or on SIGHUP; a valid new config is applied to the running
process, anything else is refused as a whole while the old config keeps serving.

Each process (every `serve` worker) reloads itself, from its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from service.config import ConfigChange, ConfigError, Settings, check_config, compare, secret_files
from service.metrics import CONFIG_RELOADS
from service.watch import FileWatch

log = logging.getLogger(__name__)

# How often the files are looked at: a stat of each, nothing read unless one changed.
POLL_SECONDS = 2.0


class ReloadResult(StrEnum):
    """The outcome of one reload, the `result` label of `config_reload_total`."""

    APPLIED = "applied"
    UNCHANGED = "unchanged"
    INVALID = "invalid"
    REFUSED = "refused"


class ConfigReloader:
    """Reads the config file `path` again when it or a file it names changes, or when asked
    (SIGHUP), and hands a valid new configuration to `apply`; one reload at a time.

    `apply` must take the settings at once (no awaiting): between two steps of the event loop,
    every request sees either the old configuration or the new one.
    """

    def __init__(
        self,
        path: Path,
        settings: Settings,
        apply: Callable[[Settings], None],
        *,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.path = path
        self.settings = settings
        self._apply = apply
        self._poll_seconds = poll_seconds
        self._lock = asyncio.Lock()
        self._asked = asyncio.Event()
        self._files = FileWatch(self._watched(settings))

    def _watched(self, settings: Settings, *more: Path) -> list[Path]:
        return [self.path, *secret_files(settings), *more]

    def request(self) -> None:
        """Reload as soon as possible (the SIGHUP handler)."""
        log.info("SIGHUP received: reloading the config", extra={"event": "config.sighup"})
        self._asked.set()

    async def run(self) -> None:
        """Reload whenever asked or a watched file changed, until cancelled.

        The first reload is at once, and quiet when nothing changed: the files may have changed
        (and a SIGHUP passed unheeded) while the process started, after it read them.
        """
        first = True
        while True:
            if not first:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_seconds):
                        await self._asked.wait()
            asked = self._asked.is_set()
            self._asked.clear()
            if first or asked or self._files.changed():
                try:
                    await self.reload(quiet=first and not asked)
                except Exception:
                    # The old config keeps serving; the next change or SIGHUP tries again.
                    log.exception("config reload failed", extra={"event": "config.failed"})
            first = False

    async def reload(self, *, quiet: bool = False) -> ReloadResult:
        """Read the config again and apply it if it is valid and changes only live settings;
        the result, also logged and counted (except, with `quiet`, when nothing changed)."""
        async with self._lock:
            result = await self._reload(quiet)
        if not (quiet and result is ReloadResult.UNCHANGED):
            CONFIG_RELOADS.labels(result).inc()
        return result

    async def _reload(self, quiet: bool) -> ReloadResult:
        try:
            # Off the event loop: it reads and checks files (TLS certificates among them).
            check = await asyncio.to_thread(check_config, self.path)
        except ConfigError as error:
            for line in error.report:
                log.error(f"config not reloaded: {line}", extra={"event": "config.invalid"})
            # Also watch the files the broken config names, which may not exist yet.
            self._watch(self._watched(self.settings, *_named_files(self.path)))
            return ReloadResult.INVALID
        new = check.settings
        self._watch(self._watched(new))
        change = compare(self.settings, new)
        if change.restart:
            for name in change.restart:
                log.error(
                    f"config not reloaded: {name}: cannot change without a restart",
                    extra={"event": "config.refused", "setting": name},
                )
            return ReloadResult.REFUSED
        if not change:
            if not quiet:
                log.info("config unchanged", extra={"event": "config.unchanged"})
            return ReloadResult.UNCHANGED
        self._apply(new)
        self.settings = new
        log.info(_describe(change), extra={"event": "config.reloaded", **change.summary()})
        return ReloadResult.APPLIED

    def _watch(self, paths: list[Path]) -> None:
        # The same files keep their watch, whose stamps predate this read: a change made
        # while the files were read is seen next time.
        if set(paths) != set(self._files.paths):
            self._files = FileWatch(paths)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Watch (and follow SIGHUP, where this thread can take signals) while inside; the
        signal handler comes first, so that the first reload also covers an earlier SIGHUP."""
        with self._sighup():
            task = asyncio.create_task(self.run())
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    @contextlib.contextmanager
    def _sighup(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.request)
        except (RuntimeError, ValueError):
            # Not the main thread (an app run by a test client): file changes only.
            yield
            return
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            # Ignored rather than fatal (the default) while the process shuts down.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _describe(change: ConfigChange) -> str:
    parts = [
        f"{name.replace('_', ' ')}: {', '.join(names)}" for name, names in change.summary().items()
    ]
    return f"config reloaded ({'; '.join(parts)})"


def _named_files(path: Path) -> list[Path]:
    """The `*_file` settings of the YAML file at `path`, at any level, as far as it parses."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    return [Path(value) for value in _file_values(data)]


def _file_values(data: Any) -> Iterator[str]:
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and key.endswith("_file") and isinstance(value, str):
                yield value
            yield from _file_values(value)
    elif isinstance(data, list):
        for item in data:
            yield from _file_values(item)
