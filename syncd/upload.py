"""The upload stage: the manifest's own remote ids, then the remote cache, then a recorded-intent upload.

Decisions come from `syncd.plan`; this module performs them against the manifest and the API client.
Its input is a `JobQueue` (a row is never queued twice), its outputs are the manifest's rows,
``resettle(key)`` for a file that changed under an upload, and ``synced(SyncedFile)`` for each row it
marked synced (the hook and after_sync stages' cue: a call that returns at once, never a wait). A row
is never sent before its ``next_attempt_at`` (``due``): backoff and a server's ``Retry-After`` are
honoured whoever submits it.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import structlog
from aiolimiter import AsyncLimiter

from syncd.api import (
    ApiError,
    AuthError,
    FileResponse,
    FilesClient,
    OutcomeUnknownError,
    SourceChangedError,
)
from syncd.api.client import Throttle
from syncd.counters import Counters
from syncd.manifest import CommitPolicy, Entry, FileKey, Manifest, State
from syncd.plan import (
    ErrorKind,
    Failed,
    Reuse,
    SyncedFile,
    UploadJob,
    on_upload_error,
    remote_name,
    resolve,
    retry_delay,
)
from syncd.supervise import Gate, supervised

log = structlog.get_logger("syncd.upload")

# A remote file created up to this long before the recorded intent still counts as ours after a crash:
# the server's clock and ours may disagree by a little (NTP-synced hosts: well under a second).
INTENT_SKEW_SECONDS = 5.0


class Outcome(enum.Enum):
    REUSED = "reused"  # cache hit: the manifest's own remote id or the remote lookup
    UPLOADED = "uploaded"
    FAILED = "failed"  # permanent rejection; not retried until the file changes
    RETRY = "retry"  # retryable error; the row is queued with next_attempt_at
    CHANGED = "changed"  # the file changed under us: send the path back to settle
    STALE = "stale"  # the row moved on to other content meanwhile: nothing to do
    WAITING = "waiting"  # not due yet (backoff, Retry-After): the retry sweep submits it again when due


@dataclass(frozen=True, slots=True)
class _Unknown:
    """The upload was sent and its answer lost: it may be stored (the row stays ``uploading``)."""

    error: OutcomeUnknownError
    intent_at: float


RemoteIndex = Mapping[tuple[str, str], FileResponse]
"""(md5, purpose) → newest remote file, from one listing that carried md5 (replaces per-file lookups)."""


class _Ledger:
    """`in` over the manifest's owned remote ids without loading them all."""

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest

    def __contains__(self, remote_id: object) -> bool:
        return isinstance(remote_id, str) and self._manifest.is_owned(remote_id)


def ours_by_intent(hit: FileResponse, job: UploadJob, window: float) -> bool:
    """Whether a hit for a row left `uploading` by a crash is our own interrupted upload.

    Only a file with our name and size, created between the recorded intent and the latest moment that
    upload could have landed, counts. Anything else is adopted (never pruned): wrongly adopting our own
    file leaks one remote copy, wrongly owning another client's file could delete it.
    """
    sent = remote_name(job.path.name)
    # A multipart upload carries a double quote in a filename as %22 (WHATWG), and servers keep it so.
    if (
        job.intent_at is None
        or hit.filename not in (sent, sent.replace('"', "%22"))
        or hit.bytes != job.stat.size
    ):
        return False
    created = hit.created_at.timestamp()
    return job.intent_at - INTENT_SKEW_SECONDS <= created <= job.intent_at + window + INTENT_SKEW_SECONDS


async def sync_job(
    job: UploadJob,
    *,
    manifest: Manifest,
    client: FilesClient,
    clock: Callable[[], float],
    remote_index: RemoteIndex | None = None,
    intent_window: float = 0.0,
    counters: Counters | None = None,
    throttle: Throttle | None = None,
    synced: Callable[[SyncedFile], None] | None = None,
) -> Outcome:
    """Give one queued row a remote file: reuse one if any exists for (md5, purpose), else upload.

    ``intent_window`` is how long an upload may take at most (all attempts): it bounds which remote files
    created after a crash's recorded intent can be ours. ``synced`` hears of the row once it is synced. An
    upload whose answer was lost is resolved as a crash's is, by md5 lookup first, never by sending it again
    blindly; that happens as often, and with the same backoff, as the client retries a call, and then the
    row waits for its own backoff with its intent kept.
    """
    counters = counters if counters is not None else Counters()
    rounds = 1
    while isinstance(
        outcome := await _sync_once(
            job,
            manifest=manifest,
            client=client,
            clock=clock,
            remote_index=remote_index,
            intent_window=intent_window,
            counters=counters,
            throttle=throttle,
            synced=synced,
        ),
        _Unknown,
    ):
        if rounds >= client.attempts:
            return _record_error(
                job, outcome.error, manifest=manifest, clock=clock, counters=counters, sent=True
            )
        await client.pause(rounds)
        rounds += 1
        job, remote_index = replace(job, intent_at=outcome.intent_at), None
    return outcome


