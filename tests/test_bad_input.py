"""Bad input (issue 11): odd entries and names in a watched folder, a file that keeps growing, a flood of
files, a root deleted and re-created, a config with bad keys. Each test asserts one named outcome (synced,
skipped, held, refused) and that the daemon goes on; the cases tests/test_e2e_daemon.py covers (FIFOs,
symlink loops, unreadable files, temp names, unicode and spaced names) are not repeated.

One daemon serves the class (each test in its own folder); the root-deletion case has its own.
`make soak` grows the file for a minute instead of 10 s and drops 10,000 files instead of 2,000.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import DaemonProcess, ServerFactory, Syncd, md5_of, wait_for
from soak import content, pick, write_config

from syncd.server import RunningServer, ServerSettings, running_server

MakeSyncd = Callable[..., Syncd]
SETTLE = 0.6
RESCAN = 1.0


@dataclass
class Live:
    w: Syncd
    daemon: DaemonProcess

    @property
    def server(self) -> RunningServer:
        return self.w.server

    def by_name(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for item in self.w.remote():
            out.setdefault(item["filename"], []).append(item)
        return out

    def mentions(self, relpath: str) -> list[dict[str, Any]]:
        """Log records naming ``relpath`` (its path field)."""
        return [r for r in self.daemon.logs() if r.get("path") == relpath]

    def rescans(self) -> int:
        return len(self.daemon.logged("scan done", under=""))

    def after_rescan(self) -> None:
        """Wait until a full rescan started after now has finished."""
        seen = self.rescans()
        wait_for(
            lambda: self.rescans() >= seen + 2, timeout=30, what="a full rescan", diagnose=self.daemon.tail
        )


@pytest.fixture(scope="class")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    base = tmp_path_factory.mktemp("bad-input")
    settings = ServerSettings(data_dir=base / "server", api_key=secrets.token_urlsafe(16), port=0)
    with running_server(settings) as server:
        w = Syncd(base / "w", server)
        write_config(
            w,
            remote={"timeout": 30.0},
            watch={"settle_seconds": SETTLE, "delete_grace_seconds": 1.0, "rescan_interval": RESCAN},
        )
        daemon = w.start()
        try:
            daemon.wait_ready()
            yield Live(w, daemon)
            assert daemon.alive(), f"the daemon died\n{daemon.tail()}"
            assert daemon.stop() == 0, daemon.tail()
            assert not [r for r in daemon.logs() if "exception" in r or r.get("unparsed")], daemon.tail()
        finally:
            w.close()


@pytest.fixture(autouse=True)
def _fail_fast_without_the_class_daemon(request: pytest.FixtureRequest) -> None:
    if "live" in request.fixturenames:
        live: Live = request.getfixturevalue("live")
        if not live.daemon.alive():
            pytest.fail(f"the class daemon exited with {live.daemon.proc.returncode}\n{live.daemon.tail()}")


@pytest.mark.timeout(300)
class TestBadInput:
    def test_a_socket_is_skipped_silently(self, live: Live) -> None:
        folder = live.w.root / "sock"
        folder.mkdir()
        os.mknod(folder / "daemon.sock", stat.S_IFSOCK | 0o600)
        (folder / "after.txt").write_bytes(b"written after the socket")
        live.w.wait_synced("sock/after.txt", daemon=live.daemon)
        live.after_rescan()
        assert "sock/daemon.sock" not in live.w.rows()
        assert "daemon.sock" not in live.by_name()
        assert not live.mentions("sock/daemon.sock")

    def test_a_symlink_out_of_the_root_is_not_followed(self, live: Live) -> None:
        outside = live.w.workdir / "outside"
        outside.mkdir()
        (outside / "secret.txt").write_bytes(b"outside the watched root")
        folder = live.w.root / "links"
        folder.mkdir()
        os.symlink(outside / "secret.txt", folder / "secret-link.txt")
        os.symlink(outside, folder / "outside-dir")
        (folder / "after.txt").write_bytes(b"written after the links")
        live.w.wait_synced("links/after.txt", daemon=live.daemon)
        live.after_rescan()
        assert not [p for p in live.w.rows() if p.startswith("links/") and p != "links/after.txt"]
        assert md5_of(b"outside the watched root") not in {f["md5"] for f in live.w.remote()}

    def test_a_name_that_is_not_utf8_is_synced_under_a_valid_name_and_kept_exactly(self, live: Live) -> None:
        raw = {
            b"latin/caf\xe9.txt": b"a Latin-1 name",
            b"latin/r\xc3\xa9sum\xe9.txt": b"half UTF-8, half Latin-1",
            b"latin/d\xefr/inside.txt": b"in a Latin-1 directory",
        }
        root = os.fsencode(live.w.root)
        os.makedirs(root + b"/latin/d\xefr")
        for name, data in raw.items():
            with open(root + b"/" + name, "wb") as fh:
                fh.write(data)
        relpaths = {os.fsdecode(name): data for name, data in raw.items()}
        rows = live.w.wait_synced(
            *relpaths, md5={p: md5_of(d) for p, d in relpaths.items()}, daemon=live.daemon
        )
        assert {os.fsencode(r.relpath) for r in rows.values()} == set(raw)  # the local bytes, exactly
        names = live.by_name()
        for shown in ("caf\ufffd.txt", "résum\ufffd.txt", "inside.txt"):
            [item] = names[shown]
            assert item["md5"] in {md5_of(d) for d in raw.values()}
        uploads = live.server.stats.uploads
        live.after_rescan()
        assert live.w.synced(*relpaths) is not None, "a rescan must find them unchanged"
        assert live.server.stats.uploads == uploads
        assert live.w.cli("status").returncode == 0
        assert live.w.cli("status", "--json").returncode == 0

    def test_newlines_quotes_and_255_byte_names_are_synced_and_logged_on_one_line(self, live: Live) -> None:
        long = "é" * 127 + "x"
        assert len(os.fsencode(long)) == 255
        files = {
            "names/new\nline.txt": ("new\ufffdline.txt", b"a newline in the name"),
            "names/tab\there.txt": ("tab\ufffdhere.txt", b"a tab in the name"),
            # multipart/form-data sends a double quote as %22 (WHATWG, as browsers and the SDK do)
            "names/quote\"d 'both'.txt": ("quote%22d 'both'.txt", b"quotes in the name"),
            f"names/{long}": (long, b"a name of 255 bytes"),
        }
        for relpath, (_, data) in files.items():
            path = live.w.root / relpath
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
        live.w.wait_synced(*files, md5={p: md5_of(d) for p, (_, d) in files.items()}, daemon=live.daemon)
        names = live.by_name()
        for relpath, (remote, data) in files.items():
            [item] = names[remote]
            assert item["md5"] == md5_of(data)
            [synced] = [r for r in live.mentions(relpath) if r["event"] == "synced"]
            assert synced["remote_id"] == item["id"]  # one JSON line per record, the name intact in it

    def test_a_file_growing_for_a_while_is_uploaded_once_with_its_final_bytes(self, live: Live) -> None:
        seconds = pick(10, 60)
        path = live.w.root / "growing" / "scan.pdf"
        path.parent.mkdir()
        uploads = live.server.stats.uploads
        deadline = time.monotonic() + seconds
        with path.open("wb") as fh:
            while time.monotonic() < deadline:
                fh.write(os.urandom(4096))
                fh.flush()
                time.sleep(SETTLE / 3)  # a scanner writing page by page, faster than settle_seconds
        final = path.read_bytes()
        live.w.wait_synced("growing/scan.pdf", md5={"growing/scan.pdf": md5_of(final)}, daemon=live.daemon)
        assert live.server.stats.uploads == uploads + 1, "never a partial version"
        [item] = live.by_name()["scan.pdf"]
        assert (item["md5"], item["bytes"]) == (md5_of(final), len(final))

    def test_a_config_with_bad_keys_is_refused_in_one_line_and_a_reload_keeps_the_running_one(
        self, live: Live
    ) -> None:
        good = live.w.config_path.read_text(encoding="utf-8")
        try:
            live.w.config_path.write_text(
                good.replace("[remote]\n", "[remote]\nretires = 3\n"), encoding="utf-8"
            )
            check = live.w.cli("check-config")
            assert check.returncode == 2
            assert check.stderr.strip().splitlines() == [
                f"syncd: {live.w.config_path}: remote.retires: unknown key (check its spelling against"
                " config.example.toml)"
            ]
            live.daemon.proc.send_signal(signal.SIGHUP)
            [failed] = wait_for(
                lambda: live.daemon.logged("config reload failed; keeping the running config"),
                what="the reload to be refused",
                diagnose=live.daemon.tail,
            )
            assert "remote.retires: unknown key" in failed["error"]
        finally:
            live.w.config_path.write_text(good, encoding="utf-8")
        (live.w.root / "after-reload.txt").write_bytes(b"synced with the running config")
        live.w.wait_synced("after-reload.txt", daemon=live.daemon)

    def test_thousands_of_files_dropped_at_once_are_all_synced_once(self, live: Live) -> None:
        count = pick(2000, 10000)
        uploads = live.server.stats.uploads
        folder = live.w.root / "drop"
        folder.mkdir()
        for i in range(count):
            (folder / f"page-{i:05d}.txt").write_bytes(content(f"dropped {i}", 256))
        relpaths = [f"drop/page-{i:05d}.txt" for i in range(count)]
        live.w.wait_synced(*relpaths, timeout=pick(120, 600), daemon=live.daemon)
        assert live.server.stats.uploads == uploads + count
        names = [f["filename"] for f in live.w.remote() if f["filename"].startswith("page-")]
        assert len(names) == len(set(names)) == count


@pytest.mark.timeout(120)
def test_a_root_deleted_and_re_created_is_synced_again_or_held_as_replaced(
    server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    """`rm -rf root && mkdir root`. A directory with the old inode (ext4 hands the freed one out again at
    once) is the same root to the guards: syncing goes on, events included, and what was not put back
    counts as deleted. One with a new inode is held as replaced (one error line, a status note, nothing
    pruned or uploaded) until `syncd reconcile --once --confirm` accepts it."""
    server = server_factory()
    w = syncd_factory(server)
    write_config(w, watch={"delete_grace_seconds": 0}, reconcile={"interval_seconds": 1})
    (w.root / "a.txt").write_bytes(b"put back")
    (w.root / "b.txt").write_bytes(b"not put back")
    daemon = w.start()
    w.wait_synced("a.txt", "b.txt", daemon=daemon)
    ids = {f["id"] for f in w.remote()}
    inode = os.stat(w.root).st_ino
    shutil.rmtree(w.root)
    w.root.mkdir()
    (w.root / "a.txt").write_bytes(b"put back")
    if os.stat(w.root).st_ino == inode:
        (w.root / "later.txt").write_bytes(b"written into the root that is back")
        w.wait_synced("a.txt", "later.txt", timeout=30, daemon=daemon)  # not at the hourly rescan
        (w.root / "last.txt").write_bytes(b"seen by the new watch")
        w.wait_synced("last.txt", timeout=20, daemon=daemon)  # the root is watched again within 10 s
        names = {"a.txt", "later.txt", "last.txt"}
        wait_for(lambda: {f["filename"] for f in w.remote()} == names, what="b.txt pruned")
        assert daemon.stop() == 0
        return
    replaced = "root is another directory than recorded (replaced or re-created?)"
    held = "root unavailable: not syncing it"
    wait_for(lambda: daemon.logged(held, reason=replaced), timeout=30, diagnose=daemon.tail)
    done = len(daemon.logged("reconcile done"))
    wait_for(lambda: len(daemon.logged("reconcile done")) >= done + 2, what="two reconciles")
    assert {f["id"] for f in w.remote()} == ids, "nothing pruned nor uploaded while held"
    assert len(daemon.logged(held, reason=replaced)) == 1
    assert replaced in w.status()["notes"][f"root:{w.root}"]
    assert daemon.stop() == 0
    confirmed = w.cli("reconcile", "--once", "--confirm")
    assert confirmed.returncode == 0, confirmed.stdout[-2000:] + confirmed.stderr
    assert {f["filename"] for f in w.remote()} == {"a.txt"}
