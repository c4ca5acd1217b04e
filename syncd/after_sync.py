"""after_sync (design §3, §6): a drop folder's file leaves it once its remote copy is synced, as with
rclone ``move`` or onedrive's ``--remove-source-files``.

What may go, and when, is ``plan.after_sync_action``: a row the manifest says is synced with a remote id,
whose hooks for that path ran, and whose file still has the row's stat (a file rewritten meanwhile stays,
and is synced again first). This module does the file work around it:

- The intent (``source = 'removing'``, with a move's destination) is recorded and committed before the
  file is touched, and the row becomes ``removed`` after. A crash in between is finished at the next
  start: the file gone (or at its destination) → removed; still there → tried again. A crash after the
  upload and before any of this leaves a synced row whose file is there: the next start moves it.
- A removed source is not a local delete: its row stays ``synced``, its remote copy is kept (the
  manifest's ``kept``), and nothing looks for its file any more.
- A move keeps the relative path under ``move_to`` and never overwrites: ``name (1).ext``… on a clash.
  It is one ``rename`` that refuses to replace (``renameat2(RENAME_NOREPLACE)``; where the file system
  lacks it, a hard link then an unlink); across file systems, a copy to a hidden ``.NAME.syncd-partial``
  first, renamed into place once complete, then the source is unlinked.
- A move or delete that fails (``move_to`` not writable, a read-only folder) is logged and retried with
  capped backoff; the file stays where it is.

The check of the stat and the rename are two system calls: a file rewritten in place in the microseconds
between them moves with its new content (it is not lost, and its row is synced again once seen there).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import structlog

from syncd.counters import Counters
from syncd.manifest import CommitPolicy, Entry, FileKey, Manifest, ManifestReader, StatKey
from syncd.plan import (
    FinishRemoval,
    LeaveSource,
    RemoveSource,
    RetryRemoval,
    SourceSeen,
    after_sync_action,
    destination_names,
    retry_delay,
    statkey,
)
from syncd.roots import Root, RootTable
from syncd.scan import FileStat, describe_os_error
from syncd.supervise import Gate, supervised

log = structlog.get_logger("syncd.after_sync")

AFTER_SYNC_QUEUE = 4096
"""Rows waiting to be looked at (a path each); past it, the next poll of the manifest finds them."""
RETRY_BASE_SECONDS = 2.0
"""First retry of a failed move or delete: a folder made writable again is used within seconds."""
RETRY_CAP_SECONDS = 300.0
"""A folder that stays unwritable is tried every five minutes, each try one log line."""
LOOKS_PER_ROW = 8
"""A clash or a cleared intent means one more look; more than this in a row is a bug, not bad luck."""
PARTIAL_SUFFIX = ".syncd-partial"


# -- file operations (blocking: run them in a thread) ------------------------------------------------------


def _stat(path: Path) -> StatKey | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return statkey(FileStat.from_os(st))


def look(path: Path, dest: Path | None) -> SourceSeen:
    """The row's file (not followed if a symlink) and a recorded destination, as they are now."""
    return SourceSeen(_stat(path), _stat(dest) if dest is not None else None)


def free_destination(move_to: Path, relpath: str) -> Path | None:
    """The first name of ``destination_names(relpath)`` under ``move_to`` that nothing uses (None: all are
    taken). The rename refuses to replace, so a name taken after this look is a clash, never a loss."""
    for name in destination_names(relpath):
        candidate = move_to / name
        if not os.path.lexists(candidate):
            return candidate
    return None


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int


def rename_noreplace(src: Path, dst: Path) -> None:
    """``rename`` that raises FileExistsError rather than replace ``dst``.

    renameat2(RENAME_NOREPLACE) (Linux 3.15+, glibc 2.28+); where the call or the file system's support
    for the flag is missing, a hard link (which never replaces either) and an unlink of the source.
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    os.link(src, dst)
    try:
        os.unlink(src)
    except OSError:
        os.unlink(dst)
        raise


def _fsync_dir(path: Path) -> None:
    """Make a directory's new entry durable before the source's is dropped (a power cut loses nothing)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Done:
    """The file is gone from the folder (deleted, or at ``dest``)."""

    dest: Path | None


