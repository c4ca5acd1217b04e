"""The state directory: its layout, the one-process lock, and the daemon's live-state file (design §3).

The manifest lives in the state dir; what changes every few seconds (in-flight depth, crashes, paused and
why) lives in a small JSON file in the runtime directory instead, written atomically, so `status` can show
it even when the state dir cannot be written (disk full, read-only), and an idle daemon writes no SQLite.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

MANIFEST_NAME = "manifest.sqlite3"
LOCK_NAME = "lock"
EMBEDDED_KEY_NAME = "embedded-api-key"
EMBEDDED_SERVER_DIR = "server"
RUNTIME_SUBDIR = "syncd"  # the units' RuntimeDirectory=; $XDG_RUNTIME_DIR/syncd outside systemd


class AlreadyRunning(RuntimeError):
    """Another process holds the state directory's lock."""


class StateError(RuntimeError):
    """The state directory cannot be used as it is (full, read-only, corrupt, from a newer syncd).

    The message is one line naming the directory and what to do. ``transient`` faults (full, read-only)
    go away by themselves or by a fix elsewhere: the daemon pauses and resumes, a one-shot command exits
    1 (systemd may retry it). The others need a person: exit 2, which the units do not restart.
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient
        self.exit_code = 1 if transient else 2


def _no_space(path: Path) -> bool:
    """SQLite reports a write that hit a full disk as a plain "disk I/O error": ask the file system."""
    try:
        return os.statvfs(path).f_bavail == 0
    except OSError:
        return False


def state_error(state_dir: Path, exc: BaseException) -> StateError:
    """The one-line `StateError` for an OS or SQLite failure on the state dir."""
    text = str(exc).lower()
    errno_ = getattr(exc, "errno", None)
    if "full" in text or errno_ == errno.ENOSPC or ("i/o" in text and _no_space(state_dir)):
        return StateError(f"state dir {state_dir}: the disk is full; free some space", transient=True)
    if "readonly" in text or "read-only" in text or errno_ in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StateError(
            f"state dir {state_dir}: cannot be written (read-only or no permission); make it writable",
            transient=True,
        )
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return StateError(
            f"state dir {state_dir}: the manifest is damaged ({exc}); syncd never resets it: move"
            f" {MANIFEST_NAME} aside (a fresh one re-matches every file by md5) or restore it from a backup",
            transient=False,
        )
    return StateError(f"state dir {state_dir}: {exc}; check the disk", transient=True)


class StateLock:
    """Exclusive ``flock`` on ``state_dir/lock`` for the process's lifetime (design §3).

    The kernel drops the lock when the process dies, even by ``kill -9``, so nothing goes stale. The
    holder's PID is written into the file only to name it in the second process's message.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        path = self.state_dir / LOCK_NAME
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise state_error(self.state_dir, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            by = f" by pid {holder}" if holder.isdigit() else ""
            raise AlreadyRunning(
                f"syncd is already running for state dir {self.state_dir} (lock {path} held{by})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def daemon_running(state_dir: Path) -> bool:
    """True when some process holds the state dir's lock (probing with a shared lock changes nothing)."""
    try:
        fd = os.open(state_dir / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


# -- the live-state file ----------------------------------------------------------------------------


@dataclass(slots=True)
class LiveState:
    """What a running daemon is doing now; later issues add fields (readers ignore unknown ones)."""

    pid: int
    state_dir: str
    written_at: float = 0.0
    in_flight: int = 0
    concurrency: int = 0
    crashed: int = 0
    paused: str | None = None
    """Why the daemon takes no work now (the state dir cannot be written), or None."""
    last_reconcile_at: float | None = None
    queues: dict[str, int] = field(default_factory=dict)


def _live_name(state_dir: Path) -> str:
    """One file per state dir, so several instances (syncd@a, syncd@b) share a runtime dir."""
    digest = hashlib.sha256(str(state_dir.absolute()).encode()).hexdigest()[:16]
    return f"live-{digest}.json"


def live_path(state_dir: Path, environ: Mapping[str, str] | None = None) -> Path:
    """Where this process writes its live state: $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/syncd, else the
    state dir (tmpfs first: it is written every few seconds and must not fail when the disk does)."""
    env = os.environ if environ is None else environ
    if env.get("RUNTIME_DIRECTORY"):
        base = Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    elif env.get("XDG_RUNTIME_DIR"):
        base = Path(env["XDG_RUNTIME_DIR"]) / RUNTIME_SUBDIR
    else:
        base = state_dir
    return base / _live_name(state_dir)


def _live_candidates(state_dir: Path, environ: Mapping[str, str]) -> list[Path]:
    """Every place a daemon of this state dir may write to: `status` runs without the daemon's env."""
    name = _live_name(state_dir)
    places = [live_path(state_dir, environ), Path("/run") / RUNTIME_SUBDIR / name, state_dir / name]
    if environ.get("XDG_RUNTIME_DIR"):
        places.append(Path(environ["XDG_RUNTIME_DIR"]) / RUNTIME_SUBDIR / name)
    return list(dict.fromkeys(places))


def write_live(path: Path, live: LiveState, *, now: float | None = None) -> None:
    """Replace the file atomically (temp name, then rename): a reader never sees half a file."""
    live.written_at = time.time() if now is None else now
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".live-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(asdict(live), fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_live(state_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The newest live state a daemon of this state dir left, or None (never ran, or unreadable)."""
    env = os.environ if environ is None else environ
    found: list[dict[str, Any]] = []
    for path in _live_candidates(state_dir, env):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("state_dir") == str(state_dir.absolute()):
            found.append(data)
    return max(found, key=lambda d: float(d.get("written_at") or 0.0), default=None)


def remove_live(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
