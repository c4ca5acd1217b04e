"""Stages started in-process, one at a time, against the reference server on 127.0.0.1 and a real manifest.

Each test wires a stage the way `daemon.wire()` does (queues and callables), feeds it, and asserts what
the server holds and what the manifest says. The wall clock is the only fake: backoff is measured on it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from syncd import hashing, reconcile, upload
from syncd.api import FilesClient
from syncd.config import Config, parse_config
from syncd.counters import Counters
from syncd.daemon import Run
from syncd.logs import UnreadableLog
from syncd.manifest import CommitPolicy, FileKey, Manifest, State
from syncd.once import sync_pass
from syncd.plan import Candidate, UploadJob, is_due, statkey
from syncd.roots import RootTable, build_roots
from syncd.scan import FileStat, stat_path
from syncd.server import RunningServer
from syncd.supervise import Gate

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0


def config_for(tmp_path: Path, server: RunningServer, **reconcile_keys: Any) -> Config:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    raw = {
        "remote": {"base_url": server.base_url},
        "state": {"dir": str(tmp_path / "state")},
        "watch": [{"path": str(root), "settle_seconds": 0, "delete_grace_seconds": 0}],
        "reconcile": reconcile_keys,
    }
    return parse_config(raw, source="test", base=tmp_path)


class FaultyUploads(httpx.AsyncBaseTransport):
    """The real server, except that the first ``faults`` uploads are answered ``status`` with a
    ``Retry-After``; counts every upload request that left the client."""

    def __init__(self, status: int, retry_after: float, faults: int) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._status = status
        self._retry_after = retry_after
        self._faults = faults
        self.uploads = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/files"):
            self.uploads += 1
            if self._faults > 0:
                self._faults -= 1
                await request.aread()
                return httpx.Response(
                    self._status, headers={"Retry-After": f"{self._retry_after:g}"}, json={"detail": "busy"}
                )
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def queued_job(manifest: Manifest, root: Path, name: str, data: bytes) -> UploadJob:
    """A hashed file whose row is queued, as the hash stage leaves it."""
    path = root / name
    path.write_bytes(data)
    result = hashing.hash_file(str(path))
    assert isinstance(result, hashing.Digest)
    key = FileKey(1, name)
    stat = statkey(FileStat.from_os(os.stat(path)))
    manifest.mark_queued(key, xxh3=result.xxh3, md5=result.md5, purpose="assistants", stat=stat)
    manifest.commit()
    return UploadJob(key, path, result.md5, "assistants", stat)


class UploadStage:
    """The upload stage running on its own queue, with the wall clock in the test's hands."""

    def __init__(self, manifest: Manifest, client: FilesClient) -> None:
        self.now = NOW
        self.jobs = upload.JobQueue(16)
        self.counters = Counters()
        self.task = asyncio.create_task(
            upload.run(
                self.jobs,
                manifest=manifest,
                client=client,
                cache=upload.RemoteCache(client),
                commit=CommitPolicy(manifest),
                resettle=lambda key: None,
                due=lambda entry: is_due(entry, self.now),
                clock=lambda: self.now,
                counters=self.counters,
                workers=4,
                gate=None,
                synced=lambda done: None,
            )
        )

    async def handle(self, job: UploadJob) -> None:
        """Submit and wait (with a deadline) until the stage is done with it."""
        await self.jobs.submit(job)
        async with asyncio.timeout(30):
            while self.jobs.pending:  # noqa: ASYNC110 (polls an outcome, with a deadline)
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        await self.jobs.queue.put(None)
        await self.task


