"""Lifecycle (signals, SIGHUP reload, WATCHDOG) and `wire()`, where every stage is connected (design §2, §8).

The data flow, as `wire()` builds it::

    watcher ─► settle ─► route ─┬─► hashing ─► upload ─► manifest ─┬─► hooks ──┐ (a path's hooks done)
    timers/lost events ─► rescan ┘   (changed while read: back to settle) └─► after_sync ◄┘
    sweep (retries due, grace passed) ─► hashing / upload;   reconcile (timer) ─► prune / re-queue
    hook poll (runs due again) ─► hooks;   after_sync poll (start, missed cues) ─► after_sync

The upload stage hands each row it marks synced to one callable, ``synced``: it records the hook runs the
row calls for in the manifest (the same transaction as the synced state) and cues both stages without
waiting; the manifest, not the cue, is what they act on, so a crash or a full queue loses nothing.

Every queue is created here with a bound, so back-pressure is visible and memory is bounded. Stages get
queues and callables, never another stage's object; shutdown is the mirror image of start-up: sources
stop, each stage drains into the next, the manifest commits last. `once.py` runs the same wiring with no
watcher and no timers: one scan of every root, then drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import SecretStr

from syncd import after_sync, hashing, hooks, logs, reconcile, rescan, upload
from syncd.api import FilesClient
from syncd.config import Config, ConfigError, load_config, require_api_key
from syncd.counters import Counters
from syncd.manifest import CommitPolicy, Entry, FileKey, Manifest, ManifestReader
from syncd.plan import Candidate, PathHint, SyncedFile, is_due
from syncd.remote import make_client, pool_size, upload_workers
from syncd.rescan import RescanRequest
from syncd.roots import Root, RootTable, build_roots, file_filter
from syncd.scan import stat_path
from syncd.service import Notifier
from syncd.settle import Aggregator, Gone, Ready, Rescan, Settled, StatFailed, settle_stage
from syncd.state import (
    EMBEDDED_KEY_NAME,
    LiveState,
    StateError,
    StateLock,
    live_path,
    remove_live,
    write_live,
)
from syncd.supervise import Gate, held

log = structlog.get_logger("syncd.daemon")

HASH_QUEUE = 1024  # candidates waiting for a hasher: a few MB at most
HINT_QUEUE = 10_000  # watcher → settle; when full the watcher asks for a rescan instead of blocking
SETTLED_QUEUE = 1024
UPLOAD_QUEUE_PER_SLOT = 4  # jobs waiting per request in flight: enough to keep every slot busy
DRAIN_SECONDS = 30.0  # SIGTERM waits this long for in-flight uploads before exiting anyway
SWEEP_SECONDS = 10.0  # how often rows due for a retry, and missing rows past grace, are looked at
STATUS_SECONDS = 10.0  # sd_notify STATUS= and the live-state file
PROBE_SECONDS = 5.0  # while paused, how often a write to the state dir is tried again
MIN_QUIET_SECONDS = 0.05  # settle_seconds = 0 still debounces a burst of events for one file


# -- configuration helpers shared with once.py ----------------------------------------------------------


# -- the wiring ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """What one wiring runs with; the daemon makes a new one per config (SIGHUP)."""

    config: Config
    manifest: Manifest
    client: FilesClient
    roots: RootTable
    counters: Counters
    clock: Callable[[], float] = time.time
    due: Callable[[Entry], bool] = lambda entry: True
    """Whether a waiting row may be sent now: the daemon honours its backoff, one pass retries all."""
    base_url: str = ""
    api_key: SecretStr | None = None
    """The remote's address and key as in use (the embedded server's, with --embedded): what a hook with
    pass_api_key is given."""


@dataclass(frozen=True, slots=True)
class _Pipes:
    """The queues between the stages, and what several of them share; made once per wiring."""

    hints: asyncio.Queue[PathHint]
    rescans: asyncio.Queue[RescanRequest | None]
    hash_q: asyncio.Queue[Candidate | None]
    jobs: upload.JobQueue
    scanned: dict[int, asyncio.Event]
    commit: CommitPolicy
    cache: upload.RemoteCache
    unreadable: logs.UnreadableLog
    gate: Gate | None
    """The daemon pauses at it while the state dir cannot be written; one pass has none and ends."""
    hook_runs: hooks.HookQueue
    drops: asyncio.Queue[FileKey | None]
    """after_sync's input: paths whose synced row it should look at."""
    missed_drops: asyncio.Event
    """A cue to after_sync was dropped (queue full) or a held root is back: poll the manifest again."""


