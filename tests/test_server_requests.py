"""The reference server's HTTP contract (design §5), exercised with raw httpx requests."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FakeClock, ServerFactory, free_port, wait_for
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st
from inprocess import built_app, fastapi_of
from starlette.types import ASGIApp, Receive, Scope, Send

from syncd.server import RunningServer, ServerSettings
from syncd.server.store import INLINE, PIECE
from syncd.server.wire import safe_filename

BOUNDARY = "syncd-test-boundary"


def _client(server: RunningServer, *, key: str | None = None, timeout: float = 10.0) -> httpx.Client:
    token = server.api_key if key is None else key
    return httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
    )


def _multipart(filename: bytes, data: bytes, *, field: bytes = b"file", ctype: bytes | None = None) -> bytes:
    """A multipart body built by hand, so filenames can hold bytes no polite client would send."""
    head = b'Content-Disposition: form-data; name="' + field + b'"; filename="' + filename + b'"\r\n'
    if ctype is not None:
        head += b"Content-Type: " + ctype + b"\r\n"
    return (
        b"--"
        + BOUNDARY.encode()
        + b"\r\n"
        + head
        + b"\r\n"
        + data
        + b"\r\n--"
        + BOUNDARY.encode()
        + b"--\r\n"
    )


def _post_raw(
    client: httpx.Client, body: bytes | Iterator[bytes], purpose: str = "assistants"
) -> httpx.Response:
    return client.post(
        "/files",
        params={"purpose": purpose},
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )


def _upload(client: httpx.Client, name: str, data: bytes, purpose: str = "assistants") -> dict[str, object]:
    response = client.post("/files", params={"purpose": purpose}, files={"file": (name, data)})
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def _detail(response: httpx.Response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail
    return detail


def _tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in filenames:
            st_ = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st_.st_size, st_.st_mtime_ns)
    return out


# --- auth and validation


def test_health_and_auth(server: RunningServer) -> None:
    assert _client(server).get("/health").status_code == 200
    for client in (_client(server, key="wrong"), httpx.Client(base_url=server.base_url)):
        for method, path in (("GET", "/health"), ("GET", "/files"), ("POST", "/files/presigned-url")):
            response = client.request(method, path)
            assert response.status_code == 401
            _detail(response)
    assert server.stats.unauthorized == 6
    assert server.stats.health == 1


def test_upload_validation(server: RunningServer) -> None:
    client = _client(server)
    missing = client.post("/files", params={"purpose": "vision"}, files={"other": ("a.txt", b"x")})
    assert missing.status_code == 422
    assert "file" in _detail(missing)
    bad_purpose = client.post("/files", params={"purpose": "nonsense"}, files={"file": ("a.txt", b"x")})
    assert bad_purpose.status_code == 422
    assert "purpose" in _detail(bad_purpose)
    not_multipart = client.post("/files", params={"purpose": "vision"}, content=b"raw")
    assert not_multipart.status_code == 400
    _detail(not_multipart)
    truncated = _post_raw(client, _multipart(b"a.txt", b"data")[:-10])
    assert truncated.status_code == 400
    _detail(truncated)
    assert client.get("/files").json() == []


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 5000}, {"skip": -1}, {"limit": "many"}, {"purpose": "nope"}]
)
def test_list_validation(server: RunningServer, params: dict[str, str | int]) -> None:
    response = _client(server).get("/files", params=params)
    assert response.status_code == 422
    _detail(response)


def test_unknown_ids_are_404(server: RunningServer) -> None:
    client = _client(server)
    for method, path in (
        ("GET", "/files/file-missing"),
        ("DELETE", "/files/file-missing"),
        ("GET", "/files/file-missing/content"),
        ("GET", "/files/verify-upload/file-missing"),
        ("GET", "/files/hash/" + "0" * 32),
        ("GET", "/files/..%2f..%2fetc%2fpasswd"),
    ):
        response = client.request(method, path)
        assert response.status_code == 404, (method, path)
        _detail(response)


# --- storage safety


@given(st.text())
def test_safe_filename_is_a_plain_name(raw: str) -> None:
    name = safe_filename(raw)
    assert name not in ("", ".", "..")
    assert "/" not in name
    assert "\\" not in name
    assert "\x00" not in name
    assert len(name) <= 255


def test_path_like_filenames_stay_metadata(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = server_factory(data_dir=tmp_path / "data")
    outside = tmp_path.parent
    before = _tree(outside, skip=tmp_path / "data")
    client = _client(server)
    escape = tmp_path / "escaped.txt"
    names = [
        b"../../etc/passwd",
        b"..",
        str(escape).encode(),
        b"..\\..\\windows\\system32\\x.dll",
        b"nul\x00byte.txt",
        b"line\r\nbreak.txt",
        "r\u00e9sum\u00e9 \u2215 \U0001f4c4.pdf".encode(),
        b"\xff\xfe invalid utf8",
        b"",
    ]
    stored = []
    for raw in names:
        response = _post_raw(client, _multipart(raw, b"payload " + raw))
        assert response.status_code in (201, 400, 422), response.text
        if response.status_code == 201:
            stored.append(response.json())
        else:
            _detail(response)
    assert len(stored) >= len(names) - 2
    for item in stored:
        assert "/" not in item["filename"]
        assert "\\" not in item["filename"]
        assert "\x00" not in item["filename"]
        assert item["filename"] not in ("", ".", "..")
    assert {item["filename"] for item in stored} >= {"passwd", "escaped.txt", "x.dll"}
    assert not escape.exists()
    assert _tree(outside, skip=tmp_path / "data") == before
    blobs = sorted(p.name for p in (tmp_path / "data" / "blobs").iterdir())
    assert blobs == sorted(item["id"] for item in stored)
    for item in stored:
        content = client.get(f"/files/{item['id']}/content")
        assert content.status_code == 200
        assert content.content.startswith(b"payload ")


# --- size and type limits


def test_too_large_is_413_after_draining(server_factory: ServerFactory) -> None:
    server = server_factory(max_bytes=1000)
    client = _client(server)
    assert _upload(client, "exact.bin", b"x" * 1000)["bytes"] == 1000

    def streamed() -> Iterator[bytes]:
        body = _multipart(b"big.bin", os.urandom(200_000))
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    response = _post_raw(client, streamed())
    assert response.status_code == 413
    _detail(response)
    oversized = _post_raw(client, _multipart(b"huge.bin", b"y" * (3 << 20)))
    assert oversized.status_code == 413
    assert len(client.get("/files").json()) == 1
    assert list((server.data_dir / "tmp").iterdir()) == []

    presigned = client.post("/files/presigned-url", json={"filename": "p.bin", "purpose": "batch"}).json()
    put = httpx.put(presigned["url"], content=b"z" * 5000)
    assert put.status_code == 413
    assert _client(server).get(f"/files/verify-upload/{presigned['id']}").status_code == 404


def test_rejected_types_are_415(server_factory: ServerFactory) -> None:
    server = server_factory(reject_types=(".exe", "application/pdf", "video/*"))
    client = _client(server)
    for name, ctype in (("tool.EXE", None), ("doc.pdf", None), ("clip.bin", b"video/mp4")):
        response = _post_raw(client, _multipart(name.encode(), b"data", ctype=ctype))
        assert response.status_code == 415, name
        _detail(response)
    _upload(client, "notes.txt", b"fine")
    presign = client.post("/files/presigned-url", json={"filename": "setup.exe"})
    assert presign.status_code == 415
    ok = client.post("/files/presigned-url", json={"filename": "clip.bin"}).json()
    assert httpx.put(ok["url"], content=b"v", headers={"Content-Type": "video/webm"}).status_code == 415
    assert len(client.get("/files").json()) == 1


# --- bodies bigger than a piece: hashed and written in a worker thread, piece by piece


def _presigned_url(client: httpx.Client, filename: str) -> str:
    url: str = client.post("/files/presigned-url", json={"filename": filename}).json()["url"]
    return url


@pytest.mark.parametrize("size", [2 * PIECE + 1, 3 * PIECE + INLINE + 5], ids=["small-tail", "big-tail"])
def test_bodies_of_several_pieces_are_stored_exactly(server: RunningServer, size: int) -> None:
    client = _client(server, timeout=60)
    data = os.urandom(size)
    direct = _upload(client, "direct.bin", data)
    put = httpx.put(_presigned_url(client, "put.bin"), content=data, timeout=60)
    assert put.status_code == 200
    for item in (direct, put.json()):
        assert item["bytes"] == size
        assert item["md5"] == hashlib.md5(data).hexdigest()
        assert client.get(f"/files/{item['id']}/content").content == data
    assert list((server.data_dir / "tmp").iterdir()) == []


def test_too_large_after_pieces_were_stored_leaves_nothing(server_factory: ServerFactory) -> None:
    server = server_factory(max_bytes=2 * PIECE + 10)
    client = _client(server, timeout=60)
    data = os.urandom(3 * PIECE)
    assert _post_raw(client, _multipart(b"big.bin", data)).status_code == 413
    assert httpx.put(_presigned_url(client, "big.bin"), content=data, timeout=60).status_code == 413
    assert client.get("/files").json() == []
    assert list((server.data_dir / "tmp").iterdir()) == []


def test_a_put_cut_off_after_some_pieces_leaves_nothing_and_can_be_sent_again(server: RunningServer) -> None:
    client = _client(server, timeout=60)
    url = _presigned_url(client, "scan.pdf")
    data = os.urandom(3 * PIECE)

    def gives_up() -> Iterator[bytes]:
        yield data[: 2 * PIECE + 1]
        raise ConnectionAbortedError("the client went away")

    with pytest.raises(ConnectionAbortedError):
        httpx.put(url, content=gives_up(), headers={"Content-Length": str(len(data))}, timeout=60)

    def sent_again() -> httpx.Response | None:
        response = httpx.put(url, content=data, timeout=60)
        return None if response.status_code == 409 else response  # 409 until the server saw the cut

    again = wait_for(sent_again, what="the URL to take a new PUT")
    assert again.status_code == 200
    assert again.json()["md5"] == hashlib.md5(data).hexdigest()
    assert list((server.data_dir / "tmp").iterdir()) == []  # the partial blob went before the URL was free


# --- shapes


def test_extensions_md5_and_purpose_filters(server: RunningServer) -> None:
    client = _client(server)
    vision = _upload(client, "a.png", b"same bytes", purpose="vision")
    batch = _upload(client, "b.png", b"same bytes", purpose="batch")
    digest = hashlib.md5(b"same bytes").hexdigest()
    assert vision["md5"] == digest
    assert client.get(f"/files/hash/{digest}").json()["id"] == batch["id"]
    assert client.get(f"/files/hash/{digest}", params={"purpose": "vision"}).json()["id"] == vision["id"]
    assert client.get(f"/files/hash/{digest}", params={"purpose": "datasets"}).status_code == 404
    assert [f["id"] for f in client.get("/files", params={"purpose": "vision"}).json()] == [vision["id"]]
    assert client.get(f"/files/{vision['id']}/content").content == b"same bytes"
    public_url = vision["public_url"]
    assert isinstance(public_url, str)
    assert httpx.get(public_url).content == b"same bytes"
    assert httpx.get(public_url.replace("token=", "token=0")).status_code == 404
    assert client.delete(f"/files/{vision['id']}").json()["id"] == vision["id"]
    assert client.get(f"/files/hash/{digest}", params={"purpose": "vision"}).status_code == 404
    assert httpx.get(public_url).status_code == 404


def test_public_only_shape(server_factory: ServerFactory) -> None:
    server = server_factory(public_only=True)
    client = _client(server)
    first = _upload(client, "a.txt", b"one", purpose="vision")
    _upload(client, "b.txt", b"two", purpose="batch")
    no_url = client.post(
        "/files", params={"purpose": "batch", "generate_public_url": "false"}, files={"file": b"3"}
    )
    assert no_url.json()["public_url"] is None
    assert set(first) == {"id", "filename", "bytes", "purpose", "created_at", "object", "public_url"}
    assert first["object"] == "file"
    assert isinstance(first["public_url"], str)
    assert first["public_url"].startswith(server.base_url)
    listed = client.get("/files", params={"purpose": "vision"}).json()
    assert len(listed) == 3
    assert all("md5" not in item for item in listed)
    assert "md5" not in client.get(f"/files/{first['id']}").json()
    found = client.get(f"/files/hash/{hashlib.md5(b'one').hexdigest()}", params={"purpose": "batch"})
    assert found.json()["id"] == first["id"]
    assert client.get(f"/files/{first['id']}/content").status_code == 404


def test_pagination_is_stable_when_timestamps_tie(server_factory: ServerFactory) -> None:
    server = server_factory(clock=FakeClock())
    client = _client(server)
    ids = [_upload(client, f"{i}.txt", str(i).encode())["id"] for i in range(23)]
    assert len({f["created_at"] for f in client.get("/files", params={"limit": 1000}).json()}) == 1
    pages: list[object] = []
    for skip in range(0, 30, 7):
        pages += [f["id"] for f in client.get("/files", params={"skip": skip, "limit": 7}).json()]
    assert pages == ids[::-1]
    assert [f["id"] for f in client.get("/files").json()] == ids[::-1][:10]


# --- presigned uploads


def test_presigned_entry_is_invisible_until_put(server: RunningServer) -> None:
    client = _client(server)
    response = client.post("/files/presigned-url", json={"filename": "../scan.pdf", "purpose": "vision"})
    assert response.status_code == 200
    presigned = response.json()
    assert presigned["url"].startswith(server.base_url)
    assert presigned["filename"] == "scan.pdf"
    assert presigned["upload_method"] == "PUT"
    assert presigned["expiration"] == 24 * 3600
    file_id = presigned["id"]
    data = b"%PDF scanned"
    digest = hashlib.md5(data).hexdigest()
    assert client.get("/files").json() == []
    assert client.get(f"/files/{file_id}").status_code == 404
    assert client.get(f"/files/hash/{digest}").status_code == 404
    assert _detail(client.get(f"/files/verify-upload/{file_id}")) == "upload not completed"

    assert httpx.put(presigned["url"].replace("token=", "token=f"), content=data).status_code == 403
    put = httpx.put(presigned["url"], content=data, headers={"Content-Type": presigned["content_type"]})
    assert put.status_code == 200
    verified = client.get(f"/files/verify-upload/{file_id}").json()
    assert verified["bytes"] == len(data)
    assert verified["md5"] == digest
    assert [f["id"] for f in client.get("/files").json()] == [file_id]
    assert client.get(f"/files/hash/{digest}").json()["id"] == file_id
    assert httpx.put(presigned["url"], content=b"again").status_code == 409
    assert client.get(f"/files/{file_id}/content").content == data


def test_expired_presigned_url_is_rejected(server_factory: ServerFactory) -> None:
    clock = FakeClock()
    server = server_factory(clock=clock)
    client = _client(server)
    presigned = client.post("/files/presigned-url", json={"filename": "late.bin", "expiration": 60}).json()
    assert presigned["expiration"] == 60
    clock.advance(61)
    put = httpx.put(presigned["url"], content=b"too late")
    assert put.status_code == 403
    assert "expired" in _detail(put)
    assert _detail(client.get(f"/files/verify-upload/{presigned['id']}")) == "file not found"
    assert client.get("/files").json() == []


# --- the upload routes, ahead of FastAPI


async def _both_uploads(app: ASGIApp) -> list[dict[str, Any]]:
    """A direct upload and a presigned one (presign, PUT without a key, content) through ``app`` in-process;
    the two FileResponses, with the per-file fields (id, times, URLs) left out."""
    auth = {"Authorization": "Bearer k"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver/v1", headers=auth) as http:
        grant = await http.post("/files/presigned-url", json={"filename": "put.bin"})
        assert grant.status_code == 200, grant.text
        direct = await http.post("/files", files={"file": ("direct.txt", b"direct bytes")})
        assert direct.status_code == 201, direct.text
        refused = await http.post("/files", content=b"not multipart")
        assert refused.status_code == 400, refused.text
        put = await http.put(grant.json()["url"], content=b"put bytes", headers={"Authorization": ""})
        assert put.status_code == 200, put.text
        items = [direct.json(), put.json()]
        contents = [(await http.get(f"/files/{item['id']}/content")).content for item in items]
    assert contents == [b"direct bytes", b"put bytes"]
    return [{k: v for k, v in item.items() if k not in ("id", "created_at", "public_url")} for item in items]


def test_upload_routes_are_answered_ahead_of_fastapi(tmp_path: Path) -> None:
    """``POST /v1/files`` and ``PUT /v1/uploads/{id}`` never reach FastAPI, whose routing and dependency
    solving cost more CPU per small upload than the upload itself; the other routes all do."""
    with built_app(ServerSettings(data_dir=tmp_path, api_key="k")) as app:
        front = next(layer for layer in _layers(app) if getattr(layer, "routes", None))
        api = front.app
        reached: list[tuple[str, str]] = []

        async def watched(scope: Scope, receive: Receive, send: Send) -> None:
            reached.append((scope["method"], scope["path"]))
            await api(scope, receive, send)

        front.app = watched
        asyncio.run(_both_uploads(app))
    assert [method for method, _ in reached] == ["POST", "GET", "GET"], reached
    assert reached[0] == ("POST", "/v1/files/presigned-url")


def test_fastapi_documentation_routes_serve_as_the_front_does(tmp_path: Path) -> None:
    """FastAPI's routes for the two upload paths exist for the schema and a 405's ``Allow``; a request that
    reaches one anyway is served by the same handler as through the front."""
    with built_app(ServerSettings(data_dir=tmp_path / "front", api_key="k")) as app:
        through_front = asyncio.run(_both_uploads(app))
    with built_app(ServerSettings(data_dir=tmp_path / "api", api_key="k")) as app:
        through_fastapi = asyncio.run(_both_uploads(fastapi_of(app)))
    assert through_fastapi == through_front


def _layers(app: Any) -> Iterator[Any]:
    """``create_app``'s ASGI layers above the FastAPI app, outermost first."""
    while not isinstance(app, FastAPI):
        yield app
        app = app.app


