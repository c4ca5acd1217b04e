"""One large file through the presigned path: ``syncd sync --once`` vs the official SDK's ``files.upload``
(which also switches to presigned above 32 MiB), and vs the floor any client has to pay: one md5 pass
(``md5sum``) plus one raw ``curl -T`` PUT to a presigned URL. Each side gets a fresh server; the stored
file's md5 must equal the local one. syncd's peak RSS comes from ``wait4`` (its own ``ru_maxrss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import (
    PYTHON,
    BenchError,
    Context,
    MiB,
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
    secs,
    server,
    syncd_once,
    verdict,
    verify_remote,
    write_big_file,
)


@dataclass(frozen=True)
class Upload:
    seconds: float
    max_rss_kib: int
    calls: str
    cpu_seconds: float
    server_cpu_seconds: float

    def describe(self) -> str:
        return f"made {self.calls}; CPU {self.cpu_seconds:.1f} s (server {self.server_cpu_seconds:.1f} s)"


def _md5sum(ctx: Context, path: Path) -> tuple[float, str]:
    logs = ctx.fresh_dir("large-md5sum")
    done = run_timed(["md5sum", str(path)], logs=logs, env=clean_env(), timeout=600)
    if done.returncode != 0:
        raise BenchError(f"md5sum exited {done.returncode}: {done.tail()}")
    return done.seconds, done.stdout.read_text().split()[0]


def _syncd(ctx: Context, root: Path, expected: dict[str, str]) -> Upload:
    with server(ctx, "large-syncd") as srv:
        before, cpu = srv.stats(), srv.cpu_seconds()
        done, _ = syncd_once(ctx, srv, root, name="large", timeout=900)
        calls, server_cpu = http_calls(before, srv.stats()), srv.cpu_seconds() - cpu
        verify_remote(srv, expected)
    return Upload(done.seconds, done.max_rss_kib, describe_calls(calls), done.cpu_seconds, server_cpu)


def _sdk(ctx: Context, path: Path, expected: dict[str, str]) -> Upload:
    logs = ctx.fresh_dir("large-sdk")
    listing = logs / "files.txt"
    listing.write_text(f"{path}\n")
    with server(ctx, "large-sdk") as srv:
        before, cpu = srv.stats(), srv.cpu_seconds()
        argv = [PYTHON, "-m", "bench.peers", "sdk-upload", "--base-url", srv.base_url, "--list", str(listing)]
        done = run_timed(argv, logs=logs, env=clean_env(VLMRUN_API_KEY=srv.api_key), timeout=900)
        if done.returncode != 0:
            raise BenchError(f"SDK upload exited {done.returncode}: {done.tail()}")
        calls, server_cpu = http_calls(before, srv.stats()), srv.cpu_seconds() - cpu
        verify_remote(srv, expected)
    return Upload(done.seconds, done.max_rss_kib, describe_calls(calls), done.cpu_seconds, server_cpu)


def _presign(srv: ServerProcess, filename: str) -> tuple[str, str]:
    headers = {"Authorization": f"Bearer {srv.api_key}"}
    with httpx.Client(base_url=srv.base_url, headers=headers, timeout=30.0) as client:
        response = client.post(
            "/files/presigned-url", json={"filename": filename, "purpose": "assistants", "expiration": 3600}
        )
        response.raise_for_status()
        answer = response.json()
    return str(answer["url"]), str(answer["content_type"])


def _curl(ctx: Context, path: Path, expected: dict[str, str]) -> float:
    logs = ctx.fresh_dir("large-curl")
    with server(ctx, "large-curl") as srv:
        url, content_type = _presign(srv, path.name)
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
        done = run_timed([*argv, "-T", str(path), url], logs=logs, env=clean_env(), timeout=900)
        if done.returncode != 0:
            raise BenchError(f"curl exited {done.returncode}: {done.tail()}")
        verify_remote(srv, expected)
    return done.seconds


def large_file(ctx: Context) -> Outcome:
    out = Outcome()
    size = 64 * MiB if ctx.options.quick else 2048 * MiB
    shown = f"{size // MiB} MiB" if size < 2**30 else f"{size / 2**30:g} GiB"
    folder = ctx.fresh_dir("large")
    root = folder / "root"
    root.mkdir()
    path = root / "big.bin"
    write_big_file(path, size, seed=42)

    def figure(seconds: float) -> str:
        return f"{seconds:.2f} s ({size / MiB / seconds:,.0f} MiB/s)"

    try:
        md5_seconds, md5 = _md5sum(ctx, path)
    except BenchError as exc:
        out.rows.append(Row(f"one {shown} file (presigned)", "", na(exc), "n/a", "", "n/a"))
        remove_tree(folder)
        return out
    expected = {path.name: md5}
    syncd: Upload | BenchError
    sdk: Upload | BenchError
    floor: float | BenchError
    try:
        syncd = _syncd(ctx, root, expected)
    except BenchError as exc:
        syncd = exc
    try:
        sdk = _sdk(ctx, path, expected)
    except BenchError as exc:
        sdk = exc
    try:
        floor = md5_seconds + _curl(ctx, path, expected)
    except BenchError as exc:
        floor = exc
    remove_tree(folder)

    label = f"one {shown} file (presigned)"
    syncd_text = na(syncd) if isinstance(syncd, BenchError) else figure(syncd.seconds)
    sdk_text = na(sdk) if isinstance(sdk, BenchError) else f"SDK: {figure(sdk.seconds)}"
    ratio, met = "n/a", "n/a"
    if isinstance(syncd, Upload) and isinstance(sdk, Upload):
        ratio = f"{sdk.seconds / syncd.seconds:.2f}x faster"
        met = verdict(sdk.seconds / syncd.seconds >= 1.5)
    out.rows.append(Row(label, syncd_text, sdk_text, ratio, "≥ 1.5x faster", met))

    rss_text = na(syncd) if isinstance(syncd, BenchError) else mib(syncd.max_rss_kib)
    sdk_rss = na(sdk) if isinstance(sdk, BenchError) else f"SDK: {mib(sdk.max_rss_kib)}"
    rss_met = "n/a" if isinstance(syncd, BenchError) else verdict(syncd.max_rss_kib <= 100 * 1024)
    out.rows.append(Row(f"{label}: peak RSS", rss_text, sdk_rss, "", "≤ 100 MiB", rss_met))

    floor_text = na(floor) if isinstance(floor, BenchError) else f"md5sum + curl -T: {secs(floor)}"
    ratio, met = "n/a", "n/a"
    if isinstance(syncd, Upload) and isinstance(floor, float):
        ratio = f"{syncd.seconds / floor:.2f}x its time"
        met = verdict(syncd.seconds / floor <= 1.3)
    out.rows.append(Row(f"{label} vs the floor", syncd_text, floor_text, ratio, "≤ 1.3x (printed)", met))
    if isinstance(syncd, Upload):
        out.notes.append(f"{label}: syncd {syncd.describe()}")
    if isinstance(sdk, Upload):
        out.notes.append(f"{label}: SDK {sdk.describe()}")
    out.notes.append(f"{label}: md5sum alone took {secs(md5_seconds)}")
    return out
