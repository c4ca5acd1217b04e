"""The official vlmrun SDK, unchanged, against the reference server."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import httpx
import pytest
from vlmrun.client import VLMRun
from vlmrun.client.exceptions import AuthenticationError, ResourceNotFoundError

from syncd.server import RunningServer, ServerSettings, running_server


def _client(server: RunningServer, **kwargs: object) -> VLMRun:
    return VLMRun(api_key=server.api_key, base_url=server.base_url, max_retries=1, **kwargs)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_upload_dedupe_get_list_delete(server: RunningServer, tmp_path: Path) -> None:
    client = _client(server)
    first = _write(tmp_path / "a.pdf", b"first file")

    uploaded = client.files.upload(first, purpose="vision")
    assert uploaded.filename == "a.pdf"
    assert uploaded.bytes == len(b"first file")
    assert uploaded.purpose == "vision"
    again = client.files.upload(first, purpose="vision")
    assert again.id == uploaded.id
    assert server.stats.uploads == 1
    cached = client.files.get_cached_file(first)
    assert cached is not None
    assert cached.id == uploaded.id
    assert client.files.get(uploaded.id) == uploaded

    second = client.files.upload(_write(tmp_path / "b.txt", b"second"), purpose="assistants")
    third = client.files.upload(_write(tmp_path / "c.txt", b"third"), purpose="assistants")
    assert [f.id for f in client.files.list(skip=0, limit=2)] == [third.id, second.id]
    assert [f.id for f in client.files.list(skip=2, limit=2)] == [uploaded.id]

    deleted = client.files.delete(second.id)
    assert deleted.id == second.id
    with pytest.raises(ResourceNotFoundError):
        client.files.get(second.id)
    assert [f.id for f in client.files.list(limit=10)] == [third.id, uploaded.id]


def test_wrong_key_fails_construction(server: RunningServer) -> None:
    with pytest.raises(AuthenticationError):
        VLMRun(api_key="not-the-key", base_url=server.base_url, max_retries=1)


def test_presigned_upload(server: RunningServer, tmp_path: Path) -> None:
    client = _client(server)
    data = secrets.token_bytes(4096)
    uploaded = client.files.upload(
        _write(tmp_path / "doc.pdf", data), purpose="datasets", method="presigned-url"
    )
    assert uploaded.bytes == len(data)
    assert uploaded.purpose == "datasets"
    assert server.stats.presigned_puts == 1
    assert server.stats.uploads == 0
    assert client.files.get(uploaded.id).id == uploaded.id
    content = httpx.get(
        f"{server.base_url}/files/{uploaded.id}/content",
        headers={"Authorization": f"Bearer {server.api_key}"},
    )
    assert content.content == data


def test_large_file_goes_presigned_via_auto(server: RunningServer, tmp_path: Path) -> None:
    data = secrets.token_bytes(1 << 20) * 33  # 33 MiB: above the SDK's 32 MiB direct-upload threshold
    uploaded = _client(server).files.upload(_write(tmp_path / "big.bin", data), purpose="batch")
    assert uploaded.bytes == len(data)
    assert server.stats.presigned_puts == 1
    assert server.stats.uploads == 0
    blob = (server.data_dir / "blobs" / uploaded.id).read_bytes()
    assert hashlib.md5(blob).hexdigest() == hashlib.md5(data).hexdigest()


def test_data_survives_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "persistent"
    settings = ServerSettings(data_dir=data_dir, api_key="restart-key", port=0)
    source = _write(tmp_path / "keep.txt", b"kept across restarts")
    with running_server(settings) as first:
        uploaded = _client(first).files.upload(source, purpose="vision")
        older = _client(first).files.upload(_write(tmp_path / "older.txt", b"x"), purpose="vision")
    with running_server(settings) as second:
        client = _client(second)
        moved = {"public_url"}  # absolute, so it names the new port
        assert client.files.get(uploaded.id).model_dump(exclude=moved) == uploaded.model_dump(exclude=moved)
        assert client.files.upload(source, purpose="vision").id == uploaded.id
        newest = client.files.upload(_write(tmp_path / "new.txt", b"after restart"), purpose="vision")
        assert [f.id for f in client.files.list()] == [newest.id, older.id, uploaded.id]
        assert second.stats.uploads == 1
