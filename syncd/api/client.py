"""Async client of the Files API (design §5).

Layers, each peeling off one concern: bearer auth (an ``httpx.Auth``, so the presigned PUT can go without
it) → retries (:mod:`syncd.api.retry`) → mapping of statuses and httpx exceptions to
:mod:`syncd.api.errors` → the transport (:mod:`syncd.api.transport`: aiohttp's by default, httpx's, or one
passed in). No httpx type crosses the package boundary except the optional ``transport`` argument, which is
how tests and benchmarks plug in.

Uploads stream from disk in :data:`CHUNK_SIZE` pieces read in a worker thread (a blocking read of a file on
a network share must not stall the event loop that also owns the manifest writer), re-open the file for
every attempt (the official SDK re-sends a consumed handle on retry and stores a 0-byte file), and send an
exact ``Content-Length``: presigned targets such as S3 refuse chunked bodies, and a fixed length lets the
client notice a file that changes under it (:class:`SourceChangedError`).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import mimetypes
import os
import random
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self, TypeVar

import httpx
import pydantic

from syncd.api.errors import (
    ApiError,
    InvalidResponseError,
    NetworkError,
    NotFoundError,
    OutcomeUnknownError,
    ServerError,
    SourceChangedError,
    error_for_status,
)
from syncd.api.models import FileResponse, PresignedUrlResponse
from syncd.api.pacing import OBSERVED_SIZE, Pacer
from syncd.api.retry import (
    MAX_RETRY_AFTER_SECONDS,
    RetryPolicy,
    backoff_delay,
    call_with_retries,
    parse_retry_after,
)
from syncd.api.transport import TransportKind, make_transport
from syncd.config import CONCURRENCY, PRESIGNED_THRESHOLD, RETRIES, TIMEOUT_SECONDS
from syncd.depth import AdaptiveDepth, FixedDepth

T = TypeVar("T")

CHUNK_SIZE = 1 << 20
"""Bytes per read: big enough that the thread hop per chunk is noise, small enough to keep memory flat.

