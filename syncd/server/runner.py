"""Running the reference server: blocking for ``syncd serve``, or in a daemon thread for embedding/tests."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

import uvicorn

from syncd.server.app import create_app
from syncd.server.faults import ResettableHttpToolsProtocol
from syncd.server.settings import ServerSettings
from syncd.server.stats import ServerStats
from syncd.server.store import Clock, Store, utc_now
from syncd.state import EMBEDDED_KEY_NAME, EMBEDDED_SERVER_DIR

_START_TIMEOUT = 15.0
_GRACEFUL_SECONDS = 3


@dataclass(frozen=True)
class RunningServer:
    base_url: str
    api_key: str
    data_dir: Path
    stats: ServerStats


def _bind(host: str, port: int) -> socket.socket:
    """Bind before uvicorn starts, so port 0 resolves to a known port and a busy port fails early."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def _server(settings: ServerSettings, store: Store, stats: ServerStats, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(settings, store, stats),
        http=ResettableHttpToolsProtocol,
        lifespan="off",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=_GRACEFUL_SECONDS,
        server_header=False,
    )
    return uvicorn.Server(config)


def serve(settings: ServerSettings, *, clock: Clock = utc_now) -> None:
    """Serve until SIGINT/SIGTERM, then finish in-flight requests (bounded) and return normally.

    Raises ``OSError`` if the address is taken and ``DataDirBusy`` if another server owns the data dir.
    """
    sock = _bind(settings.host, settings.port)
    store = Store(settings.data_dir, clock)
    # uvicorn re-raises the signal it handled once it has shut down, with the handlers it found; with
    # no-op handlers in place that re-raise is absorbed, so SIGTERM ends in a clean return (exit 0).
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _absorb) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = _server(settings, store, ServerStats(), "info")
        logging.getLogger("uvicorn.error").info(
            "syncd Files API on %s (data in %s)", _base_url(sock), settings.data_dir
        )
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        store.close()
        sock.close()


def _absorb(signum: int, frame: FrameType | None) -> None:
    """Stands in for the default handlers while uvicorn runs (see :func:`serve`)."""


@contextmanager
def running_server(settings: ServerSettings, *, clock: Clock = utc_now) -> Iterator[RunningServer]:
    """Serve from a daemon thread; yields once connections are accepted, stops and joins on exit."""
    sock = _bind(settings.host, settings.port)
    stats = ServerStats()
    try:
        store = Store(settings.data_dir, clock)
    except BaseException:
        sock.close()
        raise
    server = _server(settings, store, stats, "warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="syncd-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the reference server failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the reference server did not start within {_START_TIMEOUT:.0f}s")
            time.sleep(0.005)
        yield RunningServer(_base_url(sock), settings.api_key, settings.data_dir, stats)
    finally:
        server.should_exit = True
        thread.join(_GRACEFUL_SECONDS + 5)
        store.close()
        sock.close()


def embedded_key(state_dir: Path) -> str:
    """A random key for the embedded server, kept (0600) so SDK users on this machine can reuse it."""
    path = state_dir / EMBEDDED_KEY_NAME
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        key = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(key + "\n")
        return key


class EmbeddedStartError(RuntimeError):
    """The embedded server could not bind its address (a port in use, most often)."""


@contextmanager
def embedded_server(state_dir: Path, base_url: str) -> Iterator[RunningServer]:
    """`syncd run --embedded`: a reference server on loopback for this process, data in the state dir.

    It binds the host and port of ``base_url`` when that is a loopback address (else 127.0.0.1): embedded
    means loopback only, whatever the config says. Only a failure to start is an `EmbeddedStartError`.
    """
    url = urlsplit(base_url)
    host = url.hostname if url.hostname in ("127.0.0.1", "localhost", "::1") else "127.0.0.1"
    settings = ServerSettings(
        data_dir=state_dir / EMBEDDED_SERVER_DIR,
        api_key=embedded_key(state_dir),
        host=host or "127.0.0.1",
        port=url.port or 8000,
    )
    stack = ExitStack()
    try:
        server = stack.enter_context(running_server(settings))
    except OSError as exc:
        raise EmbeddedStartError(
            f"cannot start the embedded server on {settings.host}:{settings.port}: "
            f"{exc.strerror or exc} (pick a free port)"
        ) from None
    with stack:
        yield server
