"""structlog setup: JSON lines on stdout under systemd, coloured console on a TTY, secrets redacted."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

from syncd.config import Config

_SECRET_KEYS = frozenset({"api_key", "authorization", "token", "password", "secret"})
REDACTED = "**********"


class Redactor:
    """A processor that masks secret-looking keys and any occurrence of the known secret values."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self._secrets = tuple(s for s in secrets if len(s) >= 4)

    def __call__(self, _logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in list(event.items()):
            if key.lower() in _SECRET_KEYS and value is not None:
                event[key] = REDACTED
            elif isinstance(value, str):
                for secret in self._secrets:
                    if secret in value:
                        value = value.replace(secret, REDACTED)
                event[key] = value
        return event


def configure(
    *,
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
    secrets: tuple[str, ...] = (),
) -> None:
    """Configure structlog once per process; safe to call again (SIGHUP reload, tests)."""
    use_console = sys.stderr.isatty() if fmt == "auto" else fmt == "console"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True) if use_console else structlog.processors.JSONRenderer()
    )
    # Console output goes to stderr so that command output (status --json) stays clean on stdout;
    # JSON lines go to stdout, which journald captures. The stream is looked up at each write, not now:
    # whoever swaps sys.stderr later (a command run in-process by a test runner) must not leave the
    # loggers writing to a closed file. structlog builds a logger per call anyway (no caching).
    stream_name = "stderr" if use_console else "stdout"
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            Redactor(secrets),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: structlog.PrintLogger(getattr(sys, stream_name)),
        cache_logger_on_first_use=False,
    )


def configure_for(config: Config, extra_secrets: tuple[str, ...] = (), *, quiet: bool = False) -> None:
    """`configure` from the `[log]` table, redacting the configured key; ``quiet`` keeps info lines out
    (a progress bar is showing)."""
    key = config.api_key.get_secret_value() if config.api_key else ""
    level = config.log.level
    if quiet and level in ("debug", "info"):
        level = "warning"
    configure(fmt=config.log.format, level=level, secrets=tuple(s for s in (key, *extra_secrets) if s))


class UnreadableLog:
    """Says "cannot read" once per path until the path is readable again, so a stuck file is one line,
    not one per rescan; shared by the scan, settle and hash stages through its two methods."""

    def __init__(self) -> None:
        self._logged: set[tuple[int, str]] = set()
        self._log = structlog.get_logger("syncd.files")

    def report(self, root_id: int, relpath: str, reason: str) -> None:
        if (root_id, relpath) not in self._logged:
            self._logged.add((root_id, relpath))
            self._log.error("cannot read; skipping until it changes", path=relpath, reason=reason)

    def readable(self, root_id: int, relpath: str) -> None:
        """The path was read: a relapse is logged again."""
        self._logged.discard((root_id, relpath))
