"""Watch-root health (design §4 guards): the pure verdict over observations, and one real look at a root."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.roots import RootObservation, RootRecord, observe_root, unavailable_reason
from syncd.rules import RootRules, compile_rules

# the pure verdict

devices = st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1))


@st.composite
def observations(draw: st.DrawFn) -> RootObservation:
    exists = draw(st.booleans())
    is_dir = exists and draw(st.booleans())
    return RootObservation(
        exists=exists,
        is_dir=is_dir,
        device=draw(devices) if exists else None,
        inode=draw(devices) if exists else None,
        marker_present=draw(st.sampled_from([None, True, False])),
        has_kept_entry=is_dir and draw(st.booleans()),
    )


records = st.one_of(st.none(), st.builds(RootRecord, device=devices, inode=devices, had_files=st.booleans()))


def healthy(record: RootRecord | None, *, marker: bool | None = None) -> RootObservation:
    """What a root that is exactly where and what the manifest remembers looks like."""
    return RootObservation(
        exists=True,
        is_dir=True,
        device=record.device if record is not None and record.device is not None else 1,
        inode=record.inode if record is not None and record.inode is not None else 2,
        marker_present=marker,
        has_kept_entry=True,
    )


@given(observations(), records)
def test_a_root_is_trusted_only_when_every_guard_passes(
    obs: RootObservation, record: RootRecord | None
) -> None:
    """The guards of design §4, each of which alone holds deletions back."""
    moved = record is not None and record.device is not None and obs.device != record.device
    replaced = record is not None and record.inode is not None and obs.inode != record.inode
    emptied = record is not None and record.had_files and not obs.has_kept_entry
    trusted = (
        obs.exists
        and obs.is_dir
        and obs.marker_present is not False
        and not moved
        and not replaced
        and not emptied
    )
    reason = unavailable_reason(obs, record)
    assert (reason is None) == trusted
    assert reason is None or reason.strip()


@given(records, st.sampled_from([None, True]))
def test_a_root_where_it_was_is_trusted(record: RootRecord | None, marker: bool | None) -> None:
    assert unavailable_reason(healthy(record, marker=marker), record) is None


@given(records)
def test_a_missing_root_is_never_trusted_whatever_the_manifest_remembers(record: RootRecord | None) -> None:
    gone = RootObservation(False, False, None, None, None, False)
    assert unavailable_reason(gone, record) == "root is missing (unmounted or renamed?)"


@given(records)
def test_a_missing_marker_holds_deletions_even_on_a_full_root(record: RootRecord | None) -> None:
    obs = healthy(record, marker=False)
    assert unavailable_reason(obs, record) == "marker file is missing (unmounted share?)"


@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=0, max_value=2**64 - 1))
def test_another_device_than_recorded_means_remounted_or_replaced(recorded: int, seen: int) -> None:
    record = RootRecord(device=recorded, inode=7, had_files=False)
    obs = RootObservation(True, True, seen, 7, None, True)
    assert (unavailable_reason(obs, record) is None) == (recorded == seen)


@pytest.mark.parametrize("had_files", [True, False])
def test_an_empty_root_is_suspicious_only_if_it_held_files(had_files: bool) -> None:
    record = RootRecord(device=1, inode=2, had_files=had_files)
    empty = RootObservation(True, True, 1, 2, None, False)
    reason = unavailable_reason(empty, record)
    assert (reason == "root is empty but held files before (unmounted share?)") is had_files
    assert (reason is None) is not had_files


def test_a_replaced_root_on_the_same_device_is_not_trusted() -> None:
    record = RootRecord(device=1, inode=2, had_files=True)
    recreated = RootObservation(True, True, 1, 99, None, True)
    assert unavailable_reason(recreated, record) is not None


# one real look at a root


def keeps_for(**rules: tuple[str, ...]) -> Callable[[str, bool], bool]:
    """`keeps` as the daemon builds it from a root's compiled rules (ignored dirs and files do not count)."""
    compiled = compile_rules(RootRules(**rules))  # type: ignore[arg-type]
    return lambda name, is_dir: (
        not (compiled.ignores_dir(name) if is_dir else compiled.accepts(name, 0) is not None)
    )


