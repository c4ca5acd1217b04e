"""Hashing throughput from the page cache: syncd's hasher (xxh3_128 + md5 in one pass) with one and two
worker threads, vs ``md5sum`` (md5 only) as one process and as two processes in parallel.

The files live in the work dir (tmpfs by default, i.e. the page cache itself), freshly written, so the
disk never enters the figure. syncd's digests must equal md5sum's before a figure is printed.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import (
    PYTHON,
    BenchError,
    Context,
    MiB,
    Outcome,
    Row,
    clean_env,
    na,
    remove_tree,
    run_timed,
    verdict,
    write_big_file,
)

FILES = 8


def _md5sum(ctx: Context, paths: list[Path], *, parallel: int) -> tuple[float, dict[str, str]]:
    logs = ctx.fresh_dir(f"md5sum-p{parallel}")
    listing = logs / "files.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    per = -(-len(paths) // parallel)
    argv = ["xargs", "-a", str(listing), "-P", str(parallel), "-n", str(per), "md5sum"]
    done = run_timed(argv, logs=logs, env=clean_env(), timeout=600)
    if done.returncode != 0:
        raise BenchError(f"md5sum exited {done.returncode}: {done.tail()}")
    sums = {}
    for line in done.stdout.read_text().splitlines():
        digest, _, name = line.partition("  ")
        sums[name] = digest
    return done.seconds, sums


def _syncd(ctx: Context, paths: list[Path], *, workers: int, expected: dict[str, str]) -> float:
    logs = ctx.fresh_dir(f"hash-w{workers}")
    argv = [PYTHON, "-m", "bench.peers", "hash", "--workers", str(workers), *map(str, paths)]
    done = run_timed(argv, logs=logs, env=clean_env(), timeout=600)
    if done.returncode != 0:
        raise BenchError(f"hasher exited {done.returncode}: {done.tail()}")
    report = json.loads(done.stdout.read_text())
    if report["md5"] != expected:
        raise BenchError("syncd's md5 differs from md5sum's")
    seconds: float = report["seconds"]
    return seconds


def hashing(ctx: Context) -> Outcome:
    out = Outcome()
    each = 8 * MiB if ctx.options.quick else 512 * MiB
    total = each * FILES
    folder = ctx.fresh_dir("hashing")
    paths = [folder / f"part{i}.bin" for i in range(FILES)]
    for i, path in enumerate(paths):
        write_big_file(path, each, seed=i)
    size = f"{total / 2**30:g} GiB" if total >= 2**30 else f"{total // MiB} MiB"

    def rate(seconds: float) -> str:
        return f"{seconds:.2f} s ({total / MiB / seconds:,.0f} MiB/s)"

    try:
        single, sums = _md5sum(ctx, paths, parallel=1)
    except BenchError as exc:
        out.rows.append(Row(f"hashing {size} in {FILES} files", "", na(exc), "n/a", "", "n/a"))
        remove_tree(folder)
        return out
    expected = {str(p): sums[str(p)] for p in paths}
    for workers, goal in ((1, 0.9), (2, 1.7)):
        label = f"hashing {size} in {FILES} files, {workers} thread{'s' if workers > 1 else ''}"
        try:
            seconds = _syncd(ctx, paths, workers=workers, expected=expected)
        except BenchError as exc:
            out.rows.append(Row(label, na(exc), rate(single), "n/a", f"≥ {goal:g}x md5sum", "n/a"))
            continue
        factor = single / seconds
        out.rows.append(
            Row(
                label,
                rate(seconds),
                f"md5sum: {rate(single)}",
                f"{factor:.2f}x its speed",
                f"≥ {goal:g}x md5sum (one process)",
                verdict(factor >= goal),
            )
        )
    try:
        both, _ = _md5sum(ctx, paths, parallel=2)
        out.notes.append(
            f"hashing: md5sum as 2 parallel processes took {rate(both)}; syncd computes md5 and xxh3"
        )
    except BenchError as exc:
        out.notes.append(f"hashing: md5sum as 2 processes: {na(exc)}")
    remove_tree(folder)
    return out
