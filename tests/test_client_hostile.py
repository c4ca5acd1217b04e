"""FilesClient against a hostile or broken server: a raw asyncio TCP server on 127.0.0.1 that answers
garbage, too much, too little, or nothing at all.

Every case must end in exactly one clear :class:`ApiError` subclass whose message is one line and never
holds the API key (messages go to logs; a server or proxy that echoes the request would put it there),
and a huge answer must not be buffered: the server counts what it got to send before the client hung up.
Every case runs on each transport the client offers (``[remote] transport``): the default and httpx's own.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from syncd.api import (
    TRANSPORTS,
    ApiError,
    FilesClient,
    InvalidResponseError,
    NetworkError,
    ServerError,
    TransportKind,
    ValidationError,
)
from syncd.api.client import MAX_ERROR_BODY, MAX_RESPONSE_BYTES

pytestmark = pytest.mark.anyio

API_KEY = "sk-hostile-" + secrets.token_hex(12)
TIMEOUT = 1.0
"""The client's configured timeout in these tests: a hang must end in about this long."""
HUGE = 200 * 2**20
CHUNK = 64 * 2**10


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> TransportKind:
    kind: TransportKind = request.param
    return kind


@dataclass
class Exchange:
    """What the handler saw of one connection: the request head, and how much of its answer it sent."""

    head: bytes = b""
    sent: int = 0


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Exchange], Awaitable[None]]
"""Answers one connection whose request head was read into the :class:`Exchange`."""


@asynccontextmanager
async def hostile(handler: Handler) -> AsyncIterator[tuple[str, list[Exchange]]]:
    """Serve ``handler`` on a free 127.0.0.1 port; yields the base URL and the exchanges so far."""
    exchanges: list[Exchange] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        exchange = Exchange()
        exchanges.append(exchange)
        try:
            exchange.head = await reader.readuntil(b"\r\n\r\n")
            await handler(reader, writer, exchange)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up: what each test is about
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", exchanges
    finally:
        server.close()
        await server.wait_closed()


def client(base_url: str, transport: TransportKind) -> FilesClient:
    return FilesClient(base_url=base_url, api_key=API_KEY, timeout=TIMEOUT, retries=0, transport=transport)