@dataclass(frozen=True, slots=True)
class Clash:
    """The chosen name was taken meanwhile: choose another."""


@dataclass(frozen=True, slots=True)
class Changed:
    """The file is not the row's any more (rewritten, replaced, or gone): it stays, untouched."""


@dataclass(frozen=True, slots=True)
class Failed:
    error: str
    keep_intent: bool = False
    """The file already is at its destination: the intent stays, and the next try only finishes it."""


Outcome = Done | Clash | Changed | Failed


def _unchanged(path: Path, expect: StatKey) -> bool:
    return _stat(path) == expect


def delete_file(src: Path, expect: StatKey) -> Outcome:
    if not _unchanged(src, expect):
        return Changed()
    try:
        os.unlink(src)
        _fsync_dir(src.parent)
    except OSError as exc:
        return Failed(f"cannot delete: {describe_os_error(exc)}")
    return Done(None)


def move_file(src: Path, dest: Path, expect: StatKey) -> Outcome:
    """Move ``src`` to ``dest`` (never replacing it) if it still has the row's stat ``expect``."""
    if not _unchanged(src, expect):
        return Changed()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        rename_noreplace(src, dest)
    except FileExistsError:
        return Clash()
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            return Failed(f"cannot move to {dest.parent}: {describe_os_error(exc)}")
        return _copy_across(src, dest, expect)
    try:
        _fsync_dir(dest.parent)
    except OSError as exc:
        log.warning("cannot flush the move's directory", path=str(dest.parent), error=describe_os_error(exc))
    return Done(dest)


def _partial(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}{PARTIAL_SUFFIX}")


def _copy_across(src: Path, dest: Path, expect: StatKey) -> Outcome:
    """Another file system: copy (mtime kept) to a hidden name, flush, rename into place, unlink ``src``."""
    partial = _partial(dest)
    try:
        shutil.copy2(src, partial, follow_symlinks=False)
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not _unchanged(src, expect):
            os.unlink(partial)
            return Changed()
        try:
            rename_noreplace(partial, dest)
        except FileExistsError:
            os.unlink(partial)
            return Clash()
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        return Failed(f"cannot copy to {dest.parent}: {describe_os_error(exc)}")
    try:
        _fsync_dir(dest.parent)
        os.unlink(src)
    except OSError as exc:
        return Failed(
            f"copied to {dest}, cannot delete the source: {describe_os_error(exc)}", keep_intent=True
        )
    return Done(dest)


def finish(src: Path, dest: Path | None, *, unlink: bool) -> Outcome:
    """Complete a removal a crash cut short: the file already is at ``dest`` (``plan`` checked that)."""
    try:
        if unlink:
            os.unlink(src)
        if dest is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_partial(dest))
    except FileNotFoundError:
        pass
    except OSError as exc:
        return Failed(f"cannot finish the removal: {describe_os_error(exc)}", keep_intent=True)
    return Done(dest)


# -- the stage --------------------------------------------------------------------------------------------


async def pending(state_dir: Path, root_ids: Collection[int]) -> list[FileKey]:
    """Rows after_sync may have to act on in these roots, plus every ``removing`` row (an intent a crash
    left, whatever the config says now), read off the loop with a reader connection (commit first)."""

    def read() -> list[FileKey]:
        with ManifestReader.open_readonly(state_dir) as reader:
            keys = [key for root_id in root_ids for key in reader.after_sync_keys(root_id)]
            return list(dict.fromkeys([*keys, *reader.removing_keys()]))

    return await asyncio.to_thread(read)