async def wire(run: Run, *, halt: asyncio.Event | None, notifier: Notifier | None = None) -> None:
    """Run every stage. With ``halt`` (the daemon): watch and rescan until it is set, then drain. Without:
    one scan of every root and the rows left waiting, then drain and return."""
    config, manifest, roots, counters, clock = run.config, run.manifest, run.roots, run.counters, run.clock
    daemon = halt is not None
    q = _Pipes(
        hints=asyncio.Queue(HINT_QUEUE),
        rescans=asyncio.Queue(),  # unbounded: the rescan stage coalesces what piles up
        hash_q=asyncio.Queue(HASH_QUEUE),
        jobs=upload.JobQueue(pool_size(config) * UPLOAD_QUEUE_PER_SLOT),
        scanned={root.index: asyncio.Event() for root in roots.roots},
        commit=CommitPolicy(manifest),
        cache=upload.RemoteCache(run.client),
        unreadable=logs.UnreadableLog(),
        gate=Gate() if daemon else None,
        hook_runs=hooks.HookQueue(hooks.HOOK_QUEUE),
        drops=asyncio.Queue(after_sync.AFTER_SYNC_QUEUE),
        missed_drops=asyncio.Event(),
    )
    hints, rescans, hash_q, jobs, commit, cache = q.hints, q.rescans, q.hash_q, q.jobs, q.commit, q.cache
    hook_runs, drops = q.hook_runs, q.drops
    hasher = hashing.Hasher()
    table = hooks.compile_hooks(config)
    for hook in table:
        manifest.record_hook(hook.id, hooks.definition(hook.root_path, hook.config))
    webhooks = hooks.webhook_client() if table.webhooks else None
    key = run.api_key.get_secret_value() if run.api_key is not None else None
    execute = hooks.executor(base_url=run.base_url, api_key=key, http=webhooks, inherited=dict(os.environ))
    loop = asyncio.get_running_loop()

    async def route(batch: list[Candidate]) -> None:
        """Scan finds: files quiet for settle_seconds go straight to hashing; fresher ones settle first."""
        cache.expect(len(batch))
        for cand in batch:
            # ctime too: `cp -p`, `tar x` and `rsync -t` back-date mtime on a file written just now.
            age = clock() - max(cand.stat.mtime_ns, cand.stat.ctime_ns) / 1e9
            if not daemon or age >= cand.root.watch.settle_seconds:
                await hash_q.put(cand)
            else:
                await hints.put(PathHint(cand.root.index, cand.relpath, "scanned", cand.stat))

    def resettle(root: Root, relpath: str) -> None:
        """Changed while hashed or uploaded. The daemon settles it again (`scanned`, not `modified`: on a
        polling root no close event will come); one pass leaves it to the next."""
        if daemon:
            with contextlib.suppress(asyncio.QueueFull):
                hints.put_nowait(PathHint(root.index, relpath, "scanned"))
        else:
            counters.changed += 1
            log.warning("file is still changing; the next pass picks it up once it settles", path=relpath)

    def resettle_key(key: FileKey) -> None:
        if (root := roots.by_id(key.root_id)) is not None:
            resettle(root, key.relpath)

    def cue_drop(key: FileKey) -> None:
        """after_sync: look at this path soon. Never waits; a full queue is made up by the next poll."""
        root = roots.by_id(key.root_id)
        if root is None or root.watch.after_sync == "keep":
            return
        try:
            drops.put_nowait(key)
        except asyncio.QueueFull:
            q.missed_drops.set()

    def synced(done: SyncedFile) -> None:
        """The upload stage marked a row synced: its hook runs join the same transaction, then the cues."""
        root = roots.by_id(done.key.root_id)
        if root is None:
            return
        for hook_run in hooks.record(manifest, table.for_root(root.index), done):
            hook_runs.offer(hook_run)
        cue_drop(done.key)

    def drop_later(key: FileKey, seconds: float) -> None:
        """A failed or premature removal: the daemon looks again later; one pass leaves it to the next."""
        if daemon:
            loop.call_later(seconds, cue_drop, key)

    async def poll_drops() -> None:
        """Every path after_sync may have to act on, from the manifest (start, missed cues, crashes)."""
        commit.now()  # the reader connection must see every row written so far
        ids = [i for r in roots.roots if r.watch.after_sync != "keep" and (i := roots.id_of(r)) is not None]
        for found in await after_sync.pending(config.state_dir, ids):
            await drops.put(found)

    consumers = [
        asyncio.create_task(
            upload.run(
                jobs,
                manifest=manifest,
                client=run.client,
                cache=cache,
                commit=commit,
                resettle=resettle_key,
                due=run.due,
                clock=clock,
                counters=counters,
                workers=upload_workers(config),
                gate=q.gate,
                throttle=upload.UploadRate(rate) if (rate := config.remote.max_upload_rate) else None,
                synced=synced,
            )
        ),
        asyncio.create_task(
            hashing.run(
                hash_q,
                hasher=hasher,
                manifest=manifest,
                commit=commit,
                submit=jobs.submit,
                resettle=lambda cand: resettle(cand.root, cand.relpath),
                unreadable=q.unreadable,
                counters=counters,
                gate=q.gate,
            )
        ),
        asyncio.create_task(
            rescan.run(
                rescans,
                roots=roots,
                manifest=manifest,
                commit=commit,
                submit=route,
                scanned=lambda root: q.scanned[root.index].set(),
                unreadable=q.unreadable,
                counters=counters,
                clock=clock,
                state_dir=config.state_dir,
                gate=q.gate,
            )
        ),
        asyncio.create_task(
            hooks.run(
                hook_runs,
                manifest=manifest,
                commit=commit,
                table=table,
                execute=execute,
                path_of=roots.path_of,
                clock=clock,
                counters=counters,
                finished=lambda done: cue_drop(FileKey(done.root_id, done.relpath)),
                gate=q.gate,
            )
        ),
        asyncio.create_task(
            after_sync.run(
                drops,
                manifest=manifest,
                commit=commit,
                roots=roots,
                hook_ids=table.ids_for_root,
                retry=drop_later,
                counters=counters,
                gate=q.gate,
            )
        ),
    ]
    upload_stage, hash_stage, rescan_stage, hook_stage, drop_stage = consumers

    async def sweep() -> None:
        """Rows due for a retry (or left by a crash) go back through the quick check."""
        found, orphans = await rescan.recovery(manifest, roots, due=run.due, pending=jobs.pending)
        for cand in found:
            await hash_q.put(cand)
        for job in orphans:
            await jobs.submit(job)

    async def drop_poller() -> None:
        """The daemon's after_sync source: once every root was scanned (ids known, guards applied), then
        whenever a cue was missed."""
        await asyncio.gather(*(e.wait() for e in q.scanned.values()))
        while True:
            await poll_drops()
            await q.missed_drops.wait()
            q.missed_drops.clear()
            await asyncio.sleep(SWEEP_SECONDS)  # let a full queue drain before re-reading

    try:
        if halt is not None:
            await _watch_and_wait(
                run,
                q,
                halt=halt,
                notifier=notifier or Notifier(),
                sweep=sweep,
                stages=consumers,
                more=[
                    lambda: hooks.poll(hook_runs, manifest=manifest, table=table, clock=clock),
                    drop_poller,
                ],
            )
            # Mirror-image shutdown: a walk in progress stops at once, files being read or sent finish,
            # and what waits in the queues is picked up again by the next start's scan.
            rescan_stage.cancel()
            await asyncio.gather(rescan_stage, return_exceptions=True)
            _drop_waiting(hash_q)
            jobs.drop_waiting()
        else:
            for root in roots.roots:
                await rescans.put(RescanRequest(root.index))
            await rescans.put(None)
            await rescan_stage
            # Rows left queued or uploading by an earlier run: their stat is unchanged, so they skip
            # hashing and go straight to the uploader, which resolves them by md5 first.
            await sweep()
        await hash_q.put(None)
        await hash_stage
        await jobs.queue.put(None)
        await _drain(upload_stage, daemon=daemon)
        # Hooks, then after_sync (which waits for a path's hooks): the daemon leaves runs not started to
        # the next start; one pass runs every pending one (each bounded by its timeout) and waits.
        if daemon:
            hook_runs.drop_waiting()
        else:
            await hooks.submit_all_pending(hook_runs, manifest=manifest, table=table)
        await hook_runs.queue.put(None)
        await _drain(hook_stage, daemon=daemon, seconds=hooks.HOOK_DRAIN_SECONDS, what="hooks")
        if not daemon:
            await poll_drops()
        await drops.put(None)
        await drop_stage
    finally:
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        cache.close()
        if webhooks is not None:
            await webhooks.aclose()
        # Joining the hash threads waits for the file being read: off the loop, so watchdog pings go on.
        await asyncio.to_thread(hasher.close)
        commit.now()


