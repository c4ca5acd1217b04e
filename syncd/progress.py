"""A rich progress display for `sync --once` on a TTY: files, bytes and rate, refreshed from counters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from syncd.counters import Counters


@asynccontextmanager
async def show_progress(counters: Counters, *, interval: float = 0.2) -> AsyncIterator[None]:
    """Render the counters while the body runs; the display is on stderr so stdout stays clean."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} files"),
        TextColumn("{task.fields[detail]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("syncing", total=None, detail="", rate="")
        started = time.monotonic()

        def refresh() -> None:
            c = counters
            done = c.unchanged + c.uploaded + c.reused + c.failed + c.retry
            elapsed = max(time.monotonic() - started, 1e-3)
            progress.update(
                task,
                total=max(c.scanned, done) or None,
                completed=done,
                detail=f"{c.uploaded} up · {c.reused} cached · {c.failed} failed",
                rate=f"{done / elapsed:,.0f} files/s · {c.bytes_uploaded / elapsed / 2**20:,.1f} MiB/s",
            )

        async def ticker() -> None:
            while True:
                refresh()
                await asyncio.sleep(interval)

        tick = asyncio.create_task(ticker())
        try:
            yield
        finally:
            tick.cancel()
            refresh()
