"""The one shape every queue-fed stage shares (restic's archiver): read items until ``None``, work on up to
N at once, and never let a bug in one item kill the stage silently."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

import structlog

from syncd.counters import Counters

T = TypeVar("T")

log = structlog.get_logger("syncd.supervise")


async def supervised(
    queue: asyncio.Queue[T | None],
    handle: Callable[[T], Awaitable[None]],
    *,
    workers: int | Callable[[], int],
    counters: Counters,
    what: str,
    key: Callable[[T], Hashable] | None = None,
    on_crash: Callable[[T, Exception], None] | None = None,
) -> None:
    """Run ``handle`` on each item, at most ``workers`` (or its current value) at once; return after
    ``None`` once the items in progress finished.

    An unexpected exception is logged with its traceback, counted in ``counters.crashed`` (shown by
    `status`), and handed to ``on_crash``; the stage goes on. With ``key``, an item whose key is already
    being worked on is dropped: that work's result covers it.
    """
    limit = workers if callable(workers) else (lambda: workers)
    running: set[asyncio.Task[None]] = set()
    busy: set[Hashable] = set()
    wake = asyncio.Event()

    async def one(item: T, k: Hashable) -> None:
        try:
            await handle(item)
        except Exception as exc:
            counters.crashed += 1
            log.exception(f"{what} failed unexpectedly", item=repr(item)[:200])
            if on_crash is not None:
                on_crash(item, exc)
        finally:
            busy.discard(k)

    def finished(task: asyncio.Task[None]) -> None:
        running.discard(task)
        wake.set()

    try:
        while (item := await queue.get()) is not None:
            k = key(item) if key is not None else object()
            if k in busy:
                continue
            while len(running) >= max(1, limit()):
                wake.clear()
                await wake.wait()
            busy.add(k)
            task = asyncio.create_task(one(item, k))
            running.add(task)
            task.add_done_callback(finished)
        while running:
            await asyncio.gather(*running)
    finally:
        left = list(running)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
