"""Configuration: pydantic models for config.example.toml, loading, and one-line errors.

Every default lives here with the reason for it. Relative paths in a config file are resolved against the
file's own directory, so a config can be moved together with the folders it names.
"""

from __future__ import annotations

import os
import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import platformdirs
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from syncd.api.models import Purpose
from syncd.api.transport import TransportKind

ENV_CONFIG = "SYNCD_CONFIG"
ENV_BASE_URL = "VLMRUN_BASE_URL"
ENV_API_KEY = "VLMRUN_API_KEY"
CREDENTIAL_NAME = "api-key"


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class ConfigError(Exception):
    """A config problem, already phrased as one line naming the file and the key."""


def parse_size(value: object) -> object:
    """Accept byte counts as integers or as human strings ("32MiB", "1.5 GB") like rclone does."""
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"not a size: {value!r} (use bytes or a unit like 512KiB, 32MiB, 2GB)")
        return int(Decimal(match.group(1)) * _UNITS[unit])  # exact: float loses bytes past 2**53
    return value


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RemoteConfig(_Section):
    # The embedded/reference server's default address: a first run works with no cloud at all.
    base_url: str = "http://127.0.0.1:8000/v1"
    # Read once at load; never logged (repr shows **********).
    api_key_file: Path | None = None
    # Seconds per request (uploads add a per-byte allowance); 30 s survives a slow server, not a dead one.
    timeout: float = Field(default=30.0, gt=0)
    # Attempts per request for 429/5xx/network errors; 5 with backoff rides out about a minute of outage.
    retries: int = Field(default=5, ge=1, le=50)
    # Requests in flight: enough to hide a WAN round trip, small enough not to flood a 2-core server.
    concurrency: int = Field(default=8, ge=1, le=256)
    # Size at which uploads switch to the presigned PUT: the official SDK's 32 MiB switch point.
    presigned_threshold: Size = 32 * 1024 * 1024
    # aiohttp: measured 2.3x less client CPU per small upload than httpx's own (bench.transport); httpx
    # honours HTTP(S)_PROXY from the environment, aiohttp does not.
    transport: TransportKind = "aiohttp"

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http(s) URL like http://127.0.0.1:8000/v1 (got {value!r})")
        return value.rstrip("/")


class StateConfig(_Section):
    # None: $STATE_DIRECTORY under systemd, else the platform's user state dir (see default_state_dir).
    dir: Path | None = None


class PurposeRuleConfig(_Section):
    pattern: str = Field(min_length=1)
    purpose: Purpose


class WatchConfig(_Section):
    """One watched root."""

    path: Path
    # What most drop folders hold: documents for assistants. Rules below refine it per pattern.
    purpose: Purpose = "assistants"
    recursive: bool = True
    # auto: inotify, falling back to polling for a root when inotify watches run out.
    mode: Literal["auto", "inotify", "poll"] = "auto"
    # A file must keep its size and mtime this long; 2 s covers scanners that pause between pages (a guess).
    settle_seconds: float = Field(default=2.0, ge=0)
    # A file that never stops changing is still handled after this long (Syncthing's hard max delay).
    settle_max_seconds: float = Field(default=300.0, gt=0)
    # A full rescan repairs what the watcher missed (network shares, sleep/resume); costs one stat per file.
    rescan_interval: float = Field(default=3600.0, gt=0)
    # Added after rules.DEFAULT_IGNORE, so a user's list never silently drops the temp-file defaults;
    # a gitignore negation ("!*.part") re-includes one of them.
    ignore: tuple[str, ...] = ()
    # Empty: every file not ignored. Otherwise only files matching one of these globs.
    include: tuple[str, ...] = ()
    # 0: no limit. Larger files are skipped (and logged once), not failed.
    max_file_size: Size = 0
    # A path must stay gone this long before it counts as deleted: survives editors' save-by-rename.
    delete_grace_seconds: float = Field(default=300.0, ge=0)
    # When set, the root counts as unavailable unless this file exists in it (Syncthing's .stfolder).
    marker: str | None = None
    rules: tuple[PurposeRuleConfig, ...] = ()

    @model_validator(mode="after")
    def _settle_bounds(self) -> WatchConfig:
        if self.settle_max_seconds < self.settle_seconds:
            raise ValueError("settle_max_seconds must be >= settle_seconds")
        return self


class ReconcileConfig(_Section):
    # Hourly: listing is one request per 1,000 remote files, cheap, and prunes are not urgent.
    interval_seconds: float = Field(default=3600.0, gt=0)
    # Mirror deletes to the remote; false keeps remote copies (upload-only, like onedrive's no_remote_delete).
    prune_deleted: bool = True
    # Plans deleting more than this need --confirm (rclone's --max-delete); 100 is a guess at "surprising".
    max_delete: int = Field(default=100, ge=0)
    # ... or more than this share of the files syncd owns (abraunegg/onedrive's big-delete check).
    max_delete_fraction: float = Field(default=0.5, ge=0, le=1)
    # Per-purpose retention; purposes not listed are kept forever.
    retention_days: dict[Purpose, float] = Field(default_factory=dict)

    @field_validator("retention_days")
    @classmethod
    def _positive(cls, value: dict[Purpose, float]) -> dict[Purpose, float]:
        for purpose, days in value.items():
            if days <= 0:
                raise ValueError(f"retention for {purpose!r} must be > 0 days (got {days})")
        return value


