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
6. Once a row is synced, in a drop folder: ``after_sync_action(entry, mode, seen, hooks_pending=)``, and
   for a move, the first free name among ``destination_names(relpath)``.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Literal, Protocol

from syncd.manifest import SETTLED, Entry, FileKey, RemoteRef, Source, State, StatKey
from syncd.roots import Root
from syncd.scan import FileStat

__all__ = [
    "MAX_CLASH_SUFFIX",
    "RETRY_BASE_SECONDS",
    "RETRY_CAP_SECONDS",
    "AfterSyncAction",
    "Candidate",
    "ErrorKind",
    "Failed",
    "FinishRemoval",
    "Forget",
    "HashAction",
    "Keep",
    "LeaveSource",
    "MarkDeleted",
    "MarkMissing",
    "MissingAction",
    "NeedRemote",
    "RemoteFileLike",
    "RemoveSource",
    "Resolution",
    "Restat",
    "Retry",
    "RetryRemoval",
    "Reuse",
    "SourceSeen",
    "StatKey",
    "SyncedFile",
    "Unchanged",
    "Upload",
    "UploadErrorAction",
    "UploadJob",
    "after_hash",
    "after_sync_action",
    "counts_as_missing",
    "destination_names",
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
    as does a ``deleted`` one whose path came back, and a path whose source after_sync removed (a new
    file, even with the same content: it is resolved by md5 and, in a drop folder, removed in turn). A
    purpose change counts as a change: a file rejected for one purpose may be accepted under another.
    The stat of a row after_sync is removing is that stage's to settle (its own link moved the ctime).
    """
    if entry is None or entry.state not in SETTLED or entry.source is Source.REMOVED:
        return NeedRemote(md5, purpose)
    if entry.xxh3 != xxh3 or entry.md5 != md5 or entry.purpose != purpose:
        return NeedRemote(md5, purpose)
    return Unchanged() if entry.stat == seen or entry.source is Source.REMOVING else Restat(seen)


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
    A clock that moved backwards only delays the deletion. A source after_sync removes or removed is
    not missing: its remote copy stays (design §3).
    """
    if entry.state is State.DELETED or entry.source is not None:
        return Keep()
    since = entry.missing_since if entry.missing_since is not None else now
    if now - since < grace or entry.state is State.UPLOADING:
        return MarkMissing(now) if entry.missing_since is None else Keep()
    if entry.state in _NO_LIVE_REMOTE:
        return Forget()
    return MarkDeleted()


# 6. after a file is synced: hooks and after_sync


@dataclass(frozen=True, slots=True)
class SyncedFile:
    """What the upload stage hands on when it marked a row synced: enough for hooks and after_sync."""

    key: FileKey
    md5: str
    purpose: str
    remote_id: str
    size: int
    public_url: str | None = None


AfterSyncMode = Literal["keep", "delete", "move"]


@dataclass(frozen=True, slots=True)
class SourceSeen:
    """One look at a synced row's file, and at a move's recorded destination."""

    stat: StatKey | None
    """The file at the row's path now; None when nothing is there."""
    dest: StatKey | None = None
    """The recorded destination of a move in progress; None when absent (or none recorded)."""


@dataclass(frozen=True, slots=True)
class LeaveSource:
    """Nothing to do now; ``reason`` says why (debug logs, tests)."""

    reason: str


@dataclass(frozen=True, slots=True)
class RemoveSource:
    """Record the intent, then delete the file or move it under ``move_to``."""

    mode: Literal["delete", "move"]


@dataclass(frozen=True, slots=True)
class FinishRemoval:
    """A removal was cut short after the file reached its destination: ``unlink`` the source if it is
    still there, then mark the row removed."""

    unlink: bool


@dataclass(frozen=True, slots=True)
class RetryRemoval:
    """A recorded intent was not carried out (the file is still there, and not at the destination):
    clear it; the next look decides afresh."""


AfterSyncAction = LeaveSource | RemoveSource | FinishRemoval | RetryRemoval


def after_sync_action(
    entry: Entry | None, mode: AfterSyncMode, seen: SourceSeen, *, hooks_pending: bool
) -> AfterSyncAction:
    """What after_sync does with a row (design §3: a source it removes is not a local delete).

    A file leaves the folder only once the manifest says synced with a remote id, after the path's hooks
    ran (they are given a path that exists), and while its stat is still the row's: a file rewritten or
    touched since is left for the hash stage, which syncs it again first. A file already gone was not
    removed by us: the missing-file rules decide. A recorded intent is finished when the file is gone, or
    when the destination holds it (a hard link made, or a copy finished, the source not yet unlinked);
    otherwise it is retried. The intent is honoured whatever ``mode`` says now (it was acted on already).
    """
    if entry is None or entry.state is not State.SYNCED or entry.remote_id is None:
        return LeaveSource("not synced")
    if entry.source is Source.REMOVED:
        return LeaveSource("already removed")
    if entry.source is Source.REMOVING:
        now, dest, row = seen.stat, seen.dest, entry.stat
        if now is None:
            return FinishRemoval(unlink=False)
        arrived = dest is not None and (dest.size, dest.mtime_ns) == (row.size, row.mtime_ns)
        if arrived and dest is not None and (now.inode == dest.inode == row.inode or now == row):
            return FinishRemoval(unlink=True)
        return RetryRemoval()
    if mode == "keep":
        return LeaveSource("after_sync = keep")
    if hooks_pending:
        return LeaveSource("hooks pending")
    if seen.stat is None:
        return LeaveSource("gone")
    if seen.stat != entry.stat:
        return LeaveSource("changed since synced")
    return RemoveSource(mode)


MAX_CLASH_SUFFIX = 9999
"""``name (9999).pdf`` is the last name tried; past it the move fails and is retried (a full folder)."""


def destination_names(relpath: str) -> Iterator[str]:
    """Where a moved file may go, in order: its own relpath, then ``name (1).ext``, ``name (2).ext`` …
    in the same directory. The extension stays last so the file still opens with the same program."""
    head, sep, name = relpath.rpartition("/")
    stem, dot, ext = name.rpartition(".")
    if not stem:  # ".bashrc", "README": no extension to keep
        stem, dot, ext = name, "", ""
    yield relpath
    for n in range(1, MAX_CLASH_SUFFIX + 1):
        yield f"{head}{sep}{stem} ({n}){dot}{ext}"


def remote_name(name: str) -> str:
    """The filename a local file is uploaded under: valid UTF-8 (undecodable bytes of a Latin-1 name become
    U+FFFD), printable (control characters too), NFC and unpadded, as a server keeps it; the exact local
    name stays in the manifest. Sent as kept, a crash's upload is recognised by its name."""
    text = os.fsencode(name).decode("utf-8", "replace")
    text = unicodedata.normalize("NFC", "".join(c if c.isprintable() else "\ufffd" for c in text)).strip()
    return text or "unnamed"
