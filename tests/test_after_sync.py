"""after_sync = "delete" | "move" (issue 13, item 3; design §3: a source it removes is not a local delete).

The rule (``plan.after_sync_action``) and the names a move picks are pure and tested with hypothesis; the
file operations and crash recovery run in-process over a real manifest and the reference server; the
drop-folder behaviour runs `syncd run` / `sync --once` / `reconcile --once` as processes.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerFactory, Syncd, md5_of, no_dac_override, wait_for
from hypothesis import given
from hypothesis import strategies as st

from syncd.after_sync import Changed, Clash, Done, move_file
from syncd.api import FilesClient
from syncd.config import ConfigError, load_config, parse_config
from syncd.counters import Counters
from syncd.daemon import Run
from syncd.manifest import Entry, FileKey, Manifest, Source, State, StatKey
from syncd.once import sync_pass
from syncd.plan import (
    FinishRemoval,
    LeaveSource,
    RemoveSource,
    RetryRemoval,
    SourceSeen,
    after_sync_action,
    destination_names,
)
from syncd.roots import RootTable, build_roots
from syncd.server import RunningServer
from syncd.state import StateLock

MakeSyncd = Callable[..., Syncd]

STAT = StatKey(size=10, mtime_ns=1_000, ctime_ns=2_000, inode=7)


def entry(**changes: Any) -> Entry:
    row = Entry(
        1,
        "in/a.pdf",
        STAT,
        "x",
        "m",
        "assistants",
        State.SYNCED,
        "file-1",
        True,
        None,
        0,
        None,
        None,
        0.0,
        None,
    )
    return replace(row, **changes)


# -- the rule ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "mode", "seen", "pending", "expected"),
    [
        (entry(), "move", SourceSeen(STAT), False, RemoveSource("move")),
        (entry(), "delete", SourceSeen(STAT), False, RemoveSource("delete")),
        (entry(), "keep", SourceSeen(STAT), False, LeaveSource("after_sync = keep")),
        (entry(), "move", SourceSeen(STAT), True, LeaveSource("hooks pending")),
        (entry(), "move", SourceSeen(replace(STAT, mtime_ns=5)), False, LeaveSource("changed since synced")),
        (entry(), "move", SourceSeen(replace(STAT, ctime_ns=5)), False, LeaveSource("changed since synced")),
        (entry(), "move", SourceSeen(None), False, LeaveSource("gone")),
        (entry(state=State.UPLOADING), "move", SourceSeen(STAT), False, LeaveSource("not synced")),
        (entry(remote_id=None), "move", SourceSeen(STAT), False, LeaveSource("not synced")),
        (entry(source=Source.REMOVED), "move", SourceSeen(None), False, LeaveSource("already removed")),
        # A recorded intent, after a crash: finished when the file is gone or at its destination.
        (entry(source=Source.REMOVING), "move", SourceSeen(None), False, FinishRemoval(unlink=False)),
        (entry(source=Source.REMOVING), "keep", SourceSeen(None), True, FinishRemoval(unlink=False)),
        (
            entry(source=Source.REMOVING),  # a hard link made, the source not yet unlinked
            "move",
            SourceSeen(replace(STAT, ctime_ns=9), replace(STAT, ctime_ns=9)),
            False,
            FinishRemoval(unlink=True),
        ),
        (
            entry(source=Source.REMOVING),  # a copy on another file system finished
            "move",
            SourceSeen(STAT, replace(STAT, inode=99, ctime_ns=3)),
            False,
            FinishRemoval(unlink=True),
        ),
        (entry(source=Source.REMOVING), "move", SourceSeen(STAT, None), False, RetryRemoval()),
        (
            entry(source=Source.REMOVING),  # a half-written destination is not the file
            "move",
            SourceSeen(STAT, replace(STAT, inode=99, size=3)),
            False,
            RetryRemoval(),
        ),
        (
            entry(source=Source.REMOVING),  # the source was rewritten after the copy
            "move",
            SourceSeen(replace(STAT, mtime_ns=4), replace(STAT, inode=99)),
            False,
            RetryRemoval(),
        ),
    ],
)
def test_after_sync_action(row: Entry, mode: Any, seen: SourceSeen, pending: bool, expected: object) -> None:
    assert after_sync_action(row, mode, seen, hooks_pending=pending) == expected


stat_keys = st.builds(StatKey, st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3))


@given(
    state=st.sampled_from(State),
    remote_id=st.none() | st.just("file-1"),
    source=st.none() | st.sampled_from(Source),
    row_stat=stat_keys,
    seen=st.none() | stat_keys,
    dest=st.none() | stat_keys,
    mode=st.sampled_from(["keep", "delete", "move"]),
    pending=st.booleans(),
)
def test_a_file_is_removed_only_when_synced_unchanged_and_its_hooks_ran(
    state: State,
    remote_id: str | None,
    source: Source | None,
    row_stat: StatKey,
    seen: StatKey | None,
    dest: StatKey | None,
    mode: Any,
    pending: bool,
) -> None:
    row = entry(state=state, remote_id=remote_id, source=source, stat=row_stat)
    action = after_sync_action(row, mode, SourceSeen(seen, dest), hooks_pending=pending)
    if isinstance(action, RemoveSource):
        assert (state, source, mode, pending) == (State.SYNCED, None, action.mode, False)
        assert remote_id is not None
        assert seen == row_stat
    if isinstance(action, FinishRemoval | RetryRemoval):
        assert source is Source.REMOVING
        assert state is State.SYNCED
    if isinstance(action, FinishRemoval) and action.unlink:
        # the source is only unlinked when the destination holds the row's bytes
        assert dest is not None
        assert (dest.size, dest.mtime_ns) == (row_stat.size, row_stat.mtime_ns)


relpaths = st.lists(
    st.text("abc. ()", min_size=1, max_size=6).filter(lambda p: p not in (".", "..")), min_size=1, max_size=3
).map("/".join)


@given(relpaths)
def test_destination_names_keep_the_directory_and_extension_and_never_repeat(relpath: str) -> None:
    names = list(destination_names(relpath))
    assert names[0] == relpath
    assert len(set(names)) == len(names)
    head, _, name = relpath.rpartition("/")
    for other in names[1:4]:
        other_head, _, other_name = other.rpartition("/")
        assert other_head == head
        ext = name.rpartition(".")[2] if name.rpartition(".")[0] else None
        if ext is not None:
            assert other_name.endswith("." + ext)


def test_destination_names_read_like_a_file_manager() -> None:
    assert list(destination_names("scans/page.pdf"))[:3] == [
        "scans/page.pdf",
        "scans/page (1).pdf",
        "scans/page (2).pdf",
    ]
    assert list(destination_names(".hidden"))[1] == ".hidden (1)"
    assert list(destination_names("README"))[1] == "README (1)"


# -- config ------------------------------------------------------------------------------------------------


def write(tmp_path: Path, watch: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f'[[watch]]\npath = "inbox"\n{watch}\n', encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("watch", "expected"),
    [
        ('after_sync = "move"', 'watch[0].move_to: required with after_sync = "move"'),
        ('move_to = "done"', "watch[0].move_to: is only used with after_sync"),
        ('after_sync = "move"\nmove_to = "inbox/done"', "watch[0].move_to: "),
        ('after_sync = "move"\nmove_to = "inbox"', "holds the watched folder"),
        ('after_sync = "move"\nmove_to = "."', "holds the watched folder"),
        ('after_sync = "rename"', "watch[0].after_sync: Input should be 'keep', 'delete' or 'move'"),
        ('after_sync = "delete"\nafter_sinc = "x"', "watch[0].after_sinc: unknown key"),
    ],
)
def test_bad_after_sync_settings_are_one_line_errors(tmp_path: Path, watch: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, watch))
    assert "\n" not in str(info.value)
    assert expected in str(info.value)


def test_move_to_inside_the_tree_must_be_ignored_and_resolves_like_other_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r'watch\[0\]\.move_to: .* add "done/" to ignore'):
        load_config(write(tmp_path, 'after_sync = "move"\nmove_to = "inbox/done"'))
    cfg = load_config(write(tmp_path, 'after_sync = "move"\nmove_to = "inbox/done"\nignore = ["done/"]'))
    assert cfg.watch[0].move_to == tmp_path / "inbox" / "done"
    cfg = load_config(write(tmp_path, 'after_sync = "move"\nmove_to = "done"'))
    assert cfg.watch[0].move_to == tmp_path / "done"
    # Into another watched folder is refused too: the moved file would be synced there again.
    other = tmp_path / "config.toml"
    other.write_text(
        '[[watch]]\npath = "inbox"\nafter_sync = "move"\nmove_to = "archive/x"\n[[watch]]\npath = "archive"\n'
    )
    with pytest.raises(ConfigError, match=r"watch\[0\]\.move_to: .* inside the watched folder"):
        load_config(other)


# -- file operations ---------------------------------------------------------------------------------


def stat_of(path: Path) -> StatKey:
    st_ = os.lstat(path)
    return StatKey(st_.st_size, st_.st_mtime_ns, st_.st_ctime_ns, st_.st_ino)


def test_a_move_never_overwrites_and_never_moves_a_changed_file(tmp_path: Path) -> None:
    src, dest = tmp_path / "a.pdf", tmp_path / "out" / "a.pdf"
    src.write_bytes(b"synced bytes")
    synced = stat_of(src)
    dest.parent.mkdir()
    dest.write_bytes(b"someone else's file")
    assert move_file(src, dest, synced) == Clash()
    assert dest.read_bytes() == b"someone else's file"
    assert src.read_bytes() == b"synced bytes"

    src.write_bytes(b"rewritten after it was synced")
    assert move_file(src, tmp_path / "out" / "b.pdf", synced) == Changed()
    assert src.exists()
    assert not (tmp_path / "out" / "b.pdf").exists()


def test_a_move_to_another_file_system_copies_then_unlinks(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system to move to")
    src = tmp_path / "a.pdf"
    src.write_bytes(b"across devices " * 1000)
    before = stat_of(src)
    out = shm / f"syncd-test-{os.getpid()}"
    try:
        assert move_file(src, out / "sub" / "a.pdf", before) == Done(out / "sub" / "a.pdf")
        assert not src.exists()
        moved = out / "sub" / "a.pdf"
        assert moved.read_bytes() == b"across devices " * 1000
        assert os.stat(moved).st_mtime_ns == before.mtime_ns
        assert sorted(p.name for p in (out / "sub").iterdir()) == ["a.pdf"]  # no partial copy left
    finally:
        for path in sorted(out.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        out.rmdir()


# -- crash recovery, in-process over the real stages ------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def manifest(tmp_path: Path) -> Iterator[Manifest]:
    with StateLock(tmp_path / "state") as lock:
        m = Manifest.open(lock)
        yield m
        m.close()


def drop_config(tmp_path: Path, server: RunningServer, after_sync: str) -> Any:
    raw: dict[str, Any] = {
        "remote": {"base_url": server.base_url},
        "state": {"dir": str(tmp_path / "state")},
        "watch": [{"path": str(tmp_path / "inbox"), "settle_seconds": 0, "delete_grace_seconds": 0}],
    }
    if after_sync != "keep":
        raw["watch"][0].update(after_sync=after_sync)
        if after_sync == "move":
            raw["watch"][0].update(move_to=str(tmp_path / "done"))
    return parse_config(raw, source="test", base=tmp_path)


async def one_pass(tmp_path: Path, server: RunningServer, manifest: Manifest, after_sync: str) -> int:
    config = drop_config(tmp_path, server, after_sync)
    async with FilesClient(base_url=server.base_url, api_key=server.api_key, retries=0) as client:
        roots = RootTable(build_roots(config), manifest)
        return await sync_pass(Run(config, manifest, client, roots, Counters()))


@pytest.mark.anyio
@pytest.mark.parametrize("crash", ["before-rename", "after-rename", "after-link", "delete-before-unlink"])
async def test_an_intent_a_crash_cut_short_is_finished_once(
    server: RunningServer, manifest: Manifest, tmp_path: Path, crash: str
) -> None:
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    inbox.mkdir()
    (inbox / "scan.pdf").write_bytes(b"%PDF a scanned page")
    assert await one_pass(tmp_path, server, manifest, "keep") == 0
    key = FileKey(1, "scan.pdf")
    row = manifest.get(key)
    assert row is not None
    assert row.state is State.SYNCED
    # What a crash leaves: the intent committed, the file work done up to `crash`.
    target = done / "scan.pdf"
    dest = None if crash.startswith("delete") else str(target)
    assert manifest.mark_removing(key, md5=row.md5, dest=dest)
    done.mkdir()
    if crash == "after-rename":
        os.rename(inbox / "scan.pdf", target)
    elif crash == "after-link":
        os.link(inbox / "scan.pdf", target)
    uploads = server.stats.uploads

    assert await one_pass(tmp_path, server, manifest, "delete" if dest is None else "move") == 0
    assert not (inbox / "scan.pdf").exists()
    if dest is None:
        assert list(done.iterdir()) == []
    else:
        assert [p.name for p in done.iterdir()] == ["scan.pdf"]  # finished, not moved a second time
        assert target.read_bytes() == b"%PDF a scanned page"
    after = manifest.get(key)
    assert after is not None
    assert (after.state, after.source, after.remote_id) == (State.SYNCED, Source.REMOVED, row.remote_id)
    assert server.stats.uploads == uploads
    # A later pass (a full rescan past delete_grace = 0) neither marks it missing nor deletes it.
    assert await one_pass(tmp_path, server, manifest, "move") == 0
    again = manifest.get(key)
    assert again is not None
    assert (again.state, again.source, again.missing_since) == (State.SYNCED, Source.REMOVED, None)


@pytest.mark.anyio
async def test_a_new_file_at_a_removed_path_is_synced_and_the_old_copy_is_kept(
    server: RunningServer, manifest: Manifest, tmp_path: Path
) -> None:
    inbox, done = tmp_path / "inbox", tmp_path / "done"
    inbox.mkdir()
    (inbox / "scan.pdf").write_bytes(b"monday's scan")
    assert await one_pass(tmp_path, server, manifest, "move") == 0
    first = manifest.get(FileKey(1, "scan.pdf"))
    assert first is not None
    assert first.source is Source.REMOVED
    (inbox / "scan.pdf").write_bytes(b"tuesday's scan")
    assert await one_pass(tmp_path, server, manifest, "move") == 0
    assert (done / "scan.pdf").read_bytes() == b"monday's scan"
    assert (done / "scan (1).pdf").read_bytes() == b"tuesday's scan"
    second = manifest.get(FileKey(1, "scan.pdf"))
    assert second is not None
    assert second.md5 == md5_of(b"tuesday's scan")
    assert second.remote_id != first.remote_id
    # Monday's remote copy is no row's any more, but after_sync removed its source: it stays referenced.
    refs = {o.remote_id: o.refs for o in manifest.owned_remotes()}
    assert refs[first.remote_id or ""] == 1
    assert manifest.live_refs(first.remote_id or "") == 1
    # Only the new file's row is expected on disk: a walk finds nothing missing.
    assert len(manifest.quick_index(1)) == 0


# -- end to end -------------------------------------------------------------------------------------------


def drop_folder(w: Syncd, after_sync: str, *, mode: str = "poll", settle: float = 0.3) -> Path:
    """Configure `w` as a drop folder (delete_grace 0.5 s: a rescan after it would delete a missing file)."""
    w.configure(mode=mode, settle=settle, delete_grace=0.5, rules=())
    done = w.workdir / "done"
    extra = f'after_sync = "{after_sync}"\n' + (
        f"move_to = {json.dumps(str(done))}\n" if after_sync == "move" else ""
    )
    with w.config_path.open("a", encoding="utf-8") as fh:
        fh.write(extra)
    return done


def reconcile_changes_nothing(w: Syncd) -> None:
    before = w.server.stats.snapshot()
    listed = sorted(f["id"] for f in w.remote())
    done = w.cli("reconcile", "--once")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    after = w.server.stats.snapshot()
    assert after["deletes"] == before["deletes"], "reconcile pruned a file whose source after_sync removed"
    assert after["uploads"] == before["uploads"], "reconcile re-uploaded a removed source"
    assert sorted(f["id"] for f in w.remote()) == listed


@pytest.mark.timeout(60)
def test_move_leaves_the_folder_only_once_synced_and_reconcile_keeps_it(
    server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    server = server_factory(latency_ms=150)  # every request takes a while: the order can be watched
    w = syncd_factory(server)
    done = drop_folder(w, "move")
    daemon = w.start()
    daemon.wait_ready()
    files = {"scan-1.pdf": b"%PDF page one", "sub/scan-2.pdf": b"%PDF page two"}
    for relpath, data in files.items():
        (w.root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (w.root / relpath).write_bytes(data)

    def moved() -> bool:
        for relpath in files:
            if not (w.root / relpath).exists():
                row = w.rows().get(relpath)
                # The source may only be gone once the manifest says synced, with a file on the server.
                assert row is not None
                assert row.state is State.SYNCED, row
                assert row.remote_id in {f["id"] for f in w.remote()}
        return all((done / p).exists() and not (w.root / p).exists() for p in files)

    wait_for(moved, timeout=30, what="both files moved", diagnose=daemon.tail)
    for relpath, data in files.items():
        assert (done / relpath).read_bytes() == data
        row = w.rows()[relpath]
        assert (row.state, row.source) == (State.SYNCED, Source.REMOVED)
        assert w.content(row.remote_id or "") == data
    assert daemon.logged("source moved", path="sub/scan-2.pdf")
    assert daemon.stop() == 0
    assert server.stats.uploads == 2

    reconcile_changes_nothing(w)  # its sync pass rescans past delete_grace: nothing counts as deleted
    assert {p: (r.state, r.source) for p, r in w.rows().items()} == {
        p: (State.SYNCED, Source.REMOVED) for p in files
    }
    # The scanner reuses a name: the new file is synced and moved beside the first, which stays remote.
    (w.root / "scan-1.pdf").write_bytes(b"%PDF a new page one")
    assert w.sync_once().returncode == 0
    assert (done / "scan-1 (1).pdf").read_bytes() == b"%PDF a new page one"
    assert (done / "scan-1.pdf").read_bytes() == b"%PDF page one"
    assert server.stats.uploads == 3
    reconcile_changes_nothing(w)
    assert len(w.remote()) == 3


@pytest.mark.timeout(60)
def test_delete_removes_the_source_and_keeps_the_remote_copy(
    server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    server = server_factory()
    w = syncd_factory(server)
    drop_folder(w, "delete")
    (w.root / "scan.pdf").write_bytes(b"%PDF delete me once synced")
    (w.root / "scan.part").write_bytes(b"still being written")  # ignored: never synced, never removed
    result = w.sync_once()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert sorted(p.name for p in w.root.iterdir()) == ["scan.part"]
    [item] = w.remote()
    assert w.content(item["id"]) == b"%PDF delete me once synced"
    reconcile_changes_nothing(w)
    row = w.rows()["scan.pdf"]
    assert (row.state, row.source, row.remote_id) == (State.SYNCED, Source.REMOVED, item["id"])


@pytest.mark.timeout(60)
def test_a_crash_between_upload_and_move_loses_nothing(
    server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    """move_to is made unwritable, so the move fails and waits for its retry; the daemon is killed then
    (synced, not moved), and the next daemon moves the file once move_to is writable again."""
    launcher = no_dac_override()
    if os.geteuid() == 0 and not launcher:
        pytest.skip("running as root without setpriv: move_to cannot be made unwritable to the daemon")
    server = server_factory()
    w = syncd_factory(server, launcher=launcher)
    done = drop_folder(w, "move")
    done.mkdir()
    done.chmod(0o555)
    data = b"%PDF scanned just before the crash"
    (w.root / "scan.pdf").write_bytes(data)
    first = w.start()
    try:
        wait_for(
            lambda: first.logged("cannot remove the synced source; will retry", path="scan.pdf"),
            what="the move to fail",
            diagnose=first.tail,
        )
        row = w.rows()["scan.pdf"]
        # Synced, and not moved: the intent may still be on record (clearing it is committed lazily).
        assert row.state is State.SYNCED
        assert row.source in (None, Source.REMOVING)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    finally:
        done.chmod(0o755)
    assert (w.root / "scan.pdf").read_bytes() == data
    second = w.start()
    wait_for(
        lambda: (done / "scan.pdf").exists() and not (w.root / "scan.pdf").exists(),
        what="the move at restart",
        diagnose=second.tail,
    )
    assert second.stop() == 0
    assert (done / "scan.pdf").read_bytes() == data
    assert server.stats.uploads == 1
    [item] = w.remote()
    assert w.rows()["scan.pdf"].remote_id == item["id"]
