"""Wiring of the stages, lifecycle and signals (design §1, §7, §8).

Every queue between stages is created in `Pipeline.__init__` with a bound, so back-pressure is visible
and memory is bounded. Stages receive queues and callables, never another stage's object. Shutdown is
the mirror image of start-up: sources stop, each stage drains into the next, the manifest commits last.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from syncd import logs
from syncd.api import ApiError, FileResponse, FilesClient
from syncd.config import Config, ConfigError, WatchConfig, load_config
from syncd.hashing import Changed, Digest, Hasher, Unreadable, Vanished
from syncd.manifest import (
    AlreadyRunning,
    Entry,
    FileKey,
    Manifest,
    ManifestReader,
    QuickIndex,
    State,
    StateLock,
    StatKey,
)
from syncd.plan import (
    Forget,
    Keep,
    MarkDeleted,
    MarkMissing,
    NeedRemote,
    Restat,
    after_hash,
    needs_hash,
    on_missing,
)
from syncd.roots import RootRecord, observe_root, unavailable_reason
from syncd.rules import CompiledRules, PurposeRule, RootRules, compile_rules
from syncd.scan import FileStat, StatError, stat_path, walk
from syncd.service import Notifier
from syncd.upload import Outcome, RemoteIndex, UploadJob, sync_job

__all__ = ["AlreadyRunning", "reconcile_once", "run_daemon", "sync_once"]

log = structlog.get_logger("syncd.daemon")

COMMIT_EVERY_WRITES = 1000  # measured: batched SQLite commits run ~200k rows/s vs 34k/s one per row
COMMIT_EVERY_SECONDS = 0.25  # bounds what a crash can lose to a quarter second of hashing work
HASH_QUEUE = 1024  # candidates waiting for a hasher: a few MB at most
SCAN_BATCH = 256  # scan results handed from the walker thread to the loop per hop
PREFETCH_LISTING_MIN = 64  # at least this many new files make one listing cheaper than N hash lookups
LISTING_PAGES_PER_FILE = 0.05  # give up on the listing beyond one page per 20 new files (huge remotes)
INDEX_TTL_SECONDS = 600.0  # after this, a cache check asks the server again
DRAIN_SECONDS = 30.0  # SIGTERM waits this long for in-flight uploads before exiting anyway


@dataclass(frozen=True, slots=True)
class Root:
    index: int
    path: Path
    watch: WatchConfig
    rules: CompiledRules


@dataclass(frozen=True, slots=True)
class Candidate:
    """A path that may need hashing: a scan or a settled event saw it with this stat."""

    root: Root
    root_id: int
    relpath: str
    stat: FileStat


@dataclass(slots=True)
class Counters:
    scanned: int = 0
    hashed: int = 0
    unchanged: int = 0
    uploaded: int = 0
    reused: int = 0
    failed: int = 0
    retry: int = 0
    changed: int = 0
    unreadable: int = 0
    bytes_uploaded: int = 0
    deleted: int = 0
    held_roots: list[str] = field(default_factory=list)


def _statkey(st: FileStat) -> StatKey:
    return StatKey(st.size, st.mtime_ns, st.ctime_ns, st.inode)


def build_roots(config: Config) -> list[Root]:
    roots = []
    for index, watch in enumerate(config.watch):
        try:
            rules = compile_rules(
                RootRules(
                    ignore=watch.ignore,
                    include=watch.include,
                    max_file_size=watch.max_file_size or None,
                    purpose_rules=tuple(PurposeRule(r.pattern, r.purpose) for r in watch.rules),
                    default_purpose=watch.purpose,
                )
            )
        except ValueError as exc:
            raise ConfigError(f"{config.source}: watch[{index}].rules: {exc}") from None
        roots.append(Root(index, watch.path, watch, rules))
    return roots


def _file_filter(root: Root) -> Callable[[str, int], bool]:
    accepts = root.rules.accepts
    return lambda relpath, size: accepts(relpath, size) is None


@dataclass(frozen=True, slots=True)
class _ScanDone:
    root: Root
    root_id: int
    missing: list[Entry]
    errors: list[tuple[str, str]]


def _scan_thread(
    root: Root,
    root_id: int,
    state_dir: Path,
    deliver: Callable[[list[Candidate]], None],
    *,
    under: str,
    want_missing: bool,
    abort: threading.Event,
) -> _ScanDone:
    """Walk one root (or the subtree `under`) with the one-stat quick check.

    Runs on a worker thread with its own read connection, so a million unchanged files never touch the
    event loop; only candidates (new, changed, or still waiting for a remote file) are handed over.
    """
    with ManifestReader.open_readonly(state_dir) as reader:
        index: QuickIndex = reader.load_quick_index(root_id)
        batch: list[Candidate] = []
        errors: list[tuple[str, str]] = []
        recursive = root.watch.recursive
        ignores_dir = root.rules.ignores_dir
        for result in walk(
            str(root.path),
            under=under,
            ignores_dir=(lambda rel: True) if not recursive else ignores_dir,
            wanted=_file_filter(root),
        ):
            if abort.is_set():
                return _ScanDone(root, root_id, [], errors)
            if result.stat is None:
                errors.append((result.relpath, result.error or "unknown error"))
                continue
            index.mark_seen(result.relpath)
            known = index.get(result.relpath)
            unchanged = known is not None and not needs_hash(known[0], known[1], _statkey(result.stat))
            if unchanged and known is not None and known[1] not in (State.QUEUED, State.UPLOADING):
                continue
            batch.append(Candidate(root, root_id, result.relpath, result.stat))
            if len(batch) >= SCAN_BATCH:
                deliver(batch)
                batch = []
        if batch:
            deliver(batch)
        missing = []
        if want_missing:
            prefix = under.strip("/") + "/" if under.strip("/") else ""
            # A path the walk could not read (or a directory it could not list) is not a deleted one.
            unreadable = tuple(rel + "/" for rel, _ in errors)
            if "/" not in unreadable:
                missing = [
                    e
                    for e in reader.iter_root(root_id)
                    if e.state is not State.DELETED
                    and e.relpath.startswith(prefix)
                    and not index.was_seen(e.relpath)
                    and not (e.relpath + "/").startswith(unreadable)
                ]
    return _ScanDone(root, root_id, missing, errors)


class Pipeline:
    """The stages of one process run, wired together; `sync_once` and the daemon drive it."""

    def __init__(
        self,
        config: Config,
        manifest: Manifest,
        client: FilesClient,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.manifest = manifest
        self.client = client
        self.clock = clock
        self.roots = build_roots(config)
        self.counters = Counters()
        self.hasher = Hasher()
        self.hash_q: asyncio.Queue[Candidate | None] = asyncio.Queue(HASH_QUEUE)
        self.upload_q: asyncio.Queue[UploadJob | None] = asyncio.Queue(config.remote.concurrency * 4)
        self.inflight: dict[tuple[str, str], asyncio.Event] = {}
        self.remote_index: asyncio.Future[RemoteIndex | None] | None = None
        self.unreadable_logged: set[tuple[int, str]] = set()
        # root_id → why the root may not be trusted for deletions (the reconciler's guard), per pass.
        self.unavailable: dict[int, str] = {}
        self.root_by_id: dict[int, Root] = {}
        self.on_changed: Callable[[Root, str], None] = self._count_changed
        # Where scan candidates go: straight to hashing in one pass; the daemon sends fresh files to settle.
        self.route: Callable[[Candidate], Awaitable[None]] = self.hash_q.put
        self.pending: set[FileKey] = set()  # keys waiting in or for the upload stage
        self._last_commit = time.monotonic()
        self._index_made_at = 0.0

    # manifest batching

    def maybe_commit(self) -> None:
        now = time.monotonic()
        if (
            self.manifest.pending_writes >= COMMIT_EVERY_WRITES
            or now - self._last_commit >= COMMIT_EVERY_SECONDS
        ):
            self.manifest.commit()
            self._last_commit = now

    def _count_changed(self, root: Root, relpath: str) -> None:
        self.counters.changed += 1
        log.warning("file is still changing; the next pass picks it up once it settles", path=relpath)

    # roots

    def register_root(self, root: Root) -> tuple[int | None, str | None]:
        """The root's manifest id and, if it may not be trusted for deletions, why."""
        obs = observe_root(
            root.path,
            marker=root.watch.marker,
            keeps=lambda name, is_dir: (
                not (root.rules.ignores_dir(name) if is_dir else root.rules.accepts(name, 0) is not None)
            ),
        )
        if not obs.exists or not obs.is_dir or obs.device is None or obs.inode is None:
            gone = unavailable_reason(obs, None) or "root cannot be read"
            for known in self.manifest.roots():
                if known.path == str(root.path):
                    self.unavailable[known.root_id] = gone
                    self.manifest.set_note(f"root:{root.path}", gone)
            return None, gone
        stored = self.manifest.ensure_root(str(root.path), device=obs.device, inode=obs.inode)
        self.root_by_id[stored.root_id] = root
        record = RootRecord(stored.device, stored.inode, stored.had_files)
        reason = unavailable_reason(obs, record)
        key = f"root:{root.path}"
        if reason is None:
            self.manifest.clear_note(key)
            self.unavailable.pop(stored.root_id, None)
        else:
            self.manifest.set_note(key, reason)
            self.unavailable[stored.root_id] = reason
        self.manifest.commit()
        return stored.root_id, reason

    # stage: scan (source)

    async def scan_root(self, root: Root, *, under: str = "") -> None:
        """Walk a root (or a subtree), route what changed, and mark what is gone (unless the root is held)."""
        root_id, reason = self.register_root(root)
        if reason is not None:
            self.counters.held_roots.append(f"{root.path}: {reason}")
            log.error("root unavailable: nothing in it counts as deleted", root=str(root.path), reason=reason)
        if root_id is None:
            return
        loop = asyncio.get_running_loop()
        abort = threading.Event()

        def deliver(batch: list[Candidate]) -> None:
            future = asyncio.run_coroutine_threadsafe(self._enqueue(batch), loop)
            while not abort.is_set():
                with contextlib.suppress(TimeoutError):
                    future.result(timeout=0.5)
                    return
            future.cancel()

        try:
            done = await asyncio.to_thread(
                _scan_thread,
                root,
                root_id,
                self.config.state_dir,
                deliver,
                under=under,
                want_missing=reason is None,
                abort=abort,
            )
        finally:
            abort.set()
        for relpath, error in done.errors:
            self._log_unreadable(root_id, relpath, error)
        self.apply_missing(done.missing, root.watch.delete_grace_seconds)

    async def _enqueue(self, batch: list[Candidate]) -> None:
        self.counters.scanned += len(batch)
        if self.remote_index is None and self.counters.scanned >= PREFETCH_LISTING_MIN:
            self.remote_index = asyncio.ensure_future(self._prefetch_listing())
            self._index_made_at = time.monotonic()
        for cand in batch:
            await self.route(cand)

    def apply_missing(self, rows: list[Entry], grace: float) -> None:
        now = self.clock()
        for entry in rows:
            action = on_missing(entry, now, grace)
            if isinstance(action, Keep):
                continue
            if isinstance(action, MarkMissing):
                self.manifest.mark_missing(entry.key, action.since)
                continue
            # Re-stat before acting: the scan's snapshot may predate a file that came back.
            if stat_path(self._abs_from_key(entry.key)) is not None:
                self.manifest.clear_missing(entry.key)
                continue
            if isinstance(action, MarkDeleted):
                self.manifest.mark_deleted(entry.key)
                self.counters.deleted += 1
                log.info("deleted locally", path=entry.relpath, remote_id=entry.remote_id)
            elif isinstance(action, Forget):
                self.manifest.remove(entry.key)
        self.maybe_commit()

    def _abs_from_key(self, key: FileKey) -> str:
        for stored in self.manifest.roots():
            if stored.root_id == key.root_id:
                return os.path.join(stored.path, key.relpath)
        return ""

    async def _prefetch_listing(self) -> RemoteIndex | None:
        """One paginated listing instead of one hash lookup per file, if the listing carries md5.

        Gives up (per-file lookups) when the remote holds far more files than this pass has new ones.
        """
        index: dict[tuple[str, str], FileResponse] = {}
        skip = pages = 0
        try:
            while pages <= max(2, int(self.counters.scanned * LISTING_PAGES_PER_FILE)):
                pages += 1
                page = await self.client.list_page(skip=skip, limit=1000)
                for item in page:
                    if item.md5 is None:
                        return None  # the public API's shape: fall back to per-file lookups
                    index.setdefault((item.md5, item.purpose), item)  # newest first: keep the first
                if len(page) < 1000:
                    return index
                skip += len(page)
        except ApiError as exc:
            log.info("listing for the initial sync failed; using per-file lookups", error=exc.detail)
        return None

    # stage: hash

    async def hash_worker(self) -> None:
        while (cand := await self.hash_q.get()) is not None:
            await self._hash_one(cand)
            self.maybe_commit()

    async def _hash_one(self, cand: Candidate) -> None:
        key = FileKey(cand.root_id, cand.relpath)
        entry = self.manifest.get(key)
        seen = _statkey(cand.stat)
        if entry is not None and not needs_hash(entry.stat, entry.state, seen):
            if entry.missing_since is not None:
                self.manifest.clear_missing(key)
            if entry.state in (State.QUEUED, State.UPLOADING) and self._due(entry):
                await self._submit(self._job(cand, entry.md5, entry.purpose, entry))
            else:
                self.counters.unchanged += 1
            return
        path = str(cand.root.path / cand.relpath)
        result = await self.hasher.hash(path, cand.stat)
        if isinstance(result, Changed):
            self.on_changed(cand.root, cand.relpath)
            return
        if isinstance(result, Vanished):
            return
        if isinstance(result, Unreadable):
            self.counters.unreadable += 1
            self._log_unreadable(cand.root_id, cand.relpath, result.reason)
            return
        assert isinstance(result, Digest)
        self.counters.hashed += 1
        purpose = cand.root.rules.purpose_for(cand.relpath)
        stat = _statkey(result.stat)
        action = after_hash(entry, seen=stat, xxh3=result.xxh3, md5=result.md5, purpose=purpose)
        if isinstance(action, NeedRemote):
            self.manifest.mark_queued(key, xxh3=result.xxh3, md5=result.md5, purpose=purpose, stat=stat)
            await self._submit(
                self._job(
                    Candidate(cand.root, cand.root_id, cand.relpath, result.stat), result.md5, purpose, None
                )
            )
            return
        if isinstance(action, Restat):
            self.manifest.update_stat(key, action.stat)
        elif entry is not None and entry.missing_since is not None:
            self.manifest.clear_missing(key)
        self.counters.unchanged += 1

    async def _submit(self, job: UploadJob) -> None:
        if job.key not in self.pending:
            self.pending.add(job.key)
            await self.upload_q.put(job)

    def _due(self, entry: Entry) -> bool:
        return entry.next_attempt_at is None or entry.next_attempt_at <= self.clock()

    @staticmethod
    def _job(cand: Candidate, md5: str, purpose: str, entry: Entry | None) -> UploadJob:
        intent = entry.updated_at if entry is not None and entry.state is State.UPLOADING else None
        return UploadJob(
            FileKey(cand.root_id, cand.relpath),
            cand.root.path / cand.relpath,
            md5,
            purpose,
            _statkey(cand.stat),
            intent,
        )

    def _log_unreadable(self, root_id: int, relpath: str, reason: str) -> None:
        if (root_id, relpath) not in self.unreadable_logged:
            self.unreadable_logged.add((root_id, relpath))
            log.error("cannot read; skipping until it changes", path=relpath, reason=reason)

    # stage: upload

    async def upload_worker(self) -> None:
        while (job := await self.upload_q.get()) is not None:
            try:
                await self._upload_one(job)
            finally:
                self.pending.discard(job.key)
            self.maybe_commit()

    async def _upload_one(self, job: UploadJob) -> None:
        slot = (job.md5, job.purpose)
        while (busy := self.inflight.get(slot)) is not None:
            # Same content at another path is being resolved: wait, then reuse its remote file.
            await busy.wait()
        current = self.manifest.get(job.key)
        if current is None or current.state not in (State.QUEUED, State.UPLOADING) or current.md5 != job.md5:
            return  # another job for this path got there first, or the content moved on
        done = self.inflight[slot] = asyncio.Event()
        try:
            index = await self.remote_index if self._index_fresh() and self.remote_index else None
            outcome = await sync_job(
                job, manifest=self.manifest, client=self.client, clock=self.clock, remote_index=index
            )
        finally:
            del self.inflight[slot]
            done.set()
        self._count(outcome, job)

    def _index_fresh(self) -> bool:
        """The initial-sync listing stands in for lookups only briefly: remote files come and go."""
        return time.monotonic() - self._index_made_at < INDEX_TTL_SECONDS

    def _count(self, outcome: Outcome, job: UploadJob) -> None:
        c = self.counters
        if outcome is Outcome.UPLOADED:
            c.uploaded += 1
            c.bytes_uploaded += job.stat.size
        elif outcome is Outcome.REUSED:
            c.reused += 1
        elif outcome is Outcome.FAILED:
            c.failed += 1
        elif outcome is Outcome.RETRY:
            c.retry += 1
        elif outcome is Outcome.CHANGED and (root := self.root_by_id.get(job.key.root_id)) is not None:
            self.on_changed(root, job.key.relpath)

    # recovery

    def recovery_candidates(self) -> Iterator[Candidate]:
        """Rows left `queued` or `uploading` (a crash, a retry due): back through the quick check."""
        by_id = {s.root_id: s for s in self.manifest.roots()}
        roots = {str(r.path): r for r in self.roots}
        for state in (State.UPLOADING, State.QUEUED):
            for entry in list(self.manifest.in_state(state)):
                stored = by_id.get(entry.root_id)
                root = roots.get(stored.path) if stored is not None else None
                if root is None or not self._due(entry):
                    continue
                st = stat_path(str(root.path / entry.relpath))
                if isinstance(st, FileStat):
                    yield Candidate(root, entry.root_id, entry.relpath, st)

    async def run_stages(self, sources: Callable[[], Awaitable[None]]) -> None:
        """Run hashers and uploaders until `sources` finished and everything drained."""
        hashers = [asyncio.create_task(self.hash_worker()) for _ in range(self.hasher.workers)]
        uploaders = [asyncio.create_task(self.upload_worker()) for _ in range(self.config.remote.concurrency)]
        try:
            await sources()
            for _ in hashers:
                await self.hash_q.put(None)
            await asyncio.gather(*hashers)
            for _ in uploaders:
                await self.upload_q.put(None)
            await asyncio.gather(*uploaders)
        finally:
            for task in (*hashers, *uploaders):
                task.cancel()
            await asyncio.gather(*hashers, *uploaders, return_exceptions=True)
            if self.remote_index is not None:
                self.remote_index.cancel()
            self.manifest.commit()

    def close(self) -> None:
        self.hasher.close()
        self.manifest.commit()


