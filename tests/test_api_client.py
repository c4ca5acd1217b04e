"""The Files API client against the reference server on 127.0.0.1 (fixtures in tests/conftest.py).

Every test that talks to the server runs once per transport (``transport_kind``: aiohttp's and httpx's),
since the client's promises must hold on both. Requests are counted by a thin wrapper around the real
transport, so "exactly one request" is what went over the wire; what the transport itself put on the wire
(headers it adds, framing) is read by a TCP relay in front of the server. Waits are recorded by an injected
sleep, so retry tests spend no wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import yarl
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from syncd.api import (
    AuthError,
    FilesClient,
    NetworkError,
    NotFoundError,
    OutcomeUnknownError,
    RateLimitedError,
    ServerError,
    SourceChangedError,
    TooLargeError,
    UnsupportedTypeError,
    ValidationError,
    make_transport,
)
from syncd.api.aiohttp_transport import to_httpx_error
from syncd.api.retry import backoff_delay, parse_retry_after
from syncd.api.transport import TransportKind
from syncd.server import RunningServer

pytestmark = pytest.mark.anyio

MiB = 2**20
GiB = 2**30


ServerFactory = Callable[..., RunningServer]


@dataclass
class Wire:
    """What went over the wire, per request: method, path and headers; ``on_send`` runs as each request
    leaves, before its body is read."""

    sent: list[tuple[str, str, httpx.Headers]] = field(default_factory=list)
    on_send: Callable[[str], None] | None = None

    def counts(self) -> Counter[tuple[str, str]]:
        return Counter((method, path) for method, path, _ in self.sent)


class CountingTransport(httpx.AsyncBaseTransport):
    """A real transport of ``kind``, recording each request in ``wire`` before sending it."""

    def __init__(self, wire: Wire, kind: TransportKind) -> None:
        self.wire = wire
        self.inner = make_transport(kind, concurrency=8)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.wire.sent.append((request.method, request.url.path, request.headers.copy()))
        if self.wire.on_send is not None:
            self.wire.on_send(request.method)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Harness:
    server: RunningServer | None
    kind: TransportKind
    wire: Wire
    waits: list[float]

    def client(self, **overrides: Any) -> FilesClient:
        async def sleep(seconds: float) -> None:
            self.waits.append(seconds)

        options: dict[str, Any] = {
            "base_url": self.server.base_url if self.server else "",
            "api_key": self.server.api_key if self.server else "",
            "timeout": 10.0,
            "transport": CountingTransport(self.wire, self.kind),
            "sleep": sleep,
            "uniform": lambda: 0.5,
        }
        options.update(overrides)
        return FilesClient(**options)


class Relay:
    """A TCP relay on 127.0.0.1 in front of the server, below any transport: it keeps the bytes each client
    connection sent, can cut a connection at the first request that starts with ``cut``, and with ``hold``
    passes no answer back (a server that does not respond in time)."""

    def __init__(self, server: RunningServer, *, cut: bytes | None = None, hold: bool = False) -> None:
        url = httpx.URL(server.base_url)
        self.upstream = (url.host, url.port or 80)
        self.cut = cut
        self.hold = hold
        self.streams: list[bytearray] = []
        self.base_url = ""
        self._writers: list[asyncio.StreamWriter] = []
        self._listener: asyncio.Server | None = None

    async def __aenter__(self) -> Relay:
        self._listener = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._listener.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._listener is not None
        self._listener.close()
        for writer in self._writers:
            writer.transport.abort()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.upstream)
        self._writers += [client_w, server_w]
        sent = bytearray()
        self.streams.append(sent)

        async def requests() -> None:
            while data := await client_r.read(1 << 16):
                seen = max(0, len(sent) - len(self.cut or b""))
                sent.extend(data)
                if self.cut is not None and self.cut in sent[seen:]:
                    client_w.transport.abort()
                    server_w.transport.abort()
                    return
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        async def answers() -> None:
            while data := await server_r.read(1 << 16):
                if not self.hold:
                    client_w.write(data)
                    await client_w.drain()
            client_w.close()

        with contextlib.suppress(ConnectionError):
            await asyncio.gather(requests(), answers())

    def requests(self) -> list[tuple[str, dict[str, str]]]:
        """(request line, headers) of every request sent, each connection's framed by its Content-Length;
        parsing stops at a chunked request (there should be none)."""
        found: list[tuple[str, dict[str, str]]] = []
        for stream in self.streams:
            pos = 0
            while (end := stream.find(b"\r\n\r\n", pos)) != -1:
                line, *fields = stream[pos:end].decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
                found.append((line, headers))
                if "transfer-encoding" in headers:
                    break
                pos = end + 4 + int(headers.get("content-length", "0"))
            else:
                assert pos == len(stream), "the bytes sent do not match the Content-Lengths sent"
        return found


def harness(server: RunningServer | None, kind: TransportKind) -> Harness:
    return Harness(server=server, kind=kind, wire=Wire(), waits=[])


async def remote_bytes(server: RunningServer, file_id: str) -> bytes:
    """The stored bytes, fetched past the server's own injected faults (a handful of tries)."""
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {server.api_key}"}) as http:
        for _ in range(30):
            try:
                response = await http.get(f"{server.base_url}/files/{file_id}/content")
            except httpx.TransportError:
                continue
            if response.status_code not in (429, 500, 503):
                response.raise_for_status()
                return response.content
    raise AssertionError("content not fetchable")


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- every call --------------------------------------------------------------------------------------


