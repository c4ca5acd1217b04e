"""`syncd status`: what the manifest says, read without the lock so a running daemon is not disturbed."""

from __future__ import annotations

import shlex
import time
from typing import Any

import typer

from syncd import hooks
from syncd.config import Config
from syncd.manifest import (
    NOTE_HELD,
    Entry,
    ManifestMissing,
    ManifestReader,
    SchemaMismatch,
    State,
    held_guards,
)
from syncd.state import daemon_running, read_live

RECENT_SYNCED = 50
"""Synced files listed, newest first: what someone checking "did my scan arrive?" looks for."""
FAILED_LISTED = 1000
"""Failed files listed, newest first; `counts.failed` has the total (a bound keeps a failure storm from
making every refresh of the status page megabytes long)."""

_ADVICE = {
    "TooLargeError": "the server refuses files this large: shrink or split it, or exclude it"
    " (watch.max_file_size, watch.ignore); syncd tries again when the file changes",
    "UnsupportedTypeError": "the server refuses this file type: convert it, or exclude it"
    " (watch.ignore, watch.include); syncd tries again when the file changes",
    "ValidationError": "the server rejected the upload's parameters (often the purpose): check the"
    " [[watch.rules]] that match this path; syncd tries again when the file or the rules change",
}
_OTHER_ADVICE = "see the daemon's log for this path; syncd tries again when the file changes"


def advice(reason: str | None) -> str:
    """What to do about a failed file, from the error class its reason starts with."""
    kind = (reason or "").split(":", 1)[0]
    return _ADVICE.get(kind, _OTHER_ADVICE)


def collect(config: Config) -> dict[str, Any]:
    """Counts per state, bytes queued, last errors, roots and their health, held prunes with the command
    that confirms them, the newest synced and failed files, as plain data (`status --json`, /api/status)."""
    state_dir = config.state_dir
    running = daemon_running(state_dir)
    report: dict[str, Any] = {"state_dir": str(state_dir), "running": running}
    live = read_live(state_dir) if running else None
    if live is not None:
        live["age_seconds"] = round(max(0.0, time.time() - float(live.get("written_at") or 0.0)), 1)
    report["live"] = live
    config_arg = f" --config {shlex.quote(str(config.source.absolute()))}" if config.source else ""
    report["confirm_command"] = f"syncd reconcile --once --confirm{config_arg}"
    try:
        reader = ManifestReader.open_readonly(state_dir)
    except (ManifestMissing, SchemaMismatch) as exc:
        report.update(
            counts={}, bytes_queued=0, last_errors=[], notes={}, held=[], recent=[], failed=[], hooks=[]
        )
        if isinstance(exc, SchemaMismatch):
            report["notes"] = {"manifest": str(exc)}
        report["roots"] = _roots(config, {}, report["notes"])
        return report
    with reader:
        report["counts"] = {state.value: n for state, n in reader.counts_by_state().items()}
        report["bytes_queued"] = reader.bytes_queued()
        report["last_errors"] = [
            {"path": e.relpath, "state": e.state.value, "error": e.last_error, "at": e.updated_at}
            for e in reader.last_errors(10)
        ]
        notes = reader.notes()
        report["notes"] = notes
        report["held"] = held_guards(notes.get(NOTE_HELD))
        stored = reader.roots()
        report["roots"] = _roots(config, {r.path: r.live_rows for r in stored}, notes)
        paths = {r.root_id: r.path for r in stored}
        report["recent"] = [
            _file(e, paths) | {"purpose": e.purpose, "remote_id": e.remote_id}
            for e in reader.newest_in_state(State.SYNCED, RECENT_SYNCED)
        ]
        report["failed"] = [
            _file(e, paths) | {"purpose": e.purpose, "reason": e.last_error, "advice": advice(e.last_error)}
            for e in reader.newest_in_state(State.FAILED, FAILED_LISTED)
        ]
        report["hooks"] = hooks.status(reader, hooks.compile_hooks(config))
    return report


def _roots(config: Config, files: dict[str, int], notes: dict[str, str]) -> list[dict[str, Any]]:
    """Every root the manifest knows and every configured one, with why it is not synced (its note)."""
    configured = [str(w.path) for w in config.watch]
    return [
        {
            "path": path,
            "files": files.get(path, 0),
            "configured": path in configured,
            "available": f"root:{path}" not in notes,
            "problem": notes.get(f"root:{path}"),
        }
        for path in dict.fromkeys([*files, *configured])
    ]


def _file(entry: Entry, root_paths: dict[int, str]) -> dict[str, Any]:
    return {
        "path": entry.relpath,
        "root": root_paths.get(entry.root_id),
        "size": entry.stat.size,
        "at": entry.updated_at,
    }


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
