"""The SQLite manifest on a real file: schema, transitions, refcounts, quick index, lock, read-only."""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import astuple
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.manifest import (
    MIGRATIONS,
    REMOVABLE,
    RETRYABLE_FROM,
    SCHEMA_VERSION,
    TRANSITIONS,
    FileKey,
    InvalidTransition,
    Manifest,
    ManifestMissing,
    ManifestReader,
    SchemaMismatch,
    State,
    StatKey,
)
from syncd.state import MANIFEST_NAME, AlreadyRunning, StateLock

REPO = Path(__file__).resolve().parents[1]
STAT = StatKey(size=10, mtime_ns=1_700_000_000_000_000_000, ctime_ns=1_700_000_000_000_000_001, inode=42)
X1, M1 = "1" * 32, "a" * 32
X2, M2 = "2" * 32, "b" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def manifest(tmp_path: Path, clock: Clock) -> Iterator[Manifest]:
    with StateLock(tmp_path / "state") as lock:
        m = Manifest.open(lock, clock=clock)
        yield m
        m.close()


def queue(m: Manifest, key: FileKey, *, xxh3: str = X1, md5: str = M1, purpose: str = "assistants") -> None:
    m.mark_queued(key, xxh3=xxh3, md5=md5, purpose=purpose, stat=STAT)


def sync(m: Manifest, key: FileKey, remote_id: str, *, owned: bool, md5: str = M1) -> None:
    queue(m, key, md5=md5)
    assert m.mark_uploading(key, md5=md5)
    assert m.mark_synced(key, md5=md5, remote_id=remote_id, owned=owned, remote_created_at=5.0)


# schema


def test_fresh_state_dir_gets_the_current_schema_and_survives_reopen(tmp_path: Path) -> None:
    state = tmp_path / "new" / "state"
    key = FileKey(1, "docs/ünï code.pdf")
    with StateLock(state) as lock:
        m = Manifest.open(lock)
        queue(m, key)
        m.close()
        conn = sqlite3.connect(state / MANIFEST_NAME)
        version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        mode = conn.execute("PRAGMA journal_mode").fetchone()
        conn.close()
        assert version == (str(SCHEMA_VERSION),)
        assert mode == ("wal",)
        m = Manifest.open(lock)
        entry = m.get(key)
        m.close()
    assert entry is not None
    assert (entry.state, entry.stat, entry.xxh3, entry.md5) == (State.QUEUED, STAT, X1, M1)


def test_a_manifest_from_a_newer_syncd_is_refused(tmp_path: Path) -> None:
    with StateLock(tmp_path) as lock:
        Manifest.open(lock).close()
        conn = sqlite3.connect(tmp_path / MANIFEST_NAME)
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
        conn.commit()
        conn.close()
        with pytest.raises(SchemaMismatch, match="v99"):
            Manifest.open(lock)
    with pytest.raises(SchemaMismatch, match="v99"):
        ManifestReader.open_readonly(tmp_path)


def test_a_v1_manifest_is_migrated_to_the_state_time_index(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / MANIFEST_NAME, isolation_level=None)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    MIGRATIONS[0](conn)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.close()
    with StateLock(tmp_path) as lock:
        m = Manifest.open(lock)
        indexes = {r[0] for r in m._conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        plan = m._conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM files WHERE state='synced' ORDER BY updated_at DESC LIMIT 5"
        ).fetchall()
        m.close()
    assert "files_state_time" in indexes
    assert "files_state" not in indexes
    assert "files_state_time" in str(plan)
    assert "TEMP B-TREE" not in str(plan)  # no sort: the walk stops after LIMIT rows


def test_local_copies_is_an_index_lookup_whatever_the_other_indexes(manifest: Manifest) -> None:
    """Every new file asks for local copies of its md5: a scan of the synced rows there made an initial
    sync of 10,000 files quadratic (16 s of SQLite) once (state, updated_at) existed."""
    sent: list[str] = []
    manifest._conn.set_trace_callback(sent.append)
    manifest.local_copies(M1, "assistants")
    manifest._conn.set_trace_callback(None)
    queries = [q for q in sent if q.startswith("SELECT remote_id")]
    assert queries
    for query in queries:
        plan = str(manifest._conn.execute("EXPLAIN QUERY PLAN " + query).fetchall())
        assert "files_synced_md5" in plan, plan