async def _sync_once(
    job: UploadJob,
    *,
    manifest: Manifest,
    client: FilesClient,
    clock: Callable[[], float],
    remote_index: RemoteIndex | None,
    intent_window: float,
    counters: Counters,
    throttle: Throttle | None,
    synced: Callable[[SyncedFile], None] | None,
) -> Outcome | _Unknown:
    ledger = _Ledger(manifest)
    local = manifest.local_copies(job.md5, job.purpose)
    hit: FileResponse | None = None
    try:
        if not local:
            if remote_index is not None:
                hit = remote_index.get((job.md5, job.purpose))
            else:
                hit = await client.find_by_md5(job.md5, purpose=job.purpose)
    except ApiError as exc:
        # A failed lookup says nothing about the file: never a permanent rejection.
        return _record_error(job, exc, manifest=manifest, clock=clock, counters=counters, permanent=False)
    decision = resolve(job.md5, job.purpose, local, hit, ledger)
    if isinstance(decision, Reuse):
        owned = decision.owned or (hit is not None and ours_by_intent(hit, job, intent_window))
        if not manifest.mark_synced(
            job.key,
            md5=job.md5,
            remote_id=decision.remote_id,
            owned=owned,
            remote_created_at=decision.created_at,
        ):
            return Outcome.STALE
        if synced is not None:
            public_url = hit.public_url if hit is not None and hit.id == decision.remote_id else None
            synced(SyncedFile(job.key, job.md5, job.purpose, decision.remote_id, job.stat.size, public_url))
        via = (
            "local" if decision.source == "manifest" else "listing" if remote_index is not None else "lookup"
        )
        log.info(
            "synced",
            path=job.key.relpath,
            md5=job.md5,
            remote_id=decision.remote_id,
            via=via,
            owned=owned,
        )
        counters.hits[via] += 1
        return Outcome.REUSED
    return await _upload(
        job,
        manifest=manifest,
        client=client,
        clock=clock,
        counters=counters,
        throttle=throttle,
        synced=synced,
    )


async def _upload(
    job: UploadJob,
    *,
    manifest: Manifest,
    client: FilesClient,
    clock: Callable[[], float],
    counters: Counters,
    throttle: Throttle | None,
    synced: Callable[[SyncedFile], None] | None,
) -> Outcome | _Unknown:
    if not manifest.mark_uploading(job.key, md5=job.md5):
        return Outcome.STALE
    intent = manifest.get(job.key)
    started = time.monotonic()
    try:
        response = await client.upload(
            job.path,
            purpose=job.purpose,
            filename=remote_name(job.path.name),
            expected=(job.stat.size, job.stat.mtime_ns),
            throttle=throttle,
        )
    except OutcomeUnknownError as exc:
        counters.failures[failure_kind(exc)] += 1
        log.info(
            "upload answer lost; resolving it by md5", path=job.key.relpath, md5=job.md5, error=exc.detail
        )
        return _Unknown(exc, intent.updated_at if intent is not None else clock())
    except SourceChangedError:
        # Cut short before its last byte: the server stores nothing from it.
        counters.failures["changed"] += 1
        manifest.mark_retry(job.key, md5=job.md5, error="changed during upload", next_attempt_at=clock())
        return Outcome.CHANGED
    except ApiError as exc:
        return _record_error(job, exc, manifest=manifest, clock=clock, counters=counters, sent=True)
    except OSError as exc:
        # Vanished or unreadable since it was hashed: the next scan or event decides what it is now.
        counters.failures["unreadable"] += 1
        manifest.mark_retry(
            job.key, md5=job.md5, error=f"cannot read: {exc.strerror or exc}", next_attempt_at=clock()
        )
        return Outcome.CHANGED
    if (response.md5 is not None and response.md5 != job.md5) or response.bytes != job.stat.size:
        # The bytes sent are not the bytes hashed: our own fresh upload is garbage, remove it now.
        await _discard(client, response)
        counters.failures["changed"] += 1
        manifest.mark_retry(
            job.key, md5=job.md5, error="content differs from the hashed one", next_attempt_at=clock()
        )
        return Outcome.CHANGED
    counters.upload_seconds.observe(time.monotonic() - started)
    marked = manifest.mark_synced(
        job.key,
        md5=job.md5,
        remote_id=response.id,
        owned=True,
        remote_created_at=response.created_at.timestamp(),
    )
    log.info(
        "synced",
        path=job.key.relpath,
        md5=job.md5,
        remote_id=response.id,
        via="upload",
        bytes=response.bytes,
        purpose=job.purpose,
    )
    if not marked:
        return Outcome.STALE
    if synced is not None:
        synced(SyncedFile(job.key, job.md5, job.purpose, response.id, response.bytes, response.public_url))
    return Outcome.UPLOADED


