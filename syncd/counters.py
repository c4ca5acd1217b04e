"""What one process run did, as plain numbers: the progress bar, the one-shot summary, the live state
and `/metrics` read them; the stages only add to them."""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

UPLOAD_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upload durations in seconds: a 1 KiB file on loopback (~2 ms) up to a big file on a slow uplink."""


@dataclass(slots=True)
class Durations:
    """A fixed-bucket histogram (Prometheus' shape: cumulative counts are derived when exposed)."""

    bounds: tuple[float, ...] = UPLOAD_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(UPLOAD_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


@dataclass(slots=True)
class Counters:
    scanned: int = 0
    hashed: int = 0
    unchanged: int = 0
    uploaded: int = 0
    reused: int = 0
    failed: int = 0
    retry: int = 0
    changed: int = 0
    unreadable: int = 0
    bytes_uploaded: int = 0
    deleted: int = 0
    walk_errors: int = 0
    crashed: int = 0
    """Jobs that hit a bug: logged with a traceback, counted here and in `status`, the row retried later."""
    in_flight: int = 0
    """Uploads being resolved or sent right now."""
    hits: Counter[str] = field(default_factory=Counter)
    """Cache hits by where the remote file was found: local (this manifest), listing, lookup."""
    failures: Counter[str] = field(default_factory=Counter)
    """Failed attempts by kind: too_large, unsupported_type, rejected, auth, rate_limited, server, network…"""
    upload_seconds: Durations = field(default_factory=Durations)
    pruned: Counter[str] = field(default_factory=Counter)
    """Remote files the reconciler deleted, by why."""
    last_reconcile_at: float | None = None
    hooks_ran: int = 0
    hooks_failed: int = 0
    """Hook attempts that failed (each is retried; `status` shows the manifest's totals)."""
    sources_removed: int = 0
    """Synced files after_sync deleted or moved out of their folder."""
