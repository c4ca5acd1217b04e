"""Ignore/include/size/purpose rules of one watch root (pure; no disk)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.rules import (
    DEFAULT_IGNORE,
    DEFAULT_PURPOSE,
    IGNORED,
    NOT_INCLUDED,
    TOO_LARGE,
    PurposeRule,
    RootRules,
    compile_rules,
)

# A path component: any text without "/" or NUL, not "." or "..", spaces and unicode welcome.
component = st.text(
    alphabet=st.characters(exclude_characters="/\x00", exclude_categories=["Cs"]),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))
dirs = st.lists(component, max_size=4)

TEMP_NAMES: tuple[Callable[[str], str], ...] = (
    lambda s: f"{s}.tmp",
    lambda s: f"{s}.part",
    lambda s: f"{s}.filepart",
    lambda s: f"{s}.crdownload",
    lambda s: f"~${s}",
    lambda s: f".~lock.{s}#",
    lambda s: ".DS_Store",
    lambda s: f"._{s}",
    lambda s: "Thumbs.db",
)

DEFAULTS = compile_rules(RootRules())


def join(parts: list[str], name: str) -> str:
    return "/".join([*parts, name])


def test_default_ignore_is_the_documented_list() -> None:
    assert DEFAULT_IGNORE == (
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


@given(dirs, st.sampled_from(TEMP_NAMES), component, st.integers(0, 10**12))
def test_temp_names_are_never_accepted_at_any_depth(
    parents: list[str], make: Callable[[str], str], stem: str, size: int
) -> None:
    relpath = join(parents, make(stem))
    assert DEFAULTS.accepts(relpath, size) == IGNORED
    user = compile_rules(RootRules(ignore=("*.bak",), include=("*",), max_file_size=10**13))
    assert user.accepts(relpath, size) == IGNORED


@given(dirs, component)
def test_ordinary_names_with_unicode_and_spaces_are_accepted(parents: list[str], stem: str) -> None:
    relpath = join(parents, f"{stem} é ü 文件.pdf")
    if any(DEFAULTS.ignores_dir("/".join(parents[: i + 1])) for i in range(len(parents))):
        return  # a generated directory name happens to be a temp name (e.g. "x.tmp")
    assert DEFAULTS.accepts(relpath, 1) is None
    assert DEFAULTS.purpose_for(relpath) == DEFAULT_PURPOSE


def test_ignored_directory_hides_everything_below_even_from_a_negation() -> None:
    rules = compile_rules(RootRules(ignore=("build/", "!build/keep.txt", "/cache")))
    assert rules.ignores_dir("build")
    assert rules.ignores_dir("src/build")
    assert rules.ignores_dir("build/deep/er")
    assert rules.accepts("build/keep.txt", 1) == IGNORED
    assert rules.accepts("src/build/a.c", 1) == IGNORED
    assert rules.ignores_dir("cache")
    assert not rules.ignores_dir("src/cache")
    assert rules.accepts("src/cache/a", 1) is None
    assert rules.accepts("builder/a.txt", 1) is None


def test_user_negation_can_readmit_a_default() -> None:
    rules = compile_rules(RootRules(ignore=("!Thumbs.db",)))
    assert rules.accepts("pics/Thumbs.db", 5) is None
    assert rules.accepts("pics/x.tmp", 5) == IGNORED


@given(dirs, component)
def test_include_never_excludes_a_directory(parents: list[str], stem: str) -> None:
    rules = compile_rules(RootRules(include=("*.pdf",)))
    reldir = "/".join([*parents, stem])
    assert rules.ignores_dir(reldir) == DEFAULTS.ignores_dir(reldir)


def test_include_limits_files() -> None:
    rules = compile_rules(RootRules(include=("*.pdf", "scans/**", "!scans/private/**")))
    assert rules.accepts("a/b/c.pdf", 1) is None
    assert rules.accepts("scans/page 1.png", 1) is None
    assert rules.accepts("notes.txt", 1) == NOT_INCLUDED
    assert rules.accepts("scans/private/x.png", 1) == NOT_INCLUDED
    assert rules.accepts("a/x.pdf.tmp", 1) == IGNORED


@given(st.integers(0, 10**9), st.integers(0, 10**9))
def test_max_file_size_is_inclusive(limit: int, size: int) -> None:
    rules = compile_rules(RootRules(max_file_size=limit))
    assert rules.accepts("f.bin", size) == (TOO_LARGE if size > limit else None)
    assert compile_rules(RootRules()).accepts("f.bin", size) is None


# Purpose rules: a small vocabulary of gitignore globs, each with an independent oracle.
PATTERNS: dict[str, Callable[[str], bool]] = {
    "*.jsonl": lambda p: p.endswith(".jsonl"),
    "*.pdf": lambda p: p.endswith(".pdf"),
    "scans/**": lambda p: p.startswith("scans/"),
    "training/**/*.jsonl": lambda p: p.startswith("training/") and p.endswith(".jsonl"),
    "/*.png": lambda p: "/" not in p and p.endswith(".png"),
    "a b/": lambda p: p.startswith("a b/"),
    "ünï/**": lambda p: p.startswith("ünï/"),
}
PATHS = [
    d + n
    for d in ("", "scans/", "scans/deep/x/", "training/", "training/2024/", "a b/", "ünï/", "other/")
    for n in ("a.jsonl", "b.pdf", "c d.png", "é.txt")
]
PURPOSES = ("fine-tune", "vision", "batch", "datasets", "assistants")
rule_lists = st.lists(
    st.builds(PurposeRule, st.sampled_from(sorted(PATTERNS)), st.sampled_from(PURPOSES)), max_size=6
)


@given(rule_lists, st.sampled_from(PATHS), st.sampled_from((None, "vision", "batch")))
def test_first_matching_rule_wins(rules: list[PurposeRule], path: str, default: str | None) -> None:
    compiled = compile_rules(RootRules(purpose_rules=tuple(rules), default_purpose=default))
    expected = next((r.purpose for r in rules if PATTERNS[r.pattern](path)), default or DEFAULT_PURPOSE)
    assert compiled.purpose_for(path) == expected


@given(rule_lists, rule_lists, st.sampled_from(PATHS), st.data())
def test_rules_after_the_first_match_do_not_matter(
    rules: list[PurposeRule], others: list[PurposeRule], path: str, data: st.DataObject
) -> None:
    first = next((i for i, r in enumerate(rules) if PATTERNS[r.pattern](path)), None)
    if first is None:
        return
    tail = data.draw(st.permutations(rules[first + 1 :] + others))
    a = compile_rules(RootRules(purpose_rules=tuple(rules)))
    b = compile_rules(RootRules(purpose_rules=(*rules[: first + 1], *tail)))
    assert a.purpose_for(path) == b.purpose_for(path) == rules[first].purpose


def test_documented_examples() -> None:
    rules = compile_rules(
        RootRules(
            purpose_rules=(
                PurposeRule("training/**/*.jsonl", "fine-tune"),
                PurposeRule("scans/**", "vision"),
            ),
            default_purpose="datasets",
        )
    )
    assert rules.purpose_for("training/2024/q1/set.jsonl") == "fine-tune"
    assert rules.purpose_for("training/set.jsonl") == "fine-tune"
    assert rules.purpose_for("x/training/set.jsonl") == "datasets"
    assert rules.purpose_for("scans/2024/page 1.png") == "vision"
    assert rules.purpose_for("notes.md") == "datasets"


@pytest.mark.parametrize("pattern", ["!x.pdf", "# comment", "", "   "])
def test_purpose_pattern_that_cannot_match_is_rejected(pattern: str) -> None:
    with pytest.raises(ValueError, match="purpose rule pattern"):
        compile_rules(RootRules(purpose_rules=(PurposeRule(pattern, "vision"),)))


def test_negative_max_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_file_size"):
        compile_rules(RootRules(max_file_size=-1))