def _drop_waiting(queue: asyncio.Queue[Candidate | None]) -> None:
    while not queue.empty():
        queue.get_nowait()


async def _drain(
    stage: asyncio.Task[None], *, daemon: bool, seconds: float = DRAIN_SECONDS, what: str = "uploads"
) -> None:
    """One pass waits for every upload (and hook); SIGTERM waits a bounded time, and what is cut off
    resumes at the next start (an upload by md5 lookup, a hook from its pending run)."""
    if not daemon:
        await stage
        return
    done, _ = await asyncio.wait({stage}, timeout=seconds)
    if not done:
        log.warning(f"stopped before in-flight {what} finished; they resume at the next start")
        stage.cancel()
        await asyncio.gather(stage, return_exceptions=True)


async def _watch_and_wait(
    run: Run,
    q: _Pipes,
    *,
    halt: asyncio.Event,
    notifier: Notifier,
    sweep: Callable[[], Awaitable[None]],
    stages: list[asyncio.Task[None]],
    more: Sequence[Callable[[], Coroutine[Any, Any, None]]],
) -> None:
    """The daemon's sources (watcher, settle, timers, sweep, reconcile, the http listener and ``more``),
    until ``halt``; then stop them.

    A stage or source that ends by a bug stops the daemon cleanly (systemd restarts it) rather than
    letting it limp on without that stage.
    """
    from syncd.watch import InotifyLimitError, Watcher, WatchRoot

    config, manifest, roots, counters, clock = run.config, run.manifest, run.roots, run.counters, run.clock
    hints, rescans, hash_q, commit = q.hints, q.rescans, q.hash_q, q.commit
    gate = q.gate
    assert gate is not None  # the daemon always has one
    settled: asyncio.Queue[Settled] = asyncio.Queue(SETTLED_QUEUE)
    live = LiveState(pid=os.getpid(), state_dir=str(config.state_dir.absolute()))
    live_file = live_path(config.state_dir)

    async def router() -> None:
        """Settled paths: ready files to hashing, gone ones marked missing, rescans to the rescan stage."""
        while True:
            await gate.passing()
            item = await settled.get()
            root = roots.roots[item.root_index]
            root_id = roots.id_of(root)
            if isinstance(item, Ready):
                if root_id is not None:
                    await hash_q.put(Candidate(root, root_id, item.relpath, item.stat))
            elif isinstance(item, Gone):
                key = FileKey(root_id, item.relpath) if root_id is not None else None
                if key is not None and manifest.get(key) is not None:
                    try:
                        manifest.mark_missing(key, clock())
                        commit.maybe()
                    except StateError as exc:
                        await held(gate, exc)  # the next full rescan marks it again
            elif isinstance(item, Rescan):
                await rescans.put(RescanRequest(item.root_index, item.relpath))
            elif isinstance(item, StatFailed):
                q.unreadable.report(root_id if root_id is not None else -1, item.relpath, item.error)

    async def timer(root: Root) -> None:
        """The startup scan, then a full rescan every rescan_interval."""
        while True:
            await rescans.put(RescanRequest(root.index))
            await asyncio.sleep(root.watch.rescan_interval)

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            await gate.passing()
            try:
                await sweep()
                back = await rescan.sweep_missing(roots, manifest=manifest, counters=counters, clock=clock)
                commit.maybe()
            except StateError as exc:
                await held(gate, exc)
                continue
            for root in back:
                await rescans.put(RescanRequest(root.index))  # a held root is back: walk it now
                q.missed_drops.set()  # and let after_sync look at its rows
            for index in watcher.gone():
                root = roots.roots[index]
                # `rm -rf root && mkdir root` (the inode reused): the same root to the guards, a new one to
                # inotify. A root held as replaced waits for --confirm and a restart instead.
                if not roots.is_held(root) and await asyncio.to_thread(root.path.is_dir):
                    await asyncio.to_thread(watcher.rewatch, index)
                    await rescans.put(RescanRequest(index))

    async def committer() -> None:
        """Writes never wait longer than the commit policy's period to become durable and visible."""
        while True:
            await asyncio.sleep(commit.seconds)
            await gate.passing()
            try:
                commit.maybe()
            except StateError as exc:
                await held(gate, exc)

    async def resumer() -> None:
        """While paused, try one small write every PROBE_SECONDS; once it lands, resume and rescan every
        root (what could not be recorded meanwhile is found again; uploads resolve by md5)."""
        while True:
            await gate.closing()
            notifier.status(f"paused: {gate.reason}")
            while True:
                await asyncio.sleep(PROBE_SECONDS)
                try:
                    manifest.probe()
                    break
                except StateError:
                    continue
            gate.reopen()
            for root in roots.roots:
                await rescans.put(RescanRequest(root.index))

    async def reporter() -> None:
        """STATUS= for systemd and the live-state file for `status`; the counts query runs off the loop."""
        live_error: str | None = None
        while True:
            counts = await asyncio.to_thread(_counts, config)
            summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "idle"
            notifier.status(f"paused: {gate.reason}" if gate.reason else summary)
            live.paused = gate.reason
            live.in_flight = counters.in_flight
            if live.concurrency != run.client.depth:
                log.info("in-flight depth", depth=run.client.depth, setting=config.remote.concurrency)
            live.concurrency = run.client.depth
            live.crashed = counters.crashed
            live.last_reconcile_at = counters.last_reconcile_at
            live.queues = depths()
            try:
                await asyncio.to_thread(write_live, live_file, live)
                live_error = None
            except OSError as exc:
                if live_error != str(exc):
                    log.warning("cannot write the live-state file", path=str(live_file), error=str(exc))
                live_error = str(exc)
            await asyncio.sleep(STATUS_SECONDS)

    def depths() -> dict[str, int]:
        return {
            "hash": hash_q.qsize(),
            "upload": q.jobs.queue.qsize(),
            "hooks": q.hook_runs.queue.qsize(),
            "after_sync": q.drops.qsize(),
        }

    def lost_events(root_index: int) -> None:
        log.warning("watcher lost events; rescanning", root=str(roots.roots[root_index].path))
        rescans.put_nowait(RescanRequest(root_index))

    aggregator = Aggregator(
        {r.index: max(r.watch.settle_seconds, MIN_QUIET_SECONDS) for r in roots.roots},
        max(r.watch.settle_max_seconds for r in roots.roots),
    )
    watcher = Watcher(
        [
            WatchRoot(str(r.path), r.watch.mode, r.watch.recursive, r.rules.ignores_dir, file_filter(r))
            for r in roots.roots
        ],
        loop=asyncio.get_running_loop(),
        hints=hints,
        request_rescan=lost_events,
    )
    listening = None
    if config.http.listen is not None:
        from syncd import http

        listening = http.bind(config)  # before READY: an address in use fails the start, in one line
    try:
        await asyncio.to_thread(watcher.start)
    except InotifyLimitError as exc:
        raise ConfigError(f'{config.source}: watch.mode = "inotify": {exc}') from None
    sources = [
        asyncio.create_task(
            settle_stage(
                hints,
                settled,
                aggregator=aggregator,
                stat=lambda index, rel: stat_path(str(roots.roots[index].path / rel)),
                clock=time.monotonic,
                wall=time.time,
                stop=halt,
            )
        ),
        asyncio.create_task(router()),
        *(asyncio.create_task(timer(r)) for r in roots.roots),
        asyncio.create_task(sweeper()),
        asyncio.create_task(committer()),
        asyncio.create_task(resumer()),
        asyncio.create_task(reporter()),
        *(asyncio.create_task(source()) for source in more),
        asyncio.create_task(
            reconcile.run(
                halt,
                ready=asyncio.gather(*(e.wait() for e in q.scanned.values())),
                roots=roots,
                manifest=manifest,
                client=run.client,
                settings=config.reconcile,
                forget=q.cache.forget,
                clock=clock,
                counters=counters,
                gate=gate,
            )
        ),
    ]
    if listening is not None:
        from syncd import http, status

        sources.append(
            asyncio.create_task(
                http.serve(
                    listening,
                    config=config,
                    counters=counters,
                    queues=depths,
                    status=lambda: status.collect(config),
                )
            )
        )
    notifier.ready(f"watching {len(roots.roots)} folder(s)")
    log.info("watching", roots=[str(r.path) for r in roots.roots])
    try:
        halted = asyncio.create_task(halt.wait())
        await asyncio.wait({halted, *sources, *stages}, return_when=asyncio.FIRST_COMPLETED)
        halted.cancel()
        for task in (*sources, *stages):
            if task.done() and not task.cancelled() and (error := task.exception()) is not None:
                raise error
    finally:
        halt.set()
        await asyncio.to_thread(watcher.stop)
        for task in sources:
            task.cancel()
        await asyncio.gather(*sources, return_exceptions=True)
        remove_live(live_file)


