"""The transports under the client's ``httpx.AsyncClient``: aiohttp's (the default) or httpx's own.

With aiohttp's connection pool and HTTP/1.1 code under it, a 1 KiB upload costs the client less than half
the CPU it costs on httpx's own (``python -m bench.transport``: 0.40 vs 0.93 ms on the 2-core development
VM); the API stays httpx's, so nothing above this module changes with the choice.

A transport's contract, as httpx's own keeps it: raise only httpx exceptions, and let an exception raised by
the request's body stream through unchanged (the client relies on that to stop, not retry, an upload whose
file changed while it was sent). httpx-aiohttp 0.2 keeps neither promise fully: it maps every
``ClientConnectionError`` (a refused connection, a server that hung up, a failing body stream) to
``ConnectTimeout``, leaves ``ClientResponseError`` (a malformed answer) unmapped, and some aiohttp messages
carry the request URL, whose query may be a presigned URL's token. :mod:`syncd.api.aiohttp_transport` puts
that right.
"""

from __future__ import annotations

from typing import get_args

import httpx

from syncd.config import TransportKind as TransportKind

TRANSPORTS: tuple[TransportKind, ...] = get_args(TransportKind)

KEEPALIVE_SECONDS = 5.0
"""Idle seconds a pooled connection is kept: httpx's default, so both transports pool alike."""


def make_transport(kind: TransportKind, *, concurrency: int) -> httpx.AsyncBaseTransport:
    """A fresh transport of ``kind`` whose pool holds ``concurrency`` connections, all kept alive.

    Neither reads proxies from the environment (httpx mounts those beside its transport when it builds one
    itself, which ``FilesClient(transport="httpx")`` lets it do).
    """
    limits = httpx.Limits(
        max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=KEEPALIVE_SECONDS
    )
    if kind == "aiohttp":
        from syncd.api.aiohttp_transport import AiohttpTransport  # aiohttp costs ~120 ms to import

        return AiohttpTransport(limits=limits)
    if kind == "httpx":
        return httpx.AsyncHTTPTransport(limits=limits)
    raise ValueError(f"unknown transport {kind!r}; expected one of {', '.join(TRANSPORTS)}")