async def test_calls_round_trip(server: RunningServer, tmp_path: Path, transport_kind: TransportKind) -> None:
    h = harness(server, transport_kind)
    data = os.urandom(300_000)
    src = write(tmp_path / "scan 1.pdf", data)
    async with h.client() as client:
        await client.health()
        uploaded = await client.upload(src, purpose="assistants")
        assert (uploaded.filename, uploaded.bytes, uploaded.purpose) == (
            "scan 1.pdf",
            len(data),
            "assistants",
        )
        assert await remote_bytes(server, uploaded.id) == data

        assert await client.get(uploaded.id) == uploaded
        md5 = hashlib.md5(data).hexdigest()
        hit = await client.find_by_md5(md5)
        assert hit is not None
        assert hit.id == uploaded.id
        assert (await client.find_by_md5(md5, purpose="assistants")) == hit
        assert await client.find_by_md5(md5, purpose="vision") is None
        assert await client.find_by_md5("0" * 32) is None
        assert uploaded.id in [f.id for f in await client.list_page(skip=0, limit=10)]

        deleted = await client.delete(uploaded.id)
        assert deleted.id == uploaded.id
        with pytest.raises(NotFoundError):
            await client.get(uploaded.id)
    assert h.waits == []


async def test_empty_file_is_an_ordinary_upload(
    server: RunningServer, tmp_path: Path, transport_kind: TransportKind
) -> None:
    h = harness(server, transport_kind)
    async with h.client() as client:
        uploaded = await client.upload(write(tmp_path / "empty.txt", b""), purpose="datasets")
    assert uploaded.bytes == 0
    assert await remote_bytes(server, uploaded.id) == b""


async def test_presigned_upload_sends_no_key_to_the_url(
    server: RunningServer, tmp_path: Path, transport_kind: TransportKind
) -> None:
    h = harness(server, transport_kind)
    data = os.urandom(50_000)
    async with h.client(presigned_threshold=10_000) as client:
        uploaded = await client.upload(
            write(tmp_path / "big.bin", data), purpose="batch", filename="renamed.bin"
        )
    assert (uploaded.filename, uploaded.bytes, uploaded.purpose) == ("renamed.bin", len(data), "batch")
    assert await remote_bytes(server, uploaded.id) == data
    methods = [method for method, _, _ in h.wire.sent]
    assert methods == ["POST", "PUT", "GET"]
    put_headers = h.wire.sent[1][2]
    assert "authorization" not in put_headers
    assert put_headers["content-length"] == str(len(data))
    assert all("authorization" in headers for _, _, headers in (h.wire.sent[0], h.wire.sent[2]))


