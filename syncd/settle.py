"""Debounce path hints until each file is complete: a data structure plus one small async loop.

Like Syncthing's ``watchaggregator``, debouncing is a plain data structure (``Aggregator``)
driven by an injected ``now``: per path it keeps when it was first and last seen, whether the
last write-ish event was a terminal one, and the last observed stat. The async ``settle_stage``
only moves hints in, re-stats what is due (in a worker thread) and moves results out.

Definitions (``q`` = the root's quiet period, ``settle_seconds``; ``D`` = ``max_delay``):

- A key is *terminal* when its last content event was ``closed`` (close-after-write),
  ``moved_in`` (rename into the folder) or ``created``; a later ``modified`` clears it and a
  later ``attrib`` leaves it as it is. ``created`` counts because a hard link (``.filepart`` →
  final name) produces IN_CREATE and nothing else: no open, no write, no close. ``scanned`` (a
  hint from a scan or from a polling watcher, where close events do not exist) makes a *new*
  key terminal but does not override a live watcher's ``modified``.
- An observation (a re-stat) is *old* when the file's last change, the later of its mtime and
  ctime, is at least ``q`` before a wall-clock reading taken just before the stat, and the file
  is not empty: it has provably not changed for ``q`` and needs no second stat. ctime counts
  because it cannot be back-dated (``cp -p``, ``tar``, ``touch -d`` set an old mtime, not an
  old ctime). A change time in the future (a share whose clock runs ahead) never counts as old.
  Empty files are excluded because ``created`` with nothing written yet (``scanimage >
  out.tif`` warming up) looks exactly like a finished hard link: they get the second stat, so,
  as before, only a writer pausing more than ``2q`` before its first write causes a 0-byte
  upload first. The rule also serves scans and polling roots (a scanner writing page by page
  keeps moving mtime; ``route()`` in the daemon already trusts mtime age for scan finds). Its
  caveat: on a share whose clock runs ``s`` *behind* ours, files look ``s`` older than they are
  and the quiet period there is in effect ``q - s`` (hashing still catches a change during the
  read); give such roots a larger ``settle_seconds``.
- A file is *checked* (re-stat'ed) when it has been quiet for ``q`` (no event in the last
  ``q``) if it is terminal, or ``D`` after it was first seen otherwise. After a check that
  found it not ready, the next check is ``q`` later, or sooner: when its last change turns
  ``q`` old. Past ``D`` it is checked that way whatever the events, so a file that never stops
  changing is still looked at; it is never dropped.
- A file is *ready* at a check when it is *stable*: old, or equal to the observation of the
  previous check ``q`` or more earlier; and it is terminal or ``D`` has passed, and no event
  arrived in the last ``q`` (or ``D`` has passed). Otherwise the observation is recorded and
  the key re-armed, keeping ``first_seen`` so ``D`` still bounds the wait for a close. So a
  closed file is normally ready at its first check, ``q`` after its last event.
- A ``scanned`` hint may carry the stat the scan saw: that is the first observation, and for a
  new key the change it shows counts as the key's last event (a scan is not an event, the
  change it saw is). So a file a scan found ``a`` seconds after its last change is checked
  ``q - a`` later, and is ready then if it did not change since.
- Deletes are held longest: a deleted key is checked ``3q`` after its last event (a rename is a
  delete plus a create, and the create side may need ``2q`` to become ready: the planner
  should see the new path before the old one goes). If the path exists again by then, it is
  treated as a new observation. A key whose file vanished at a check becomes a delete, held
  the same way. Within one batch, deletions are emitted after everything else.
- Past ``collapse_threshold`` pending keys in one directory, they are replaced by one rescan
  of that directory (and past ``max_pending`` keys in all, by one rescan per root): events
  under a pending rescan are absorbed into it. A ``Rescan`` means "walk this subtree and
  reconcile it with the manifest, including files that are no longer there".
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from syncd.plan import HintKind, PathHint
from syncd.scan import FileStat, StatError

Key = tuple[int, str]
"""(root_index, relpath): relpath is posix, relative to the root; "" is the root itself."""

# Deletes wait this many quiet periods: longer than the 2q a renamed file's new name may need.
DELETE_HOLD_FACTOR = 3.0
# Syncthing's per-directory limit is 128 (maxFilesPerDir); 512 keeps more precise hints for
# the common "drop a few hundred scans into one folder" case. A guess, not a measurement.
COLLAPSE_THRESHOLD = 512
_CHECKING = math.inf  # due_at of a key handed out by due() and not yet checked()
# Bounds the aggregator's memory whatever the event rate (Syncthing's folder limit is 512).
MAX_PENDING = 100_000


@dataclass(frozen=True, slots=True)
class Ready:
    """A complete file: its stat has been stable for the quiet period."""

    root_index: int
    relpath: str
    stat: FileStat


@dataclass(frozen=True, slots=True)
class Gone:
    """No regular file at this path any more (deleted, renamed away, replaced by a non-file)."""

    root_index: int
    relpath: str


@dataclass(frozen=True, slots=True)
class Rescan:
    """Walk this subtree ("" = the whole root) and reconcile it, deletions included."""

    root_index: int
    relpath: str


@dataclass(frozen=True, slots=True)
class StatFailed:
    """The path could not be stat'ed (EACCES on a parent, EIO...): record it, do not guess."""

    root_index: int
    relpath: str
    error: str