def _counts(config: Config) -> dict[str, int]:
    with ManifestReader.open_readonly(config.state_dir) as reader:
        return {state.value: n for state, n in reader.counts_by_state().items()}


# -- the daemon's lifecycle ----------------------------------------------------------------------------


@contextmanager
def _remote(config: Config, *, embedded: bool) -> Iterator[tuple[str, str]]:
    """(base_url, api_key): the configured service, or a reference server on loopback in this process."""
    if not embedded:
        yield config.remote.base_url, require_api_key(config)
        return
    from syncd.server.runner import EmbeddedStartError, embedded_server

    stack = ExitStack()
    try:
        server = stack.enter_context(embedded_server(config.state_dir, config.remote.base_url))
    except EmbeddedStartError as exc:  # only the start: errors of the daemon itself must not be renamed
        raise ConfigError(f"{config.source}: remote.base_url: {exc}") from None
    with stack:
        key_file = config.state_dir / EMBEDDED_KEY_NAME
        log.info("embedded reference server", base_url=server.base_url, api_key_file=str(key_file))
        yield server.base_url, server.api_key


def run_daemon(config: Config, *, embedded: bool, rebind: bool = False) -> int:
    """`syncd run`: watch, settle, hash, upload, reconcile until SIGTERM; SIGHUP reloads the config."""
    logs.configure_for(config)
    if not config.watch:
        raise ConfigError(f"{config.source}: watch: no [[watch]] table: nothing to sync")
    with StateLock(config.state_dir) as lock, _remote(config, embedded=embedded) as (base_url, key):
        logs.configure_for(config, (key,))
        manifest = Manifest.open(lock)
        try:
            manifest.bind_remote(base_url, key, rebind=rebind)
            return asyncio.run(_daemon(config, manifest, base_url, key, embedded=embedded))
        finally:
            manifest.close()