async def test_on_the_wire_bodies_have_their_exact_length_and_the_put_carries_no_key(
    server: RunningServer, tmp_path: Path, transport_kind: TransportKind
) -> None:
    h = harness(server, transport_kind)
    big, small = os.urandom(50_000), os.urandom(2_000)
    async with Relay(server) as tap:
        async with h.client(base_url=tap.base_url, presigned_threshold=10_000) as client:
            await client.upload(write(tmp_path / "big.bin", big), purpose="batch")
            await client.upload(write(tmp_path / "small.bin", small), purpose="batch")
        sent = tap.requests()
    assert [line.split()[0] for line, _ in sent] == ["POST", "PUT", "GET", "POST"]
    assert all("transfer-encoding" not in headers for _, headers in sent)
    (_, put), (_, post) = sent[1], sent[3]
    assert "authorization" not in put
    assert put["content-length"] == str(len(big))
    assert int(post["content-length"]) > len(small)  # the multipart framing around the file
    bearer = f"Bearer {server.api_key}"
    assert [headers.get("authorization") for _, headers in sent] == [bearer, None, bearer, bearer]


async def test_a_connection_cut_mid_upload_is_a_network_error_naming_no_secret(
    server: RunningServer, tmp_path: Path, transport_kind: TransportKind
) -> None:
    h = harness(server, transport_kind)
    async with (
        Relay(server, cut=b"PUT /v1/uploads/") as tap,
        h.client(base_url=tap.base_url, presigned_threshold=MiB, retries=1) as client,
    ):
        with pytest.raises(NetworkError) as caught:
            await client.upload(write(tmp_path / "big.bin", os.urandom(4 * MiB)), purpose="batch")
    message = str(caught.value)
    assert caught.value.retryable
    assert "timed out" not in message
    assert server.api_key not in message
    assert "token=" not in message
    assert len(h.waits) == 1
    assert [m for m, _, _ in h.wire.sent] == ["POST", "PUT", "PUT"]


async def test_an_answer_that_does_not_come_in_time_is_a_network_error(
    server: RunningServer, transport_kind: TransportKind
) -> None:
    h = harness(server, transport_kind)
    async with (
        Relay(server, hold=True) as tap,
        h.client(base_url=tap.base_url, timeout=0.3, retries=0) as client,
    ):
        with pytest.raises(NetworkError) as caught:
            await client.get("any-id")
    assert "timed out" in str(caught.value)
    assert caught.value.retryable


async def test_list_all_pages_until_a_short_page(
    server_factory: ServerFactory, tmp_path: Path, transport_kind: TransportKind
) -> None:
    h = harness(server_factory(), transport_kind)
    async with h.client() as client:
        ids = [
            (await client.upload(write(tmp_path / f"f{i}.txt", f"file {i}".encode()), purpose="vision")).id
            for i in range(7)
        ]
        h.wire.sent.clear()
        listed = await client.list_all(page_size=3)
    assert [f.id for f in listed] == ids[::-1]
    assert h.wire.counts()[("GET", "/v1/files")] == 3


# -- retries -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "503", "429", "reset"])
async def test_retries_recover_from_faults(
    server_factory: ServerFactory, tmp_path: Path, kind: str, transport_kind: TransportKind
) -> None:
    server = server_factory(fault_rate=0.5, fault_kinds=(kind,), fault_seed=7)
    h = harness(server, transport_kind)
    direct = os.urandom(200_000)
    presigned = os.urandom(120_000)
    async with h.client(retries=12, presigned_threshold=100_000) as client:
        small = await client.upload(write(tmp_path / "small.bin", direct), purpose="assistants")
        big = await client.upload(write(tmp_path / "big.bin", presigned), purpose="assistants")
        listed = {f.id for f in await client.list_all(page_size=1)}
    assert server.stats.snapshot().get(f"fault_{kind}", 0) > 0, "the seeded faults should have fired"
    assert h.waits
    assert {small.id, big.id} <= listed
    assert (small.bytes, big.bytes) == (len(direct), len(presigned))
    assert await remote_bytes(server, small.id) == direct
    assert await remote_bytes(server, big.id) == presigned


