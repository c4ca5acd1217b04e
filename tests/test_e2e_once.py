"""End to end: `syncd sync --once` as a real process against the reference server (design §3, §6).

Each test runs the CLI in a subprocess with a config in tmp_path and asserts outcomes: what the server
holds (listing, md5, content), its request counters, the manifest's rows, and the exit code.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ServerFactory, Syncd, md5_of

from syncd.manifest import State
from syncd.server import RunningServer
from syncd.state import MANIFEST_NAME

MakeSyncd = Callable[..., Syncd]

# relpath → (content, purpose the rules give it)
TREE: dict[str, tuple[bytes, str]] = {
    "top.txt": (b"top level\n", "assistants"),
    "empty.bin": (b"", "assistants"),
    "résumé — 日本語.txt": (b"unicode name\n", "assistants"),
    "with space.pdf": (b"%PDF-1.4 spaced\n", "assistants"),
    "training/top.jsonl": (b'{"a": 1}\n', "fine-tune"),
    "training/x/y/data.jsonl": (b'{"b": 2}\n', "fine-tune"),
    "training/notes.txt": (b"not jsonl\n", "assistants"),
    "scans/2026/p1.png": (b"\x89PNG fake page 1", "vision"),
    "scans/readme.txt": (b"scans readme", "vision"),
    "a/b/c/d/deep.txt": (b"deep\n", "assistants"),
}
TEMP_NAMES = ("a.tmp", "b.part", "~$x.docx", "x.filepart", "y.crdownload", ".~lock.x.odt#", "scans/c.tmp")


def write_tree(root: Path, tree: dict[str, tuple[bytes, str]]) -> None:
    for relpath, (data, _purpose) in tree.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def pass_done(stdout: str) -> dict[str, object]:
    """The counters line `sync --once` logs at the end of its pass."""
    for line in stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == "sync pass done":
                assert isinstance(record, dict)
                return record
    pytest.fail(f"no 'sync pass done' line in:\n{stdout[-3000:]}")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("public_only", [False, True], ids=["extended", "public-only"])
def test_once_syncs_a_tree_and_a_second_pass_does_nothing(
    server_factory: ServerFactory, syncd_factory: MakeSyncd, public_only: bool
) -> None:
    server = server_factory(public_only=public_only)
    w = syncd_factory(server)
    write_tree(w.root, TREE)
    for name in TEMP_NAMES:
        (w.root / name).write_bytes(b"temporary")
    os.symlink("..", w.root / "loop")  # a symlink loop: never followed
    os.symlink("top.txt", w.root / "link-to-top.txt")
    os.mkfifo(w.root / "fifo")  # not a regular file: skipped, and reading it must not hang

    done = w.sync_once()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr

    rows = w.rows()
    assert set(rows) == set(TREE), "exactly the regular, non-temp files have rows"
    for relpath, (data, purpose) in TREE.items():
        row = rows[relpath]
        assert (row.state, row.md5, row.purpose, row.owned) == (State.SYNCED, md5_of(data), purpose, True)

    remote = {f["id"]: f for f in w.remote()}
    assert server.stats.uploads == len(TREE)
    assert len(remote) == len(TREE)
    for relpath, (data, purpose) in TREE.items():
        item = remote[rows[relpath].remote_id or ""]
        assert (item["filename"], item["bytes"], item["purpose"]) == (Path(relpath).name, len(data), purpose)
        if public_only:
            assert "md5" not in item or item["md5"] is None
        else:
            assert item["md5"] == md5_of(data)
            assert w.content(item["id"]) == data

    # A second process on the unchanged tree: one stat per file, no hashing, no request for a file.
    lookups, lists = server.stats.hash_lookups, server.stats.lists
    updated = {p: r.updated_at for p, r in rows.items()}
    env = {**w.env(), "PYTHONPROFILEIMPORTTIME": "1"}  # stderr: one line per module imported
    again = subprocess.run(w.argv("sync", "--once"), env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    counters = pass_done(again.stdout)
    assert (counters["hashed"], counters["uploaded"], counters["failed"]) == (0, 0, 0)
    imported = {line.rsplit("|", 1)[-1].strip() for line in again.stderr.splitlines() if "|" in line}
    assert "syncd.manifest" in imported
    assert "aiohttp" not in imported, "a pass with nothing to send builds no transport"
    assert server.stats.uploads == len(TREE)
    assert (server.stats.hash_lookups, server.stats.lists) == (lookups, lists)
    assert {p: r.updated_at for p, r in w.rows().items()} == updated


@pytest.mark.timeout(90)
def test_once_exits_1_with_a_summary_when_the_server_rejects_files(
    server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    server = server_factory(max_bytes=1000, reject_types=(".exe",))
    w = syncd_factory(server)
    (w.root / "big.bin").write_bytes(b"x" * 5000)
    (w.root / "tool.exe").write_bytes(b"MZ not allowed")
    (w.root / "ok.txt").write_bytes(b"fine")

    done = w.sync_once()
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr
    rows = w.rows()
    assert rows["ok.txt"].state is State.SYNCED
    assert rows["big.bin"].state is State.FAILED
    assert "413" in (rows["big.bin"].last_error or "")
    assert rows["tool.exe"].state is State.FAILED
    assert "415" in (rows["tool.exe"].last_error or "")
    assert [f["filename"] for f in w.remote()] == ["ok.txt"]
    output = done.stdout + done.stderr
    assert "big.bin" in output
    assert "tool.exe" in output
    report = w.status()
    assert report["counts"]["failed"] == 2
    assert {e["path"] for e in report["last_errors"]} >= {"big.bin", "tool.exe"}

    # Permanent rejections are not retried until the file changes...
    uploads = server.stats.uploads
    again = w.sync_once()
    assert again.returncode == 1
    assert server.stats.uploads == uploads
    # ... and a change puts the file back in the queue: small enough now, it syncs.
    (w.root / "big.bin").write_bytes(b"y" * 500)
    third = w.sync_once()
    assert third.returncode == 1, "tool.exe is still rejected"
    rows = w.rows()
    assert (rows["big.bin"].state, rows["big.bin"].md5) == (State.SYNCED, md5_of(b"y" * 500))
    assert rows["tool.exe"].state is State.FAILED
    assert server.stats.uploads == uploads + 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("public_only", [False, True], ids=["extended", "public-only"])
def test_a_row_left_uploading_is_resolved_by_md5_lookup_without_a_second_upload(
    server_factory: ServerFactory, syncd_factory: MakeSyncd, public_only: bool
) -> None:
    """Simulates a crash between sending an upload and recording its answer: the intent (`uploading`,
    recorded just before the upload was created) is all the manifest knows."""
    server = server_factory(public_only=public_only)
    w = syncd_factory(server)
    (w.root / "a.pdf").write_bytes(b"crash-safe content")
    (w.root / "b.pdf").write_bytes(b"other content")
    assert w.sync_once().returncode == 0
    before = w.rows()["a.pdf"]
    assert before.remote_id is not None
    assert before.remote_created_at is not None
    with sqlite3.connect(w.state_dir / MANIFEST_NAME) as db:
        db.execute(
            "UPDATE files SET state='uploading', remote_id=NULL, updated_at=? WHERE relpath='a.pdf'",
            (before.remote_created_at - 0.5,),
        )
    assert w.rows()["a.pdf"].state is State.UPLOADING
    uploads, lookups = server.stats.uploads, server.stats.hash_lookups

    done = w.sync_once()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    after = w.rows()["a.pdf"]
    assert (after.state, after.remote_id, after.md5) == (State.SYNCED, before.remote_id, before.md5)
    assert after.owned, "created after the recorded intent: our own interrupted upload"
    assert server.stats.uploads == uploads
    assert server.stats.hash_lookups == lookups + 1
    assert len(w.remote()) == 2


@pytest.mark.timeout(60)
def test_a_same_size_edit_with_its_mtime_put_back_is_still_uploaded(
    server: RunningServer, syncd_factory: MakeSyncd
) -> None:
    """`touch -d` back-dating after an edit of the same size: only the ctime tells (design §3)."""
    w = syncd_factory(server)
    path = w.root / "ledger.csv"
    path.write_bytes(b"a,1\nb,2\n")
    assert w.sync_once().returncode == 0
    st = path.stat()
    path.write_bytes(b"a,9\nb,9\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    assert path.stat().st_mtime_ns == st.st_mtime_ns
    assert w.sync_once().returncode == 0
    row = w.rows()["ledger.csv"]
    assert (row.state, row.md5) == (State.SYNCED, md5_of(b"a,9\nb,9\n"))
    assert server.stats.uploads == 2
