"""`sync_job` against the reference server on 127.0.0.1, with a real manifest file and the real client.

Each test hashes a real file, queues its row as the hash stage does, runs one job and then looks at
what the server holds (its request counters and listing) and what the manifest says.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from syncd.api import FilesClient, TransportKind, make_transport
from syncd.hashing import Digest, hash_file
from syncd.manifest import FileKey, Manifest, State
from syncd.plan import RETRY_BASE_SECONDS, UploadJob, statkey
from syncd.scan import FileStat
from syncd.server import RunningServer
from syncd.upload import Outcome, sync_job

pytestmark = pytest.mark.anyio

ServerFactory = Callable[..., RunningServer]
NOW = 1_800_000_000.0
"""The job's wall clock (retry times are asserted against it). The manifest keeps the real clock: its
``updated_at`` of an ``uploading`` row is the intent time, compared with the server's ``created_at``."""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


async def no_sleep(seconds: float) -> None:
    """The client's backoff waits, spent instantly: retry tests must not cost wall time."""


def client_for(
    server: RunningServer, transport: TransportKind | httpx.AsyncBaseTransport, *, retries: int = 2
) -> FilesClient:
    return FilesClient(
        base_url=server.base_url, api_key=server.api_key, retries=retries, sleep=no_sleep, transport=transport
    )


def queue_file(
    manifest: Manifest, root: Path, relpath: str, data: bytes, purpose: str = "assistants"
) -> UploadJob:
    """Write and hash a file, queue its row (as the hash stage does) and return its upload job."""
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    digest = hash_file(str(path))
    assert isinstance(digest, Digest)
    stat = statkey(FileStat.from_os(os.stat(path)))
    key = FileKey(1, relpath)
    manifest.mark_queued(key, xxh3=digest.xxh3, md5=digest.md5, purpose=purpose, stat=stat)
    manifest.commit()
    return UploadJob(key, path, digest.md5, purpose, stat)


def remote_files(server: RunningServer) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.base_url}/files", params={"limit": 1000}, headers=auth(server), timeout=10)
    response.raise_for_status()
    files: list[dict[str, Any]] = response.json()
    return files


def remote_content(server: RunningServer, file_id: str) -> bytes:
    response = httpx.get(f"{server.base_url}/files/{file_id}/content", headers=auth(server), timeout=10)
    response.raise_for_status()
    return response.content


def auth(server: RunningServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.api_key}"}


def other_client_uploads(server: RunningServer, name: str, data: bytes, purpose: str) -> str:
    """Another program on the same account uploads a file (a plain multipart POST, as the SDK sends)."""
    response = httpx.post(
        f"{server.base_url}/files",
        params={"purpose": purpose},
        files={"file": (name, data)},
        headers=auth(server),
        timeout=10,
    )
    assert response.status_code == 201
    file_id: str = response.json()["id"]
    return file_id


async def run(job: UploadJob, manifest: Manifest, client: FilesClient, **kw: Any) -> Outcome:
    return await sync_job(job, manifest=manifest, client=client, clock=lambda: NOW, **kw)


def row(manifest: Manifest, job: UploadJob) -> Any:
    entry = manifest.get(job.key)
    assert entry is not None
    return entry


# cache miss, local reuse, adoption


async def test_a_cache_miss_is_uploaded_and_owned(
    server: RunningServer, manifest: Manifest, root: Path, transport_kind: TransportKind
) -> None:
    data = b"%PDF-1.7 first scan"
    job = queue_file(manifest, root, "scans/a.pdf", data)
    async with client_for(server, transport_kind) as client:
        assert await run(job, manifest, client) is Outcome.UPLOADED
    entry = row(manifest, job)
    assert entry.state is State.SYNCED
    assert entry.owned
    assert entry.remote_id is not None
    assert manifest.is_owned(entry.remote_id)
    assert entry.attempts == 0
    assert entry.last_error is None
    assert server.stats.uploads == 1
    [remote] = remote_files(server)
    assert remote["id"] == entry.remote_id
    assert remote["filename"] == "a.pdf"
    assert remote["purpose"] == "assistants"
    assert remote["bytes"] == len(data)
    assert remote_content(server, entry.remote_id) == data


async def test_a_copy_reuses_the_manifests_remote_file_without_any_request(
    server: RunningServer, manifest: Manifest, root: Path, transport_kind: TransportKind
) -> None:
    data = b"the same bytes at two paths"
    first = queue_file(manifest, root, "a.pdf", data)
    async with client_for(server, transport_kind) as client:
        assert await run(first, manifest, client) is Outcome.UPLOADED
        before = server.stats.snapshot()
        copy = queue_file(manifest, root, "copy of a.pdf", data)
        assert await run(copy, manifest, client) is Outcome.REUSED
    assert server.stats.snapshot() == before  # no upload, not even a hash lookup
    original, reused = row(manifest, first), row(manifest, copy)
    assert reused.state is State.SYNCED
    assert reused.remote_id == original.remote_id
    assert reused.owned
    assert manifest.live_refs(original.remote_id) == 2
    assert len(remote_files(server)) == 1


