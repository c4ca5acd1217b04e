"""What the soak tests share (crash harness, fault soak, fleet, bad input): their sizes, file sets, the
audit of what the server holds against what is local, the API-key leak check, and the figures that
`make soak` (``bench/soak.py``) prints as one table.

Sizes: CI runs small versions; ``HYPOTHESIS_PROFILE=soak`` (what `make soak` sets, as for the hypothesis
properties) selects the long ones. A test never asserts a timing; it records it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from conftest import Syncd

from syncd.manifest import Entry, State
from syncd.server import RunningServer, ServerSettings, running_server

SOAK = os.environ.get("HYPOTHESIS_PROFILE") == "soak"
"""The long runs of `make soak`; CI otherwise."""
REPORT_ENV = "SYNCD_SOAK_REPORT"
"""A JSON-lines file each soak scenario appends its figures to (set by ``bench/soak.py``)."""

KiB = 1024
MiB = 1024 * KiB


def pick(ci: int, soak: int) -> int:
    return soak if SOAK else ci


# -- figures ---------------------------------------------------------------------------------------------


@dataclass
class Figures:
    """One scenario's outcome, as `make soak` prints it. Counts of what went wrong are 0 in a passing run;
    they are recorded before the test asserts on them, so a failing soak still prints its numbers."""

    scenario: str
    runs: int = 0
    """Daemon processes started."""
    kills: int = 0
    files: int = 0
    bytes: int = 0
    duplicates: int = 0
    """Remote files beyond one per expected (md5, purpose), strays included."""
    lost: int = 0
    """Local files without their (md5, purpose) remotely, or whose manifest row is not synced to it."""
    wrong_bytes: int = 0
    wrong_deletions: int = 0
    """Remote files deleted that a live local file (or another client) still needed."""
    seconds: float = 0.0
    clean_seconds: float | None = None
    """The same work without faults, for the time ratio."""
    windows: dict[str, int] = field(default_factory=dict)
    """Kills per window, decided from what the manifest, the daemon's open files and the server showed."""
    test: str = field(default_factory=lambda: os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0])
    """The pytest node id that measured it (its outcome is the table's result)."""

    def record(self) -> None:
        path = os.environ.get(REPORT_ENV)
        if path:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(asdict(self)) + "\n")


# -- local files -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalFile:
    relpath: str
    size: int
    md5: str
    purpose: str


_BLOCK = random.Random(20261202).randbytes(MiB)
"""Filler shared by every generated file; a unique header makes each file's md5 unique."""


def content(tag: str, size: int) -> bytes:
    """``size`` bytes that no other tag produces (its header), cheap to make at any size."""
    head = f"{tag}\n".encode()
    body = bytearray(head[:size])
    while len(body) < size:
        body += _BLOCK[: size - len(body)]
    return bytes(body)


def write_file(root: Path, relpath: str, data: bytes, purpose: str) -> LocalFile:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return LocalFile(relpath, len(data), hashlib.md5(data).hexdigest(), purpose)


def mixed_sizes(count: int, rng: random.Random) -> list[int]:
    """The issue's mix: 90% under 1 MiB, 8% of 1-8 MiB, 2% of 33-40 MiB (over the 32 MiB presigned
    threshold), at least one of each; shuffled."""
    big = max(1, round(count * 0.02))
    medium = max(1, round(count * 0.08))
    small = count - big - medium
    sizes = [rng.randrange(0, MiB) for _ in range(small)]
    sizes += [rng.randrange(MiB, 8 * MiB) for _ in range(medium)]
    sizes += [rng.randrange(33 * MiB, 40 * MiB) for _ in range(big)]
    rng.shuffle(sizes)
    return sizes


# -- the daemon's config -----------------------------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def write_config(
    w: Syncd,
    *,
    remote: Mapping[str, object] | None = None,
    watch: Mapping[str, object] | None = None,
    rules: Iterable[tuple[str, str]] = (("scans/**", "vision"),),
    reconcile: Mapping[str, object] | None = None,
) -> None:
    """The workspace's config with syncd's own defaults except where given (Syncd.configure pins many)."""
    sections: list[tuple[str, Mapping[str, object]]] = [
        ("[remote]", {"base_url": w.server.base_url, **(remote or {})}),
        ("[state]", {"dir": str(w.state_dir)}),
        ("[log]", {"format": "json", "level": "debug"}),
        ("[reconcile]", dict(reconcile or {})),
        ("[[watch]]", {"path": str(w.root), "settle_seconds": 0.3, **(watch or {})}),
    ]
    lines: list[str] = []
    for header, values in sections:
        lines.append(header)
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    for pattern, purpose in rules:
        lines += ["[[watch.rules]]", f"pattern = {json.dumps(pattern)}", f"purpose = {json.dumps(purpose)}"]
    w.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- reference servers that outlive one run ------------------------------------------------------------------


class Seat:
    """One server address, key and data dir, served by a fresh in-process server whenever started, with
    other fault settings each time (the crash harness widens a different window per kill)."""

    def __init__(self, data_dir: Path, api_key: str, port: int) -> None:
        self.data_dir = data_dir
        self.api_key = api_key
        self.port = port
        self._stack: ExitStack | None = None
        self.totals: Counter[str] = Counter()
        self._server: RunningServer | None = None

    def start(self, **overrides: Any) -> RunningServer:
        assert self._stack is None, "already serving"
        settings = ServerSettings(data_dir=self.data_dir, api_key=self.api_key, port=self.port, **overrides)
        self._stack = ExitStack()
        self._server = self._stack.enter_context(running_server(settings))
        return self._server

    def stop(self) -> None:
        if self._stack is not None and self._server is not None:
            self._stack.close()  # requests in flight finish first: count them too
            self.totals.update(self._server.stats.snapshot())
        self._stack = self._server = None


