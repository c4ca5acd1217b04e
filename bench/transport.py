"""The client's transports compared (``python -m bench.transport``, or ``python -m bench --only transport``).

``transport``: 1,500 direct uploads of 1 KiB, 8 in flight, through ``FilesClient`` with httpx's transport
and with aiohttp's, each round against a fresh reference server process. Client CPU is
``time.process_time`` of this process, which runs nothing but the client while it is timed; the server's
is read from /proc. Three rounds per transport, alternating; the median round is printed.

``transport_put``: one 1 GiB file through the presigned path (``FilesClient.upload``: presign, PUT, verify)
on each transport, and ``curl -T`` of the same file to a presigned URL of the same kind of server: the
floor for the PUT itself.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import (
    BenchError,
    Context,
    MiB,
    Outcome,
    Row,
    ServerProcess,
    clean_env,
    md5_of,
    na,
    remove_tree,
    run_timed,
    server,
    verdict,
    verify_remote,
    write_big_file,
    write_random_files,
)
from syncd.api import TRANSPORTS, FilesClient, TransportKind

UPLOADS = 1500
WARMUP = 50
"""Uploads before the clock starts: connections opened, code paths warm, on both sides."""
IN_FLIGHT = 8
ROUNDS = 3
PUT_SIZE = 1024 * MiB


@dataclass(frozen=True)
class Round:
    kind: TransportKind
    uploads: int
    seconds: float
    client_cpu: float
    server_cpu: float

    @property
    def per_second(self) -> float:
        return self.uploads / self.seconds

    def cpu_ms(self, seconds: float) -> str:
        return f"{seconds / self.uploads * 1000:.2f} ms"

    def describe(self) -> str:
        return (
            f"{self.per_second:,.0f} uploads/s; client CPU {self.cpu_ms(self.client_cpu)}/upload, "
            f"server {self.cpu_ms(self.server_cpu)}/upload"
        )


async def _upload_all(client: FilesClient, files: list[tuple[Path, tuple[int, int]]]) -> None:
    """``IN_FLIGHT`` workers draining one list; ``expected`` given as the daemon gives it (no stat hop)."""
    pending = iter(files)

    async def worker() -> None:
        for path, expected in pending:
            await client.upload(path, purpose="assistants", expected=expected)

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))


def _round(
    ctx: Context, kind: TransportKind, warmup: list[Path], timed: list[Path], md5s: dict[str, str]
) -> Round:
    def stamped(paths: list[Path]) -> list[tuple[Path, tuple[int, int]]]:
        return [(p, (st.st_size, st.st_mtime_ns)) for p in paths for st in (p.stat(),)]

    with server(ctx, f"transport-{kind}") as srv:

        async def go() -> Round:
            async with FilesClient(
                base_url=srv.base_url, api_key=srv.api_key, concurrency=IN_FLIGHT, transport=kind
            ) as client:
                await _upload_all(client, stamped(warmup))
                files = stamped(timed)
                cpu, server_cpu, start = time.process_time(), srv.cpu_seconds(), time.perf_counter()
                await _upload_all(client, files)
                seconds = time.perf_counter() - start
                return Round(
                    kind, len(files), seconds, time.process_time() - cpu, srv.cpu_seconds() - server_cpu
                )

        result = asyncio.run(go())
        verify_remote(srv, md5s)
    return result


def transport(ctx: Context) -> Outcome:
    out = Outcome()
    count, rounds = (150, 1) if ctx.options.quick else (UPLOADS, ROUNDS)
    label = f"{count:,} x 1 KiB uploads, {IN_FLIGHT} in flight: aiohttp vs httpx transport"
    folder = ctx.fresh_dir("transport")
    md5s = write_random_files(folder, WARMUP + count, size=1024)
    paths = sorted(p for p in folder.rglob("*.bin"))
    warmup, timed = paths[:WARMUP], paths[WARMUP:]
    results: dict[TransportKind, list[Round]] = {kind: [] for kind in TRANSPORTS}
    try:
        for n in range(rounds):
            order = TRANSPORTS if n % 2 == 0 else TRANSPORTS[::-1]
            for kind in order:
                results[kind].append(_round(ctx, kind, warmup, timed, md5s))
    except BenchError as exc:
        out.rows.append(Row(label, na(exc), "", "n/a", "", "n/a"))
        return out
    finally:
        remove_tree(folder)
    median = {kind: sorted(rs, key=lambda r: r.client_cpu)[len(rs) // 2] for kind, rs in results.items()}
    fast, slow = median["aiohttp"], median["httpx"]
    ratio = slow.client_cpu / fast.client_cpu
    out.rows.append(
        Row(
            label,
            f"aiohttp: {fast.describe()}",
            f"httpx: {slow.describe()}",
            f"{ratio:.2f}x less client CPU",
            "≥ 2x less client CPU than httpx",
            verdict(ratio >= 2),
        )
    )
    for kind, rs in results.items():
        spread = ", ".join(f"{r.per_second:,.0f}/s {r.cpu_ms(r.client_cpu)}" for r in rs)
        out.notes.append(
            f"transport {kind}: rounds {spread} (client CPU per upload); median of "
            f"{statistics.median(r.seconds for r in rs):.2f} s wall per round"
        )
    return out


# --- one big presigned PUT ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Put:
    seconds: float
    client_cpu: float
    server_cpu: float

    def describe(self, size: int) -> str:
        return (
            f"{self.seconds:.2f} s ({size / MiB / self.seconds:,.0f} MiB/s); "
            f"CPU client {self.client_cpu:.1f} s, server {self.server_cpu:.1f} s"
        )


def _put_syncd(ctx: Context, kind: TransportKind, path: Path, md5: str) -> Put:
    st = path.stat()
    with server(ctx, f"put-{kind}") as srv:

        async def go() -> Put:
            async with FilesClient(base_url=srv.base_url, api_key=srv.api_key, transport=kind) as client:
                cpu, server_cpu, start = time.process_time(), srv.cpu_seconds(), time.perf_counter()
                await client.upload(path, purpose="assistants", expected=(st.st_size, st.st_mtime_ns))
                seconds = time.perf_counter() - start
                return Put(seconds, time.process_time() - cpu, srv.cpu_seconds() - server_cpu)

        result = asyncio.run(go())
        verify_remote(srv, {path.name: md5})
    return result


def _presigned_url(srv: ServerProcess, filename: str) -> tuple[str, str]:
    headers = {"Authorization": f"Bearer {srv.api_key}"}
    with httpx.Client(base_url=srv.base_url, headers=headers, timeout=30.0) as client:
        response = client.post("/files/presigned-url", json={"filename": filename, "purpose": "assistants"})
        response.raise_for_status()
        grant = response.json()
    return str(grant["url"]), str(grant["content_type"])


def _put_curl(ctx: Context, path: Path, md5: str) -> Put:
    logs = ctx.fresh_dir("put-curl")
    with server(ctx, "put-curl") as srv:
        url, content_type = _presigned_url(srv, path.name)
        argv = [
            "curl",
            "-sS",
            "-f",
            "-o",
            "/dev/null",
            "-H",
            "Expect:",
            "-H",
            f"Content-Type: {content_type}",
        ]
        server_cpu = srv.cpu_seconds()
        done = run_timed([*argv, "-T", str(path), url], logs=logs, env=clean_env(), timeout=900)
        if done.returncode != 0:
            raise BenchError(f"curl exited {done.returncode}: {done.tail()}")
        result = Put(done.seconds, done.cpu_seconds, srv.cpu_seconds() - server_cpu)
        verify_remote(srv, {path.name: md5})
    return result


def transport_put(ctx: Context) -> Outcome:
    out = Outcome()
    size = 64 * MiB if ctx.options.quick else PUT_SIZE
    folder = ctx.fresh_dir("put")
    path = folder / "big.bin"
    write_big_file(path, size, seed=7)
    md5 = md5_of(path)
    label = f"presigned PUT of {size // MiB:,} MiB"
    sides: dict[str, Put | BenchError] = {}
    try:
        try:
            sides["curl"] = _put_curl(ctx, path, md5)
        except BenchError as exc:
            sides["curl"] = exc
        for kind in TRANSPORTS:
            try:
                sides[kind] = _put_syncd(ctx, kind, path, md5)
            except BenchError as exc:
                sides[kind] = exc
    finally:
        remove_tree(folder)
    floor = sides["curl"]
    for kind in TRANSPORTS:
        side = sides[kind]
        text = na(side) if isinstance(side, BenchError) else side.describe(size)
        peer = na(floor) if isinstance(floor, BenchError) else f"curl -T: {floor.describe(size)}"
        ratio, met = "n/a", "n/a"
        if isinstance(side, Put) and isinstance(floor, Put):
            ratio = f"{side.seconds / floor.seconds:.2f}x its time"
            met = verdict(side.seconds / floor.seconds <= 1.2)
        out.rows.append(
            Row(f"{label} ({kind}, presign + PUT + verify)", text, peer, ratio, "≤ 1.2x curl", met)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.transport [bench options]``: both benchmarks of this module through the runner."""
    from bench.__main__ import main as run

    return run(["--only", "transport,transport_put", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