def test_a_missing_root_is_observed_as_missing(tmp_path: Path) -> None:
    obs = observe_root(tmp_path / "unmounted", marker=None, keeps=keeps_for())
    assert obs == RootObservation(False, False, None, None, None, False)
    assert unavailable_reason(obs, None) == "root is missing (unmounted or renamed?)"
    with_marker = observe_root(tmp_path / "unmounted", marker=".syncd-root", keeps=keeps_for())
    assert with_marker.marker_present is False


def test_a_file_where_the_root_should_be_is_not_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "root"
    path.write_bytes(b"not a folder")
    obs = observe_root(path, marker=None, keeps=keeps_for())
    assert obs.exists
    assert not obs.is_dir
    assert not obs.has_kept_entry
    assert unavailable_reason(obs, RootRecord(obs.device, obs.inode, had_files=False)) == (
        "root is not a directory"
    )


def test_the_observation_carries_the_roots_identity(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    st_ = os.stat(root)
    obs = observe_root(root, marker=None, keeps=keeps_for())
    assert (obs.device, obs.inode) == (st_.st_dev, st_.st_ino)
    assert obs.marker_present is None


def test_the_marker_is_looked_for_and_does_not_count_as_content(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()
    record = RootRecord(os.stat(root).st_dev, os.stat(root).st_ino, had_files=True)

    absent = observe_root(root, marker=".syncd-root", keeps=keeps_for())
    assert absent.marker_present is False
    assert unavailable_reason(absent, record) == "marker file is missing (unmounted share?)"

    (root / ".syncd-root").touch()
    only_marker = observe_root(root, marker=".syncd-root", keeps=keeps_for())
    assert only_marker.marker_present is True
    assert not only_marker.has_kept_entry
    assert unavailable_reason(only_marker, record) == "root is empty but held files before (unmounted share?)"

    (root / "invoice.pdf").write_bytes(b"%PDF")
    full = observe_root(root, marker=".syncd-root", keeps=keeps_for())
    assert full.marker_present is True
    assert full.has_kept_entry
    assert unavailable_reason(full, record) is None


def test_a_root_holding_only_ignored_entries_counts_as_empty(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    root.mkdir()
    for name in (".DS_Store", "Thumbs.db", "page.tmp", "upload.filepart", "notes.bak"):
        (root / name).write_bytes(b"x")
    (root / "cache").mkdir()
    (root / "cache" / "kept-but-below-an-ignored-dir.pdf").write_bytes(b"%PDF")
    keeps = keeps_for(ignore=("*.bak", "cache/"))
    record = RootRecord(os.stat(root).st_dev, os.stat(root).st_ino, had_files=True)

    obs = observe_root(root, marker=None, keeps=keeps)
    assert not obs.has_kept_entry
    assert unavailable_reason(obs, record) == "root is empty but held files before (unmounted share?)"

    (root / "2024").mkdir()  # a directory the rules keep counts: files may live below it
    assert observe_root(root, marker=None, keeps=keeps).has_kept_entry


def test_include_globs_decide_what_counts_as_content(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "readme.txt").write_bytes(b"not synced")
    keeps = keeps_for(include=("*.pdf",))
    assert not observe_root(root, marker=None, keeps=keeps).has_kept_entry
    (root / "a.pdf").write_bytes(b"%PDF")
    assert observe_root(root, marker=None, keeps=keeps).has_kept_entry


def test_a_root_that_cannot_be_listed_is_not_trusted_to_be_empty(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any directory whatever its mode")
    root = tmp_path / "locked"
    root.mkdir()
    (root / "a.pdf").write_bytes(b"%PDF")
    root.chmod(0)
    try:
        obs = observe_root(root, marker=None, keeps=keeps_for())
    finally:
        root.chmod(0o755)
    assert obs.exists
    assert obs.is_dir
    assert not obs.has_kept_entry
    assert unavailable_reason(obs, RootRecord(obs.device, obs.inode, had_files=True)) is not None