def failure_kind(exc: ApiError) -> str:
    """The `syncd_failures_total{kind}` label: the error class, in snake case (TooLargeError → too_large)."""
    name = type(exc).__name__.removesuffix("Error") or "api"
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


async def _discard(client: FilesClient, response: FileResponse) -> None:
    try:
        await client.delete(response.id)
    except ApiError as exc:
        log.warning("could not remove a mismatched upload", remote_id=response.id, error=exc.detail)


def _record_error(
    job: UploadJob,
    exc: ApiError,
    *,
    manifest: Manifest,
    clock: Callable[[], float],
    counters: Counters,
    permanent: bool | None = None,
    sent: bool = False,
) -> Outcome:
    """Fail the row (a rejection of this content) or schedule its retry, never before a server's
    ``Retry-After``. ``sent``: the request may have landed, so an ``uploading`` row keeps its intent."""
    reason = f"{type(exc).__name__}: {exc.detail}" + (f" (HTTP {exc.status})" if exc.status else "")
    counters.failures[failure_kind(exc)] += 1
    row = manifest.get(job.key)
    attempts = row.attempts if row is not None else 0
    rejected = exc.permanent if permanent is None else permanent
    kind = ErrorKind.PERMANENT if rejected else ErrorKind.RETRYABLE
    action = on_upload_error(kind, reason, attempts=attempts, now=clock(), retry_after=exc.retry_after)
    if isinstance(action, Failed):
        manifest.mark_failed(job.key, md5=job.md5, reason=action.reason)
        log.error("upload rejected", path=job.key.relpath, md5=job.md5, reason=action.reason)
        return Outcome.FAILED
    # A failed lookup for a row a crash left `uploading` says nothing about that earlier request either.
    keep = sent or job.intent_at is not None
    manifest.mark_retry(
        job.key, md5=job.md5, error=action.error, next_attempt_at=action.next_attempt_at, keep_intent=keep
    )
    level = log.error if isinstance(exc, AuthError) else log.warning
    level(
        "upload will be retried",
        path=job.key.relpath,
        md5=job.md5,
        error=action.error,
        retry_in=round(action.next_attempt_at - clock(), 1),
    )
    return Outcome.RETRY


# -- the stage -----------------------------------------------------------------------------------------

PREFETCH_LISTING_MIN = 64  # at least this many new files make one listing cheaper than N hash lookups
LISTING_PAGES_PER_FILE = 0.05  # give up on the listing beyond one page per 20 new files (huge remotes)
INDEX_TTL_SECONDS = 600.0  # after this, a cache check asks the server again


