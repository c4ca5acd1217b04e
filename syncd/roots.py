"""Watch-root health: is this root safe to believe when files seem to be gone? (design §4 guards)

An unmounted share, a replaced disk or an emptied folder looks exactly like "the user deleted everything".
Before any path of a root counts as deleted, the root must be where it was, on the device it was on, carry
its marker when one is configured, and not be empty while the manifest says it held files.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from syncd.config import Config, ConfigError, WatchConfig
from syncd.manifest import FileKey, Manifest
from syncd.rules import CompiledRules, PurposeRule, RootRules, compile_rules

log = structlog.get_logger("syncd.roots")


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


# -- the configured roots and what the manifest knows of them -------------------------------------


@dataclass(frozen=True, slots=True)
class Root:
    """One configured `[[watch]]` root, its rules compiled once."""

    index: int
    path: Path
    watch: WatchConfig
    rules: CompiledRules


def build_roots(config: Config) -> list[Root]:
    """Compile every root's rules; a bad pattern is a config error naming the root."""
    roots = []
    for index, watch in enumerate(config.watch):
        try:
            rules = compile_rules(
                RootRules(
                    ignore=watch.ignore,
                    include=watch.include,
                    max_file_size=watch.max_file_size or None,
                    purpose_rules=tuple(PurposeRule(r.pattern, r.purpose) for r in watch.rules),
                    default_purpose=watch.purpose,
                )
            )
        except ValueError as exc:
            raise ConfigError(f"{config.source}: watch[{index}].rules: {exc}") from None
        roots.append(Root(index, watch.path, watch, rules))
    return roots


def file_filter(root: Root) -> Callable[[str, int], bool]:
    """The files of a root that are synced: what the rules accept, never the root's marker file."""
    accepts = root.rules.accepts
    marker = root.watch.marker
    return lambda relpath, size: relpath != marker and accepts(relpath, size) is None


class RootTable:
    """The one record of each root's manifest id and health, shared by every stage and command.

    A root that is missing, replaced, emptied or without its marker is *unavailable*: it is not scanned
    (Syncthing stops such a folder), none of its rows count as deleted (the reconciler's guard), and
    `status` shows why through a note. ``confirm`` (`reconcile --once --confirm`) accepts a root's new
    identity or emptiness as intended.
    """

    def __init__(self, roots: Sequence[Root], manifest: Manifest, *, confirm: bool = False) -> None:
        self.roots = list(roots)
        self._manifest = manifest
        self._confirm = confirm
        self._ids: dict[int, int] = {}  # Root.index → manifest root_id
        self._by_id: dict[int, Root] = {}
        self.unavailable: dict[int, str] = {}  # root_id → why its rows may not count as deleted
        self.held: dict[str, str] = {}  # root path → why it is not synced now
        self._noted: dict[str, str | None] = {}  # status notes as last written by this process

    def id_of(self, root: Root) -> int | None:
        return self._ids.get(root.index)

    def by_id(self, root_id: int) -> Root | None:
        return self._by_id.get(root_id)

    def path_of(self, key: FileKey) -> Path | None:
        root = self._by_id.get(key.root_id)
        return root.path / key.relpath if root is not None else None

    def is_held(self, root: Root) -> bool:
        return str(root.path) in self.held

    async def refresh(self, root: Root) -> int | None:
        """Look at the root now: its manifest id when it may be synced, else None (and say why once)."""
        obs = await asyncio.to_thread(
            observe_root, root.path, marker=root.watch.marker, keeps=kept_by(root.rules)
        )
        reason = self._judge(root, obs)
        path = str(root.path)
        if reason is None:
            self.held.pop(path, None)
        elif self.held.get(path) != reason:
            log.error("root unavailable: not syncing it", root=path, reason=reason)
            self.held[path] = reason
        self._note(f"root:{path}", reason)
        return None if reason is not None else self._ids[root.index]

    def _judge(self, root: Root, obs: RootObservation) -> str | None:
        known = next((r for r in self._manifest.roots() if r.path == str(root.path)), None)
        if obs.device is None or obs.inode is None or obs.marker_present is False or not obs.is_dir:
            # Never record the identity of what may be an empty mount point.
            absent = unavailable_reason(obs, None) or "root cannot be read"
            if known is not None:
                self.unavailable[known.root_id] = absent
            return absent
        stored = known or self._manifest.ensure_root(str(root.path), device=obs.device, inode=obs.inode)
        self._by_id[stored.root_id] = root
        self._ids[root.index] = stored.root_id
        reason = unavailable_reason(obs, RootRecord(stored.device, stored.inode, stored.had_files))
        if reason is not None and self._confirm:
            log.warning("accepting the root as it is now (--confirm)", root=str(root.path), was=reason)
            self._manifest.set_root_identity(stored.root_id, device=obs.device, inode=obs.inode)
            reason = unavailable_reason(obs, RootRecord(obs.device, obs.inode, had_files=False))
        if reason is None:
            self.unavailable.pop(stored.root_id, None)
        else:
            self.unavailable[stored.root_id] = reason
        return reason

    def _note(self, key: str, text: str | None) -> None:
        """Set or clear a `status` note, writing (and committing) only when it changes: an idle daemon
        re-checks its roots every few seconds and must not write to the manifest each time."""
        if key in self._noted and self._noted[key] == text:
            return
        if text is None:
            self._manifest.clear_note(key)
        else:
            self._manifest.set_note(key, text)
        self._manifest.commit()
        self._noted[key] = text