def answer(status: str, body: bytes, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers, "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def send(writer: asyncio.StreamWriter, exchange: Exchange, data: bytes) -> None:
    writer.write(data)
    await writer.drain()
    exchange.sent += len(data)


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Wait, without a timer, until the client gives up and closes the connection."""
    await reader.read()


def assert_clean(error: ApiError, expected: type[ApiError]) -> None:
    """Exactly ``expected``, with a message fit for one log line and no trace of the key."""
    assert type(error) is expected, f"{type(error).__name__}: {error}"
    message = str(error)
    assert message
    assert "\n" not in message
    assert "\r" not in message
    assert len(message) <= 600
    assert API_KEY not in message
    assert API_KEY not in error.detail


# --- the server answers, but not with the API


async def html_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange) -> None:
    """A 200 page echoing the request, as debugging servers and some proxies do."""
    body = b"<html>\n<pre>\n" + exchange.head + b"</pre>\n</html>\n"
    await send(writer, exchange, answer("200 OK", body, "Content-Type: text/html"))


async def wrong_types(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange) -> None:
    body = json.dumps(
        {"id": 7, "bytes": "many", "purpose": ["x"], "created_at": None, "echo": exchange.head.decode()}
    )
    await send(writer, exchange, answer("200 OK", body.encode(), "Content-Type: application/json"))


def error_echo(status: str) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange) -> None:
        body = (
            b"<html><body>\n<h1>"
            + status.encode()
            + b"</h1>\n<pre>"
            + exchange.head
            + b"</pre>\n</body></html>"
        )
        await send(writer, exchange, answer(status, body, "Content-Type: text/html"))

    return handler


async def detail_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange) -> None:
    body = json.dumps({"detail": "bad request\nyou sent:\n" + exchange.head.decode()}).encode()
    await send(writer, exchange, answer("422 Unprocessable Content", body, "Content-Type: application/json"))


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (html_echo, InvalidResponseError),
        (wrong_types, InvalidResponseError),
        (detail_echo, ValidationError),
    ],
    ids=["200-not-json", "200-wrong-types", "422-detail-echo"],
)
async def test_garbage_answers(handler: Handler, expected: type[ApiError], transport: TransportKind) -> None:
    async with hostile(handler) as (base_url, exchanges), client(base_url, transport) as files:
        for call in (files.get("file-1"), files.list_page(), files.find_by_md5("0" * 32)):
            with pytest.raises(ApiError) as caught:
                await call
            assert_clean(caught.value, expected)
    assert all(API_KEY.encode() in exchange.head for exchange in exchanges), "the echo must hold the key"


@pytest.mark.parametrize(
    ("status", "expected"),
    [("400 Bad Request", ValidationError), ("502 Bad Gateway", ServerError)],
    ids=["400", "502"],
)
async def test_error_pages_echoing_the_request(
    status: str, expected: type[ApiError], transport: TransportKind
) -> None:
    async with hostile(error_echo(status)) as (base_url, _), client(base_url, transport) as files:
        with pytest.raises(ApiError) as caught:
            await files.get("file-1")
    assert_clean(caught.value, expected)


# --- too much


async def endless_json(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
) -> None:
    """200 MB of JSON-ish garbage, close-delimited (no length to refuse it by)."""
    await send(
        writer, exchange, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n["
    )
    item = b'{"id": "file-x", "bytes": 1, "purpose": "assistants", "created_at": "2026-01-01T00:00:00Z"},'
    chunk = item * (CHUNK // len(item))
    while exchange.sent < HUGE:
        await send(writer, exchange, chunk)


async def endless_error(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
) -> None:
    """A 503 whose page never ends: the status is the answer, only the start of the page is read."""
    await send(writer, exchange, b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n")
    while exchange.sent < HUGE:
        await send(writer, exchange, b"<p>busy</p>\n" * (CHUNK // 12))


async def declared_huge(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
) -> None:
    await send(writer, exchange, f"HTTP/1.1 200 OK\r\nContent-Length: {HUGE}\r\n\r\n".encode())
    while exchange.sent < HUGE:
        await send(writer, exchange, b" " * CHUNK)


async def gzip_bomb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange) -> None:
    """A small body that inflates past the cap: the limit must count decoded bytes."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = b"".join(packer.compress(b" " * CHUNK) for _ in range(4 * MAX_RESPONSE_BYTES // CHUNK))
    body += packer.flush()
    assert len(body) < MAX_RESPONSE_BYTES // 16
    await send(
        writer, exchange, answer("200 OK", body, "Content-Type: application/json", "Content-Encoding: gzip")
    )


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (endless_json, InvalidResponseError),
        (declared_huge, InvalidResponseError),
        (gzip_bomb, InvalidResponseError),
        (endless_error, ServerError),
    ],
    ids=["endless", "declared", "gzip", "endless-error"],
)
async def test_huge_answer_is_refused_unbuffered(
    handler: Handler, expected: type[ApiError], transport: TransportKind
) -> None:
    started = time.monotonic()
    async with hostile(handler) as (base_url, exchanges), client(base_url, transport) as files:
        with pytest.raises(ApiError) as caught:
            await files.list_page()
    assert_clean(caught.value, expected)
    if expected is InvalidResponseError:
        assert "too large" in str(caught.value)
    # The cap plus what the kernel's socket buffers hold: nowhere near everything.
    assert exchanges[0].sent < MAX_RESPONSE_BYTES + 32 * 2**20, exchanges[0].sent
    assert time.monotonic() - started < 30


async def test_a_failed_download_reads_only_the_start_of_the_error(
    transport: TransportKind, tmp_path: Path
) -> None:
    """The content route streams to a file, but an error's page is read into memory: only its start."""
    async with hostile(endless_error) as (base_url, exchanges), client(base_url, transport) as files:
        with pytest.raises(ApiError) as caught:
            await files.download("file-1", dest=tmp_path / "out")
    assert_clean(caught.value, ServerError)
    assert exchanges[0].sent < MAX_ERROR_BODY + 32 * 2**20, exchanges[0].sent
    assert await asyncio.to_thread(lambda: list(tmp_path.iterdir())) == [], "a failed download left a file"


# --- too little, or nothing


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange) -> None:
    await until_closed(reader)


async def stall_mid_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
) -> None:
    await send(writer, exchange, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n[")
    await until_closed(reader)


async def close_mid_headers(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
) -> None:
    await send(writer, exchange, b"HTTP/1.1 200 OK\r\nContent-Type: appli")


async def truncated_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
) -> None:
    await send(writer, exchange, b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n[{"id": "file-1", "by')


async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange) -> None:
    await send(writer, exchange, b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


@pytest.mark.parametrize(
    "handler",
    [hang, stall_mid_body, close_mid_headers, truncated_body, not_http],
    ids=["hang", "stall-mid-body", "closed-mid-headers", "truncated-body", "not-http"],
)
async def test_broken_exchanges_are_network_errors(handler: Handler, transport: TransportKind) -> None:
    started = time.monotonic()
    async with hostile(handler) as (base_url, _), client(base_url, transport) as files:
        with pytest.raises(ApiError) as caught:
            await files.list_page()
    elapsed = time.monotonic() - started
    assert_clean(caught.value, NetworkError)
    assert caught.value.retryable
    assert elapsed < TIMEOUT + 2.0, f"took {elapsed:.1f} s with a {TIMEOUT} s timeout"