# one-shot commands


def _api_key(config: Config) -> str:
    if config.api_key is None:
        raise ConfigError(
            f"{config.source}: no API key: set VLMRUN_API_KEY, remote.api_key_file, or a systemd credential "
            "api-key (or use `syncd run --embedded`)"
        )
    return config.api_key.get_secret_value()


def _client(config: Config, base_url: str, api_key: str) -> FilesClient:
    r = config.remote
    return FilesClient(
        base_url=base_url,
        api_key=api_key,
        timeout=r.timeout,
        retries=r.retries,
        concurrency=r.concurrency,
        presigned_threshold=r.presigned_threshold,
    )


def _configure_logging(config: Config, extra_secrets: tuple[str, ...] = ()) -> None:
    secrets_ = tuple(s for s in (config.api_key.get_secret_value() if config.api_key else None,) if s)
    logs.configure(fmt=config.log.format, level=config.log.level, secrets=secrets_ + extra_secrets)


async def sync_pass(pipe: Pipeline) -> None:
    async def sources() -> None:
        # The scan meets every file, rows left queued or uploading included (their stat is unchanged,
        # so they skip hashing and go straight to the uploader, which resolves them by md5 first).
        for root in pipe.roots:
            await pipe.scan_root(root)

    await pipe.run_stages(sources)