def test_open_requires_the_lock(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="lock"):
        Manifest.open(StateLock(tmp_path))


# lifecycle, refcount, ownership


def test_upload_lifecycle_and_status_queries(manifest: Manifest, clock: Clock) -> None:
    a, b = FileKey(1, "a.pdf"), FileKey(1, "b.pdf")
    queue(manifest, a)
    queue(manifest, b, xxh3=X2, md5=M2)
    assert manifest.bytes_queued() == 2 * STAT.size
    assert manifest.mark_uploading(a, md5=M1)
    assert [e.relpath for e in manifest.in_state(State.UPLOADING)] == ["a.pdf"]
    clock.now += 1
    assert manifest.mark_retry(a, md5=M1, error="503 from server", next_attempt_at=clock.now + 30)
    assert manifest.mark_uploading(a, md5=M1)
    assert manifest.mark_synced(a, md5=M1, remote_id="file-1", owned=True, remote_created_at=7.5)
    clock.now += 1
    assert manifest.mark_failed(b, md5=M2, reason="415 unsupported type")
    manifest.commit()

    synced = manifest.get(a)
    assert synced is not None
    assert (synced.state, synced.remote_id, synced.owned, synced.remote_created_at) == (
        State.SYNCED,
        "file-1",
        True,
        7.5,
    )
    assert (synced.attempts, synced.next_attempt_at, synced.last_error) == (0, None, None)
    failed = manifest.get(b)
    assert failed is not None
    assert (failed.state, failed.attempts, failed.last_error) == (State.FAILED, 1, "415 unsupported type")
    counts = manifest.counts_by_state()
    assert counts[State.SYNCED] == 1
    assert counts[State.FAILED] == 1
    assert counts[State.QUEUED] == 0
    assert manifest.bytes_queued() == 0
    assert [e.last_error for e in manifest.last_errors(5)] == ["415 unsupported type"]
    assert manifest.local_copies(M1, "assistants")[0].remote_id == "file-1"
    assert manifest.local_copies(M1, "vision") == []


def test_paths_sharing_a_remote_file_are_refcounted(manifest: Manifest) -> None:
    a, b = FileKey(1, "a.pdf"), FileKey(1, "copy of a.pdf")
    sync(manifest, a, "file-1", owned=True)
    sync(manifest, b, "file-1", owned=False)  # a copy found by hash: still ours, because the ledger says so
    shared = manifest.get(b)
    assert shared is not None
    assert shared.owned
    assert manifest.live_refs("file-1") == 2
    manifest.mark_deleted(a)
    assert manifest.live_refs("file-1") == 1
    manifest.mark_deleted(b)
    assert manifest.live_refs("file-1") == 0
    [ledger] = manifest.owned_remotes()
    assert (ledger.remote_id, ledger.refs) == ("file-1", 0)
    assert [e.state for e in manifest.rows_for_remote("file-1")] == [State.DELETED, State.DELETED]
    manifest.remove(a)
    manifest.forget_owned("file-1")
    assert manifest.owned_remote_ids() == set()
    assert manifest.get(a) is None


def test_adopted_files_are_never_owned(manifest: Manifest) -> None:
    key = FileKey(1, "theirs.pdf")
    sync(manifest, key, "file-of-another-client", owned=False)
    entry = manifest.get(key)
    assert entry is not None
    assert not entry.owned
    assert manifest.owned_remote_ids() == set()


def test_changed_content_releases_the_old_remote_but_the_ledger_keeps_it(manifest: Manifest) -> None:
    key = FileKey(1, "report.pdf")
    sync(manifest, key, "file-old", owned=True)
    queue(manifest, key, xxh3=X2, md5=M2)
    entry = manifest.get(key)
    assert entry is not None
    assert (entry.state, entry.remote_id, entry.md5) == (State.QUEUED, None, M2)
    assert manifest.live_refs("file-old") == 0
    assert manifest.owned_remote_ids() == {"file-old"}