Settled = Ready | Gone | Rescan | StatFailed
Observation = FileStat | StatError | None
"""What a re-stat found: a regular file, an error, or nothing to sync (missing or not a file)."""


@dataclass(slots=True)
class _Entry:
    quiet: float
    first_seen: float
    last_event: float
    terminal: bool
    deleted: bool
    last_check: float | None = None
    stat: FileStat | None = None
    old_at: float | None = None  # when ``stat`` turns old (its change q in the past), if it can
    due_at: float = 0.0


@dataclass(slots=True)
class _RescanEntry:
    quiet: float
    first_seen: float
    last_event: float
    due_at: float = 0.0


@dataclass(slots=True)
class DueBatch:
    """What ``Aggregator.due`` hands over: rescans to emit as they are, keys to re-stat."""

    rescans: list[Rescan] = field(default_factory=list)
    checks: list[Key] = field(default_factory=list)


def _age(stat: FileStat, wall: float) -> float:
    """Seconds between the file's last change (mtime or ctime, whichever is later) and ``wall``."""
    return wall - max(stat.mtime_ns, stat.ctime_ns) / 1e9


def _parent(relpath: str) -> str:
    return relpath.rpartition("/")[0]


def _is_under(relpath: str, directory: str) -> bool:
    return directory == "" or relpath == directory or relpath.startswith(directory + "/")


