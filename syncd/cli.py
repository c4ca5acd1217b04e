"""Command line: serve, run, sync, reconcile, status, check-config (design §6).

Exit codes: 0 success, 1 the work did not all succeed (failed files, held prunes), 2 bad usage or config,
3 another syncd holds the state directory.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from syncd.files_cmd import files_app

if TYPE_CHECKING:
    from syncd.config import Config

EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Keep watched folders mirrored into a Files API.",
    pretty_exceptions_enable=False,
)
app.add_typer(files_app, name="files")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (default: $SYNCD_CONFIG or the user config dir)."),
]


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"syncd: {message}", err=True)
    raise typer.Exit(code)


RebindOption = Annotated[
    bool,
    typer.Option(
        "--rebind",
        help="The state dir synced with another remote: forget what syncd owns there, re-match by md5.",
    ),
]


def _finish(command: Callable[[], int]) -> NoReturn:
    """Run a command that uses the state dir; its known failures are one line and an exit code."""
    from syncd.config import ConfigError
    from syncd.manifest import RemoteMismatch
    from syncd.state import AlreadyRunning, StateError

    try:
        code = command()
    except AlreadyRunning as exc:
        _fail(str(exc), EXIT_LOCKED)
    except (ConfigError, RemoteMismatch) as exc:
        _fail(str(exc))
    except StateError as exc:
        _fail(str(exc), exc.exit_code)
    raise typer.Exit(code)


def _load(path: Path | None) -> Config:
    """Load the config; its warnings are printed here, once per command (a SIGHUP reload stays quiet).

    The config's pydantic models are imported here, not with this module: `syncd --help` and `syncd serve`
    do not need them.
    """
    from syncd.config import ConfigError, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        _fail(str(exc))
    for warning in cfg.warnings:
        typer.echo(f"syncd: warning: {warning}", err=True)
    return cfg


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind; loopback by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind (0 picks a free one).")] = 8000,
    data_dir: Annotated[
        Path | None, typer.Option(help="Where metadata and blobs live (default: user data dir).")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="SYNCD_SERVER_API_KEY", show_envvar=True, help="Bearer key clients must send."),
    ] = None,
    max_bytes: Annotated[int | None, typer.Option(min=0, help="Reject larger files with 413.")] = None,
    reject_types: Annotated[
        str, typer.Option(help="Comma list of MIME types or .extensions to reject with 415.")
    ] = "",
    fault_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of requests given a fault.")
    ] = 0.0,
    fault_kinds: Annotated[
        str, typer.Option(help="Comma list of 500,503,429,reset,slow.")
    ] = "500,503,429,reset,slow",
    fault_seed: Annotated[int | None, typer.Option(help="Seed for reproducible faults.")] = None,
    latency_ms: Annotated[int, typer.Option(min=0, help="Delay every response (a simulated WAN).")] = 0,
    public_only: Annotated[
        bool, typer.Option(help="Turn off extensions (md5 field, purpose filters, content route).")
    ] = False,
) -> None:
    """Run the reference Files API server."""
    import platformdirs

    from syncd.server.runner import serve as run_server
    from syncd.server.settings import FAULT_KINDS, ServerSettings

    if not api_key:
        _fail("serve needs a key: pass --api-key or set SYNCD_SERVER_API_KEY")
    kinds = tuple(k.strip() for k in fault_kinds.split(",") if k.strip())
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        _fail(f"--fault-kinds: unknown kind {', '.join(unknown)} (choose from {','.join(FAULT_KINDS)})")
    settings = ServerSettings(
        data_dir=data_dir or Path(platformdirs.user_data_dir("syncd")) / "server",
        api_key=api_key,
        host=host,
        port=port,
        max_bytes=max_bytes,
        reject_types=tuple(t.strip() for t in reject_types.split(",") if t.strip()),
        fault_rate=fault_rate,
        fault_kinds=kinds,
        fault_seed=fault_seed,
        latency_ms=latency_ms,
        public_only=public_only,
    )
    run_server(settings)


@app.command()
def run(
    config: ConfigOption = None,
    embedded: Annotated[
        bool, typer.Option(help="Start a reference server on loopback, data in the state dir.")
    ] = False,
    rebind: RebindOption = False,
) -> None:
    """Run the daemon: watch, settle, hash, upload, reconcile."""
    from syncd.daemon import run_daemon

    cfg = _load(config)
    _finish(lambda: run_daemon(cfg, embedded=embedded, rebind=rebind))


@app.command()
def sync(
    once: Annotated[bool, typer.Option("--once", help="One pass: scan, upload, exit.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be uploaded or matched; change nothing.")
    ] = False,
    rebind: RebindOption = False,
    config: ConfigOption = None,
) -> None:
    """One pass: scan every root, upload what changed, mark what vanished; exit 0 when all is synced."""
    from syncd.once import sync_dry_run, sync_once

    if not once:
        _fail("sync needs --once (the continuous mode is `syncd run`)")
    if dry_run and rebind:
        _fail("--dry-run changes nothing, so it cannot --rebind")
    cfg = _load(config)
    if dry_run:
        _finish(lambda: sync_dry_run(cfg))
    _finish(lambda: sync_once(cfg, progress=sys.stderr.isatty(), rebind=rebind))


@app.command()
def reconcile(
    once: Annotated[bool, typer.Option("--once", help="One sync pass, then one reconcile pass.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    confirm: Annotated[
        bool, typer.Option("--confirm", help="Apply a plan that exceeds max_delete/max_delete_fraction.")
    ] = False,
    rebind: RebindOption = False,
    config: ConfigOption = None,
) -> None:
    """Prune remote files whose local copies were deleted or expired; re-upload vanished ones."""
    from syncd.once import reconcile_once

    if not once:
        _fail("reconcile needs --once (the daemon reconciles every reconcile.interval_seconds)")
    if dry_run and rebind:
        _fail("--dry-run changes nothing, so it cannot --rebind")
    cfg = _load(config)
    _finish(lambda: reconcile_once(cfg, dry_run=dry_run, confirm=confirm, rebind=rebind))


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    config: ConfigOption = None,
) -> None:
    """Counts per state, bytes queued, last errors, held prunes (reads without disturbing a daemon)."""
    from syncd.status import collect, render

    cfg = _load(config)
    report = collect(cfg)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        render(report)


@app.command("check-config")
def check_config(config: ConfigOption = None) -> None:
    """Validate the config and print the effective settings (the API key redacted)."""
    from syncd.config import redacted

    cfg = _load(config)
    effective = redacted(cfg)
    effective["state"]["dir"] = str(cfg.state_dir)
    typer.echo(f"# {cfg.source}")
    typer.echo(f"# api key: {cfg.api_key_source}")
    typer.echo(json.dumps(effective, indent=2))
    if cfg.api_key is None:
        typer.echo(
            "syncd: warning: no API key (set VLMRUN_API_KEY, remote.api_key_file, or a systemd credential "
            "api-key); only `syncd run --embedded` works without one",
            err=True,
        )


def main() -> None:
    app()
