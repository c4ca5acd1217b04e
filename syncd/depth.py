"""How many requests to keep in flight (`[remote] concurrency = "auto"`): a pure controller over
(now, latency, outcome), so its behaviour is tested against a simulated server, not a network.

The shape is TCP's: a slow start that doubles the depth every round of completions while throughput
doubles with it, then additive increase (one more per round) while throughput still rises, and
multiplicative decrease on overload (429, 5xx, timeouts) or when latency doubles (requests queue), and
a step back when a deeper pipe bought no throughput (on loopback the server's CPU, not the round trip,
is the bound). A 50 ms
WAN therefore climbs to dozens in flight within a few dozen requests; a saturated 2-core loopback
settles at one or two; a rate-limited server is halved on every 429 it sends, once per round.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

Outcome = Literal["ok", "overload"]

EFFICIENCY = 0.5
"""A deeper pipe is kept if it brings at least half the throughput its extra depth would bring were the
round trip the only bound (doubling: +50%; 32 → 33: +1.6%). A guess that stays above loopback's noise."""
MIN_ROUND = 4
"""Completions per measurement, at the least: fewer make a latency figure mostly noise."""
QUEUEING = 2.0
"""A round whose mean latency is twice the best recent one is queueing somewhere: decrease."""
BASELINE_SAMPLES = 256
"""The best latency of this many recent requests is the baseline (so it follows a changed network)."""
DECREASE = 0.5
"""Multiplicative decrease on overload (TCP's halving)."""


@dataclass(slots=True)
class _Round:
    depth: int
    latencies: list[float] = field(default_factory=list)


class FixedDepth:
    """`concurrency = N`: the depth the user pinned."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def observe(self, now: float, latency: float, outcome: Outcome) -> None:
        """Nothing adapts."""


def for_setting(setting: int | Literal["auto"], *, maximum: int) -> AdaptiveDepth | FixedDepth:
    return AdaptiveDepth(maximum=maximum) if setting == "auto" else FixedDepth(setting)


class AdaptiveDepth:
    """The in-flight limit; ``observe`` every finished request, read ``limit`` before starting one.

    Throughput is estimated by Little's law (depth / mean latency) rather than counted over time:
    completions arrive in bursts on a long round trip, and a count over a short window mostly measures
    the burst.
    """

    def __init__(self, *, maximum: int, minimum: int = 1, initial: int = 1) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError("need 1 <= minimum <= maximum")
        self.maximum = maximum
        self.minimum = minimum
        self._limit = min(max(initial, minimum), maximum)
        self._slow_start = True
        self._round = _Round(self._limit)
        self._last: tuple[int, float] | None = None  # (depth, throughput) of the last kept round
        self._calm_since = -math.inf  # requests sent before the last change measure the old depth
        self._recent: deque[float] = deque(maxlen=BASELINE_SAMPLES)

    @property
    def limit(self) -> int:
        return self._limit

    def observe(self, now: float, latency: float, outcome: Outcome) -> None:
        """One request finished at ``now`` after ``latency`` seconds."""
        if now - latency < self._calm_since:
            return
        if outcome == "overload":
            self._set(now, math.floor(self._limit * DECREASE))
            self._last = None
            return
        self._recent.append(latency)
        current = self._round
        current.latencies.append(latency)
        if len(current.latencies) < max(MIN_ROUND, current.depth):
            return
        mean = sum(current.latencies) / len(current.latencies)
        baseline = min(self._recent)
        throughput = current.depth / mean if mean > 0 else math.inf
        last = self._last
        if mean > baseline * QUEUEING and current.depth > self.minimum:
            self._set(now, math.floor(self._limit * DECREASE))  # requests mostly wait in a queue
            self._last = None
        elif (
            last is not None
            and current.depth > last[0]
            and throughput < last[1] * _wanted(last[0], current.depth)
        ):
            self._set(now, last[0])  # more in flight bought nothing: back, and grow slowly from here
        else:
            self._last = (current.depth, throughput)
            grown = self._limit * 2 if self._slow_start else self._limit + 1
            self._limit = min(self.maximum, grown)
            self._calm_since = now
            self._round = _Round(self._limit)

    def _set(self, now: float, limit: int) -> None:
        self._limit = max(self.minimum, min(self.maximum, limit))
        self._slow_start = False
        self._calm_since = now
        self._round = _Round(self._limit)


def _wanted(before: int, after: int) -> float:
    """The throughput ratio that makes going from ``before`` to ``after`` in flight worth it."""
    return 1.0 + EFFICIENCY * (after - before) / before