@pytest.mark.parametrize("status", [429, 503])
async def test_a_long_retry_after_schedules_the_row_and_nothing_is_sent_before_it(
    server: RunningServer, manifest: Manifest, tmp_path: Path, status: int
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    job = queued_job(manifest, root, "a.pdf", b"%PDF scanned page")
    transport = FaultyUploads(status, retry_after=300, faults=1)
    async with FilesClient(
        base_url=server.base_url, api_key=server.api_key, retries=3, transport=transport
    ) as client:
        stage = UploadStage(manifest, client)
        await stage.handle(job)
        row = manifest.get(job.key)
        assert row is not None
        assert row.state is State.UPLOADING
        assert row.next_attempt_at is not None
        assert row.next_attempt_at >= NOW + 300
        assert transport.uploads == 1

        stage.now = NOW + 299  # the retry sweep (or a rescan) submits it again too early
        await stage.handle(job)
        assert transport.uploads == 1, "a row was re-sent before its Retry-After"

        stage.now = NOW + 301
        await stage.handle(job)
        await stage.stop()
    row = manifest.get(job.key)
    assert row is not None
    assert row.state is State.SYNCED
    assert transport.uploads == 2
    assert [f.filename for f in server_files(server)] == ["a.pdf"]


@pytest.mark.parametrize("status", [429, 503])
async def test_a_short_retry_after_is_waited_in_the_call(
    server: RunningServer, manifest: Manifest, tmp_path: Path, status: int
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    job = queued_job(manifest, root, "b.pdf", b"%PDF another page")
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    transport = FaultyUploads(status, retry_after=7, faults=1)
    async with FilesClient(
        base_url=server.base_url, api_key=server.api_key, retries=3, transport=transport, sleep=sleep
    ) as client:
        stage = UploadStage(manifest, client)
        await stage.handle(job)
        await stage.stop()
    row = manifest.get(job.key)
    assert row is not None
    assert row.state is State.SYNCED
    assert max(waits, default=0) >= 7, f"Retry-After not honoured: waited {waits}"
    assert transport.uploads == 2


async def test_the_hash_stage_resettles_a_file_that_changed_since_it_was_seen(
    server: RunningServer, manifest: Manifest, tmp_path: Path
) -> None:
    config = config_for(tmp_path, server)
    [root] = build_roots(config)
    table = RootTable([root], manifest)
    path = root.path / "growing.tif"
    path.write_bytes(b"page 1")
    seen = stat_path(str(path))
    assert isinstance(seen, FileStat)
    root_id = await table.refresh(root)
    assert root_id is not None
    with path.open("ab") as f:  # the scanner writes the next page after the stat, before the hash
        f.write(b" page 2")
    cand = Candidate(root, root_id, "growing.tif", seen)
    submitted, resettled = await hash_through_stage(manifest, cand)
    assert resettled == [cand]
    assert submitted == []
    assert manifest.get(cand.key) is None  # never queued with the digest of a half-written file

    # Settled again with its final stat, it is hashed and handed on with the final content's md5.
    final = stat_path(str(path))
    assert isinstance(final, FileStat)
    submitted, resettled = await hash_through_stage(manifest, Candidate(root, root_id, "growing.tif", final))
    assert resettled == []
    [job] = submitted
    assert job.stat == statkey(final)
    entry = manifest.get(cand.key)
    assert entry is not None
    assert entry.state is State.QUEUED
    assert entry.md5 == job.md5


async def hash_through_stage(manifest: Manifest, cand: Candidate) -> tuple[list[UploadJob], list[Candidate]]:
    """Run the hash stage on one candidate until it drains: what it submitted and what it resettled."""
    hash_q: asyncio.Queue[Candidate | None] = asyncio.Queue()
    submitted: list[UploadJob] = []
    resettled: list[Candidate] = []

    async def submit(job: UploadJob) -> None:
        submitted.append(job)

    with hashing.Hasher(workers=1) as hasher:
        await hash_q.put(cand)
        await hash_q.put(None)
        await hashing.run(
            hash_q,
            hasher=hasher,
            manifest=manifest,
            commit=CommitPolicy(manifest),
            submit=submit,
            resettle=resettled.append,
            unreadable=UnreadableLog(),
            counters=Counters(),
            gate=None,
        )
    return submitted, resettled


async def test_the_reconcile_stage_holds_a_missing_root(
    server: RunningServer, manifest: Manifest, tmp_path: Path
) -> None:
    config = config_for(tmp_path, server, interval_seconds=0.01)
    [root] = build_roots(config)
    (root.path / "keep.pdf").write_bytes(b"%PDF on a share that gets unmounted")
    async with FilesClient(base_url=server.base_url, api_key=server.api_key, retries=0) as client:
        table = RootTable([root], manifest)
        assert await sync_pass(Run(config, manifest, client, table, Counters())) == 0
        [synced] = server_files(server)
        shutil.move(root.path, tmp_path / "unmounted")  # the share is gone: not "every file deleted"

        stop = asyncio.Event()
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ready.set_result(None)
        counters = Counters()

        async def stop_after_one_run() -> None:
            while counters.last_reconcile_at is None:  # noqa: ASYNC110 (polls an outcome, with a deadline)
                await asyncio.sleep(0.01)
            stop.set()

        stopper = asyncio.create_task(stop_after_one_run())
        await asyncio.wait_for(
            reconcile.run(
                stop,
                ready=ready,
                roots=table,
                manifest=manifest,
                client=client,
                settings=config.reconcile,
                forget=lambda: None,
                clock=lambda: NOW,
                counters=counters,
                gate=Gate(),
            ),
            timeout=30,
        )
        await stopper
    assert counters.last_reconcile_at == NOW
    assert counters.crashed == 0
    assert [f.id for f in server_files(server)] == [synced.id]  # nothing pruned
    [entry] = list(manifest.iter_all())
    assert entry.state is State.SYNCED
    assert "missing" in manifest.notes()[f"root:{root.path}"]


def server_files(server: RunningServer) -> list[Any]:
    from syncd.api.models import FileResponse

    response = httpx.get(
        f"{server.base_url}/files",
        params={"limit": 1000},
        headers={"Authorization": f"Bearer {server.api_key}"},
        timeout=10,
    )
    response.raise_for_status()
    return [FileResponse.model_validate(item) for item in response.json()]
