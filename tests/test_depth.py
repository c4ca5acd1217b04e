"""The in-flight depth controller against a simulated server (a pure model, no network, no clock).

The model: every request spends half the round trip on the way in, waits for one of ``capacity``
server slots, is served for ``service`` seconds, and spends the other half of the round trip going back.
"""

from __future__ import annotations

import heapq

from hypothesis import given
from hypothesis import strategies as st

from syncd.depth import AdaptiveDepth


def simulate(
    depth: AdaptiveDepth,
    *,
    requests: int,
    rtt: float,
    service: float,
    capacity: int,
) -> list[int]:
    """Run ``requests`` requests through the model, as many in flight as ``depth`` allows; return the
    limit after each completion."""
    now = 0.0
    slots = [0.0] * capacity  # when each server slot is free again
    flight: list[tuple[float, float]] = []  # (finishes at, started at)
    started = 0
    limits: list[int] = []
    while len(limits) < requests:
        while len(flight) < depth.limit and started < requests:
            arrives = now + rtt / 2
            free_at = heapq.heappop(slots)
            begins = max(arrives, free_at)
            heapq.heappush(slots, begins + service)
            heapq.heappush(flight, (begins + service + rtt / 2, now))
            started += 1
        finished, sent = heapq.heappop(flight)
        now = finished
        depth.observe(now, finished - sent, "ok")
        limits.append(depth.limit)
    return limits


def test_a_saturated_server_on_loopback_settles_low() -> None:
    depth = AdaptiveDepth(maximum=64)
    limits = simulate(depth, requests=400, rtt=0.0, service=0.001, capacity=1)
    assert max(limits[50:]) <= 4, limits


def test_a_wan_round_trip_with_ample_capacity_climbs_fast() -> None:
    depth = AdaptiveDepth(maximum=64)
    limits = simulate(depth, requests=100, rtt=0.05, service=0.001, capacity=1000)
    assert max(limits) >= 32, limits


def test_a_rate_limit_halves_the_depth() -> None:
    depth = AdaptiveDepth(maximum=64)
    simulate(depth, requests=100, rtt=0.05, service=0.001, capacity=1000)
    before = depth.limit
    assert before >= 32
    depth.observe(100.0, 0.05, "overload")
    assert depth.limit == before // 2
    depth.observe(100.01, 0.05, "overload")  # sent before the decrease: the same burst, not a new one
    assert depth.limit == before // 2


def test_a_few_server_slots_settle_near_their_number() -> None:
    depth = AdaptiveDepth(maximum=64)
    limits = simulate(depth, requests=600, rtt=0.0, service=0.001, capacity=4)
    assert 2 <= limits[-1] <= 8, limits[-50:]


@given(
    st.lists(
        st.tuples(st.floats(0, 10), st.sampled_from(["ok", "ok", "ok", "overload"])), min_size=1, max_size=300
    ),
    st.integers(1, 64),
)
def test_the_limit_stays_within_its_bounds(events: list[tuple[float, str]], maximum: int) -> None:
    depth = AdaptiveDepth(maximum=maximum)
    now = 0.0
    for latency, outcome in events:
        now += 0.01
        depth.observe(now, latency, "ok" if outcome == "ok" else "overload")
        assert 1 <= depth.limit <= maximum
