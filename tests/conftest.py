"""Shared fixtures: the reference Files API server on 127.0.0.1, a free port, a controllable clock."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest

from syncd.server import RunningServer, ServerSettings, running_server
from syncd.server.store import Clock


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started as separate processes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FakeClock:
    """A wall clock that only moves when told to; call it to read the time."""

    def __init__(self, start: datetime = datetime(2026, 1, 1, tzinfo=UTC)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class ServerFactory(Protocol):
    def __call__(self, *, clock: Clock | None = None, **overrides: Any) -> RunningServer: ...


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start reference servers (port 0, random key, data dir under tmp_path unless ``data_dir`` is given);
    keyword arguments override :class:`ServerSettings` fields. All are stopped at teardown."""
    with ExitStack() as stack:
        count = 0

        def start(*, clock: Clock | None = None, **overrides: Any) -> RunningServer:
            nonlocal count
            count += 1
            fields: dict[str, Any] = {
                "data_dir": tmp_path / f"server-data-{count}",
                "api_key": secrets.token_urlsafe(16),
                "port": 0,
                **overrides,
            }
            extra = {} if clock is None else {"clock": clock}
            return stack.enter_context(running_server(ServerSettings(**fields), **extra))

        yield start


@pytest.fixture
def server(server_factory: ServerFactory) -> RunningServer:
    """A reference server with default settings."""
    return server_factory()
