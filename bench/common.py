"""What every benchmark shares: the run's options and work dir, reference servers as separate processes,
timed child processes with their peak RSS, tree generation, syncd configs, and checks on the server.

Nothing here asserts a timing. A benchmark raises :class:`BenchError` when a side cannot produce a
trustworthy figure (it failed, timed out, or the server does not hold exactly the expected files); the
runner prints that side as ``n/a (error: ...)`` and goes on with the table.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

PYTHON = sys.executable
FILES_PER_DIR = 1000
SERVER_START_SECONDS = 30.0


class BenchError(Exception):
    """One side of a benchmark has no trustworthy figure; the message says why, in one line."""


@dataclass(frozen=True)
class Row:
    """One line of the printed table. ``met`` is "yes", "no" or "n/a"; figures are text, never asserted."""

    benchmark: str
    syncd: str
    peer: str
    ratio: str
    goal: str
    met: str


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Options:
    quick: bool
    workdir: Path
    latency_ms: int
    concurrency: int | None
    settle_seconds: float
    keep: bool


@dataclass
class Context:
    """Per-run state: options, a counter for fresh directory names, and expensive fixtures shared by
    benchmarks (the 1M-file tree), each with the function that frees it."""

    options: Options
    shared: dict[str, tuple[Any, Callable[[], None]]] = field(default_factory=dict)
    _serial: int = 0

    def release(self, key: str) -> None:
        """Free a shared fixture now (no benchmark left in this run needs it)."""
        entry = self.shared.pop(key, None)
        if entry is not None:
            entry[1]()

    def fresh_dir(self, name: str) -> Path:
        """A new empty directory under the work dir (the name is made unique)."""
        self._serial += 1
        path = self.options.workdir / f"{self._serial:03d}-{name}"
        path.mkdir(parents=True)
        return path


def remove_tree(path: Path) -> None:
    """``rm -rf``: several times faster than ``shutil.rmtree`` on a million files."""
    if path.exists():
        subprocess.run(["rm", "-rf", "--", str(path)], check=False)


# --- reference server -------------------------------------------------------------------------------


class ServerProcess:
    """A fresh reference server in its own process (``bench._server``); its data dir is removed on close."""

    def __init__(self, data_dir: Path, *, latency_ms: int, log: Path) -> None:
        self.data_dir = data_dir
        self.latency_ms = latency_ms
        self.api_key = secrets.token_urlsafe(16)
        env = {**os.environ, "SYNCD_SERVER_API_KEY": self.api_key}
        self._log = log.open("wb")
        self._proc = subprocess.Popen(
            [PYTHON, "-m", "bench._server", "--data-dir", str(data_dir), "--latency-ms", str(latency_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )
        assert self._proc.stdout is not None
        assert self._proc.stdin is not None
        self._stdin = self._proc.stdin
        self._stdout = self._proc.stdout
        first = self._readline(SERVER_START_SECONDS)
        self.base_url: str = json.loads(first)["base_url"]

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _readline(self, timeout: float) -> str:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self._stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            self.close()
            raise BenchError(f"reference server did not answer (log: {self._log.name})")
        return result[0]

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far (to tell which end bounds a figure)."""
        return cpu_seconds(self.pid)

    def stats(self) -> dict[str, int]:
        """The server's request counters so far (attempts per route kind, see ``ServerStats``)."""
        self._stdin.write("stats\n")
        self._stdin.flush()
        counters: dict[str, int] = json.loads(self._readline(10.0))
        return counters

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                self._stdin.close()
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._stdout.close()
        self._log.close()
        remove_tree(self.data_dir)


@contextlib.contextmanager
def server(ctx: Context, name: str, *, latency_ms: int = 0) -> Iterator[ServerProcess]:
    """A fresh server (new data dir, new key) for one side of one benchmark."""
    base = ctx.fresh_dir(f"server-{name}")
    proc = ServerProcess(base / "data", latency_ms=latency_ms, log=base / "server.log")
    try:
        yield proc
    finally:
        proc.close()


HTTP_KINDS = ("health", "lists", "hash_lookups", "gets", "uploads", "presigns", "presigned_puts", "verifies")


