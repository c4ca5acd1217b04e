"""Config loading: every key of config.example.toml validates; bad input is one line naming file and key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd.config import ConfigError, load_config, parse_size, redacted

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "VLMRUN_API_KEY",
        "VLMRUN_BASE_URL",
        "SYNCD_CONFIG",
        "CREDENTIALS_DIRECTORY",
        "STATE_DIRECTORY",
    ):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_example_config_is_valid_and_complete() -> None:
    cfg = load_config(ROOT / "config.example.toml")
    assert cfg.remote.presigned_threshold == 32 * 1024 * 1024
    assert cfg.watch[0].rules[0].purpose == "fine-tune"
    assert cfg.reconcile.retention_days == {"assistants": 30}
    assert cfg.watch[0].path == Path("~/Scans").expanduser()


def test_relative_paths_resolve_against_the_config_dir(tmp_path: Path) -> None:
    path = write(tmp_path, '[state]\ndir = "state"\n[[watch]]\npath = "inbox"\n')
    cfg = load_config(path)
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.watch[0].path == tmp_path / "inbox"
    assert cfg.watch[0].ignore == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[remote]\nbase_urll = 'x'\n", "remote.base_urll: unknown key"),
        ("[remote]\nconcurrency = 0\n", 'remote.concurrency: must be "auto" or a whole number'),
        ("[remote]\nbase_url = 'ftp://x'\n", "remote.base_url: must be an http(s) URL"),
        ("[remote]\npresigned_threshold = '12 parsecs'\n", "remote.presigned_threshold: not a size"),
        (
            "[[watch]]\npath = 'a'\nmode = 'fast'\n",
            "watch[0].mode: Input should be 'auto', 'inotify' or 'poll'",
        ),
        ("[[watch]]\npath = 'a'\npurpose = 'nope'\n", "watch[0].purpose: Input should be"),
        (
            "[[watch]]\npath = 'a'\n[[watch.rules]]\npattern = 'x'\npurpose = 'y'\n",
            "watch[0].rules[0].purpose",
        ),
        ("[reconcile]\nretention_days = { assistants = -1 }\n", "reconcile.retention_days: retention"),
        ("[reconcile]\nmax_delete_fraction = 2\n", "reconcile.max_delete_fraction"),
        ("api_key = 'sk-123'\n", "api_key: unknown key put the key in VLMRUN_API_KEY"),
        ("[log]\nlevel = 'loud'\n", "log.level"),
        ("[remote\n", "invalid TOML"),
    ],
)
def test_bad_values_are_one_line_errors_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")


def test_api_key_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_text("from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-key").write_text("from-credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_config(write(tmp_path, "")).api_key is not None
    assert load_config(write(tmp_path, "")).api_key.get_secret_value() == "from-credential"  # type: ignore[union-attr]
    cfg = load_config(write(tmp_path, '[remote]\napi_key_file = "key"\n'))
    assert cfg.api_key is not None
    assert cfg.api_key.get_secret_value() == "from-file"
    monkeypatch.setenv("VLMRUN_API_KEY", "from-env")
    cfg = load_config(write(tmp_path, '[remote]\napi_key_file = "key"\n'))
    assert cfg.api_key is not None
    assert cfg.api_key.get_secret_value() == "from-env"
    assert "from-env" not in repr(cfg)
    assert redacted(cfg)["remote"]["api_key"] == "**********"


def test_unreadable_key_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"remote.api_key_file"):
        load_config(write(tmp_path, '[remote]\napi_key_file = "missing-key"\n'))


def test_env_base_url_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMRUN_BASE_URL", "http://127.0.0.1:9/v1/")
    assert load_config(write(tmp_path, "")).remote.base_url == "http://127.0.0.1:9/v1"


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from(["", "B", "KiB", "MiB", "GiB", "kb", "MB"]))
def test_sizes_parse_with_units(n: int, unit: str) -> None:
    factor = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "kb": 1000, "MB": 1000**2}[unit]
    assert parse_size(f"{n}{unit}") == n * factor


def test_check_config_prints_redacted_config(tmp_path: Path) -> None:
    path = write(tmp_path, '[[watch]]\npath = "inbox"\n')
    env = {**os.environ, "VLMRUN_API_KEY": "sk-very-secret-value"}
    out = subprocess.run(
        [sys.executable, "-m", "syncd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "sk-very-secret-value" not in out.stdout + out.stderr
    assert '"api_key": "**********"' in out.stdout
    assert "# api key: env VLMRUN_API_KEY\n" in out.stdout
    bad = write(tmp_path, "[remote]\ntimeout = -1\n")
    out = subprocess.run(
        [sys.executable, "-m", "syncd", "check-config", "--config", str(bad)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "remote.timeout" in out.stderr


@pytest.mark.parametrize(
    ("mode", "readers", "fix"),
    [
        (0o600, None, None),
        (0o400, None, None),
        (0o640, "its group", "chmod g-r"),
        (0o604, "all users", "chmod o-r"),
        (0o644, "its group and all users", "chmod go-r"),
    ],
)
def test_key_file_others_can_read_gets_one_warning(
    tmp_path: Path, mode: int, readers: str | None, fix: str | None
) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_text("sk-file-secret\n")
    keyfile.chmod(mode)
    cfg = load_config(write(tmp_path, '[remote]\napi_key_file = "key"\n'))
    assert cfg.api_key is not None
    if readers is None:
        assert cfg.warnings == ()
        return
    (warning,) = cfg.warnings
    assert warning == (
        f"{keyfile}: remote.api_key_file (named in {tmp_path / 'config.toml'}) is readable by {readers} "
        f"(mode {mode:04o}); {fix} {keyfile}"
    )
    assert "sk-file-secret" not in warning


@pytest.mark.parametrize(("mode", "warned"), [(0o400, False), (0o440, False), (0o444, True)])
def test_credential_warns_only_when_world_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int, warned: bool
) -> None:
    """systemd writes a credential 0400 plus an ACL entry for the service user, which stat shows as 0440."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-key").write_text("sk-credential")
    (creds / "api-key").chmod(mode)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load_config(write(tmp_path, ""))
    assert cfg.api_key_source == f"credential {creds / 'api-key'}"
    if warned:
        assert cfg.warnings == (
            f"{creds / 'api-key'}: the systemd credential api-key is readable by all users (mode 0444); "
            f"chmod o-r {creds / 'api-key'}",
        )
    else:
        assert cfg.warnings == ()


