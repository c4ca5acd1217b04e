"""Simulated network trouble: fault injection and WAN latency as pure ASGI middlewares.

Faults are decided when a request arrives, before authentication and before any handler runs, so a
500/503/429/reset never has side effects; ``slow`` lets the request be handled and then holds the
response back, so a client that times out does not know whether its upload landed (the case syncd's
"resolve ``uploading`` by hash" rule exists for).
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from syncd.server.stats import ServerStats
from syncd.server.wire import drain, send_json_error

HEALTH_PATH = "/v1/health"
SLOW_SECONDS = 2.0
RESET_EXTENSION = "syncd.reset"


class ResettableHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, offering the ASGI app a way to reset its TCP connection.

    ASGI has no "abort this connection" message, so the protocol publishes a ``syncd.reset`` scope
    extension whose ``reset`` callable sends an RST (``SO_LINGER`` 0) with no response at all.
    """

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {RESET_EXTENSION: {"reset": self._reset}}

    def _reset(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class FaultInjector:
    """With probability ``rate``, replace a request's fate by one of ``kinds``; never on ``/health``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        rate: float,
        kinds: tuple[str, ...],
        seed: int | None,
        stats: ServerStats,
        drain_limit: int,
    ) -> None:
        self.app = app
        self.rate = rate
        self.kinds = kinds
        self.rng = random.Random(seed)
        self.stats = stats
        self.drain_limit = drain_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or self.rate <= 0.0
            or scope["path"] == HEALTH_PATH
            or self.rng.random() >= self.rate
        ):
            await self.app(scope, receive, send)
            return
        kind = self.rng.choice(self.kinds)
        self.stats.count_fault(kind)
        if kind == "slow":
            await self.app(scope, receive, self._delayed(send))
        elif kind == "reset":
            await self._reset(scope, receive)
        else:
            complete = await drain(receive, self.drain_limit)
            headers = {"Retry-After": "1"} if kind == "429" else None
            detail = f"injected fault {kind}"
            await send_json_error(send, int(kind), detail, headers=headers, close=not complete)

    def _delayed(self, send: Send) -> Send:
        async def delayed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                await asyncio.sleep(SLOW_SECONDS)
            await send(message)

        return delayed_send

    async def _reset(self, scope: Scope, receive: Receive) -> None:
        extension = scope.get("extensions", {}).get(RESET_EXTENSION)
        if extension is None:
            raise RuntimeError("the reset fault needs uvicorn with ResettableHttpToolsProtocol")
        reset: Callable[[], None] = extension["reset"]
        reset()
        while (await receive())["type"] != "http.disconnect":
            pass


class Latency:
    """Every request waits ``ms`` before it is handled: a WAN round trip that costs no CPU."""

    def __init__(self, app: ASGIApp, ms: int) -> None:
        self.app = app
        self.seconds = ms / 1000

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await asyncio.sleep(self.seconds)
        await self.app(scope, receive, send)
