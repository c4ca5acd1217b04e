"""watchdog observers (inotify or polling), one per root, turned into ``PathHint``s on the loop.

Events are hints, never the truth: the settle stage re-stats every path, and rescans repair
what a watcher missed. So this module favours never blocking and never growing without bound
over completeness: watchdog's thread only appends to a bounded buffer and wakes the loop with
``loop.call_soon_threadsafe``; when the buffer or the hint queue is full, the hint is dropped
and ``request_rescan(root_index)`` is called instead.

Kinds (see ``settle`` for what they mean to readiness): ``created`` (IN_CREATE: a new file, a
hard link, or a rename from outside the root), ``modified``, ``attrib``, ``closed``
(close-after-write), ``moved_in`` + ``deleted`` for a rename inside the root, ``deleted``,
and ``rescan`` for a directory created, deleted or moved (files written into a new directory
before its watch existed produce no events; a directory moved away produces no per-file
deletes). A polling root has no close events: what it sees created or modified is ``scanned``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyObserver, InotifyWatchGroup
from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    WatchDescriptor,
    inotify_add_watch,
    inotify_init,
)
from watchdog.observers.polling import PollingObserverVFS

from syncd.plan import HintKind, PathHint

WatchMode = Literal["auto", "inotify", "poll"]
"""``auto``: inotify, falling back to polling for a root when inotify limits run out."""

# Poll interval for network shares: one scandir+lstat of the tree per interval. A guess:
# short enough that a scanned page shows up promptly, long enough to be cheap on a LAN share.
POLL_INTERVAL = 1.0
# Hints buffered on watchdog's side between two wake-ups of the loop; past it, a rescan.
MAX_BUFFERED = 10_000

# Only these reach the handler; also shapes the inotify mask, so IN_OPEN/IN_ACCESS/
# IN_CLOSE_NOWRITE (every read of every file, our own hasher included) never reach Python.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]

_SYSCTL = {
    errno.ENOSPC: "fs.inotify.max_user_watches",
    errno.EMFILE: "fs.inotify.max_user_instances",
}

log = structlog.get_logger("syncd.watch")


def _nothing_ignored(relpath: str) -> bool:
    return False


def _everything_wanted(relpath: str, size: int) -> bool:
    return True


@dataclass(frozen=True)
class WatchRoot:
    """One ``[[watch]]`` root as the watcher needs it.

    ``ignores_dir(relpath)`` and ``wanted(relpath, size)`` are the root's rules; the watcher
    has no stat, so it asks ``wanted`` with size 0 (names only; sizes are checked later).
    """

    path: str
    mode: WatchMode = "auto"
    recursive: bool = True
    ignores_dir: Callable[[str], bool] = _nothing_ignored
    wanted: Callable[[str, int], bool] = _everything_wanted


class InotifyLimitError(RuntimeError):
    """inotify watches or instances ran out (``mode = "inotify"`` refuses to fall back)."""


def _limit_message(path: str, exc: OSError) -> str:
    sysctl = _SYSCTL.get(exc.errno or 0, "fs.inotify.max_user_watches")
    return f"inotify limit reached watching {path} ({exc.strerror}): raise it with sysctl -w {sysctl}=<more>"


def _is_limit(exc: OSError) -> bool:
    return exc.errno in _SYSCTL


def _probe_watch_limit(path: str) -> OSError | None:
    """Did the recursive watch registration run out of watches below the root?

    watchdog swallows ENOSPC for subdirectories (only the root's failure is raised), which
    would silently leave part of a large tree unwatched. If it happened, the per-user limit
    is still exhausted, so adding one more watch fails the same way.
    """
    fd = inotify_init()
    if fd == -1:
        return None  # out of instances: the observer already has its own, nothing to learn
    try:
        wd = inotify_add_watch(fd, os.fsencode(path), InotifyConstants.IN_DELETE_SELF)
        if wd == -1 and ctypes.get_errno() == errno.ENOSPC:
            return OSError(errno.ENOSPC, "inotify watch limit reached")
        return None
    finally:
        os.close(fd)


class _OverflowHook:
    """A second callback on the root's inotify watch, only to learn about IN_Q_OVERFLOW.

    watchdog 7 handles a kernel queue overflow by logging and rebuilding its watches; no
    event reaches a handler. The events lost are unknown, so the root must be rescanned.
    """

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        self._on_overflow = on_overflow

    def on_event(self, event: InotifyEvent) -> None:
        return None

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        return None

    def on_queue_overflow(self) -> None:
        self._on_overflow()


class _InotifyObserver(InotifyObserver):
    """watchdog's InotifyObserver, plus the overflow hook on its (per-observer) inotify fd."""

    def hook_overflow(self, path: str, on_overflow: Callable[[], None]) -> None:
        (emitter,) = self.emitters
        mask = InotifyWatchGroup.build_event_mask(
            emitter.get_event_mask_from_filter(),  # type: ignore[attr-defined]
            follow_symlink=False,
        )
        hook = _OverflowHook(on_overflow)
        # The same mask as the emitter's watch, so adding this callback changes nothing else.
        self._inotify_fd.add_callback(os.fsencode(path), mask, hook, CallbackId(id(hook)))


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's dispatcher thread: map an event to hints, filter, hand over. No I/O."""

    def __init__(self, watcher: Watcher, index: int, root: WatchRoot, *, polling: bool) -> None:
        self._watcher = watcher
        self._index = index
        self._root = root
        self._prefix = root.path.rstrip("/") + "/"
        self._polling = polling

    def _rel(self, path: bytes | str) -> str | None:
        text = os.fsdecode(path)
        if text.startswith(self._prefix):
            return text[len(self._prefix) :]
        return "" if text == self._root.path else None

    def _dir_ignored(self, relpath: str) -> bool:
        parts = relpath.split("/")
        return any(self._root.ignores_dir("/".join(parts[: i + 1])) for i in range(len(parts)))

    def _file_ignored(self, relpath: str) -> bool:
        parent = relpath.rpartition("/")[0]
        return (bool(parent) and self._dir_ignored(parent)) or not self._root.wanted(relpath, 0)

    def _file(self, path: bytes | str, kind: HintKind) -> None:
        rel = self._rel(path)
        if rel and not self._file_ignored(rel):
            if self._polling and kind in ("created", "modified", "attrib", "moved_in"):
                kind = "scanned"
            self._watcher._emit(PathHint(self._index, rel, kind))

    def _dir(self, path: bytes | str) -> None:
        rel = self._rel(path)
        if rel == "":
            self._watcher._root_gone(self._index)  # the root itself went away or moved
        elif rel is not None and not self._dir_ignored(rel):
            self._watcher._emit(PathHint(self._index, rel, "rescan"))

    def dispatch(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileMovedEvent):
            self._file(event.src_path, "deleted")
            self._file(event.dest_path, "moved_in")
        elif isinstance(event, FileClosedEvent):
            self._file(event.src_path, "closed")
        elif isinstance(event, FileCreatedEvent):
            self._file(event.src_path, "created")
        elif isinstance(event, FileModifiedEvent):
            self._file(event.src_path, "modified")
        elif isinstance(event, FileAttribEvent):
            self._file(event.src_path, "attrib")
        elif isinstance(event, FileDeletedEvent):
            self._file(event.src_path, "deleted")
        elif isinstance(event, DirMovedEvent):
            self._dir(event.src_path)
            self._dir(event.dest_path)
        elif isinstance(event, DirCreatedEvent | DirDeletedEvent):
            self._dir(event.src_path)


class Watcher:
    """One watchdog observer per root, feeding ``hints`` on ``loop``.

    ``request_rescan(root_index)`` is called on the loop thread when hints for a root were
    lost (queue full, kernel queue overflow, root removed): the daemon rescans that root.
    Lifecycle: ``start()`` (raises ``InotifyLimitError`` for a ``mode="inotify"`` root that
    cannot be watched), ``stop()`` (joins the observers). ``modes`` tells what each root got.
    A root whose own directory was deleted or moved is in ``gone()`` until ``rewatch(index)``.
    """

    def __init__(
        self,
        roots: Sequence[WatchRoot],
        *,
        loop: asyncio.AbstractEventLoop,
        hints: asyncio.Queue[PathHint],
        request_rescan: Callable[[int], None],
        poll_interval: float = POLL_INTERVAL,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        self.roots = [dataclasses.replace(r, path=os.path.abspath(r.path)) for r in roots]
        self._loop = loop
        self._hints = hints
        self._request_rescan = request_rescan
        self._poll_interval = poll_interval
        self._max_buffered = max_buffered
        self._lock = threading.Lock()
        self._buffer: list[PathHint] = []
        self._lost: set[int] = set()
        self._wakeup_pending = False
        self._observers: list[BaseObserver] = []
        self.modes: list[Literal["inotify", "poll"]] = []
        self._gone: set[int] = set()
        self._life = threading.Lock()  # start, stop and rewatch never interleave
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        try:
            with self._life:
                for index, root in enumerate(self.roots):
                    observer, mode = self._observe(index, root)
                    self._observers.append(observer)
                    self.modes.append(mode)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        with self._life:
            self._stopped = True
            for observer in self._observers:
                observer.stop()
            for observer in self._observers:
                if observer.is_alive():
                    observer.join()
            self._observers.clear()

    def gone(self) -> set[int]:
        """Roots whose directory was deleted or moved since they were watched: a watch on a deleted
        directory never reports anything again, even once a directory of that name is back."""
        with self._lock:
            return set(self._gone)

    def rewatch(self, index: int) -> None:
        """Watch the root afresh (its directory is back); the caller rescans it for what came meanwhile."""
        with self._life:
            if self._stopped:
                return
            with self._lock:
                self._gone.discard(index)
            old = self._observers[index]
            old.stop()
            if old.is_alive():
                old.join()
            self._observers[index], self.modes[index] = self._observe(index, self.roots[index])
        log.info("watching the root again", root=self.roots[index].path, mode=self.modes[index])

    def _observe(self, index: int, root: WatchRoot) -> tuple[BaseObserver, Literal["inotify", "poll"]]:
        if root.mode != "poll":
            try:
                return self._start_inotify(index, root), "inotify"
            except OSError as exc:
                if not _is_limit(exc):
                    raise
                message = _limit_message(root.path, exc)
                if root.mode == "inotify":
                    raise InotifyLimitError(message) from exc
                log.warning(message + "; polling this root instead", root=root.path)
        return self._start_polling(index, root), "poll"

    def _start_inotify(self, index: int, root: WatchRoot) -> BaseObserver:
        observer = _InotifyObserver()  # OSError(EMFILE) when inotify instances ran out
        try:
            observer.schedule(
                _Handler(self, index, root, polling=False),
                root.path,
                recursive=root.recursive,
                event_filter=_EVENT_FILTER,
            )
            observer.start()  # OSError(ENOSPC) when the root cannot be watched
            exhausted = _probe_watch_limit(root.path) if root.recursive else None
            if exhausted is not None:
                raise exhausted
            observer.hook_overflow(root.path, lambda: self._lost_root(index))
        except BaseException:
            observer.stop()
            if observer.is_alive():
                observer.join()
            raise
        return observer

    def _start_polling(self, index: int, root: WatchRoot) -> BaseObserver:
        root_prefix = root.path + "/"

        def listdir(path: str | None) -> Iterator[os.DirEntry[str]]:
            # Prune ignored directories and unwanted files before watchdog stats them.
            directory = path or root.path
            prefix = directory[len(root_prefix) :] + "/" if directory.startswith(root_prefix) else ""
            with os.scandir(directory) as it:
                for entry in it:
                    rel = prefix + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        if not root.ignores_dir(rel):
                            yield entry
                    elif root.wanted(rel, 0):
                        yield entry

        observer = PollingObserverVFS(stat=os.lstat, listdir=listdir, polling_interval=self._poll_interval)
        observer.schedule(_Handler(self, index, root, polling=True), root.path, recursive=root.recursive)
        observer.start()
        return observer

    # -- handing hints to the loop (called on watchdog threads) ------------------------------

    def _emit(self, hint: PathHint) -> None:
        with self._lock:
            if len(self._buffer) >= self._max_buffered:
                self._lost.add(hint.root_index)
            else:
                self._buffer.append(hint)
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        self._wake()

    def _root_gone(self, index: int) -> None:
        with self._lock:
            self._gone.add(index)
        self._lost_root(index)

    def _lost_root(self, index: int) -> None:
        with self._lock:
            self._lost.add(index)
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        self._wake()

    def _wake(self) -> None:
        # RuntimeError: the loop is closed, the daemon is shutting down and hints do not matter.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._deliver)

    # -- on the loop -------------------------------------------------------------------------

    def _deliver(self) -> None:
        with self._lock:
            batch, self._buffer = self._buffer, []
            lost, self._lost = self._lost, set()
            self._wakeup_pending = False
        for hint in batch:
            if hint.root_index in lost:
                continue
            try:
                self._hints.put_nowait(hint)
            except asyncio.QueueFull:
                lost.add(hint.root_index)
        for index in sorted(lost):
            self._request_rescan(index)
