"""`syncd files` against the reference server: every command in-process through typer's CliRunner (no
terminal: JSON lines, no prompt), the terminal-only behaviour (table, prompt) in a subprocess on a pty, and
the manifest after a cleanup checked by running `sync --once` and `reconcile --once` for real."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import secrets
import struct
import subprocess
import termios
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FakeClock, ServerFactory, Syncd
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner, Result
from vlmrun.client import VLMRun

from syncd.api import FilesClient, NetworkError
from syncd.cli import app
from syncd.files_cmd import CleanupOptions, Listed, format_span, parse_age, run_cleanup, select_cleanup
from syncd.manifest import ManifestReader, State
from syncd.server import RunningServer
from syncd.state import StateLock

DAY = 86400.0


@dataclass
class Files:
    """`syncd files ...` with a workspace's config and its server's key, run in this process."""

    ws: Syncd

    def __call__(self, *args: str | Path) -> Result:
        env: Mapping[str, str | None] = {
            "VLMRUN_API_KEY": self.ws.server.api_key,
            **dict.fromkeys(("VLMRUN_BASE_URL", "SYNCD_CONFIG", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY")),
        }
        argv = ["files", *map(str, args), "--config", str(self.ws.config_path)]
        return CliRunner().invoke(app, argv, env=env)

    def ok(self, *args: str | Path) -> list[dict[str, Any]]:
        """Run a command with ``--json`` that must succeed; its stdout as JSON lines."""
        result = self(*args, *(() if "--json" in args else ("--json",)))
        assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
        return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def ws(server: RunningServer, syncd_factory: Any) -> Syncd:
    workspace: Syncd = syncd_factory(server)
    return workspace


@pytest.fixture
def files(ws: Syncd) -> Files:
    return Files(ws)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def remote_ids(ws: Syncd) -> list[str]:
    return [f["id"] for f in ws.remote()]


def one_line_error(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("syncd: ")
    return lines[0]


# -- upload, get, list, delete, download -------------------------------------------------------------------


def test_upload_reuses_a_remote_file_with_the_same_md5_and_purpose(
    files: Files, ws: Syncd, server: RunningServer, tmp_path: Path
) -> None:
    a = write(tmp_path / "in" / "a.txt", b"alpha")
    b = write(tmp_path / "in" / "b.txt", b"beta")
    first = files.ok("upload", a, b, "--json")
    assert [(o["path"], o["reused"], o["purpose"]) for o in first] == [
        (str(a), False, "assistants"),
        (str(b), False, "assistants"),
    ]
    assert server.stats.uploads == 2

    again = files("upload", a)
    assert again.exit_code == 0
    assert again.stdout == f"{first[0]['id']}\treused\t{a}\n"
    assert server.stats.uploads == 2

    (vision,) = files.ok("upload", a, "--purpose", "vision", "--json")
    assert (vision["reused"], vision["purpose"]) == (False, "vision")
    # The newest copy of a.txt is now the vision one; the server's md5 extension, once seen, finds the other.
    assert files.ok("upload", a, "--json")[0]["id"] == first[0]["id"]
    (forced,) = files.ok("upload", a, "--force", "--json")
    assert not forced["reused"]
    assert forced["id"] != first[0]["id"]
    assert server.stats.uploads == 4
    assert ws.content(forced["id"]) == b"alpha"
    assert set(remote_ids(ws)) == {first[0]["id"], first[1]["id"], vision["id"], forced["id"]}

    missing = files("upload", tmp_path / "nope.txt", b)
    assert missing.exit_code == 1
    assert (
        one_line_error(missing) == f"syncd: files upload {tmp_path / 'nope.txt'}: No such file or directory"
    )
    assert missing.stdout == f"{first[1]['id']}\treused\t{b}\n"
    bad = files("upload", a, "--purpose", "nope")
    assert bad.exit_code == 2
    assert "unknown purpose 'nope'" in one_line_error(bad)
    assert server.stats.uploads == 4


def test_get_list_and_delete(files: Files, ws: Syncd, tmp_path: Path) -> None:
    a, b, c = (
        files.ok("upload", write(tmp_path / name, name.encode()), "--purpose", purpose, "--json")[0]
        for name, purpose in (("a.txt", "assistants"), ("b.png", "vision"), ("c.txt", "assistants"))
    )
    assert files.ok("get", b["id"], "--json") == [next(f for f in ws.remote() if f["id"] == b["id"])]
    human = files("get", b["id"])
    assert f"id: {b['id']}" in human.stdout.splitlines()
    assert "purpose: vision" in human.stdout.splitlines()
    missing = files("get", "nope")
    assert missing.exit_code == 1
    assert one_line_error(missing) == "syncd: files get nope: not found (404)"

    newest_first = [c["id"], b["id"], a["id"]]
    assert [o["id"] for o in files.ok("list")] == newest_first  # no terminal: JSON lines
    assert [o["id"] for o in files.ok("list", "--json", "--all")] == newest_first
    assert [o["id"] for o in files.ok("list", "--json", "--limit", "1", "--skip", "1")] == [b["id"]]
    assert [o["id"] for o in files.ok("list", "--json", "--purpose", "assistants")] == [c["id"], a["id"]]

    assert [o["id"] for o in files.ok("delete", a["id"], c["id"], "--json")] == [a["id"], c["id"]]
    assert remote_ids(ws) == [b["id"]]
    again = files("delete", a["id"])
    assert again.exit_code == 1
    assert one_line_error(again) == f"syncd: files delete {a['id']}: not found (404)"


def test_download_is_atomic_and_never_replaces_a_file_unasked(
    files: Files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = secrets.token_bytes(2 * 2**20 + 123)  # more than one chunk
    (item,) = files.ok("upload", write(tmp_path / "src" / "scan.pdf", data), "--json")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)

    (got,) = files.ok("download", item["id"], "--json")
    assert (got["path"], got["written"]) == (str(here / "scan.pdf"), len(data))
    assert (here / "scan.pdf").read_bytes() == data
    (here / "scan.pdf").write_bytes(b"mine")
    refused = files("download", item["id"])
    assert refused.exit_code == 2
    assert "exists; pass -o" in one_line_error(refused)
    assert (here / "scan.pdf").read_bytes() == b"mine"

    files.ok("download", item["id"], "-o", here / "scan.pdf", "--json")
    assert (here / "scan.pdf").read_bytes() == data
    (here / "sub").mkdir()
    files.ok("download", item["id"], "-o", here / "sub", "--json")
    assert (here / "sub" / "scan.pdf").read_bytes() == data
    missing = files("download", "nope")
    assert missing.exit_code == 1
    assert one_line_error(missing) == "syncd: files download nope: not found (404)"
    assert sorted(p.name for p in here.rglob("*")) == ["scan.pdf", "scan.pdf", "sub"]  # no temp files left


def test_core_commands_against_the_public_api_shape(
    server_factory: ServerFactory, syncd_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    public = server_factory(public_only=True)
    ws: Syncd = syncd_factory(public, name="public")
    files = Files(ws)
    a = write(tmp_path / "a.txt", b"alpha")
    (doc,) = files.ok("upload", a, "--json")
    (scan,) = files.ok("upload", write(tmp_path / "b.png", b"png"), "--purpose", "vision", "--json")
    assert files.ok("upload", a, "--json")[0]["id"] == doc["id"]  # the hash route is public
    assert public.stats.uploads == 2
    assert doc["md5"] is None  # no extensions here

    # The server ignores the purpose filter; the command must not.
    assert [o["id"] for o in files.ok("list", "--purpose", "vision")] == [scan["id"]]
    assert files.ok("get", scan["id"], "--json")[0]["purpose"] == "vision"

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").unlink()
    no_route = files("download", doc["id"])
    assert no_route.exit_code == 1
    assert "this server has no content route" in one_line_error(no_route)
    assert not (tmp_path / "a.txt").exists()

    files.ok("delete", doc["id"])
    files.ok("cleanup", "--older-than", "0d", "--purpose", "vision", "--yes")
    assert remote_ids(ws) == []


def test_a_download_that_fails_leaves_no_partial_file(tmp_path: Path) -> None:
    attempts: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        attempts.append(1)
        if len(attempts) == 1:  # the body ends early: 5 of the 10 bytes announced
            return httpx.Response(200, headers={"Content-Length": "10"}, stream=httpx.ByteStream(b"01234"))
        return httpx.Response(200, content=b"0123456789")

    async def fetch(dest: Path, retries: int) -> int:
        async def no_wait(_: float) -> None:
            return None

        transport = httpx.MockTransport(answer)
        async with FilesClient(
            base_url="http://127.0.0.1:9/v1", api_key="k", retries=retries, transport=transport, sleep=no_wait
        ) as client:
            return await client.download("f1", dest=dest)

    dest = write(tmp_path / "out" / "f.bin", b"previous")
    with pytest.raises(NetworkError, match="5 of 10 bytes"):
        asyncio.run(fetch(dest, retries=0))
    assert [p.name for p in dest.parent.iterdir()] == ["f.bin"]
    assert dest.read_bytes() == b"previous"
    attempts.clear()
    assert asyncio.run(fetch(dest, retries=1)) == 10  # the retry starts a new temporary file
    assert (len(attempts), dest.read_bytes()) == (2, b"0123456789")
    assert [p.name for p in dest.parent.iterdir()] == ["f.bin"]


# -- cleanup ---------------------------------------------------------------------------------------------


def test_cleanup_by_age_and_purpose_dry_run_and_refusal_without_a_terminal(
    server_factory: ServerFactory, syncd_factory: Any, tmp_path: Path
) -> None:
    clock = FakeClock(datetime.now(UTC) - timedelta(days=40))
    srv = server_factory(clock=clock)
    ws: Syncd = syncd_factory(srv, name="aged")
    files = Files(ws)
    (old_doc,) = files.ok("upload", write(tmp_path / "old.txt", b"old"), "--json")
    (old_scan,) = files.ok("upload", write(tmp_path / "old.png", b"scan"), "--purpose", "vision", "--json")
    clock.advance(39 * DAY)
    (young,) = files.ok("upload", write(tmp_path / "new.txt", b"new"), "--json")
    everything = remote_ids(ws)

    plan = files.ok("cleanup", "--older-than", "30d", "--dry-run", "--json")
    assert [(o["id"], o["action"]) for o in plan] == [
        (old_scan["id"], "would delete"),
        (old_doc["id"], "would delete"),
    ]
    assert plan[0]["reason"].startswith("40d old, older than 30d")
    human = files("cleanup", "--older-than", "30d", "--dry-run")
    assert "kept 1 (1 younger than 30d)" in human.stdout
    refused = files("cleanup", "--older-than", "30d")
    assert refused.exit_code == 2
    assert "no terminal to ask on; pass --yes" in one_line_error(refused)
    bad_age = files("cleanup", "--older-than", "30")
    assert bad_age.exit_code == 2
    assert "is not an age" in one_line_error(bad_age)
    assert (remote_ids(ws), srv.stats.deletes) == (everything, 0)

    files.ok("cleanup", "--older-than", "30d", "--purpose", "vision", "--yes")
    assert remote_ids(ws) == [young["id"], old_doc["id"]]
    done = files("cleanup", "--older-than", "2d", "--yes")
    assert done.exit_code == 0
    assert done.stdout.splitlines()[-1] == "files cleanup: deleted 1 of 1 files; kept 1 (1 younger than 2d)"
    assert remote_ids(ws) == [young["id"]]


def test_owned_only_cleanup_expires_synced_rows_and_spares_other_clients_files(
    files: Files, ws: Syncd, server: RunningServer, tmp_path: Path
) -> None:
    write(ws.root / "a.txt", b"alpha")
    write(ws.root / "copy" / "a.txt", b"alpha")  # the same remote file as a.txt
    write(ws.root / "b.txt", b"beta")
    write(ws.root / "gone.txt", b"deleted locally, its prune not yet run")
    ws.configure(delete_grace=0)
    assert ws.sync_once().returncode == 0
    (ws.root / "gone.txt").unlink()
    done = ws.sync_once()
    assert done.returncode == 0, done.stderr
    rows = ws.rows()
    assert rows.pop("gone.txt").state is State.DELETED
    synced = {e.remote_id for e in rows.values()}
    assert len(synced) == 2
    sdk = VLMRun(api_key=server.api_key, base_url=server.base_url, max_retries=1)
    by_sdk = sdk.files.upload(write(tmp_path / "sdk.pdf", b"someone else's"), purpose="assistants").id

    plan = files("cleanup", "--older-than", "0d", "--owned-only", "--dry-run")
    assert plan.exit_code == 0
    both = ", ".join(str(ws.root / p) for p in ("a.txt", "copy/a.txt"))
    assert f"rows become expired: {both}" in plan.stdout
    assert f"rows of deleted files dropped: {ws.root / 'gone.txt'}" in plan.stdout
    assert {e.state for e in ws.rows().values()} == {State.SYNCED, State.DELETED}

    report = files.ok("cleanup", "--older-than", "0d", "--owned-only", "--yes")
    assert len(report) == 3
    assert {o["action"] for o in report} == {"deleted"}
    assert sorted(p for o in report for p in o["rows_expired"]) == sorted(str(ws.root / p) for p in rows)
    assert [p for o in report for p in o["rows_dropped"]] == [str(ws.root / "gone.txt")]
    assert remote_ids(ws) == [by_sdk]
    assert {p: e.state for p, e in ws.rows().items()} == dict.fromkeys(rows, State.EXPIRED)
    with ManifestReader.open_readonly(ws.state_dir) as reader:
        assert reader.owned_remote_ids() == set()

    uploads, deletes = server.stats.uploads, server.stats.deletes
    again = ws.cli("reconcile", "--once")
    assert again.returncode == 0, again.stderr
    assert (server.stats.uploads, server.stats.deletes) == (uploads, deletes)  # nothing re-uploaded or pruned
    assert {p: e.state for p, e in ws.rows().items()} == dict.fromkeys(rows, State.EXPIRED)
    assert remote_ids(ws) == [by_sdk]


def test_cleanup_needs_the_state_dir_lock_only_for_the_manifest(
    files: Files, ws: Syncd, tmp_path: Path
) -> None:
    write(ws.root / "a.txt", b"alpha")
    assert ws.sync_once().returncode == 0
    (mine,) = (e.remote_id for e in ws.rows().values() if e.remote_id is not None)
    (other,) = files.ok("upload", write(tmp_path / "x.png", b"by hand"), "--purpose", "vision", "--json")
    with StateLock(ws.state_dir):  # as a running daemon holds it
        owned = files("cleanup", "--older-than", "0d", "--owned-only", "--yes")
        assert owned.exit_code == 3
        assert "syncd is already running" in one_line_error(owned)
        referenced = files("cleanup", "--older-than", "0d", "--yes")
        assert referenced.exit_code == 3
        assert "1 of the files to delete are synced from" in one_line_error(referenced)
        assert set(remote_ids(ws)) == {mine, other["id"]}
        plan = files.ok("cleanup", "--older-than", "0d", "--owned-only", "--dry-run")
        assert [o["id"] for o in plan] == [mine]
        files.ok("cleanup", "--older-than", "0d", "--purpose", "vision", "--yes")  # no row holds it
        assert remote_ids(ws) == [mine]
    assert ws.rows()["a.txt"].state is State.SYNCED

    deleted = files("delete", mine)
    assert deleted.exit_code == 0
    note = one_line_error(deleted)
    assert f"{ws.root / 'a.txt'} was synced to {mine}; the next sync uploads it again" in note


def test_a_failed_page_aborts_the_cleanup_with_nothing_deleted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sent: list[str] = []
    created = (datetime.now(UTC) - timedelta(days=90)).isoformat()
    page = [
        {"id": f"f{i}", "filename": f"{i}.txt", "bytes": 1, "purpose": "assistants", "created_at": created}
        for i in range(1000)
    ]

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(f"{request.method} {request.url.path}?{request.url.query.decode()}")
        if request.method == "GET" and request.url.params.get("skip") == "0":
            return httpx.Response(200, json=page)
        return httpx.Response(500, json={"detail": "boom"})

    async def main() -> int:
        async with FilesClient(
            base_url="http://127.0.0.1:9/v1", api_key="k", retries=0, transport=httpx.MockTransport(answer)
        ) as client:
            opts = CleanupOptions(0.0, None, owned_only=False, dry_run=False, yes=True, as_json=False)
            return await run_cleanup(
                client, state_dir=tmp_path / "state", opts=opts, ask=None, base_url="x", concurrency=4
            )

    assert asyncio.run(main()) == 1
    assert [s.split("?")[0] for s in sent] == ["GET /v1/files", "GET /v1/files"]
    assert "listing remote files failed, nothing deleted" in capsys.readouterr().err


# -- on a terminal -----------------------------------------------------------------------------------------


def on_tty(ws: Syncd, *args: str, typed: bytes = b"") -> tuple[int, str]:
    """Run `syncd files ...` with a pty as stdin/stdout/stderr, `typed` typed ahead; (exit code, screen)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    env = {**ws.env(), "TERM": "xterm"}
    proc = subprocess.Popen(ws.argv("files", *args), stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    os.write(master, typed)
    screen = b""
    try:
        while chunk := os.read(master, 4096):
            screen += chunk
    except OSError:  # EIO: the child closed the terminal
        pass
    finally:
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", screen.decode(errors="replace"))  # styles, cursor moves
    return proc.wait(timeout=60), text


def test_on_a_terminal_list_is_a_table_and_cleanup_asks(files: Files, ws: Syncd, tmp_path: Path) -> None:
    (a,) = files.ok("upload", write(tmp_path / "a.txt", b"alpha"), "--json")
    code, screen = on_tty(ws, "list")
    assert code == 0
    header = next(line for line in screen.splitlines() if "filename" in line)
    assert header.split() == ["id", "filename", "bytes", "purpose", "created", "md5"]
    assert any(line.split()[:3] == [a["id"], "a.txt", "5"] for line in screen.splitlines() if line.strip())

    code, screen = on_tty(ws, "cleanup", "--older-than", "0d", typed=b"n\n")
    assert code == 1
    assert "Delete these 1 remote files?" in screen
    assert remote_ids(ws) == [a["id"]]
    code, screen = on_tty(ws, "cleanup", "--older-than", "0d", typed=b"y\n")
    assert code == 0, screen
    assert remote_ids(ws) == []


# -- the pure rules ----------------------------------------------------------------------------------------


def test_parse_age() -> None:
    assert [parse_age(t) for t in ("30d", "12h", "90m", "45s", "0d", "1.5d", " 2h ")] == [
        30 * DAY,
        12 * 3600,
        90 * 60,
        45,
        0,
        1.5 * DAY,
        7200,
    ]
    for bad in ("30", "d", "-1d", "1w", "1d12h", "", "1.d"):
        with pytest.raises(ValueError, match="is not an age"):
            parse_age(bad)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from("smhd"))
