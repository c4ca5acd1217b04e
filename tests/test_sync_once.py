"""`sync --once` in-process against the reference server: rule changes never delete; purposes follow rules."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from syncd.config import Config, parse_config
from syncd.manifest import ManifestReader, State
from syncd.once import sync_once
from syncd.server import RunningServer


def config_for(tmp_path: Path, server: RunningServer, watch: str, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("VLMRUN_API_KEY", server.api_key)
    toml = (
        f'[remote]\nbase_url = "{server.base_url}"\n[state]\ndir = "state"\n{watch}\n'
        '[log]\nlevel = "warning"\n'
    )
    return parse_config(tomllib.loads(toml), source=str(tmp_path / "syncd.toml"), base=tmp_path)


def rows(tmp_path: Path) -> dict[str, tuple[State, str]]:
    with ManifestReader.open_readonly(tmp_path / "state") as reader:
        return {e.relpath: (e.state, e.purpose) for e in reader.iter_all()}


def test_a_file_the_rules_now_exclude_is_not_deleted(
    tmp_path: Path, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "logs").mkdir(parents=True)
    (inbox / "a.log").write_text("log line")
    (inbox / "logs" / "b.txt").write_text("nested")
    first = config_for(tmp_path, server, '[[watch]]\npath = "inbox"\ndelete_grace_seconds = 0', monkeypatch)
    assert sync_once(first, progress=False) == 0
    assert rows(tmp_path)["a.log"][0] is State.SYNCED
    narrower = config_for(
        tmp_path,
        server,
        '[[watch]]\npath = "inbox"\nrecursive = false\nignore = ["*.log"]\ndelete_grace_seconds = 0',
        monkeypatch,
    )
    assert sync_once(narrower, progress=False) == 0
    after = rows(tmp_path)
    assert after["a.log"][0] is State.SYNCED
    assert after["logs/b.txt"][0] is State.SYNCED


def test_changing_a_rule_re_routes_unchanged_files(
    tmp_path: Path, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "scans").mkdir(parents=True)
    (inbox / "scans" / "page.png").write_bytes(b"\x89PNG fake")
    plain = config_for(tmp_path, server, '[[watch]]\npath = "inbox"', monkeypatch)
    assert sync_once(plain, progress=False) == 0
    assert rows(tmp_path)["scans/page.png"] == (State.SYNCED, "assistants")
    routed = config_for(
        tmp_path,
        server,
        '[[watch]]\npath = "inbox"\n[[watch.rules]]\npattern = "scans/**"\npurpose = "vision"',
        monkeypatch,
    )
    assert sync_once(routed, progress=False) == 0
    assert rows(tmp_path)["scans/page.png"] == (State.SYNCED, "vision")
    assert server.stats.uploads == 2  # the same bytes, now also needed under the new purpose