def test_an_upload_overtaken_by_a_change_is_not_recorded_on_the_row(manifest: Manifest) -> None:
    key = FileKey(1, "scan.pdf")
    queue(manifest, key)
    assert manifest.mark_uploading(key, md5=M1)
    queue(manifest, key, xxh3=X2, md5=M2)  # the scanner wrote more pages meanwhile
    assert not manifest.mark_synced(key, md5=M1, remote_id="file-stale", owned=True, remote_created_at=1.0)
    assert not manifest.mark_retry(key, md5=M1, error="x", next_attempt_at=1.0)
    assert not manifest.mark_failed(key, md5=M1, reason="x")
    assert not manifest.mark_uploading(key, md5=M1)
    entry = manifest.get(key)
    assert entry is not None
    assert (entry.state, entry.md5, entry.remote_id, entry.attempts) == (State.QUEUED, M2, None, 0)
    assert manifest.owned_remote_ids() == {"file-stale"}  # so the reconciler can prune it
    assert manifest.live_refs("file-stale") == 0


def test_missing_marks_keep_the_first_time_and_any_observation_clears_them(
    manifest: Manifest, clock: Clock
) -> None:
    key = FileKey(1, "a.pdf")
    sync(manifest, key, "file-1", owned=True)
    manifest.mark_missing(key, 100.0)
    manifest.mark_missing(key, 200.0)
    entry = manifest.get(key)
    assert entry is not None
    assert entry.missing_since == 100.0
    manifest.clear_missing(key)
    assert (e := manifest.get(key)) is not None
    assert e.missing_since is None
    manifest.mark_missing(key, 300.0)
    moved = StatKey(11, 2, 3, 4)
    manifest.update_stat(key, moved)
    assert (e := manifest.get(key)) is not None
    assert (e.stat, e.missing_since, e.state) == (moved, None, State.SYNCED)


def test_expired_rows_keep_history_but_are_not_live(manifest: Manifest) -> None:
    key = FileKey(1, "old.pdf")
    sync(manifest, key, "file-1", owned=True)
    manifest.mark_expired(key)
    entry = manifest.get(key)
    assert entry is not None
    assert (entry.state, entry.remote_id, entry.owned) == (State.EXPIRED, "file-1", False)
    assert manifest.live_refs("file-1") == 0
    assert manifest.local_copies(M1, "assistants") == []


def test_newest_in_state_is_newest_first_and_bounded(manifest: Manifest, clock: Clock) -> None:
    for i in range(5):
        clock.now += 1
        sync(manifest, FileKey(1, f"s{i}.pdf"), f"file-{i}", owned=True)
        clock.now += 1
        queue(manifest, FileKey(1, f"f{i}.pdf"))
        assert manifest.mark_failed(FileKey(1, f"f{i}.pdf"), md5=M1, reason=f"TooLargeError: {i}")
    manifest.commit()
    assert [e.relpath for e in manifest.newest_in_state(State.SYNCED, 3)] == ["s4.pdf", "s3.pdf", "s2.pdf"]
    failed = manifest.newest_in_state(State.FAILED, 10)
    assert [(e.relpath, e.last_error) for e in failed[:2]] == [
        ("f4.pdf", "TooLargeError: 4"),
        ("f3.pdf", "TooLargeError: 3"),
    ]
    assert len(failed) == 5


def test_roots_and_notes(manifest: Manifest) -> None:
    root = manifest.ensure_root("/srv/scans", device=2**63 + 5, inode=128)
    again = manifest.ensure_root("/srv/scans", device=1, inode=1)
    assert again == root
    assert (root.device, root.inode, root.had_files) == (2**63 + 5, 128, False)
    sync(manifest, FileKey(root.root_id, "a.pdf"), "file-1", owned=True)
    manifest.set_root_identity(root.root_id, device=7, inode=8)
    [stored] = manifest.roots()
    assert (stored.device, stored.inode, stored.live_rows, stored.had_files) == (7, 8, 1, True)
    gone = FileKey(root.root_id, "gone.pdf")
    queue(manifest, gone)
    manifest.mark_deleted(gone)
    assert [r.live_rows for r in manifest.roots()] == [1]  # a deleted row is not a live file
    manifest.set_note("pruning held", "root /srv/scans is on another device")
    assert manifest.notes() == {"pruning held": "root /srv/scans is on another device"}
    manifest.clear_note("pruning held")
    assert manifest.notes() == {}


