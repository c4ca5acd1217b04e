"""A tree of N files and a manifest saying all of them are synced, built without syncing them.

An initial sync of a million files would take longer than the whole benchmark budget, so the state is
made directly: syncd's own code creates the manifest (``Manifest.open`` runs the migrations,
``ensure_root`` records the root exactly as the daemon does, by ``str(path)`` with the device and inode),
then one SQLite transaction inserts a ``synced`` row per file with the stat key read by ``fstat`` right
after the file was written. The quick check then finds every file unchanged, which is what a no-change
pass and a daemon restart meet in real life.

The files are empty: tmpfs then stores no page per file (1M files cost ~1 GiB of inodes, not 5 GiB), and
every row can truthfully share one remote id, as copies of one content do (an adopted, ``owned=0``
remote file, so nothing would ever prune it). Nothing checks that id remotely: the config keeps the
reconciler away, and the benchmarks count every HTTP call anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from bench.common import FILES_PER_DIR, Context, file_relpath, remove_tree
from syncd.manifest import Manifest
from syncd.state import MANIFEST_NAME, StateLock

REMOTE_ID = "file-bench-empty"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_INSERT = (
    "INSERT INTO files(root_id, relpath, size, mtime_ns, ctime_ns, inode, xxh3, md5, purpose, state,"
    " remote_id, owned, remote_created_at, attempts, next_attempt_at, last_error, updated_at, missing_since)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'assistants', 'synced', ?, 0, ?, 0, NULL, NULL, ?, NULL)"
)


@dataclass(frozen=True)
class SyncedTree:
    root: Path
    count: int
    pristine: Path
    """The manifest right after it was built; every run starts from a copy of it."""
    built_at: float
    build_seconds: float

    def fresh_state(self, state_dir: Path) -> Path:
        state_dir.mkdir(parents=True)
        shutil.copyfile(self.pristine, state_dir / MANIFEST_NAME)
        return state_dir


def _i64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _rows(root: Path, count: int, root_id: int, now: float) -> Iterator[tuple[Any, ...]]:
    md5 = hashlib.md5(b"", usedforsecurity=False).hexdigest()
    xxh3 = xxhash.xxh3_128_hexdigest(b"")
    top = str(root)
    for i in range(count):
        rel = file_relpath(i)
        if i % FILES_PER_DIR == 0:
            os.mkdir(f"{top}/{rel.partition('/')[0]}")
        fd = os.open(f"{top}/{rel}", _CREATE, 0o644)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        yield (
            root_id,
            rel,
            0,
            st.st_mtime_ns,
            st.st_ctime_ns,
            _i64(st.st_ino),
            xxh3,
            md5,
            REMOTE_ID,
            now,
            now,
        )


def _build(base: Path, count: int) -> SyncedTree:
    started = time.perf_counter()
    root = (base / "root").resolve()
    root.mkdir(parents=True)
    state = base / "state"
    with StateLock(state) as lock:
        manifest = Manifest.open(lock)
        try:
            st = os.stat(root)
            root_id = manifest.ensure_root(str(root), device=st.st_dev, inode=st.st_ino).root_id
            manifest.commit()
        finally:
            manifest.close()
        conn = sqlite3.connect(state / MANIFEST_NAME, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("BEGIN")
            now = time.time()
            conn.executemany(_INSERT, _rows(root, count, root_id, now))
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    pristine = base / "pristine.sqlite3"
    shutil.copyfile(state / MANIFEST_NAME, pristine)
    remove_tree(state)
    tree = SyncedTree(root, count, pristine, now, time.perf_counter() - started)
    (base / "complete.json").write_text(
        json.dumps({"count": count, "built_at": now, "build_seconds": tree.build_seconds})
    )
    return tree


def synced_tree(ctx: Context, name: str, count: int) -> SyncedTree:
    """The shared tree ``name`` of ``count`` files (built once per run, reused across runs by ``--keep``)."""
    key = f"synced-tree-{name}"
    if key in ctx.shared:
        found: SyncedTree = ctx.shared[key][0]
        return found
    base = ctx.options.workdir / key
    stamp = base / "complete.json"
    meta = json.loads(stamp.read_text()) if stamp.exists() else {}
    if ctx.options.keep and meta.get("count") == count:
        tree = SyncedTree((base / "root").resolve(), count, base / "pristine.sqlite3", meta["built_at"], 0.0)
    else:
        remove_tree(base)
        tree = _build(base, count)
    cleanup = (lambda: None) if ctx.options.keep else (lambda: remove_tree(base))
    ctx.shared[key] = (tree, cleanup)
    return tree


@dataclass(frozen=True)
class ManifestCheck:
    """What a run left in the manifest. A file hashed again has its row rewritten (``updated_at`` moves),
    so no rewritten row means no file was hashed, even without syncd's own summary line."""

    rows: int
    synced: int
    rewritten: int
    roots: int

    def unchanged(self, count: int) -> bool:
        return self.rows == self.synced == count and self.rewritten == 0 and self.roots == 1

    def describe(self) -> str:
        return (
            f"{self.rows:,} rows, {self.synced:,} synced, {self.rewritten:,} rewritten, {self.roots} root(s)"
        )


def check_manifest(state_dir: Path, tree: SyncedTree) -> ManifestCheck:
    conn = sqlite3.connect(f"file:{state_dir / MANIFEST_NAME}?mode=ro", uri=True)
    try:
        one = conn.execute(
            "SELECT count(*), sum(state='synced'), sum(updated_at > ?) FROM files", (tree.built_at,)
        ).fetchone()
        roots = conn.execute("SELECT count(*) FROM roots").fetchone()[0]
    finally:
        conn.close()
    return ManifestCheck(int(one[0]), int(one[1] or 0), int(one[2] or 0), int(roots))
