"""`sync --once` and `reconcile --once`: the daemon's wiring with no watcher, one pass, an exit code.

Exit codes: 0 when every file is synced (and nothing was held), 1 with a summary otherwise; errors of
configuration raise `ConfigError`, a held state dir `AlreadyRunning` (the CLI maps them to 2 and 3).
"""

from __future__ import annotations

import asyncio
import time

import structlog
from pydantic import SecretStr

from syncd import logs
from syncd.config import Config, require_api_key
from syncd.counters import Counters
from syncd.daemon import Run, wire
from syncd.manifest import Manifest, ManifestMissing, ManifestReader, State
from syncd.remote import make_client
from syncd.roots import RootTable, build_roots
from syncd.state import StateLock

log = structlog.get_logger("syncd.once")


def _summary_code(run: Run) -> int:
    counts = run.manifest.counts_by_state()
    c = run.counters
    log.info(
        "sync pass done",
        scanned=c.scanned,
        hashed=c.hashed,
        uploaded=c.uploaded,
        reused=c.reused,
        failed=c.failed,
        retry=c.retry,
        changing=c.changed,
        unreadable=c.unreadable,
        deleted=c.deleted,
        bytes_uploaded=c.bytes_uploaded,
        hooks_ran=c.hooks_ran,
        hooks_failed=c.hooks_failed,
        sources_removed=c.sources_removed,
        **{f"rows_{k.value}": v for k, v in counts.items() if v},
    )
    # Rows of roots no longer configured are history, not this pass's problem.
    stuck = [
        e
        for state in (State.FAILED, State.QUEUED, State.UPLOADING)
        for e in run.manifest.in_state(state)
        if run.roots.by_id(e.root_id) is not None
    ]
    for entry in stuck[:20]:
        log.error("not synced", path=entry.relpath, state=entry.state.value, error=entry.last_error)
    for root, reason in run.roots.held.items():
        log.error("root not synced", root=root, reason=reason)
    if c.hooks_failed:
        log.error("hooks failed; the next pass (or the daemon) retries them", failed=c.hooks_failed)
    problems = (
        len(stuck)
        + c.changed
        + c.unreadable
        + c.walk_errors
        + c.crashed
        + len(run.roots.held)
        + c.hooks_failed
    )
    return 1 if problems else 0


async def sync_pass(run: Run) -> int:
    """One pass over every root through the daemon's stages; the exit code of its summary."""
    await wire(run, halt=None)
    return _summary_code(run)


def sync_once(config: Config, *, progress: bool) -> int:
    """`syncd sync --once`: one pass; 0 when every file is synced, 1 with a summary otherwise.

    With the progress bar (a TTY), per-file lines would scroll it away: only warnings and errors are
    logged, and the bar's last state is the summary (rclone's `--progress` behaves the same way).
    """
    logs.configure_for(config, quiet=progress)
    key = require_api_key(config)
    with StateLock(config.state_dir) as lock:
        manifest = Manifest.open(lock)
        try:
            return asyncio.run(_sync_once(config, manifest, key, progress=progress))
        finally:
            manifest.close()


async def _sync_once(config: Config, manifest: Manifest, key: str, *, progress: bool) -> int:
    async with make_client(config, config.remote.base_url, key) as client:
        run = Run(
            config,
            manifest,
            client,
            RootTable(build_roots(config), manifest),
            Counters(),
            base_url=config.remote.base_url,
            api_key=SecretStr(key),
        )
        if not progress:
            return await sync_pass(run)
        from syncd.progress import show_progress

        async with show_progress(run.counters):
            return await sync_pass(run)


def reconcile_once(config: Config, *, dry_run: bool, confirm: bool) -> int:
    """`syncd reconcile --once`: a sync pass, then one reconcile run (design §4).

    `--dry-run` runs no sync pass (it would upload) and takes no lock, so it can run beside a daemon: a
    read-only look at the roots stands in for the pass, and the plan is printed, one line per action.
    """
    logs.configure_for(config)
    key = require_api_key(config)
    if dry_run:
        return asyncio.run(_reconcile_dry_run(config, key, confirm=confirm))
    with StateLock(config.state_dir) as lock:
        manifest = Manifest.open(lock)
        try:
            return asyncio.run(_reconcile_once(config, manifest, key, confirm=confirm))
        finally:
            manifest.close()


async def _reconcile_dry_run(config: Config, key: str, *, confirm: bool) -> int:
    from syncd.reconcile import make_plan, observe_local

    now = time.time()
    try:
        reader = ManifestReader.open_readonly(config.state_dir)
    except ManifestMissing:
        print("nothing to do: nothing has been synced with this state dir yet")
        return 0
    with reader:
        view = await asyncio.to_thread(observe_local, build_roots(config), reader, now=now)
    async with make_client(config, config.remote.base_url, key) as client:
        report = await make_plan(
            config.state_dir,
            client,
            settings=config.reconcile,
            unavailable=view.unavailable,
            now=now,
            confirm=confirm,
            assume_deleted=view.gone,
        )
    print(report.render())
    return report.exit_code


async def _reconcile_once(config: Config, manifest: Manifest, key: str, *, confirm: bool) -> int:
    from syncd.reconcile import reconcile

    async with make_client(config, config.remote.base_url, key) as client:
        roots = RootTable(build_roots(config), manifest, confirm=confirm)

        def fresh() -> Run:
            secret = SecretStr(key)
            return Run(
                config, manifest, client, roots, Counters(), base_url=config.remote.base_url, api_key=secret
            )

        code = await sync_pass(fresh())
        report = await reconcile(
            manifest,
            client,
            settings=config.reconcile,
            unavailable=dict(roots.unavailable),
            now=time.time(),
            confirm=confirm,
        )
        if report.requeued:
            # Remote copies that vanished behind our back: upload them again in this same run.
            again = await sync_pass(fresh())
            code = max(code, again)
        return max(code, report.exit_code)
