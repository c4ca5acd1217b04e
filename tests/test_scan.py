"""The scandir walk on a real tree: records, skips, errors as data, and a speed figure."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TypeVar

import pytest
from conftest import as_nobody

from syncd.scan import FileStat, ScanResult, ScanStats, StatError, stat_path, walk

T = TypeVar("T")


def _write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _files(results: list[ScanResult]) -> dict[str, FileStat]:
    return {r.relpath: r.stat for r in results if r.stat is not None}


def test_walk_yields_regular_files_with_their_stat(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", b"hello")
    _write(tmp_path / "sub" / "deep" / "b.bin", b"")
    _write(tmp_path / "sub" / "c.txt", b"12")

    stats = ScanStats()
    results = list(walk(str(tmp_path), stats=stats))

    files = _files(results)
    assert set(files) == {"a.txt", "sub/deep/b.bin", "sub/c.txt"}
    assert files["a.txt"] == FileStat.from_os(os.stat(tmp_path / "a.txt"))
    assert files["sub/deep/b.bin"].size == 0
    assert all(r.error is None for r in results)
    assert (stats.files, stats.dirs, stats.errors) == (3, 3, 0)


def test_file_stat_from_os_equals_field_by_field_construction(tmp_path: Path) -> None:
    _write(tmp_path / "f", b"abc")
    st = os.stat(tmp_path / "f")
    built = FileStat(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    fast = FileStat.from_os(st)
    assert fast == built
    assert hash(fast) == hash(built)
    with pytest.raises(AttributeError):
        fast.size = 1  # type: ignore[misc]


def test_symlinks_are_never_followed_and_special_files_skipped(tmp_path: Path) -> None:
    _write(tmp_path / "real" / "f.txt")
    (tmp_path / "loop").symlink_to(tmp_path)  # would recurse forever if followed
    (tmp_path / "link.txt").symlink_to(tmp_path / "real" / "f.txt")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "fifo")

    stats = ScanStats()
    results = list(walk(str(tmp_path), stats=stats))

    assert [r.relpath for r in results] == ["real/f.txt"]
    assert stats.symlinks_skipped == 3
    assert stats.special_skipped == 1


def test_ignored_directories_are_not_entered_and_unwanted_files_skipped(tmp_path: Path) -> None:
    _write(tmp_path / "keep" / "a.txt")
    _write(tmp_path / "keep" / "a.tmp")
    _write(tmp_path / "node_modules" / "x" / "y.js")
    _write(tmp_path / "big.bin", b"0123456789")
    entered: list[str] = []

    def ignores_dir(rel: str) -> bool:
        entered.append(rel)
        return rel.endswith("node_modules")

    def wanted(rel: str, size: int) -> bool:
        return not rel.endswith(".tmp") and size < 10

    stats = ScanStats()
    results = list(walk(str(tmp_path), ignores_dir=ignores_dir, wanted=wanted, stats=stats))

    assert sorted(r.relpath for r in results) == ["keep/a.txt"]
    assert "node_modules/x" not in entered  # never descended
    assert (stats.ignored_dirs, stats.ignored_files) == (1, 2)


def test_walk_under_a_subdirectory_gives_root_relative_paths(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "b" / "c.txt")
    _write(tmp_path / "other.txt")
    assert [r.relpath for r in walk(str(tmp_path), under="a/b")] == ["a/b/c.txt"]
    # A subdirectory that is gone holds no files: nothing, not an error.
    assert list(walk(str(tmp_path), under="gone")) == []


def test_missing_root_is_an_error_record_not_an_empty_tree(tmp_path: Path) -> None:
    results = list(walk(str(tmp_path / "unmounted")))
    assert len(results) == 1
    assert results[0].relpath == ""
    assert results[0].stat is None
    assert results[0].error is not None
    assert "ENOENT" in results[0].error
    results = list(walk(str(tmp_path / "unmounted"), under="sub"))
    assert [r.relpath for r in results] == [""]


def test_unreadable_directory_yields_one_error_and_the_walk_goes_on(tmp_path: Path) -> None:
    """As an ordinary user: chmod 000 makes a directory unlistable (root: see the next test)."""
    _write(tmp_path / "ok" / "a.txt")
    locked = tmp_path / "locked"
    _write(locked / "secret.txt")
    locked.chmod(0)
    try:
        if os.geteuid() == 0:
            pytest.skip("root reads mode-000 directories: see the forked-child test")
        stats = ScanStats()
        results = list(walk(str(tmp_path), stats=stats))
        assert _files(results).keys() == {"ok/a.txt"}
        errors = [r for r in results if r.error is not None]
        assert [r.relpath for r in errors] == ["locked"]
        assert stats.errors == 1
    finally:
        locked.chmod(0o755)


def test_unreadable_directory_as_an_unprivileged_user(shared_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    _write(shared_dir / "ok" / "a.txt")
    _write(shared_dir / "locked" / "secret.txt")
    (shared_dir / "locked").chmod(0o700)  # owned by root: "nobody" cannot list it

    def scan() -> tuple[list[tuple[str, bool]], int]:
        stats = ScanStats()
        results = list(walk(str(shared_dir), stats=stats))
        return sorted((r.relpath, r.error is None) for r in results), stats.errors

    assert as_nobody(scan) == ([("locked", False), ("ok/a.txt", True)], 1)


def test_stat_path(tmp_path: Path) -> None:
    _write(tmp_path / "f", b"abc")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    (tmp_path / "d").mkdir()
    st = stat_path(str(tmp_path / "f"))
    assert isinstance(st, FileStat)
    assert st.size == 3
    assert stat_path(str(tmp_path / "missing")) is None
    assert stat_path(str(tmp_path / "link")) is None  # not followed: nothing to sync there
    assert stat_path(str(tmp_path / "d")) is None
    assert stat_path(str(tmp_path / "f" / "under-a-file")) is None
    too_long = stat_path(str(tmp_path / ("x" * 300)))
    assert isinstance(too_long, StatError)
    assert "ENAMETOOLONG" in too_long.error


def test_walk_speed_figure(tmp_path: Path) -> None:
    """Print files/s for a warm walk (not asserted: the machine is shared)."""
    n_dirs, per_dir = 20, 500
    for d in range(n_dirs):
        sub = tmp_path / f"d{d}"
        sub.mkdir()
        for i in range(per_dir):
            (sub / f"f{i}").touch()
    root = str(tmp_path)

    def bare() -> int:
        count = 0
        stack = [root]
        while stack:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    else:
                        e.stat(follow_symlinks=False)
                        count += 1
        return count

    def ours() -> int:
        return sum(1 for _ in walk(root))

    rates = {}
    for name, fn in (("bare scandir+stat", bare), ("syncd.scan.walk", ours)):
        best = 0.0
        for _ in range(3):
            start = time.perf_counter()
            count = fn()
            best = max(best, count / (time.perf_counter() - start))
        assert count == n_dirs * per_dir
        rates[name] = best
    print(
        f"\nwarm walk of {n_dirs * per_dir} files: "
        + ", ".join(f"{k} {v / 1000:.0f}k files/s" for k, v in rates.items())
    )
