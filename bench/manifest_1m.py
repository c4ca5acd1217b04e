"""The daemon on a 1,000,000-row manifest: time from spawn to ``READY=1`` and its memory.

``syncd run`` starts on the shared synced tree (every row matches the file on disk, see
``bench.synced_tree``) with ``NOTIFY_SOCKET`` pointing at a datagram socket we bind, as systemd's
``Type=notify`` would. After READY the startup scan still runs; the daemon is sampled (CPU time and
``VmRSS`` from /proc) until it has been idle for ``IDLE_WINDOW``, then ``VmHWM`` (the kernel's peak RSS
of the process) is read and it is stopped with SIGTERM. The figure counts only if the run made no HTTP
call (server counters) and left every manifest row synced and unrewritten.
"""

from __future__ import annotations

import time

from bench.common import (
    BenchError,
    Context,
    Daemon,
    Outcome,
    Row,
    cpu_seconds,
    describe_calls,
    http_calls,
    mib,
    na,
    proc_status,
    server,
    verdict,
    write_config,
)
from bench.synced_tree import check_manifest, synced_tree

IDLE_WINDOW = 1.0
"""Seconds with (almost) no CPU used: the startup scan is over."""
IDLE_CPU = 0.05
SAMPLE = 0.1


def _until_idle(pid: int, timeout: float) -> tuple[float, int]:
    """Seconds until the process stayed idle for IDLE_WINDOW, and the largest VmRSS seen (KiB)."""
    start = time.perf_counter()
    window: list[tuple[float, float]] = []
    peak = 0
    while True:
        now = time.perf_counter()
        peak = max(peak, proc_status(pid).get("VmRSS", 0))
        window.append((now, cpu_seconds(pid)))
        while window and now - window[0][0] > IDLE_WINDOW:
            window.pop(0)
        spanned = window[-1][0] - window[0][0]
        if spanned >= IDLE_WINDOW * 0.9 and window[-1][1] - window[0][1] < IDLE_CPU:
            return now - start - spanned, peak
        if now - start > timeout:
            raise BenchError(f"still busy {timeout:.0f}s after READY")
        time.sleep(SAMPLE)


def manifest_1m(ctx: Context) -> Outcome:
    out = Outcome()
    count = 5_000 if ctx.options.quick else 1_000_000
    label = f"daemon on a {count:,}-row manifest"
    tree = synced_tree(ctx, "1m", count)
    base = ctx.fresh_dir("manifest")
    state = tree.fresh_state(base / "state")
    ready_goal, rss_goal = "≤ 10 s", "≤ 250 MiB"
    try:
        with server(ctx, "manifest") as srv:
            config = write_config(
                base / "config.toml",
                base_url=srv.base_url,
                state_dir=state,
                root=tree.root,
                settle_seconds=2.0,
                concurrency=ctx.options.concurrency,
            )
            before = srv.stats()
            daemon = Daemon(config, api_key=srv.api_key, logs=base / "daemon")
            try:
                ready = daemon.wait_ready(120)
                busy, sampled_peak = _until_idle(daemon.pid, timeout=180)
                status = proc_status(daemon.pid)
            finally:
                code = daemon.stop()
            calls = http_calls(before, srv.stats())
        check = check_manifest(state, tree)
    except BenchError as exc:
        out.rows.append(Row(f"{label}: startup to READY", na(exc), "—", "", ready_goal, "n/a"))
        return out
    peak = max(status.get("VmHWM", 0), sampled_peak)
    trusted = not calls and check.unchanged(count)
    out.rows.append(
        Row(
            f"{label}: startup to READY",
            f"{ready:.2f} s",
            "—",
            "",
            ready_goal,
            verdict(ready <= 10 and trusted),
        )
    )
    out.rows.append(
        Row(
            f"{label}: peak RSS",
            f"{mib(peak)} (after the startup scan: {mib(status.get('VmRSS', 0))})",
            "—",
            "",
            rss_goal,
            verdict(peak <= 250 * 1024 and trusted),
        )
    )
    out.notes.append(
        f"{label}: READY after {ready:.2f} s, idle {busy:.1f} s after READY (startup scan done); "
        f"{describe_calls(calls)}; manifest after: {check.describe()}; exit code on SIGTERM {code}"
    )
    return out