def _summary_code(pipe: Pipeline) -> int:
    counts = pipe.manifest.counts_by_state()
    c = pipe.counters
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
        **{f"rows_{k.value}": v for k, v in counts.items() if v},
    )
    problems = (
        counts[State.FAILED] + counts[State.QUEUED] + counts[State.UPLOADING] + c.changed + c.unreadable
    )
    if problems:
        for entry in pipe.manifest.last_errors(10):
            if entry.state in (State.FAILED, State.QUEUED):
                log.error("not synced", path=entry.relpath, state=entry.state.value, error=entry.last_error)
    return 1 if problems or c.held_roots else 0


def sync_once(config: Config, *, progress: bool) -> int:
    """`syncd sync --once`: one pass; 0 when every file is synced, 1 with a summary otherwise."""
    _configure_logging(config)
    api_key = _api_key(config)
    with StateLock(config.state_dir) as lock:
        manifest = Manifest.open(lock)
        try:
            return asyncio.run(
                _run_once(config, manifest, config.remote.base_url, api_key, progress=progress)
            )
        finally:
            manifest.close()


async def _run_once(
    config: Config, manifest: Manifest, base_url: str, api_key: str, *, progress: bool
) -> int:
    async with _client(config, base_url, api_key) as client:
        pipe = Pipeline(config, manifest, client)
        try:
            if progress:
                from syncd.progress import show_progress

                async with show_progress(pipe.counters):
                    await sync_pass(pipe)
            else:
                await sync_pass(pipe)
            return _summary_code(pipe)
        finally:
            pipe.close()


