"""``python -m bench``: run the benchmarks and print one table (benchmark, syncd, peer, ratio, goal, met)."""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from bench import (
    bwlimit,
    events,
    hashing,
    hooks,
    initial,
    large_file,
    manifest_1m,
    nochange,
    startup,
    transport,
)
from bench.common import Context, GiB, Options, Outcome, Row, remove_tree

Benchmark = Callable[[Context], Outcome]

BENCHMARKS: dict[str, tuple[Benchmark, str]] = {
    "initial": (initial.initial_loopback, "initial sync of 10,000 x 1 KiB on loopback vs the SDK loop"),
    "initial_latency": (initial.initial_latency, "initial sync of 1,000 x 1 KiB, server --latency-ms 50"),
    "nochange_100k": (nochange.nochange_100k, "no-change pass over 100,000 files vs a scandir walk"),
    "nochange_1m": (nochange.nochange_1m, "no-change pass over 1,000,000 files vs a scandir walk"),
    "manifest_1m": (manifest_1m.manifest_1m, "daemon on a 1,000,000-row manifest: startup to READY, RSS"),
    "hashing": (hashing.hashing, "hashing 4 GiB in 8 files (page cache) vs md5sum"),
    "large_file": (large_file.large_file, "one 2 GiB file (presigned) vs the SDK and md5sum + curl -T"),
    "event_latency": (events.event_latency, "event → uploaded latency of 200 files dropped one by one"),
    "transport": (transport.transport, "1,500 x 1 KiB uploads, 8 in flight: aiohttp vs httpx transport"),
    "transport_put": (transport.transport_put, "one 1 GiB presigned PUT per transport vs curl -T"),
    "startup": (startup.startup, "start-up of sync --once on an empty folder and --help vs import httpx"),
    "bwlimit": (
        bwlimit.bwlimit,
        "sync --once of 40 MiB under max_upload_rate = 5MiB: achieved rate vs the cap",
    ),
    "hooks": (hooks.hooks_rate, "upload rate of 1,000 dropped files with a 1 s hook on each vs none"),
}

SHARED_BY: dict[str, frozenset[str]] = {
    "synced-tree-100k": frozenset({"nochange_100k"}),
    "synced-tree-1m": frozenset({"nochange_1m", "manifest_1m"}),
}
"""Which benchmarks use each shared fixture: it is freed as soon as none of them is left to run."""

COLUMNS = ("benchmark", "syncd", "peer", "ratio", "goal", "met")


def default_workdir() -> Path:
    """tmpfs when it has room: ext4 on this class of VM creates ~5k files/s, tmpfs ~150k (1M-file trees)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free >= 10 * GiB:
        return shm
    return Path(tempfile.gettempdir())


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        ram = f"{mem_kib / 1024**2:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        ram = "RAM unknown"
    return (
        f"{os.cpu_count()} CPUs ({model}), {ram}, Python {platform.python_version()}, "
        f"Linux {platform.release()}, load average {os.getloadavg()[0]:.2f} at the end"
    )


def render(rows: list[Row]) -> str:
    """A Markdown table (so the output can be pasted into bench/README.md as is)."""
    cells = [COLUMNS, *((r.benchmark, r.syncd, r.peer, r.ratio, r.goal, r.met) for r in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help=f"run only these benchmarks: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test, not a measurement)")
    parser.add_argument(
        "--workdir", type=Path, help="where trees and servers live (default: /dev/shm or /tmp)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (and reuse the 1M-file tree)")
    parser.add_argument("--latency-ms", type=int, default=50, help="server latency for initial_latency")
    parser.add_argument("--concurrency", type=int, help="override syncd's [remote] concurrency")
    parser.add_argument("--settle-seconds", type=float, default=1.0, help="settle_seconds for event_latency")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser.parse_args(argv)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, (_, what) in BENCHMARKS.items():
            print(f"{name:16} {what}")
        return 0
    names = [n.strip() for chunk in args.only for n in chunk.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(
            f"bench: unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2
    base = args.workdir if args.workdir is not None else default_workdir()
    base.mkdir(parents=True, exist_ok=True)
    workdir = (
        Path(tempfile.mkdtemp(prefix="syncd-bench-", dir=base)) if not args.keep else base / "syncd-bench"
    )
    workdir.mkdir(parents=True, exist_ok=True)
    options = Options(
        quick=args.quick,
        workdir=workdir,
        latency_ms=args.latency_ms,
        concurrency=args.concurrency,
        settle_seconds=args.settle_seconds,
        keep=args.keep,
    )
    signal.signal(signal.SIGTERM, _terminate)
    # Every child starts from syncd's bytecode, as an installed package does: a checkout run under
    # PYTHONDONTWRITEBYTECODE (some machines set it) would compile its sources in every process, ~110 ms.
    compileall.compile_dir(Path(__file__).resolve().parent.parent / "syncd", quiet=1)
    ctx = Context(options)
    rows: list[Row] = []
    notes: list[str] = []
    started = time.monotonic()
    try:
        for position, name in enumerate(names):
            func, what = BENCHMARKS[name]
            print(
                f"bench: {name}: {what}{' (quick sizes)' if args.quick else ''} …",
                file=sys.stderr,
                flush=True,
            )
            t0 = time.monotonic()
            try:
                outcome = func(ctx)
            except Exception as exc:
                traceback.print_exc()
                outcome = Outcome([Row(name, f"n/a (crash: {type(exc).__name__}: {exc})", "", "", "", "n/a")])
            left = set(names[position + 1 :])
            for key, users in SHARED_BY.items():
                if not users & left:
                    ctx.release(key)
            rows.extend(outcome.rows)
            notes.extend(outcome.notes)
            print(f"bench: {name} took {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            remove_tree(workdir)
    print(render(rows))
    print()
    concurrency = "syncd's default" if args.concurrency is None else str(args.concurrency)
    print(
        "Server: the reference Files API (uvicorn + httptools), one fresh process and data dir per side "
        f"of each benchmark, on 127.0.0.1; latency 0 ms except initial_latency ({args.latency_ms} ms). "
        f"syncd: [remote] concurrency = {concurrency}; work dir on {_fs_type(base)} ({base})."
    )
    print(f"Machine: {machine()}; whole run {time.monotonic() - started:.0f} s.")
    for note in notes:
        print(f"- {note}")
    return 0


def _fs_type(path: Path) -> str:
    """The file system type holding ``path`` (longest matching mount point in /proc/mounts)."""
    best, kind = "", "unknown fs"
    try:
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mount = parts[1]
            if (resolved == mount or resolved.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(
                best
            ):
                best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


if __name__ == "__main__":
    sys.exit(main())
