"""httpx-aiohttp's transport, held to httpx's transport contract (see :mod:`syncd.api.transport`)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import httpx
import httpx_aiohttp

_URL_QUERY = re.compile(r"(https?://[^\s?#'\"<>]*)[?#][^\s'\"<>]*")


class AiohttpTransport(httpx_aiohttp.AiohttpTransport):
    """httpx-aiohttp's transport with httpx's error contract and a session without per-request extras."""

    def get_client(self) -> aiohttp.ClientSession:
        """One session per transport, made on first use (inside the event loop, as aiohttp requires).

        No cookie jar (httpx keeps cookies above the transport) and no ``trust_env``: with it aiohttp reads
        ``~/.netrc`` for every request and could add an ``Authorization`` to the presigned PUT.
        """
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections or 0,
            keepalive_timeout=self.limits.keepalive_expiry,
            ssl=self.ssl_context,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body: _WatchedBody | None = None
        try:
            request.content  # noqa: B018 - raises RequestNotRead for a streamed body
        except httpx.RequestNotRead:
            body = _WatchedBody(request.stream)
            request.stream = body
        try:
            response = await super().handle_async_request(request)
        except Exception as exc:
            if body is not None and body.error is not None:
                raise body.error from None
            raise to_httpx_error(exc, request) from exc
        response.stream = _MappedStream(response.stream, request)
        return response


class _WatchedBody(httpx.AsyncByteStream):
    """A request body that remembers what its source raised: aiohttp wraps that in a connection error."""

    def __init__(self, inner: httpx.SyncByteStream | httpx.AsyncByteStream) -> None:
        if not isinstance(inner, httpx.AsyncByteStream):
            raise TypeError("an async transport needs an async request body")
        self._inner = inner
        self.error: Exception | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except Exception as exc:
            self.error = exc
            raise


class _MappedStream(httpx.AsyncByteStream):
    """A response body whose read errors are mapped like the request's."""

    def __init__(self, inner: httpx.SyncByteStream | httpx.AsyncByteStream, request: httpx.Request) -> None:
        if not isinstance(inner, httpx.AsyncByteStream):
            raise TypeError("an async transport returns an async response body")
        self._inner = inner
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except Exception as exc:
            raise to_httpx_error(exc, self._request) from exc

    async def aclose(self) -> None:
        await self._inner.aclose()


def to_httpx_error(exc: Exception, request: httpx.Request) -> Exception:
    """The httpx exception for an aiohttp failure (whether httpx-aiohttp mapped it already or not).

    Anything that is not aiohttp's comes back unchanged, to be re-raised as it was.
    """
    cause = exc.__cause__ if isinstance(exc, httpx.TransportError) else exc
    if not isinstance(cause, aiohttp.ClientError):
        return exc
    text = str(cause) or "no detail"
    message = _URL_QUERY.sub(r"\1", f"{type(cause).__name__}: {text}")
    kind: type[httpx.TransportError]
    if isinstance(cause, aiohttp.ConnectionTimeoutError):
        kind = httpx.ConnectTimeout
    elif isinstance(cause, aiohttp.ServerTimeoutError):
        kind = httpx.ReadTimeout
    elif isinstance(cause, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        kind = httpx.ProxyError
    elif isinstance(cause, aiohttp.ClientConnectorError):
        kind = httpx.ConnectError
    elif isinstance(
        cause, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError
    ):
        kind = httpx.RemoteProtocolError
    elif isinstance(cause, aiohttp.ClientConnectionError):
        kind = httpx.NetworkError
    elif isinstance(cause, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        kind = httpx.UnsupportedProtocol
    else:
        kind = httpx.TransportError
    return kind(message, request=request)