@pytest.mark.parametrize("kind", ["500", "reset"])
async def test_an_upload_that_may_have_been_stored_is_not_sent_again(
    server_factory: ServerFactory, tmp_path: Path, kind: str, transport_kind: TransportKind
) -> None:
    """A direct upload stores a new file each time: after an answer that does not say whether it did, a
    second send could store a second copy. The caller resolves it by md5 lookup instead."""
    server = server_factory(fault_rate=1.0, fault_kinds=(kind,))
    h = harness(server, transport_kind)
    async with h.client(retries=5) as client:
        with pytest.raises(OutcomeUnknownError) as caught:
            await client.upload(write(tmp_path / "a.txt", b"a" * 500), purpose="assistants")
    assert not caught.value.retryable
    assert h.wire.counts()[("POST", "/v1/files")] == 1
    assert h.waits == []


async def test_an_upload_refused_for_now_is_sent_again(
    server_factory: ServerFactory, tmp_path: Path, transport_kind: TransportKind
) -> None:
    server = server_factory(fault_rate=1.0, fault_kinds=("503",))
    h = harness(server, transport_kind)
    async with h.client(retries=2) as client:
        with pytest.raises(ServerError):
            await client.upload(write(tmp_path / "a.txt", b"a" * 500), purpose="assistants")
    assert h.wire.counts()[("POST", "/v1/files")] == 3


async def test_retry_after_is_a_floor_for_the_wait(
    server_factory: ServerFactory, transport_kind: TransportKind
) -> None:
    h = harness(server_factory(fault_rate=1.0, fault_kinds=("429",), fault_seed=1), transport_kind)
    async with h.client(retries=2, uniform=lambda: 0.0) as client:
        with pytest.raises(RateLimitedError) as caught:
            await client.get("any-id")
    assert caught.value.retry_after == 1.0
    assert caught.value.retryable
    assert h.waits == [1.0, 1.0]
    assert len(h.wire.sent) == 3


async def test_retry_after_beyond_the_limit_is_left_to_the_caller(
    server_factory: ServerFactory, transport_kind: TransportKind
) -> None:
    h = harness(server_factory(fault_rate=1.0, fault_kinds=("429",), fault_seed=1), transport_kind)
    async with h.client(retries=5, max_retry_after=0.5) as client:
        with pytest.raises(RateLimitedError) as caught:
            await client.get("any-id")
    assert caught.value.retry_after == 1.0
    assert h.waits == []
    assert len(h.wire.sent) == 1


