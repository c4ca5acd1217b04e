"""A running daemon seen from other processes: `status` shows its live state, and `reconcile --dry-run`
runs beside it without the state dir's lock."""

from __future__ import annotations

from collections.abc import Callable

from conftest import Syncd

from syncd.server import RunningServer


def test_status_shows_the_running_daemons_live_state(
    server: RunningServer, syncd_factory: Callable[..., Syncd]
) -> None:
    w = syncd_factory(server)
    (w.root / "scan-001.pdf").write_bytes(b"%PDF page one")
    daemon = w.start()
    daemon.wait_ready()
    w.wait_synced("scan-001.pdf", daemon=daemon)
    live = w.status()["live"]
    assert live is not None, daemon.tail()
    assert live["pid"] == daemon.proc.pid
    assert live["age_seconds"] < 60
    assert live["crashed"] == 0
    assert live["concurrency"] >= 1
    assert set(live["queues"]) == {"hash", "upload", "hooks", "after_sync"}
    text = w.cli("status")
    assert f"pid {daemon.proc.pid}" in text.stdout
    assert daemon.stop() == 0
    assert w.status()["live"] is None  # a stopped daemon leaves no live state behind


def test_reconcile_dry_run_runs_beside_a_daemon(
    server: RunningServer,
    syncd_factory: Callable[..., Syncd],
) -> None:
    w = syncd_factory(server)
    (w.root / "a.pdf").write_bytes(b"%PDF kept")
    (w.root / "b.pdf").write_bytes(b"%PDF to delete")
    daemon = w.start()
    daemon.wait_ready()
    w.wait_synced("a.pdf", "b.pdf", daemon=daemon)
    (w.root / "b.pdf").unlink()
    done = w.cli("reconcile", "--once", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "already running" not in done.stderr
    assert done.stdout.strip(), "the dry run prints its plan"
    assert daemon.alive()
    assert len(w.remote()) == 2  # nothing deleted
    assert daemon.stop() == 0
