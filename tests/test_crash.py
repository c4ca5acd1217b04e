"""Crash harness (issue 11): `kill -9` the daemon at chosen moments, restart it, and check that nothing was
lost, duplicated or corrupted; the same for the server, and for a reconcile cut off mid-delete.

Each kill aims at one window. The server is restarted before each run with what widens that window (a
WAN round trip, answers held back), then the daemon is polled from outside and frozen (SIGSTOP) as soon as
the window seems open; what its manifest, its open files and the server's data dir show while it is frozen
decides which windows the kill hit, and SIGKILL follows at once. Windows:

- ``hashing``: the daemon has a file open that its manifest has not recorded as hashed;
- ``intent``: a row is ``uploading`` (the intent is committed) and the server has not seen the request;
- ``presigned-put``: a presigned PUT's body is being received (``tmp/<id>.part`` of a grant);
- ``landed``: the upload is stored but its answer is held back (the ``slow`` fault);
- ``commit``: the daemon holds the manifest's write lock (a batch written but not committed).

CI runs 200 files (~300 MiB) and 6 kills; `make soak` 1,000 files (~1.5 GiB) and 50 kills. The presigned
threshold is syncd's default (32 MiB): the 2% of files over 33 MiB take the presigned path.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import secrets
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import DaemonProcess, ServerFactory, Syncd, free_port, wait_for
from soak import (
    Figures,
    LocalFile,
    MiB,
    Seat,
    ServerProcess,
    audit,
    content,
    key_leaks,
    mixed_sizes,
    pick,
    server_view,
    write_config,
    write_file,
)

from syncd.manifest import State
from syncd.state import MANIFEST_NAME

MakeSyncd = Callable[..., Syncd]

WINDOWS = ("hashing", "intent", "presigned-put", "landed", "commit")
WIDEN: dict[str, dict[str, Any]] = {
    "hashing": {},
    "intent": {"latency_ms": 1500},
    "presigned-put": {},
    "landed": {"fault_rate": 1.0, "fault_kinds": ("slow",)},
    "commit": {},
}
"""Server settings for the run that aims at each window."""
PRESIGNED = 32 * MiB
HUNT_SECONDS = 90.0
POLL_SECONDS = 0.01


def purpose_of(relpath: str) -> str:
    return "vision" if relpath.startswith("scans/") else "assistants"


# -- looking at a daemon from outside ---------------------------------------------------------------------


def open_files(pid: int, root: Path) -> set[str]:
    """Relpaths under ``root`` the process has open (from /proc)."""
    prefix = str(root) + "/"
    found = set()
    fd_dir = f"/proc/{pid}/fd"
    with contextlib.suppress(OSError):
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                target = os.readlink(f"{fd_dir}/{fd}")
                if target.startswith(prefix):
                    found.add(target[len(prefix) :])
    return found


def write_locked(state_dir: Path) -> bool:
    """Whether another connection holds the manifest's write lock (an open write transaction).

    Only once the manifest is in WAL mode (its -wal file exists), where this probe takes nothing but the
    write lock: never create the file, nor stand in the way of the daemon switching it to WAL."""
    path = state_dir / MANIFEST_NAME
    if not path.with_name(path.name + "-wal").exists():
        return False
    uri = path.absolute().as_uri() + "?mode=rw"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None)
    except sqlite3.OperationalError:
        return False
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError as exc:
        return "locked" in str(exc) or "busy" in str(exc)
    finally:
        conn.close()


def windows_open(w: Syncd, data_dir: Path, pid: int) -> set[str]:
    """Which windows the daemon (best frozen) and the server are in right now."""
    found: set[str] = set()
    rows = w.rows()
    for rel in open_files(pid, w.root):
        row = rows.get(rel)
        if row is None or row.state is not State.UPLOADING:
            found.add("hashing")
    stored, pending, receiving = server_view(data_dir)
    for row in rows.values():
        if row.state is not State.UPLOADING:
            continue
        name = Path(row.relpath).name
        if (row.md5, row.purpose) in stored:
            found.add("landed")
        elif row.stat.size > PRESIGNED and any(pending.get(i) == name for i in receiving):
            found.add("presigned-put")
        elif not receiving:
            found.add("intent")
    if write_locked(w.state_dir):
        found.add("commit")
    return found


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


def kill_in_window(daemon: DaemonProcess, target: str, look: Callable[[], set[str]]) -> set[str]:
    """Poll until ``target`` seems open, freeze the daemon, and kill it -9 if the frozen state confirms it
    (else let it go on); returns every window the kill hit."""
    pid = daemon.proc.pid
    deadline = time.monotonic() + HUNT_SECONDS
    while time.monotonic() < deadline:
        if not daemon.alive():
            pytest.fail(f"the daemon exited with {daemon.proc.returncode}\n{daemon.tail()}")
        if target in look():
            os.kill(pid, signal.SIGSTOP)
            wait_for(lambda: _stopped(pid), timeout=5, what="the daemon to stop")
            seen = look()
            if target in seen:
                daemon.kill9()
                return seen
            os.kill(pid, signal.SIGCONT)
        time.sleep(POLL_SECONDS)
    pytest.fail(f"window {target!r} never opened in {HUNT_SECONDS:.0f}s\n{daemon.tail()}")


def crashes(w: Syncd) -> list[dict[str, Any]]:
    """Log records with a traceback, and any stderr output of a traceback, of every daemon run."""
    found = [r for d in w.daemons for r in d.logs() if "exception" in r]
    return found + [{"stderr": d.stderr()} for d in w.daemons if "Traceback" in d.stderr()]


# -- the harness -----------------------------------------------------------------------------------------


def plan_waves(count: int, kills: int, rng: random.Random) -> tuple[list[str], list[list[tuple[str, int]]]]:
    """The window of each kill and the files written before each run (one wave per run, the last for the
    run that finishes). Big files go to runs that hash or PUT them, so those windows can open."""
    targets = [WINDOWS[i % len(WINDOWS)] for i in range(kills)]
    sizes = mixed_sizes(count, rng)
    big = [s for s in sizes if s > PRESIGNED]
    rest = [s for s in sizes if s <= PRESIGNED]
    waves: list[list[tuple[str, int]]] = [[] for _ in range(kills + 1)]
    wants_big = [i for i, t in enumerate(targets) if t == "presigned-put"]
    wants_big += [i for i, t in enumerate(targets) if t == "hashing"]
    for n, size in enumerate(big):
        waves[wants_big[n] if n < len(wants_big) else kills].append(("", size))
    for n, size in enumerate(rest):
        waves[n % len(waves)].append(("", size))
    named: list[list[tuple[str, int]]] = []
    serial = 0
    for wave_no, wave in enumerate(waves):
        files = []
        for _, size in wave:
            serial += 1
            folder = "scans" if serial % 5 == 0 else f"w{wave_no:02d}"
            files.append((f"{folder}/f{serial:04d}.bin", size))
        named.append(files)
    return targets, named


@pytest.mark.timeout(1800)
def test_kill_9_in_every_window_loses_duplicates_and_corrupts_nothing(
    tmp_path: Path, syncd_factory: MakeSyncd
) -> None:
    count, kills = pick(200, 1000), pick(6, 50)
    rng = random.Random(11)
    targets, waves = plan_waves(count, kills, rng)
    seat = Seat(tmp_path / "server", secrets.token_urlsafe(16), free_port())
    w = syncd_factory(seat.start())
    seat.stop()
    write_config(w, remote={"timeout": 30.0})
    local: list[LocalFile] = []
    figures = Figures("crash: daemon kill -9", files=count)
    started = time.monotonic()
    try:
        for target, wave in zip(targets, waves, strict=False):
            local += [write_file(w.root, rel, content(rel, size), purpose_of(rel)) for rel, size in wave]
            seat.start(**WIDEN[target])
            daemon = w.start()
            figures.runs += 1
            try:
                look = functools.partial(windows_open, w, seat.data_dir, daemon.proc.pid)
                hit = kill_in_window(daemon, target, look)
            finally:
                seat.stop()
            figures.kills += 1
            for window in hit:
                figures.windows[window] = figures.windows.get(window, 0) + 1
        local += [write_file(w.root, rel, content(rel, size), purpose_of(rel)) for rel, size in waves[-1]]
        seat.start()
        daemon = w.start()
        figures.runs += 1
        w.wait_synced(*(f.relpath for f in local), timeout=pick(300, 1800), daemon=daemon)
        status = [w.cli("status").stdout, w.cli("status", "--json").stdout]
        assert daemon.stop() == 0, daemon.tail()
        figures.bytes = sum(f.size for f in local)
        figures.seconds = time.monotonic() - started
        found = audit(w, local)
        figures.duplicates, figures.lost, figures.wrong_bytes = (
            found.duplicates,
            found.lost,
            found.wrong_bytes,
        )
        leaks = key_leaks(
            seat.api_key,
            [w.state_dir, *(p for d in w.daemons for p in (d.stdout_path, d.stderr_path))],
            status,
        )
    finally:
        seat.stop()
        figures.record()
    assert not found.problems, "\n".join(found.problems[:20])
    assert set(targets) <= set(figures.windows), figures.windows
    assert not leaks, f"the API key appears in {leaks}"
    assert not crashes(w), crashes(w)[:3]


@pytest.mark.timeout(300)
def test_kill_9_of_the_server_mid_upload_and_a_restart_on_its_data_dir_lose_and_duplicate_nothing(
    tmp_path: Path, server_factory: ServerFactory, syncd_factory: MakeSyncd
) -> None:
    """The server dies twice under a running daemon: once after storing uploads whose answers it held back
    (fault ``slow``), once while receiving a presigned PUT; each time it restarts on the same data dir."""
    server = ServerProcess(
        tmp_path / "served", secrets.token_urlsafe(16), free_port(), tmp_path / "serve.log"
    )
    server.start("--fault-rate", "1", "--fault-kinds", "slow")
    w = syncd_factory(server_factory())  # the config names the server process below instead
    w.server = type(w.server)(server.base_url, server.api_key, server.data_dir, w.server.stats)
    write_config(w, remote={"timeout": 30.0})
    local = [
        write_file(w.root, f"s/{i:02d}.txt", content(f"small {i}", 2000 + i), "assistants") for i in range(30)
    ]
    figures = Figures("crash: server kill -9", files=len(local) + 1)
    started = time.monotonic()
    daemon = None
    try:
        wait_for(server.healthy, what="the server to start")
        daemon = w.start()
        figures.runs += 1

        def landed() -> bool:
            stored, _, _ = server_view(server.data_dir)
            return any(r.state is State.UPLOADING and (r.md5, r.purpose) in stored for r in w.rows().values())

        wait_for(landed, timeout=60, what="an upload stored with its answer held back", diagnose=daemon.tail)
        server.kill9()
        figures.kills += 1
        figures.windows["server: answer held back"] = 1
        server.start()
        wait_for(server.healthy, what="the server to restart")

        big = write_file(w.root, "big.bin", content("big", 34 * MiB), "assistants")
        local.append(big)

        def receiving_put() -> bool:
            _, pending, receiving = server_view(server.data_dir)
            return any(pending.get(i) == "big.bin" for i in receiving)

        wait_for(receiving_put, timeout=60, what="the presigned PUT to be received", diagnose=daemon.tail)
        server.kill9()
        figures.kills += 1
        figures.windows["server: receiving a PUT"] = 1
        server.start()
        wait_for(server.healthy, what="the server to restart")
        w.wait_synced(*(f.relpath for f in local), timeout=120, daemon=daemon)
        assert daemon.stop() == 0, daemon.tail()
        figures.seconds = time.monotonic() - started
        found = audit(w, local)
        figures.duplicates, figures.lost, figures.wrong_bytes = (
            found.duplicates,
            found.lost,
            found.wrong_bytes,
        )
    finally:
        if daemon is not None and daemon.alive():
            daemon.kill9()
        server.stop()
        figures.record()
    assert not found.problems, "\n".join(found.problems[:20])
    assert not crashes(w), crashes(w)[:3]


@pytest.mark.timeout(300)
def test_kill_9_during_a_reconciles_deletes_and_the_rerun_deletes_nothing_twice(
    tmp_path: Path, syncd_factory: MakeSyncd
) -> None:
    """Each delete takes a WAN round trip (``latency_ms``), so the daemon is killed with some of its prunes
    sent and the rest planned; the next run finishes the plan from a fresh listing."""
    seat = Seat(tmp_path / "server", secrets.token_urlsafe(16), free_port())
    server = seat.start()
    w = syncd_factory(server)
    write_config(
        w,
        watch={"delete_grace_seconds": 0},
        reconcile={"interval_seconds": 1, "max_delete": 1000, "max_delete_fraction": 1.0},
    )
    files = [
        write_file(w.root, f"r/{i:02d}.txt", content(f"reconciled {i}", 3000 + i), "assistants")
        for i in range(60)
    ]
    other = httpx.post(
        f"{server.base_url}/files",
        params={"purpose": "assistants"},
        files={"file": ("theirs.txt", b"another client's file")},
        headers={"Authorization": f"Bearer {server.api_key}"},
    ).json()
    done = w.sync_once()
    assert done.returncode == 0, done.stdout[-2000:]
    gone, kept = files[:40], files[40:]
    for f in gone:
        (w.root / f.relpath).unlink()
    before = {i["id"] for i in w.remote()}
    figures = Figures("crash: kill -9 mid-reconcile", files=len(files))
    started = time.monotonic()
    seat.stop()
    try:
        server = seat.start(latency_ms=300)
        daemon = w.start()
        figures.runs += 1

        def deleting() -> bool:
            if not 5 <= server.stats.deletes < len(gone):
                return False
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            return True

        wait_for(deleting, timeout=120, what="the reconciler to be deleting", diagnose=daemon.tail)
        daemon.kill9()
        figures.kills += 1
        figures.windows["reconcile deletes"] = 1
        seat.stop()
        server = seat.start()
        daemon = w.start()
        figures.runs += 1

        def finished() -> bool:
            rows = w.rows()
            return len(w.remote()) == len(kept) + 1 and not any(f.relpath in rows for f in gone)

        wait_for(finished, timeout=60, what="the rerun to finish the prunes", diagnose=daemon.tail)
        assert daemon.stop() == 0, daemon.tail()
        figures.seconds = time.monotonic() - started
        listing = w.remote()
        found = audit(w, kept, listing=listing, others=[other["id"]])
        figures.duplicates, figures.lost, figures.wrong_bytes = (
            found.duplicates,
            found.lost,
            found.wrong_bytes,
        )
        ids = {i["id"] for i in listing}
        figures.wrong_deletions = len(({other["id"]} | {r.remote_id for r in w.rows().values()}) - ids)
    finally:
        seat.stop()
        figures.record()
    assert not found.problems, "\n".join(found.problems[:20])
    assert figures.wrong_deletions == 0
    assert seat.totals["deletes"] == len(gone), "every pruned file was sent exactly one DELETE"
    assert len(before - ids) == len(gone)
    assert other["id"] in ids
    rows = w.rows()
    assert sorted(rows) == sorted(f.relpath for f in kept)
    assert all(r.state is State.SYNCED and r.owned for r in rows.values())
    assert not [n for n in w.status()["notes"] if n.startswith("reconcile")]
    assert not crashes(w), crashes(w)[:3]