async def run(
    keys: asyncio.Queue[FileKey | None],
    *,
    manifest: Manifest,
    commit: CommitPolicy,
    roots: RootTable,
    hook_ids: Callable[[int], Collection[str]],
    retry: Callable[[FileKey, float], None],
    counters: Counters,
    gate: Gate | None = None,
) -> None:
    """Paths in until ``None`` (repeats are cheap: each is one look); each is left, removed, or retried
    later through ``retry(key, seconds)``. ``hook_ids(root_index)``: the hooks a path waits for.

    One path at a time: a rename is quick, and two looks at one path must never both act on it.
    """
    failures: dict[FileKey, int] = {}

    def later(key: FileKey, why: str, error: str | None = None) -> None:
        n = failures.get(key, 0)
        failures[key] = n + 1
        wait = retry_delay(n, base=RETRY_BASE_SECONDS, cap=RETRY_CAP_SECONDS)
        if error is not None:
            log.warning(
                "cannot remove the synced source; will retry", path=key.relpath, error=error, retry_in=wait
            )
        else:
            log.debug("after_sync waits", path=key.relpath, why=why, retry_in=wait)
        retry(key, wait)

    def removed(entry: Entry, dest: Path | None) -> None:
        if manifest.mark_removed(entry.key, md5=entry.md5):
            counters.sources_removed += 1
            failures.pop(entry.key, None)
            what = "source moved" if dest is not None else "source deleted"
            extra = {"to": str(dest)} if dest is not None else {}
            log.info(what, path=entry.relpath, remote_id=entry.remote_id, **extra)
        commit.maybe()

    async def one(key: FileKey) -> None:
        root = roots.by_id(key.root_id)
        if root is None or roots.is_held(root):
            return  # not configured, or unavailable: nothing in it is touched
        for _ in range(LOOKS_PER_ROW):
            entry = manifest.get(key)
            if entry is None:
                return
            src = root.path / key.relpath
            dest = Path(entry.source_dest) if entry.source_dest else None
            seen = await asyncio.to_thread(look, src, dest)
            waiting = entry.source is None and manifest.hooks_pending(key, entry.md5, hook_ids(root.index))
            action = after_sync_action(entry, root.watch.after_sync, seen, hooks_pending=waiting)
            if isinstance(action, LeaveSource):
                if action.reason == "changed since synced":
                    later(key, action.reason)  # re-synced (a new cue) or re-stat'ed (a look later)
                return
            if isinstance(action, RetryRemoval):
                manifest.clear_removing(key)
                continue
            if isinstance(action, FinishRemoval):
                outcome = await asyncio.to_thread(finish, src, dest, unlink=action.unlink)
            else:
                outcome = await _remove(action, entry, root, src)
            if isinstance(outcome, Done):
                removed(entry, outcome.dest)
                return
            if not (isinstance(outcome, Failed) and outcome.keep_intent):
                manifest.clear_removing(key)
                commit.maybe()
            if isinstance(outcome, Failed):
                later(key, "failed", outcome.error)
                return
            if isinstance(outcome, Changed):
                return  # the hash stage syncs what is there now; that is the next cue
        log.error("after_sync gave up on a path after repeated clashes", path=key.relpath)

    async def _remove(action: RemoveSource, entry: Entry, root: Root, src: Path) -> Outcome:
        target: Path | None = None
        if action.mode == "move":
            assert root.watch.move_to is not None  # config: "move" needs move_to
            target = await asyncio.to_thread(free_destination, root.watch.move_to, entry.relpath)
            if target is None:
                return Failed(f"every name for {entry.relpath} under {root.watch.move_to} is taken")
        if not manifest.mark_removing(entry.key, md5=entry.md5, dest=str(target) if target else None):
            return Changed()  # the row moved on since the look
        if target is None:
            return await asyncio.to_thread(delete_file, src, entry.stat)
        return await asyncio.to_thread(move_file, src, target, entry.stat)

    await supervised(keys, one, workers=1, counters=counters, what="after_sync", gate=gate)