async def test_another_clients_identical_file_is_adopted_not_owned(
    server: RunningServer, manifest: Manifest, root: Path, transport_kind: TransportKind
) -> None:
    data = b"a report someone else uploaded first"
    theirs = other_client_uploads(server, "report.pdf", data, "assistants")
    job = queue_file(manifest, root, "report.pdf", data)
    async with client_for(server, transport_kind) as client:
        assert await run(job, manifest, client) is Outcome.REUSED
    entry = row(manifest, job)
    assert entry.state is State.SYNCED
    assert entry.remote_id == theirs
    assert not entry.owned
    assert not manifest.is_owned(theirs)
    assert server.stats.uploads == 1  # theirs only
    assert [f["id"] for f in remote_files(server)] == [theirs]


@pytest.mark.parametrize("public_only", [False, True], ids=["purpose-filtered lookup", "public API shape"])
async def test_a_remote_hit_with_another_purpose_is_not_reused(
    server_factory: ServerFactory,
    manifest: Manifest,
    root: Path,
    public_only: bool,
    transport_kind: TransportKind,
) -> None:
    """The public lookup ignores purpose (and reports no md5): syncd checks the hit's purpose itself."""
    server = server_factory(public_only=public_only)
    data = b"same bytes, other purpose"
    theirs = other_client_uploads(server, "img.png", data, "vision")
    job = queue_file(manifest, root, "img.png", data, purpose="assistants")
    async with client_for(server, transport_kind) as client:
        assert await run(job, manifest, client) is Outcome.UPLOADED
    entry = row(manifest, job)
    assert entry.state is State.SYNCED
    assert entry.owned
    assert entry.remote_id != theirs
    assert server.stats.uploads == 2
    by_id = {f["id"]: f["purpose"] for f in remote_files(server)}
    assert by_id == {theirs: "vision", entry.remote_id: "assistants"}


# errors


async def test_a_file_too_large_for_the_server_fails_with_the_reason_and_is_not_retried(
    server_factory: ServerFactory, manifest: Manifest, root: Path, transport_kind: TransportKind
) -> None:
    server = server_factory(max_bytes=64)
    job = queue_file(manifest, root, "big.pdf", b"x" * 1000)
    async with client_for(server, transport_kind, retries=3) as client:
        assert await run(job, manifest, client) is Outcome.FAILED
    entry = row(manifest, job)
    assert entry.state is State.FAILED
    assert entry.last_error is not None
    assert "413" in entry.last_error
    assert entry.next_attempt_at is None
    assert entry.remote_id is None
    assert server.stats.uploads == 1  # one attempt: a 413 is never retried
    assert remote_files(server) == []


async def test_a_5xx_storm_queues_the_row_for_a_later_attempt(
    server_factory: ServerFactory, manifest: Manifest, root: Path, transport_kind: TransportKind
) -> None:
    server = server_factory(fault_rate=1.0, fault_kinds=("500",))
    job = queue_file(manifest, root, "a.pdf", b"never gets through")
    async with client_for(server, transport_kind, retries=2) as client:
        assert await run(job, manifest, client) is Outcome.RETRY
    entry = row(manifest, job)
    assert entry.state is State.QUEUED
    assert entry.attempts == 1
    assert entry.next_attempt_at == NOW + RETRY_BASE_SECONDS
    assert entry.last_error is not None
    assert "500" in entry.last_error
    assert server.stats.faults == 3  # the first try and two retries, then the job gave up for now
    assert server.stats.uploads == 0


# a file that changes between hashing and upload


@pytest.mark.parametrize(
    "change",
    [b"same length, other bytes!", b"grown: " + b"y" * 100, b"short"],
    ids=["same size", "grown", "shrunk"],
)
async def test_a_file_changed_after_hashing_leaves_nothing_on_the_server(
    server: RunningServer, manifest: Manifest, root: Path, change: bytes, transport_kind: TransportKind
) -> None:
    hashed = b"same length, the bytes!!!"
    job = queue_file(manifest, root, "draft.pdf", hashed)
    job.path.write_bytes(change)
    async with client_for(server, transport_kind) as client:
        assert await run(job, manifest, client) is Outcome.CHANGED
    entry = row(manifest, job)
    assert entry.state is State.QUEUED
    assert entry.remote_id is None
    assert remote_files(server) == []
    assert manifest.owned_remote_ids() == set()


# crash recovery


