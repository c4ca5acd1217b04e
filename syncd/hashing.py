"""xxh3_128 + md5 of a file in one read pass, refusing to digest a file that changes meanwhile.

xxh3 is the cheap local identity (quick to recompute, good for the manifest), md5 is what
the Files API's cache lookup speaks. Both are fed from one ``readinto`` loop over a reused
1 MiB buffer, so a file is read once and memory stays flat whatever its size. Both release
the GIL on large buffers, so N worker threads hash on N cores.

A file is stat'ed before (``fstat`` on the open fd) and after (``fstat`` again, then the path),
and any difference in (size, mtime_ns, ctime_ns, inode, device), or a byte count that is not
the size, makes the result ``Changed``: the daemon sends the path back to settle, and never
uploads a digest of a half-written file.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import xxhash

from syncd.counters import Counters
from syncd.logs import UnreadableLog
from syncd.manifest import CommitPolicy, Manifest, State
from syncd.plan import Candidate, NeedRemote, Restat, UploadJob, after_hash, needs_hash, statkey
from syncd.scan import FileStat, describe_os_error
from syncd.supervise import Gate, supervised

# Large enough that the per-call overhead and GIL hand-offs vanish next to the hashing,
# small enough to stay in L2/L3 cache (a guess confirmed by the MB/s figure in the tests).
BUFFER_SIZE = 1 << 20
# Hashing is CPU-bound per core; past 8 threads a workstation's disk is the limit anyway.
MAX_WORKERS = 8
INLINE_BYTES = 64 << 10  # hashed without a thread hop (measured: a hop costs ~100 µs, 64 KiB ~40 µs)

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_VANISHED_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})
_DENIED_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


@dataclass(frozen=True, slots=True)
class Digest:
    """Both hashes of exactly ``size`` bytes, read while the file's stat was ``stat`` throughout."""

    xxh3: str
    md5: str
    size: int
    stat: FileStat


@dataclass(frozen=True, slots=True)
class Changed:
    """The file changed since it settled or while it was read: send it back to settle."""

    reason: str
    stat: FileStat | None


