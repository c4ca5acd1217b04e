"""The reference Files API (design §5) as a FastAPI app over a :class:`~syncd.server.store.Store`.

Choices where the contract leaves room:

- Validation errors (bad ``limit``, unknown ``purpose``, missing ``file`` field, bad JSON) are 422 with a
  string ``detail``; a body that is not parseable multipart is 400.
- ``--public-only``: no ``md5`` in responses, ``purpose`` filters on list and hash lookup are *ignored*
  (as the public API ignores unknown query parameters), and the content route does not exist.
- ``public_url`` is an absolute, HMAC-signed ``/v1/public/{id}`` URL that needs no API key.
- A presigned URL is ``/v1/uploads/{id}?expires=..&token=..``: the token signs id and expiry, so the
  PUT needs no ``Authorization``. The PUT answers 200 with the FileResponse; a presigned file's
  ``created_at`` and place in the listing are those of its PUT. ``verify-upload`` of a pending entry is
  404 with ``upload not completed``. ``--max-bytes`` and ``--reject-types`` apply to the PUT too.
- Handlers are ``async`` and do their small SQLite and file writes inline on the event loop: for many
  small uploads a thread hop per request costs more than the I/O itself. Bodies bigger than a
  :data:`~syncd.server.store.PIECE` are hashed and written piece by piece in a worker thread instead.
- The two upload routes are plain ASGI handlers in front of FastAPI (:class:`_UploadRoutes`). FastAPI has
  them too, as documentation routes: they put them in the OpenAPI schema and in a 405's ``Allow`` (another
  method on their paths is FastAPI's to answer), and pass a request that reaches them to the same handlers.
"""

from __future__ import annotations

import hashlib
import hmac
import mimetypes
import re
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse as BlobResponse
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from syncd.api.models import PURPOSES, ErrorDetail, FileResponse, PresignedUrlRequest, PresignedUrlResponse
from syncd.server.faults import FaultInjector, Latency
from syncd.server.settings import ServerSettings, is_rejected_type
from syncd.server.stats import ServerStats
from syncd.server.store import BlobWriter, FileRecord, Store
from syncd.server.wire import drain, drain_limit, safe_filename, send_json, send_json_error

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

DEFAULT_EXPIRATION = 24 * 3600
UPLOADS_PREFIX = "/v1/uploads/"
_OCTET = "application/octet-stream"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_MEDIA_TYPE = re.compile(r"[\w.+-]+/[\w.+-]+([ \t]*;[ -~]*)?", re.ASCII)
"""A media type safe to send back as ``Content-Type``: ``type/subtype``, parameters of visible ASCII."""
_MAX_SKIP = 2**63 - 1
"""SQLite's largest INTEGER: a larger OFFSET cannot be bound (it raised OverflowError, a 500)."""

_WHY = {
    400: "malformed or truncated request body (multipart, or JSON that is not UTF-8)",
    401: "missing or invalid API key",
    403: "invalid or expired upload token",
    404: "no such file",
    409: "already uploaded, or an upload to this URL is in progress",
    413: "the file exceeds the server's --max-bytes",
    415: "the file type is refused by --reject-types",
    422: "invalid parameters or body",
    429: "injected fault (--fault-kinds 429), with Retry-After",
    500: "injected fault (--fault-kinds 500)",
    503: "injected fault (--fault-kinds 503)",
}
_BINARY: dict[str, Any] = {"type": "string", "format": "binary"}
_UPLOAD_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": "purpose",
            "in": "query",
            "schema": {"type": "string", "enum": list(PURPOSES), "default": "assistants"},
        },
        {"name": "generate_public_url", "in": "query", "schema": {"type": "boolean", "default": True}},
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"], "properties": {"file": _BINARY}}
            }
        },
    },
}
_PUT_DOC: dict[str, Any] = {
    "parameters": [
        {"name": "expires", "in": "query", "required": True, "schema": {"type": "string"}},
        {"name": "token", "in": "query", "required": True, "schema": {"type": "string"}},
    ],
    "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": _BINARY}}},
}


class Health(BaseModel):
    status: Literal["ok"]