async def test_a_row_left_uploading_whose_upload_landed_is_resolved_without_a_second_upload(
    server: RunningServer, manifest: Manifest, root: Path, transport_kind: TransportKind
) -> None:
    data = b"uploaded just before the crash"
    job = queue_file(manifest, root, "a.pdf", data)
    assert manifest.mark_uploading(job.key, md5=job.md5)  # the intent, committed before sending
    async with client_for(server, transport_kind) as landed:  # the request that went out before the crash
        ours = await landed.upload(job.path, purpose=job.purpose)
    left = row(manifest, job)
    assert left.state is State.UPLOADING

    recovery = UploadJob(job.key, job.path, job.md5, job.purpose, job.stat, intent_at=left.updated_at)
    async with client_for(server, transport_kind) as client:
        assert await run(recovery, manifest, client) is Outcome.REUSED
    entry = row(manifest, job)
    assert entry.state is State.SYNCED
    assert entry.remote_id == ours.id
    assert entry.owned
    assert manifest.is_owned(ours.id)
    assert server.stats.uploads == 1


async def test_a_row_left_uploading_whose_request_never_went_out_is_uploaded(
    server: RunningServer, manifest: Manifest, root: Path, transport_kind: TransportKind
) -> None:
    job = queue_file(manifest, root, "a.pdf", b"crashed before sending")
    assert manifest.mark_uploading(job.key, md5=job.md5)
    recovery = UploadJob(
        job.key, job.path, job.md5, job.purpose, job.stat, intent_at=row(manifest, job).updated_at
    )
    async with client_for(server, transport_kind) as client:
        assert await run(recovery, manifest, client) is Outcome.UPLOADED
    assert server.stats.uploads == 1
    assert row(manifest, job).owned


async def test_another_clients_upload_after_a_crash_before_sending_is_not_claimed(
    server: RunningServer, manifest: Manifest, root: Path, transport_kind: TransportKind
) -> None:
    data = b"crashed before sending; a colleague uploads the same bytes later"
    job = queue_file(manifest, root, "mine.pdf", data)
    assert manifest.mark_uploading(job.key, md5=job.md5)
    theirs = other_client_uploads(server, "their copy.pdf", data, "assistants")
    recovery = UploadJob(
        job.key, job.path, job.md5, job.purpose, job.stat, intent_at=row(manifest, job).updated_at
    )
    async with client_for(server, transport_kind) as client:
        await run(recovery, manifest, client)
    assert not manifest.is_owned(theirs)


# a row that moves on while its job awaits the network


class RemovingTransport(httpx.AsyncBaseTransport):
    """The real transport; as the hash lookup leaves, the event loop changes the row (a race, made exact)."""

    def __init__(self, kind: TransportKind, on_lookup: Callable[[], None]) -> None:
        self._inner = make_transport(kind, concurrency=8)
        self._on_lookup = on_lookup

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if "/files/hash/" in request.url.path:
            self._on_lookup()
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.parametrize("gone", ["removed", "deleted"])
async def test_a_path_gone_while_its_lookup_is_in_flight_makes_the_job_stale_not_an_exception(
    server: RunningServer, manifest: Manifest, root: Path, gone: str, transport_kind: TransportKind
) -> None:
    """A worker that raised here would die and stall the pipeline; the job is simply dropped."""
    job = queue_file(manifest, root, "short-lived.pdf", b"deleted right after it settled")

    def path_goes_away() -> None:
        if gone == "removed":
            manifest.remove(job.key)
        else:
            manifest.mark_deleted(job.key)

    async with client_for(server, RemovingTransport(transport_kind, path_goes_away)) as client:
        assert await run(job, manifest, client) is Outcome.STALE
    entry = manifest.get(job.key)
    assert entry is None if gone == "removed" else entry is not None and entry.state is State.DELETED
    assert server.stats.uploads == 0


async def test_a_same_size_edit_after_hashing_is_caught_against_the_public_api_shape(
    server_factory: ServerFactory, manifest: Manifest, root: Path, transport_kind: TransportKind
) -> None:
    server = server_factory(public_only=True)
    job = queue_file(manifest, root, "draft.pdf", b"same length, the bytes!!!")
    job.path.write_bytes(b"same length, other bytes!")
    async with client_for(server, transport_kind) as client:
        assert await run(job, manifest, client) is Outcome.CHANGED
    assert remote_files(server) == []