async def _daemon(config: Config, manifest: Manifest, base_url: str, key: str, *, embedded: bool) -> int:
    loop = asyncio.get_running_loop()
    notifier = Notifier()
    stop = asyncio.Event()
    reload = asyncio.Event()

    def stopping() -> None:
        notifier.stopping()  # at once: systemd then knows the drain that follows is a stop, not a hang
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    pinger = asyncio.create_task(_watchdog(notifier))
    counters = Counters()  # one set for the process: a reload does not reset what `status` shows
    try:
        while True:
            halt = asyncio.Event()
            relay = asyncio.create_task(_first(stop, reload, then=halt))
            async with make_client(config, base_url, key) as client:
                client.prepare()
                roots = RootTable(build_roots(config), manifest)
                run = Run(
                    config,
                    manifest,
                    client,
                    roots,
                    counters,
                    due=lambda e: is_due(e, time.time()),
                    base_url=base_url,
                    api_key=SecretStr(key),
                )
                try:
                    await wire(run, halt=halt, notifier=notifier)
                finally:
                    relay.cancel()
            if stop.is_set():
                break
            reload.clear()  # before reading: a SIGHUP during the read triggers one more reload
            config = _reloaded(config, embedded=embedded)
            logs.configure_for(config, (key,))
            notifier.reloading()
    finally:
        notifier.stopping()
        pinger.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