# --- faults and latency


@pytest.mark.parametrize("kind", ["500", "503", "429"])
def test_status_faults(server_factory: ServerFactory, kind: str) -> None:
    server = server_factory(fault_rate=1.0, fault_kinds=(kind,))
    client = _client(server)
    assert client.get("/health").status_code == 200
    response = client.post(
        "/files", params={"purpose": "vision"}, files={"file": ("a.bin", os.urandom(300_000))}
    )
    assert response.status_code == int(kind)
    _detail(response)
    if kind == "429":
        assert response.headers["Retry-After"] == "1"
    assert server.stats.faults_by_kind == {kind: 1}
    assert server.stats.uploads == 0
    assert server.stats.health == 1


def test_reset_fault_drops_the_connection(server_factory: ServerFactory) -> None:
    server = server_factory(fault_rate=1.0, fault_kinds=("reset",))
    client = _client(server)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        client.get("/files")
    assert client.get("/health").status_code == 200
    assert server.stats.faults_by_kind == {"reset": 1}


def test_slow_fault_delays_a_handled_request(server_factory: ServerFactory) -> None:
    server = server_factory(fault_rate=1.0, fault_kinds=("slow",))
    client = _client(server)
    started = time.monotonic()
    response = client.post("/files", params={"purpose": "vision"}, files={"file": ("a.txt", b"slow")})
    assert response.status_code == 201
    assert time.monotonic() - started >= 2.0
    assert server.stats.uploads == 1