def reconcile_once(config: Config, *, dry_run: bool, confirm: bool) -> int:
    raise ConfigError("reconcile is not implemented yet")


# the daemon

HINT_QUEUE = 10_000  # watcher → settle; when full the watcher asks for a rescan instead of blocking
SETTLED_QUEUE = 1024
RETRY_SWEEP_SECONDS = 10.0  # how often rows waiting for a retry are looked at
STATUS_SECONDS = 10.0
MIN_QUIET_SECONDS = 0.05  # settle_seconds = 0 still debounces a burst of events for one file


def _embedded_key(state_dir: Path) -> str:
    """A random key for the embedded server, kept (0600) so SDK users on this machine can reuse it."""
    path = state_dir / "embedded-api-key"
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        key = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(key + "\n")
        return key


@contextlib.contextmanager
def _remote(config: Config, state_dir: Path, *, embedded: bool) -> Iterator[tuple[str, str]]:
    """(base_url, api_key): the configured service, or a reference server on loopback in this process."""
    if not embedded:
        yield config.remote.base_url, _api_key(config)
        return
    from syncd.server import ServerSettings, running_server

    url = urlsplit(config.remote.base_url)
    host = url.hostname or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        host = "127.0.0.1"  # embedded means loopback only, whatever base_url says
    settings = ServerSettings(
        data_dir=state_dir / "server", api_key=_embedded_key(state_dir), host=host, port=url.port or 8000
    )
    try:
        with running_server(settings) as server:
            log.info(
                "embedded reference server",
                base_url=server.base_url,
                api_key_file=str(state_dir / "embedded-api-key"),
            )
            yield server.base_url, server.api_key
    except OSError as exc:
        raise ConfigError(
            f"{config.source}: remote.base_url: cannot start the embedded server on "
            f"{host}:{url.port or 8000}: {exc.strerror or exc} (pick a free port)"
        ) from None


