"""The reference server's FastAPI object, built in-process: its routes and OpenAPI document.

The server exposes neither (an ``/openapi.json`` would be a route without authentication), so tests that
need them build the same app the server runs, from the same settings, over a throwaway data dir.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from syncd.server import ServerSettings
from syncd.server.app import create_app
from syncd.server.stats import ServerStats
from syncd.server.store import Store


def fastapi_of(app: Any) -> FastAPI:
    """The FastAPI object under the ASGI layers of ``create_app`` (latency, faults, auth, upload front)."""
    while not isinstance(app, FastAPI):
        app = app.app
    return app


def _front(app: Any) -> set[tuple[str, str]]:
    """The (method, path template) pairs that plain ASGI layers above FastAPI answer themselves (the
    upload routes): a layer that routes says so with a ``routes`` attribute."""
    found: set[tuple[str, str]] = set()
    while not isinstance(app, FastAPI):
        found.update(getattr(app, "routes", ()))
        app = app.app
    return found


@contextmanager
def built_app(settings: ServerSettings) -> Iterator[Any]:
    """The whole ASGI app of a server with these settings; its store lives only inside the ``with``."""
    with tempfile.TemporaryDirectory(prefix="syncd-inprocess-") as tmp:
        store = Store(Path(tmp))
        try:
            local = ServerSettings(**{**vars(settings), "data_dir": Path(tmp)})
            yield create_app(local, store, ServerStats())
        finally:
            store.close()


@contextmanager
def built_api(settings: ServerSettings) -> Iterator[FastAPI]:
    """The FastAPI app of a server with these settings; its store lives only inside the ``with``."""
    with built_app(settings) as app:
        yield fastapi_of(app)


def openapi_of(settings: ServerSettings) -> dict[str, Any]:
    with built_api(settings) as api:
        document: dict[str, Any] = api.openapi()
        return document


def routes_of(settings: ServerSettings) -> set[tuple[str, str]]:
    """Every (method, path template) the app routes, documented in its schema or not: FastAPI's and those
    the ASGI front answers before FastAPI. Each of the latter must be one of FastAPI's routes too (the
    documentation route that puts it in the schema and in a 405's ``Allow``), or this fails."""
    with built_app(settings) as app:
        routes = set(_walk(fastapi_of(app).router.routes, ""))
        if missing := _front(app) - routes:
            raise AssertionError(f"answered ahead of FastAPI but not one of its routes: {sorted(missing)}")
        return routes


def front_routes_of(settings: ServerSettings) -> set[tuple[str, str]]:
    """The routes answered ahead of FastAPI (without its per-request routing and dependency solving)."""
    with built_app(settings) as app:
        return _front(app)


def _walk(routes: Iterable[Any], prefix: str) -> Iterator[tuple[str, str]]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield from ((method, prefix + route.path) for method in route.methods or ())
        elif hasattr(route, "original_router"):  # FastAPI >= 0.16x keeps included routers whole
            yield from _walk(route.original_router.routes, prefix + route.include_context.prefix)
        else:
            raise AssertionError(f"unknown kind of route {route!r}: teach routes_of() about it")
