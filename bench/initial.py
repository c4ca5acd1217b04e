"""Initial sync of many small files: ``syncd sync --once`` vs a loop of the official SDK's ``files.upload``.

Both sides start from the same tree (distinct random 1 KiB files, 1,000 per directory) and a fresh
server with the same flags; each is timed from process spawn to exit, then the server's listing must hold
exactly the tree (names and md5s) before a figure is printed. On loopback the cost per file (CPU on both
ends) dominates; with ``--latency-ms`` the round trips do, and only requests kept in flight hide them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    PYTHON,
    BenchError,
    Context,
    KiB,
    Outcome,
    Row,
    ServerProcess,
    clean_env,
    describe_calls,
    http_calls,
    mib,
    na,
    remove_tree,
    run_timed,
    server,
    syncd_once,
    times,
    verdict,
    verify_remote,
    write_random_files,
)


@dataclass(frozen=True)
class Side:
    seconds: float
    calls: str
    max_rss_kib: int
    cpu_seconds: float
    server_cpu_seconds: float

    def describe(self) -> str:
        return (
            f"made {self.calls}; peak RSS {mib(self.max_rss_kib)}; CPU {self.cpu_seconds:.1f} s"
            f" (server {self.server_cpu_seconds:.1f} s)"
        )


def _measure_syncd(
    ctx: Context, srv: ServerProcess, root: Path, expected: dict[str, str], timeout: float
) -> Side:
    before, cpu = srv.stats(), srv.cpu_seconds()
    done, _ = syncd_once(ctx, srv, root, name="initial", timeout=timeout)
    calls, server_cpu = http_calls(before, srv.stats()), srv.cpu_seconds() - cpu
    verify_remote(srv, expected)
    return Side(done.seconds, describe_calls(calls), done.max_rss_kib, done.cpu_seconds, server_cpu)


def _measure_sdk(
    ctx: Context, srv: ServerProcess, root: Path, expected: dict[str, str], timeout: float
) -> Side:
    base = ctx.fresh_dir("sdk-initial")
    listing = base / "files.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(root.rglob("*.bin"))))
    before, cpu = srv.stats(), srv.cpu_seconds()
    argv = [PYTHON, "-m", "bench.peers", "sdk-upload", "--base-url", srv.base_url, "--list", str(listing)]
    done = run_timed(argv, logs=base, env=clean_env(VLMRUN_API_KEY=srv.api_key), timeout=timeout)
    if done.returncode != 0:
        raise BenchError(f"SDK loop exited {done.returncode}: {done.tail()}")
    calls, server_cpu = http_calls(before, srv.stats()), srv.cpu_seconds() - cpu
    verify_remote(srv, expected)
    return Side(done.seconds, describe_calls(calls), done.max_rss_kib, done.cpu_seconds, server_cpu)


def run_initial(
    ctx: Context, *, name: str, count: int, latency_ms: int, goal_ratio: float, goal_rate: float
) -> Outcome:
    out = Outcome()
    tree = ctx.fresh_dir(f"tree-{name}")
    expected = write_random_files(tree, count, size=KiB)
    per_file = 0.02 + 3 * latency_ms / 1000
    label = f"initial sync {count:,} x 1 KiB" + (
        f", latency {latency_ms} ms" if latency_ms else " (loopback)"
    )
    syncd: Side | BenchError
    peer: Side | BenchError
    try:
        with server(ctx, f"{name}-syncd", latency_ms=latency_ms) as srv:
            syncd = _measure_syncd(ctx, srv, tree, expected, timeout=60 + count * per_file)
    except BenchError as exc:
        syncd = exc
    try:
        with server(ctx, f"{name}-sdk", latency_ms=latency_ms) as srv:
            peer = _measure_sdk(ctx, srv, tree, expected, timeout=60 + count * per_file * 2)
    except BenchError as exc:
        peer = exc
    remove_tree(tree)

    goal = f"≥ {goal_ratio:g}x faster" + (f", ≥ {goal_rate:,.0f} files/s" if goal_rate else "")
    syncd_text = na(syncd) if isinstance(syncd, BenchError) else _figure(syncd.seconds, count)
    peer_text = na(peer) if isinstance(peer, BenchError) else _figure(peer.seconds, count)
    ratio, met = "n/a", "n/a"
    if isinstance(syncd, Side) and isinstance(peer, Side):
        speedup = peer.seconds / syncd.seconds
        ratio = times(speedup)
        met = verdict(speedup >= goal_ratio and count / syncd.seconds >= goal_rate)
    out.rows.append(Row(label, syncd_text, peer_text, ratio, goal, met))
    if isinstance(syncd, Side):
        out.notes.append(f"{label}: syncd {syncd.describe()}")
    if isinstance(peer, Side):
        out.notes.append(f"{label}: SDK loop {peer.describe()}")
    return out


def _figure(seconds: float, count: int) -> str:
    return f"{seconds:.2f} s ({count / seconds:,.0f} files/s)"


def initial_loopback(ctx: Context) -> Outcome:
    count = 300 if ctx.options.quick else 10_000
    return run_initial(ctx, name="loopback", count=count, latency_ms=0, goal_ratio=5, goal_rate=1000)


def initial_latency(ctx: Context) -> Outcome:
    count = 100 if ctx.options.quick else 1_000
    return run_initial(
        ctx, name="latency", count=count, latency_ms=ctx.options.latency_ms, goal_ratio=20, goal_rate=0
    )