class Aggregator:
    """Per-path debounce state, driven by an injected monotonic ``now`` (pure: no I/O, no clock).

    ``quiet`` is ``settle_seconds``, one value or one per root index. Use: ``note`` every hint;
    at ``next_deadline()`` call ``due(now)``, re-stat each returned key and hand the result to
    ``checked``, which answers ``Ready``/``Gone``/``StatFailed`` or ``None`` (re-armed).
    ``now`` is monotonic and drives every deadline; ``wall`` (wall-clock seconds, comparable to
    file mtimes) is only used to tell how old an observed file is.
    """

    def __init__(
        self,
        quiet: float | Mapping[int, float],
        max_delay: float,
        *,
        collapse_threshold: int = COLLAPSE_THRESHOLD,
        max_pending: int = MAX_PENDING,
        delete_hold: float = DELETE_HOLD_FACTOR,
    ) -> None:
        quiets = quiet.values() if isinstance(quiet, Mapping) else [quiet]
        if any(q <= 0 for q in quiets) or max_delay <= 0:
            raise ValueError("quiet and max_delay must be positive")
        self._quiet = quiet
        self.max_delay = max_delay
        self.collapse_threshold = collapse_threshold
        self.max_pending = max_pending
        self.delete_hold = delete_hold
        self._entries: dict[Key, _Entry] = {}
        self._rescans: dict[Key, _RescanEntry] = {}
        self._by_dir: dict[Key, set[str]] = {}
        # Lazy heap of (due_at, is_rescan, key): stale items are dropped or re-pushed when
        # they surface, so an event only pushes when it brings a deadline forward.
        self._heap: list[tuple[float, bool, Key]] = []

    def quiet_for(self, root_index: int) -> float:
        return self._quiet[root_index] if isinstance(self._quiet, Mapping) else self._quiet

    def __len__(self) -> int:
        return len(self._entries) + len(self._rescans)

    # -- deadlines -------------------------------------------------------------------------

    def _file_due(self, e: _Entry) -> float:
        overdue = e.first_seen + self.max_delay
        if e.deleted:
            return min(e.last_event + self.delete_hold * e.quiet, overdue)
        if e.last_check is None:
            return min(e.last_event + e.quiet, overdue) if e.terminal else overdue
        stable_at = e.last_check + e.quiet if e.old_at is None else min(e.last_check + e.quiet, e.old_at)
        forced = max(overdue, stable_at)
        if not e.terminal:
            return forced
        return min(max(e.last_event + e.quiet, stable_at), forced)

    @staticmethod
    def _observe(e: _Entry, observed: FileStat, now: float, wall: float) -> bool:
        """Record ``observed`` as the key's last observation; return whether it is old already.

        ``old_at`` is defined so that "old" and "due again" agree exactly: a key that is not old
        yet is never due again at ``now``, so the stage cannot spin on it.
        """
        age = _age(observed, wall)
        e.last_check, e.stat = now, observed
        e.old_at = now + (e.quiet - age) if observed.size > 0 and age >= 0 else None
        return e.old_at is not None and e.old_at <= now

    def _schedule(self, key: Key, e: _Entry) -> None:
        due = self._file_due(e)
        if key not in self._entries or due < e.due_at:
            heapq.heappush(self._heap, (due, False, key))
        e.due_at = due

    def _schedule_rescan(self, key: Key, r: _RescanEntry, *, new: bool) -> None:
        due = min(r.last_event + r.quiet, r.first_seen + self.max_delay)
        if new or due < r.due_at:
            heapq.heappush(self._heap, (due, True, key))
        r.due_at = due

    def _current(self, item: tuple[float, bool, Key]) -> float | None:
        """The item's entry's real due time, or None if the entry is gone."""
        _, is_rescan, key = item
        entry = self._rescans.get(key) if is_rescan else self._entries.get(key)
        if entry is None or entry.due_at == _CHECKING:
            return None
        return entry.due_at

    def next_deadline(self) -> float | None:
        """When the next key becomes due (so the loop sleeps exactly that long), or None."""
        heap = self._heap
        while heap:
            due, is_rescan, key = heap[0]
            current = self._current(heap[0])
            if current == due:
                return due
            heapq.heappop(heap)
            if current is not None and current > due:
                heapq.heappush(heap, (current, is_rescan, key))
        return None

    # -- input -----------------------------------------------------------------------------

    def note(self, key: Key, kind: HintKind, now: float, wall: float, stat: FileStat | None = None) -> None:
        """Record one hint. ``stat`` is only meaningful with ``scanned``.

        ``wall`` is the wall clock now, used only with ``stat``: the scan took that stat earlier,
        so the file may look a little older than it is. That only brings the first check
        forward; the check itself takes a fresh stat.
        """
        root, relpath = key
        if kind == "rescan":
            self._note_rescan(key, now, self._drop_under(root, relpath))
            return
        if self._absorbed(root, relpath, now):
            return
        e = self._entries.get(key)
        if e is None:
            e = _Entry(
                quiet=self.quiet_for(root),
                first_seen=now,
                last_event=now,
                terminal=kind != "modified",
                deleted=kind == "deleted",
            )
            if kind == "scanned" and stat is not None:
                self._observe(e, stat, now, wall)
                # The change the scan saw is this key's last event (if it is in the past).
                e.last_event = now - min(max(_age(stat, wall), 0.0), e.quiet)
            self._schedule(key, e)
            self._entries[key] = e
            members = self._by_dir.setdefault((root, _parent(relpath)), set())
            members.add(relpath)
            if len(members) > self.collapse_threshold:
                self._collapse((root, _parent(relpath)), now)
            elif len(self._entries) > self.max_pending:
                self._collapse_all(now)
            return
        if kind == "deleted":
            e.deleted = True
        elif kind == "scanned":
            # A scan sees no close events: it must not override what a live watcher said
            # about a file being written.
            if e.deleted:
                e.deleted, e.terminal = False, True
            if e.last_check is None and stat is not None:
                self._observe(e, stat, now, wall)
        else:
            e.deleted = False
            if kind == "modified":
                e.terminal = False
            elif kind != "attrib":
                e.terminal = True
        e.last_event = max(e.last_event, now)
        self._schedule(key, e)

    def _absorbed(self, root: int, relpath: str, now: float) -> bool:
        """Fold an event under a pending rescan into that rescan (it will see the file)."""
        if not self._rescans:
            return False
        directory = relpath
        while True:
            directory = _parent(directory) if directory else ""
            r = self._rescans.get((root, directory))
            if r is not None:
                r.last_event = max(r.last_event, now)
                self._schedule_rescan((root, directory), r, new=False)
                return True
            if directory == "":
                return False

    def _note_rescan(self, key: Key, now: float, first_seen: float) -> None:
        root, relpath = key
        if self._absorbed(root, relpath, now):
            return
        r = self._rescans.get(key)
        if r is None:
            r = _RescanEntry(quiet=self.quiet_for(root), first_seen=min(first_seen, now), last_event=now)
            self._rescans[key] = r
            self._schedule_rescan(key, r, new=True)
        else:
            r.first_seen = min(r.first_seen, first_seen)
            r.last_event = max(r.last_event, now)
            self._schedule_rescan(key, r, new=False)

    def _remove(self, key: Key) -> _Entry:
        e = self._entries.pop(key)
        root, relpath = key
        dir_key = (root, _parent(relpath))
        members = self._by_dir[dir_key]
        members.discard(relpath)
        if not members:
            del self._by_dir[dir_key]
        return e

    def _drop_under(self, root: int, directory: str) -> float:
        """Drop pending keys and rescans below ``directory``; return the oldest first_seen."""
        oldest = float("inf")
        for key in [k for k in self._entries if k[0] == root and _is_under(k[1], directory)]:
            oldest = min(oldest, self._remove(key).first_seen)
        for key in [k for k in self._rescans if k[0] == root and _is_under(k[1], directory)]:
            oldest = min(oldest, self._rescans.pop(key).first_seen)
        return oldest

    def _collapse(self, dir_key: Key, now: float) -> None:
        self._note_rescan(dir_key, now, self._drop_under(*dir_key))

    def _collapse_all(self, now: float) -> None:
        for root in {k[0] for k in self._entries}:
            self._note_rescan((root, ""), now, self._drop_under(root, ""))

    # -- output ----------------------------------------------------------------------------

    def due(self, now: float) -> DueBatch:
        """Pop everything due at ``now``: rescans to emit, file keys to re-stat (then ``checked``)."""
        batch = DueBatch()
        heap = self._heap
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)
            due, is_rescan, key = item
            current = self._current(item)
            if current is None or current < due:
                continue  # stale: the entry was emitted, dropped, or is already in the heap earlier
            if current > now:
                heapq.heappush(heap, (current, is_rescan, key))
                continue
            if is_rescan:
                del self._rescans[key]
                batch.rescans.append(Rescan(*key))
            else:
                self._entries[key].due_at = _CHECKING
                batch.checks.append(key)
        return batch

    def checked(
        self, key: Key, observed: Observation, now: float, wall: float
    ) -> Ready | Gone | StatFailed | None:
        """Apply a re-stat of a key returned by ``due``: an output, or None when re-armed.

        ``wall`` must be read *before* the stat: then "changed at least q before ``wall``" implies
        "unchanged for q when the stat was taken", however slow the stat was.
        """
        e = self._entries.get(key)
        if e is None:
            return None
        if isinstance(observed, StatError):
            self._remove(key)
            return StatFailed(key[0], key[1], observed.error)
        overdue = now >= e.first_seen + self.max_delay
        if observed is None:
            e.deleted = True
            e.last_check, e.stat, e.old_at = now, None, None
            if now >= self._file_due(e):
                self._remove(key)
                return Gone(*key)
        else:
            if e.deleted:
                # Back (recreated, or the delete was half of a rename over it): a fresh observation,
                # so only its age can make it ready now.
                e.deleted, e.terminal, e.stat = False, True, None
            same = e.stat == observed and e.last_check is not None and now >= e.last_check + e.quiet
            old = self._observe(e, observed, now, wall)
            quiet = now >= e.last_event + e.quiet
            if (same or old) and (e.terminal or overdue) and (quiet or overdue):
                self._remove(key)
                return Ready(key[0], key[1], observed)
        e.due_at = _CHECKING
        self._schedule(key, e)
        return None