def run_daemon(config: Config, *, embedded: bool) -> int:
    """`syncd run`: watch, settle, hash, upload, reconcile until SIGTERM; SIGHUP reloads the config."""
    _configure_logging(config)
    if not config.watch:
        raise ConfigError(f"{config.source}: watch: no [[watch]] table: nothing to sync")
    state_dir = config.state_dir
    with StateLock(state_dir) as lock, _remote(config, state_dir, embedded=embedded) as (base_url, key):
        _configure_logging(config, (key,))
        manifest = Manifest.open(lock)
        try:
            return asyncio.run(_daemon(config, manifest, base_url, key, embedded=embedded))
        finally:
            manifest.close()


async def _daemon(config: Config, manifest: Manifest, base_url: str, api_key: str, *, embedded: bool) -> int:
    loop = asyncio.get_running_loop()
    notifier = Notifier()
    stop = asyncio.Event()
    reload = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload.set)
    pinger = asyncio.create_task(_watchdog(notifier))
    try:
        while True:
            reload.clear()
            async with _client(config, base_url, api_key) as client:
                await _run_pipeline(config, manifest, client, notifier=notifier, stop=stop, reload=reload)
            if stop.is_set():
                break
            config = _reloaded(config, embedded=embedded)
            _configure_logging(config, (api_key,))
            notifier.reloading()
    finally:
        notifier.stopping()
        pinger.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return 0


