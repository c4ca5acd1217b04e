"""Which paths under a watch root are synced, and with which purpose (pure, no I/O).

Paths are POSIX relpaths relative to the watch root (``"scans/2024/a.pdf"``), as the scanner and the
watcher produce them. All globs use git's ignore semantics (pathspec's ``GitIgnoreSpec``): a pattern
without a slash matches at any depth, one with a slash is anchored at the root, ``dir/`` matches a
directory and everything below it, and later patterns (including ``!negations``) override earlier ones.

Choices (design §6 is silent on them):
- ``DEFAULT_IGNORE`` always applies first and the watch's own ``ignore`` patterns follow it, so adding
  ``*.bak`` never starts uploading ``.part`` files; a user who really wants ``Thumbs.db`` writes
  ``!Thumbs.db``.
- As in git, a file below an ignored directory stays ignored even if a later ``!pattern`` names it:
  the walk never descends there, so accepting it from a watcher event would make results depend on
  how the path was discovered.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pathspec import GitIgnoreSpec

DEFAULT_IGNORE: tuple[str, ...] = (
    "*.tmp",
    "*.part",
    "*.filepart",
    "*.crdownload",
    "~$*",
    ".~lock.*",
    ".DS_Store",
    "._*",
    "Thumbs.db",
)
"""Scanner, browser and editor temp files: half-written or meaningless on their own."""

DEFAULT_PURPOSE = "assistants"
"""Purpose when neither a rule nor the watch names one (the Files API's own default)."""

IGNORED = "ignored"
NOT_INCLUDED = "not included"
TOO_LARGE = "too large"

_DIR_CACHE_SIZE = 16384
"""Directories are far fewer than files; caching their verdicts keeps per-file checks to one match."""


@dataclass(frozen=True)
class PurposeRule:
    """``[[watch.rules]]``: files matching ``pattern`` are uploaded with ``purpose``."""

    pattern: str
    purpose: str


@dataclass(frozen=True)
class RootRules:
    """The rule part of one ``[[watch]]`` table, as plain data."""

    ignore: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    max_file_size: int | None = None
    purpose_rules: tuple[PurposeRule, ...] = ()
    default_purpose: str | None = None


class CompiledRules:
    """Compiled form of ``RootRules``; build once per root with ``compile_rules``."""

    __slots__ = (
        "_dir_ignored",
        "_ignore",
        "_include",
        "_max_file_size",
        "_purposes",
        "default_purpose",
        "fingerprint",
    )

    def __init__(
        self,
        ignore: GitIgnoreSpec,
        include: GitIgnoreSpec | None,
        max_file_size: int | None,
        purposes: Sequence[tuple[GitIgnoreSpec, str]],
        default_purpose: str,
        fingerprint: str = "",
    ) -> None:
        self._ignore = _fast(ignore)
        self._include = include
        self._max_file_size = max_file_size
        self._purposes = tuple(purposes)
        self.default_purpose = default_purpose
        # Identifies the rules: while it is unchanged, a rescan trusts that a file the manifest knows
        # unchanged is still accepted and keeps its purpose (no glob matched per unchanged file).
        self.fingerprint = fingerprint
        self._dir_ignored = functools.lru_cache(maxsize=_DIR_CACHE_SIZE)(self._dir_ignored_uncached)

    def _dir_ignored_uncached(self, reldir: str) -> bool:
        reldir = _matchable(reldir)
        parent, sep, _ = reldir.rpartition("/")
        if sep and self._dir_ignored(parent):
            return True
        return self._ignore(reldir + "/")

    def ignores_dir(self, relpath: str) -> bool:
        """True when the walk must not descend into this directory (it or an ancestor is ignored).

        Include globs never exclude a directory: ``include = ["*.pdf"]`` must still find PDFs below.
        """
        return self._dir_ignored(relpath.strip("/"))

    def accepts(self, relpath: str, size: int) -> str | None:
        """None when the file is synced, else a short reason ("ignored", "not included", "too large")."""
        relpath = _matchable(relpath)
        parent, sep, _ = relpath.rpartition("/")
        if (sep and self._dir_ignored(parent)) or self._ignore(relpath):
            return IGNORED
        if self._include is not None and not self._include.match_file(relpath):
            return NOT_INCLUDED
        if self._max_file_size is not None and size > self._max_file_size:
            return TOO_LARGE
        return None

    def purpose_for(self, relpath: str) -> str:
        """The first matching rule's purpose, else the watch's purpose, else ``DEFAULT_PURPOSE``."""
        relpath = _matchable(relpath)
        for spec, purpose in self._purposes:
            if spec.match_file(relpath):
                return purpose
        return self.default_purpose


_GROUP_NAME = re.compile(r"\(\?P<\w+>")


def _fast(spec: GitIgnoreSpec) -> Callable[[str], bool]:
    """``spec.match_file`` as one regex when no pattern is a negation (the defaults, most configs).

    Without negations, gitignore semantics reduce to "any pattern matches"; one alternation is ~3x
    faster than pathspec's loop over the patterns (measured on a 100,000-file no-change pass, where
    this check is a third of the walk's cost). With a negation, order matters: pathspec decides.
    """
    regexes = [getattr(p, "regex", None) for p in spec.patterns if p.include is not None]
    if any(p.include is False for p in spec.patterns) or any(r is None for r in regexes):
        return spec.match_file
    if not regexes:
        return lambda relpath: False
    combined = re.compile("|".join(f"(?:{_GROUP_NAME.sub('(?:', r.pattern)})" for r in regexes if r))
    return lambda relpath: combined.match(relpath) is not None


def _matchable(relpath: str) -> str:
    """pathspec's regexes use ``.`` without DOTALL, so a newline (legal in Linux names) would stop
    ``**`` and ``dir/`` from matching. No glob can contain a newline or NUL, so NUL stands in for it.
    """
    return relpath.replace("\n", "\x00") if "\n" in relpath else relpath


def _single_pattern(pattern: str, what: str = "purpose rule pattern") -> GitIgnoreSpec:
    """A purpose rule is one positive glob: a comment, blank or ``!negation`` would never match."""
    spec = GitIgnoreSpec.from_lines([pattern])
    if len(spec.patterns) != 1 or spec.patterns[0].include is not True:
        raise ValueError(f"{what} {pattern!r} is not a positive gitignore-style glob")
    return spec


def matcher(pattern: str) -> Callable[[str], bool]:
    """One positive gitignore-style glob (a hook's ``pattern``) as a relpath predicate; ValueError if it can
    never match."""
    spec = _single_pattern(pattern, "pattern")
    return lambda relpath: spec.match_file(_matchable(relpath))


def compile_rules(rules: RootRules) -> CompiledRules:
    """Compile a root's rules; raises ValueError naming a purpose pattern that can never match."""
    if rules.max_file_size is not None and rules.max_file_size < 0:
        raise ValueError(f"max_file_size must be >= 0, got {rules.max_file_size}")
    ignore = GitIgnoreSpec.from_lines([*DEFAULT_IGNORE, *rules.ignore])
    include = GitIgnoreSpec.from_lines(list(rules.include)) if rules.include else None
    purposes = [(_single_pattern(rule.pattern), rule.purpose) for rule in rules.purpose_rules]
    return CompiledRules(
        ignore,
        include,
        rules.max_file_size,
        purposes,
        rules.default_purpose or DEFAULT_PURPOSE,
        repr((DEFAULT_IGNORE, rules)),
    )
