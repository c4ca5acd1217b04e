"""Pure decisions of the sync pipeline: manifest row + observation → action (design §1, §3).

Every function here takes plain data and returns an action as data; the daemon applies it (hashes,
asks the remote cache, uploads, writes the manifest). Nothing here does I/O or reads a clock.

The per-file flow the daemon runs:
1. ``needs_hash(known, state, seen)`` with the quick index: unchanged files cost one ``stat``.
2. ``after_hash(entry, seen=, xxh3=, md5=, purpose=)`` → ``Unchanged`` | ``Restat`` | ``NeedRemote``.
3. For ``NeedRemote``: ``reuse_local(manifest.local_copies(md5, purpose), owned_ids)``; when that is
   None, look the md5 up remotely and ``resolve(...)`` → ``Reuse`` (mark synced) | ``Upload``.
4. After a failed upload: ``on_upload_error(...)`` → ``Failed`` | ``Retry``.
5. After a full rescan, for every row the scan did not see: ``on_missing(entry, now, grace)``.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal, Protocol

from syncd.manifest import SETTLED, Entry, FileKey, RemoteRef, State, StatKey
from syncd.roots import Root
from syncd.scan import FileStat

__all__ = [
    "RETRY_BASE_SECONDS",
    "RETRY_CAP_SECONDS",
    "Candidate",
    "ErrorKind",
    "Failed",
    "Forget",
    "HashAction",
    "Keep",
    "MarkDeleted",
    "MarkMissing",
    "MissingAction",
    "NeedRemote",
    "RemoteFileLike",
    "Resolution",
    "Restat",
    "Retry",
    "Reuse",
    "StatKey",
    "Unchanged",
    "Upload",
    "UploadErrorAction",
    "UploadJob",
    "after_hash",
    "counts_as_missing",
    "is_due",
    "needs_hash",
    "on_missing",
    "on_upload_error",
    "resolve",
    "retry_delay",
    "reuse_local",
    "statkey",
]

RETRY_BASE_SECONDS = 30.0
"""First retry of a failed upload, after the API client's own quick retries gave up (a guess)."""
RETRY_CAP_SECONDS = 3600.0
"""Retries never stop (a network may be down for a day) but never wait more than an hour."""


# what travels between the stages

HintKind = Literal["created", "modified", "closed", "moved_in", "attrib", "deleted", "rescan", "scanned"]


