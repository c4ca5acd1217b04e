"""`syncd status`: what the manifest says, read without the lock so a running daemon is not disturbed."""

from __future__ import annotations

import time
from typing import Any

import typer

from syncd import hooks
from syncd.config import Config
from syncd.manifest import ManifestMissing, ManifestReader, SchemaMismatch
from syncd.state import daemon_running, read_live


def collect(config: Config) -> dict[str, Any]:
    """Counts per state, bytes queued, last errors and held prunes/roots, as plain data."""
    state_dir = config.state_dir
    running = daemon_running(state_dir)
    report: dict[str, Any] = {"state_dir": str(state_dir), "running": running}
    live = read_live(state_dir) if running else None
    if live is not None:
        live["age_seconds"] = round(max(0.0, time.time() - float(live.get("written_at") or 0.0)), 1)
    report["live"] = live
    try:
        reader = ManifestReader.open_readonly(state_dir)
    except (ManifestMissing, SchemaMismatch) as exc:
        report.update(counts={}, bytes_queued=0, last_errors=[], notes={}, roots=[], hooks=[])
        if isinstance(exc, SchemaMismatch):
            report["notes"] = {"manifest": str(exc)}
        return report
    with reader:
        report["counts"] = {state.value: n for state, n in reader.counts_by_state().items()}
        report["bytes_queued"] = reader.bytes_queued()
        report["last_errors"] = [
            {"path": e.relpath, "state": e.state.value, "error": e.last_error, "at": e.updated_at}
            for e in reader.last_errors(10)
        ]
        report["notes"] = reader.notes()
        report["roots"] = [{"path": r.path, "files": r.live_rows} for r in reader.roots()]
        report["hooks"] = hooks.status(reader, hooks.compile_hooks(config))
    return report


def render(report: dict[str, Any]) -> None:
    """Human-readable status on stdout."""
    typer.echo(f"state dir: {report['state_dir']} ({'daemon running' if report['running'] else 'no daemon'})")
    counts = report["counts"]
    for key, text in report["notes"].items():
        typer.echo(f"held: {key}: {text}")
    if not counts:
        typer.echo("no manifest yet: nothing has been synced with this state dir")
        return
    typer.echo("files: " + (", ".join(f"{n} {state}" for state, n in counts.items() if n) or "none"))
    typer.echo(f"bytes queued: {report['bytes_queued']:,}")
    live = report.get("live")
    if live:
        queues = ", ".join(f"{stage} {n}" for stage, n in sorted(live.get("queues", {}).items()))
        typer.echo(
            f"daemon: pid {live.get('pid')}, {live.get('in_flight', 0)} in flight"
            f" (depth {live.get('concurrency', 0)}), queues: {queues or 'empty'},"
            f" crashed jobs: {live.get('crashed', 0)} (as of {live['age_seconds']:.0f} s ago)"
        )
        if live.get("crashed"):
            typer.echo("warning: jobs crashed on a bug (see the log for tracebacks); their rows are retried")
        if live.get("last_reconcile_at"):
            ago = time.time() - float(live["last_reconcile_at"])
            typer.echo(f"last reconcile: {ago:.0f} s ago")
    for root in report["roots"]:
        typer.echo(f"root {root['path']}: {root['files']} files")
    for err in report["last_errors"]:
        typer.echo(f"error: {err['path']} ({err['state']}): {err['error']}")
    for hook in report.get("hooks", []):
        typer.echo(
            f"hook {hook['name']} ({hook['id']}, {hook['watch']}): {hook['done']} done, {hook['pending']}"
            f" pending, {hook['failing']} failing, {hook['failures']} failed attempts"
        )
        if hook["last_error"]:
            typer.echo(f"  last error: {hook['last_error_path']}: {hook['last_error']}")
