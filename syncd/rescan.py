"""The rescan stage: the manifest-aware walk of a root (or a subtree), and what the walk did not meet.

A walk runs on a worker thread with its own read connection and the quick-check index, so a million
unchanged files cost one `stat` each and never touch the event loop; only candidates (new, changed, or
still waiting for a remote file) come out, through ``submit``. Rows the walk did not meet are marked
missing and, past `delete_grace_seconds`, deleted (the rule is `plan.counts_as_missing`/`on_missing`).
A root the `RootTable` finds unavailable is not walked at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Collection, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from syncd.counters import Counters
from syncd.logs import UnreadableLog
from syncd.manifest import SETTLED, CommitPolicy, Entry, FileKey, Manifest, ManifestReader, State
from syncd.plan import (
    Candidate,
    Forget,
    MarkDeleted,
    MarkMissing,
    UploadJob,
    counts_as_missing,
    on_missing,
)
from syncd.roots import Root, RootTable, file_filter
from syncd.scan import FileStat, StatError, stat_path, walk
from syncd.state import StateError
from syncd.supervise import Gate, held

log = structlog.get_logger("syncd.rescan")

SCAN_BATCH = 256  # scan results handed from the walker thread to the loop per hop


@dataclass(frozen=True, slots=True)
class RescanRequest:
    """Walk this root, or only the subtree ``under`` (new directories, collapsed event bursts)."""

    root_index: int
    under: str = ""


@dataclass(frozen=True, slots=True)
class _WalkDone:
    missing: list[Entry]  # rows whose path the walk did not meet
    returned: list[FileKey]  # rows marked missing earlier whose path is there again
    repurposed: list[Entry]  # unchanged files whose rules now give another purpose
    errors: list[tuple[str, str]]


def _walk_root(
    root: Root,
    root_id: int,
    state_dir: Path,
    deliver: Callable[[list[Candidate]], None],
    *,
    under: str,
    rules_changed: bool,
    abort: threading.Event,
) -> _WalkDone:
    """Walk one root (or the subtree `under`) with the one-stat quick check, on a worker thread."""
    with ManifestReader.open_readonly(state_dir) as reader:
        index = reader.quick_index(root_id, under)
        batch: list[Candidate] = []
        errors: list[tuple[str, str]] = []
        recursive = root.watch.recursive
        seen_unchanged = index.seen_unchanged

        def known(relpath: str, st: os.stat_result) -> bool:
            """Unchanged and settled: one stat, nothing else (design §3 quick check).

            Once `abort` is set, answers False: the file is yielded and the loop below stops the walk.
            """
            state = seen_unchanged(relpath, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            return state in SETTLED and not abort.is_set()

        # With unchanged rules, a file the manifest knows unchanged was accepted before and still is: the
        # globs run only for new or changed files (measured: a quarter of a no-change pass's cost).
        accepted = file_filter(root)
        for result in walk(
            str(root.path),
            under=under,
            ignores_dir=root.rules.ignores_dir if recursive else (lambda rel: True),
            wanted=accepted if rules_changed else None,
            known=known,
        ):
            if abort.is_set():
                return _WalkDone([], [], [], errors)
            if result.stat is None:
                errors.append((result.relpath, result.error or "unknown error"))
                continue
            if not rules_changed and not accepted(result.relpath, result.stat.size):
                continue
            index.met(result.relpath)
            batch.append(Candidate(root, root_id, result.relpath, result.stat))
            if len(batch) >= SCAN_BATCH:
                deliver(batch)
                batch = []
        if batch:
            deliver(batch)
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        unreadable = [rel + "/" for rel, _ in errors]
        purpose_for = root.rules.purpose_for

        def kept(relpath: str) -> bool:
            return root.rules.accepts(relpath, 0) is None

        missing: list[str] = []
        repurposed: list[str] = []
        returned = [
            e.relpath
            for e in reader.missing_rows(root_id)
            if e.relpath.startswith(prefix) and index.was_seen(e.relpath)
        ]
        # A million-row root costs a full pass over its rows only when something can be found there.
        if rules_changed or not index.all_seen():
            for row_id, relpath, state, purpose in reader.iter_root_brief(root_id):
                if state is State.DELETED or not relpath.startswith(prefix):
                    continue
                if index.was_seen(relpath, row_id):
                    if rules_changed and state in SETTLED and purpose != purpose_for(relpath):
                        repurposed.append(relpath)
                elif counts_as_missing(relpath, recursive=recursive, accepted=kept, unreadable=unreadable):
                    missing.append(relpath)

        def rows(relpaths: list[str]) -> list[Entry]:
            found = (reader.get(FileKey(root_id, rel)) for rel in relpaths)
            return [e for e in found if e is not None]

        return _WalkDone(rows(missing), [FileKey(root_id, rel) for rel in returned], rows(repurposed), errors)


def rules_fingerprint(root: Root) -> str:
    """What the manifest's rows were last checked against: a change re-checks every row."""
    return f"{root.rules.fingerprint} marker={root.watch.marker!r} recursive={root.watch.recursive}"