# the state table, against the real database


OPS = ("queued", "uploading", "synced", "failed", "retry", "deleted", "expired", "remove")
_keys = itertools.count()


@pytest.fixture(scope="module")
def shared_manifest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Manifest]:
    with StateLock(tmp_path_factory.mktemp("transitions")) as lock:
        m = Manifest.open(lock)
        yield m
        m.close()


def _apply(m: Manifest, key: FileKey, op: str) -> bool:
    """Apply one op; False when an upload job's md5-guarded transition found its row stale."""
    if op == "queued":
        queue(m, key)
    elif op == "uploading":
        return m.mark_uploading(key, md5=M1)
    elif op == "synced":
        return m.mark_synced(key, md5=M1, remote_id="file-1", owned=False, remote_created_at=None)
    elif op == "failed":
        return m.mark_failed(key, md5=M1, reason="rejected")
    elif op == "retry":
        return m.mark_retry(key, md5=M1, error="timeout", next_attempt_at=1.0)
    elif op == "deleted":
        m.mark_deleted(key)
    elif op == "expired":
        m.mark_expired(key)
    else:
        m.remove(key)
    return True


JOB_OPS = frozenset({"uploading", "synced", "failed", "retry"})
"""What an upload job does while awaiting the network; its path may be gone by then."""


def _allowed(state: State | None, op: str) -> tuple[bool, State | None]:
    if op == "remove":
        return state is None or state in REMOVABLE, None
    if op == "retry":
        return state in RETRYABLE_FROM, State.QUEUED
    target = State(op)
    return target in TRANSITIONS[state], target


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(OPS), max_size=12))
def test_every_transition_follows_the_state_table(shared_manifest: Manifest, ops: list[str]) -> None:
    key = FileKey(1, f"path-{next(_keys)}")
    state: State | None = None
    for op in ops:
        allowed, target = _allowed(state, op)
        if op in JOB_OPS and state in (None, State.DELETED):
            # The path went away while a job awaited the network: stale, never an exception.
            assert not _apply(shared_manifest, key, op)
        elif allowed:
            assert _apply(shared_manifest, key, op)
            state = target
        else:
            with pytest.raises(InvalidTransition):
                _apply(shared_manifest, key, op)
        entry = shared_manifest.get(key)
        assert (entry.state if entry is not None else None) == state
    shared_manifest.commit()


def test_the_table_matches_design_section_3() -> None:
    assert State.QUEUED in TRANSITIONS[None]
    assert State.SYNCED in TRANSITIONS[State.QUEUED]  # cache hit
    assert State.QUEUED in TRANSITIONS[State.UPLOADING]  # retryable error
    assert State.EXPIRED in TRANSITIONS[State.SYNCED]
    assert State.UPLOADING not in TRANSITIONS[State.FAILED]  # not retried until the file changes
    assert State.UPLOADING not in TRANSITIONS[State.EXPIRED]
    assert State.DELETED not in TRANSITIONS[State.UPLOADING]  # an upload in flight finishes first
    assert State.SYNCED not in TRANSITIONS[State.DELETED]
    assert State.SYNCED not in REMOVABLE  # a live reference goes through "deleted"


# quick index


