"""Security of the reference server: the API key guards every route but the two self-authorising ones,
and no filename or id reaches the filesystem outside the server's data dir (design §5).

Requests that must reach the server exactly as written (``..`` segments, ``%2F`` in an id) go over a raw
socket: httpx would normalise the path first.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ServerFactory, md5_of
from inprocess import front_routes_of, routes_of

from syncd.server import RunningServer, ServerSettings

EXEMPT = {("PUT", "/v1/uploads/{file_id}"), ("GET", "/v1/public/{file_id}")}
"""Routes that carry their own signed token instead of the API key (the SDK sends none on the PUT)."""
FILE_ID = re.compile(r"file-[0-9a-f]{32}")
SECRET = b"outside the data dir"


def _client(server: RunningServer, headers: dict[str, str] | None = None) -> httpx.Client:
    auth = {"Authorization": f"Bearer {server.api_key}"} if headers is None else headers
    return httpx.Client(base_url=server.base_url.removesuffix("/v1"), headers=auth, timeout=30)


def _upload(server: RunningServer, name: str = "doc.txt", data: bytes = b"guarded") -> dict[str, Any]:
    with _client(server) as http:
        answer = http.post("/v1/files", files={"file": (name, data)}, params={"generate_public_url": "true"})
    assert answer.status_code == 201, answer.text
    item: dict[str, Any] = answer.json()
    return item


def _raw(server: RunningServer, method: str, target: bytes, *, key: bool = True) -> httpx.Response:
    """One request with ``target`` sent byte for byte as the request line's target."""
    url = httpx.URL(server.base_url)
    assert url.host
    assert url.port
    head = [f"{method} ".encode() + target + b" HTTP/1.1", f"Host: {url.host}:{url.port}".encode()]
    head += [b"Connection: close", b"Content-Length: 0"]
    if key:
        head.append(f"Authorization: Bearer {server.api_key}".encode())
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    headers_blob, _, content = rest.partition(b"\r\n\r\n")
    lines = (line.partition(b":") for line in headers_blob.split(b"\r\n") if line)
    headers = [(name, value.strip()) for name, _, value in lines]
    return httpx.Response(int(status_line.split(b" ")[1]), headers=headers, content=content)


def _bad_credentials(key: str) -> dict[str, dict[str, str]]:
    """Ways of not presenting the key: absent, empty, wrong, truncated, extended, unschemed, elsewhere."""
    return {
        "absent": {},
        "empty": {"Authorization": ""},
        "scheme only": {"Authorization": "Bearer"},
        "wrong key": {"Authorization": "Bearer not-the-key"},
        "truncated": {"Authorization": f"Bearer {key[:-1]}"},
        "extended": {"Authorization": f"Bearer {key}x"},
        "no scheme": {"Authorization": key},
        "basic": {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()},
        "other header": {"X-API-Key": key},
    }


# --- authentication


@pytest.mark.parametrize("public_only", [False, True], ids=["extensions", "public-only"])
def test_every_route_needs_the_key(server_factory: ServerFactory, public_only: bool) -> None:
    """Each route of the app (found by walking it, so a new one cannot be left out) answers 401 to every
    bad credential without running a handler, while the same GETs with the key succeed."""
    server = server_factory(public_only=public_only)
    settings = ServerSettings(data_dir=server.data_dir, api_key=server.api_key, public_only=public_only)
    routes = routes_of(settings)
    assert routes >= EXEMPT, "a self-authorising route moved: update EXEMPT"
    # The upload routes are answered by plain ASGI handlers ahead of FastAPI, still behind the key check:
    # routes_of() includes them (it fails on one FastAPI does not also know), so they are checked here.
    front = front_routes_of(settings)
    assert front, "the upload routes are answered ahead of FastAPI: routes_of() must see them"
    assert front <= routes
    guarded = sorted(routes - EXEMPT)
    assert len(guarded) == (8 if public_only else 9), guarded
    item = _upload(server)

    def concrete(template: str) -> str:
        return template.replace("{file_id}", item["id"]).replace("{md5}", md5_of(b"guarded"))

    before = server.stats.snapshot()
    credentials = _bad_credentials(server.api_key)
    for name, headers in credentials.items():
        with _client(server, headers) as http:
            for method, template in guarded:
                # The key in the query string does not count either.
                answer = http.request(method, concrete(template), params={"api_key": server.api_key})
                assert answer.status_code == 401, (name, method, template, answer.text)
                assert answer.headers["www-authenticate"] == "Bearer"
                detail = answer.json()["detail"]
                assert isinstance(detail, str)
                assert server.api_key not in detail
    after = server.stats.snapshot()
    assert after.pop("unauthorized") - before.pop("unauthorized") == len(guarded) * len(credentials)
    assert after == before, "a handler ran for an unauthenticated request"
    with _client(server) as http:
        for method, template in guarded:
            if method == "GET":
                answer = http.get(concrete(template))
                assert answer.status_code == 200, (template, answer.text)


