"""The state directory as a resource that fails, and the manifest's binding to one remote (design §3).

Each case runs the real CLI or daemon: a full disk and a read-only one are a small tmpfs (the suite runs
as root in CI), a corrupt or future-version manifest is a real file. Every outcome is one line naming
the state dir, a non-zero exit or a paused daemon, and a manifest that still passes integrity_check.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ServerFactory, Syncd, wait_for

from syncd.server import RunningServer
from syncd.state import MANIFEST_NAME


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("syncd:")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def integrity(state_dir: Path) -> str:
    with contextlib.closing(sqlite3.connect(f"file:{state_dir / MANIFEST_NAME}?mode=ro", uri=True)) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


# -- one remote per manifest ---------------------------------------------------------------------------


def test_another_remote_is_refused_until_rebind(
    server_factory: ServerFactory, syncd_factory: Callable[..., Syncd]
) -> None:
    first, second = server_factory(), server_factory()
    w = syncd_factory(first)
    (w.root / "a.pdf").write_bytes(b"%PDF first account")
    assert w.sync_once().returncode == 0
    [on_first] = w.remote()

    w.server = second  # say, from --embedded to a real account
    w.configure()
    refused = w.cli("sync", "--once")
    assert refused.returncode == 2
    line = one_line(refused)
    assert "--rebind" in line
    assert str(w.state_dir) in line
    assert second.api_key not in refused.stderr + refused.stdout
    assert w.remote() == []  # nothing uploaded to the second one
    assert w.rows()["a.pdf"].remote_id == on_first["id"]

    rebound = w.cli("sync", "--once", "--rebind")
    assert rebound.returncode == 0, rebound.stderr
    [on_second] = w.remote()
    row = w.rows()["a.pdf"]
    assert row.remote_id == on_second["id"]
    assert row.owned

    w.server = first
    assert [f["id"] for f in w.remote()] == [on_first["id"]]  # the first account is never touched


def test_rebind_rematches_by_md5_without_uploading_again(
    server_factory: ServerFactory, syncd_factory: Callable[..., Syncd]
) -> None:
    first, second = server_factory(), server_factory()
    w = syncd_factory(first)
    (w.root / "a.pdf").write_bytes(b"%PDF already on both")
    assert w.sync_once().returncode == 0
    w.server = second
    w.configure()
    assert w.cli("files", "upload", str(w.root / "a.pdf")).returncode == 0  # someone put it there
    assert w.cli("sync", "--once", "--rebind").returncode == 0
    assert second.stats.uploads == 1
    row = w.rows()["a.pdf"]
    assert not row.owned  # found there, not uploaded by this syncd: never pruned
    done = w.cli("reconcile", "--once")
    assert done.returncode == 0, done.stderr
    assert len(w.remote()) == 1


# -- sync --once --dry-run ---------------------------------------------------------------------------


def test_sync_dry_run_says_what_a_pass_would_do_and_changes_nothing(
    server: RunningServer, syncd_factory: Callable[..., Syncd]
) -> None:
    w = syncd_factory(server)
    (w.root / "kept.pdf").write_bytes(b"%PDF unchanged")
    (w.root / "edited.pdf").write_bytes(b"%PDF version 1")
    assert w.sync_once().returncode == 0
    (w.root / "edited.pdf").write_bytes(b"%PDF version 2")
    (w.root / "new.pdf").write_bytes(b"%PDF brand new")
    (w.root / "copy.pdf").write_bytes(b"%PDF unchanged")
    manifest = w.state_dir / MANIFEST_NAME
    before = manifest.read_bytes()
    uploads = server.stats.uploads

    done = w.cli("sync", "--once", "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("upload") and "new.pdf" in line and "(new)" in line for line in lines)
    assert any(line.startswith("upload") and "edited.pdf" in line and "(changed)" in line for line in lines)
    assert any(line.startswith("match") and "copy.pdf" in line for line in lines)
    assert not any("kept.pdf" in line for line in lines)
    assert "would upload 2 file(s)" in lines[-1]
    assert server.stats.uploads == uploads
    assert manifest.read_bytes() == before


# -- a manifest that cannot be used ------------------------------------------------------------------


def test_a_corrupt_manifest_is_one_line_and_never_reset(
    server: RunningServer, syncd_factory: Callable[..., Syncd]
) -> None:
    w = syncd_factory(server)
    w.state_dir.mkdir(parents=True)
    garbage = b"this is not a database" * 100
    (w.state_dir / MANIFEST_NAME).write_bytes(garbage)
    done = w.sync_once()
    assert done.returncode == 2
    line = one_line(done)
    assert "damaged" in line
    assert str(w.state_dir) in line
    assert (w.state_dir / MANIFEST_NAME).read_bytes() == garbage


def test_a_manifest_from_a_newer_syncd_is_one_line(
    server: RunningServer, syncd_factory: Callable[..., Syncd]
) -> None:
    w = syncd_factory(server)
    assert w.sync_once().returncode == 0
    with contextlib.closing(sqlite3.connect(w.state_dir / MANIFEST_NAME)) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
        db.commit()
    done = w.sync_once()
    assert done.returncode == 2
    assert "v99" in one_line(done)
    assert integrity(w.state_dir) == "ok"


# -- a full or read-only disk --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs (root only: CI runs as root; a developer's run skips). Not smaller: SQLite's WAL
    grows to ~4 MiB (1,000 pages) before its automatic checkpoint."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of the disk; delete the returned file to give them back."""
    filler = disk / "filler"
    with filler.open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return filler


