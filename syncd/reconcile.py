"""The reconciler (design §4): list every remote file, plan (pure), hold what the guards forbid, apply.

``plan_reconcile`` is a pure function over plain data (manifest rows, the owned-remotes ledger, the full
remote listing, root health, now); ``reconcile`` does the I/O around it: the listing, the deletes and the
manifest writes. ``observe_local`` is the read-only stand-in for the sync pass that a ``--dry-run`` may
not run.

Choices (design §4 is silent on them), and why:
- **Old versions are pruned.** When a file is edited, its previous remote file is referenced by no path
  (``mark_queued`` dropped it; only the ledger remembers it). Like ``rclone sync`` without
  ``--backup-dir`` and like Syncthing, which replaces a file, the remote mirrors the current content:
  an old version is pruned as soon as no path holds it. ``prune_deleted = false`` keeps it.
- **Upload-only** (``prune_deleted = false``) never deletes a remote file because its local copy went
  away or changed: the ledger entry is forgotten ("released"), so a later switch to ``true`` does not
  prune it either. Only an explicitly configured ``retention_days`` still prunes.
- **A pending local copy protects a prune candidate.** A remote file none of whose paths is live is kept
  while a ``queued``/``uploading`` row has the same (md5, purpose): that row (a rename or copy not yet
  resolved, e.g. after a failed lookup) is about to reuse it.
- **Root guard, per root.** A candidate touching any row of an unavailable root is held, and so is
  everything else about that root (a vanished remote is not re-queued: the local file is not confirmed);
  other roots proceed. Orphaned old versions belong to no row and are not held by a root.
- **Big-delete guard counts remote deletes only** (prunes of files still listed, retention included).
  When it trips, every remote delete is held; bookkeeping that deletes nothing (releases, re-queues,
  finishing a delete a crash interrupted) still applies. The fraction check ignores plans of at most
  ``FRACTION_MIN_DELETES`` deletions: otherwise deleting the only file of a fresh folder would need
  ``--confirm``. ``max_delete = 0`` holds every delete (as rclone's ``--max-delete 0``).
- **Crash safety.** Each delete is sent first, then its manifest side is written and committed. A rerun
  after a crash finds the file gone from the listing (or gets 404) and only finishes the manifest side:
  nothing is deleted twice. A retention prune whose file is already gone still marks its rows
  ``expired`` (a crash between the delete and the commit must not re-upload it).
- **Concurrency with the pipeline.** Rows synced after the listing began (``updated_at > now``) are not
  judged against it, and before each delete the live reference count is read again.
- **after_sync.** A source that after_sync deleted or moved is not a local delete: its row stays
  ``synced`` and its remote file counts as referenced (``OwnedRemote.refs``) even once a new file took
  over the path, so it is never pruned as deleted or as an old version (retention still applies); a
  vanished remote copy of it is not re-uploaded (there is nothing local to upload).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

import structlog

from syncd.api import ApiError, FileResponse, FilesClient, NotFoundError
from syncd.config import ReconcileConfig
from syncd.counters import Counters
from syncd.manifest import NOTE_ERROR, NOTE_HELD, Entry, FileKey, Manifest, ManifestReader, OwnedRemote, State
from syncd.plan import MarkDeleted, counts_as_missing, on_missing
from syncd.roots import Root, RootRecord, RootTable, kept_by, observe_root, unavailable_reason
from syncd.rules import CompiledRules
from syncd.scan import walk
from syncd.state import StateError
from syncd.supervise import Gate, held

__all__ = [
    "FRACTION_MIN_DELETES",
    "Action",
    "Held",
    "Kept",
    "LocalView",
    "Plan",
    "Prune",
    "ReconcileReport",
    "Release",
    "RemoteFile",
    "Requeue",
    "Why",
    "observe_local",
    "plan_reconcile",
    "reconcile",
]

SECONDS_PER_DAY = 86400.0
FRACTION_MIN_DELETES = 10
"""Plans deleting at most this many files skip the fraction check (a guess at "a user tidying up")."""
CLOCK_SKEW_SECONDS = 300.0
"""An owned file absent from the listing but created this recently may postdate the listing: not forgotten."""


log = structlog.get_logger("syncd.reconcile")


class Why(StrEnum):
    DELETED = "deleted locally"
    OLD_VERSION = "old version (the file was edited; no path holds it)"
    EXPIRED = "retention passed"
    VANISHED = "remote file vanished; the local file still exists"
    NOT_OURS = "not created by syncd"
    STILL_HELD = "another path still holds it"
    UPLOAD_ONLY = "prune_deleted = false (upload-only)"
    NO_REMOTE = "never had a remote file"


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """What the planner reads from one listed remote file."""

    id: str
    purpose: str
    created_at: float
    md5: str | None = None

    @classmethod
    def from_response(cls, item: FileResponse) -> RemoteFile:
        return cls(item.id, item.purpose, item.created_at.timestamp(), item.md5)


@dataclass(frozen=True, slots=True)
class Prune:
    """Delete ``remote_id`` (when ``listed``; else a crash already did), then drop ``remove`` rows (deleted),
    mark ``expire`` rows expired and forget the ledger entry."""

    remote_id: str
    why: Why
    listed: bool
    remove: tuple[FileKey, ...] = ()
    expire: tuple[FileKey, ...] = ()

    @property
    def keys(self) -> tuple[FileKey, ...]:
        return self.remove + self.expire


@dataclass(frozen=True, slots=True)
class Release:
    """Drop ``deleted`` rows without touching the remote file; ``forget`` its ledger entry (upload-only)."""

    remote_id: str | None
    why: Why
    remove: tuple[FileKey, ...]
    forget: bool = False

    @property
    def keys(self) -> tuple[FileKey, ...]:
        return self.remove


@dataclass(frozen=True, slots=True)
class Requeue:
    """``synced`` rows whose remote file vanished: back to ``queued`` so the next pass uploads them."""

    remote_id: str
    rows: tuple[Entry, ...]
    forget: bool
    why: Why = Why.VANISHED

    @property
    def keys(self) -> tuple[FileKey, ...]:
        return tuple(e.key for e in self.rows)


Action = Prune | Release | Requeue


@dataclass(frozen=True, slots=True)
class Held:
    """An action a guard forbids; ``guard`` names it (root-unavailable, max-delete, max-delete-fraction)."""

    action: Action
    guard: str
    reason: str


@dataclass(frozen=True, slots=True)
class Kept:
    """A prune candidate deliberately kept, said in the dry-run output."""

    remote_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    actions: tuple[Action, ...]
    held: tuple[Held, ...] = ()
    kept: tuple[Kept, ...] = ()
    guards: tuple[str, ...] = ()
    """One line per guard that held something back; every unavailable root is one, candidates or not."""

    @property
    def deletes(self) -> int:
        return sum(1 for a in self.actions if isinstance(a, Prune) and a.listed)


def _retention_passed(
    created_at: float | None, purpose: str | None, retention_days: Mapping[str, float], now: float
) -> bool:
    if created_at is None or purpose is None:
        return False
    days = retention_days.get(purpose)
    return days is not None and created_at + days * SECONDS_PER_DAY <= now


def plan_reconcile(
    rows: Iterable[Entry],
    ledger: Iterable[OwnedRemote],
    listing: Mapping[str, RemoteFile],
    *,
    settings: ReconcileConfig,
    unavailable: Mapping[int, str],
    now: float,
    confirm: bool,
    assume_deleted: Container[FileKey] = frozenset(),
    root_paths: Mapping[int, str] | None = None,
) -> Plan:
    """What to prune, release and re-queue, given the *complete* listing (see the module docstring).

    ``rows`` are streamed once; only rows that lead to an action are kept. ``assume_deleted``: ``synced``
    rows the caller knows a sync pass would mark deleted (the dry run, which may not run one).
    """
    owned = {o.remote_id: o for o in ledger}
    retention: dict[str, float] = {str(k): v for k, v in settings.retention_days.items()}
    expiring = {
        rid
        for rid in owned
        if rid in listing and _retention_passed(listing[rid].created_at, listing[rid].purpose, retention, now)
    }
    deleted: dict[str | None, list[Entry]] = defaultdict(list)
    synced: dict[str, list[Entry]] = defaultdict(list)
    assumed_refs: dict[str, int] = defaultdict(int)
    pending: set[tuple[str, str]] = set()
    for entry in rows:
        state = entry.state
        if state is State.SYNCED and entry.key in assume_deleted:
            state = State.DELETED
            if entry.remote_id is not None:
                assumed_refs[entry.remote_id] += 1
        if state is State.DELETED:
            deleted[entry.remote_id].append(entry)
        elif state is State.SYNCED and entry.remote_id is not None:
            if entry.remote_id in expiring or (entry.remote_id not in listing and entry.updated_at <= now):
                synced[entry.remote_id].append(entry)
        elif state in (State.QUEUED, State.UPLOADING):
            pending.add((entry.md5, entry.purpose))

    def refs(rid: str) -> int:
        return owned[rid].refs - assumed_refs.get(rid, 0)

    def pending_copy(rid: str, group: Sequence[Entry]) -> bool:
        listed = listing.get(rid)
        contents = {(e.md5, e.purpose) for e in group}
        if listed is not None and listed.md5 is not None:
            contents.add((listed.md5, listed.purpose))
        return not pending.isdisjoint(contents)

    actions: list[Action] = []
    kept: list[Kept] = []
    # Not listed but past retention: a crash came between the delete and the commit; finish, never re-upload.
    expired_gone = {
        rid
        for rid, group in synced.items()
        if rid in owned
        and _retention_passed(
            owned[rid].created_at if owned[rid].created_at is not None else group[0].remote_created_at,
            group[0].purpose,
            retention,
            now,
        )
    }
    for rid in sorted(expiring | expired_gone):
        actions.append(
            Prune(
                rid,
                Why.EXPIRED,
                rid in expiring,
                remove=_keys(deleted.pop(rid, ())),
                expire=_keys(synced.pop(rid, ())),
            )
        )
    for maybe_rid, group in sorted(deleted.items(), key=lambda kv: (kv[0] is not None, kv[0] or "")):
        remove = _keys(group)
        if maybe_rid is None:
            actions.append(Release(None, Why.NO_REMOTE, remove))
            continue
        rid = maybe_rid
        if rid not in owned:
            actions.append(Release(rid, Why.NOT_OURS, remove))
        elif refs(rid) > 0:
            actions.append(Release(rid, Why.STILL_HELD, remove))
        elif not settings.prune_deleted:
            actions.append(Release(rid, Why.UPLOAD_ONLY, remove, forget=True))
        elif pending_copy(rid, group):
            kept.append(Kept(rid, "a queued file with the same content will reuse it"))
        else:
            actions.append(Prune(rid, Why.DELETED, rid in listing, remove=remove))
    for rid, entry_group in sorted(synced.items()):
        # A source after_sync removed is not uploaded again: there is nothing local to upload.
        present = tuple(e for e in entry_group if e.missing_since is None and e.source is None)
        if present:
            actions.append(Requeue(rid, present, forget=rid in owned))
    for rid, remote in owned.items():  # entries of the ledger no row mentions
        if remote.refs > 0 or rid in deleted or rid in synced or rid in expiring or rid in expired_gone:
            continue
        if rid not in listing:
            if remote.created_at is None or remote.created_at <= now - CLOCK_SKEW_SECONDS:
                actions.append(Prune(rid, Why.OLD_VERSION, False))
        elif not settings.prune_deleted:
            actions.append(Release(rid, Why.UPLOAD_ONLY, (), forget=True))
        elif pending_copy(rid, ()):
            kept.append(Kept(rid, "a queued file with the same content will reuse it"))
        else:
            actions.append(Prune(rid, Why.OLD_VERSION, True))
    return _guard(
        actions,
        kept,
        owned_listed=sum(1 for rid in owned if rid in listing),
        settings=settings,
        unavailable=unavailable,
        confirm=confirm,
        root_paths=root_paths or {},
    )


def _keys(group: Iterable[Entry]) -> tuple[FileKey, ...]:
    return tuple(sorted(e.key for e in group))


def _guard(
    actions: list[Action],
    kept: list[Kept],
    *,
    owned_listed: int,
    settings: ReconcileConfig,
    unavailable: Mapping[int, str],
    confirm: bool,
    root_paths: Mapping[int, str],
) -> Plan:
    held: list[Held] = []
    guards: list[str] = []
    allowed: list[Action] = []
    held_roots: dict[int, int] = defaultdict(int)
    for action in actions:
        roots = sorted({k.root_id for k in action.keys if k.root_id in unavailable})
        if roots:
            root = roots[0]
            held_roots[root] += 1
            where = root_paths.get(root, f"root {root}")
            held.append(Held(action, "root-unavailable", f"{where}: {unavailable[root]}"))
        else:
            allowed.append(action)
    for root, reason in sorted(unavailable.items()):
        guards.append(
            f"root-unavailable: {root_paths.get(root, f'root {root}')}: {reason}; none of its"
            f" files count as deleted ({held_roots.get(root, 0)} action(s) held)"
        )
    deleting = [a for a in allowed if isinstance(a, Prune) and a.listed]
    n = len(deleting)
    guard: str | None = None
    if n > settings.max_delete:
        guard = "max-delete"
        why = f"the plan deletes {n} remote files, more than max_delete = {settings.max_delete}"
    elif n > FRACTION_MIN_DELETES and n > settings.max_delete_fraction * owned_listed:
        guard = "max-delete-fraction"
        why = (
            f"the plan deletes {n} of {owned_listed} remote files syncd owns, more than"
            f" max_delete_fraction = {settings.max_delete_fraction:g}"
        )
    if guard is not None and not confirm:
        guards.append(f"{guard}: {why}; run `syncd reconcile --once --confirm` to apply it")
        held.extend(Held(a, guard, why) for a in deleting)
        allowed = [a for a in allowed if not (isinstance(a, Prune) and a.listed)]
    return Plan(tuple(allowed), tuple(held), tuple(kept), tuple(guards))


# -- the dry run's view of the local side ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalView:
    unavailable: dict[int, str]
    gone: frozenset[FileKey]
    """``synced`` rows a sync pass would mark deleted now (missing past grace, not moved by inode)."""


def observe_local(roots: Sequence[Root], reader: ManifestReader, *, now: float) -> LocalView:
    """Read-only: root health and the rows a sync pass would mark deleted, for ``--dry-run``.

    Files not yet hashed are not known to the manifest; a missing file whose inode (and size) is found at
    another path counts as moved, not deleted, which covers renames without hashing anything.
    """
    stored = {r.path: r for r in reader.roots()}
    unavailable: dict[int, str] = {}
    gone: set[FileKey] = set()
    for root in roots:
        record = stored.get(str(root.path))
        if record is None:
            continue
        rules = root.rules
        obs = observe_root(root.path, marker=root.watch.marker, keeps=kept_by(rules))
        reason = unavailable_reason(obs, RootRecord(record.device, record.inode, record.had_files))
        if reason is not None:
            unavailable[record.root_id] = reason
            continue
        seen: set[str] = set()
        moved: set[tuple[int, int]] = set()
        unreadable: list[str] = []
        for result in walk(
            str(root.path), ignores_dir=rules.ignores_dir if root.watch.recursive else (lambda rel: True)
        ):
            seen.add(result.relpath)
            if result.stat is not None:
                moved.add((result.stat.inode, result.stat.size))
            else:
                unreadable.append(result.relpath + "/")

        def kept(relpath: str, rules: CompiledRules = rules) -> bool:
            return rules.accepts(relpath, 0) is None

        for entry in reader.iter_root(record.root_id):
            if entry.state is not State.SYNCED or entry.source is not None or entry.relpath in seen:
                continue  # a source after_sync removed is not a local delete
            # As the sync pass decides: unreadable is not gone, and excluded by the rules is not deleted.
            if not counts_as_missing(
                entry.relpath, recursive=root.watch.recursive, accepted=kept, unreadable=unreadable
            ):
                continue
            if (entry.stat.inode, entry.stat.size) in moved:
                continue
            if isinstance(on_missing(entry, now, root.watch.delete_grace_seconds), MarkDeleted):
                gone.add(entry.key)
    return LocalView(unavailable, frozenset(gone))


# -- applying ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconcileReport:
    """What one run planned, applied and held; ``exit_code`` is what ``reconcile --once`` returns."""

    dry_run: bool
    plan: Plan | None
    """None when the listing failed (nothing was planned or applied)."""
    applied: tuple[Action, ...] = ()
    error: str | None = None
    root_paths: Mapping[int, str] = field(default_factory=dict)

    @property
    def held(self) -> bool:
        """A guard held something back (an unavailable root always does: its deletions go unseen)."""
        return self.plan is not None and bool(self.plan.held or self.plan.guards)

    @property
    def requeued(self) -> int:
        """Rows put back to ``queued``: run one more sync pass to upload them now."""
        return sum(len(a.rows) for a in self.applied if isinstance(a, Requeue))

    @property
    def deleted(self) -> int:
        return sum(1 for a in self.applied if isinstance(a, Prune) and a.listed)

    @property
    def exit_code(self) -> int:
        return 1 if self.held or self.error is not None else 0

    def render(self) -> str:
        """The plan as text, one line per action (what, why); the dry run prints this."""
        if self.plan is None:
            return f"reconcile: no plan: {self.error}"
        lines = [_describe(a, self.root_paths) for a in self.plan.actions]
        lines += [f"HELD ({h.guard}) {_describe(h.action, self.root_paths)}" for h in self.plan.held]
        lines += [f"keep {k.remote_id}: {k.reason}" for k in self.plan.kept]
        lines += [f"guard {g}" for g in self.plan.guards]
        if self.error is not None:
            lines.append(f"error: {self.error}")
        if not lines:
            lines.append("nothing to do")
        return "\n".join(lines)


def _paths(keys: Iterable[FileKey], roots: Mapping[int, str]) -> str:
    shown = [
        os.path.join(roots[k.root_id], k.relpath) if k.root_id in roots else f"{k.root_id}:{k.relpath}"
        for k in keys
    ]
    return ", ".join(shown)


def _describe(action: Action, roots: Mapping[int, str]) -> str:
    if isinstance(action, Prune):
        verb = "delete remote" if action.listed else "forget (already gone remotely)"
        what = f"{verb} {action.remote_id}: {action.why.value}"
        if action.remove:
            what += f"; drop rows {_paths(action.remove, roots)}"
        if action.expire:
            what += f"; mark expired {_paths(action.expire, roots)}"
        return what
    if isinstance(action, Release):
        what = f"release {action.remote_id or '(none)'}: {action.why.value}; keep the remote file"
        return what + (f"; drop rows {_paths(action.remove, roots)}" if action.remove else "")
    return f"re-upload {_paths(action.keys, roots)}: {action.why.value} ({action.remote_id})"


async def make_plan(
    state_dir: Path,
    client: FilesClient,
    *,
    settings: ReconcileConfig,
    unavailable: Mapping[int, str],
    now: float,
    confirm: bool,
    assume_deleted: Collection[FileKey] = frozenset(),
) -> ReconcileReport:
    """Full listing → plan, changing nothing (this is ``--dry-run``, and the first half of a run).

    The manifest is read through its own read-only connection on a worker thread: the plan is over every
    row, and work that grows with the manifest must not hold up the event loop (or need the lock).
    """
    try:
        listing = {item.id: RemoteFile.from_response(item) for item in await client.list_all()}
    except ApiError as exc:
        failed = f"listing remote files failed, nothing planned: {exc}"
        log.error("reconcile aborted", reason=failed)
        return ReconcileReport(True, None, error=failed)

    def plan() -> ReconcileReport:
        with ManifestReader.open_readonly(state_dir) as reader:
            root_paths = {r.root_id: r.path for r in reader.roots()}
            made = plan_reconcile(
                reader.iter_all(),
                reader.owned_remotes(),
                listing,
                settings=settings,
                unavailable=unavailable,
                now=now,
                confirm=confirm,
                assume_deleted=assume_deleted,
                root_paths=root_paths,
            )
        return ReconcileReport(True, made, root_paths=root_paths)

    report = await asyncio.to_thread(plan)
    for guard in report.plan.guards if report.plan is not None else ():
        log.error("reconcile held", guard=guard)
    return report


async def reconcile(
    manifest: Manifest,
    client: FilesClient,
    *,
    settings: ReconcileConfig,
    unavailable: Mapping[int, str],
    now: float,
    confirm: bool,
) -> ReconcileReport:
    """One reconcile run: full listing → plan → guards → apply; held plans and errors become notes.

    Run it right after a sync pass (whose root table gives ``unavailable``) so the manifest has seen
    local changes. ``now`` must be read before this call: rows updated later are not judged against the
    listing. Re-queued rows are uploaded by the next sync pass.
    """
    manifest.commit()  # the planner's own connection must see every row written so far
    planned = await make_plan(
        manifest.path.parent, client, settings=settings, unavailable=unavailable, now=now, confirm=confirm
    )
    plan = planned.plan
    if plan is None:
        manifest.set_note(NOTE_ERROR, planned.error or "listing failed")
        manifest.commit()
        return replace(planned, dry_run=False)
    applied, error = await _apply(plan, manifest, client)
    if plan.guards:
        manifest.set_note(NOTE_HELD, "; ".join(plan.guards))
    else:
        manifest.clear_note(NOTE_HELD)
    if error is not None:
        manifest.set_note(NOTE_ERROR, error)
    else:
        manifest.clear_note(NOTE_ERROR)
    manifest.commit()
    log.info(
        "reconcile done",
        applied=len(applied),
        planned=len(plan.actions),
        held=len(plan.held),
        deleted=sum(1 for a in applied if isinstance(a, Prune) and a.listed),
        requeued=sum(len(a.rows) for a in applied if isinstance(a, Requeue)),
    )
    return ReconcileReport(False, plan, tuple(applied), error, planned.root_paths)


async def _apply(plan: Plan, manifest: Manifest, client: FilesClient) -> tuple[list[Action], str | None]:
    """Manifest-only actions first (one commit), then each delete: remote first, then its rows, commit."""
    applied: list[Action] = []
    remote: list[Prune] = []
    for action in plan.actions:
        if isinstance(action, Prune) and action.listed:
            remote.append(action)
            continue
        if isinstance(action, Release):
            _release(manifest, action)
        elif isinstance(action, Requeue):
            _requeue(manifest, action)
        else:
            _finish_prune(manifest, action)
        applied.append(action)
    manifest.commit()
    for prune in remote:
        if prune.why is not Why.EXPIRED and manifest.live_refs(prune.remote_id) > 0:
            log.info("prune skipped: a path holds the file again", remote_id=prune.remote_id)
            continue
        try:
            await client.delete(prune.remote_id)
        except NotFoundError:
            pass  # gone already (a retried delete whose first try landed, another client): same outcome
        except ApiError as exc:
            error = f"deleting {prune.remote_id} failed, the rest of the plan waits for the next run: {exc}"
            log.error("reconcile stopped", remote_id=prune.remote_id, error=str(exc))
            return applied, error
        _finish_prune(manifest, prune)
        manifest.commit()
        applied.append(prune)
        log.info(
            "pruned", remote_id=prune.remote_id, why=prune.why.value, paths=[k.relpath for k in prune.keys]
        )
    return applied, None


def _release(manifest: Manifest, action: Release) -> None:
    for key in action.remove:
        entry = manifest.get(key)
        if entry is not None and entry.state is State.DELETED and entry.remote_id == action.remote_id:
            manifest.remove(key)
    if action.forget and action.remote_id is not None and manifest.live_refs(action.remote_id) == 0:
        manifest.forget_owned(action.remote_id)


def _requeue(manifest: Manifest, action: Requeue) -> None:
    for planned in action.rows:
        entry = manifest.get(planned.key)
        if entry is not None and entry.state is State.SYNCED and entry.remote_id == action.remote_id:
            manifest.mark_queued(
                entry.key, xxh3=entry.xxh3, md5=entry.md5, purpose=entry.purpose, stat=entry.stat
            )
    if action.forget and manifest.live_refs(action.remote_id) == 0:
        manifest.forget_owned(action.remote_id)


def _finish_prune(manifest: Manifest, prune: Prune) -> None:
    """The manifest side of a prune, from the rows as they are now (not as planned)."""
    for entry in manifest.rows_for_remote(prune.remote_id):
        if entry.state is State.DELETED:
            manifest.remove(entry.key)
        elif entry.state is State.SYNCED:
            if prune.why is Why.EXPIRED:
                manifest.mark_expired(entry.key)
            else:  # synced to it after the plan was made: upload that path again
                manifest.mark_queued(
                    entry.key, xxh3=entry.xxh3, md5=entry.md5, purpose=entry.purpose, stat=entry.stat
                )
    manifest.forget_owned(prune.remote_id)


# -- the stage -------------------------------------------------------------------------------------------


async def run(
    stop: asyncio.Event,
    *,
    ready: Awaitable[object],
    roots: RootTable,
    manifest: Manifest,
    client: FilesClient,
    settings: ReconcileConfig,
    forget: Callable[[], None],
    clock: Callable[[], float],
    counters: Counters,
    gate: Gate,
) -> None:
    """Every ``interval_seconds`` once ``ready`` (every root scanned once): fresh root guards, then one
    run; returns when ``stop`` is set. ``forget`` drops the upload stage's listing, which a prune makes
    stale. Each run's end is ``counters.last_reconcile_at`` (for `status`)."""
    await ready
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.interval_seconds)
        if stop.is_set():
            return
        try:
            for root in roots.roots:
                await roots.refresh(root)  # a root may have vanished since its scan
            forget()
            report = await reconcile(
                manifest,
                client,
                settings=settings,
                unavailable=dict(roots.unavailable),
                now=clock(),
                confirm=False,
            )
            for action in report.applied:
                if isinstance(action, Prune) and action.listed:
                    counters.pruned[action.why.name.lower()] += 1
        except StateError as exc:
            await held(gate, exc)
            continue
        except Exception:
            counters.crashed += 1
            log.exception("reconcile failed unexpectedly; trying again next interval")
        counters.last_reconcile_at = clock()
