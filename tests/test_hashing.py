"""One-pass xxh3_128 + md5 on real files: correctness, change detection, unreadable files."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path
from typing import TypeVar

import pytest
import xxhash
from conftest import as_nobody

from syncd.hashing import BUFFER_SIZE, Changed, Digest, Hasher, Unreadable, Vanished, hash_file
from syncd.scan import FileStat

T = TypeVar("T")


def _expected(data: bytes) -> tuple[str, str]:
    return xxhash.xxh3_128(data).hexdigest(), hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_digest_equals_reference_hashes_across_buffer_boundaries(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)

    result = hash_file(str(path), buffer=bytearray(4096))

    assert isinstance(result, Digest)
    assert (result.xxh3, result.md5) == _expected(data)
    assert result.size == size
    assert result.stat == FileStat.from_os(os.stat(path))


def test_hasher_stage_with_default_buffer_and_expected_stat(tmp_path: Path) -> None:
    data = os.urandom(2 * BUFFER_SIZE + 123)
    path = tmp_path / "multi.bin"
    path.write_bytes(data)
    settled = FileStat.from_os(os.stat(path))

    async def main() -> list[object]:
        with Hasher(workers=2) as hasher:
            return list(await asyncio.gather(hasher.hash(str(path), settled), hasher.hash(str(path), None)))

    first, second = asyncio.run(main())
    assert isinstance(first, Digest)
    assert (first.xxh3, first.md5) == _expected(data)
    assert first == second


def test_a_file_that_changed_since_it_settled_is_changed_without_reading(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"v1")
    settled = FileStat.from_os(os.stat(path))
    path.write_bytes(b"v2 longer")

    result = hash_file(str(path), settled)

    assert isinstance(result, Changed)
    assert result.stat is not None
    assert result.stat.size == len(b"v2 longer")


def test_a_file_appended_while_it_is_read_is_changed_never_digested(tmp_path: Path) -> None:
    path = tmp_path / "growing.log"
    path.write_bytes(os.urandom(32 << 20))
    stop = threading.Event()
    started = threading.Event()

    def append() -> None:
        with path.open("ab", buffering=0) as f:
            while not stop.is_set():
                f.write(b"more")
                started.set()

    writer = threading.Thread(target=append)
    writer.start()
    try:
        assert started.wait(5)
        results = [hash_file(str(path), buffer=bytearray(64 << 10)) for _ in range(3)]
    finally:
        stop.set()
        writer.join()
    assert all(isinstance(r, Changed) for r in results), results


def test_a_file_replaced_by_rename_after_it_settled_is_changed(tmp_path: Path) -> None:
    path = tmp_path / "doc.pdf"
    path.write_bytes(b"same bytes")
    settled = FileStat.from_os(os.stat(path))
    tmp = tmp_path / "doc.pdf.tmp"
    tmp.write_bytes(b"same bytes")
    os.replace(tmp, path)  # same content, new inode: not the file that settled

    assert isinstance(hash_file(str(path), settled), Changed)


def test_not_regular_files_are_unreadable_and_missing_ones_vanished(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")

    fifo_result = hash_file(str(fifo))  # must not block waiting for a writer
    assert fifo_result == Unreadable("not a regular file: fifo")
    assert hash_file(str(tmp_path / "dir")) == Unreadable("not a regular file: directory")
    assert hash_file(str(tmp_path / "link")) == Unreadable("not a regular file: symlink")
    assert isinstance(hash_file(str(tmp_path / "missing")), Vanished)
    assert isinstance(hash_file(str(tmp_path / "real" / "below-a-file")), Vanished)


def test_permission_denied_is_unreadable(shared_dir: Path) -> None:
    path = shared_dir / "secret.pdf"
    path.write_bytes(b"private")
    path.chmod(0)
    is_root = os.geteuid() == 0  # root ignores mode 000
    result = as_nobody(lambda: hash_file(str(path))) if is_root else hash_file(str(path))
    assert isinstance(result, Unreadable)
    assert result.reason.startswith("permission denied")


def test_throughput_figure(tmp_path: Path) -> None:
    """Print MB/s for a 256 MiB file with one and two worker threads (not asserted)."""
    size = 256 << 20
    path = tmp_path / "big.bin"
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    hash_file(str(path))  # warm the page cache: measure hashing, not the disk

    async def run(workers: int) -> float:
        with Hasher(workers=workers) as hasher:
            start = time.perf_counter()
            results = await asyncio.gather(*(hasher.hash(str(path)) for _ in range(workers)))
            elapsed = time.perf_counter() - start
        assert all(isinstance(r, Digest) for r in results)
        return workers * size / elapsed / 1e6

    one = asyncio.run(run(1))
    two = asyncio.run(run(2))
    print(f"\nhash 256 MiB (xxh3_128 + md5, one pass): 1 thread {one:.0f} MB/s, 2 threads {two:.0f} MB/s")