@dataclass(frozen=True, slots=True)
class Unreadable:
    """The file exists but cannot be read (permission, I/O error, not a regular file)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Vanished:
    """The path no longer names a file (removed before or while it was read)."""

    reason: str


HashResult = Digest | Changed | Unreadable | Vanished


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def hash_file(path: str, expected: FileStat | None = None, *, buffer: bytearray | None = None) -> HashResult:
    """Hash ``path`` in one pass (blocking: run it in a worker thread).

    ``expected`` is the stat the settle stage saw; if the file no longer matches it, the
    result is ``Changed`` before a byte is read. ``buffer`` is reused across calls.
    """
    view = memoryview(buffer if buffer is not None else bytearray(BUFFER_SIZE))
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: never hash a symlink.
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno in _VANISHED_ERRNOS:
            return Vanished("missing when opened")
        if exc.errno == errno.ELOOP:
            return Unreadable("not a regular file: symlink")
        if exc.errno in _DENIED_ERRNOS:
            return Unreadable(f"permission denied: {describe_os_error(exc)}")
        return Unreadable(describe_os_error(exc))
    try:
        return _hash_fd(fd, path, expected, view)
    finally:
        os.close(fd)


def _hash_fd(fd: int, path: str, expected: FileStat | None, view: memoryview) -> HashResult:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Unreadable(f"not a regular file: {_kind(st.st_mode)}")
        before = FileStat.from_os(st)
        if expected is not None and before != expected:
            return Changed("changed since it settled", before)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        md5 = hashlib.md5(usedforsecurity=False)
        xxh3 = xxhash.xxh3_128()
        total = 0
        with io.FileIO(fd, "rb", closefd=False) as f:
            while n := f.readinto(view):
                chunk = view[:n]
                md5.update(chunk)
                xxh3.update(chunk)
                total += n
                if total > before.size:
                    # Growing while we read: stop now rather than chase an endless append.
                    return Changed("grew while being read", FileStat.from_os(os.fstat(fd)))
        after = FileStat.from_os(os.fstat(fd))
    except OSError as exc:
        return Unreadable(describe_os_error(exc))
    if after != before:
        return Changed("modified while being read", after)
    if total != before.size:
        return Changed(f"read {total} bytes of {before.size}", after)
    try:
        at_path = os.stat(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _VANISHED_ERRNOS:
            return Vanished("removed while being read")
        return Unreadable(describe_os_error(exc))
    now = FileStat.from_os(at_path)
    if now != before:
        return Changed("replaced while being read", now)
    return Digest(xxh3=xxh3.hexdigest(), md5=md5.hexdigest(), size=total, stat=before)


class Hasher:
    """The hashing stage: a bounded thread pool, one reusable buffer per worker thread.

    Shape shared by the stages (restic's archiver): construct (starts the workers),
    ``await hash(...)`` to submit, ``close()`` to stop.
    """

    def __init__(self, *, workers: int | None = None, buffer_size: int = BUFFER_SIZE) -> None:
        self.workers = workers if workers is not None else max(1, min(os.cpu_count() or 1, MAX_WORKERS))
        self._buffer_size = buffer_size
        self._local = threading.local()
        self._inline_buffer = bytearray(INLINE_BYTES + 1)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="syncd-hash")

    def _run(self, path: str, expected: FileStat | None) -> HashResult:
        buffer: bytearray | None = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = bytearray(self._buffer_size)
            self._local.buffer = buffer
        return hash_file(path, expected, buffer=buffer)

    async def hash(self, path: str, expected: FileStat | None = None) -> HashResult:
        """Hash ``path`` on a worker thread; at most ``workers`` files are read at once.

        A file expected to be tiny is hashed on the calling (event loop) thread: reading a few KiB from
        the page cache costs less than handing the work to a thread and back.
        """
        if expected is not None and expected.size <= INLINE_BYTES:
            return hash_file(path, expected, buffer=self._inline_buffer)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._run, path, expected)

    def close(self) -> None:
        """Finish the files being hashed, drop queued ones, and join the workers."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Hasher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- the hash stage ----------------------------------------------------------------------------------


async def run(
    hash_q: asyncio.Queue[Candidate | None],
    *,
    hasher: Hasher,
    manifest: Manifest,
    commit: CommitPolicy,
    submit: Callable[[UploadJob], Awaitable[None]],
    resettle: Callable[[Candidate], None],
    unreadable: UnreadableLog,
    counters: Counters,
    gate: Gate | None,
) -> None:
    """Candidates in until ``None``; up to ``hasher.workers`` files at once. Out: ``submit(UploadJob)`` for
    every row that needs a remote file, ``resettle(candidate)`` for a file that changed while read."""

    async def one(cand: Candidate) -> None:
        await _hash_one(
            cand,
            hasher=hasher,
            manifest=manifest,
            submit=submit,
            resettle=resettle,
            unreadable=unreadable,
            counters=counters,
        )
        commit.maybe()

    await supervised(
        hash_q, one, workers=hasher.workers, counters=counters, what="hashing", key=lambda c: c.key, gate=gate
    )


async def _hash_one(
    cand: Candidate,
    *,
    hasher: Hasher,
    manifest: Manifest,
    submit: Callable[[UploadJob], Awaitable[None]],
    resettle: Callable[[Candidate], None],
    unreadable: UnreadableLog,
    counters: Counters,
) -> None:
    key = cand.key
    entry = manifest.get(key)
    seen = statkey(cand.stat)
    # A path whose source after_sync removed holds a new file, whatever its stat: always read it.
    if entry is not None and entry.source is None and not needs_hash(entry.stat, entry.state, seen):
        if entry.missing_since is not None:
            manifest.clear_missing(key)
        if entry.state in (State.QUEUED, State.UPLOADING):
            intent = entry.updated_at if entry.state is State.UPLOADING else None
            await submit(UploadJob(key, cand.path, entry.md5, entry.purpose, seen, intent))
        else:
            counters.unchanged += 1
        return
    result = await hasher.hash(str(cand.path), cand.stat)
    if isinstance(result, Changed):
        resettle(cand)
        return
    if isinstance(result, Vanished):
        return
    if isinstance(result, Unreadable):
        counters.unreadable += 1
        counters.failures["unreadable"] += 1
        unreadable.report(cand.root_id, cand.relpath, result.reason)
        return
    counters.hashed += 1
    unreadable.readable(cand.root_id, cand.relpath)
    purpose = cand.root.rules.purpose_for(cand.relpath)
    stat = statkey(result.stat)
    action = after_hash(entry, seen=stat, xxh3=result.xxh3, md5=result.md5, purpose=purpose)
    if isinstance(action, NeedRemote):
        manifest.mark_queued(key, xxh3=result.xxh3, md5=result.md5, purpose=purpose, stat=stat)
        await submit(UploadJob(key, cand.path, result.md5, purpose, stat))
        return
    if isinstance(action, Restat):
        manifest.update_stat(key, action.stat)
    elif entry is not None and entry.missing_since is not None:
        manifest.clear_missing(key)
    counters.unchanged += 1
