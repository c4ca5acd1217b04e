"""The client's request slots (`syncd.api.pacing`): who may send now, and what the depth controller hears.

Real asyncio and the real depth controller; the stall threshold is set to 0 where a test needs a request
to count as stalled at once, so no test waits on the wall clock.
"""

from __future__ import annotations

import asyncio

import pytest

from syncd.api.errors import NotFoundError, RateLimitedError, ServerError
from syncd.api.pacing import MIN_SAMPLES, Pacer
from syncd.depth import AdaptiveDepth, FixedDepth

pytestmark = pytest.mark.anyio


async def settle_loop(rounds: int = 20) -> None:
    """Let every ready callback and task run (call_later(0) included); no wall time is spent."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def primed(pacer: Pacer) -> Pacer:
    """``pacer`` after enough quick answers that it knows the server's usual latency."""
    for _ in range(MIN_SAMPLES):
        async with pacer.slot(observed=True):
            pass
    return pacer


async def hold(pacer: Pacer, release: asyncio.Event, *, observed: bool = True) -> None:
    async with pacer.slot(observed=observed):
        await release.wait()


async def test_a_stalled_request_lets_the_next_one_go_on_an_adaptive_depth() -> None:
    pacer = await primed(Pacer(AdaptiveDepth(maximum=1), capacity=8, release_stalled=True, stall_floor=0.0))
    assert pacer.limit == 1
    stuck, other = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(hold(pacer, stuck))
    await settle_loop()
    second = asyncio.create_task(hold(pacer, other))
    await settle_loop()
    assert pacer.in_flight == 2, "the stalled request gave its slot to the next one"
    other.set()
    await asyncio.wait_for(second, 5)
    assert not first.done()
    stuck.set()
    await asyncio.wait_for(first, 5)
    assert pacer.in_flight == 0


async def test_a_pinned_depth_never_lets_more_than_n_go() -> None:
    pacer = await primed(Pacer(FixedDepth(1), capacity=1, release_stalled=False, stall_floor=0.0))
    stuck, other = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(hold(pacer, stuck))
    await settle_loop()
    second = asyncio.create_task(hold(pacer, other))
    other.set()
    await settle_loop()
    assert pacer.in_flight == 1
    assert not second.done()
    stuck.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)


async def test_stalled_requests_never_exceed_the_pool() -> None:
    pacer = await primed(Pacer(AdaptiveDepth(maximum=3), capacity=3, release_stalled=True, stall_floor=0.0))
    stuck = asyncio.Event()
    held = [asyncio.create_task(hold(pacer, stuck)) for _ in range(6)]
    await settle_loop()
    assert pacer.in_flight == 3
    stuck.set()
    await asyncio.wait_for(asyncio.gather(*held), 5)
    assert pacer.in_flight == 0


async def test_a_big_transfer_is_never_counted_as_stalled() -> None:
    pacer = await primed(Pacer(AdaptiveDepth(maximum=1), capacity=8, release_stalled=True, stall_floor=0.0))
    stuck, other = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(hold(pacer, stuck, observed=False))
    await settle_loop()
    second = asyncio.create_task(hold(pacer, other))
    other.set()
    await settle_loop()
    assert not second.done(), "a long PUT is progress, not a stall"
    stuck.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)


async def test_nothing_counts_as_stalled_before_the_usual_latency_is_known() -> None:
    pacer = Pacer(AdaptiveDepth(maximum=8), capacity=8, release_stalled=True, stall_floor=0.0)
    stuck, other = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(hold(pacer, stuck))
    await settle_loop()
    second = asyncio.create_task(hold(pacer, other))
    other.set()
    await settle_loop()
    assert not second.done(), "a first request on a 50 ms WAN is not a stall"
    stuck.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)


async def test_overload_halves_the_depth_and_frees_the_slot() -> None:
    depth = AdaptiveDepth(maximum=64, initial=8)
    now = [0.0]
    pacer = Pacer(depth, capacity=64, release_stalled=True, clock=lambda: now[0])
    for error in (RateLimitedError("slow down", status=429), ServerError("boom", status=503)):
        before = depth.limit
        now[0] += 1.0  # sent after the last change: the controller ignores requests sent before it
        with pytest.raises(type(error)):
            async with pacer.slot(observed=True):
                raise error
        assert depth.limit == max(1, before // 2)
    assert pacer.in_flight == 0


async def test_an_answer_such_as_404_is_not_overload() -> None:
    depth = AdaptiveDepth(maximum=64, initial=8)
    pacer = Pacer(depth, capacity=64, release_stalled=True)
    for _ in range(3):
        with pytest.raises(NotFoundError):
            async with pacer.slot(observed=True):
                raise NotFoundError("no such md5", status=404)
    assert depth.limit == 8


async def test_a_waiter_cancelled_in_the_queue_leaves_no_trace() -> None:
    pacer = Pacer(FixedDepth(1), capacity=1, release_stalled=False)
    stuck = asyncio.Event()
    first = asyncio.create_task(hold(pacer, stuck))
    await settle_loop()
    waiting = asyncio.create_task(hold(pacer, asyncio.Event()))
    await settle_loop()
    waiting.cancel()
    await settle_loop()
    stuck.set()
    await asyncio.wait_for(first, 5)
    after = asyncio.Event()
    after.set()
    await asyncio.wait_for(hold(pacer, after), 5)
    assert pacer.in_flight == 0