@dataclass(frozen=True, slots=True)
class PathHint:
    """Something may have happened at ``relpath`` under root ``root_index``: a hint, never the truth.

    ``stat`` is only given with ``scanned``: the stat the scan observed.
    """

    root_index: int
    relpath: str
    kind: HintKind
    stat: FileStat | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A path that may need hashing: a scan or a settled event saw it with this stat."""

    root: Root
    root_id: int
    relpath: str
    stat: FileStat

    @property
    def key(self) -> FileKey:
        return FileKey(self.root_id, self.relpath)

    @property
    def path(self) -> Path:
        return self.root.path / self.relpath


@dataclass(frozen=True, slots=True)
class UploadJob:
    """A row that needs a remote file for (md5, purpose), as the hash stage (or recovery) saw it."""

    key: FileKey
    path: Path
    md5: str
    purpose: str
    stat: StatKey
    intent_at: float | None = None
    """When the row was left `uploading` (a crash, a lost answer): when that intent was recorded."""


def statkey(st: FileStat) -> StatKey:
    return StatKey(st.size, st.mtime_ns, st.ctime_ns, st.inode)


def is_due(entry: Entry, now: float) -> bool:
    """Whether a waiting row may be sent now: never before its ``next_attempt_at`` (backoff, Retry-After)."""
    return entry.next_attempt_at is None or entry.next_attempt_at <= now


# 1. quick check


def needs_hash(known: StatKey | None, state: State | None, seen: StatKey) -> bool:
    """Hash unless the manifest knows exactly this stat key for a row that still stands for this file."""
    return known is None or state is None or state is State.DELETED or known != seen


# 2. after hashing


@dataclass(frozen=True, slots=True)
class Unchanged:
    """Same content, purpose and stat: nothing to do (synced stays, failed/expired are not retried)."""


@dataclass(frozen=True, slots=True)
class Restat:
    """Same content and purpose, the stat moved (touch, copy-back): only record the new stat key."""

    stat: StatKey


@dataclass(frozen=True, slots=True)
class NeedRemote:
    """The path needs a remote file for (md5, purpose): mark it queued, then resolve it."""

    md5: str
    purpose: str


HashAction = Unchanged | Restat | NeedRemote


def after_hash(entry: Entry | None, *, seen: StatKey, xxh3: str, md5: str, purpose: str) -> HashAction:
    """Decide what fresh digests mean for a row.

    A row still ``queued`` or ``uploading`` (left from before, e.g. a crash) always needs a remote,
    as does a ``deleted`` one whose path came back. A purpose change counts as a change: a file
    rejected for one purpose may be accepted under another.
    """
    if entry is None or entry.state not in SETTLED:
        return NeedRemote(md5, purpose)
    if entry.xxh3 != xxh3 or entry.md5 != md5 or entry.purpose != purpose:
        return NeedRemote(md5, purpose)
    return Unchanged() if entry.stat == seen else Restat(seen)


# 3. remote resolution


class RemoteFileLike(Protocol):
    """What ``resolve`` reads from a hash-lookup hit; ``syncd.api.models.FileResponse`` fits."""

    @property
    def id(self) -> str: ...

    @property
    def purpose(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...

    @property
    def md5(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Reuse:
    """Point the row at an existing remote file; no upload.

    ``owned`` is True only for an id already in this manifest's ledger: ownership comes from having
    uploaded the file, never from finding it.
    """

    remote_id: str
    owned: bool
    created_at: float | None
    source: Literal["manifest", "remote"]


@dataclass(frozen=True, slots=True)
class Upload:
    """Cache miss: upload; the new remote id is owned once the upload succeeded."""

    md5: str
    purpose: str


Resolution = Reuse | Upload


def reuse_local(local: Sequence[RemoteRef], owned_ids: Container[str]) -> Reuse | None:
    """Prefer a remote file this manifest already uses for the same (md5, purpose): no network.

    Among several, an owned one wins (the copy shares our file instead of adopting someone else's),
    then the newest (it expires last under retention), then the id, for determinism.
    """
    if not local:
        return None
    best = max(
        local,
        key=lambda r: (
            r.remote_id in owned_ids,
            r.created_at if r.created_at is not None else float("-inf"),
            r.remote_id,
        ),
    )
    return Reuse(best.remote_id, best.remote_id in owned_ids, best.created_at, "manifest")


def resolve(
    md5: str,
    purpose: str,
    local: Sequence[RemoteRef],
    hit: RemoteFileLike | None,
    owned_ids: Container[str],
) -> Resolution:
    """Local copies first, then the remote hash lookup's hit, else upload.

    A hit only counts when it has this purpose (the public API's lookup ignores purpose) and, when
    the server reports an md5, this md5. A hit on one of our own ids (a rename or copy seen after
    the old row was gone) stays owned; any other hit is adopted and never pruned by syncd.
    """
    reuse = reuse_local(local, owned_ids)
    if reuse is not None:
        return reuse
    if hit is not None and hit.purpose == purpose and hit.md5 in (None, md5):
        return Reuse(hit.id, hit.id in owned_ids, hit.created_at.timestamp(), "remote")
    return Upload(md5, purpose)


# 4. upload errors


class ErrorKind(StrEnum):
    PERMANENT = "permanent"
    """The server rejected the file itself (400, 413, 415): retrying the same bytes cannot help."""
    RETRYABLE = "retryable"
    """Network, 429, 5xx after the client's own retries: try again later."""


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


@dataclass(frozen=True, slots=True)
class Retry:
    next_attempt_at: float
    error: str


UploadErrorAction = Failed | Retry


def retry_delay(attempts: int, *, base: float = RETRY_BASE_SECONDS, cap: float = RETRY_CAP_SECONDS) -> float:
    """Exponential backoff ``base * 2**attempts`` capped at ``cap``; ``attempts`` failed so far."""
    return min(cap, base * 2.0 ** min(max(attempts, 0), 64))


def on_upload_error(
    kind: ErrorKind,
    reason: str,
    *,
    attempts: int,
    now: float,
    retry_after: float | None = None,
    base: float = RETRY_BASE_SECONDS,
    cap: float = RETRY_CAP_SECONDS,
) -> UploadErrorAction:
    """Permanent errors fail the row until the file changes; others retry with capped backoff, forever,
    and never before the server's ``Retry-After`` (coming back earlier only earns another 429/503)."""
    if kind is ErrorKind.PERMANENT:
        return Failed(reason)
    wait = retry_delay(attempts, base=base, cap=cap)
    return Retry(now + max(wait, retry_after or 0.0), reason)


# 5. missing paths


@dataclass(frozen=True, slots=True)
class Keep:
    """Nothing to record now (already marked missing and still within grace, or already deleted)."""


@dataclass(frozen=True, slots=True)
class MarkMissing:
    """First time the path is missing: remember when (``manifest.mark_missing(key, since)``)."""

    since: float


@dataclass(frozen=True, slots=True)
class MarkDeleted:
    """Missing for ``delete_grace``: the row is ``deleted``; the reconciler prunes or releases its remote."""


@dataclass(frozen=True, slots=True)
class Forget:
    """Missing for ``delete_grace`` and holding no live remote file: just drop the row."""


MissingAction = Keep | MarkMissing | MarkDeleted | Forget


def counts_as_missing(
    relpath: str, *, recursive: bool, accepted: Callable[[str], bool], unreadable: Sequence[str]
) -> bool:
    """Whether a row whose path a walk did not meet may be gone (then ``on_missing`` says when).

    Not when the walk could not read its directory (``unreadable`` holds ``dir/`` prefixes; ``/`` is the
    root itself), not for a file below the top of a non-recursive root, and not for a file the rules now
    exclude: its remote copy stays (rclone keeps excluded files unless --delete-excluded; Syncthing never
    deletes for an ignore pattern). The rescan and ``reconcile --dry-run`` both ask this.
    """
    if "/" in unreadable or (relpath + "/").startswith(tuple(unreadable)):
        return False
    if not recursive and "/" in relpath:
        return False
    return accepted(relpath)


_NO_LIVE_REMOTE = frozenset({State.QUEUED, State.FAILED, State.EXPIRED})


def on_missing(entry: Entry, now: float, grace: float) -> MissingAction:
    """A row whose path a full rescan did not find (only for roots that passed the availability guards).

    An ``uploading`` row is never deleted mid-flight: once the upload ends, a later rescan deletes it.
    A clock that moved backwards only delays the deletion.
    """
    if entry.state is State.DELETED:
        return Keep()
    since = entry.missing_since if entry.missing_since is not None else now
    if now - since < grace or entry.state is State.UPLOADING:
        return MarkMissing(now) if entry.missing_since is None else Keep()
    if entry.state in _NO_LIVE_REMOTE:
        return Forget()
    return MarkDeleted()