async def run(
    requests: asyncio.Queue[RescanRequest | None],
    *,
    roots: RootTable,
    manifest: Manifest,
    commit: CommitPolicy,
    submit: Callable[[list[Candidate]], Coroutine[Any, Any, None]],
    scanned: Callable[[Root], None],
    unreadable: UnreadableLog,
    counters: Counters,
    clock: Callable[[], float],
    state_dir: Path,
    gate: Gate | None,
) -> None:
    """Walk what is asked until ``None``; requests that pile up meanwhile are coalesced (a full rescan
    of a root swallows its subtree requests)."""
    while (first := await requests.get()) is not None:
        pending = [first]
        stop = False
        while not requests.empty():
            more = requests.get_nowait()
            if more is None:
                stop = True
                break
            pending.append(more)
        for request in _coalesce(pending):
            root = roots.roots[request.root_index]
            try:
                await scan_root(
                    root,
                    under=request.under,
                    roots=roots,
                    manifest=manifest,
                    commit=commit,
                    submit=submit,
                    unreadable=unreadable,
                    counters=counters,
                    clock=clock,
                    state_dir=state_dir,
                )
            except StateError as exc:
                await held(gate, exc)
                continue  # resuming asks for a full rescan of every root
            except Exception:
                counters.crashed += 1
                log.exception("rescan failed unexpectedly; the next rescan tries again", root=str(root.path))
            if not request.under:
                scanned(root)
        if stop:
            return


def _coalesce(requests: Iterable[RescanRequest]) -> list[RescanRequest]:
    requests = list(requests)
    full = {r.root_index for r in requests if not r.under}
    return list(dict.fromkeys(r for r in requests if not r.under or r.root_index not in full))


async def scan_root(
    root: Root,
    *,
    under: str = "",
    roots: RootTable,
    manifest: Manifest,
    commit: CommitPolicy,
    submit: Callable[[list[Candidate]], Coroutine[Any, Any, None]],
    unreadable: UnreadableLog,
    counters: Counters,
    clock: Callable[[], float],
    state_dir: Path,
) -> None:
    """Walk a root (or a subtree), submit what changed, and mark what is gone (unless the root is held)."""
    root_id = await roots.refresh(root)
    if root_id is None:
        return
    loop = asyncio.get_running_loop()
    abort = threading.Event()

    def deliver(batch: list[Candidate]) -> None:
        counters.scanned += len(batch)
        future: concurrent.futures.Future[None] = asyncio.run_coroutine_threadsafe(submit(batch), loop)
        while not abort.is_set():
            with contextlib.suppress(TimeoutError):
                future.result(timeout=0.5)
                return
        future.cancel()

    rules_key = f"rules:{root_id}"
    fingerprint = rules_fingerprint(root)
    commit.now()  # the walker's own connection must see every row written so far
    try:
        done = await asyncio.to_thread(
            _walk_root,
            root,
            root_id,
            state_dir,
            deliver,
            under=under,
            rules_changed=manifest.meta(rules_key) != fingerprint,
            abort=abort,
        )
    finally:
        abort.set()
    log.debug(
        "scan done", root=str(root.path), under=under, missing=len(done.missing), errors=len(done.errors)
    )
    counters.walk_errors += len(done.errors)
    for relpath, error in done.errors:
        unreadable.report(root_id, relpath, error)
    for key in done.returned:
        manifest.clear_missing(key)
    repurposed = [c for e in done.repurposed if (c := _repurpose(manifest, root, e)) is not None]
    if repurposed:
        await submit(repurposed)
    await mark_missing(
        done.missing,
        root.watch.delete_grace_seconds,
        roots=roots,
        manifest=manifest,
        counters=counters,
        clock=clock,
    )
    commit.maybe()
    if not under and not done.errors:
        # Only once every row was checked against these rules (and re-queued where needed): a crash
        # or an unreadable directory before this point means the next scan checks them again.
        manifest.set_meta(rules_key, fingerprint)


