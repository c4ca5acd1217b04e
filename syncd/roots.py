"""Watch-root health: is this root safe to believe when files seem to be gone? (design §4 guards)

An unmounted share, a replaced disk or an emptied folder looks exactly like "the user deleted everything".
Before any path of a root counts as deleted, the root must be where it was, on the device it was on, carry
its marker when one is configured, and not be empty while the manifest says it held files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from syncd.rules import CompiledRules


@dataclass(frozen=True)
class RootObservation:
    """What one look at the root's directory found (I/O done by `observe_root`)."""

    exists: bool
    is_dir: bool
    device: int | None
    inode: int | None
    marker_present: bool | None  # None: no marker configured
    has_kept_entry: bool  # any entry the ignore rules keep


@dataclass(frozen=True)
class RootRecord:
    """What the manifest remembers of the root."""

    device: int | None
    inode: int | None
    had_files: bool


def kept_by(rules: CompiledRules) -> Callable[[str, bool], bool]:
    """`keeps` for `observe_root`: does a top-level entry count as content under these rules?"""

    def keeps(name: str, is_dir: bool) -> bool:
        return not (rules.ignores_dir(name) if is_dir else rules.accepts(name, 0) is not None)

    return keeps


def observe_root(path: Path, *, marker: str | None, keeps: Callable[[str, bool], bool]) -> RootObservation:
    """Look at the root once. `keeps(name, is_dir)` says whether the ignore rules keep a top-level entry."""
    try:
        st = os.stat(path)
    except OSError:
        return RootObservation(False, False, None, None, None if marker is None else False, False)
    if not os.path.isdir(path):
        return RootObservation(True, False, st.st_dev, st.st_ino, None if marker is None else False, False)
    marker_present = None if marker is None else (path / marker).exists()
    has_kept = False
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if marker is not None and entry.name == marker:
                    continue
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if keeps(entry.name, is_dir):
                    has_kept = True
                    break
    except OSError:
        return RootObservation(True, True, st.st_dev, st.st_ino, marker_present, False)
    return RootObservation(True, True, st.st_dev, st.st_ino, marker_present, has_kept)


def unavailable_reason(obs: RootObservation, record: RootRecord | None) -> str | None:
    """None when the root may be trusted; otherwise why nothing in it may count as deleted."""
    if not obs.exists:
        return "root is missing (unmounted or renamed?)"
    if not obs.is_dir:
        return "root is not a directory"
    if obs.marker_present is False:
        return "marker file is missing (unmounted share?)"
    if record is not None and record.device is not None and obs.device != record.device:
        return "root is on another device than recorded (remounted or replaced?)"
    if record is not None and record.inode is not None and obs.inode != record.inode:
        return "root is another directory than recorded (replaced or re-created?)"
    if record is not None and record.had_files and not obs.has_kept_entry:
        return "root is empty but held files before (unmounted share?)"
    return None