def on_disk(w: Syncd, disk: Path) -> None:
    w.state_dir = disk / "state"
    w.configure()


def test_a_full_disk_ends_a_pass_with_one_line(
    server: RunningServer, syncd_factory: Callable[..., Syncd], small_disk: Path
) -> None:
    w = syncd_factory(server)
    on_disk(w, small_disk)
    (w.root / "a.pdf").write_bytes(b"%PDF first")
    assert w.sync_once().returncode == 0
    filler = fill(small_disk)
    for n in range(200):
        (w.root / f"scan-{n:03}.pdf").write_bytes(b"%%PDF page %d " % n * 50)
    done = w.sync_once()
    assert done.returncode == 1
    line = one_line(done)
    assert "disk is full" in line
    assert str(w.state_dir) in line
    filler.unlink()
    assert integrity(w.state_dir) == "ok"
    assert w.sync_once().returncode == 0
    assert len(w.remote()) == 201


def test_a_read_only_state_dir_ends_a_pass_with_one_line(
    server: RunningServer, syncd_factory: Callable[..., Syncd], small_disk: Path
) -> None:
    w = syncd_factory(server)
    on_disk(w, small_disk)
    (w.root / "a.pdf").write_bytes(b"%PDF first")
    assert w.sync_once().returncode == 0
    (w.root / "b.pdf").write_bytes(b"%PDF second")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    done = w.sync_once()
    assert done.returncode == 1
    assert "cannot be written" in one_line(done)
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert w.sync_once().returncode == 0
    assert len(w.remote()) == 2


def test_the_daemon_pauses_on_a_full_disk_and_resumes_by_itself(
    server: RunningServer, syncd_factory: Callable[..., Syncd], small_disk: Path, tmp_path: Path
) -> None:
    w = syncd_factory(server)
    on_disk(w, small_disk)
    runtime = tmp_path / "runtime"  # the live state lives on another disk, as /run does
    base_env = w.env
    w.env = lambda: {**base_env(), "XDG_RUNTIME_DIR": str(runtime)}  # type: ignore[method-assign]
    (w.root / "first.pdf").write_bytes(b"%PDF before the disk filled")
    daemon = w.start()
    daemon.wait_ready()
    w.wait_synced("first.pdf", daemon=daemon)
    filler = fill(small_disk)
    for n in range(100):
        (w.root / f"scan-{n:03}.pdf").write_bytes(b"%%PDF page %d " % n * 50)
    wait_for(
        lambda: (w.status().get("live") or {}).get("paused"),
        timeout=60,
        what="the daemon to say it is paused",
        diagnose=daemon.tail,
    )
    assert "disk is full" in w.status()["live"]["paused"]
    assert daemon.alive()
    assert len(daemon.logged("state dir cannot be written: paused; resuming by itself once it can")) == 1
    assert "Traceback" not in daemon.stderr()
    filler.unlink()
    wait_for(
        lambda: len(w.remote()) == 101,
        timeout=90,
        what="every file synced after the disk had room again",
        diagnose=daemon.tail,
    )
    assert daemon.logged("state dir can be written again: resuming")
    assert daemon.stop() == 0
    assert integrity(w.state_dir) == "ok"
    assert not any(daemon.logged("failed unexpectedly"))