def test_parse_age_reads_what_format_span_writes(n: int, unit: str) -> None:
    seconds = parse_age(f"{n}{unit}")
    assert seconds == n * {"s": 1, "m": 60, "h": 3600, "d": DAY}[unit]
    assert parse_age(format_span(seconds)) == pytest.approx(seconds, rel=0.05, abs=0.5)


PURPOSES = ("assistants", "vision", "batch")
NOW = 1_800_000_000.0


@st.composite
def listings(draw: st.DrawFn) -> list[Listed]:
    n = draw(st.integers(min_value=0, max_value=20))
    return [
        Listed(
            id=f"f{i}",
            filename=None,
            purpose=draw(st.sampled_from(PURPOSES)),
            created_at=NOW - draw(st.floats(min_value=-600, max_value=100 * DAY)),
            bytes=1,
        )
        for i in range(n)
    ]


ages = st.one_of(st.just(0.0), st.floats(min_value=1, max_value=100 * DAY))


@given(
    listings(),
    ages,
    ages,
    st.none() | st.sampled_from(PURPOSES),
    st.none() | st.frozensets(st.sampled_from([f"f{i}" for i in range(20)])),
)
def test_cleanup_deletes_exactly_the_old_enough_files_of_the_purpose_and_owner(
    listing: list[Listed],
    older_than: float,
    other_age: float,
    purpose: str | None,
    owned: frozenset[str] | None,
) -> None:
    sel = select_cleanup(listing, now=NOW, older_than=older_than, purpose=purpose, owned=owned)
    chosen = [d.file.id for d in sel.delete]
    expected = [
        f.id
        for f in listing
        if (older_than == 0 or NOW - f.created_at >= older_than)
        and (purpose is None or f.purpose == purpose)
        and (owned is None or f.id in owned)
    ]
    assert chosen == expected  # listing order kept
    assert len(sel.delete) + sel.kept == len(listing)
    if owned is None:
        assert sel.not_owned == 0
    if purpose is None:
        assert sel.other_purpose == 0
    if older_than == 0 and purpose is None and owned is None:
        assert chosen == [f.id for f in listing]  # 0d means everything
    # A larger minimum age never deletes more.
    stricter = select_cleanup(
        listing, now=NOW, older_than=max(older_than, other_age), purpose=purpose, owned=owned
    )
    assert {d.file.id for d in stricter.delete} <= set(chosen)


def test_upload_of_a_name_that_is_not_utf8_sends_a_valid_one(ws: Syncd, tmp_path: Path) -> None:
    """A Latin-1 name (an old SMB share's) goes up under a valid UTF-8 filename, and the command says
    which local file it was without failing on the undecodable byte."""
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"caf\xe9.txt")
    with open(raw, "wb") as fh:
        fh.write(b"latin-1 name")
    argv = ws.argv("files", "upload", os.fsdecode(raw), "--config", str(ws.config_path))
    done = subprocess.run(argv, env=ws.env(), capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    sent, action, printed = done.stdout.rstrip(b"\n").split(b"\t")
    assert (action, printed) == (b"uploaded", raw), "the local path is printed as it is, byte for byte"
    remote_id = sent.decode()
    (item,) = [f for f in ws.remote() if f["id"] == remote_id]
    assert item["filename"] == "caf\ufffd.txt"
    assert ws.content(remote_id) == b"latin-1 name"
