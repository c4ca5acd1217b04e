"""Event → uploaded latency: ``syncd run`` watching an empty folder, files dropped one by one.

Each file (1 KiB, distinct random bytes) is written and closed, its drop time taken right after the close,
and the next one follows ``PACE`` later. The upload time is the server's own ``created_at`` (same machine,
same wall clock), read from the listing once every file has arrived; so the figure includes settling,
hashing, the cache check and the upload, and no polling interval. The peer column is the floor: the
configured ``settle_seconds``, which a file must sit quiet for before syncd may touch it.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from datetime import datetime
from pathlib import Path

from bench.common import (
    BenchError,
    Context,
    Daemon,
    KiB,
    Outcome,
    Row,
    ServerProcess,
    list_remote,
    na,
    server,
    verdict,
    verify_remote,
    write_config,
)

PACE = 0.05
"""Seconds between two drops: one by one, as a scanner or a user saving files would."""
POLL = 0.2


def _percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def _wait_all(srv: ServerProcess, count: int, timeout: float) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while True:
        items = list_remote(srv)
        if len(items) >= count:
            return items
        if time.monotonic() > deadline:
            raise BenchError(f"only {len(items)} of {count} files arrived within {timeout:.0f}s")
        time.sleep(POLL)


def _drop(root: Path, count: int) -> tuple[dict[str, float], dict[str, str]]:
    dropped: dict[str, float] = {}
    expected: dict[str, str] = {}
    for i in range(count):
        name = f"drop{i:04d}.bin"
        data = os.urandom(KiB)
        fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        dropped[name] = time.time()
        expected[name] = hashlib.md5(data, usedforsecurity=False).hexdigest()
        time.sleep(PACE)
    return dropped, expected


def event_latency(ctx: Context) -> Outcome:
    out = Outcome()
    count = 20 if ctx.options.quick else 200
    settle = ctx.options.settle_seconds
    label = f"event → uploaded, {count} files one by one"
    goal = "p50 ≤ settle + 100 ms, p99 ≤ settle + 300 ms"
    base = ctx.fresh_dir("events")
    root = base / "root"
    root.mkdir()
    try:
        with server(ctx, "events") as srv:
            config = write_config(
                base / "config.toml",
                base_url=srv.base_url,
                state_dir=base / "state",
                root=root,
                settle_seconds=settle,
                concurrency=ctx.options.concurrency,
            )
            daemon = Daemon(config, api_key=srv.api_key, logs=base / "daemon")
            try:
                daemon.wait_ready(60)
                dropped, expected = _drop(root, count)
                items = _wait_all(srv, count, timeout=settle + 60)
                verify_remote(srv, expected)
            finally:
                code = daemon.stop()
            if code != 0:
                out.notes.append(f"{label}: syncd run exited {code} on SIGTERM (expected 0): {daemon.tail()}")
    except BenchError as exc:
        out.rows.append(Row(label, na(exc), f"settle {settle:g} s", "n/a", goal, "n/a"))
        return out
    latencies = [
        datetime.fromisoformat(str(item["created_at"])).timestamp() - dropped[str(item["filename"])]
        for item in items
    ]
    p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
    ok = p50 <= settle + 0.1 and p99 <= settle + 0.3
    over = f"settle + {(p50 - settle) * 1000:.0f} ms / + {(p99 - settle) * 1000:.0f} ms"
    out.rows.append(
        Row(
            f"{label} (p50 / p99)",
            f"{p50 * 1000:.0f} ms / {p99 * 1000:.0f} ms",
            f"settle {settle:g} s",
            over,
            goal,
            verdict(ok),
        )
    )
    out.notes.append(
        f"{label}: max {max(latencies) * 1000:.0f} ms, min {min(latencies) * 1000:.0f} ms,"
        f" pace {PACE * 1000:.0f} ms"
    )
    return out