def test_health_is_401_with_a_bad_key(server: RunningServer) -> None:
    """Design §5: health is how a client checks its key, so a bad key must not look healthy."""
    with _client(server, {"Authorization": "Bearer wrong"}) as http:
        assert http.get("/v1/health").status_code == 401
    with _client(server) as http:
        assert http.get("/v1/health").status_code == 200


def test_unknown_paths_and_the_schema_need_the_key(server: RunningServer) -> None:
    """Authentication comes before routing (nothing tells a stranger which paths exist), and the app
    serves no schema or docs to anyone."""
    paths = ["/", "/openapi.json", "/docs", "/redoc", "/v1", "/v1/nope", "/v1/openapi.json"]
    with _client(server, {}) as http:
        for path in [*paths, "/v1/files/", "/v1/health/"]:
            assert http.get(path).status_code == 401, path
    with _client(server) as http:
        for path in paths:
            assert http.get(path).status_code == 404, path


def test_self_authorising_routes_need_their_own_token(server: RunningServer) -> None:
    """A presigned PUT and a public URL open exactly their own file, only with their token; the API key
    is no substitute for the token."""
    with _client(server) as http:
        grant = http.post("/v1/files/presigned-url", json={"filename": "a.bin"}).json()
        other = http.post("/v1/files/presigned-url", json={"filename": "b.bin"}).json()
    url = httpx.URL(grant["url"])
    expires, token = url.params["expires"], url.params["token"]
    attempts = {
        "no token": {"expires": expires},
        "empty token": {"expires": expires, "token": ""},
        "wrong token": {"expires": expires, "token": "0" * 64},
        "later expiry": {"expires": str(int(expires) + 1), "token": token},
        "the API key": {"expires": expires, "token": server.api_key},
    }
    with _client(server, {}) as anonymous, _client(server) as keyed:
        for name, params in attempts.items():
            for http in (anonymous, keyed):
                answer = http.put(f"/v1/uploads/{grant['id']}", params=params, content=b"x")
                assert answer.status_code == 403, (name, answer.text)
        moved = anonymous.put(f"/v1/uploads/{other['id']}", params=dict(url.params), content=b"x")
        assert moved.status_code == 403, "a token opened another upload"
        assert anonymous.put(str(url), content=b"payload").status_code == 200

        item = _upload(server, data=b"public bytes")
        public = httpx.URL(item["public_url"])
        assert anonymous.get(str(public)).content == b"public bytes"
        for params in ({}, {"token": ""}, {"token": "0" * 64}, {"token": server.api_key}):
            for http in (anonymous, keyed):
                assert http.get(public.path, params=params).status_code == 404, params
        grant_public = httpx.URL(grant["public_url"]).params["token"]
        stolen = anonymous.get(f"/v1/public/{item['id']}", params={"token": grant_public})
        assert stolen.status_code == 404, "one file's public token opened another"


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("PUT", b"/v1/uploads/../files/{id}"),
        ("PUT", b"/v1/uploads/x/../../files"),
        ("PUT", b"/v1/uploads/..%2Ffiles%2F{id}"),
        ("GET", b"/v1/public/../files"),
        ("GET", b"/v1/public/../files/{id}/content"),
        ("GET", b"/v1/public/%2e%2e/files/{id}/content"),
        ("GET", b"/v1/public/..%2Ffiles%2F{id}%2Fcontent"),
        ("GET", b"/v1/public/{id}/../../files"),
        ("GET", b"/v1/public//v1/files"),
    ],
)
def test_exempt_prefixes_open_nothing_else(server: RunningServer, method: str, target: bytes) -> None:
    """The auth bypass is by path prefix; a path that starts like an exempt route but names another one
    (Starlette routes the path as written, without resolving dot segments) must reach nothing."""
    item = _upload(server, data=b"guarded bytes")
    answer = _raw(server, method, target.replace(b"{id}", item["id"].encode()), key=False)
    assert answer.status_code in (401, 403, 404, 405), answer.text
    assert b"guarded bytes" not in answer.content
    assert item["id"] not in answer.text
    with _client(server) as http:
        assert http.get(f"/v1/files/{item['id']}").status_code == 200


