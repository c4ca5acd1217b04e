"""Small ASGI-level helpers shared by the routes and the middlewares: JSON errors, draining, filenames."""

from __future__ import annotations

import json
import unicodedata

from starlette.types import Message, Receive, Send

DRAIN_LIMIT = 64 * 1024 * 1024
"""Largest body read and thrown away before answering an error when no ``max_bytes`` bounds it."""


def drain_limit(max_bytes: int | None) -> int:
    """How much of a rejected body to read so that a client without ``Expect: 100-continue`` (the SDK)
    finishes sending and reads the answer instead of hitting a broken pipe."""
    return DRAIN_LIMIT if max_bytes is None else 2 * max_bytes + 1024 * 1024


async def drain(receive: Receive, limit: int) -> bool:
    """Read and drop the rest of the request body; False if it went past ``limit`` (then close)."""
    seen = 0
    while True:
        message: Message = await receive()
        if message["type"] != "http.request":
            return False
        seen += len(message.get("body", b""))
        if seen > limit:
            return False
        if not message.get("more_body", False):
            return True


async def send_json(
    send: Send, status: int, body: bytes, *, headers: dict[str, str] | None = None, close: bool = False
) -> None:
    """Answer a JSON ``body`` straight on the ASGI channel (used outside FastAPI's routing)."""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json_error(
    send: Send, status: int, detail: str, *, headers: dict[str, str] | None = None, close: bool = False
) -> None:
    """Answer ``{"detail": ...}`` straight on the ASGI channel."""
    await send_json(send, status, json.dumps({"detail": detail}).encode(), headers=headers, close=close)


def safe_filename(raw: str | None) -> str:
    """The name kept as metadata: the last path component, printable, never ``.``/``..``, at most 255
    characters. It is never used to build a path on disk; this only keeps listings unsurprising."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFC", "".join(ch for ch in name if ch.isprintable())).strip()
    if name in ("", ".", ".."):
        return "unnamed"
    return name[:255]
