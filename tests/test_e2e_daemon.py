"""End to end: `syncd run` as a real process, driven by filesystem events (design §1, §3, §7).

`TestEventDriven` runs the event-driven cases once per watch mode (inotify, poll) against one daemon per
mode (a class-scoped fixture): each test works in its own files and compares server counters before and
after. When the tests run as root, that daemon runs without the capabilities that bypass file
permissions (`setpriv`), so a `chmod 000` file is really unreadable to it. The lifecycle cases (lock,
kill -9, restart, crash mid-upload) start their own daemons.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    DaemonProcess,
    ServerFactory,
    Syncd,
    can_deny_reads,
    md5_of,
    no_dac_override,
    wait_for,
)

from syncd.manifest import Entry, State
from syncd.server import ServerSettings, running_server

MakeSyncd = Callable[..., Syncd]

SETTLE = 0.6  # the class daemon's settle_seconds; the slow writer pauses less than this
UNREADABLE_EVENT = "cannot read; skipping until it changes"


@dataclass
class Live:
    mode: str
    w: Syncd
    daemon: DaemonProcess

    def write(self, relpath: str, data: bytes) -> str:
        path = self.w.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return relpath

    def wait_synced(
        self, *relpaths: str, md5: dict[str, str] | None = None, timeout: float = 20.0
    ) -> dict[str, Entry]:
        return self.w.wait_synced(*relpaths, md5=md5, timeout=timeout, daemon=self.daemon)

    def remote_by_name(self, name: str) -> list[dict[str, object]]:
        return [f for f in self.w.remote() if f["filename"] == name]

    def unreadable_logs(self, relpath: str) -> int:
        return len(self.daemon.logged(UNREADABLE_EVENT, path=relpath))


@pytest.fixture(scope="class", params=["inotify", "poll"])
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    mode: str = request.param
    base = tmp_path_factory.mktemp(f"live-{mode}")
    settings = ServerSettings(data_dir=base / "server", api_key=secrets.token_urlsafe(16), port=0)
    with running_server(settings) as server:
        w = Syncd(base / "w", server, launcher=no_dac_override())
        w.configure(mode=mode, settle=SETTLE, delete_grace=1.0)
        daemon = w.start()
        try:
            daemon.wait_ready()
            yield Live(mode, w, daemon)
            assert daemon.alive(), f"the daemon died\n{daemon.tail()}"
            code = daemon.stop()
            assert code == 0, f"SIGTERM must drain and exit 0, got {code}\n{daemon.tail()}"
            assert "Traceback" not in daemon.stderr(), daemon.tail()
            assert daemon.logged("stopped")
        finally:
            w.close()


@pytest.fixture(autouse=True)
def _fail_fast_without_the_class_daemon(request: pytest.FixtureRequest) -> None:
    """Once the shared daemon died, the rest of its class fails at once instead of timing out."""
    if "live" in request.fixturenames:
        live: Live = request.getfixturevalue("live")
        if not live.daemon.alive():
            pytest.fail(f"the class daemon exited with {live.daemon.proc.returncode}\n{live.daemon.tail()}")


@pytest.mark.timeout(60)
class TestEventDriven:
    def test_slow_writes_are_uploaded_once_with_the_final_content(self, live: Live) -> None:
        """Two scanners writing page by page with pauses shorter than settle_seconds: one reopens and
        closes the file for every page, the other keeps it open throughout."""
        uploads = live.w.server.stats.uploads
        reopened, kept_open = live.w.root / "slow-reopen.pdf", live.w.root / "slow-open.pdf"
        chunks = [bytes([65 + i]) * 4096 for i in range(12)]
        with kept_open.open("wb") as held:
            for chunk in chunks:
                with reopened.open("ab") as fh:
                    fh.write(chunk)
                held.write(chunk)
                held.flush()
                time.sleep(SETTLE * 0.4)
        final = md5_of(b"".join(chunks))
        rows = live.wait_synced(
            "slow-reopen.pdf", "slow-open.pdf", md5={"slow-reopen.pdf": final, "slow-open.pdf": final}
        )
        assert live.w.server.stats.uploads == uploads + 1, "same content, same purpose: one remote file"
        [remote_id] = {r.remote_id for r in rows.values()}
        [item] = [f for f in live.w.remote() if f["id"] == remote_id]
        assert (item["md5"], item["bytes"]) == (final, len(chunks) * 4096)
        assert item["filename"] in rows
        assert live.w.content(str(item["id"])) == b"".join(chunks)

    def test_temp_files_are_never_uploaded_and_a_hard_link_publishes(self, live: Live) -> None:
        temps = ["t/a.tmp", "t/b.part", "t/~$x.docx", "t/dl.crdownload", "t/.~lock.y.odt#"]
        for relpath in temps:
            live.write(relpath, b"partial " + relpath.encode())
        live.write("t/short-lived.txt", b"removed before it could settle")
        os.unlink(live.w.root / "t/short-lived.txt")
        data = b"%PDF-1.7 final bytes\n" * 50
        live.write("t/x.filepart", data)
        os.link(live.w.root / "t/x.filepart", live.w.root / "t/x.pdf")
        os.unlink(live.w.root / "t/x.filepart")
        live.wait_synced("t/x.pdf", md5={"t/x.pdf": md5_of(data)})
        names = {f["filename"] for f in live.w.remote()}
        assert "x.pdf" in names
        never = [*temps, "t/x.filepart", "t/short-lived.txt"]
        assert not names & {Path(t).name for t in never}
        assert not set(live.w.rows()) & set(never)

    def test_rules_route_purposes(self, live: Live) -> None:
        expected = {
            "training/r1.jsonl": "fine-tune",
            "training/deep/er/r2.jsonl": "fine-tune",
            "training/r3.txt": "assistants",
            "scans/2026/r4.png": "vision",
            "scans/r5.txt": "vision",
            "r6.jsonl": "assistants",
        }
        for relpath in expected:
            live.write(relpath, f"rules {relpath}".encode())
        rows = live.wait_synced(*expected)
        assert {p: r.purpose for p, r in rows.items()} == expected
        remote = {f["id"]: f["purpose"] for f in live.w.remote()}
        assert {p: remote[r.remote_id or ""] for p, r in rows.items()} == expected

    def test_rename_and_copy_upload_nothing_and_a_same_size_edit_uploads_once(self, live: Live) -> None:
        stats = live.w.server.stats
        data = b"original content of the report " * 100
        live.write("mv/report.pdf", data)
        live.wait_synced("mv/report.pdf")
        remote_id = live.w.rows()["mv/report.pdf"].remote_id
        uploads = stats.uploads

        os.rename(live.w.root / "mv/report.pdf", live.w.root / "mv/renamed.pdf")
        shutil.copyfile(live.w.root / "mv/renamed.pdf", live.w.root / "mv/copy.pdf")
        rows = live.wait_synced("mv/renamed.pdf", "mv/copy.pdf")
        assert {r.remote_id for r in rows.values()} == {remote_id}
        assert all(r.owned for r in rows.values()), "a cache hit on our own upload stays owned"
        assert stats.uploads == uploads

        edited = data.replace(b"original", b"EDITED!!")
        assert len(edited) == len(data)
        with (live.w.root / "mv/copy.pdf").open("r+b") as fh:
            fh.write(edited)
        rows = live.wait_synced("mv/copy.pdf", md5={"mv/copy.pdf": md5_of(edited)})
        assert stats.uploads == uploads + 1
        assert rows["mv/copy.pdf"].remote_id != remote_id
        assert live.w.rows()["mv/renamed.pdf"].remote_id == remote_id

    def test_a_renamed_directory_uploads_nothing_and_a_save_by_rename_uploads_once(self, live: Live) -> None:
        stats = live.w.server.stats
        files = {f"dir/sub/f{i}.txt": f"directory member {i}".encode() for i in range(3)}
        for relpath, data in files.items():
            live.write(relpath, data)
        live.wait_synced(*files)
        uploads = stats.uploads
        os.rename(live.w.root / "dir", live.w.root / "moved-dir")
        moved = [p.replace("dir/", "moved-dir/", 1) for p in files]
        live.wait_synced(*moved)
        assert stats.uploads == uploads

        # An editor's atomic save: write a temp name (ignored), then rename it over the file.
        (live.w.root / "moved-dir/sub/f0.txt.tmp").write_bytes(b"saved by rename")
        os.replace(live.w.root / "moved-dir/sub/f0.txt.tmp", live.w.root / "moved-dir/sub/f0.txt")
        live.wait_synced("moved-dir/sub/f0.txt", md5={"moved-dir/sub/f0.txt": md5_of(b"saved by rename")})
        assert stats.uploads == uploads + 1

    def test_empty_unicode_spaced_names_and_a_new_deep_tree(self, live: Live) -> None:
        files = {
            "names/empty.txt": b"",
            "names/résumé — 日本語.txt": b"unicode\n",
            "names/with  two spaces .pdf": b"spaces",
        }
        for relpath, data in files.items():
            live.write(relpath, data)
        deep = live.w.root / "fresh/a/b/c"
        deep.mkdir(parents=True)  # mkdir -p, then a file inside at once: before any watch on it exists
        (deep / "inside.txt").write_bytes(b"written into a brand-new tree")
        files["fresh/a/b/c/inside.txt"] = b"written into a brand-new tree"
        rows = live.wait_synced(*files, md5={p: md5_of(d) for p, d in files.items()})
        remote = {f["id"]: f for f in live.w.remote()}
        for relpath, data in files.items():
            item = remote[rows[relpath].remote_id or ""]
            assert (item["filename"], item["bytes"]) == (Path(relpath).name, len(data))

    def test_symlink_loop_and_fifo_are_skipped_and_the_daemon_goes_on(self, live: Live) -> None:
        (live.w.root / "odd").mkdir()
        os.symlink("..", live.w.root / "odd/loop")
        os.symlink("../mv", live.w.root / "odd/dirlink")
        os.mkfifo(live.w.root / "odd/pipe")
        live.write("odd/after.txt", b"written after the oddities")
        live.wait_synced("odd/after.txt")
        assert live.daemon.alive()
        assert not [p for p in live.w.rows() if p.startswith("odd/") and p != "odd/after.txt"]
        # Write through the loop: the file is seen once, under its real path.
        loop_path = live.w.root / "odd/loop/odd/through-loop.txt"
        loop_path.write_bytes(b"via the loop")
        live.wait_synced("odd/through-loop.txt")
        assert not [p for p in live.w.rows() if "loop/" in p or "dirlink/" in p]

    def test_an_unreadable_file_is_logged_once_and_the_daemon_goes_on(self, live: Live) -> None:
        if not can_deny_reads(live.w.launcher):
            pytest.skip("running as root without setpriv: no way to make a file unreadable to the daemon")
        outside = live.w.workdir / "secret.bin"
        outside.write_bytes(b"top secret")
        outside.chmod(0)
        os.rename(outside, live.w.root / "secret.bin")  # appears complete and already unreadable
        wait_for(
            lambda: live.unreadable_logs("secret.bin"),
            what="the unreadable file to be logged",
            diagnose=live.daemon.tail,
        )
        # More events on it (attrib, mtime) and more work elsewhere: still logged only once.
        os.utime(live.w.root / "secret.bin")
        (live.w.root / "secret.bin").chmod(0)
        live.write("after-secret.txt", b"the daemon goes on")
        live.wait_synced("after-secret.txt")
        assert live.daemon.alive()
        assert live.unreadable_logs("secret.bin") == 1
        assert "secret.bin" not in live.w.rows()
        assert not live.remote_by_name("secret.bin")
        # Readable again (a chmod changes its ctime): picked up without a restart.
        (live.w.root / "secret.bin").chmod(0o644)
        live.wait_synced("secret.bin", md5={"secret.bin": md5_of(b"top secret")})

    def test_status_json_reports_counts_while_running(self, live: Live) -> None:
        live.write("status/one.txt", b"1")
        live.write("status/two.txt", b"22")
        live.wait_synced("status/one.txt", "status/two.txt")
        report = live.w.status()
        assert report["running"] is True
        synced = sum(1 for r in live.w.rows().values() if r.state is State.SYNCED)
        assert report["counts"]["synced"] == synced >= 2
        assert [r["path"] for r in report["roots"]] == [str(live.w.root)]

    def test_a_second_daemon_or_sync_on_the_same_state_dir_exits_3(self, live: Live) -> None:
        second = live.w.start()
        assert second.proc.wait(30) == 3
        message = second.stderr().strip()
        assert len(message.splitlines()) == 1, message
        assert "already running" in message
        assert str(live.w.state_dir) in message
        once = live.w.sync_once(timeout=30)
        assert once.returncode == 3
        assert "already running" in once.stderr
        assert live.daemon.alive()


@pytest.mark.timeout(60)
def test_kill_9_leaves_no_stale_lock(server_factory: ServerFactory, syncd_factory: MakeSyncd) -> None:
    w = syncd_factory(server_factory())
    first = w.start()
    first.wait_ready()
    first.kill9()
    assert first.proc.returncode == -signal.SIGKILL
    w.root.joinpath("after-kill.txt").write_bytes(b"synced by the next daemon")
    second = w.start()
    second.wait_ready()
    w.wait_synced("after-kill.txt", daemon=second)
    assert second.stop() == 0


@pytest.mark.timeout(60)
def test_sigterm_drains_an_upload_in_flight_and_exits_0(
    server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    server = server_factory(latency_ms=1000)
    w = syncd_factory(server)
    (w.root / "inflight.pdf").write_bytes(b"drained, not abandoned")
    daemon = w.start()
    wait_for(
        lambda: (row := w.rows().get("inflight.pdf")) is not None and row.state is State.UPLOADING,
        what="the upload to start",
        diagnose=daemon.tail,
    )
    assert daemon.stop() == 0
    row = w.rows()["inflight.pdf"]
    assert row.state is State.SYNCED, row
    assert [f["id"] for f in w.remote()] == [row.remote_id]
    assert server.stats.uploads == 1


@pytest.mark.timeout(90)
def test_kill_9_after_the_upload_landed_is_resolved_on_restart_without_a_second_upload(
    server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    """The server stores the upload but holds its answer back (fault `slow`, every request): the daemon
    is killed while it waits, so only the manifest's `uploading` intent survives."""
    server = server_factory(fault_rate=1.0, fault_kinds=("slow",))
    w = syncd_factory(server)
    data = b"interrupted upload " * 1000
    (w.root / "big.pdf").write_bytes(data)
    first = w.start()
    wait_for(
        lambda: (
            (row := w.rows().get("big.pdf")) is not None
            and row.state is State.UPLOADING
            and server.stats.uploads == 1
        ),
        what="the upload to be sent",
        diagnose=first.tail,
    )
    first.kill9()
    wait_for(
        lambda: [f for f in w.remote() if f["filename"] == "big.pdf"],
        timeout=15,
        what="the interrupted upload to be stored",
    )
    assert w.rows()["big.pdf"].state is State.UPLOADING

    second = w.start()
    rows = w.wait_synced("big.pdf", md5={"big.pdf": md5_of(data)}, daemon=second, timeout=30)
    [item] = w.remote()
    assert rows["big.pdf"].remote_id == item["id"]
    assert rows["big.pdf"].owned, "created after the recorded intent: our own upload"
    assert server.stats.uploads == 1
    assert second.stop() == 0