Measured on a 1 GiB presigned PUT over loopback, both transports: 256 KiB and 4 MiB reads cost more client
CPU than 1 MiB (more hops; bigger unsent remainders copied into the socket transport's buffer)."""
SMALL_FILE = 1 << 20  # read whole and sent in one piece; larger files stream in CHUNK_SIZE pieces
INLINE_FILE = 256 << 10  # read on the event loop itself: cheaper than a hop to a worker thread

FLOOR_THROUGHPUT = 1 << 20
"""Bytes/s an upload is allowed to be slow before its attempt times out (a guess: a poor uplink).

httpx timeouts apply per socket operation, so a transfer that trickles never trips them; each upload
attempt therefore also gets a total deadline of ``timeout + size / FLOOR_THROUGHPUT``, and the read timeout
(waiting for the answer after the last byte, while the server hashes and stores the body) gets the same."""

MAX_PAGE = 1000
"""Largest ``limit`` the API accepts (design §5)."""

MAX_RESPONSE_BYTES = 16 << 20
"""Largest answer read, counted after decoding: a full page of 1,000 files is about 300 KiB, and a broken
or hostile server (or a compressed bomb) must not make the daemon buffer without bound."""
MAX_ERROR_BODY = 64 << 10
"""What is read of an error's body: its start is detail enough, and the status already says what happened."""

_FILE_LIST = pydantic.TypeAdapter(list[FileResponse])


def _default_user_agent() -> str:
    try:
        return f"syncd/{importlib.metadata.version('syncd')}"
    except importlib.metadata.PackageNotFoundError:
        return "syncd/unknown"


class _BearerAuth(httpx.Auth):
    """Adds the API key per request, so a request sent with ``auth=None`` carries no key at all."""

    def __init__(self, api_key: str) -> None:
        self._value = f"Bearer {api_key}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._value
        yield request


@dataclass(frozen=True)
class _Body:
    """One attempt's request body: a stream (or a small file's bytes) of known length, and its type."""

    stream: AsyncIterator[bytes] | bytes
    length: int
    content_type: str


def _form_quote(value: str) -> str:
    """Escape a multipart parameter value as browsers do (WHATWG): quote, CR and LF percent-encoded."""
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


Throttle = Callable[[int], Awaitable[None]]
"""Waits until ``n`` more bytes may be sent (a bandwidth cap shared by every upload in flight)."""


async def _read_file(
    f: BinaryIO, path: Path, size: int, mtime_ns: int, throttle: Throttle | None = None
) -> AsyncIterator[bytes]:
    """Yield exactly ``size`` bytes of ``f``; abort before the last chunk if the file changed meanwhile.

    Holding the last chunk back until an ``fstat`` agrees with the one taken at open means a file that
    shrank, grew or was rewritten is never stored complete-looking on the server: the request dies short.
    """
    remaining = size
    pending = b""
    while remaining > 0:
        if throttle is not None:
            await throttle(min(CHUNK_SIZE, remaining))
        chunk = await asyncio.to_thread(f.read, min(CHUNK_SIZE, remaining))
        if not chunk:
            raise SourceChangedError(
                str(path), f"file shrank while sending ({size - remaining} of {size} bytes)"
            )
        remaining -= len(chunk)
        if pending:
            yield pending
        pending = chunk
    st = await asyncio.to_thread(os.fstat, f.fileno())
    if st.st_size != size or st.st_mtime_ns != mtime_ns:
        raise SourceChangedError(str(path), "file changed while sending")
    if pending:
        yield pending


def _read_small(path: Path, expected: tuple[int, int] | None) -> bytes | None:
    """The whole file if it is at most SMALL_FILE bytes (None: stream it instead), read in one go.

    The same checks as the streaming path: the stat at open must match ``expected``, and a file that
    changed while it was read raises instead of being sent.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if expected is not None and (st.st_size, st.st_mtime_ns) != expected:
            raise SourceChangedError(str(path), "file changed since it was hashed")
        if st.st_size > SMALL_FILE:
            return None
        data = f.read(st.st_size + 1)
        after = os.fstat(f.fileno())
    if len(data) != st.st_size or (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise SourceChangedError(str(path), "file changed while it was read")
    return data


@asynccontextmanager
async def _open_file(
    path: Path, expected: tuple[int, int] | None = None
) -> AsyncIterator[tuple[BinaryIO, int, int]]:
    """Open ``path`` afresh (one handle per attempt) and report its size and mtime at open."""
    f = await asyncio.to_thread(open, path, "rb")
    try:
        st = await asyncio.to_thread(os.fstat, f.fileno())
        if expected is not None and (st.st_size, st.st_mtime_ns) != expected:
            raise SourceChangedError(str(path), "file changed since it was hashed")
        yield f, st.st_size, st.st_mtime_ns
    finally:
        await asyncio.to_thread(f.close)


def _http_client(
    *,
    base_url: httpx.URL,
    api_key: str,
    user_agent: str,
    timeout: float,
    concurrency: int,
    transport: TransportKind | httpx.AsyncBaseTransport,
) -> httpx.AsyncClient:
    chosen: httpx.AsyncBaseTransport | None
    if transport == "httpx":
        chosen = None  # httpx builds its own, with the limits below and the environment's proxies
    elif isinstance(transport, str):
        chosen = make_transport(transport, concurrency=concurrency)
    else:
        chosen = transport
    return httpx.AsyncClient(
        base_url=base_url,
        auth=_BearerAuth(api_key),
        headers={"User-Agent": user_agent, "Accept": "application/json"},
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        transport=chosen,
        follow_redirects=False,
    )


class FilesClient:
    """Client of one Files API endpoint; use as ``async with FilesClient(...) as client``.

    ``concurrency`` bounds the requests in flight (and the connection pool); ``depth`` (default: pinned at
    ``concurrency``) decides how many of them may be in flight now (:mod:`syncd.api.pacing`). A caller
    awaiting a slot waits *before* its deadline starts, so queueing behind big uploads is never mistaken
    for a timeout.
    ``retries`` counts retries after the first attempt. ``transport`` names the transport to build
    ("aiohttp", "httpx": httpx's own, which also honours proxies from the environment) or is one to use
    as it is (its pool should hold ``concurrency`` connections). ``sleep`` and ``uniform`` (a draw from
    [0, 1) for the jitter) are injected so tests observe waits without spending wall time.
    ``floor_throughput`` is the slowest an upload may be before its attempt times out (lower it when a
    bandwidth cap shares a slow uplink between uploads).
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        timeout: float = TIMEOUT_SECONDS,
        retries: int = RETRIES,
        concurrency: int = CONCURRENCY,
        depth: AdaptiveDepth | FixedDepth | None = None,
        presigned_threshold: int = PRESIGNED_THRESHOLD,
        transport: TransportKind | httpx.AsyncBaseTransport = "aiohttp",
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        uniform: Callable[[], float] = random.random,
        user_agent: str | None = None,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_retry_after: float = MAX_RETRY_AFTER_SECONDS,
        floor_throughput: float = FLOOR_THROUGHPUT,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if retries < 0:
            raise ValueError("retries must not be negative")
        self._base_url = httpx.URL(base_url.rstrip("/") + "/")
        self._timeout = timeout
        self._floor = floor_throughput
        self._api_key = api_key
        self._presigned_threshold = presigned_threshold
        self._policy = RetryPolicy(
            attempts=retries + 1, base=backoff_base, cap=backoff_cap, max_retry_after=max_retry_after
        )
        self._sleep = sleep
        self._uniform = uniform
        self._pacer = Pacer(
            depth or FixedDepth(concurrency),
            capacity=concurrency,
            release_stalled=isinstance(depth, AdaptiveDepth),
        )
        # Whether this server has shown our md5 extension; only then is `purpose` sent on hash lookups
        # (design §5: use an extension only after seeing it).
        self.extensions = False
        # Left to httpx, a relative URL and its params are parsed three times per request; built once, and
        # remembered for the routes that repeat (uploads), measured ~25% less client CPU per small upload.
        self._url = functools.lru_cache(maxsize=64)(self._absolute)
        self._make_http = functools.partial(
            _http_client,
            base_url=self._base_url,
            api_key=api_key,
            user_agent=user_agent or _default_user_agent(),
            timeout=timeout,
            concurrency=concurrency,
            transport=transport,
        )
        self._built: httpx.AsyncClient | None = None
        self._closed = False

    @property
    def _http(self) -> httpx.AsyncClient:
        """The HTTP client, built on the first request: a pass with nothing to send (a no-change pass) never
        loads a transport, and aiohttp's takes ~120 ms to import."""
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._built is None:
            self._built = self._make_http()
        return self._built

    def prepare(self) -> None:
        """Build the HTTP client now rather than on the first request: a daemon's first uploads should not
        wait for the transport's import (measured: event → uploaded p99 of settle + 168 ms, not + 9 ms)."""
        self._http  # noqa: B018 - the property builds it

    @property
    def depth(self) -> int:
        """How many requests may be in flight now (the adaptive depth's current value, or the pinned one)."""
        return self._pacer.limit

    @property
    def attempts(self) -> int:
        """How often one call is sent at most: the first try and its retries."""
        return self._policy.attempts

    async def pause(self, retry: int) -> None:
        """Wait as a call waits before its ``retry``-th retry (backoff, full jitter): for a caller that sends
        a request again itself, such as an upload whose answer was lost once it knows the upload did not
        land."""
        policy = self._policy
        await self._sleep(
            backoff_delay(retry, base=policy.base, cap=policy.cap, retry_after=None, u=self._uniform())
        )

    def longest_upload(self, size: int) -> float:
        """The longest one upload of ``size`` bytes can take, every attempt and wait included: it bounds
        which remote files created after a crash's recorded intent can be ours."""
        per_attempt = self._timeout + size / self._floor
        policy = self._policy
        return (per_attempt + max(policy.cap, policy.max_retry_after)) * policy.attempts

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close pooled connections; the client cannot be used afterwards."""
        self._closed = True
        if self._built is not None:
            await self._built.aclose()

    def _loggable(self, text: str) -> str:
        """Server or transport text fit for one log line, without the API key: a server or proxy that
        echoes the request (error pages often do) would otherwise put the key in our logs."""
        return _one_line(text.replace(self._api_key, "[redacted]") if self._api_key else text)

    # -- public calls ------------------------------------------------------------------------------

    async def health(self) -> None:
        """Succeeds only if the server is up *and* accepts the key (401 → :class:`AuthError`)."""
        await self._call("health", "GET", "health")

    async def get(self, file_id: str) -> FileResponse:
        return _parse(FileResponse, await self._call("get", "GET", f"files/{_segment(file_id)}"))

    async def delete(self, file_id: str) -> FileResponse:
        """Delete and return the deleted file. A retried delete whose first try landed answers 404."""
        return _parse(FileResponse, await self._call("delete", "DELETE", f"files/{_segment(file_id)}"))

    def _noticed(self, item: FileResponse) -> FileResponse:
        if item.md5 is not None:
            self.extensions = True
        return item

    async def find_by_md5(self, md5: str, *, purpose: str | None = None) -> FileResponse | None:
        """The newest remote file with this md5, or None.

        ``purpose`` narrows the lookup only on a server that has shown the md5 extension; callers must still
        check the hit's purpose, as the public API answers the newest file of any purpose.
        """
        params = {"purpose": purpose} if purpose is not None and self.extensions else None
        try:
            response = await self._call("find_by_md5", "GET", f"files/hash/{_segment(md5)}", params=params)
        except NotFoundError:
            return None
        return self._noticed(_parse(FileResponse, response))

    async def download(self, file_id: str, *, dest: Path) -> int:
        """Write the file's bytes to ``dest`` atomically (a temporary name beside it, then a rename) and
        return how many were written; ``dest`` is never left half-written, and an existing one is replaced
        only by a complete copy.

        Uses ``GET /files/{id}/content``, an extension of the reference server: the public API (and a
        ``--public-only`` server) has no such route and answers 404, as it does for an unknown id, so a
        caller that needs to tell the two apart asks :meth:`get` first. Retried like any call; each attempt
        starts a new temporary file.
        """
        url = f"files/{_segment(file_id)}/content"

        async def attempt() -> int:
            async with self._pacer.slot(observed=False):
                return await self._receive(url, dest)

        return await call_with_retries(
            attempt, policy=self._policy, sleep=self._sleep, uniform=self._uniform, op="download"
        )

    async def list_page(
        self, *, skip: int = 0, limit: int = MAX_PAGE, purpose: str | None = None
    ) -> list[FileResponse]:
        if skip < 0 or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"need skip >= 0 and 1 <= limit <= {MAX_PAGE}")
        params: dict[str, str | int] = {"skip": skip, "limit": limit}
        if purpose is not None:
            params["purpose"] = purpose
        response = await self._call("list", "GET", "files", params=params)
        try:
            items = _FILE_LIST.validate_json(response.content)
        except pydantic.ValidationError as exc:
            raise _invalid("list", exc, response.status_code) from exc
        if items:
            self._noticed(items[0])
        return items

    async def iter_all(
        self, *, page_size: int = MAX_PAGE, purpose: str | None = None
    ) -> AsyncIterator[FileResponse]:
        """Every remote file, newest first, paging until a short page; a failed page raises.

        An id already yielded (the listing shifted because a file was added meanwhile) is skipped. A page
        that brings nothing new while full means the server ignores ``skip``: that raises rather than loop.
        """
        seen: set[str] = set()
        skip = 0
        while True:
            page = await self.list_page(skip=skip, limit=page_size, purpose=purpose)
            fresh = [item for item in page if item.id not in seen]
            if page and not fresh and len(page) >= page_size:
                raise ApiError(f"listing does not advance at skip={skip}; server ignores skip?")
            for item in fresh:
                seen.add(item.id)
                yield item
            if len(page) < page_size:
                return
            skip += len(page)

    async def list_all(self, *, page_size: int = MAX_PAGE, purpose: str | None = None) -> list[FileResponse]:
        """The complete listing or an exception, never a partial one: the reconciler plans deletions on it."""
        return [item async for item in self.iter_all(page_size=page_size, purpose=purpose)]

    async def upload(
        self,
        path: Path,
        *,
        purpose: str,
        filename: str | None = None,
        generate_public_url: bool = False,
        expected: tuple[int, int] | None = None,
        throttle: Throttle | None = None,
    ) -> FileResponse:
        """Upload ``path`` as a new remote file: direct multipart up to ``presigned_threshold`` bytes, above
        it presigned (POST presigned-url → PUT → verify), as the official SDK decides.

        ``generate_public_url`` is sent explicitly as false by default: the public API defaults it to true,
        and a sync daemon should not publish a user's documents unasked. Local ``OSError`` (file vanished)
        propagates unchanged; :class:`SourceChangedError` if the file changed while being sent, or if its
        (size, mtime_ns) at open differ from ``expected`` (what the caller hashed: without the md5 extension
        a same-size edit could not be noticed afterwards). ``throttle`` is awaited before each piece of
        the file is sent.
        """
        name = filename or path.name
        size = expected[0] if expected is not None else (await asyncio.to_thread(path.stat)).st_size
        if size > self._presigned_threshold:
            item = await self._upload_presigned(
                path, name=name, purpose=purpose, expected=expected, throttle=throttle
            )
        else:
            item = await self._upload_direct(
                path,
                size=size,
                name=name,
                purpose=purpose,
                public=generate_public_url,
                expected=expected,
                throttle=throttle,
            )
        return self._noticed(item)

    # -- upload paths ------------------------------------------------------------------------------

    async def _upload_direct(
        self,
        path: Path,
        *,
        size: int,
        name: str,
        purpose: str,
        public: bool,
        expected: tuple[int, int] | None,
        throttle: Throttle | None,
    ) -> FileResponse:
        part_type = mimetypes.guess_type(name)[0] or "application/octet-stream"

        @asynccontextmanager
        async def multipart() -> AsyncIterator[_Body]:
            boundary = os.urandom(16).hex()
            head = (
                f"--{boundary}\r\n"
                f'Content-Disposition: form-data; name="file"; filename="{_form_quote(name)}"\r\n'
                f"Content-Type: {part_type}\r\n\r\n"
            ).encode()
            tail = f"\r\n--{boundary}--\r\n".encode()
            content_type = f"multipart/form-data; boundary={boundary}"
            if expected is not None and expected[0] <= INLINE_FILE:
                # A thread hop costs more than reading a few KiB from the page cache on the loop.
                small = _read_small(path, expected)
            else:
                small = await asyncio.to_thread(_read_small, path, expected)
            if small is not None:
                # One thread hop and one send for the common case (scans, documents): measured ~3x less
                # client CPU per file than streaming a handful of chunks through the event loop.
                if throttle is not None:
                    await throttle(len(small))
                yield _Body(head + small + tail, len(head) + len(small) + len(tail), content_type)
                return
            async with _open_file(path, expected) as (f, size, mtime_ns):

                async def stream() -> AsyncIterator[bytes]:
                    yield head
                    async for chunk in _read_file(f, path, size, mtime_ns, throttle):
                        yield chunk
                    yield tail

                yield _Body(stream(), len(head) + size + len(tail), content_type)

        params = {"purpose": purpose, "generate_public_url": "true" if public else "false"}
        response = await self._call(
            "upload",
            "POST",
            "files",
            params=params,
            body=multipart,
            resend=False,
            observed=size <= OBSERVED_SIZE,
        )
        return _parse(FileResponse, response)

    async def _upload_presigned(
        self,
        path: Path,
        *,
        name: str,
        purpose: str,
        expected: tuple[int, int] | None,
        throttle: Throttle | None,
    ) -> FileResponse:
        # Sent as given (no ``expiration``: the server's default applies), so that a bad purpose is judged
        # by the server (422 → ValidationError) exactly as on the direct path.
        body = {"filename": name, "purpose": purpose}
        grant = _parse(
            PresignedUrlResponse, await self._call("presign", "POST", "files/presigned-url", json=body)
        )

        @asynccontextmanager
        async def raw() -> AsyncIterator[_Body]:
            async with _open_file(path, expected) as (f, size, mtime_ns):
                yield _Body(_read_file(f, path, size, mtime_ns, throttle), size, grant.content_type)

        # The URL authorises itself; like the SDK, send no API key to what may be another host.
        target = self._base_url.join(grant.url)
        await self._call("presigned_put", "PUT", target, body=raw, authorize=False, observed=False)
        return _parse(
            FileResponse, await self._call("verify", "GET", f"files/verify-upload/{_segment(grant.id)}")
        )

    # -- one request, retried ------------------------------------------------------------------------

    async def _call(
        self,
        op: str,
        method: str,
        url: str | httpx.URL,
        *,
        params: Mapping[str, str | int] | None = None,
        json: dict[str, Any] | None = None,
        body: Callable[[], AbstractAsyncContextManager[_Body]] | None = None,
        authorize: bool = True,
        resend: bool = True,
        observed: bool = True,
    ) -> httpx.Response:
        """Send one logical request with retries; return the 2xx response or raise an :class:`ApiError`.

        ``body`` builds a fresh :class:`_Body` context per attempt, so a retry re-opens the file.
        ``resend=False`` for a request that stores a new file each time it is carried out: it is sent again
        only after an answer saying it was not (429, 503, no connection); any other failure raises
        :class:`OutcomeUnknownError`. ``observed``: its latency is a sample of the server's (not a big
        body's: its time says how fast the link is, see :mod:`syncd.api.pacing`).
        """

        target = (
            url if isinstance(url, httpx.URL) else self._url(url, tuple(params.items()) if params else ())
        )

        async def attempt() -> httpx.Response:
            try:
                async with self._pacer.slot(observed=observed):
                    if body is None:
                        return await self._send(method, target, json=json, authorize=authorize)
                    async with body() as b:
                        return await self._send(method, target, body=b, authorize=authorize)
            except (NetworkError, ServerError) as exc:
                if resend or _not_carried_out(exc):
                    raise
                raise OutcomeUnknownError(f"{exc} (it may have been stored)", status=exc.status) from exc

        return await call_with_retries(
            attempt, policy=self._policy, sleep=self._sleep, uniform=self._uniform, op=op
        )

    def _absolute(self, path: str, params: tuple[tuple[str, str | int], ...]) -> httpx.URL:
        """``path`` (relative to the base URL) with ``params`` as one absolute URL (see ``self._url``)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return httpx.URL(f"{self._base_url}{path}{query}")

    async def _send(
        self,
        method: str,
        url: httpx.URL,
        *,
        authorize: bool,
        json: dict[str, Any] | None = None,
        body: _Body | None = None,
    ) -> httpx.Response:
        size = body.length if body is not None else 0
        deadline = self._timeout + size / self._floor
        headers = (
            {"Content-Type": body.content_type, "Content-Length": str(body.length)}
            if body is not None
            else None
        )
        extra: dict[str, Any] = {} if authorize else {"auth": None}
        with _mapped_errors(method, deadline, self._loggable):
            async with (
                asyncio.timeout(deadline),
                self._http.stream(
                    method,
                    url,
                    json=json,
                    content=body.stream if body is not None else None,
                    headers=headers,
                    timeout=httpx.Timeout(self._timeout, read=deadline),
                    **extra,
                ) as streamed,
            ):
                response = await _read_capped(streamed)
        if response.is_success:
            return response
        raise _status_error(response, self._loggable)

    async def _receive(self, url: str, dest: Path) -> int:
        """One attempt of :meth:`download`: stream into a fresh temporary file beside ``dest``, then rename.

        The temporary name is created with ``O_EXCL`` and mode 0666, so the umask applies as for any new
        file and nothing else is ever overwritten by it; a failed attempt removes it.
        """
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        fd = await asyncio.to_thread(os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            with os.fdopen(fd, "wb") as out:
                written = await self._stream_into(url, out)
                await asyncio.to_thread(out.flush)
                await asyncio.to_thread(os.fsync, out.fileno())
            await asyncio.to_thread(os.replace, tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return written

    async def _stream_into(self, url: str, out: BinaryIO) -> int:
        loop = asyncio.get_running_loop()
        written = 0
        with _mapped_errors("GET", self._timeout, self._loggable):
            async with asyncio.timeout(self._timeout) as deadline:
                async with self._http.stream("GET", url) as response:
                    if not response.is_success:
                        raise _status_error(await _read_capped(response), self._loggable)
                    length = response.headers.get("Content-Length")
                    expected = int(length) if length is not None and length.isdigit() else None
                    # Like an upload's: the header wait is bounded by ``timeout``, the body by its size too.
                    allowance = None if expected is None else self._timeout + expected / FLOOR_THROUGHPUT
                    deadline.reschedule(None if allowance is None else loop.time() + allowance)
                    async for chunk in response.aiter_bytes(CHUNK_SIZE):
                        await asyncio.to_thread(out.write, chunk)
                        written += len(chunk)
        if expected is not None and written != expected:
            raise NetworkError(f"GET {url}: body ended after {written} of {expected} bytes")
        return written


@contextmanager
def _mapped_errors(method: str, deadline: float, clean: Callable[[str], str]) -> Iterator[None]:
    """Turn timeouts and httpx exceptions into :mod:`syncd.api.errors`, so httpx types stay in here;
    ``clean`` makes a message one loggable line with no secret in it."""
    try:
        yield
    except TimeoutError as exc:
        raise NetworkError(f"{method} timed out after {deadline:.0f} s") from exc
    except httpx.TimeoutException as exc:
        raise NetworkError(f"{method} timed out: {type(exc).__name__}") from exc
    except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError) as exc:
        raise NetworkError(f"{method} failed: {clean(_describe(exc))}") from exc
    except httpx.HTTPError as exc:
        raise ApiError(f"{method} failed: {clean(_describe(exc))}") from exc


def _not_carried_out(exc: NetworkError | ServerError) -> bool:
    """The failure says the server did not act on the request: it refused it for now (503), or the
    connection was never made."""
    if exc.status == 503:
        return True
    return isinstance(exc.__cause__, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def _status_error(response: httpx.Response, clean: Callable[[str], str]) -> ApiError:
    return error_for_status(
        response.status_code,
        clean(_detail(response)),
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
    )


async def _read_capped(response: httpx.Response) -> httpx.Response:
    """``response`` with its body read, refusing a success over :data:`MAX_RESPONSE_BYTES` as soon as it
    is known to be one (by ``Content-Length``, else by counting) instead of buffering it, and reading at most
    :data:`MAX_ERROR_BODY` of an error. Counting decoded chunks works the same on every httpx transport."""
    limit = MAX_RESPONSE_BYTES if response.is_success else MAX_ERROR_BODY
    declared = response.headers.get("Content-Length", "")
    if response.is_success and declared.isdigit() and int(declared) > limit:
        raise InvalidResponseError(
            f"response too large: {declared} bytes declared", status=response.status_code
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            if not response.is_success:
                chunks.append(chunk[: len(chunk) - (size - limit)])
                break
            raise InvalidResponseError(
                f"response too large: over {limit >> 20} MiB", status=response.status_code
            )
        chunks.append(chunk)
    # Decoded already: the copy must not claim an encoding (or a length) its content no longer has.
    headers = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code, headers=headers, content=b"".join(chunks), request=response.request
    )


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` as one bounded log line: whitespace (newlines included) collapsed, the rest cut off."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _invalid(what: str, exc: pydantic.ValidationError, status: int) -> InvalidResponseError:
    """The first problems of an answer that is not the documented model, in one line and without the
    offending values: a server that echoes the request would put the API key among them."""
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False, include_context=False)[:3]
    )
    return InvalidResponseError(_one_line(f"unexpected {what} response: {problems}"), status=status)


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else f"{type(exc).__name__} (connection closed)"


def _segment(value: str) -> str:
    """Quote an id into one path segment: ids come from the server or the manifest, and must never be able
    to change the route (``..``, ``/``, ``?``)."""
    if not value or value in (".", ".."):
        raise ValueError(f"invalid path segment {value!r}")
    return urllib.parse.quote(value, safe="")


M = TypeVar("M", bound=pydantic.BaseModel)


def _parse(model: type[M], response: httpx.Response) -> M:
    try:
        return model.model_validate_json(response.content)
    except pydantic.ValidationError as exc:
        raise _invalid(model.__name__, exc, response.status_code) from exc


def _detail(response: httpx.Response) -> str:
    """The server's ``{"detail": ...}`` if it sent one, else the start of the body."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and "detail" in payload:
        detail = payload["detail"]
        return detail if isinstance(detail, str) else str(detail)[:500]
    return response.text[:500] or response.reason_phrase