class UploadRate:
    """`[remote] max_upload_rate`: one budget of bytes per second shared by every upload in flight.

    A leaky bucket (aiolimiter) refilled every tenth of a second, so the burst after an idle spell is a
    tenth of a second's worth and the rate over a few seconds stays within a few percent of the cap.
    """

    def __init__(self, bytes_per_second: int) -> None:
        self._piece = max(1, bytes_per_second // 10)
        self._limiter = AsyncLimiter(self._piece, 0.1)

    async def __call__(self, size: int) -> None:
        while size > 0:
            take = min(size, self._piece)
            await self._limiter.acquire(take)
            size -= take


class JobQueue:
    """The upload stage's input: a bounded queue, and the keys waiting in it or being worked on, so a
    row is queued once however many scans, events and retry sweeps submit it."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[UploadJob | None] = asyncio.Queue(maxsize)
        self.pending: set[FileKey] = set()

    async def submit(self, job: UploadJob) -> None:
        if job.key not in self.pending:
            self.pending.add(job.key)
            await self.queue.put(job)

    def done(self, key: FileKey) -> None:
        self.pending.discard(key)

    def drop_waiting(self) -> None:
        """Forget jobs not started yet (shutdown): their rows stay `queued` and resume at the next start."""
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if job is not None:
                self.pending.discard(job.key)


class RemoteCache:
    """One paginated listing instead of a hash lookup per file during an initial sync, if the listing
    carries md5 (our server's extension; the public API's does not, and then lookups are used).

    It stands for the remote only briefly (remote files come and go), and not at all once a reconcile may
    have pruned (``forget``).
    """

    def __init__(self, client: FilesClient, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._clock = clock
        self._expected = 0
        self._listing: asyncio.Task[RemoteIndex | None] | None = None
        self._made_at = -math.inf

    def expect(self, files: int) -> None:
        """``files`` more candidates are on their way: start the listing once there are enough."""
        self._expected += files
        if self._listing is None and self._expected >= PREFETCH_LISTING_MIN:
            self._listing = asyncio.ensure_future(self._list())
            self._made_at = self._clock()

    def forget(self) -> None:
        self._made_at = -math.inf

    async def index(self) -> RemoteIndex | None:
        if self._listing is None or self._clock() - self._made_at >= INDEX_TTL_SECONDS:
            return None
        return await self._listing

    def close(self) -> None:
        if self._listing is not None:
            self._listing.cancel()

    async def _list(self) -> RemoteIndex | None:
        index: dict[tuple[str, str], FileResponse] = {}
        listed = 0
        try:
            async for item in self._client.iter_all():
                if item.md5 is None:
                    return None  # the public API's shape: fall back to per-file lookups
                index.setdefault((item.md5, item.purpose), item)  # newest first: keep the first
                listed += 1
                if listed > max(2, self._expected * LISTING_PAGES_PER_FILE) * 1000:
                    return None  # far more remote files than new local ones: lookups are cheaper
        except ApiError as exc:
            log.info("listing for the initial sync failed; using per-file lookups", error=exc.detail)
            return None
        return index


async def run(
    jobs: JobQueue,
    *,
    manifest: Manifest,
    client: FilesClient,
    cache: RemoteCache,
    commit: CommitPolicy,
    resettle: Callable[[FileKey], None],
    due: Callable[[Entry], bool],
    clock: Callable[[], float],
    counters: Counters,
    workers: int,
    gate: Gate | None,
    synced: Callable[[SyncedFile], None],
    throttle: Throttle | None = None,
) -> None:
    """Jobs in until ``None``, up to ``workers`` at once; each row ends synced, failed or scheduled.

    ``workers`` is the ceiling, not the pace: the client's request slots decide how many requests are
    in flight now, and a job waiting out a backoff or a stalled answer holds a worker but no slot.
    """
    inflight: dict[tuple[str, str], asyncio.Event] = {}

    async def one(job: UploadJob) -> None:
        try:
            outcome = await _resolve(job)
        finally:
            jobs.done(job.key)
        _count(outcome, job)
        commit.maybe()

    async def _resolve(job: UploadJob) -> Outcome:
        slot = (job.md5, job.purpose)
        while (busy := inflight.get(slot)) is not None:
            # Same content at another path is being resolved: wait, then reuse its remote file.
            await busy.wait()
        current = manifest.get(job.key)
        if (
            current is None
            or current.state not in (State.QUEUED, State.UPLOADING)
            or (current.md5, current.purpose) != (job.md5, job.purpose)
        ):
            return Outcome.STALE  # another job for this path got there first, or the content moved on
        if not due(current):
            return Outcome.WAITING
        done = inflight[slot] = asyncio.Event()
        counters.in_flight += 1
        try:
            return await sync_job(
                job,
                manifest=manifest,
                client=client,
                clock=clock,
                remote_index=await cache.index(),
                intent_window=client.longest_upload(job.stat.size),
                counters=counters,
                throttle=throttle,
                synced=synced,
            )
        finally:
            counters.in_flight -= 1
            del inflight[slot]
            done.set()

    def _count(outcome: Outcome, job: UploadJob) -> None:
        if outcome is Outcome.UPLOADED:
            counters.uploaded += 1
            counters.bytes_uploaded += job.stat.size
        elif outcome is Outcome.REUSED:
            counters.reused += 1
        elif outcome is Outcome.FAILED:
            counters.failed += 1
        elif outcome is Outcome.RETRY:
            counters.retry += 1
        elif outcome is Outcome.CHANGED:
            resettle(job.key)

    def crashed(job: UploadJob, exc: Exception) -> None:
        row = manifest.get(job.key)
        if row is not None and row.state in (State.QUEUED, State.UPLOADING) and row.md5 == job.md5:
            # The request may have gone out: an `uploading` row keeps its intent.
            counters.failures["internal"] += 1
            manifest.mark_retry(
                job.key,
                md5=job.md5,
                error=f"internal error: {exc!r}",
                next_attempt_at=clock() + retry_delay(row.attempts),
                keep_intent=True,
            )

    await supervised(
        jobs.queue, one, workers=workers, counters=counters, what="upload", on_crash=crashed, gate=gate
    )