@pytest.mark.parametrize("threshold", [4 * MiB, 100], ids=["direct", "presigned"])
async def test_file_changing_while_sent_is_not_stored(
    server: RunningServer, tmp_path: Path, threshold: int, transport_kind: TransportKind
) -> None:
    # Larger than SMALL_FILE, so it is streamed (a small file is read whole first: a consistent snapshot).
    src = write(tmp_path / "scan.pdf", os.urandom(MiB + MiB // 2))

    def scanner_appends_a_page(method: str) -> None:
        if method != "GET":
            with src.open("ab") as f:
                f.write(b"page 2")

    h = harness(server, transport_kind)
    async with h.client(presigned_threshold=threshold) as client:
        h.wire.on_send = scanner_appends_a_page
        with pytest.raises(SourceChangedError):
            await client.upload(src, purpose="assistants")
        h.wire.on_send = None
        assert await client.list_all() == []
    assert h.waits == []


# -- errors that must not be retried -----------------------------------------------------------------


@pytest.mark.parametrize("threshold", [MiB, 100], ids=["direct", "presigned"])
async def test_too_large_is_permanent_and_sent_once(
    server_factory: ServerFactory, tmp_path: Path, threshold: int, transport_kind: TransportKind
) -> None:
    h = harness(server_factory(max_bytes=1000), transport_kind)
    async with h.client(presigned_threshold=threshold) as client:
        with pytest.raises(TooLargeError) as caught:
            await client.upload(write(tmp_path / "x.bin", os.urandom(2000)), purpose="assistants")
    assert caught.value.status == 413
    assert caught.value.permanent
    assert not caught.value.retryable
    assert_sent_once(h)


@pytest.mark.parametrize("threshold", [MiB, 100], ids=["direct", "presigned"])
async def test_unsupported_type_is_permanent_and_sent_once(
    server_factory: ServerFactory, tmp_path: Path, threshold: int, transport_kind: TransportKind
) -> None:
    h = harness(server_factory(reject_types=(".exe", "application/x-msdownload")), transport_kind)
    async with h.client(presigned_threshold=threshold) as client:
        with pytest.raises(UnsupportedTypeError) as caught:
            await client.upload(write(tmp_path / "setup.exe", os.urandom(500)), purpose="assistants")
    assert caught.value.status == 415
    assert caught.value.permanent
    assert_sent_once(h)


@pytest.mark.parametrize("threshold", [MiB, 100], ids=["direct", "presigned"])
async def test_unknown_purpose_is_a_permanent_validation_error(
    server: RunningServer, tmp_path: Path, threshold: int, transport_kind: TransportKind
) -> None:
    h = harness(server, transport_kind)
    async with h.client(presigned_threshold=threshold) as client:
        with pytest.raises(ValidationError) as caught:
            await client.upload(write(tmp_path / "a.txt", b"a" * 500), purpose="nonsense")
    assert caught.value.status == 422
    assert caught.value.permanent
    assert_sent_once(h)


async def test_not_found_is_sent_once(server: RunningServer, transport_kind: TransportKind) -> None:
    h = harness(server, transport_kind)
    async with h.client() as client:
        with pytest.raises(NotFoundError) as caught:
            await client.get("no-such-file")
        with pytest.raises(NotFoundError):
            await client.delete("no-such-file")
    assert caught.value.status == 404
    assert not caught.value.permanent
    assert_sent_once(h)


async def test_wrong_key_is_an_auth_error_without_retry(
    server: RunningServer, tmp_path: Path, transport_kind: TransportKind
) -> None:
    h = harness(server, transport_kind)
    async with h.client(api_key="wrong") as client:
        with pytest.raises(AuthError) as caught:
            await client.health()
        with pytest.raises(AuthError):
            await client.upload(write(tmp_path / "a.txt", b"a"), purpose="assistants")
    assert caught.value.status == 401
    assert_sent_once(h)


async def test_refused_connection_is_a_retried_network_error(transport_kind: TransportKind) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    h = harness(None, transport_kind)
    async with h.client(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", retries=3) as client:
        with pytest.raises(NetworkError) as caught:
            await client.health()
    assert caught.value.retryable
    assert caught.value.status is None
    assert "timed out" not in str(caught.value)
    assert len(h.waits) == 3
    assert len(h.wire.sent) == 4


def assert_sent_once(h: Harness) -> None:
    assert h.wire.sent, "a request should have been sent"
    assert max(h.wire.counts().values()) == 1, h.wire.counts()
    assert h.waits == []


# -- memory --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["direct", "presigned"])
async def test_big_upload_streams_with_flat_memory(
    server_factory: ServerFactory, tmp_path: Path, mode: str, transport_kind: TransportKind
) -> None:
    size = 200 * MiB
    # An explicit max_bytes: without one the server (as of writing) caps a presigned PUT at its 64 MiB
    # drain limit and resets the connection, which is the server's business, not this test's.
    server = server_factory(max_bytes=GiB)
    src = tmp_path / "big.bin"
    with src.open("wb") as f:
        f.truncate(size)
        f.seek(size - 5)
        f.write(b"tail!")
    h = harness(server, transport_kind)
    threshold = size if mode == "direct" else MiB
    try:
        tracemalloc.start()
        try:
            async with h.client(presigned_threshold=threshold, timeout=60.0) as client:
                uploaded = await client.upload(src, purpose="datasets")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        src.unlink()
    print(f"\n{mode} upload of {size // MiB} MiB: tracemalloc peak {peak / MiB:.1f} MiB")
    assert uploaded.bytes == size
    assert peak < 16 * MiB
    async with h.client() as client:
        await client.delete(uploaded.id)


# -- pure: aiohttp's errors as httpx's ---------------------------------------------------------------

PUT_URL = "http://127.0.0.1:9/v1/uploads/file-1?expires=1&token=5ec7e7"


def _bad_status() -> aiohttp.ClientResponseError:
    url = yarl.URL(PUT_URL)
    info = aiohttp.RequestInfo(url, "PUT", CIMultiDictProxy(CIMultiDict()), url)
    return aiohttp.ClientResponseError(info, (), status=400, message="Invalid HTTP status line")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (aiohttp.ServerDisconnectedError(), httpx.RemoteProtocolError),
        (aiohttp.ClientPayloadError("Response payload is not completed"), httpx.RemoteProtocolError),
        (_bad_status(), httpx.RemoteProtocolError),
        (aiohttp.SocketTimeoutError("Timeout on reading data from socket"), httpx.ReadTimeout),
        (aiohttp.ConnectionTimeoutError("Connection timeout to host"), httpx.ConnectTimeout),
        (aiohttp.ClientOSError(None, f"Can not write request body for {PUT_URL}"), httpx.NetworkError),
        (aiohttp.ClientConnectionError("Connection closed"), httpx.NetworkError),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else "",
)
@pytest.mark.parametrize("premapped", [False, True], ids=["raw", "as-httpx-aiohttp-maps-it"])
def test_aiohttp_errors_become_httpx_errors_of_their_kind_without_the_url_query(
    error: aiohttp.ClientError, expected: type[httpx.TransportError], premapped: bool
) -> None:
    request = httpx.Request("PUT", PUT_URL)
    raised: Exception = error
    if premapped:  # httpx-aiohttp turns every ClientConnectionError into ConnectTimeout, for one
        raised = httpx.ConnectTimeout(str(error))
        raised.__cause__ = error
    mapped = to_httpx_error(raised, request)
    assert type(mapped) is expected
    assert type(error).__name__ in str(mapped)
    assert "token" not in str(mapped)


def test_errors_that_are_not_aiohttps_pass_unchanged() -> None:
    error = ValueError("not ours")
    assert to_httpx_error(error, httpx.Request("GET", PUT_URL)) is error


# -- pure parts of the retry policy ------------------------------------------------------------------


@given(
    retry_num=st.integers(1, 200),
    u=st.floats(0.0, 1.0, exclude_max=True),
    retry_after=st.none() | st.floats(0.0, 1e6),
)
def test_backoff_is_full_jitter_under_the_cap_and_retry_after_is_a_floor(
    retry_num: int, u: float, retry_after: float | None
) -> None:
    delay = backoff_delay(retry_num, base=0.5, cap=30.0, retry_after=retry_after, u=u)
    ceiling = min(30.0, 0.5 * 2 ** min(retry_num - 1, 64))
    assert delay >= 0.0
    if retry_after is None:
        assert delay == pytest.approx(u * ceiling)
    else:
        assert delay == max(retry_after, u * ceiling)


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("1", 1.0), (" 2.5 ", 2.5), ("-3", 0.0), ("soon", None), ("nan", None)],
)
def test_parse_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date() -> None:
    now = datetime(2026, 5, 19, 12, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(header, now=now) == 90.0
    assert parse_retry_after(format_datetime(now - timedelta(hours=1), usegmt=True), now=now) == 0.0