def _stat_all(
    stat: Callable[[int, str], Observation], wall: Callable[[], float], keys: Iterable[Key]
) -> list[tuple[float, Observation]]:
    """Each key's wall-clock reading, taken just before its stat, and the stat."""
    return [(wall(), stat(root, relpath)) for root, relpath in keys]


def _note(aggregator: Aggregator, hint: PathHint, now: float, wall: float) -> None:
    aggregator.note((hint.root_index, hint.relpath), hint.kind, now, wall, hint.stat)


async def settle_stage(
    hints: asyncio.Queue[PathHint],
    out: asyncio.Queue[Settled],
    *,
    aggregator: Aggregator,
    stat: Callable[[int, str], Observation],
    clock: Callable[[], float],
    wall: Callable[[], float],
    stop: asyncio.Event,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Run until ``stop`` is set: hints in, ``Ready``/``Gone``/``Rescan``/``StatFailed`` out.

    ``stat(root_index, relpath)`` re-stats a path (e.g. ``scan.stat_path`` on the joined path);
    a batch of due keys is stat'ed in one worker thread so a slow share never blocks the loop.
    ``clock`` is monotonic seconds and ``sleep`` waits on that clock (inject both in tests);
    ``wall`` is the wall clock (``time.time``), only compared with file mtimes and ctimes.
    Putting to ``out`` waits when it is full: back-pressure reaches the watcher, which then
    asks for a rescan instead of blocking.
    """
    getter: asyncio.Future[PathHint] | None = None
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            while True:
                try:
                    hint = hints.get_nowait()
                except asyncio.QueueEmpty:
                    break
                _note(aggregator, hint, clock(), wall())
            batch = aggregator.due(clock())
            results: list[Settled] = list(batch.rescans)
            if batch.checks:
                observed = await asyncio.to_thread(_stat_all, stat, wall, batch.checks)
                now = clock()
                for key, (seen_at, obs) in zip(batch.checks, observed, strict=True):
                    result = aggregator.checked(key, obs, now, seen_at)
                    if result is not None:
                        results.append(result)
            results.sort(key=lambda r: isinstance(r, Gone))  # stable: deletions last
            for settled in results:
                await out.put(settled)

            deadline = aggregator.next_deadline()
            if deadline is not None and deadline <= clock():
                continue
            if getter is None:
                getter = asyncio.ensure_future(hints.get())
            waiters: set[asyncio.Future[Any]] = {getter, stopper}
            sleeper = None
            if deadline is not None:
                sleeper = asyncio.ensure_future(sleep(deadline - clock()))
                waiters.add(sleeper)
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if sleeper is not None:
                sleeper.cancel()
            if getter.done():
                hint = getter.result()
                getter = None
                _note(aggregator, hint, clock(), wall())
    finally:
        stopper.cancel()
        if getter is not None:
            getter.cancel()
