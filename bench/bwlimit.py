"""The bandwidth cap: ``sync --once`` of 40 MiB with ``[remote] max_upload_rate = "5MiB"``.

The peer is the cap itself: the rate achieved while uploading should be within 10% of it. It is measured
from the end of the walk (the "scan done" debug line: the uploads start then, after an md5 pass of a few
milliseconds) to the last file's "synced" line, over all the bytes, so the process start, which the cap
does not govern, is left out; the whole pass's time is printed beside it. (Between the first and the last
"synced" line would overstate the rate: the uploads run side by side and share the cap, so the first
finishes late.) The server's listing is verified before any figure.
"""

from __future__ import annotations

import json
from datetime import datetime

from bench.common import (
    BenchError,
    Context,
    Outcome,
    Row,
    na,
    run_syncd_once,
    server,
    verdict,
    verify_remote,
    write_config,
    write_random_files,
)

MiB = 1 << 20
CAP = 5 * MiB


def bwlimit(ctx: Context) -> Outcome:
    out = Outcome()
    count, size = (3, 5 * MiB) if ctx.options.quick else (8, 5 * MiB)
    tree = ctx.fresh_dir("tree-bwlimit")
    expected = write_random_files(tree, count, size=size)
    label = f"bandwidth cap 5 MiB/s, {count} x 5 MiB"
    try:
        with server(ctx, "bwlimit") as srv:
            base = ctx.fresh_dir("syncd-bwlimit")
            config = write_config(
                base / "config.toml",
                base_url=srv.base_url,
                state_dir=base / "state",
                root=tree,
                concurrency=ctx.options.concurrency,
                log_level="debug",
            )
            config.write_text(
                config.read_text().replace("[remote]\n", '[remote]\nmax_upload_rate = "5MiB"\n', 1)
            )
            done = run_syncd_once(config, srv, logs=base, timeout=120 + count * size / CAP * 3)
            verify_remote(srv, expected)
    except BenchError as exc:
        out.rows.append(Row(label, na(exc), "cap 5.00 MiB/s", "n/a", "within 10% of the cap", "n/a"))
        return out
    times: dict[str, list[float]] = {"scan done": [], "synced": []}
    for line in done.stdout.read_text(errors="replace").splitlines():
        if line.startswith("{") and (event := (record := json.loads(line)).get("event")) in times:
            times[event].append(datetime.fromisoformat(record["timestamp"]).timestamp())
    if len(times["synced"]) != count or len(times["scan done"]) != 1:
        lines = ", ".join(f"{len(v)} {k!r} lines" for k, v in times.items())
        out.rows.append(Row(label, lines, "cap", "n/a", "within 10%", "n/a"))
        return out
    rate = count * size / (max(times["synced"]) - times["scan done"][0])
    ratio = rate / CAP
    out.rows.append(
        Row(
            label,
            f"{rate / MiB:.2f} MiB/s while uploading (whole pass {done.seconds:.2f} s)",
            "cap 5.00 MiB/s",
            f"{ratio:.2f}x the cap",
            "within 10% of the cap",
            verdict(0.9 <= ratio <= 1.1),
        )
    )
    return out