def _reloaded(old: Config, *, embedded: bool) -> Config:
    """The config re-read on SIGHUP; on any error the old one stays in force (never a crash loop)."""
    try:
        new = load_config(old.source)
        if new.state_dir != old.state_dir:
            raise ConfigError(
                f"{old.source}: state.dir: changing it needs a restart (keeping {old.state_dir})"
            )
        if not embedded:
            _api_key(new)
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


async def _run_pipeline(
    config: Config,
    manifest: Manifest,
    client: FilesClient,
    *,
    notifier: Notifier,
    stop: asyncio.Event,
    reload: asyncio.Event,
) -> None:
    """Wire the stages for one config; return once `stop` or `reload` is set and the stages drained."""
    from syncd.settle import Aggregator, Gone, PathHint, Ready, Rescan, Settled, StatFailed, settle_stage
    from syncd.watch import InotifyLimitError, Watcher, WatchRoot

    loop = asyncio.get_running_loop()
    pipe = Pipeline(config, manifest, client)
    hints: asyncio.Queue[PathHint] = asyncio.Queue(HINT_QUEUE)
    settled: asyncio.Queue[Settled] = asyncio.Queue(SETTLED_QUEUE)
    roots = pipe.roots
    aggregator = Aggregator(
        {r.index: max(r.watch.settle_seconds, MIN_QUIET_SECONDS) for r in roots},
        max(r.watch.settle_max_seconds for r in roots),
    )
    halt = asyncio.Event()  # stop or reload: the sources end, the stages drain

    def settle_stat(root_index: int, relpath: str) -> FileStat | StatError | None:
        return stat_path(str(roots[root_index].path / relpath))

    def changed(root: Root, relpath: str) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            hints.put_nowait(PathHint(root.index, relpath, "modified"))

    async def route(cand: Candidate) -> None:
        """Scan finds: files quiet for settle_seconds go straight to hashing; fresher ones settle first."""
        age = pipe.clock() - cand.stat.mtime_ns / 1e9
        if age >= cand.root.watch.settle_seconds:
            await pipe.hash_q.put(cand)
        else:
            await hints.put(PathHint(cand.root.index, cand.relpath, "scanned", cand.stat))

    pipe.on_changed = changed
    pipe.route = route

    async def router() -> None:
        """Settled paths: ready files to hashing, gone ones marked missing, rescans walked."""
        while True:
            item = await settled.get()
            root = roots[item.root_index]
            if isinstance(item, Ready):
                root_id = _root_id(pipe, root)
                if root_id is not None:
                    await pipe.hash_q.put(Candidate(root, root_id, item.relpath, item.stat))
            elif isinstance(item, Gone):
                root_id = _root_id(pipe, root)
                if root_id is not None and pipe.manifest.get(FileKey(root_id, item.relpath)) is not None:
                    pipe.manifest.mark_missing(FileKey(root_id, item.relpath), pipe.clock())
                    pipe.maybe_commit()
            elif isinstance(item, Rescan):
                await pipe.scan_root(root, under=item.relpath)
            elif isinstance(item, StatFailed):
                pipe._log_unreadable(_root_id(pipe, root) or -1, item.relpath, item.error)

    rescan_now = [asyncio.Event() for _ in roots]

    async def rescans(root: Root) -> None:
        """The startup scan, then a full rescan every rescan_interval or when the watcher lost events."""
        wake = rescan_now[root.index]
        while not halt.is_set():
            wake.clear()
            await pipe.scan_root(root)
            await _sleep_or(wake, root.watch.rescan_interval)

    async def sweeper() -> None:
        """Rows due for a retry go back through the quick check; missing rows past grace become deleted."""
        while not halt.is_set():
            await _sleep_or(halt, RETRY_SWEEP_SECONDS)
            for cand in list(pipe.recovery_candidates()):
                if FileKey(cand.root_id, cand.relpath) not in pipe.pending:
                    await pipe.hash_q.put(cand)
            for root in roots:
                root_id, reason = pipe.register_root(root)
                if root_id is not None and reason is None:
                    pipe.apply_missing(pipe.manifest.missing_rows(root_id), root.watch.delete_grace_seconds)

    async def committer() -> None:
        """Writes never wait longer than COMMIT_EVERY_SECONDS to become durable and visible to `status`."""
        while not halt.is_set():
            await _sleep_or(halt, COMMIT_EVERY_SECONDS)
            if pipe.manifest.pending_writes:
                pipe.manifest.commit()

    async def status() -> None:
        while not halt.is_set():
            counts = pipe.manifest.counts_by_state()
            notifier.status(", ".join(f"{n} {s.value}" for s, n in counts.items() if n) or "idle")
            await _sleep_or(halt, STATUS_SECONDS)

    def lost_events(root_index: int) -> None:
        log.warning("watcher lost events; rescanning", root=str(roots[root_index].path))
        rescan_now[root_index].set()

    watcher = Watcher(
        [
            WatchRoot(str(r.path), r.watch.mode, r.watch.recursive, r.rules.ignores_dir, _file_filter(r))
            for r in roots
        ],
        loop=loop,
        hints=hints,
        request_rescan=lost_events,
    )
    stages = [
        asyncio.create_task(
            settle_stage(
                hints, settled, aggregator=aggregator, stat=settle_stat, clock=time.monotonic, stop=halt
            )
        ),
        asyncio.create_task(router()),
    ]
    hashers = [asyncio.create_task(pipe.hash_worker()) for _ in range(pipe.hasher.workers)]
    uploaders = [asyncio.create_task(pipe.upload_worker()) for _ in range(config.remote.concurrency)]
    try:
        await asyncio.to_thread(watcher.start)
    except InotifyLimitError as exc:
        halt.set()
        for task in (*stages, *hashers, *uploaders):
            task.cancel()
        pipe.close()
        raise ConfigError(f'{config.source}: watch.mode = "inotify": {exc}') from None
    sources = [asyncio.create_task(rescans(r)) for r in roots]
    sources += [asyncio.create_task(t()) for t in (sweeper, status, committer)]
    notifier.ready(f"watching {len(roots)} folder(s)")
    log.info("watching", roots=[str(r.path) for r in roots])
    try:
        stopper = asyncio.create_task(stop.wait())
        reloader = asyncio.create_task(reload.wait())
        await asyncio.wait({stopper, reloader, *stages, *sources}, return_when=asyncio.FIRST_COMPLETED)
        for task in (*stages, *sources):
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        stopper.cancel()
        reloader.cancel()
    finally:
        halt.set()
        notifier.stopping() if stop.is_set() else None
        await asyncio.to_thread(watcher.stop)
        for task in (*sources, *stages, *hashers):
            task.cancel()
        await asyncio.gather(*sources, *stages, *hashers, return_exceptions=True)
        await _drain_uploads(pipe, uploaders)
        pipe.close()


async def _drain_uploads(pipe: Pipeline, uploaders: list[asyncio.Task[None]]) -> None:
    """Let in-flight uploads finish (bounded); queued ones stay `queued` and resume at the next start."""
    while not pipe.upload_q.empty():
        pipe.upload_q.get_nowait()
    for _ in uploaders:
        pipe.upload_q.put_nowait(None)
    _done, pending = await asyncio.wait(uploaders, timeout=DRAIN_SECONDS)
    for task in pending:
        task.cancel()
    await asyncio.gather(*uploaders, return_exceptions=True)
    if pending:
        log.warning(
            "stopped before in-flight uploads finished; they resume by md5 lookup at next start",
            uploads=len(pending),
        )


def _root_id(pipe: Pipeline, root: Root) -> int | None:
    for root_id, known in pipe.root_by_id.items():
        if known is root:
            return root_id
    return None


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
