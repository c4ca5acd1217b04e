"""Walk one watch root with ``os.scandir``: one record per regular file, errors as data.

Modelled on Syncthing's scanner: the walk never stops on a bad entry, it reports it
(``ScanResult(relpath, stat=None, error=...)``) and goes on, so one unreadable directory
cannot hide the rest of the tree and the daemon can tell "unreadable" from "gone".
Symlinks are never followed (no loops, no escaping the root; rclone's default without
``-L``) and non-regular files are skipped; both are counted in ``ScanStats``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from stat import S_ISLNK, S_ISREG
from typing import Any, NamedTuple

# Errors meaning "this path is not there (any more)": a directory removed mid-walk is
# simply gone, not an error the daemon should keep around.
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})


@dataclass(frozen=True, slots=True)
class FileStat:
    """The part of ``stat`` that tells whether a file changed (the manifest's quick check)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def from_os(cls, st: os.stat_result) -> FileStat:
        return _file_stat(st)


# The frozen dataclass ``__init__`` goes through ``object.__setattr__`` per field; setting the
# slots through their descriptors builds the same immutable object in ~60% of the time, which
# is ~20% of a whole warm walk (measured: 265k -> 330k files/s on the 2-core dev box).
_new = object.__new__


def _slot_setter(name: str) -> Callable[[FileStat, int], None]:
    descriptor: Any = vars(FileStat)[name]
    setter: Callable[[FileStat, int], None] = descriptor.__set__
    return setter


_set_size, _set_mtime, _set_ctime, _set_inode, _set_device = (
    _slot_setter(name) for name in ("size", "mtime_ns", "ctime_ns", "inode", "device")
)


def _file_stat(st: os.stat_result) -> FileStat:
    fs: FileStat = _new(FileStat)
    _set_size(fs, st.st_size)
    _set_mtime(fs, st.st_mtime_ns)
    _set_ctime(fs, st.st_ctime_ns)
    _set_inode(fs, st.st_ino)
    _set_device(fs, st.st_dev)
    return fs


@dataclass(frozen=True, slots=True)
class StatError:
    """A path that exists (or may exist) but could not be stat'ed: EACCES, EIO, ESTALE..."""

    error: str


class ScanResult(NamedTuple):
    """One walk record: exactly one of ``stat`` (a regular file) or ``error`` is set.

    ``relpath`` is posix, relative to the root; for a directory error it names the directory
    ("" for the root itself). A NamedTuple rather than a dataclass: it is built once per file
    of every scan, and a tuple is the cheapest immutable record.
    """

    relpath: str
    stat: FileStat | None
    error: str | None


@dataclass(slots=True)
class ScanStats:
    """Counters for one walk, filled in as the generator runs (read them after it is exhausted)."""

    files: int = 0
    dirs: int = 0
    symlinks_skipped: int = 0
    special_skipped: int = 0
    ignored_dirs: int = 0
    ignored_files: int = 0
    errors: int = 0


def describe_os_error(exc: OSError) -> str:
    """`ENOENT: No such file or directory`: the errno name for logs and status, then the text."""
    name = errno.errorcode.get(exc.errno or 0, "EUNKNOWN")
    return f"{name}: {exc.strerror or exc}"


def stat_path(path: str) -> FileStat | StatError | None:
    """Re-stat one path named by a hint, without following a symlink.

    ``None`` means nothing to sync there: the path is missing, or it is not a regular file
    (a symlink, a directory, a FIFO...). Other failures come back as ``StatError``.
    """
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _GONE_ERRNOS:
            return None
        return StatError(describe_os_error(exc))
    if not S_ISREG(st.st_mode):
        return None
    return FileStat.from_os(st)


def walk(
    root: str,
    *,
    under: str = "",
    ignores_dir: Callable[[str], bool] | None = None,
    wanted: Callable[[str, int], bool] | None = None,
    stats: ScanStats | None = None,
    known: Callable[[str, os.stat_result], bool] | None = None,
) -> Iterator[ScanResult]:
    """Yield one ``ScanResult`` per regular file below ``root`` (or below ``root/under``).

    - ``ignores_dir(relpath)``: an ignored directory is skipped without descending into it.
    - ``wanted(relpath, size)``: files it rejects are skipped (counted). Leave it out to get
      every regular file and let the caller decide (e.g. not to treat an ignored file as deleted).
    - ``known(relpath, stat)``: files it answers True for (unchanged since the last scan) are not
      yielded: on a no-change pass no record is built for any file.
    - A missing root yields one error record for ``""`` (a vanished root must never look like
      an empty one); a missing ``under`` directory or a directory removed mid-walk yields
      nothing (its files are gone); an unreadable directory or file yields one error record.

    One ``lstat`` per file (``DirEntry.stat(follow_symlinks=False)``), none per directory.
    The order is depth-first; within a directory, the order ``scandir`` returns.
    """
    counters = stats if stats is not None else ScanStats()
    under = under.strip("/")
    top = os.path.join(root, under) if under else root
    stack: list[tuple[str, str]] = [(top, under)]
    while stack:
        dirpath, dirrel = stack.pop()
        try:
            it = os.scandir(dirpath)
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                if dirpath != top or os.path.isdir(root):
                    continue
                dirrel = ""  # the root itself is missing
            counters.errors += 1
            yield ScanResult(dirrel, None, describe_os_error(exc))
            continue
        counters.dirs += 1
        prefix = dirrel + "/" if dirrel else ""
        subdirs: list[tuple[str, str]] = []
        with it:
            try:
                for entry in it:
                    rel = prefix + entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if ignores_dir is not None and ignores_dir(rel):
                                counters.ignored_dirs += 1
                            else:
                                subdirs.append((entry.path, rel))
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except OSError as exc:
                        if exc.errno not in _GONE_ERRNOS:
                            counters.errors += 1
                            yield ScanResult(rel, None, describe_os_error(exc))
                        continue
                    if not S_ISREG(st.st_mode):
                        if S_ISLNK(st.st_mode):
                            counters.symlinks_skipped += 1
                        else:
                            counters.special_skipped += 1
                        continue
                    if wanted is not None and not wanted(rel, st.st_size):
                        counters.ignored_files += 1
                        continue
                    counters.files += 1
                    if known is not None and known(rel, st):
                        continue
                    yield ScanResult(rel, _file_stat(st), None)
            except OSError as exc:
                # readdir itself failed part-way (EIO, ESTALE): report the directory once.
                counters.errors += 1
                yield ScanResult(dirrel, None, describe_os_error(exc))
        # Reverse so the depth-first order follows scandir's order within each directory.
        stack.extend(reversed(subdirs))
