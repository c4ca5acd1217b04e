"""structlog setup: JSON lines on stdout under systemd, coloured console on a TTY, secrets redacted."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

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


def get_logger(**context: Any) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger().bind(**context)
    return logger