def test_quick_index_answers_by_relpath_and_tracks_what_a_scan_saw(manifest: Manifest) -> None:
    huge_inode = StatKey(1, 2, 3, 2**64 - 2)  # overlayfs sets the top bit
    names = [f"dir {i % 7}/fïle {i}.pdf" for i in range(500)]
    latin1 = os.fsdecode(b"caf\xe9/r\xe9sum\xe9.pdf")  # not UTF-8: stored as bytes
    globby = ["br[a]ck*t?/f.pdf", "br[a]ck*t?/sub/g.pdf"]  # GLOB's own characters in a directory name
    for name in [*names, latin1, "top.pdf", *globby]:
        queue(manifest, FileKey(1, name))
    manifest.mark_queued(FileKey(1, "dir 0/big"), xxh3=X1, md5=M1, purpose="vision", stat=huge_inode)
    queue(manifest, FileKey(2, "dir 0/other root"))
    manifest.commit()
    index = manifest.quick_index(1)
    assert len(index) == 505
    for name in globby:
        assert index.seen_unchanged(name, *astuple(STAT)) is State.QUEUED
    s = STAT
    assert index.seen_unchanged(names[3], s.size, s.mtime_ns, s.ctime_ns, s.inode) is State.QUEUED
    assert index.seen_unchanged("top.pdf", s.size, s.mtime_ns + 1, s.ctime_ns, s.inode) is None  # changed
    h = huge_inode
    assert index.seen_unchanged("dir 0/big", h.size, h.mtime_ns, h.ctime_ns, h.inode) is State.QUEUED
    assert index.seen_unchanged(latin1, s.size, s.mtime_ns, s.ctime_ns, s.inode) is State.QUEUED
    assert index.seen_unchanged("dir 0/other root", *astuple(s)) is None  # another root's row
    assert index.seen_unchanged("dir 0/new.pdf", *astuple(s)) is None
    for name in names[::2]:
        index.seen_unchanged(name, *astuple(s))
    assert not index.all_seen()
    unseen = [e.relpath for e in manifest.iter_root(1) if not index.was_seen(e.relpath)]
    assert sorted(unseen) == sorted(n for n in names[1::2] if n != names[3])
    for name in names[1::2]:
        index.seen_unchanged(name, *astuple(s))
    assert index.all_seen()


def test_a_subtree_index_expects_only_the_rows_below_it_and_no_deleted_ones(manifest: Manifest) -> None:
    for name in ("a/x.pdf", "a/b/y.pdf", "a.pdf", "ab/z.pdf", "a/gone.pdf"):
        queue(manifest, FileKey(1, name))
    manifest.mark_deleted(FileKey(1, "a/gone.pdf"))
    manifest.commit()
    index = manifest.quick_index(1, under="a")
    assert len(index) == 2
    for name in ("a/x.pdf", "a/b/y.pdf"):
        assert index.seen_unchanged(name, *astuple(STAT)) is State.QUEUED
    assert index.all_seen()


PARTS = ("a", "b", "a b", "a0", "br[a]ck*t?", os.fsdecode(b"caf\xe9"), "é", "x.pdf")
"""Path parts with what the per-directory queries must get right: a sibling that sorts right after
``a/`` (``a0``), GLOB's own characters, bytes that are not UTF-8 (stored as blobs), non-ASCII text."""
RELPATHS = st.lists(st.sampled_from(PARTS), min_size=1, max_size=3).map("/".join)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.dictionaries(RELPATHS, st.booleans(), min_size=1, max_size=12),
    met_some=st.data(),
    under=st.sampled_from(("", "a", "br[a]ck*t?", os.fsdecode(b"caf\xe9"))),
)
def test_the_quick_index_reports_unseen_exactly_the_rows_a_walk_did_not_meet(
    shared_manifest: Manifest, rows: dict[str, bool], met_some: st.DataObject, under: str
) -> None:
    """``rows``: relpath → deleted. A walk (of the root or of ``under``) meets some of them, a directory at
    a time; ``was_seen`` must be False for exactly the others, and ``all_seen`` say whether any live one
    is left, whatever the names."""
    root_id = 1000 + next(_keys)
    for relpath, deleted in rows.items():
        queue(shared_manifest, FileKey(root_id, relpath))
        if deleted:
            shared_manifest.mark_deleted(FileKey(root_id, relpath))
    shared_manifest.commit()
    below = sorted(r for r in rows if not under or r.startswith(under + "/"))
    met = met_some.draw(st.sets(st.sampled_from(below)) if below else st.just(set()))
    index = shared_manifest.quick_index(root_id, under)
    assert len(index) == sum(1 for r in below if not rows[r])
    for relpath in sorted(met, key=lambda r: r.rpartition("/")[0]):  # the walk: one directory at a time
        expected = State.DELETED if rows[relpath] else State.QUEUED
        assert index.seen_unchanged(relpath, *astuple(STAT)) is expected
    queue(shared_manifest, FileKey(root_id, under + "/later" if under else "later"))  # after the walk began
    shared_manifest.commit()
    assert {r for r in below if not index.was_seen(r)} == set(below) - met
    assert index.was_seen(under + "/later" if under else "later")
    assert index.all_seen() == all(rows[r] or r in met for r in below)


