"""Shared fixtures: the reference Files API server on 127.0.0.1, a free port, a controllable clock, and
workspaces that run syncd as a real process for the end-to-end tests."""

from __future__ import annotations

import compileall
import hashlib
import json
import os
import pickle
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import httpx
import pytest
from hypothesis import settings

from syncd.api import TRANSPORTS, TransportKind
from syncd.manifest import Entry, Manifest, ManifestMissing, ManifestReader, State
from syncd.server import RunningServer, ServerSettings, running_server
from syncd.server.store import Clock
from syncd.state import StateLock

T = TypeVar("T")

# `make soak` (HYPOTHESIS_PROFILE=soak) runs every property 1,000+ times; CI keeps hypothesis's defaults
# but never fails a test on a slow example (the machine is shared and has 2 cores).
settings.register_profile("ci", deadline=None)
settings.register_profile("soak", max_examples=1000, stateful_step_count=30, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    """The end-to-end tests start syncd hundreds of times: compile it once, not in every process (a
    machine may set PYTHONDONTWRITEBYTECODE, and then nothing caches the bytecode)."""
    compileall.compile_dir(Path(__file__).resolve().parent.parent / "syncd", quiet=1)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started as separate processes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class FakeClock:
    """A wall clock that only moves when told to; call it to read the time."""

    def __init__(self, start: datetime = datetime(2026, 1, 1, tzinfo=UTC)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class ServerFactory(Protocol):
    def __call__(self, *, clock: Clock | None = None, **overrides: Any) -> RunningServer: ...


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def manifest(tmp_path: Path) -> Iterator[Manifest]:
    """A real manifest file in tmp_path, opened under its lock (the writer the daemon holds)."""
    with StateLock(tmp_path / "state") as lock:
        m = Manifest.open(lock)
        yield m
        m.close()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start reference servers (port 0, random key, data dir under tmp_path unless ``data_dir`` is given);
    keyword arguments override :class:`ServerSettings` fields. All are stopped at teardown."""
    with ExitStack() as stack:
        count = 0

        def start(*, clock: Clock | None = None, **overrides: Any) -> RunningServer:
            nonlocal count
            count += 1
            fields: dict[str, Any] = {
                "data_dir": tmp_path / f"server-data-{count}",
                "api_key": secrets.token_urlsafe(16),
                "port": 0,
                **overrides,
            }
            extra = {} if clock is None else {"clock": clock}
            return stack.enter_context(running_server(ServerSettings(**fields), **extra))

        yield start


@pytest.fixture
def server(server_factory: ServerFactory) -> RunningServer:
    """A reference server with default settings."""
    return server_factory()


@pytest.fixture(params=TRANSPORTS)
def transport_kind(request: pytest.FixtureRequest) -> TransportKind:
    """The client's transport: a test taking this runs once per transport, as both must keep every promise."""
    kind: TransportKind = request.param
    return kind


# --- end-to-end: syncd as a real process (tests/test_e2e_*.py) ---------------------------------------

E2E_PURPOSE_RULES = (("training/**/*.jsonl", "fine-tune"), ("scans/**", "vision"))
"""The purpose rules of config.example.toml; a root's default purpose is "assistants"."""


def wait_for(
    predicate: Callable[[], T | Literal[False] | None],
    *,
    timeout: float = 20.0,
    what: str = "condition",
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{diagnose()}" if diagnose is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(0.05)


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def no_dac_override() -> tuple[str, ...]:
    """A command prefix that runs a program as root *without* the capabilities that bypass file
    permissions, so `chmod 000` really denies it; () when not root (chmod already works) or no setpriv."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    return (setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--")


def can_deny_reads(launcher: tuple[str, ...]) -> bool:
    return os.geteuid() != 0 or bool(launcher)


@dataclass
class DaemonProcess:
    """One `syncd run` process; stdout (JSON log lines) and stderr go to files for assertions."""

    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        """Every complete JSON log line so far (a line still being written is left for the next call)."""
        out: list[dict[str, Any]] = []
        text = self.stdout_path.read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n") or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = {"event": line.rstrip("\n"), "unparsed": True}
            out.append(record if isinstance(record, dict) else {"event": str(record), "unparsed": True})
        return out

    def logged(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        """Log records whose event is `event` and whose fields include `fields`."""
        return [
            r
            for r in self.logs()
            if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
        ]

    def tail(self, n: int = 40) -> str:
        lines = self.stdout_path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
        err = self.stderr()[-3000:]
        return "\n".join(["--- daemon stdout (tail) ---", *lines, "--- daemon stderr ---", err])

    def wait_ready(self, timeout: float = 20.0) -> None:
        """The watchers run and the startup scan is queued (the daemon logged "watching")."""
        wait_for(
            lambda: self.logged("watching") or not self.alive(),
            timeout=timeout,
            what="the daemon to log 'watching'",
            diagnose=self.tail,
        )
        assert self.alive(), f"daemon exited early with {self.proc.returncode}\n{self.tail()}"

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM, then the exit code (design §7: drains in-flight uploads and exits 0)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"daemon ignored SIGTERM for {timeout}s\n{self.tail()}")

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Syncd:
    """A workspace for running syncd against `server`: a watch root, a state dir, a config file, and
    helpers to run the CLI, start daemons, and read what the manifest and the server hold."""

    def __init__(self, workdir: Path, server: RunningServer, *, launcher: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.server = server
        self.launcher = launcher
        self.root = workdir / "root"
        self.state_dir = workdir / "state"
        self.config_path = workdir / "syncd.toml"
        self.root.mkdir(parents=True, exist_ok=True)
        self.daemons: list[DaemonProcess] = []
        self.configure()

    def configure(
        self,
        *,
        mode: str = "poll",
        settle: float = 0.3,
        delete_grace: float = 60.0,
        rescan: float = 3600.0,
        rules: tuple[tuple[str, str], ...] = E2E_PURPOSE_RULES,
        concurrency: int = 4,
        retries: int = 2,
    ) -> None:
        lines = [
            "[remote]",
            f"base_url = {json.dumps(self.server.base_url)}",
            f"concurrency = {concurrency}",
            f"retries = {retries}",
            "timeout = 10.0",
            "[state]",
            f"dir = {json.dumps(str(self.state_dir))}",
            "[log]",
            'format = "json"',
            'level = "debug"',
            "[[watch]]",
            f"path = {json.dumps(str(self.root))}",
            'purpose = "assistants"',
            f'mode = "{mode}"',
            f"settle_seconds = {settle}",
            f"settle_max_seconds = {max(30.0, settle)}",
            f"delete_grace_seconds = {delete_grace}",
            f"rescan_interval = {rescan}",
        ]
        for pattern, purpose in rules:
            lines += [
                "[[watch.rules]]",
                f"pattern = {json.dumps(pattern)}",
                f"purpose = {json.dumps(purpose)}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def env(self) -> dict[str, str]:
        # Nothing from the caller's environment may point syncd elsewhere (or at systemd).
        inherited = ("VLMRUN_", "SYNCD_", "NOTIFY_SOCKET", "WATCHDOG_", "STATE_DIRECTORY", "CREDENTIALS_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
        env.update(VLMRUN_API_KEY=self.server.api_key, PYTHONUNBUFFERED="1")
        return env

    def argv(self, *args: str) -> list[str]:
        return [*self.launcher, sys.executable, "-m", "syncd", *args, "--config", str(self.config_path)]

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run one syncd command to completion (stdout: JSON log lines or command output)."""
        return subprocess.run(
            self.argv(*args), env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
        )

    def sync_once(self, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return self.cli("sync", "--once", timeout=timeout)

    def status(self) -> dict[str, Any]:
        done = self.cli("status", "--json", timeout=30)
        assert done.returncode == 0, done.stderr
        report: dict[str, Any] = json.loads(done.stdout)
        return report

    def start(self) -> DaemonProcess:
        """Start `syncd run` in the background; stopped (SIGKILL if still alive) at teardown."""
        n = len(self.daemons)
        out, err = self.workdir / f"daemon-{n}.out", self.workdir / f"daemon-{n}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                self.argv("run"), env=self.env(), stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL
            )
        daemon = DaemonProcess(proc, out, err)
        self.daemons.append(daemon)
        return daemon

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon.alive():
                daemon.kill9()

    # what syncd recorded

    def rows(self) -> dict[str, Entry]:
        """relpath → manifest row (one root per workspace); {} before the manifest exists.

        A daemon that is starting has created the file but not yet migrated it: also {}.
        """
        try:
            with ManifestReader.open_readonly(self.state_dir) as reader:
                return {e.relpath: e for e in reader.iter_all()}
        except (ManifestMissing, sqlite3.OperationalError):
            return {}

    def synced(self, *relpaths: str, md5: dict[str, str] | None = None) -> dict[str, Entry] | None:
        """The rows of `relpaths` when every one is `synced` (with the given md5s, if any), else None."""
        rows = self.rows()
        want = md5 or {}
        got = {p: rows[p] for p in relpaths if p in rows}
        if len(got) != len(relpaths):
            return None
        for path, entry in got.items():
            if entry.state is not State.SYNCED or (path in want and entry.md5 != want[path]):
                return None
        return got

    def wait_synced(
        self,
        *relpaths: str,
        md5: dict[str, str] | None = None,
        timeout: float = 20.0,
        daemon: DaemonProcess | None = None,
    ) -> dict[str, Entry]:
        def diagnose() -> str:
            rows = self.rows()
            states = {p: (rows[p].state.value, rows[p].last_error) if p in rows else None for p in relpaths}
            return f"rows: {states}" + (f"\n{daemon.tail()}" if daemon is not None else "")

        def check() -> dict[str, Entry] | None:
            if daemon is not None and not daemon.alive():
                pytest.fail(f"the daemon exited with {daemon.proc.returncode}\n{diagnose()}")
            return self.synced(*relpaths, md5=md5)

        return wait_for(check, timeout=timeout, what=f"{', '.join(relpaths)} synced", diagnose=diagnose)

    # what the server holds

    def remote(self) -> list[dict[str, Any]]:
        """Every remote file (paged like the public API: skip/limit until a short page)."""
        items: list[dict[str, Any]] = []
        headers = {"Authorization": f"Bearer {self.server.api_key}"}
        with httpx.Client(base_url=self.server.base_url, headers=headers, timeout=30) as http:
            while True:
                page = http.get("/files", params={"skip": len(items), "limit": 1000})
                page.raise_for_status()
                batch: list[dict[str, Any]] = page.json()
                items += batch
                if len(batch) < 1000:
                    return items

    def content(self, remote_id: str) -> bytes:
        headers = {"Authorization": f"Bearer {self.server.api_key}"}
        response = httpx.get(f"{self.server.base_url}/files/{remote_id}/content", headers=headers, timeout=30)
        response.raise_for_status()
        return response.content


@pytest.fixture
def syncd_factory(tmp_path: Path) -> Iterator[Callable[..., Syncd]]:
    """Make `Syncd` workspaces under tmp_path: `make(server, name="w", launcher=())`."""
    made: list[Syncd] = []

    def make(server: RunningServer, name: str = "w", launcher: tuple[str, ...] = ()) -> Syncd:
        workspace = Syncd(tmp_path / name, server, launcher=launcher)
        made.append(workspace)
        return workspace

    yield make
    for workspace in made:
        workspace.close()


# running code as an unprivileged user (the suite runs as root, which ignores permission bits)


def as_nobody(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a forked child that dropped root, so permission bits apply to it."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            with os.fdopen(write_end, "wb") as out:
                pickle.dump(fn(), out)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0, "child failed"
    result: T = pickle.loads(data)
    return result


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="syncd-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)
