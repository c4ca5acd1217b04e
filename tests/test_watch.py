"""The watcher on real directories, with inotify and with polling: hints arrive, no fixed sleeps."""

from __future__ import annotations

import asyncio
import os
import pickle
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from structlog.testing import capture_logs

from syncd.plan import PathHint
from syncd.watch import InotifyLimitError, Watcher, WatchMode, WatchRoot

T = TypeVar("T")
POLL = 0.05  # poll interval in tests
TIMEOUT = 5.0  # how long a hint may take to arrive before the test fails


def _ignores_dir(rel: str) -> bool:
    return rel.rpartition("/")[2] == "node_modules"


def _wanted(rel: str, size: int) -> bool:
    return not rel.endswith((".filepart", ".tmp"))


@dataclass
class Watching:
    root: Path
    hints: asyncio.Queue[PathHint]
    watcher: Watcher
    rescans: list[int] = field(default_factory=list)
    seen: list[PathHint] = field(default_factory=list)

    async def until(self, done: Callable[[list[PathHint]], bool], within: float = TIMEOUT) -> list[PathHint]:
        """Collect hints until ``done(all hints so far)``; fail after ``within`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not done(self.seen):
            remaining = deadline - loop.time()
            try:
                self.seen.append(await asyncio.wait_for(self.hints.get(), max(remaining, 0.0)))
            except TimeoutError:
                raise AssertionError(f"timed out; hints so far: {self.seen}") from None
        return self.seen

    async def until_rescan(self, within: float = TIMEOUT) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not self.rescans:
            assert loop.time() < deadline, "no rescan requested"
            await asyncio.sleep(0.01)


@asynccontextmanager
async def watching(root: Path, mode: WatchMode, *, maxsize: int = 1000) -> AsyncIterator[Watching]:
    hints: asyncio.Queue[PathHint] = asyncio.Queue(maxsize=maxsize)
    rescans: list[int] = []
    watcher = Watcher(
        [WatchRoot(str(root), mode, ignores_dir=_ignores_dir, wanted=_wanted)],
        loop=asyncio.get_running_loop(),
        hints=hints,
        request_rescan=rescans.append,
        poll_interval=POLL,
    )
    watcher.start()
    try:
        yield Watching(root, hints, watcher, rescans)
    finally:
        watcher.stop()


def has(rel: str, *kinds: str) -> Callable[[list[PathHint]], bool]:
    return lambda seen: any(h.relpath == rel and h.kind in kinds for h in seen)


MODES: list[WatchMode] = ["inotify", "poll"]


@pytest.mark.parametrize("mode", MODES)
def test_create_write_close_then_delete(tmp_path: Path, mode: WatchMode) -> None:
    async def main() -> None:
        async with watching(tmp_path, mode) as w:
            assert w.watcher.modes == [mode]
            with (tmp_path / "scan.pdf").open("wb") as f:
                f.write(b"page 1")
            await w.until(has("scan.pdf", "closed" if mode == "inotify" else "scanned"))
            (tmp_path / "scan.pdf").unlink()
            await w.until(has("scan.pdf", "deleted"))
            assert {h.root_index for h in w.seen} == {0}

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_renames_into_and_within_the_root(tmp_path: Path, mode: WatchMode) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.pdf"
    outside.write_bytes(b"from elsewhere")

    async def main() -> None:
        async with watching(root, mode) as w:
            os.rename(outside, root / "arrived.pdf")
            # inotify: a rename from an unwatched place is reported as a create.
            await w.until(has("arrived.pdf", "created", "scanned"))
            os.rename(root / "arrived.pdf", root / "renamed.pdf")
            await w.until(has("arrived.pdf", "deleted"))
            await w.until(has("renamed.pdf", "moved_in", "scanned"))

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_hard_link_from_a_filepart_is_a_create(tmp_path: Path, mode: WatchMode) -> None:
    async def main() -> None:
        async with watching(tmp_path, mode) as w:
            part = tmp_path / "upload.pdf.filepart"
            part.write_bytes(b"all the bytes")
            os.link(part, tmp_path / "upload.pdf")
            part.unlink()
            await w.until(has("upload.pdf", "created", "scanned"))
            (tmp_path / "sentinel").touch()
            seen = await w.until(has("sentinel", "closed", "scanned", "created"))
            assert not [h for h in seen if h.relpath.endswith(".filepart")]

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_mkdir_p_then_an_immediate_file_is_covered_by_a_rescan(tmp_path: Path, mode: WatchMode) -> None:
    async def main() -> None:
        async with watching(tmp_path, mode) as w:
            (tmp_path / "a" / "b" / "c").mkdir(parents=True)
            (tmp_path / "a" / "b" / "c" / "page.tif").write_bytes(b"scanned at once")
            seen = await w.until(has("a", "rescan"))
            assert all(h.kind == "rescan" for h in seen if h.relpath in ("a", "a/b", "a/b/c"))

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_ignored_directories_produce_no_hints(tmp_path: Path, mode: WatchMode) -> None:
    (tmp_path / "node_modules" / "pkg").mkdir(parents=True)

    async def main() -> None:
        async with watching(tmp_path, mode) as w:
            (tmp_path / "node_modules" / "pkg" / "index.js").write_bytes(b"x")
            (tmp_path / "node_modules" / "new").mkdir()
            (tmp_path / "kept.txt").write_bytes(b"y")
            seen = await w.until(has("kept.txt", "closed", "scanned"))
            assert not [h for h in seen if "node_modules" in h.relpath]

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_directory_moved_away_is_a_rescan_of_it(tmp_path: Path, mode: WatchMode) -> None:
    root = tmp_path / "root"
    (root / "album").mkdir(parents=True)
    (root / "album" / "p1.jpg").write_bytes(b"1")

    async def main() -> None:
        async with watching(root, mode) as w:
            os.rename(root / "album", tmp_path / "album")
            await w.until(has("album", "rescan"))

    asyncio.run(main())


def test_a_full_hint_queue_drops_hints_and_requests_a_rescan(tmp_path: Path) -> None:
    async def main() -> None:
        async with watching(tmp_path, "inotify", maxsize=1) as w:
            for i in range(5):
                (tmp_path / f"f{i}").write_bytes(b"x")
            await w.until_rescan()
            assert w.rescans[0] == 0
            assert w.hints.qsize() == 1

    asyncio.run(main())


def test_kernel_queue_overflow_requests_a_rescan_of_the_root(tmp_path: Path) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 200_000:
        pytest.skip(f"max_queued_events={limit}: too many events to overflow in a test")

    async def main() -> None:
        # A hint queue that cannot fill up: the rescan must come from the overflow itself.
        async with watching(tmp_path, "inotify", maxsize=4 * limit) as w:
            # Stall watchdog's reader (it takes this lock after each read) so the kernel
            # queue fills up; alternate two files so consecutive events are not coalesced.
            inotify_fd = w.watcher._observers[0]._inotify_fd  # type: ignore[attr-defined]
            with inotify_fd._lock:
                fds = [os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT) for name in ("a", "b")]
                try:
                    # The reader may take one buffer (up to 2,048 events) before it blocks on the
                    # lock: twice the kernel's limit overflows the queue whatever the timing.
                    for i in range(2 * limit):
                        os.write(fds[i % 2], b"x")
                finally:
                    for fd in fds:
                        os.close(fd)
            await w.until_rescan(within=20)
            assert w.rescans[0] == 0

    asyncio.run(main())


def _in_child_as_nobody(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a forked child running as "nobody", whose inotify limits we may exhaust."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
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


def test_out_of_inotify_instances_auto_falls_back_to_polling_and_inotify_fails_clearly() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to exhaust the inotify instances of an otherwise idle user")
    from watchdog.observers.inotify_c import inotify_init

    root = Path("/tmp")  # readable by "nobody"; nothing is written there

    def child() -> tuple[list[str], list[str], str]:
        held = []
        while (fd := inotify_init()) != -1:  # use up this user's inotify instances
            held.append(fd)

        async def main() -> tuple[list[str], list[str], str]:
            loop = asyncio.get_running_loop()
            hints: asyncio.Queue[PathHint] = asyncio.Queue(maxsize=10)
            with capture_logs() as logs:
                auto = Watcher(
                    [WatchRoot(str(root), "auto", recursive=False)],
                    loop=loop,
                    hints=hints,
                    request_rescan=lambda i: None,
                    poll_interval=POLL,
                )
                auto.start()
                auto.stop()
            strict = Watcher(
                [WatchRoot(str(root), "inotify", recursive=False)],
                loop=loop,
                hints=hints,
                request_rescan=lambda i: None,
            )
            try:
                strict.start()
                error = ""
            except InotifyLimitError as exc:
                error = str(exc)
            return list(auto.modes), [str(e["event"]) for e in logs if e["log_level"] == "warning"], error

        return asyncio.run(main())

    modes, warnings, error = _in_child_as_nobody(child)
    assert modes == ["poll"]
    assert len(warnings) == 1
    assert "fs.inotify.max_user_instances" in warnings[0]
    assert "polling" in warnings[0]
    assert "fs.inotify.max_user_instances" in error
    assert "\n" not in error
