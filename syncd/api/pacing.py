"""Request slots: how many of the client's requests are in flight at once, as the depth controller says.

A slot is held by one *attempt* while it is sent and answered, never by the backoff between attempts, so a
call waiting out a 429's ``Retry-After`` lets the others go on. A small request that has waited for its
answer far longer than its peers usually do (a stalled server worker, a lost packet) gives its slot back, so
one stall does not stop a pipe that is only one or two deep; it still occupies a connection, and the pool's
capacity bounds slots and stalled requests together. Only the adaptive depth lets stalled requests go: a
pinned ``concurrency = N`` means N requests at the server, stalled or not.

Each finished attempt tells the controller its latency (small requests only: a big transfer's time says how
fast the link is, not how long the server's queue is) and whether it met overload (429, 5xx, a timeout or a
broken connection: the errors a retry is for).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal, Protocol

from syncd.api.errors import ApiError

STALL_FACTOR = 8.0
"""A request is stalled once it has waited this many times the recent median latency..."""
STALL_FLOOR = 0.05
"""...and at least this long: loopback's median is a millisecond, and a commit on a disk can take tens."""
SAMPLES = 64
"""Latencies the median is taken over..."""
MIN_SAMPLES = 8
"""...once there are this many: before that no request counts as stalled (a 50 ms WAN is not a stall)."""
OBSERVED_SIZE = 1 << 20
"""Requests sending up to this many bytes are samples of the server's latency."""


class Depth(Protocol):
    """The depth controller (`syncd.depth`): read ``limit`` before a request, ``observe`` it after."""

    @property
    def limit(self) -> int: ...

    def observe(self, now: float, latency: float, outcome: Literal["ok", "overload"]) -> None: ...


class _Hold:
    __slots__ = ("stalled",)

    def __init__(self) -> None:
        self.stalled = False


class Pacer:
    """At most ``depth.limit`` requests holding slots, and at most ``capacity`` in flight with the stalled
    ones; callers are served first come, first served."""

    def __init__(
        self,
        depth: Depth,
        *,
        capacity: int,
        release_stalled: bool,
        clock: Callable[[], float] = time.monotonic,
        stall_floor: float = STALL_FLOOR,
    ) -> None:
        self.depth = depth
        self._capacity = capacity
        self._release_stalled = release_stalled
        self._clock = clock
        self._stall_floor = stall_floor
        self._active = 0
        self._stalled = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._recent: deque[float] = deque(maxlen=SAMPLES)

    @property
    def limit(self) -> int:
        return max(1, min(self.depth.limit, self._capacity))

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered, stalled ones included."""
        return self._active + self._stalled

    @asynccontextmanager
    async def slot(self, *, observed: bool) -> AsyncIterator[None]:
        """Hold a slot for one attempt; ``observed``: its latency is a sample of the server's."""
        await self._acquire()
        hold = _Hold()
        started = self._clock()
        timer = (
            asyncio.get_running_loop().call_later(self._stall_after(), self._stall, hold)
            if observed and self._release_stalled and len(self._recent) >= MIN_SAMPLES
            else None
        )
        outcome: Literal["ok", "overload"] | None = "ok"
        try:
            yield
        except ApiError as exc:
            outcome = "overload" if exc.retryable else "ok"  # an answer such as 404 is a normal one
            raise
        except BaseException:
            outcome = None  # cancelled, or our own error (the file changed): nothing about the server
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if hold.stalled:
                self._stalled -= 1
            else:
                self._active -= 1
            now = self._clock()
            latency = now - started
            if outcome == "ok" and observed:
                # Every answer moves the median, so a network that got slower moves the threshold too.
                self._recent.append(latency)
            if outcome == "overload" or (outcome == "ok" and observed and not hold.stalled):
                # A stalled request's latency is an outlier, not the length of the server's queue.
                self.depth.observe(now, latency, outcome)
            self._wake()

    def _room(self) -> bool:
        return self._active < self.limit and self._active + self._stalled < self._capacity

    async def _acquire(self) -> None:
        if not self._waiters and self._room():
            self._active += 1
            return
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(ticket)
        try:
            await ticket
        except asyncio.CancelledError:
            if ticket.done() and not ticket.cancelled():
                self._active -= 1  # granted just as it was cancelled: hand the slot on
                self._wake()
            else:
                with contextlib.suppress(ValueError):  # already passed over by `_wake`
                    self._waiters.remove(ticket)
            raise

    def _wake(self) -> None:
        while self._waiters and self._room():
            ticket = self._waiters.popleft()
            if not ticket.done():
                self._active += 1
                ticket.set_result(None)

    def _stall_after(self) -> float:
        return max(self._stall_floor, STALL_FACTOR * statistics.median(self._recent))

    def _stall(self, hold: _Hold) -> None:
        hold.stalled = True
        self._active -= 1
        self._stalled += 1
        self._wake()
