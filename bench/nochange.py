"""No-change pass: ``syncd sync --once`` over a tree its manifest already holds as synced, vs a plain
``os.scandir`` + ``lstat`` walk of the same tree in a fresh ``python -c`` (process start included on both
sides, warm dentry cache on both sides: an untimed walk runs first).

The figure counts only if the pass exited 0, made 0 HTTP calls (server counters), hashed 0 files (syncd's
``sync pass done`` summary, and no manifest row rewritten) and left every row synced.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.common import (
    PYTHON,
    BenchError,
    Context,
    Outcome,
    Row,
    clean_env,
    describe_calls,
    http_calls,
    mib,
    na,
    run_syncd_once,
    run_timed,
    secs,
    server,
    sync_summary,
    verdict,
    write_config,
)
from bench.peers import WALK_SOURCE
from bench.synced_tree import SyncedTree, check_manifest, synced_tree


@dataclass(frozen=True)
class Pass:
    seconds: float
    max_rss_kib: int
    calls: dict[str, int]
    hashed: int | None


def _walk(ctx: Context, tree: SyncedTree, *, timeout: float) -> float:
    logs = ctx.fresh_dir("walk")
    done = run_timed([PYTHON, "-c", WALK_SOURCE, str(tree.root)], logs=logs, env=clean_env(), timeout=timeout)
    counted = done.stdout.read_text().strip()
    if done.returncode != 0 or counted != str(tree.count):
        raise BenchError(f"walk exited {done.returncode} and counted {counted or '?'} files: {done.tail()}")
    return done.seconds


def _syncd_passes(ctx: Context, tree: SyncedTree, repeats: int, timeout: float) -> Pass:
    base = ctx.fresh_dir(f"nochange-{tree.count}")
    state = tree.fresh_state(base / "state")
    best: Pass | None = None
    with server(ctx, f"nochange-{tree.count}") as srv:
        config = write_config(
            base / "config.toml",
            base_url=srv.base_url,
            state_dir=state,
            root=tree.root,
            concurrency=ctx.options.concurrency,
            log_level="info",
        )
        for attempt in range(repeats):
            before = srv.stats()
            done = run_syncd_once(config, srv, logs=base / f"run-{attempt}", timeout=timeout)
            calls = http_calls(before, srv.stats())
            summary = sync_summary(done)
            hashed = None if summary is None else int(summary.get("hashed", -1))
            check = check_manifest(state, tree)
            if not check.unchanged(tree.count):
                raise BenchError(f"the pass changed the manifest: {check.describe()}")
            if best is None or done.seconds < best.seconds:
                best = Pass(done.seconds, done.max_rss_kib, calls, hashed)
    assert best is not None
    return best


def run_nochange(ctx: Context, name: str, count: int, *, goal: float, repeats: int) -> Outcome:
    out = Outcome()
    label = f"no-change pass, {count:,} files"
    tree = synced_tree(ctx, name, count)
    if tree.build_seconds:
        out.notes.append(f"{label}: tree + manifest built directly in {tree.build_seconds:.1f} s")
    timeout = 60 + count / 5_000
    syncd: Pass | BenchError
    try:
        _walk(ctx, tree, timeout=timeout)  # warm the dentry and inode caches for both sides
        syncd = _syncd_passes(ctx, tree, repeats, timeout)
    except BenchError as exc:
        syncd = exc
    walk: float | BenchError
    try:
        walk = min(_walk(ctx, tree, timeout=timeout) for _ in range(repeats))
    except BenchError as exc:
        walk = exc
    goal_text = f"≤ {goal:g}x the walk's time; 0 hashed, 0 HTTP calls"
    best = f" (best of {repeats})" if repeats > 1 else ""
    syncd_text = na(syncd) if isinstance(syncd, BenchError) else secs(syncd.seconds) + best
    walk_text = na(walk) if isinstance(walk, BenchError) else secs(walk) + best
    ratio, met = "n/a", "n/a"
    if isinstance(syncd, Pass):
        hashed = "hashed count not reported" if syncd.hashed is None else f"{syncd.hashed} hashed"
        syncd_text += f"; {hashed}, {describe_calls(syncd.calls)}"
        out.notes.append(f"{label}: syncd peak RSS {mib(syncd.max_rss_kib)}")
        if isinstance(walk, float):
            factor = syncd.seconds / walk
            ratio = f"{factor:.2f}x its time"
            met = verdict(factor <= goal and not syncd.calls and syncd.hashed in (0, None))
    out.rows.append(Row(label, syncd_text, walk_text, ratio, goal_text, met))
    return out


def nochange_100k(ctx: Context) -> Outcome:
    return run_nochange(ctx, "100k", 1_000 if ctx.options.quick else 100_000, goal=3, repeats=3)


def nochange_1m(ctx: Context) -> Outcome:
    return run_nochange(ctx, "1m", 5_000 if ctx.options.quick else 1_000_000, goal=2, repeats=2)