@pytest.mark.timeout(90)
def test_kill_9_during_a_slow_round_trip_leaves_one_owned_remote_copy_after_restart(
    server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    """With a WAN round trip (`latency_ms`, spent before the server handles a request) the daemon is
    killed while its upload is on the way; whether or not the server went on to store it, the restart
    ends with exactly one remote copy, owned by this manifest."""
    server = server_factory(latency_ms=1500)
    w = syncd_factory(server)
    data = b"never arrived " * 1000
    (w.root / "big.pdf").write_bytes(data)
    first = w.start()
    wait_for(
        lambda: (row := w.rows().get("big.pdf")) is not None and row.state is State.UPLOADING,
        what="the upload intent to be recorded",
        diagnose=first.tail,
    )
    first.kill9()

    second = w.start()
    rows = w.wait_synced("big.pdf", md5={"big.pdf": md5_of(data)}, daemon=second, timeout=30)
    [item] = w.remote()
    assert (rows["big.pdf"].remote_id, rows["big.pdf"].owned) == (item["id"], True)
    assert second.stop() == 0


@pytest.mark.timeout(150)
def test_restart_on_an_unchanged_tree_of_2000_files_uploads_and_hashes_nothing(
    server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    """No hashing is observed directly: the files are mode 000 and the restarted daemon runs without the
    capability to bypass that, so opening any file would log it as unreadable. The walk's end is
    observed through a file removed before the restart: its row is marked missing after the walk."""
    launcher = no_dac_override()
    server = server_factory()
    w = syncd_factory(server, launcher=())
    w.configure(mode="inotify", settle=0.3, delete_grace=3600.0)
    for d in range(20):
        folder = w.root / f"d{d:02}"
        folder.mkdir()
        for i in range(100):
            path = folder / f"f{i:03}.txt"
            path.write_bytes(f"file {d} {i}\n".encode())
            if launcher or os.geteuid() != 0:
                path.chmod(0)
    (w.root / "gone.txt").write_bytes(b"removed before the restart")
    done = w.sync_once(timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert server.stats.uploads == 2001
    (w.root / "gone.txt").unlink()
    before = server.stats.snapshot()
    rows_before = {p: (r.state, r.updated_at) for p, r in w.rows().items() if p != "gone.txt"}

    w.launcher = launcher
    daemon = w.start()
    daemon.wait_ready()
    wait_for(
        lambda: (row := w.rows().get("gone.txt")) is not None and row.missing_since is not None,
        timeout=60,
        what="the startup scan to finish (gone.txt marked missing)",
        diagnose=daemon.tail,
    )
    after = server.stats.snapshot()
    for counter in ("uploads", "presigned_puts", "hash_lookups", "lists"):
        assert after[counter] == before[counter], counter
    assert not daemon.logged(UNREADABLE_EVENT)
    assert {p: (r.state, r.updated_at) for p, r in w.rows().items() if p != "gone.txt"} == rows_before
    assert daemon.stop() == 0


@pytest.mark.timeout(60)
def test_public_only_server_slow_write_rename_and_copy(
    server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    """The core event-driven path against the public API's shape (no md5 field, no purpose filters)."""
    server = server_factory(public_only=True)
    w = syncd_factory(server)
    w.configure(mode="auto", settle=0.4)
    daemon = w.start()
    daemon.wait_ready()
    path = w.root / "scans" / "page.png"
    path.parent.mkdir()
    chunks = [bytes([i]) * 2048 for i in range(8)]
    for chunk in chunks:
        with path.open("ab") as fh:
            fh.write(chunk)
        time.sleep(0.15)
    rows = w.wait_synced("scans/page.png", md5={"scans/page.png": md5_of(b"".join(chunks))}, daemon=daemon)
    assert rows["scans/page.png"].purpose == "vision"
    assert server.stats.uploads == 1
    os.rename(path, w.root / "scans" / "moved.png")
    shutil.copyfile(w.root / "scans" / "moved.png", w.root / "copy.png")
    rows = w.wait_synced("scans/moved.png", "copy.png", daemon=daemon)
    assert rows["copy.png"].purpose == "assistants"
    # Another purpose is another remote file (purpose is part of the identity); the rename reuses.
    assert server.stats.uploads == 2
    assert rows["scans/moved.png"].remote_id != rows["copy.png"].remote_id
    assert len(w.remote()) == 2
    assert daemon.stop() == 0
