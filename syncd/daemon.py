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
    SETTLED,
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
    MarkDeleted,
    MarkMissing,
    NeedRemote,
    Restat,
    after_hash,
    needs_hash,
    on_missing,
    retry_delay,
)
from syncd.roots import RootRecord, kept_by, observe_root, unavailable_reason
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
UPLOAD_FLOOR_BYTES_PER_SECOND = 1 << 20  # the client's per-attempt deadline assumes at least 1 MiB/s
MAX_BACKOFF_SECONDS = 120.0  # the client's longest wait between attempts (honoured Retry-After included)


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
    walk_errors: int = 0
    crashed: int = 0  # jobs that hit a bug; logged with a traceback, the row retried later
    held_roots: dict[str, str] = field(default_factory=dict)  # root path → why it is not synced now


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
    """The files of a root that are synced: what the rules accept, never the root's marker file."""
    accepts = root.rules.accepts
    marker = root.watch.marker
    return lambda relpath, size: relpath != marker and accepts(relpath, size) is None


@dataclass(frozen=True, slots=True)
class _ScanDone:
    root: Root
    root_id: int
    missing: list[Entry]  # rows whose path the walk did not meet
    returned: list[FileKey]  # rows marked missing earlier whose path is there again
    repurposed: list[Entry]  # unchanged files whose rules now give another purpose
    errors: list[tuple[str, str]]