class LostResponseTransport(httpx.AsyncBaseTransport):
    """The real transport, except that the answer to an upload is lost after the server stored it (and,
    with ``lookups_fail``, every hash lookup after that fails)."""

    def __init__(self, kind: TransportKind, *, lookups_fail: bool = False) -> None:
        self._inner = make_transport(kind, concurrency=8)
        self._lookups_fail = lookups_fail
        self._lost = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._lost and self._lookups_fail and "/files/hash/" in request.url.path:
            raise httpx.ConnectError("no route to host", request=request)
        response = await self._inner.handle_async_request(request)
        if request.method == "POST" and request.url.path.endswith("/files"):
            await response.aread()
            self._lost = True
            raise httpx.ReadTimeout("the answer never came", request=request)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_an_upload_whose_answer_was_lost_is_resolved_by_md5_not_sent_again(
    server: RunningServer, manifest: Manifest, root: Path, transport_kind: TransportKind
) -> None:
    job = queue_file(manifest, root, "scan.pdf", b"landed, but the response was lost")
    async with client_for(server, LostResponseTransport(transport_kind), retries=3) as client:
        assert await run(job, manifest, client, intent_window=600.0) is Outcome.REUSED
    assert server.stats.uploads == 1  # resolved by the md5 lookup, not a second upload
    [remote] = remote_files(server)
    assert (row(manifest, job).state, row(manifest, job).remote_id) == (State.SYNCED, remote["id"])
    assert row(manifest, job).owned


@pytest.mark.parametrize("name", ['quote"d.pdf', "caf\udce9.pdf", "tab\there.pdf"])
async def test_a_lost_upload_under_an_odd_name_is_recognised_as_ours(
    server: RunningServer, manifest: Manifest, root: Path, name: str, transport_kind: TransportKind
) -> None:
    """The name the server keeps (a quote as %22, a Latin-1 byte as U+FFFD, a tab as U+FFFD) is the one
    the lookup after a lost answer compares: our upload is owned, not adopted and never pruned."""
    job = queue_file(manifest, root, name, b"landed under an odd name")
    async with client_for(server, LostResponseTransport(transport_kind), retries=3) as client:
        assert await run(job, manifest, client, intent_window=600.0) is Outcome.REUSED
    assert server.stats.uploads == 1
    assert row(manifest, job).owned


class FailingUploadsTransport(httpx.AsyncBaseTransport):
    """The real transport, except that the first ``failures`` uploads are answered 500 without reaching the
    server: to the client, each may or may not have been stored."""

    def __init__(self, kind: TransportKind, failures: int) -> None:
        self._inner = make_transport(kind, concurrency=8)
        self.failures = failures

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.failures and request.method == "POST" and request.url.path.endswith("/files"):
            self.failures -= 1
            await request.aread()
            return httpx.Response(500, json={"detail": "the proxy lost the backend"}, request=request)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.parametrize(("failures", "outcome"), [(3, Outcome.UPLOADED), (4, Outcome.RETRY)])
async def test_an_upload_that_may_not_have_landed_is_looked_up_then_sent_as_often_as_a_call_is_retried(
    server: RunningServer,
    manifest: Manifest,
    root: Path,
    transport_kind: TransportKind,
    failures: int,
    outcome: Outcome,
) -> None:
    """With ``retries = 3`` a call is sent 4 times at most; so is an upload whose answers were lost, each
    time after a lookup that found nothing. Beyond that the row keeps its intent for its own backoff."""
    job = queue_file(manifest, root, "scan.pdf", b"sent again only once it is known not to be stored")
    transport = FailingUploadsTransport(transport_kind, failures)
    async with client_for(server, transport, retries=3) as client:
        assert await run(job, manifest, client, intent_window=600.0) is outcome
    assert transport.failures == max(0, failures - 4)
    assert server.stats.hash_lookups == min(failures, 3) + 1  # before the first send, and after each loss
    if outcome is Outcome.UPLOADED:
        [remote] = remote_files(server)
        assert (row(manifest, job).state, row(manifest, job).remote_id) == (State.SYNCED, remote["id"])
    else:
        assert remote_files(server) == []
        assert row(manifest, job).state is State.UPLOADING


async def test_an_upload_whose_answer_was_lost_keeps_its_intent_and_is_owned_on_retry(
    server: RunningServer, manifest: Manifest, root: Path, transport_kind: TransportKind
) -> None:
    job = queue_file(manifest, root, "scan.pdf", b"landed, but the response was lost")
    async with client_for(
        server, LostResponseTransport(transport_kind, lookups_fail=True), retries=0
    ) as client:
        assert await run(job, manifest, client) is Outcome.RETRY
    entry = row(manifest, job)
    assert entry.state is State.UPLOADING  # the intent survives: the bytes may be on the server
    assert server.stats.uploads == 1
    retry = UploadJob(job.key, job.path, job.md5, job.purpose, job.stat, intent_at=entry.updated_at)
    async with client_for(server, transport_kind) as client:
        assert await run(retry, manifest, client, intent_window=600.0) is Outcome.REUSED
    assert server.stats.uploads == 1  # resolved by the md5 lookup, not a second upload
    assert row(manifest, job).state is State.SYNCED
    assert row(manifest, job).owned
