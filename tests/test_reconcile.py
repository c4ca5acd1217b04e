"""The reconciler end to end: real tmp trees, a real SQLite manifest, the reference server on 127.0.0.1.

``Harness.run`` does what ``syncd reconcile --once`` does: take the lock, one sync pass, one reconcile
run, and one more sync pass when rows were re-queued (so a vanished remote file is re-uploaded at once).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from conftest import FakeClock, ServerFactory
from vlmrun.client import VLMRun

from syncd.api import FileResponse, FilesClient, TransportKind, make_transport
from syncd.config import Config, parse_config
from syncd.counters import Counters
from syncd.daemon import Run
from syncd.manifest import NOTE_ERROR, NOTE_HELD, Entry, Manifest, ManifestReader, State
from syncd.once import sync_pass
from syncd.reconcile import ReconcileReport, make_plan, observe_local, reconcile
from syncd.roots import RootTable, build_roots
from syncd.server import RunningServer
from syncd.state import StateLock

DAY = 86400.0


class FaultyTransport(httpx.AsyncBaseTransport):
    """Forwards to the real server; ``fault(request)`` may fail a request before it is sent ("before")
    or after the server handled it, losing the response ("after")."""

    def __init__(self, kind: TransportKind, fault: Callable[[httpx.Request], str | None]) -> None:
        self._inner = make_transport(kind, concurrency=8)
        self._fault = fault

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        when = self._fault(request)
        if when == "before":
            raise httpx.ConnectError("injected: connection refused", request=request)
        response = await self._inner.handle_async_request(request)
        if when == "after":
            await response.aread()
            raise httpx.ReadError("injected: connection reset before the answer", request=request)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class Harness:
    """One watched root and one state dir against a server, with a shared fake wall clock.

    One event loop and one API client for the harness's life (a client per call costs ~20 ms of TLS setup,
    which dominates the state machine's runtime); ``close()`` releases both.
    """

    def __init__(
        self,
        base: Path,
        server: RunningServer,
        clock: FakeClock,
        *,
        kind: TransportKind = "aiohttp",
        watch: dict[str, Any] | None = None,
        reconcile: dict[str, Any] | None = None,
    ) -> None:
        self.server = server
        self.clock = clock
        self.kind = kind
        self.root = base / "root"
        self.root.mkdir(parents=True)
        self.state = base / "state"
        raw: dict[str, Any] = {
            "remote": {"base_url": server.base_url},
            "state": {"dir": str(self.state)},
            "watch": [
                {
                    "path": str(self.root),
                    "delete_grace_seconds": 0,
                    "settle_seconds": 0,
                    "purpose": "assistants",
                    **(watch or {}),
                }
            ],
            "reconcile": reconcile or {},
        }
        self.config: Config = parse_config(raw, source="test", base=base)
        with StateLock(self.state) as lock:
            Manifest.open(lock, clock=self.now).close()
        self.loop = asyncio.new_event_loop()
        self.api = self.client()

    def close(self) -> None:
        self.loop.run_until_complete(self.api.aclose())
        self.loop.close()

    def now(self) -> float:
        return self.clock.now.timestamp()

    def client(self, transport: httpx.AsyncBaseTransport | None = None) -> FilesClient:
        return FilesClient(
            base_url=self.server.base_url,
            api_key=self.server.api_key,
            retries=0,
            transport=self.kind if transport is None else transport,
        )

    async def _pass(self, manifest: Manifest, client: FilesClient, *, confirm: bool = False) -> RootTable:
        roots = RootTable(build_roots(self.config), manifest, confirm=confirm)
        await sync_pass(Run(self.config, manifest, client, roots, Counters(), clock=self.now))
        return roots

    async def _run(self, client: FilesClient, *, dry_run: bool, confirm: bool) -> ReconcileReport:
        with StateLock(self.state) as lock:
            manifest = Manifest.open(lock, clock=self.now)
            try:
                if dry_run:
                    view = observe_local(build_roots(self.config), manifest, now=self.now())
                    return await make_plan(
                        self.state,
                        client,
                        settings=self.config.reconcile,
                        unavailable=view.unavailable,
                        now=self.now(),
                        confirm=confirm,
                        assume_deleted=view.gone,
                    )
                roots = await self._pass(manifest, client, confirm=confirm)
                report = await reconcile(
                    manifest,
                    client,
                    settings=self.config.reconcile,
                    unavailable=dict(roots.unavailable),
                    now=self.now(),
                    confirm=confirm,
                )
                if report.requeued:
                    await self._pass(manifest, client)
                return report
            finally:
                manifest.close()

    def run(
        self,
        *,
        dry_run: bool = False,
        confirm: bool = False,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> ReconcileReport:
        """What ``syncd reconcile --once`` does: a sync pass, a reconcile run, a pass for re-queued rows."""
        if transport is None:
            return self.loop.run_until_complete(self._run(self.api, dry_run=dry_run, confirm=confirm))

        async def faulty() -> ReconcileReport:
            async with self.client(transport) as client:
                return await self._run(client, dry_run=dry_run, confirm=confirm)

        return self.loop.run_until_complete(faulty())

    def sync(self) -> None:
        async def go() -> None:
            with StateLock(self.state) as lock:
                manifest = Manifest.open(lock, clock=self.now)
                try:
                    await self._pass(manifest, self.api)
                finally:
                    manifest.close()

        self.loop.run_until_complete(go())

    def remote(self) -> dict[str, FileResponse]:
        return {f.id: f for f in self.loop.run_until_complete(self.api.list_all())}

    def rows(self) -> dict[str, Entry]:
        with ManifestReader.open_readonly(self.state) as reader:
            return {e.relpath: e for e in reader.iter_all()}

    def ledger(self) -> set[str]:
        with ManifestReader.open_readonly(self.state) as reader:
            return reader.owned_remote_ids()

    def registered_roots(self) -> list[str]:
        with ManifestReader.open_readonly(self.state) as reader:
            return [r.path for r in reader.roots()]

    def notes(self) -> dict[str, str]:
        with ManifestReader.open_readonly(self.state) as reader:
            return reader.notes()

    def write(self, relpath: str, data: bytes) -> None:
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def sdk(server: RunningServer) -> VLMRun:
    return VLMRun(api_key=server.api_key, base_url=server.base_url, max_retries=1)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.fromisoformat("2026-03-01T00:00:00+00:00"))


@pytest.fixture
def srv(server_factory: ServerFactory, clock: FakeClock) -> RunningServer:
    return server_factory(clock=clock)


class HarnessFactory(Protocol):
    def __call__(self, tmp_path: Path, srv: RunningServer, clock: FakeClock, **kw: Any) -> Harness: ...


@pytest.fixture
def harness(transport_kind: TransportKind) -> Iterator[HarnessFactory]:
    made: list[Harness] = []

    def make(tmp_path: Path, srv: RunningServer, clock: FakeClock, **kw: Any) -> Harness:
        made.append(Harness(tmp_path / "h", srv, clock, kind=transport_kind, **kw))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_deleted_local_file_is_pruned_after_grace(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock, watch={"delete_grace_seconds": 60})
    h.write("a.pdf", b"alpha")
    h.write("b.pdf", b"beta")
    assert h.run().exit_code == 0
    rid = h.rows()["a.pdf"].remote_id
    assert rid in h.remote()
    assert rid in h.ledger()
    (h.root / "a.pdf").unlink()
    assert h.run().exit_code == 0
    assert rid in h.remote(), "pruned within delete_grace"
    clock.advance(61)
    report = h.run()
    assert report.exit_code == 0
    assert rid not in h.remote()
    assert "a.pdf" not in h.rows()
    assert rid not in h.ledger()
    assert h.rows()["b.pdf"].remote_id in h.remote()
    assert srv.stats.deletes == 1
    assert h.run().exit_code == 0
    assert srv.stats.deletes == 1


def test_files_of_other_clients_stay(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock)
    (tmp_path / "other.pdf").write_bytes(b"someone else's")
    theirs = sdk(srv).files.upload(tmp_path / "other.pdf", purpose="assistants", force=True)
    (tmp_path / "shared.pdf").write_bytes(b"same content")
    shared = sdk(srv).files.upload(tmp_path / "shared.pdf", purpose="assistants", force=True)
    h.write("mine.pdf", b"same content")
    h.write("stays.pdf", b"keeps the root from looking unmounted")
    h.run()
    assert h.rows()["mine.pdf"].remote_id == shared.id, "the other client's file is adopted"
    assert shared.id not in h.ledger()
    (h.root / "mine.pdf").unlink()
    assert h.run().exit_code == 0
    assert {theirs.id, shared.id} <= set(h.remote())
    assert set(h.rows()) == {"stays.pdf"}
    assert srv.stats.deletes == 0


def test_copy_at_a_second_path_keeps_the_file_until_both_are_gone(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock)
    h.write("a.pdf", b"twice")
    h.write("sub/b.pdf", b"twice")
    h.run()
    rows = h.rows()
    rid = rows["a.pdf"].remote_id
    assert rows["sub/b.pdf"].remote_id == rid
    assert srv.stats.uploads == 1
    (h.root / "a.pdf").unlink()
    assert h.run().exit_code == 0
    assert rid in h.remote()
    assert rid in h.ledger()
    (h.root / "sub/b.pdf").unlink()
    assert h.run().exit_code == 0
    assert rid not in h.remote()


def test_renamed_file_is_not_pruned_nor_uploaded_again(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock)
    h.write("scan.pdf", b"page one")
    h.write("keep.pdf", b"other")
    h.run()
    rid = h.rows()["scan.pdf"].remote_id
    assert rid is not None
    os.rename(h.root / "scan.pdf", h.root / "renamed.pdf")
    dry = h.run(dry_run=True)
    assert rid not in dry.render(), "the dry run sees the rename by inode"
    assert h.run().exit_code == 0
    assert h.rows()["renamed.pdf"].remote_id == rid
    assert "scan.pdf" not in h.rows()
    assert rid in h.remote()
    assert srv.stats.uploads == 2
    assert srv.stats.deletes == 0


def test_edit_prunes_the_old_version(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock)
    h.write("doc.pdf", b"v1")
    h.run()
    old = h.rows()["doc.pdf"].remote_id
    h.write("doc.pdf", b"version 2")
    assert h.run().exit_code == 0
    new = h.rows()["doc.pdf"].remote_id
    assert new != old
    assert set(h.remote()) == {new}
    assert h.ledger() == {new}


def test_file_past_retention_is_pruned_once_and_not_reuploaded(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(
        tmp_path,
        srv,
        clock,
        watch={"rules": [{"pattern": "*.jsonl", "purpose": "batch"}]},
        reconcile={"retention_days": {"batch": 1}},
    )
    h.write("job.jsonl", b'{"a": 1}\n')
    h.write("doc.pdf", b"kept forever")
    h.run()
    rid = h.rows()["job.jsonl"].remote_id
    clock.advance(0.5 * DAY)
    h.run()
    assert rid in h.remote()
    clock.advance(0.6 * DAY)
    assert h.run().exit_code == 0
    assert rid not in h.remote()
    row = h.rows()["job.jsonl"]
    assert row.state is State.EXPIRED
    assert h.rows()["doc.pdf"].state is State.SYNCED
    uploads, deletes = srv.stats.uploads, srv.stats.deletes
    clock.advance(3 * DAY)
    assert h.run().exit_code == 0
    assert (srv.stats.uploads, srv.stats.deletes) == (uploads, deletes)
    assert h.rows()["job.jsonl"].state is State.EXPIRED
    h.write("job.jsonl", b'{"a": 2}\n')
    h.run()
    assert h.rows()["job.jsonl"].state is State.SYNCED
    assert srv.stats.uploads == uploads + 1


def test_remote_file_deleted_behind_our_back_is_reuploaded(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock)
    h.write("a.pdf", b"precious")
    h.run()
    rid = h.rows()["a.pdf"].remote_id
    assert rid is not None
    sdk(srv).files.delete(rid)
    assert h.run().exit_code == 0
    row = h.rows()["a.pdf"]
    assert row.state is State.SYNCED
    assert row.remote_id != rid
    assert row.remote_id is not None
    assert h.remote()[row.remote_id].md5 == md5(b"precious")
    assert h.ledger() == {row.remote_id}


def _assert_nothing_pruned(h: Harness, report: ReconcileReport, ids: set[str]) -> None:
    assert report.exit_code == 1
    assert report.held
    assert ids <= set(h.remote())
    assert NOTE_HELD in h.notes()
    assert h.server.stats.deletes == 0


def test_root_renamed_away_prunes_nothing(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock)
    for i in range(3):
        h.write(f"f{i}.pdf", f"file {i}".encode())
    (h.root / "gone.pdf").write_bytes(b"deleted while mounted")
    h.run()
    (h.root / "gone.pdf").unlink()
    h.sync()  # the delete is recorded while the root is fine; the prune comes later
    ids = {e.remote_id for e in h.rows().values() if e.remote_id}
    os.rename(h.root, h.root.with_name("away"))
    report = h.run()
    _assert_nothing_pruned(h, report, ids)
    assert "root is missing" in h.notes()[NOTE_HELD]
    os.rename(h.root.with_name("away"), h.root)
    report = h.run()
    assert report.exit_code == 0
    assert NOTE_HELD not in h.notes()
    assert srv.stats.deletes == 1
    assert {e.state for e in h.rows().values()} == {State.SYNCED}


def test_emptied_root_prunes_nothing(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock)
    for i in range(3):
        h.write(f"f{i}.pdf", f"file {i}".encode())
    h.run()
    ids = {e.remote_id for e in h.rows().values() if e.remote_id}
    for i in range(3):
        (h.root / f"f{i}.pdf").unlink()
    h.write("ignored.tmp", b"scratch")  # ignored entries do not count
    _assert_nothing_pruned(h, h.run(), ids)
    assert {e.state for e in h.rows().values()} == {State.SYNCED}


def test_missing_marker_prunes_nothing(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock, watch={"marker": ".syncd-root", "ignore": [".syncd-root"]})
    (h.root / ".syncd-root").write_bytes(b"")
    for i in range(3):
        h.write(f"f{i}.pdf", f"file {i}".encode())
    h.run()
    ids = {e.remote_id for e in h.rows().values() if e.remote_id}
    assert len(ids) == 3
    (h.root / ".syncd-root").unlink()
    (h.root / "f0.pdf").unlink()
    _assert_nothing_pruned(h, h.run(), ids)
    (h.root / ".syncd-root").write_bytes(b"")
    assert h.run().exit_code == 0
    assert srv.stats.deletes == 1


def test_big_delete_is_held_until_confirmed(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock, reconcile={"max_delete": 2})
    for i in range(4):
        h.write(f"f{i}.pdf", f"file {i}".encode())
    h.run()
    for i in range(3):
        (h.root / f"f{i}.pdf").unlink()
    report = h.run()
    assert report.exit_code == 1
    assert srv.stats.deletes == 0
    assert "max-delete" in h.notes()[NOTE_HELD]
    assert "max-delete" in report.render()
    report = h.run(confirm=True)
    assert report.exit_code == 0
    assert srv.stats.deletes == 3
    assert NOTE_HELD not in h.notes()
    assert set(h.rows()) == {"f3.pdf"}


def test_upload_only_keeps_remote_copies(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock, reconcile={"prune_deleted": False})
    h.write("stays.pdf", b"keeps the root from looking unmounted")
    h.write("a.pdf", b"keep me")
    h.run()
    rid = h.rows()["a.pdf"].remote_id
    h.write("a.pdf", b"keep me too")
    h.run()
    new = h.rows()["a.pdf"].remote_id
    (h.root / "a.pdf").unlink()
    assert h.run().exit_code == 0
    assert {rid, new} <= set(h.remote())
    assert set(h.rows()) == {"stays.pdf"}
    assert h.ledger() == {h.rows()["stays.pdf"].remote_id}
    assert srv.stats.deletes == 0


def test_dry_run_changes_nothing(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock)
    h.write("a.pdf", b"to delete")
    h.write("b.pdf", b"to keep")
    h.run()
    rid = h.rows()["a.pdf"].remote_id
    assert rid is not None
    (h.root / "a.pdf").unlink()
    h.write("new.pdf", b"not uploaded by a dry run")
    manifest_file = h.state / "manifest.sqlite3"
    before = (h.rows(), h.ledger(), h.notes(), manifest_file.read_bytes(), srv.stats.uploads)
    report = h.run(dry_run=True)
    assert report.exit_code == 0
    assert report.dry_run
    text = report.render()
    assert f"delete remote {rid}: deleted locally" in text
    assert "a.pdf" in text
    assert (h.rows(), h.ledger(), h.notes(), manifest_file.read_bytes(), srv.stats.uploads) == before
    assert srv.stats.deletes == 0
    assert rid in h.remote()


def test_failed_listing_plans_nothing_and_a_rerun_finishes(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock)
    h.write("a.pdf", b"one")
    h.write("b.pdf", b"two")
    h.run()
    (h.root / "a.pdf").unlink()

    def fail_listing(request: httpx.Request) -> str | None:
        return "before" if request.method == "GET" and request.url.path.endswith("/files") else None

    report = h.run(transport=FaultyTransport(h.kind, fail_listing))
    assert report.exit_code == 1
    assert report.plan is None
    assert "listing" in h.notes()[NOTE_ERROR]
    assert srv.stats.deletes == 0
    assert h.rows()["a.pdf"].state is State.DELETED
    assert h.run().exit_code == 0
    assert srv.stats.deletes == 1
    assert NOTE_ERROR not in h.notes()
    assert set(h.rows()) == {"b.pdf"}


def test_failure_in_the_middle_of_deleting_leaves_the_manifest_consistent(
    tmp_path: Path, srv: RunningServer, clock: FakeClock, harness: HarnessFactory
) -> None:
    h = harness(tmp_path, srv, clock)
    for i in range(4):
        h.write(f"f{i}.pdf", f"file {i}".encode())
    h.run()
    ids = {e.remote_id for e in h.rows().values()}
    for i in range(3):
        (h.root / f"f{i}.pdf").unlink()
    deletes = 0

    def lose_second_delete(request: httpx.Request) -> str | None:
        nonlocal deletes
        if request.method != "DELETE":
            return None
        deletes += 1
        return "after" if deletes == 2 else None

    report = h.run(transport=FaultyTransport(h.kind, lose_second_delete))
    assert report.exit_code == 1
    assert report.error is not None
    assert srv.stats.deletes == 2  # the second one landed, its answer was lost
    rows = h.rows()
    assert len([e for e in rows.values() if e.state is State.DELETED]) == 2
    report = h.run()
    assert report.exit_code == 0
    assert srv.stats.deletes == 3, "the rerun deletes only the one left, nothing twice"
    assert set(h.rows()) == {"f3.pdf"}
    kept = h.rows()["f3.pdf"].remote_id
    assert set(h.remote()) == {kept}
    assert h.ledger() == {kept}
    assert ids - {kept} == ids - set(h.remote())