def _repurpose(manifest: Manifest, root: Root, entry: Entry) -> Candidate | None:
    """The rules now give an unchanged file another purpose: queue it, and let the hash stage's quick
    check hand it to the upload stage without reading it (None: the file is gone meanwhile)."""
    st = stat_path(str(root.path / entry.relpath))
    if not isinstance(st, FileStat):
        return None
    purpose = root.rules.purpose_for(entry.relpath)
    manifest.mark_queued(entry.key, xxh3=entry.xxh3, md5=entry.md5, purpose=purpose, stat=entry.stat)
    log.info("purpose changed", path=entry.relpath, was=entry.purpose, now=purpose)
    return Candidate(root, entry.root_id, entry.relpath, st)


async def mark_missing(
    rows: list[Entry],
    grace: float,
    *,
    roots: RootTable,
    manifest: Manifest,
    counters: Counters,
    clock: Callable[[], float],
) -> None:
    """Rows whose path was not found: remember since when; past the grace period, deleted."""
    now = clock()
    due = {e.key for e in rows if isinstance(on_missing(e, now, grace), MarkDeleted | Forget)}

    def still_there(keys: Collection[FileKey]) -> set[FileKey]:
        return {k for k in keys if (p := roots.path_of(k)) is not None and stat_path(str(p)) is not None}

    # Re-stat off the loop before acting: the scan's snapshot may predate a file that came back.
    present = await asyncio.to_thread(still_there, due)
    for snapshot in rows:
        entry = manifest.get(snapshot.key)  # the row as it is now, not as the scan saw it
        if entry is None:
            continue
        if entry.key in present:
            manifest.clear_missing(entry.key)
            continue
        action = on_missing(entry, now, grace)
        if isinstance(action, MarkMissing):
            manifest.mark_missing(entry.key, action.since)
        elif isinstance(action, MarkDeleted) and entry.key in due:
            manifest.mark_deleted(entry.key)
            counters.deleted += 1
            log.info("deleted locally", path=entry.relpath, remote_id=entry.remote_id)
        elif isinstance(action, Forget) and entry.key in due:
            manifest.remove(entry.key)


async def sweep_missing(
    roots: RootTable, *, manifest: Manifest, counters: Counters, clock: Callable[[], float]
) -> list[Root]:
    """Rows missing past their grace become deleted, for every available root; returns the roots that
    were held and are available again (the caller walks them now rather than at the next rescan)."""
    back = []
    for root in roots.roots:
        was_held = roots.is_held(root)
        root_id = await roots.refresh(root)
        if root_id is None:
            continue
        if was_held:
            back.append(root)
        await mark_missing(
            manifest.missing_rows(root_id),
            root.watch.delete_grace_seconds,
            roots=roots,
            manifest=manifest,
            counters=counters,
            clock=clock,
        )
    return back


async def recovery(
    manifest: Manifest,
    roots: RootTable,
    *,
    due: Callable[[Entry], bool],
    pending: Collection[FileKey],
) -> tuple[list[Candidate], list[UploadJob]]:
    """Rows left `queued` or `uploading` (a crash, a retry due): candidates back through the quick check.

    A row left `uploading` whose file is gone still becomes a job: it is resolved by md5 (its upload may
    have landed); afterwards the missing-file rules decide what becomes of it.
    """
    rows = [
        e
        for state in (State.UPLOADING, State.QUEUED)
        for e in manifest.in_state(state)
        if roots.by_id(e.root_id) is not None and e.key not in pending and due(e)
    ]

    def stat_all() -> list[FileStat | StatError | None]:
        return [stat_path(str(roots.path_of(e.key))) for e in rows]

    stats = await asyncio.to_thread(stat_all)
    found: list[Candidate] = []
    orphans: list[UploadJob] = []
    for entry, st in zip(rows, stats, strict=True):
        root = roots.by_id(entry.root_id)
        assert root is not None
        if isinstance(st, FileStat):
            found.append(Candidate(root, entry.root_id, entry.relpath, st))
        elif st is None and entry.state is State.UPLOADING:
            path = root.path / entry.relpath
            orphans.append(UploadJob(entry.key, path, entry.md5, entry.purpose, entry.stat, entry.updated_at))
    return found, orphans