def test_key_source_is_named_and_an_unread_file_is_not_judged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_config(write(tmp_path, "")).api_key_source == "none"
    keyfile = tmp_path / "key"
    keyfile.write_text("sk-file-secret")
    keyfile.chmod(0o644)
    cfg = load_config(write(tmp_path, '[remote]\napi_key_file = "key"\n'))
    assert cfg.api_key_source == f"api_key_file {keyfile}"
    monkeypatch.setenv("VLMRUN_API_KEY", "sk-env-secret")
    cfg = load_config(write(tmp_path, '[remote]\napi_key_file = "key"\n'))
    assert cfg.api_key_source == "env VLMRUN_API_KEY"
    assert cfg.warnings == ()  # the env key wins; the file is never read


def test_check_config_names_the_key_file_and_warns_once(tmp_path: Path) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_text("sk-file-secret\n")
    keyfile.chmod(0o644)
    path = write(tmp_path, '[remote]\napi_key_file = "key"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("VLMRUN_API_KEY", "CREDENTIALS_DIRECTORY")}
    out = subprocess.run(
        [sys.executable, "-m", "syncd", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert f"# api key: api_key_file {keyfile}\n" in out.stdout
    assert "sk-file-secret" not in out.stdout + out.stderr
    assert out.stderr.splitlines() == [
        f"syncd: warning: {keyfile}: remote.api_key_file (named in {path}) is readable by its group and all "
        f"users (mode 0644); chmod go-r {keyfile}"
    ]
