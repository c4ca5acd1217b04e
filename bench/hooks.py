"""Upload rate with a slow hook: ``syncd run`` over a drop of small files, with and without a 1 s hook.

Both sides start ``syncd run`` on a fresh server and state dir, wait for READY, then drop the same tree
(distinct random 1 KiB files) into the watched folder at once. The rate is files over the time from the
drop to the server's ``created_at`` of the last upload (same machine, same clock). One side has an exec
hook (``sleep 1``) on every file; hooks run beside the uploads, never in their way, so the figure should
not move: that is what this row shows. How many hooks had finished by then is in the notes (they go on,
``HOOK_CONCURRENCY`` at a time, after the last upload).
"""

from __future__ import annotations

import json
import shutil
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
    write_random_files,
)
from syncd.hooks import HOOK_CONCURRENCY

HOOK_SECONDS = 1
POLL = 0.2


def _hook_table() -> str:
    sleep = shutil.which("sleep") or "/bin/sleep"
    return f'[[watch.hooks]]\non = "synced"\nexec = {json.dumps([sleep, str(HOOK_SECONDS)])}\n'


def _side(
    ctx: Context, srv: ServerProcess, tree: Path, expected: dict[str, str], *, hooked: bool
) -> tuple[float, int]:
    """Seconds from the drop to the last upload, and how many hooks had run by the time it was seen."""
    name = "hooked" if hooked else "plain"
    base = ctx.fresh_dir(f"hooks-{name}")
    root = base / "root"
    root.mkdir()
    config = write_config(
        base / "config.toml",
        base_url=srv.base_url,
        state_dir=base / "state",
        root=root,
        settle_seconds=0.2,
        concurrency=ctx.options.concurrency,
        log_level="info",
        extra=_hook_table() if hooked else "",
    )
    daemon = Daemon(config, api_key=srv.api_key, logs=base / "daemon")
    try:
        daemon.wait_ready(60)
        dropped = time.time()
        for path in sorted(tree.rglob("*.bin")):  # renamed in: each appears complete, as a scan would
            target = root / path.relative_to(tree)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
        deadline = time.monotonic() + 120 + len(expected) * 0.05
        while srv.stats().get("uploads", 0) < len(expected):
            if time.monotonic() > deadline:
                raise BenchError(f"only {srv.stats().get('uploads', 0)} of {len(expected)} uploads arrived")
            time.sleep(POLL)
        hooks_done = (base / "daemon" / "stdout").read_text(errors="replace").count('"hook ran"')
        items = list_remote(srv)
        verify_remote(srv, expected)
    finally:
        daemon.stop()
    last = max(datetime.fromisoformat(str(item["created_at"])).timestamp() for item in items)
    return last - dropped, hooks_done


def hooks_rate(ctx: Context) -> Outcome:
    out = Outcome()
    count = 100 if ctx.options.quick else 1_000
    label = f"upload rate, {count:,} x 1 KiB dropped, with a {HOOK_SECONDS} s hook on each"
    goal = "≈ the rate without hooks (≥ 0.8x)"
    results: dict[bool, tuple[float, int] | BenchError] = {}
    for with_hook in (False, True):
        tree = ctx.fresh_dir("hooks-tree")
        expected = write_random_files(tree, count, size=KiB)
        try:
            with server(ctx, f"hooks-{with_hook}") as srv:
                results[with_hook] = _side(ctx, srv, tree, expected, hooked=with_hook)
        except BenchError as exc:
            results[with_hook] = exc
    hooked, plain = results[True], results[False]

    def text(result: tuple[float, int] | BenchError) -> str:
        if isinstance(result, BenchError):
            return na(result)
        return f"{result[0]:.2f} s ({count / result[0]:,.0f} files/s)"

    ratio, met = "n/a", "n/a"
    if not isinstance(hooked, BenchError) and not isinstance(plain, BenchError):
        speed = plain[0] / hooked[0]
        ratio, met = f"{speed:.2f}x its rate", verdict(speed >= 0.8)
        out.notes.append(
            f"{label}: {hooked[1]:,} of {count:,} hooks had run when the last upload was seen"
            f" ({HOOK_CONCURRENCY} at once: {HOOK_CONCURRENCY * hooked[0] / HOOK_SECONDS:,.0f} fit in it)"
        )
    out.rows.append(Row(label, text(hooked), f"no hooks: {text(plain)}", ratio, goal, met))
    return out
