"""The one shape every queue-fed stage shares (restic's archiver): read items until ``None``, work on up to
N at once, and never let a bug in one item kill the stage silently."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

import structlog

from syncd.counters import Counters
from syncd.state import StateError

T = TypeVar("T")

log = structlog.get_logger("syncd.supervise")


class Gate:
    """Open while the state dir can be written. A stage whose write failed closes it and waits here, so
    the daemon stops taking work (one log line) instead of failing every file; the daemon's probe opens it
    again. Without a gate (one-shot commands) a `StateError` ends the pass."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self._closed = asyncio.Event()
        self.reason: str | None = None

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def close(self, error: StateError) -> None:
        if self.is_open:
            log.error(
                "state dir cannot be written: paused; resuming by itself once it can", reason=str(error)
            )
        self.reason = str(error)
        self._open.clear()
        self._closed.set()

    def reopen(self) -> None:
        log.info("state dir can be written again: resuming", was=self.reason)
        self.reason = None
        self._closed.clear()
        self._open.set()

    async def passing(self) -> None:
        await self._open.wait()

    async def closing(self) -> None:
        await self._closed.wait()


async def held(gate: Gate | None, error: StateError) -> None:
    """What a stage does with a `StateError`: wait at the gate, or (no gate) end the pass with it."""
    if gate is None:
        raise error
    gate.close(error)
    await gate.passing()


async def supervised(
    queue: asyncio.Queue[T | None],
    handle: Callable[[T], Awaitable[None]],
    *,
    workers: int | Callable[[], int],
    counters: Counters,
    what: str,
    key: Callable[[T], Hashable] | None = None,
    on_crash: Callable[[T, Exception], None] | None = None,
    gate: Gate | None = None,
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
    fatal: list[BaseException] = []
    wake = asyncio.Event()

    async def one(item: T, k: Hashable) -> None:
        try:
            await handle(item)
        except StateError as exc:
            if gate is None:
                raise
            gate.close(exc)  # the item is picked up again by the rescan or retry sweep after resuming
        except Exception as exc:
            counters.crashed += 1
            log.exception(f"{what} failed unexpectedly", item=repr(item)[:200])
            if on_crash is not None:
                on_crash(item, exc)
        finally:
            busy.discard(k)

    def finished(task: asyncio.Task[None]) -> None:
        running.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            fatal.append(error)
        wake.set()

    try:
        while (item := await queue.get()) is not None:
            k = key(item) if key is not None else object()
            if k in busy:
                continue
            if gate is not None:
                await gate.passing()
            while len(running) >= max(1, limit()):
                wake.clear()
                await wake.wait()
            if fatal:
                raise fatal[0]  # one-shot: a StateError ends the pass
            busy.add(k)
            task = asyncio.create_task(one(item, k))
            running.add(task)
            task.add_done_callback(finished)
        while running:
            await asyncio.gather(*running)  # one-shot: a StateError ends the pass
        if fatal:
            raise fatal[0]
    finally:
        left = list(running)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
