"""Upload stage: manifest's own remote ids, then the remote cache, then a recorded-intent upload.

Decisions come from `syncd.plan`; this module performs them against the manifest and the API client
and reports each job's outcome as data, so the daemon can count, log and route (back to settle).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from syncd.api import ApiError, AuthError, FileResponse, FilesClient, SourceChangedError
from syncd.manifest import FileKey, Manifest, StatKey
from syncd.plan import ErrorKind, Failed, Reuse, on_upload_error, resolve

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


@dataclass(frozen=True, slots=True)
class UploadJob:
    key: FileKey
    path: Path
    md5: str
    purpose: str
    stat: StatKey
    # When the row was left `uploading` by a crash: when that intent was recorded.
    intent_at: float | None = None


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
    if job.intent_at is None or hit.filename != job.path.name or hit.bytes != job.stat.size:
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
) -> Outcome:
    """Give one queued row a remote file: reuse one if any exists for (md5, purpose), else upload.

    ``intent_window`` is how long an upload may take at most (all attempts): it bounds which remote files
    created after a crash's recorded intent can be ours.
    """
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
        return _record_error(job, exc, manifest=manifest, clock=clock, permanent=False)
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
        log.info(
            "synced",
            path=job.key.relpath,
            md5=job.md5,
            remote_id=decision.remote_id,
            via=decision.source,
            owned=owned,
        )
        return Outcome.REUSED
    return await _upload(job, manifest=manifest, client=client, clock=clock)


async def _upload(
    job: UploadJob, *, manifest: Manifest, client: FilesClient, clock: Callable[[], float]
) -> Outcome:
    if not manifest.mark_uploading(job.key, md5=job.md5):
        return Outcome.STALE
    try:
        response = await client.upload(
            job.path,
            purpose=job.purpose,
            filename=job.path.name,
            expected=(job.stat.size, job.stat.mtime_ns),
        )
    except SourceChangedError:
        manifest.mark_retry(job.key, md5=job.md5, error="changed during upload", next_attempt_at=clock())
        return Outcome.CHANGED
    except ApiError as exc:
        return _record_error(job, exc, manifest=manifest, clock=clock, sent=True)
    except OSError as exc:
        # Vanished or unreadable since it was hashed: the next scan or event decides what it is now.
        manifest.mark_retry(
            job.key, md5=job.md5, error=f"cannot read: {exc.strerror or exc}", next_attempt_at=clock()
        )
        return Outcome.CHANGED
    if (response.md5 is not None and response.md5 != job.md5) or response.bytes != job.stat.size:
        # The bytes sent are not the bytes hashed: our own fresh upload is garbage, remove it now.
        await _discard(client, response)
        manifest.mark_retry(
            job.key, md5=job.md5, error="content differs from the hashed one", next_attempt_at=clock()
        )
        return Outcome.CHANGED
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
    return Outcome.UPLOADED if marked else Outcome.STALE


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
    permanent: bool | None = None,
    sent: bool = False,
) -> Outcome:
    reason = f"{type(exc).__name__}: {exc.detail}" + (f" (HTTP {exc.status})" if exc.status else "")
    row = manifest.get(job.key)
    attempts = row.attempts if row is not None else 0
    rejected = exc.permanent if permanent is None else permanent
    kind = ErrorKind.PERMANENT if rejected else ErrorKind.RETRYABLE
    action = on_upload_error(kind, reason, attempts=attempts, now=clock())
    if isinstance(action, Failed):
        manifest.mark_failed(job.key, md5=job.md5, reason=action.reason)
        log.error("upload rejected", path=job.key.relpath, md5=job.md5, reason=action.reason)
        return Outcome.FAILED
    retry = manifest.mark_upload_retry if sent else manifest.mark_retry
    retry(job.key, md5=job.md5, error=action.error, next_attempt_at=action.next_attempt_at)
    level = log.error if isinstance(exc, AuthError) else log.warning
    level(
        "upload will be retried",
        path=job.key.relpath,
        md5=job.md5,
        error=action.error,
        retry_in=round(action.next_attempt_at - clock(), 1),
    )
    return Outcome.RETRY
