"""`sync --once` and `reconcile --once`: the daemon's wiring with no watcher, one pass, an exit code.

Exit codes: 0 when every file is synced (and nothing was held), 1 with a summary otherwise; errors of
configuration raise `ConfigError`, a held state dir `AlreadyRunning`, an unusable one `StateError`
(the CLI maps them to 2, 3 and the error's own code).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import SecretStr

from syncd import logs
from syncd.api import FilesClient
from syncd.config import Config, require_api_key
from syncd.counters import Counters
from syncd.daemon import Run, wire
from syncd.hashing import Digest, hash_file
from syncd.manifest import Entry, FileKey, Manifest, ManifestMissing, ManifestReader, State
from syncd.plan import NeedRemote, after_hash, needs_hash, statkey
from syncd.remote import make_client
from syncd.roots import (
    Root,
    RootRecord,
    RootTable,
    build_roots,
    file_filter,
    kept_by,
    observe_root,
    unavailable_reason,
)
from syncd.scan import FileStat, walk
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


def sync_once(config: Config, *, progress: bool, rebind: bool = False) -> int:
    """`syncd sync --once`: one pass; 0 when every file is synced, 1 with a summary otherwise.

    With the progress bar (a TTY), per-file lines would scroll it away: only warnings and errors are
    logged, and the bar's last state is the summary (rclone's `--progress` behaves the same way).
    """
    logs.configure_for(config, quiet=progress)
    key = require_api_key(config)
    return _locked(config, key, rebind, lambda manifest: _sync_once(config, manifest, key, progress=progress))


def _locked(
    config: Config, key: str, rebind: bool, body: Callable[[Manifest], Coroutine[Any, Any, int]]
) -> int:
    """Run ``body`` on the manifest, under the state dir's lock, bound to this config's remote."""
    with StateLock(config.state_dir) as lock:
        manifest = Manifest.open(lock)
        try:
            manifest.bind_remote(config.remote.base_url, key, rebind=rebind)
            return asyncio.run(body(manifest))
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


def reconcile_once(config: Config, *, dry_run: bool, confirm: bool, rebind: bool = False) -> int:
    """`syncd reconcile --once`: a sync pass, then one reconcile run (design §4).

    `--dry-run` runs no sync pass (it would upload) and takes no lock, so it can run beside a daemon: a
    read-only look at the roots stands in for the pass, and the plan is printed, one line per action.
    """
    logs.configure_for(config)
    key = require_api_key(config)
    if dry_run:
        return asyncio.run(_reconcile_dry_run(config, key, confirm=confirm))
    return _locked(
        config, key, rebind, lambda manifest: _reconcile_once(config, manifest, key, confirm=confirm)
    )


async def _reconcile_dry_run(config: Config, key: str, *, confirm: bool) -> int:
    from syncd.reconcile import make_plan, observe_local

    now = time.time()
    try:
        reader = ManifestReader.open_readonly(config.state_dir)
    except ManifestMissing:
        print("nothing to do: nothing has been synced with this state dir yet")
        return 0
    with reader:
        reader.check_remote(config.remote.base_url, key)
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


# -- sync --once --dry-run ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Would:
    path: str
    purpose: str
    size: int
    md5: str
    why: str


def sync_dry_run(config: Config) -> int:
    """`syncd sync --once --dry-run`: what a pass would upload and what it would match by cache, and why.

    Changes nothing: no lock (it runs beside a daemon), no manifest writes, no uploads. It reads files it
    would hash and asks the remote cache (a read). Exit 0; 1 when a root is unavailable.
    """
    logs.configure_for(config, quiet=True)
    return asyncio.run(_sync_dry_run(config, require_api_key(config)))


async def _sync_dry_run(config: Config, key: str) -> int:
    try:
        reader: ManifestReader | None = ManifestReader.open_readonly(config.state_dir)
    except ManifestMissing:
        reader = None
    try:
        if reader is not None:
            reader.check_remote(config.remote.base_url, key)
        would, held = await asyncio.to_thread(_would_sync, build_roots(config), reader)
        async with make_client(config, config.remote.base_url, key) as client:
            matched = await _cached(would, reader, client)
    finally:
        if reader is not None:
            reader.close()
    for root, reason in held:
        print(f"held   {root}: {reason}")
    uploads = [w for w in would if w.md5 not in matched]
    for w in would:
        verb = f"match  {matched[w.md5]}" if w.md5 in matched else "upload"
        print(f"{verb:<6} {w.purpose:<12} {w.size:>14,} B  {w.path}  ({w.why})")
    print(
        f"would upload {len(uploads)} file(s), {sum(w.size for w in uploads):,} bytes;"
        f" would match {len(would) - len(uploads)} by cache; nothing was changed"
    )
    return 1 if held else 0


def _would_sync(
    roots: list[Root], reader: ManifestReader | None
) -> tuple[list[_Would], list[tuple[str, str]]]:
    """Walk every root as a pass would: what needs a remote file, and the roots a pass would not sync."""
    stored = {r.path: r for r in reader.roots()} if reader is not None else {}
    would: list[_Would] = []
    held: list[tuple[str, str]] = []
    for root in roots:
        record = stored.get(str(root.path))
        obs = observe_root(root.path, marker=root.watch.marker, keeps=kept_by(root.rules))
        known = RootRecord(record.device, record.inode, record.had_files) if record is not None else None
        if (reason := unavailable_reason(obs, known)) is not None:
            held.append((str(root.path), reason))
            continue
        accepted = file_filter(root)
        ignores = root.rules.ignores_dir if root.watch.recursive else (lambda rel: True)
        for result in walk(str(root.path), ignores_dir=ignores):
            if result.stat is None or not accepted(result.relpath, result.stat.size):
                continue
            entry = reader.get(FileKey(record.root_id, result.relpath)) if reader and record else None
            found = _would_one(root, result.relpath, result.stat, entry)
            if found is not None:
                would.append(found)
    return would, held


def _would_one(root: Root, relpath: str, st: FileStat, entry: Entry | None) -> _Would | None:
    path = str(root.path / relpath)
    seen = statkey(st)
    if entry is not None and not needs_hash(entry.stat, entry.state, seen):
        if entry.state in (State.QUEUED, State.UPLOADING):
            return _Would(path, entry.purpose, st.size, entry.md5, "waiting for a retry")
        return None
    digest = hash_file(path, st)
    if not isinstance(digest, Digest):
        return None  # changing, vanished or unreadable: a real pass reports it
    purpose = root.rules.purpose_for(relpath)
    action = after_hash(entry, seen=statkey(digest.stat), xxh3=digest.xxh3, md5=digest.md5, purpose=purpose)
    if not isinstance(action, NeedRemote):
        return None
    if entry is None or entry.state is State.DELETED:
        why = "new"
    elif entry.md5 == digest.md5 and entry.purpose != purpose:
        why = f"purpose changed from {entry.purpose}"
    else:
        why = "changed"
    return _Would(path, purpose, st.size, digest.md5, why)


async def _cached(would: list[_Would], reader: ManifestReader | None, client: FilesClient) -> dict[str, str]:
    """md5 → where a pass would find it: this manifest's own copy, else the remote cache."""
    found: dict[str, str] = {}
    slots = asyncio.Semaphore(8)

    async def look(w: _Would) -> None:
        if reader is not None and reader.local_copies(w.md5, w.purpose):
            found[w.md5] = "(own copy)"
            return
        async with slots:
            hit = await client.find_by_md5(w.md5, purpose=w.purpose)
        if hit is not None and hit.purpose == w.purpose and hit.md5 in (None, w.md5):
            found[w.md5] = f"({hit.id})"

    await asyncio.gather(*(look(w) for w in {(w.md5, w.purpose): w for w in would}.values()))
    return found