class ServerProcess:
    """`syncd serve` as a child process (it can be killed -9 and restarted on the same data dir)."""

    def __init__(self, data_dir: Path, api_key: str, port: int, log: Path) -> None:
        self.data_dir = data_dir
        self.api_key = api_key
        self.port = port
        self.log = log
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VLMRUN_", "SYNCD_"))}
        env["SYNCD_SERVER_API_KEY"] = self.api_key
        argv = [sys.executable, "-m", "syncd", "serve", "--port", str(self.port)]
        argv += ["--data-dir", str(self.data_dir), *args]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)

    def healthy(self) -> bool:
        try:
            response = httpx.get(
                f"{self.base_url}/health", headers={"Authorization": f"Bearer {self.api_key}"}, timeout=2
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()


def server_view(data_dir: Path) -> tuple[set[tuple[str, str]], dict[str, str], set[str]]:
    """What a reference server's data dir shows right now, read from outside: the (md5, purpose) of readable
    files, the filename of each presigned grant still waiting for its PUT (by id), and the ids whose bytes
    are being received (``tmp/<id>.part``)."""
    receiving = {p.name.removesuffix(".part") for p in (data_dir / "tmp").glob("*.part")}
    uri = (data_dir / "files.db").absolute().as_uri() + "?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
        stored = {(m, p) for m, p in db.execute("SELECT md5, purpose FROM files WHERE seq IS NOT NULL")}
        pending = dict(db.execute("SELECT id, filename FROM files WHERE seq IS NULL").fetchall())
    return stored, pending, receiving


# -- the audit -------------------------------------------------------------------------------------------


@dataclass
class Audit:
    duplicates: int
    lost: int
    wrong_bytes: int
    problems: list[str]


def content_md5s(base_url: str, api_key: str, ids: Iterable[str]) -> dict[str, tuple[str, int]]:
    """id → (md5, length) of the bytes the content route serves, streamed."""
    out: dict[str, tuple[str, int]] = {}
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as http:
        for file_id in ids:
            digest = hashlib.md5()
            size = 0
            with http.stream("GET", f"/files/{file_id}/content") as response:
                response.raise_for_status()
                for chunk in response.iter_bytes(MiB):
                    digest.update(chunk)
                    size += len(chunk)
            out[file_id] = (digest.hexdigest(), size)
    return out


def audit(
    w: Syncd,
    local: Iterable[LocalFile],
    *,
    listing: list[dict[str, Any]] | None = None,
    others: Iterable[str] = (),
) -> Audit:
    """Every local file exactly once remotely per (md5, purpose), byte for byte (the content route), and
    its manifest row ``synced`` to that file. ``others``: ids of other clients' files, left out."""
    files = list(local)
    foreign = set(others)
    items = [i for i in (listing if listing is not None else w.remote()) if i["id"] not in foreign]
    expected = {(f.md5, f.purpose) for f in files}
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for item in items:
        by_pair.setdefault((item["md5"], item["purpose"]), []).append(item)
    problems: list[str] = []
    duplicates = 0
    for pair, group in by_pair.items():
        extra = len(group) - 1 if pair in expected else len(group)
        if extra:
            duplicates += extra
            problems.append(f"{extra} extra remote file(s) for {pair}: {[g['filename'] for g in group]}")
    served = content_md5s(w.server.base_url, w.server.api_key, [i["id"] for i in items])
    wrong = {i["id"] for i in items if served[i["id"]] != (i["md5"], i["bytes"])}
    by_id = {i["id"]: i for i in items}
    rows = w.rows()
    lost = 0
    for f in files:
        row = rows.get(f.relpath)
        remote = by_id.get(row.remote_id or "") if row is not None else None
        if (f.md5, f.purpose) not in by_pair:
            lost += 1
            problems.append(f"{f.relpath}: no remote file for {(f.md5, f.purpose)}")
        elif row is None or row.state is not State.SYNCED or remote is None:
            lost += 1
            problems.append(f"{f.relpath}: manifest row {_brief(row)} does not name a listed file")
        elif (remote["md5"], remote["purpose"], remote["bytes"]) != (f.md5, f.purpose, f.size):
            wrong.add(remote["id"])
            problems.append(f"{f.relpath}: row names {remote['id']} holding other content")
    problems += [f"{by_id[i]['filename']} ({i}): served bytes differ from its md5/size" for i in wrong]
    return Audit(duplicates, lost, len(wrong), problems)


def _brief(row: Entry | None) -> str:
    return "none" if row is None else f"{row.state.value} remote_id={row.remote_id}"


# -- the API key -----------------------------------------------------------------------------------------


def files_under(*places: Path) -> Iterator[Path]:
    for place in places:
        if place.is_file():
            yield place
        elif place.is_dir():
            yield from (p for p in place.rglob("*") if p.is_file())


def key_leaks(key: str, places: Iterable[Path], outputs: Iterable[str] = ()) -> list[str]:
    """Where ``key`` shows up: in the bytes of any file under ``places`` (logs, the state dir: manifest,
    its WAL, the live-state file) or in captured command ``outputs`` (status, errors)."""
    needle = key.encode()
    found = [str(p) for p in files_under(*places) if needle in p.read_bytes()]
    found += [f"output {i}" for i, text in enumerate(outputs) if key in text]
    return found