async def _first(*events: asyncio.Event, then: asyncio.Event) -> None:
    """Set ``then`` as soon as any of ``events`` is set (stop or reload both halt the wiring)."""
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        then.set()
    finally:
        for w in waits:
            w.cancel()


def _reloaded(old: Config, *, embedded: bool) -> Config:
    """The config re-read on SIGHUP; on any error the old one stays in force (never a crash loop)."""
    try:
        new = load_config(old.source)
        build_roots(new)  # rule errors surface here, not when the new wiring starts
        if not new.watch:
            raise ConfigError(f"{old.source}: watch: no [[watch]] table: nothing to sync")
        if new.state_dir != old.state_dir:
            raise ConfigError(
                f"{old.source}: state.dir: changing it needs a restart (keeping {old.state_dir})"
            )
        if not embedded:
            require_api_key(new)
            if new.remote.base_url != old.remote.base_url:
                raise ConfigError(
                    f"{old.source}: remote.base_url: another remote needs a restart (with --rebind);"
                    f" keeping {old.remote.base_url}"
                )
        log.info("config reloaded", source=str(old.source), roots=len(new.watch))
        return new
    except ConfigError as exc:
        log.error("config reload failed; keeping the running config", error=str(exc))
        return old


async def _watchdog(notifier: Notifier) -> None:
    """WATCHDOG=1 from the event loop itself, so a stuck loop stops the pings and systemd restarts us."""
    if notifier.watchdog_interval is None:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(notifier.watchdog_interval)