def _scan_thread(
    root: Root,
    root_id: int,
    state_dir: Path,
    deliver: Callable[[list[Candidate]], None],
    *,
    under: str,
    want_missing: bool,
    rules_changed: bool,
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
        seen_unchanged = index.seen_unchanged

        def known(relpath: str, st: os.stat_result) -> bool:
            """Unchanged and settled: one stat, nothing else (design §3 quick check).

            Once `abort` is set, answers False: the file is yielded and the loop below stops the walk.
            """
            state = seen_unchanged(relpath, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            return state in SETTLED and not abort.is_set()

        # With unchanged rules, a file the manifest knows unchanged was accepted before and still is: the
        # globs run only for new or changed files (measured: a quarter of a no-change pass's cost).
        accepted = _file_filter(root)
        for result in walk(
            str(root.path),
            under=under,
            ignores_dir=(lambda rel: True) if not recursive else ignores_dir,
            wanted=accepted if rules_changed else None,
            known=known,
        ):
            if abort.is_set():
                return _ScanDone(root, root_id, [], [], [], errors)
            if result.stat is None:
                errors.append((result.relpath, result.error or "unknown error"))
                continue
            if not rules_changed and not accepted(result.relpath, result.stat.size):
                continue
            batch.append(Candidate(root, root_id, result.relpath, result.stat))
            if len(batch) >= SCAN_BATCH:
                deliver(batch)
                batch = []
        if batch:
            deliver(batch)
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        # A path the walk could not read (or a directory it could not list) is not a deleted one.
        unreadable = tuple(rel + "/" for rel, _ in errors)
        want_missing = want_missing and "/" not in unreadable
        purpose_for = root.rules.purpose_for

        def wanted(relpath: str) -> bool:
            """A file the rules now exclude was not deleted: its remote copy stays (rclone keeps excluded
            files unless --delete-excluded; Syncthing never deletes for an ignore pattern)."""
            return (recursive or "/" not in relpath) and root.rules.accepts(relpath, 0) is None

        missing: list[str] = []
        repurposed: list[str] = []
        returned = [
            e.relpath
            for e in reader.missing_rows(root_id)
            if e.relpath.startswith(prefix) and index.was_seen(e.relpath)
        ]
        # A million-row root costs a full pass over its rows only when something can be found there.
        if rules_changed or not index.all_seen():
            for relpath, state, purpose, _ in reader.iter_root_brief(root_id):
                if state is State.DELETED or not relpath.startswith(prefix):
                    continue
                if index.was_seen(relpath):
                    if rules_changed and state in SETTLED and purpose != purpose_for(relpath):
                        repurposed.append(relpath)
                elif want_missing and not (relpath + "/").startswith(unreadable) and wanted(relpath):
                    missing.append(relpath)

        def rows(relpaths: list[str]) -> list[Entry]:
            found = (reader.get(FileKey(root_id, rel)) for rel in relpaths)
            return [e for e in found if e is not None]

        return _ScanDone(
            root,
            root_id,
            rows(missing),
            [FileKey(root_id, rel) for rel in returned],
            rows(repurposed),
            errors,
        )


class Pipeline:
    """The stages of one process run, wired together; `sync_once` and the daemon drive it."""

    def __init__(
        self,
        config: Config,
        manifest: Manifest,
        client: FilesClient,
        *,
        clock: Callable[[], float] = time.time,
        one_shot: bool = True,
        confirm_roots: bool = False,
    ) -> None:
        self.config = config
        # One pass retries every waiting row now (the user asked); the daemon honours each row's backoff.
        self.one_shot = one_shot
        # `reconcile --once --confirm`: accept a root's new identity, or its emptiness, as intended.
        self.confirm_roots = confirm_roots
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
        self.root_ids: dict[int, int] = {}  # Root.index → manifest root_id, the reverse of root_by_id
        self._noted: dict[str, str | None] = {}  # status notes as last written by this process
        self.on_changed: Callable[[Root, str], None] = self._count_changed
        # Where scan candidates go: straight to hashing in one pass; the daemon sends fresh files to settle.
        self.route: Callable[[Candidate], Awaitable[None]] = self.hash_q.put
        self.pending: set[FileKey] = set()  # keys waiting in or for the upload stage
        self.hashing: set[FileKey] = set()  # keys a hash worker is on
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

    async def register_root(self, root: Root) -> tuple[int | None, str | None]:
        """The root's manifest id (None: not usable now) and, if it may not be trusted, why.

        An unavailable root is not scanned at all (Syncthing stops a folder whose marker is gone): its
        files are neither uploaded nor counted as deleted, and `status` shows the reason.
        """
        obs = await asyncio.to_thread(
            observe_root, root.path, marker=root.watch.marker, keeps=kept_by(root.rules)
        )
        key = f"root:{root.path}"
        known = next((r for r in self.manifest.roots() if r.path == str(root.path)), None)
        if obs.device is None or obs.inode is None or obs.marker_present is False or not obs.is_dir:
            # Never record the identity of what may be an empty mount point.
            absent = unavailable_reason(obs, None) or "root cannot be read"
            if known is not None:
                self.unavailable[known.root_id] = absent
            self._note(key, absent)
            return None, absent
        stored = known or self.manifest.ensure_root(str(root.path), device=obs.device, inode=obs.inode)
        self.root_by_id[stored.root_id] = root
        self.root_ids[root.index] = stored.root_id
        record = RootRecord(stored.device, stored.inode, stored.had_files)
        reason = unavailable_reason(obs, record)
        if reason is not None and self.confirm_roots:
            log.warning("accepting the root as it is now (--confirm)", root=str(root.path), was=reason)
            self.manifest.set_root_identity(stored.root_id, device=obs.device, inode=obs.inode)
            reason = unavailable_reason(obs, RootRecord(obs.device, obs.inode, had_files=False))
        if reason is None:
            self.unavailable.pop(stored.root_id, None)
        else:
            self.unavailable[stored.root_id] = reason
        self._note(key, reason)
        return (stored.root_id if reason is None else None), reason

    def _note(self, key: str, text: str | None) -> None:
        """Set or clear a `status` note, writing (and committing) only when it changes: an idle daemon
        re-checks its roots every few seconds and must not write to the manifest each time."""
        if key in self._noted and self._noted[key] == text:
            return
        if text is None:
            self.manifest.clear_note(key)
        else:
            self.manifest.set_note(key, text)
        self.manifest.commit()
        self._noted[key] = text

    # stage: scan (source)

    async def scan_root(self, root: Root, *, under: str = "") -> None:
        """Walk a root (or a subtree), route what changed, and mark what is gone (unless the root is held)."""
        root_id, reason = await self.register_root(root)
        if reason is not None:
            if self.counters.held_roots.get(str(root.path)) != reason:
                log.error("root unavailable: not syncing it", root=str(root.path), reason=reason)
            self.counters.held_roots[str(root.path)] = reason
            return
        self.counters.held_roots.pop(str(root.path), None)
        assert root_id is not None
        loop = asyncio.get_running_loop()
        abort = threading.Event()

        def deliver(batch: list[Candidate]) -> None:
            future = asyncio.run_coroutine_threadsafe(self._enqueue(batch), loop)
            while not abort.is_set():
                with contextlib.suppress(TimeoutError):
                    future.result(timeout=0.5)
                    return
            future.cancel()

        rules_key = f"rules:{root_id}"
        fingerprint = (
            f"{root.rules.fingerprint} marker={root.watch.marker!r} recursive={root.watch.recursive}"
        )
        self.manifest.commit()  # the walker's own connection must see every row written so far
        try:
            done = await asyncio.to_thread(
                _scan_thread,
                root,
                root_id,
                self.config.state_dir,
                deliver,
                under=under,
                want_missing=True,
                rules_changed=self.manifest.meta(rules_key) != fingerprint,
                abort=abort,
            )
        finally:
            abort.set()
        log.debug(
            "scan done",
            root=str(root.path),
            under=under,
            candidates=self.counters.scanned,
            missing=len(done.missing),
            errors=len(done.errors),
        )
        self.counters.walk_errors += len(done.errors)
        for relpath, error in done.errors:
            self._log_unreadable(root_id, relpath, error)
        for key in done.returned:
            self.manifest.clear_missing(key)
        for entry in done.repurposed:
            await self._repurpose(root, entry)
        await self.apply_missing(done.missing, root.watch.delete_grace_seconds)
        if not under and not done.errors:
            # Only once every row was checked against these rules (and re-queued where needed): a crash
            # or an unreadable directory before this point means the next scan checks them again.
            self.manifest.set_meta(rules_key, fingerprint)

    async def _repurpose(self, root: Root, entry: Entry) -> None:
        """The rules now give an unchanged file another purpose: it needs a remote file with that one."""
        purpose = root.rules.purpose_for(entry.relpath)
        self.manifest.mark_queued(entry.key, xxh3=entry.xxh3, md5=entry.md5, purpose=purpose, stat=entry.stat)
        log.info("purpose changed", path=entry.relpath, was=entry.purpose, now=purpose)
        await self._submit(UploadJob(entry.key, root.path / entry.relpath, entry.md5, purpose, entry.stat))

    async def _enqueue(self, batch: list[Candidate]) -> None:
        self.counters.scanned += len(batch)
        if self.remote_index is None and self.counters.scanned >= PREFETCH_LISTING_MIN:
            self.remote_index = asyncio.ensure_future(self._prefetch_listing())
            self._index_made_at = time.monotonic()
        for cand in batch:
            await self.route(cand)

    async def apply_missing(self, rows: list[Entry], grace: float) -> None:
        """Rows whose path was not found: remember since when; past the grace period, deleted."""
        now = self.clock()
        due = {e.key for e in rows if isinstance(on_missing(e, now, grace), MarkDeleted | Forget)}
        # Re-stat off the loop before acting: the scan's snapshot may predate a file that came back.
        present = await asyncio.to_thread(lambda: {k for k in due if stat_path(self._abs(k)) is not None})
        for snapshot in rows:
            entry = self.manifest.get(snapshot.key)  # the row as it is now, not as the scan saw it
            if entry is None:
                continue
            if entry.key in present:
                self.manifest.clear_missing(entry.key)
                continue
            action = on_missing(entry, now, grace)
            if isinstance(action, MarkMissing):
                self.manifest.mark_missing(entry.key, action.since)
            elif isinstance(action, MarkDeleted) and entry.key in due:
                self.manifest.mark_deleted(entry.key)
                self.counters.deleted += 1
                log.info("deleted locally", path=entry.relpath, remote_id=entry.remote_id)
            elif isinstance(action, Forget) and entry.key in due:
                self.manifest.remove(entry.key)
        self.maybe_commit()

    def _abs(self, key: FileKey) -> str:
        root = self.root_by_id.get(key.root_id)
        return str(root.path / key.relpath) if root is not None else ""

    async def _prefetch_listing(self) -> RemoteIndex | None:
        """One paginated listing instead of one hash lookup per file, if the listing carries md5.

        Gives up (per-file lookups) when the remote holds far more files than this pass has new ones.
        """
        index: dict[tuple[str, str], FileResponse] = {}
        listed = 0
        try:
            async for item in self.client.iter_all():
                if item.md5 is None:
                    return None  # the public API's shape: fall back to per-file lookups
                index.setdefault((item.md5, item.purpose), item)  # newest first: keep the first
                listed += 1
                if listed > max(2, self.counters.scanned * LISTING_PAGES_PER_FILE) * 1000:
                    return None  # far more remote files than new local ones: lookups are cheaper
        except ApiError as exc:
            log.info("listing for the initial sync failed; using per-file lookups", error=exc.detail)
            return None
        return index

    # stage: hash

    async def hash_worker(self) -> None:
        while (cand := await self.hash_q.get()) is not None:
            key = FileKey(cand.root_id, cand.relpath)
            if key in self.hashing:
                continue  # another worker is on it; its result covers this hint too
            self.hashing.add(key)
            try:
                await self._hash_one(cand, key)
            except Exception:
                # A bug must not silently kill a stage: log it, count it, and keep the worker alive.
                self.counters.crashed += 1
                log.exception("hashing failed unexpectedly", path=cand.relpath)
            finally:
                self.hashing.discard(key)
            self.maybe_commit()

    async def _hash_one(self, cand: Candidate, key: FileKey) -> None:
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
        self.unreadable_logged.discard((cand.root_id, cand.relpath))  # readable again: log a relapse
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
        return self.one_shot or entry.next_attempt_at is None or entry.next_attempt_at <= self.clock()

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
            except Exception as exc:
                self.counters.crashed += 1
                log.exception("upload failed unexpectedly; will retry", path=job.key.relpath)
                self._retry_later(job, f"internal error: {exc!r}")
            finally:
                self.pending.discard(job.key)
            self.maybe_commit()

    def _retry_later(self, job: UploadJob, error: str) -> None:
        row = self.manifest.get(job.key)
        if row is not None and row.state in (State.QUEUED, State.UPLOADING) and row.md5 == job.md5:
            when = self.clock() + retry_delay(row.attempts)
            # An `uploading` row keeps its intent: the request may have gone out and landed.
            retry = (
                self.manifest.mark_upload_retry if row.state is State.UPLOADING else self.manifest.mark_retry
            )
            retry(job.key, md5=job.md5, error=error, next_attempt_at=when)

    async def _upload_one(self, job: UploadJob) -> None:
        slot = (job.md5, job.purpose)
        while (busy := self.inflight.get(slot)) is not None:
            # Same content at another path is being resolved: wait, then reuse its remote file.
            await busy.wait()
        current = self.manifest.get(job.key)
        if (
            current is None
            or current.state not in (State.QUEUED, State.UPLOADING)
            or (current.md5, current.purpose) != (job.md5, job.purpose)
        ):
            return  # another job for this path got there first, or the content or purpose moved on
        done = self.inflight[slot] = asyncio.Event()
        try:
            index = await self.remote_index if self._index_fresh() and self.remote_index else None
            outcome = await sync_job(
                job,
                manifest=self.manifest,
                client=self.client,
                clock=self.clock,
                remote_index=index,
                intent_window=self._upload_window(job.stat.size),
            )
        finally:
            del self.inflight[slot]
            done.set()
        self._count(outcome, job)

    def _upload_window(self, size: int) -> float:
        """The longest one upload can take, all attempts and backoffs included (bounds recovery claims)."""
        remote = self.config.remote
        per_attempt = remote.timeout + size / UPLOAD_FLOOR_BYTES_PER_SECOND
        return (per_attempt + MAX_BACKOFF_SECONDS) * (remote.retries + 1)

    def forget_listing(self) -> None:
        """A reconcile may delete remote files: the initial-sync listing no longer stands for the remote."""
        self._index_made_at = float("-inf")

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

    async def recovery_candidates(self) -> list[Candidate]:
        """Rows left `queued` or `uploading` (a crash, a retry due): back through the quick check.

        A row left `uploading` whose file is gone is still resolved by md5 (its upload may have landed);
        afterwards the missing-file rules decide what becomes of it.
        """
        rows = [
            e
            for state in (State.UPLOADING, State.QUEUED)
            for e in self.manifest.in_state(state)
            if e.root_id in self.root_by_id and e.key not in self.pending and self._due(e)
        ]
        stats = await asyncio.to_thread(lambda: [stat_path(self._abs(e.key)) for e in rows])
        found = []
        for entry, st in zip(rows, stats, strict=True):
            if isinstance(st, FileStat):
                found.append(Candidate(self.root_by_id[entry.root_id], entry.root_id, entry.relpath, st))
            elif st is None and entry.state is State.UPLOADING:
                # Resolve the intent by md5 even though the file is gone: a copy that landed becomes an
                # owned, prunable file; on a miss the upload fails to open the file and the row is queued.
                path = self.root_by_id[entry.root_id].path / entry.relpath
                job = UploadJob(entry.key, path, entry.md5, entry.purpose, entry.stat, entry.updated_at)
                await self._submit(job)
        return found

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

    async def close(self) -> None:
        # Joining the hash threads waits for the file being read: off the loop, so watchdog pings go on.
        await asyncio.to_thread(self.hasher.close)
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


def _configure_logging(config: Config, extra_secrets: tuple[str, ...] = (), *, quiet: bool = False) -> None:
    secrets_ = tuple(s for s in (config.api_key.get_secret_value() if config.api_key else None,) if s)
    level = config.log.level
    if quiet and level in ("debug", "info"):
        level = "warning"
    logs.configure(fmt=config.log.format, level=level, secrets=secrets_ + extra_secrets)


async def sync_pass(pipe: Pipeline) -> None:
    async def sources() -> None:
        # The scan meets every file, rows left queued or uploading included (their stat is unchanged,
        # so they skip hashing and go straight to the uploader, which resolves them by md5 first).
        for root in pipe.roots:
            await pipe.scan_root(root)
        for cand in await pipe.recovery_candidates():
            await pipe.hash_q.put(cand)

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
    # Rows of roots no longer configured are history, not this pass's problem.
    stuck = [
        e
        for state in (State.FAILED, State.QUEUED, State.UPLOADING)
        for e in pipe.manifest.in_state(state)
        if e.root_id in pipe.root_by_id
    ]
    for entry in stuck[:20]:
        log.error("not synced", path=entry.relpath, state=entry.state.value, error=entry.last_error)
    for root, reason in c.held_roots.items():
        log.error("root not synced", root=root, reason=reason)
    problems = len(stuck) + c.changed + c.unreadable + c.walk_errors + c.crashed + len(c.held_roots)
    return 1 if problems else 0


def sync_once(config: Config, *, progress: bool) -> int:
    """`syncd sync --once`: one pass; 0 when every file is synced, 1 with a summary otherwise.

    With the progress bar (a TTY), per-file lines would scroll it away: only warnings and errors are
    logged, and the bar's last state is the summary (rclone's `--progress` behaves the same way).
    """
    _configure_logging(config, quiet=progress)
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
            await pipe.close()


def reconcile_once(config: Config, *, dry_run: bool, confirm: bool) -> int:
    """`syncd reconcile --once`: a sync pass, then one reconcile run (design §4).

    `--dry-run` runs no sync pass (it would upload): a read-only look at the roots stands in for it, and
    the plan is printed, one line per action, with nothing changed anywhere.
    """
    _configure_logging(config)
    api_key = _api_key(config)
    with StateLock(config.state_dir) as lock:
        manifest = Manifest.open(lock)
        try:
            return asyncio.run(_reconcile_once(config, manifest, api_key, dry_run=dry_run, confirm=confirm))
        finally:
            manifest.close()


async def _reconcile_once(
    config: Config, manifest: Manifest, api_key: str, *, dry_run: bool, confirm: bool
) -> int:
    from syncd.reconcile import observe_local, reconcile

    async with _client(config, config.remote.base_url, api_key) as client:
        if dry_run:
            now = time.time()
            view = await asyncio.to_thread(observe_local, build_roots(config), manifest, now=now)
            report = await reconcile(
                manifest,
                client,
                settings=config.reconcile,
                unavailable=view.unavailable,
                now=now,
                dry_run=True,
                confirm=confirm,
                assume_deleted=view.gone,
            )
            print(report.render() or "nothing to do")
            return report.exit_code
        code = await _one_pass(config, manifest, client, confirm_roots=confirm)
        report = await reconcile(
            manifest,
            client,
            settings=config.reconcile,
            unavailable=_unavailable(manifest, config),
            now=time.time(),
            dry_run=False,
            confirm=confirm,
        )
        if report.requeued:
            # Remote copies that vanished behind our back: upload them again in this same run.
            code = max(code, await _one_pass(config, manifest, client, confirm_roots=confirm))
        return max(code, report.exit_code)


async def _one_pass(config: Config, manifest: Manifest, client: FilesClient, *, confirm_roots: bool) -> int:
    pipe = Pipeline(config, manifest, client, confirm_roots=confirm_roots)
    try:
        await sync_pass(pipe)
        return _summary_code(pipe)
    finally:
        await pipe.close()


def _unavailable(manifest: Manifest, config: Config) -> dict[int, str]:
    """root_id → reason, from the notes the last pass left (a held root's rows never count as deleted)."""
    notes = manifest.notes()
    configured = {str(w.path) for w in config.watch}
    return {
        r.root_id: notes[f"root:{r.path}"]
        for r in manifest.roots()
        if r.path in configured and f"root:{r.path}" in notes
    }


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
    stack = contextlib.ExitStack()
    try:
        server = stack.enter_context(running_server(settings))
    except OSError as exc:  # only the start: errors of the daemon itself must not be renamed
        raise ConfigError(
            f"{config.source}: remote.base_url: cannot start the embedded server on "
            f"{host}:{url.port or 8000}: {exc.strerror or exc} (pick a free port)"
        ) from None
    with stack:
        log.info(
            "embedded reference server",
            base_url=server.base_url,
            api_key_file=str(state_dir / "embedded-api-key"),
        )
        yield server.base_url, server.api_key


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
            async with _client(config, base_url, api_key) as client:
                await _run_pipeline(config, manifest, client, notifier=notifier, stop=stop, reload=reload)
            if stop.is_set():
                break
            reload.clear()  # before reading: a SIGHUP during the read triggers one more reload
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
        build_roots(new)  # rule errors surface here, not when the new pipeline starts
        if not new.watch:
            raise ConfigError(f"{old.source}: watch: no [[watch]] table: nothing to sync")
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
        """Changed while hashed or uploaded: settle it again. `scanned`, not `modified`: on a polling root
        no close event will ever come, and settle must not wait for one until settle_max_seconds."""
        with contextlib.suppress(asyncio.QueueFull):
            hints.put_nowait(PathHint(root.index, relpath, "scanned"))

    async def route(cand: Candidate) -> None:
        """Scan finds: files quiet for settle_seconds go straight to hashing; fresher ones settle first."""
        # ctime too: `cp -p`, `tar x` and `rsync -t` back-date mtime on a file written just now.
        age = pipe.clock() - max(cand.stat.mtime_ns, cand.stat.ctime_ns) / 1e9
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
                root_id = pipe.root_ids.get(root.index)
                if root_id is not None:
                    await pipe.hash_q.put(Candidate(root, root_id, item.relpath, item.stat))
            elif isinstance(item, Gone):
                root_id = pipe.root_ids.get(root.index)
                if root_id is not None and pipe.manifest.get(FileKey(root_id, item.relpath)) is not None:
                    pipe.manifest.mark_missing(FileKey(root_id, item.relpath), pipe.clock())
                    pipe.maybe_commit()
            elif isinstance(item, Rescan):
                # Walked by its own task: a scan feeds hints, which settle turns into more of these items.
                subtree_rescans[item.root_index].add(item.relpath)
                subtree_wake.set()
            elif isinstance(item, StatFailed):
                pipe._log_unreadable(pipe.root_ids.get(root.index) or -1, item.relpath, item.error)

    rescan_now = [asyncio.Event() for _ in roots]
    subtree_rescans: list[set[str]] = [set() for _ in roots]
    subtree_wake = asyncio.Event()

    async def subtree_scanner() -> None:
        """Walk the directories settle asked for (new trees, collapsed bursts), coalescing repeats."""
        while True:
            await subtree_wake.wait()
            subtree_wake.clear()
            for root in roots:
                pending_dirs = subtree_rescans[root.index]
                while pending_dirs:
                    under = pending_dirs.pop()
                    if under == "" or rescan_now[root.index].is_set():
                        pending_dirs.clear()
                        rescan_now[root.index].set()
                    else:
                        await pipe.scan_root(root, under=under)

    scanned_once = [asyncio.Event() for _ in roots]

    async def rescans(root: Root) -> None:
        """The startup scan, then a full rescan every rescan_interval or when the watcher lost events."""
        wake = rescan_now[root.index]
        while not halt.is_set():
            wake.clear()
            await pipe.scan_root(root)
            scanned_once[root.index].set()
            await _sleep_or(wake, root.watch.rescan_interval)

    async def reconciler() -> None:
        """Every reconcile.interval_seconds, once every root was scanned: list, plan, prune (design §4)."""
        from syncd.reconcile import reconcile

        for done in scanned_once:
            await done.wait()
        while not halt.is_set():
            await _sleep_or(halt, config.reconcile.interval_seconds)
            if halt.is_set():
                return
            for root in roots:
                await pipe.register_root(root)  # fresh guards: a root may have vanished since its scan
            pipe.forget_listing()
            await reconcile(
                pipe.manifest,
                pipe.client,
                settings=config.reconcile,
                unavailable=dict(pipe.unavailable),
                now=time.time(),
                dry_run=False,
                confirm=False,
            )
            # Re-queued rows (remote copies that vanished) are picked up by the sweeper's retry pass.

    async def sweeper() -> None:
        """Rows due for a retry go back through the quick check; missing rows past grace become deleted."""
        while not halt.is_set():
            await _sleep_or(halt, RETRY_SWEEP_SECONDS)
            for cand in await pipe.recovery_candidates():
                await pipe.hash_q.put(cand)
            for root in roots:
                root_id, _ = await pipe.register_root(root)
                if root_id is None:
                    continue
                if str(root.path) in pipe.counters.held_roots:
                    rescan_now[root.index].set()  # the root is back: walk it now, not in an hour
                rows = pipe.manifest.missing_rows(root_id)
                await pipe.apply_missing(rows, root.watch.delete_grace_seconds)

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
                hints,
                settled,
                aggregator=aggregator,
                stat=settle_stat,
                clock=time.monotonic,
                wall=time.time,
                stop=halt,
            )
        ),
        asyncio.create_task(router()),
        asyncio.create_task(subtree_scanner()),
    ]
    hashers = [asyncio.create_task(pipe.hash_worker()) for _ in range(pipe.hasher.workers)]
    uploaders = [asyncio.create_task(pipe.upload_worker()) for _ in range(config.remote.concurrency)]
    try:
        await asyncio.to_thread(watcher.start)
    except InotifyLimitError as exc:
        halt.set()
        for task in (*stages, *hashers, *uploaders):
            task.cancel()
        await asyncio.gather(*stages, *hashers, *uploaders, return_exceptions=True)
        await pipe.close()
        raise ConfigError(f'{config.source}: watch.mode = "inotify": {exc}') from None
    sources = [asyncio.create_task(rescans(r)) for r in roots]
    sources += [asyncio.create_task(t()) for t in (sweeper, status, committer, reconciler)]
    notifier.ready(f"watching {len(roots)} folder(s)")
    log.info("watching", roots=[str(r.path) for r in roots])
    try:
        stopper = asyncio.create_task(stop.wait())
        reloader = asyncio.create_task(reload.wait())
        workers = {*stages, *sources, *hashers, *uploaders}
        await asyncio.wait({stopper, reloader, *workers}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        reloader.cancel()
        for task in workers:
            if task.done() and not task.cancelled() and (error := task.exception()) is not None:
                # A stage ended by a bug: stop cleanly (systemd restarts us) rather than limp on without it.
                raise error
    finally:
        halt.set()
        if stop.is_set():
            notifier.stopping()
        await asyncio.to_thread(watcher.stop)
        for task in (*sources, *stages, *hashers):
            task.cancel()
        await asyncio.gather(*sources, *stages, *hashers, return_exceptions=True)
        await _drain_uploads(pipe, uploaders)
        if pipe.remote_index is not None:
            pipe.remote_index.cancel()
        await pipe.close()


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


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