def test_rows_written_after_the_index_was_loaded_are_never_reported_unseen(manifest: Manifest) -> None:
    """The walk hands new files to the hashers, which queue rows meanwhile: no evidence of a delete."""
    queue(manifest, FileKey(1, "old.pdf"))
    manifest.commit()
    index = manifest.quick_index(1)
    queue(manifest, FileKey(1, "found by this walk.pdf"))
    manifest.commit()
    unseen = [e.relpath for e in manifest.iter_root(1) if not index.was_seen(e.relpath)]
    assert unseen == ["old.pdf"]


# batching, locking, read-only access


def test_batched_writes_are_invisible_to_readers_until_committed(manifest: Manifest, tmp_path: Path) -> None:
    reader = ManifestReader.open_readonly(tmp_path / "state")
    with manifest.batch():
        queue(manifest, FileKey(1, "a.pdf"))
        assert manifest.pending_writes == 1
        assert reader.get(FileKey(1, "a.pdf")) is None
    assert manifest.pending_writes == 0
    assert reader.get(FileKey(1, "a.pdf")) is not None
    queue(manifest, FileKey(1, "b.pdf"))
    queue(manifest, FileKey(1, "c.pdf"))
    assert manifest.mark_uploading(FileKey(1, "c.pdf"), md5=M1)  # the intent is durable at once
    assert [e.relpath for e in reader.in_state(State.UPLOADING)] == ["c.pdf"]
    reader.close()


def test_batched_write_throughput(tmp_path: Path) -> None:
    """Printed, not asserted: the daemon's reason to commit every N writes or T ms."""
    rates = {}
    for mode, n in (("batched", 20_000), ("per-row", 2_000)):
        with StateLock(tmp_path / mode) as lock:
            m = Manifest.open(lock)
            start = time.perf_counter()
            for i in range(n):
                queue(m, FileKey(1, f"d{i % 50}/f{i}.pdf"))
                if mode == "per-row" or i % 1000 == 999:
                    m.commit()
            m.commit()
            rates[mode] = n / (time.perf_counter() - start)
            m.close()
    print(
        f"\nmanifest writes: batched {rates['batched']:,.0f} rows/s,"
        f" per-row commit {rates['per-row']:,.0f} rows/s"
    )


def test_read_only_open_needs_an_existing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestMissing, match="no manifest"):
        ManifestReader.open_readonly(tmp_path)
    assert list(tmp_path.iterdir()) == []


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from syncd.manifest import FileKey, Manifest, StatKey
    from syncd.state import StateLock

    with StateLock(Path(sys.argv[1])) as lock:
        m = Manifest.open(lock)
        m.mark_queued(FileKey(1, "held.pdf"), xxh3="1" * 32, md5="a" * 32, purpose="vision",
                      stat=StatKey(3, 4, 5, 6))
        m.commit()
        m.mark_queued(FileKey(1, "uncommitted.pdf"), xxh3="1" * 32, md5="a" * 32, purpose="vision",
                      stat=StatKey(3, 4, 5, 6))
        print("ready", flush=True)
        sys.stdin.readline()
    """
)


def test_a_second_process_is_refused_while_status_still_reads(tmp_path: Path) -> None:
    state = tmp_path / "state dir"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(AlreadyRunning) as refused:
            StateLock(state).acquire()
        message = str(refused.value)
        assert str(state) in message
        assert f"pid {child.pid}" in message
        assert "\n" not in message

        with ManifestReader.open_readonly(state) as reader:  # no lock needed, writer undisturbed
            assert reader.counts_by_state()[State.QUEUED] == 1
            assert reader.get(FileKey(1, "held.pdf")) is not None
            assert reader.get(FileKey(1, "uncommitted.pdf")) is None
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)

    with StateLock(state) as lock:  # kill -9 left nothing stale
        m = Manifest.open(lock)
        assert m.get(FileKey(1, "held.pdf")) is not None
        assert m.get(FileKey(1, "uncommitted.pdf")) is None
        m.close()