class LogConfig(_Section):
    # auto: console on a TTY, JSON lines otherwise (journald).
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Section):
    remote: RemoteConfig = RemoteConfig()
    state: StateConfig = StateConfig()
    watch: tuple[WatchConfig, ...] = ()
    reconcile: ReconcileConfig = ReconcileConfig()
    log: LogConfig = LogConfig()
    # Not a TOML key: resolved from env, api_key_file or the systemd credential at load time.
    api_key: SecretStr | None = Field(default=None, exclude=True)
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _distinct_roots(self) -> Config:
        seen: set[Path] = set()
        for watch in self.watch:
            if watch.path in seen:
                raise ValueError(f"watch path {watch.path} is listed twice")
            seen.add(watch.path)
        return self

    @property
    def state_dir(self) -> Path:
        return self.state.dir if self.state.dir is not None else default_state_dir()


def default_config_path() -> Path:
    """$SYNCD_CONFIG, else the platform's user config dir (~/.config/syncd/config.toml on Linux)."""
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    return Path(platformdirs.user_config_dir("syncd")) / "config.toml"


def default_state_dir() -> Path:
    """systemd's StateDirectory= when set, else the platform's user state dir."""
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    return Path(platformdirs.user_state_dir("syncd"))


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _one_line(source: str, exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    loc = tuple(p for p in first["loc"] if p not in ("function-after",))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key (check its spelling against config.example.toml)"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{source}: {_format_loc(loc)}: {message}{more}"


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Expand ~ and make relative paths relative to the config file's directory."""

    def fix(value: object) -> object:
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            return str(path if path.is_absolute() else base / path)
        return value

    remote = raw.get("remote")
    if isinstance(remote, dict) and "api_key_file" in remote:
        remote["api_key_file"] = fix(remote["api_key_file"])
    state = raw.get("state")
    if isinstance(state, dict) and "dir" in state:
        state["dir"] = fix(state["dir"])
    watches = raw.get("watch")
    if isinstance(watches, list):
        for watch in watches:
            if isinstance(watch, dict) and "path" in watch:
                watch["path"] = fix(watch["path"])


def _read_secret(path: Path, what: str) -> SecretStr:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    if not text:
        raise ConfigError(f"{path}: {what} is empty")
    return SecretStr(text)


def resolve_api_key(remote: RemoteConfig, source: str) -> SecretStr | None:
    """VLMRUN_API_KEY, then remote.api_key_file, then systemd's $CREDENTIALS_DIRECTORY/api-key."""
    env = os.environ.get(ENV_API_KEY)
    if env:
        return SecretStr(env)
    if remote.api_key_file is not None:
        return _read_secret(remote.api_key_file, f"remote.api_key_file (named in {source})")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).is_file():
        return _read_secret(Path(creds) / CREDENTIAL_NAME, "the systemd credential api-key")
    return None


def parse_config(raw: dict[str, Any], *, source: str, base: Path) -> Config:
    """Validate a parsed TOML document; env overrides apply; errors become one-line ConfigErrors."""
    raw = {k: v for k, v in raw.items()}
    _resolve_paths(raw, base)
    env_url = os.environ.get(ENV_BASE_URL)
    if env_url:
        remote = dict(raw.get("remote") or {})
        remote["base_url"] = env_url
        raw["remote"] = remote
    for forbidden in ("api_key", "source"):
        if forbidden in raw:
            hint = "put the key in VLMRUN_API_KEY or remote.api_key_file" if forbidden == "api_key" else ""
            raise ConfigError(f"{source}: {forbidden}: unknown key {hint}".rstrip())
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(source, exc)) from None
    key = resolve_api_key(config.remote, source)
    return config.model_copy(update={"api_key": key, "source": Path(source)})


def load_config(path: Path | None = None) -> Config:
    """Load the config file (or the default location); a missing default file means an empty config."""
    explicit = path is not None or bool(os.environ.get(ENV_CONFIG))
    target = path if path is not None else default_config_path()
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{target}: no such config file (copy config.example.toml there)") from None
        return parse_config({}, source=str(target), base=Path.cwd())
    except OSError as exc:
        raise ConfigError(f"{target}: cannot read: {exc.strerror or exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{target}: invalid TOML: {exc}") from None
    return parse_config(raw, source=str(target), base=target.resolve().parent)


def redacted(config: Config) -> dict[str, Any]:
    """The effective config as plain data with the key masked, for check-config and logs."""
    data = config.model_dump(mode="json", exclude={"api_key", "source"})
    data["remote"]["api_key"] = "**********" if config.api_key is not None else None
    return data