class Signer:
    """HMAC tokens for self-authorising URLs, keyed by a key derived from the API key (so URLs stay
    valid across a restart with the same key, and the API key itself never appears in a URL)."""

    def __init__(self, api_key: str) -> None:
        self._key = hashlib.sha256(b"syncd-server-url-signing\0" + api_key.encode()).digest()

    def sign(self, *parts: str) -> str:
        return hmac.new(self._key, "\0".join(parts).encode(), hashlib.sha256).hexdigest()

    def verify(self, token: str, *parts: str) -> bool:
        return hmac.compare_digest(token.encode(), self.sign(*parts).encode())


class BearerAuth:
    """401 unless ``Authorization: Bearer <key>``; ``exempt`` routes carry their own signed token."""

    def __init__(self, app: ASGIApp, api_key: str, stats: ServerStats, limit: int) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.stats = stats
        self.limit = limit

    @staticmethod
    def exempt(method: str, path: str) -> bool:
        return (method == "PUT" and path.startswith(UPLOADS_PREFIX)) or (
            method == "GET" and path.startswith("/v1/public/")
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.exempt(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        self.stats.count("unauthorized")
        complete = await drain(receive, self.limit)
        detail = "missing API key" if not given else "invalid API key"
        await send_json_error(send, 401, detail, headers={"WWW-Authenticate": "Bearer"}, close=not complete)


class _MultipartFile:
    """Streams the first part named ``file`` of a multipart body into a blob; other parts are skipped.

    The parser's callbacks only take bytes and set flags; what may wait (storing a full piece, dropping
    the blob) is left to the request handler, between chunks.
    """

    def __init__(
        self, boundary: bytes, open_blob: Callable[[], BlobWriter], reject_types: tuple[str, ...]
    ) -> None:
        self.open_blob = open_blob
        self.reject_types = reject_types
        self.blob: BlobWriter | None = None
        self.filename = ""
        self.content_type = _OCTET
        self.error: tuple[int, str] | None = None
        self.ended = False
        self._headers: dict[bytes, bytes] = {}
        self._field = b""
        self._value = b""
        self._target = False
        callbacks: MultipartCallbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as exc:
            self.fail(400, f"malformed multipart body: {exc}")

    def fail(self, status: int, detail: str) -> None:
        self.error = (status, detail)
        self._target = False

    async def discard(self) -> None:
        if self.blob is not None:
            await self.blob.discard()
            self.blob = None

    def _part_begin(self) -> None:
        self._headers = {}
        self._target = False

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition"))
        if params.get(b"name") != b"file" or self.blob is not None or self.error is not None:
            return
        raw_name = params.get(b"filename")
        self.filename = safe_filename(raw_name.decode("utf-8", "replace") if raw_name else None)
        declared = self._headers.get(b"content-type", b"").decode("latin-1").strip() or None
        if is_rejected_type(self.reject_types, self.filename, declared):
            self.fail(415, f"file type not accepted: {self.filename}")
            return
        self.content_type = declared or mimetypes.guess_type(self.filename)[0] or _OCTET
        self.blob = self.open_blob()
        self._target = True

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._target and self.blob is not None:
            self.blob.write(data[start:end])
            if self.blob.too_large:
                self.fail(413, "file exceeds the server's size limit")

    def _part_end(self) -> None:
        self._target = False

    def _end(self) -> None:
        self.ended = True


class _Disconnected(Exception):
    """The client went away before its request body was complete."""


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


def _query(scope: Scope) -> dict[str, str]:
    """The query parameters, the last of a repeated one winning (as Starlette's ``QueryParams.get``)."""
    raw: bytes = scope.get("query_string", b"")
    return dict(urllib.parse.parse_qsl(raw.decode("latin-1"), keep_blank_values=True)) if raw else {}


def _base_url(scope: Scope) -> str:
    """``scheme://host[:port][root_path]/v1`` as the client addressed us (Starlette's ``base_url``)."""
    scheme = scope.get("scheme", "http")
    host = _header(scope, b"host")
    if host is not None:
        authority = host.decode("latin-1")
    else:
        name, port = scope["server"]
        authority = name if port == {"http": 80, "https": 443}.get(scheme) else f"{name}:{port}"
    return f"{scheme}://{authority}{scope.get('root_path', '').rstrip('/')}/v1"


def _parse_bool(raw: str | None, default: bool) -> bool | None:
    if raw is None:
        return default
    low = raw.lower()
    return True if low in _TRUE else False if low in _FALSE else None


def _validation_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)


def _internal_handler(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def create_app(settings: ServerSettings, store: Store, stats: ServerStats) -> ASGIApp:
    """The ASGI app: latency → fault injection → bearer auth → the two upload routes → FastAPI under ``/v1``.

    The upload routes are plain ASGI handlers ahead of FastAPI: they read the body themselves, and for a
    1 KiB upload FastAPI's routing, dependency solving and middleware stack cost more CPU than the upload.
    """
    signer = Signer(settings.api_key)
    limit = drain_limit(settings.max_bytes)
    receiving: set[str] = set()
    router = APIRouter(prefix="/v1")
    injected = tuple(int(k) for k in settings.fault_kinds if k.isdigit()) if settings.fault_rate > 0 else ()
    purpose_filter: Any = Query(
        None, include_in_schema=not settings.public_only, json_schema_extra={"enum": list(PURPOSES)}
    )

    def documented(
        ok: dict[str, Any], *errors: int, code: int = 200, faults: bool = True
    ) -> dict[int | str, dict[str, Any]]:
        """A route's ``responses=``: its success and every error it can answer (each ``{"detail": ...}``),
        so that the OpenAPI schema (``app.openapi()``) says what the server really does."""
        docs: dict[int | str, dict[str, Any]] = {code: ok}
        for status in sorted({*errors, *(injected if faults else ())}):
            docs[status] = {"model": ErrorDetail, "description": _WHY[status]}
        return docs

    file_doc: dict[str, Any] = {"model": FileResponse}
    blob_doc: dict[str, Any] = {
        "description": "the file's bytes, as the type it was uploaded with",
        "content": {"*/*": {"schema": _BINARY}},
    }

    def error(status: int, detail: str, *, close: bool = False) -> JSONResponse:
        headers = {"Connection": "close"} if close else None
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    def to_wire(record: FileRecord, base: str) -> bytes:
        public_url = None
        if record.public:
            public_url = f"{base}/public/{record.id}?token={signer.sign('public', record.id)}"
        model = FileResponse.model_construct(  # the store's records are valid: no need to validate again
            id=record.id,
            filename=record.filename,
            bytes=record.bytes,
            purpose=record.purpose,
            created_at=record.created_at,
            object="file",
            public_url=public_url,
            md5=None if settings.public_only else record.md5,
        )
        return model.model_dump_json(exclude={"md5"} if settings.public_only else None).encode()

    def file_json(record: FileRecord, request: Request, status: int = 200) -> Response:
        body = to_wire(record, _base_url(request.scope))
        return Response(body, status_code=status, media_type="application/json")

    def blob(record: FileRecord) -> Response:
        """The stored bytes, typed as uploaded: the part's ``Content-Type`` is the client's text, and one
        that is no valid header value (a control character) made uvicorn drop the connection."""
        path = store.blob_path(record.id)
        media_type = record.content_type if _MEDIA_TYPE.fullmatch(record.content_type) else _OCTET
        return BlobResponse(path, media_type=media_type, filename=record.filename)

    def checked_purpose(purpose: str | None) -> str | None:
        """The purpose filter to apply (None = all); raises 422 for an unknown one."""
        if purpose is None or settings.public_only:
            return None
        if purpose not in PURPOSES:
            raise RequestValidationError([{"loc": ("query", "purpose"), "msg": _purpose_msg(purpose)}])
        return purpose

    # -- the upload routes, plain ASGI -------------------------------------------------------------------

    async def refuse(receive: Receive, send: Send, status: int, detail: str) -> None:
        """Answer an error after reading the body (so the client reads the answer, not a broken pipe)."""
        complete = await drain(receive, limit)
        await send_json_error(send, status, detail, close=not complete)

    async def receive_into(writer: BlobWriter, receive: Receive) -> bool:
        """Copy the body into ``writer``; False when a body already too large outgrew the drain limit.

        Without ``max_bytes`` nothing is too large: a presigned PUT may be any size.
        """
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _Disconnected
            chunk: bytes = message.get("body", b"")
            seen += len(chunk)
            if writer.too_large and seen > limit:
                return False
            writer.write(chunk)
            if writer.full:
                await writer.flush()
            if not message.get("more_body", False):
                return True

    async def upload(scope: Scope, receive: Receive, send: Send) -> None:
        stats.count("uploads")
        query = _query(scope)
        purpose = query.get("purpose", "assistants")
        if purpose not in PURPOSES:
            return await refuse(receive, send, 422, f"purpose: {_purpose_msg(purpose)}")
        public = _parse_bool(query.get("generate_public_url"), default=True)
        if public is None:
            return await refuse(receive, send, 422, "generate_public_url: expected true or false")
        length = _header(scope, b"content-length")
        if settings.max_bytes is not None and length is not None and length.isdigit() and int(length) > limit:
            return await send_json_error(send, 413, "file exceeds the server's size limit", close=True)
        kind, params = parse_options_header(_header(scope, b"content-type"))
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            return await refuse(receive, send, 400, "expected a multipart/form-data body with a boundary")
        file_id = store.new_id()
        body = _MultipartFile(
            boundary, lambda: store.open_blob(file_id, settings.max_bytes), settings.reject_types
        )
        seen = 0
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    await body.discard()
                    return await send_json_error(send, 400, "client disconnected")
                chunk: bytes = message.get("body", b"")
                seen += len(chunk)
                if body.error is None:
                    body.feed(chunk)
                    if body.blob is not None and body.blob.full:
                        await body.blob.flush()
                elif seen > limit:
                    await body.discard()
                    return await send_json_error(send, *body.error, close=True)
                if not message.get("more_body", False):
                    break
            if body.error is None and not body.ended:
                body.fail(400, "truncated multipart body")
            if body.error is None and body.blob is None:
                body.fail(422, "file: missing multipart field 'file'")
            if body.error is not None:
                await body.discard()
                return await send_json_error(send, *body.error)
            assert body.blob is not None
            received = await body.blob.finish()
        except BaseException:
            await body.discard()
            raise
        record = store.add_file(
            file_id,
            received,
            filename=body.filename,
            purpose=purpose,
            public=public,
            content_type=body.content_type,
        )
        await send_json(send, 201, to_wire(record, _base_url(scope)))

    async def presigned_put(scope: Scope, receive: Receive, send: Send) -> None:
        stats.count("presigned_puts")
        file_id = _upload_id(scope["path"])
        query = _query(scope)
        expires = query.get("expires", "")
        token = query.get("token", "")
        if not signer.verify(token, "upload", file_id, expires):
            return await refuse(receive, send, 403, "invalid upload token")
        if int(expires) <= store.clock().timestamp():
            return await refuse(receive, send, 403, "upload URL expired")
        if file_id in receiving:
            return await refuse(receive, send, 409, "an upload to this URL is in progress")
        pending = store.get_pending(file_id)
        if pending is None:
            if store.get(file_id) is not None:
                return await refuse(receive, send, 409, "already uploaded")
            return await refuse(receive, send, 404, "unknown or expired upload")
        declared = _header(scope, b"content-type")
        declared_type = declared.decode("latin-1") if declared is not None else None
        if is_rejected_type(settings.reject_types, pending.filename, declared_type):
            return await refuse(receive, send, 415, f"file type not accepted: {pending.filename}")
        # Held until the file is published: a second PUT meanwhile must not store the blob again.
        receiving.add(file_id)
        writer = store.open_blob(file_id, settings.max_bytes)
        try:
            try:
                complete = await receive_into(writer, receive)
            except _Disconnected:
                await writer.discard()
                return await send_json_error(send, 400, "client disconnected")
            if writer.too_large or not complete:
                await writer.discard()
                return await send_json_error(
                    send, 413, "file exceeds the server's size limit", close=not complete
                )
            record = store.complete_pending(pending, await writer.finish())
        except BaseException:
            await writer.discard()
            raise
        finally:
            receiving.discard(file_id)
        await send_json(send, 200, to_wire(record, _base_url(scope)))

    # -- FastAPI's routes ------------------------------------------------------------------------------

    @router.get("/health", responses=documented({"model": Health}, 401, faults=False))
    async def health() -> Response:
        stats.count("health")
        return Response(b'{"status":"ok"}', media_type="application/json")

    # The front answers these two before FastAPI sees them; FastAPI's copies document them in the schema,
    # make its 405 name their methods, and would hand a request the front let through to the same handler.
    @router.post(
        "/files",
        status_code=201,
        responses=documented(file_doc, 400, 401, 413, 415, 422, code=201),
        openapi_extra=_UPLOAD_DOC,
        name="upload",
    )
    async def upload_route() -> Response:
        return _Delegated(upload)

    @router.get("/files", responses=documented({"model": list[FileResponse]}, 401, 422))
    async def list_files(
        request: Request,
        skip: int = Query(0, ge=0, le=_MAX_SKIP),
        limit: int = Query(10, ge=1, le=1000),
        purpose: str | None = purpose_filter,
    ) -> Response:
        stats.count("lists")
        records = store.list_files(skip, limit, checked_purpose(purpose))
        base = _base_url(request.scope)
        return Response(
            b"[" + b",".join(to_wire(r, base) for r in records) + b"]", media_type="application/json"
        )

    @router.get("/files/hash/{md5}", responses=documented(file_doc, 401, 404, 422))
    async def hash_lookup(md5: str, request: Request, purpose: str | None = purpose_filter) -> Response:
        stats.count("hash_lookups")
        record = store.find_by_md5(md5.lower(), checked_purpose(purpose))
        if record is None:
            return error(404, "no file with this hash")
        return file_json(record, request)

    @router.post(
        "/files/presigned-url", responses=documented({"model": PresignedUrlResponse}, 400, 401, 415, 422)
    )
    async def presign(payload: PresignedUrlRequest, request: Request) -> Response:
        stats.count("presigns")
        filename = safe_filename(payload.filename)
        if is_rejected_type(settings.reject_types, filename, None):
            return error(415, f"file type not accepted: {filename}")
        expiration = payload.expiration or DEFAULT_EXPIRATION
        expires = int(store.clock().timestamp()) + expiration
        record = store.add_pending(
            filename=filename,
            purpose=payload.purpose,
            public=True,
            content_type=mimetypes.guess_type(filename)[0] or _OCTET,
            expires_at=float(expires),
        )
        base = _base_url(request.scope)
        token = signer.sign("upload", record.id, str(expires))
        answer = PresignedUrlResponse(
            id=record.id,
            url=f"{base}/uploads/{record.id}?expires={expires}&token={token}",
            filename=filename,
            content_type=record.content_type,
            upload_method="PUT",
            public_url=f"{base}/public/{record.id}?token={signer.sign('public', record.id)}",
            created_at=record.created_at,
            expiration=expiration,
        )
        return Response(answer.model_dump_json(), media_type="application/json")

    @router.put(
        "/uploads/{file_id}",
        responses=documented(file_doc, 400, 403, 404, 409, 413, 415, 422),
        openapi_extra=_PUT_DOC,
        name="presigned_put",
    )
    async def presigned_put_route(file_id: str) -> Response:
        return _Delegated(presigned_put)

    @router.get("/files/verify-upload/{file_id}", responses=documented(file_doc, 401, 404, 422))
    async def verify_upload(file_id: str, request: Request) -> Response:
        stats.count("verifies")
        record = store.get(file_id)
        if record is not None:
            return file_json(record, request)
        pending = store.get_pending(file_id) is not None
        return error(404, "upload not completed" if pending else "file not found")

    @router.get("/public/{file_id}", response_class=BlobResponse, responses=documented(blob_doc, 404, 422))
    async def public_content(file_id: str, token: str = "") -> Response:
        stats.count("contents")
        record = store.get(file_id)
        if record is None or not record.public or not signer.verify(token, "public", file_id):
            return error(404, "file not found")
        return blob(record)

    if not settings.public_only:

        @router.get(
            "/files/{file_id}/content",
            response_class=BlobResponse,
            responses=documented(blob_doc, 401, 404, 422),
        )
        async def content(file_id: str) -> Response:
            stats.count("contents")
            record = store.get(file_id)
            if record is None:
                return error(404, "file not found")
            return blob(record)

    @router.get("/files/{file_id}", responses=documented(file_doc, 401, 404, 422))
    async def get_file(file_id: str, request: Request) -> Response:
        stats.count("gets")
        record = store.get(file_id)
        return error(404, "file not found") if record is None else file_json(record, request)

    @router.delete("/files/{file_id}", responses=documented(file_doc, 401, 404, 422))
    async def delete_file(file_id: str, request: Request) -> Response:
        stats.count("deletes")
        record = store.delete(file_id)
        return error(404, "file not found") if record is None else file_json(record, request)

    def method_not_allowed(request: Request, _: Exception) -> JSONResponse:
        """405 whose ``Allow`` lists every method of the path (RFC 9110): Starlette names only the first
        route that matched, and ``GET``/``DELETE /files/{id}`` (or ``GET``/``POST /files``) are two.
        As in OpenAPI, a literal path (``/files/presigned-url``) hides the templated ones it also fits."""
        matching = [
            route
            for route in router.routes
            if isinstance(route, Route) and route.matches(request.scope)[0] is not Match.NONE
        ]
        fewest = min((route.path.count("{") for route in matching), default=0)
        methods = {
            method for route in matching if route.path.count("{") == fewest for method in route.methods or ()
        }
        headers = {"Allow": ", ".join(sorted(methods))}
        return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers=headers)

    api = FastAPI(title="syncd reference Files API", openapi_url=None, docs_url=None, redoc_url=None)
    api.include_router(router)
    api.add_exception_handler(RequestValidationError, _validation_handler)
    api.add_exception_handler(405, method_not_allowed)
    api.add_exception_handler(Exception, _internal_handler)

    app: ASGIApp = BearerAuth(_UploadRoutes(api, upload, presigned_put), settings.api_key, stats, limit)
    if settings.fault_rate > 0:
        app = FaultInjector(
            app,
            rate=settings.fault_rate,
            kinds=settings.fault_kinds,
            seed=settings.fault_seed,
            stats=stats,
            drain_limit=limit,
        )
    if settings.latency_ms > 0:
        app = Latency(app, settings.latency_ms)
    return app


class _UploadRoutes:
    """``POST /v1/files`` and ``PUT /v1/uploads/{id}`` as plain ASGI handlers; anything else goes to ``app``.

    An exception in a handler is answered as FastAPI's handler would (500, JSON), then re-raised so that
    uvicorn logs it.
    """

    routes = (("POST", "/v1/files"), ("PUT", "/v1/uploads/{file_id}"))
    """What this answers, as (method, path template): each is also one of FastAPI's documentation routes."""

    def __init__(self, app: ASGIApp, upload: ASGIApp, presigned_put: ASGIApp) -> None:
        self.app = app
        self.upload = upload
        self.presigned_put = presigned_put

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self.app
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "POST" and path == "/v1/files":
                handler = self.upload
            elif method == "PUT" and _upload_id(path):
                handler = self.presigned_put
        if handler is self.app:
            await handler(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await handler(scope, receive, tracked)
        except Exception:
            if not started:
                await send_json_error(send, 500, "internal server error")
            raise


class _Delegated(Response):
    """The answer of a FastAPI documentation route: the request goes on to the plain ASGI handler that the
    front would have called, so that both ways to it behave the same (FastAPI has read none of the body)."""

    def __init__(self, handler: ASGIApp) -> None:
        super().__init__()
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


def _upload_id(path: str) -> str:
    """The id in ``/v1/uploads/{id}``, or "" when ``path`` is not such a route."""
    rest = path.removeprefix(UPLOADS_PREFIX)
    return rest if rest != path and rest and "/" not in rest else ""


def _purpose_msg(purpose: str) -> str:
    return f"unknown purpose {purpose!r}; expected one of {', '.join(PURPOSES)}"