def test_seeded_faults_repeat(server_factory: ServerFactory) -> None:
    def outcomes(seed: int) -> list[int]:
        server = server_factory(fault_rate=0.5, fault_kinds=("500", "503", "429"), fault_seed=seed)
        client = _client(server)
        statuses = [client.get("/files").status_code for _ in range(40)]
        assert server.stats.faults == sum(status != 200 for status in statuses)
        assert server.stats.lists == statuses.count(200)
        return statuses

    first = outcomes(7)
    assert first == outcomes(7)
    assert first != outcomes(8)
    assert {200, 500, 503, 429} <= set(first)


def test_latency_delays_every_response(server_factory: ServerFactory) -> None:
    server = server_factory(latency_ms=150)
    client = _client(server)
    for path in ("/health", "/files", "/files/unknown"):
        started = time.monotonic()
        client.get(path)
        assert time.monotonic() - started >= 0.15


# --- blocking entry point


def _healthy(client: httpx.Client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    code = (
        "import sys; from pathlib import Path; from syncd.server import ServerSettings, serve; "
        f"serve(ServerSettings(data_dir=Path(sys.argv[1]), api_key='k', port={port}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "data")], stderr=subprocess.PIPE)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}/v1", headers={"Authorization": "Bearer k"})
        deadline = time.monotonic() + 20
        while not _healthy(client):
            assert proc.poll() is None, "serve() exited early"
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.05)
        _upload(client, "kept.txt", b"kept")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert len(list((tmp_path / "data" / "blobs").iterdir())) == 1