def http_calls(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Requests between two stats snapshots, by kind (only kinds that moved)."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {k: v for k, v in delta.items() if v and k != "faults"}


def describe_calls(calls: Mapping[str, int]) -> str:
    if not calls:
        return "0 HTTP calls"
    parts = ", ".join(f"{v:,} {k}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1]))
    return f"{sum(calls.values()):,} HTTP calls ({parts})"


def list_remote(srv: ServerProcess) -> list[dict[str, Any]]:
    """Every file on the server, paging with skip/limit like any client would."""
    items: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {srv.api_key}"}
    with httpx.Client(base_url=srv.base_url, headers=headers, timeout=60.0) as client:
        while True:
            response = client.get("/files", params={"skip": len(items), "limit": 1000})
            response.raise_for_status()
            page: list[dict[str, Any]] = response.json()
            items.extend(page)
            if len(page) < 1000:
                return items


def verify_remote(srv: ServerProcess, expected: Mapping[str, str]) -> None:
    """The server holds exactly one file per expected name, with the expected md5, and nothing else."""
    items = list_remote(srv)
    seen: dict[str, str | None] = {}
    for item in items:
        name = str(item["filename"])
        if name in seen:
            raise BenchError(f"verification: {name} is on the server twice")
        seen[name] = item.get("md5")
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise BenchError(
            f"verification: {len(missing)} of {len(expected)} files missing remotely ({missing[0]}…)"
        )
    extra = sorted(set(seen) - set(expected))
    if extra:
        raise BenchError(f"verification: {len(extra)} unexpected files remotely ({extra[0]}…)")
    wrong = sorted(n for n, md5 in expected.items() if seen[n] != md5)
    if wrong:
        raise BenchError(f"verification: {len(wrong)} files have the wrong md5 remotely ({wrong[0]}…)")


# --- child processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    seconds: float
    returncode: int
    max_rss_kib: int
    cpu_seconds: float
    stdout: Path
    stderr: Path

    def tail(self) -> str:
        """The last meaningful line of stderr (or stdout), for a one-line error."""
        for path in (self.stderr, self.stdout):
            lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
            if lines:
                return lines[-1][:200]
        return "no output"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child: no inherited syncd/VLM Run settings that would override the config."""
    drop = (
        "VLMRUN_BASE_URL",
        "VLMRUN_API_KEY",
        "SYNCD_CONFIG",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def run_timed(argv: list[str], *, logs: Path, env: Mapping[str, str], timeout: float) -> Finished:
    """Run a child to completion; wall time from spawn to exit (process start included) and its peak RSS.

    The peak is the child's ``VmHWM`` as last read from /proc before it exited (sampled every
    ``RSS_SAMPLE`` s). Not ``ru_maxrss``: Linux carries the forking parent's RSS over into the child's
    ``ru_maxrss`` across ``exec``, so every child would look at least as big as this benchmark process.
    """
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / "stdout", logs / "stderr"
    with out.open("wb") as fo, err.open("wb") as fe:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=dict(env))
        killed = threading.Event()
        timer = threading.Timer(timeout, _kill, (proc.pid, killed))
        timer.start()
        sampler = PeakSampler(proc.pid)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            elapsed = time.perf_counter() - start
            timer.cancel()
            peak = sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if killed.is_set():
        raise BenchError(f"timed out after {timeout:.0f}s ({argv[1:4]})")
    return Finished(elapsed, proc.returncode, peak, usage.ru_utime + usage.ru_stime, out, err)


RSS_SAMPLE = 0.01


class PeakSampler:
    """Reads a live process's ``VmHWM`` (peak RSS of its current program) until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                hwm = proc_status(self.pid).get("VmHWM")
                if hwm is not None:
                    self.peak_kib = hwm
            self._stop.wait(RSS_SAMPLE)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kib


def _kill(pid: int, killed: threading.Event) -> None:
    killed.set()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (KiB) of a live process from /proc."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- syncd ----------------------------------------------------------------------------------------------


def write_config(
    path: Path,
    *,
    base_url: str,
    state_dir: Path,
    root: Path,
    settle_seconds: float = 0.0,
    concurrency: int | None = None,
    log_level: str = "warning",
    extra: str = "",
) -> Path:
    """A syncd config for one root. Reconcile is pushed out of the way: benchmarks measure the sync path."""
    remote = f'base_url = "{base_url}"\n'
    if concurrency is not None:
        remote += f"concurrency = {concurrency}\n"
    path.write_text(
        f"[remote]\n{remote}\n"
        f'[state]\ndir = "{state_dir}"\n\n'
        f'[[watch]]\npath = "{root}"\nsettle_seconds = {settle_seconds}\n{extra}\n'
        "[reconcile]\ninterval_seconds = 1e9\nprune_deleted = false\n\n"
        f'[log]\nlevel = "{log_level}"\nformat = "json"\n'
    )
    return path


def syncd_once(
    ctx: Context, srv: ServerProcess, root: Path, *, name: str, timeout: float, log_level: str = "warning"
) -> tuple[Finished, Path]:
    """``python -m syncd sync --once`` into ``srv`` with a fresh state dir; returns the run and the state dir.

    Raises ``BenchError`` unless it exits 0.
    """
    base = ctx.fresh_dir(f"syncd-{name}")
    state = base / "state"
    config = write_config(
        base / "config.toml",
        base_url=srv.base_url,
        state_dir=state,
        root=root,
        concurrency=ctx.options.concurrency,
        log_level=log_level,
    )
    return run_syncd_once(config, srv, logs=base, timeout=timeout), state


def run_syncd_once(config: Path, srv: ServerProcess, *, logs: Path, timeout: float) -> Finished:
    argv = [PYTHON, "-m", "syncd", "sync", "--once", "--config", str(config)]
    done = run_timed(argv, logs=logs, env=clean_env(VLMRUN_API_KEY=srv.api_key), timeout=timeout)
    if done.returncode != 0:
        raise BenchError(f"syncd exited {done.returncode}: {done.tail()}")
    return done


def sync_summary(done: Finished) -> dict[str, Any] | None:
    """The ``sync pass done`` JSON log line of a ``sync --once`` run at log level info, if present."""
    for path in (done.stdout, done.stderr):
        for line in path.read_text(errors="replace").splitlines():
            if '"sync pass done"' in line:
                with contextlib.suppress(ValueError):
                    summary: dict[str, Any] = json.loads(line)
                    return summary
    return None


# --- trees ---------------------------------------------------------------------------------------------

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def file_relpath(index: int, *, per_dir: int = FILES_PER_DIR, suffix: str = ".bin") -> str:
    """Unique names across the tree, so the server listing (names only) maps back to local files."""
    return f"d{index // per_dir:04d}/f{index:07d}{suffix}"


def write_random_files(root: Path, count: int, *, size: int, per_dir: int = FILES_PER_DIR) -> dict[str, str]:
    """``count`` files of ``size`` distinct random bytes; returns file name → md5."""
    expected: dict[str, str] = {}
    made: set[int] = set()
    for i in range(count):
        rel = file_relpath(i, per_dir=per_dir)
        if i // per_dir not in made:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            made.add(i // per_dir)
        data = os.urandom(size)
        fd = os.open(root / rel, _CREATE, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        expected[rel.rpartition("/")[2]] = hashlib.md5(data, usedforsecurity=False).hexdigest()
    return expected


def write_big_file(path: Path, size: int, *, seed: int) -> None:
    """``size`` bytes that differ per ``seed``: a random 16 MiB block rotated per chunk, with a counter.

    md5 and xxh3 speed does not depend on the content, so repeating a random block is as good a
    workload as all-random bytes, at a fraction of the time to produce.
    """
    block = bytearray(os.urandom(16 * MiB))
    view = memoryview(block)
    written = 0
    with path.open("wb", buffering=0) as fh:
        chunk = 0
        while written < size:
            n = min(len(block), size - written)
            block[:16] = f"{seed:08d}{chunk:08d}".encode()
            offset = (chunk * 4099) % n if n > 4099 else 0
            fh.write(view[offset:n])
            fh.write(view[:offset])
            written += n
            chunk += 1


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    buf = bytearray(MiB)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


# --- formatting ------------------------------------------------------------------------------------------


def secs(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def times(value: float) -> str:
    return f"{value:.2f}x"


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


def verdict(ok: bool) -> str:
    return "yes" if ok else "no"


def na(exc: BaseException) -> str:
    return f"n/a (error: {exc})"


# --- the daemon ------------------------------------------------------------------------------------------


class Daemon:
    """``python -m syncd run`` with ``NOTIFY_SOCKET`` on a datagram socket we bind, as systemd would."""

    def __init__(self, config: Path, *, api_key: str, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        name = f"syncd-bench-{os.getpid()}-{secrets.token_hex(4)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind("\0" + name)  # abstract namespace: no path length limit, nothing to clean up
        self.messages: list[str] = []
        self._out = (logs / "stdout").open("wb")
        self._err = (logs / "stderr").open("wb")
        env = clean_env(VLMRUN_API_KEY=api_key, NOTIFY_SOCKET="@" + name)
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "syncd", "run", "--config", str(config)],
            stdout=self._out,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        self._logs = logs

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self) -> str:
        return Finished(0.0, 0, 0, 0.0, self._logs / "stdout", self._logs / "stderr").tail()

    def wait_ready(self, timeout: float) -> float:
        """Seconds from spawn to the READY=1 datagram; BenchError if it exits or never gets there."""
        deadline = self.started + timeout
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise BenchError(f"no READY=1 within {timeout:.0f}s ({self.tail()})")
            self._sock.settimeout(min(remaining, 0.25))
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise BenchError(f"syncd run exited {self.proc.returncode}: {self.tail()}") from None
                continue
            now = time.perf_counter()
            message = data.decode(errors="replace")
            self.messages.append(message)
            if "READY=1" in message.splitlines():
                return now - self.started

    def stop(self, timeout: float = 45.0) -> int:
        """SIGTERM (drain and exit 0 is the contract); SIGKILL after ``timeout``. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._sock.close()
        self._out.close()
        self._err.close()
        return self.proc.returncode