# --- containment in the data dir


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, bytes]]:
    """Every file and directory under ``root`` but ``skip``: size and content (directories: -1, b"")."""
    out: dict[str, tuple[int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in dirnames:
            out[os.path.join(dirpath, name)] = (-1, b"")
        for name in filenames:
            path = Path(dirpath, name)
            out[str(path)] = (path.stat().st_size, path.read_bytes())
    return out


def _hostile_names(outside: Path) -> list[str]:
    return [
        "..",
        ".",
        "../secret.txt",
        "../../secret.txt",
        "blobs/../../secret.txt",
        "/etc/passwd",
        str(outside / "secret.txt"),
        str(outside / "planted.txt"),
        "..\\..\\secret.txt",
        "a/../../../planted.txt",
        "nul\x00byte.txt",
        "tmp/../files.db",
        "files.db",
        "server.lock",
        "file-" + "0" * 32,
        "%2e%2e%2fsecret.txt",
        "x" * 5000,
        "../" * 300 + "planted.txt",
        "r\u00e9sum\u00e9 \u2215 \U0001f4c4.pdf",
        "\u202etxt.exe",
        "\u00fc" * 400,
        "\ufffd\ufeff\u200b",
    ]


def _hostile_ids(outside: Path) -> list[str]:
    return [
        "..",
        ".",
        "../secret.txt",
        "../../secret.txt",
        "../files.db",
        "../server.lock",
        "files.db",
        "blobs",
        "tmp",
        "/etc/passwd",
        str(outside / "secret.txt"),
        "file-x/../../../secret.txt",
        "nul\x00",
        "file-" + "0" * 32 + "\x00.txt",
        "\u00fc\U0001f4c4",
        "a" * 5000,
        "*",
        "%",
        "file-%",
    ]


def _id_targets(file_id: str) -> list[tuple[str, bytes]]:
    """Every route taking an id, with ``file_id`` once percent-encoded (``/`` as ``%2F``), once
    double-encoded and once raw (``..`` segments as they are, only NUL and spaces encoded)."""
    out: list[tuple[str, bytes]] = []
    forms = {
        urllib.parse.quote(file_id, safe=""),
        urllib.parse.quote(urllib.parse.quote(file_id, safe=""), safe=""),
        urllib.parse.quote(file_id, safe="/.~*"),
    }
    for form in forms:
        segment = form.encode()
        out += [
            ("GET", b"/v1/files/" + segment),
            ("DELETE", b"/v1/files/" + segment),
            ("GET", b"/v1/files/" + segment + b"/content"),
            ("GET", b"/v1/files/verify-upload/" + segment),
            ("GET", b"/v1/files/hash/" + segment),
            ("GET", b"/v1/public/" + segment + b"?token=" + b"0" * 64),
            ("PUT", b"/v1/uploads/" + segment + b"?expires=9999999999&token=" + b"0" * 64),
        ]
    return out


def _multipart(filename: bytes, data: bytes) -> tuple[bytes, str]:
    boundary = "containment-boundary"
    body = (
        f"--{boundary}\r\n".encode()
        + b'Content-Disposition: form-data; name="file"; filename="'
        + filename
        + b'"\r\n\r\n'
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_no_filename_or_id_escapes_the_data_dir(server_factory: ServerFactory, tmp_path: Path) -> None:
    """Hostile filenames (direct and presigned uploads) and hostile ids (on every route that takes one)
    neither read, write nor delete anything outside the data dir, and inside it only the server's own
    layout appears: the database, the lock, ``blobs/<generated id>`` and an empty ``tmp/``."""
    outside = tmp_path / "outside"
    data_dir = outside / "data"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    server = server_factory(data_dir=data_dir)
    before = _snapshot(tmp_path, skip=data_dir)
    stored: dict[str, bytes] = {}

    with _client(server) as http:
        for n, name in enumerate(_hostile_names(outside)):
            payload = f"direct {n}".encode()
            raw = name.encode("utf-8", "surrogateescape").replace(b'"', b"%22")
            body, content_type = _multipart(raw, payload)
            answer = http.post("/v1/files", content=body, headers={"Content-Type": content_type})
            assert answer.status_code in (201, 400, 422), (name[:60], answer.text)
            if answer.status_code == 201:
                stored[answer.json()["id"]] = payload

            payload = f"presigned {n}".encode()
            grant = http.post("/v1/files/presigned-url", json={"filename": name})
            assert grant.status_code in (200, 422), (name[:60], grant.text)
            if grant.status_code == 200:
                put = httpx.put(grant.json()["url"], content=payload, timeout=30)
                assert put.status_code == 200, put.text
                stored[put.json()["id"]] = payload
        assert len(stored) >= len(_hostile_names(outside)), "most hostile names should be stored as metadata"

        for hostile in _hostile_ids(outside):
            for method, target in _id_targets(hostile):
                answer = _raw(server, method, target)
                assert answer.status_code in (403, 404, 405), (method, target[:80], answer.text)
                assert SECRET not in answer.content
        assert not (outside / "planted.txt").exists()

        listed = http.get("/v1/files", params={"limit": 1000}).json()
        assert {item["id"] for item in listed} == set(stored)
        for item in listed:
            assert "/" not in item["filename"]
            assert "\x00" not in item["filename"]
            assert item["filename"] not in ("", ".", "..")
            assert len(item["filename"]) <= 255
            content = http.get(f"/v1/files/{item['id']}/content")
            assert content.content == stored[item["id"]]

    assert _snapshot(tmp_path, skip=data_dir) == before, "something outside the data dir changed"
    top = {p.name for p in data_dir.iterdir()}
    assert (
        {"files.db", "server.lock", "blobs", "tmp"}
        <= top
        <= {
            "files.db",
            "files.db-wal",
            "files.db-shm",
            "server.lock",
            "blobs",
            "tmp",
        }
    )
    assert list((data_dir / "tmp").iterdir()) == []
    blobs = {p.name for p in (data_dir / "blobs").iterdir()}
    assert blobs == set(stored)
    assert all(FILE_ID.fullmatch(name) for name in blobs)
    assert all((data_dir / "blobs" / name).is_file() for name in blobs)
