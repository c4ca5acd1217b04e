"""Configuration: pydantic models for config.example.toml, loading, and one-line errors.

Every default lives here with the reason for it. Relative paths in a config file are resolved against the
file's own directory, so a config can be moved together with the folders it names.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import platformdirs
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from syncd.rules import RootRules, compile_rules, matcher

Purpose = Literal[
    "fine-tune",
    "assistants",
    "assistants_output",
    "batch",
    "batch_output",
    "vision",
    "datasets",
]
"""The Files API's purposes (design §5): a config naming another is refused at load, not at upload."""
PURPOSES: tuple[str, ...] = get_args(Purpose)
TransportKind = Literal["aiohttp", "httpx"]
"""The client's transports (syncd.api.transport): aiohttp's, the default, or httpx's own."""

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


# The remote's defaults, here once: the API client (syncd.api) takes the same values when built without
# a config (scripts, tests).
TIMEOUT_SECONDS = 30.0
"""Seconds per request (uploads add a per-byte allowance); 30 s survives a slow server, not a dead one."""
RETRIES = 5
"""Retries per request for 429/5xx/network errors; 5 with backoff rides out about a minute of outage."""
CONCURRENCY = 8
"""Requests in flight for a client built without a config: enough to hide a short round trip."""
MAX_CONCURRENCY = 64
"""The adaptive depth's ceiling (and the connection pool): a 50 ms WAN needs ~32; a guess with headroom."""
PRESIGNED_THRESHOLD = 32 * 1024 * 1024
"""Size at which uploads switch to the presigned PUT: the official SDK's 32 MiB switch point."""


def _depth_setting(value: object) -> Literal["auto"] | int:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ValueError(f'must be "auto" or a whole number from 1 to 256 (got {value!r})')
    return value


class RemoteConfig(_Section):
    # The embedded/reference server's default address: a first run works with no cloud at all.
    base_url: str = "http://127.0.0.1:8000/v1"
    # Read once at load; never logged (repr shows **********).
    api_key_file: Path | None = None
    timeout: float = Field(default=TIMEOUT_SECONDS, gt=0)
    retries: int = Field(default=RETRIES, ge=1, le=50)
    # "auto": adapt the requests in flight to what the server and the network give (design §5); an
    # integer pins it.
    concurrency: Annotated[Literal["auto"] | int, PlainValidator(_depth_setting)] = "auto"
    max_concurrency: int = Field(default=MAX_CONCURRENCY, ge=1, le=256)
    presigned_threshold: Size = PRESIGNED_THRESHOLD
    # Bytes per second shared by every upload in flight (rclone's --bwlimit); off by default: a sync tool
    # should use the uplink it is given unless the user says otherwise.
    max_upload_rate: Size | None = None
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


HOOK_FIELDS: tuple[str, ...] = ("path", "relpath", "remote_id", "purpose", "md5", "bytes", "public_url")
"""What a hook is told about a synced file: ``{name}`` placeholders in ``exec``, ``SYNCD_NAME`` in its
environment, keys of a webhook's JSON."""

HOOK_TIMEOUT_SECONDS = 60.0
"""A hook that starts a prediction makes one API call: a minute covers a slow one, and a hung hook is
killed and retried instead of holding one of the few hook slots forever (a guess)."""

_TEMPLATE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


def parse_template(text: str) -> list[tuple[str, str | None]]:
    """``exec`` argument → (literal, field) pieces: ``{name}`` is a field, ``{{``/``}}`` are braces.

    One parser for the config check and for the hook stage's expansion, so a config that loads never
    fails to expand. Only bare names: ``{path.__class__}`` or ``{bytes:>9}`` are refused, not formatted.
    """
    pieces: list[tuple[str, str | None]] = []
    literal = ""
    at = 0
    for match in _TEMPLATE.finditer(text):
        literal += text[at : match.start()]
        at = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal += token[0]
        elif match.group(1) is None:
            raise ValueError(f"unbalanced {token!r} in {text!r} (write {token * 2} for a literal brace)")
        elif match.group(1) not in HOOK_FIELDS:
            known = " ".join(f"{{{f}}}" for f in HOOK_FIELDS)
            raise ValueError(f"unknown placeholder {token} in {text!r} (known: {known})")
        else:
            pieces.append((literal, match.group(1)))
            literal = ""
    pieces.append((literal + text[at:], None))
    return pieces


def _argv(value: object) -> object:
    if isinstance(value, str):
        raise ValueError(f'must be an argv list like ["cmd", "{{remote_id}}"], not a shell string: {value!r}')
    return value


class HookConfig(_Section):
    """``[[watch.hooks]]``: a command or a webhook run once a file is synced (design §6)."""

    # The only event so far, and required: a config names what it reacts to, so new events change nothing.
    on: Literal["synced"]
    # An argv, never a shell string: file names reach the program as single arguments, unparsed.
    exec: Annotated[tuple[str, ...] | None, BeforeValidator(_argv)] = None
    # A JSON webhook, POSTed with the same fields; exactly one of exec and post.
    post: str | None = None
    # None: every synced file of the watch. Otherwise a gitignore-style glob, like [[watch.rules]] pattern.
    pattern: str | None = Field(default=None, min_length=1)
    # A hook acts on a document: a copy or rename of the same content is the same document.
    per: Literal["content", "path"] = "content"
    timeout_seconds: float = Field(default=HOOK_TIMEOUT_SECONDS, gt=0)
    # A hook is another program: it gets the API key only when asked, and only in its environment.
    pass_api_key: bool = False

    @field_validator("exec")
    @classmethod
    def _placeholders(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None:
            if not value or not value[0]:
                raise ValueError("the program (first element) is missing")
            for arg in value:
                parse_template(arg)
        return value

    @field_validator("post")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http(s) URL (got {value!r})")
        return value

    @field_validator("pattern")
    @classmethod
    def _glob(cls, value: str | None) -> str | None:
        if value is not None:
            matcher(value)
        return value

    @model_validator(mode="after")
    def _one_action(self) -> HookConfig:
        if (self.exec is None) == (self.post is None):
            raise ValueError("set exactly one of exec (a command) or post (a webhook URL)")
        if self.pass_api_key and self.exec is None:
            raise ValueError("pass_api_key applies to exec hooks only: a webhook never gets the key")
        return self


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
    # keep: a mirror leaves its source alone. "delete" and "move" are for drop folders (rclone move,
    # onedrive --remove-source-files): the file leaves the folder once its remote copy is synced.
    after_sync: Literal["keep", "delete", "move"] = "keep"
    # Where "move" puts synced files (relative paths kept, never overwriting); checked below.
    move_to: Path | None = Field(default=None, validate_default=True)
    hooks: tuple[HookConfig, ...] = ()

    @field_validator("move_to")
    @classmethod
    def _move_target(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        after_sync = info.data.get("after_sync")
        if value is None:
            if after_sync == "move":
                raise ValueError('required with after_sync = "move" (the folder synced files go to)')
            return value
        if after_sync != "move":
            raise ValueError(f'is only used with after_sync = "move" (after_sync is {after_sync!r})')
        root = info.data.get("path")
        if isinstance(root, Path):
            problem = move_target_problem(
                root, value, ignore=info.data.get("ignore", ()), recursive=info.data.get("recursive", True)
            )
            if problem is not None:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _settle_bounds(self) -> WatchConfig:
        if self.settle_max_seconds < self.settle_seconds:
            raise ValueError("settle_max_seconds must be >= settle_seconds")
        return self


def move_target_problem(root: Path, move_to: Path, *, ignore: tuple[str, ...], recursive: bool) -> str | None:
    """Why ``move_to`` cannot take the files moved out of ``root``, or None.

    Inside the watched tree it must be a directory the walk never enters (ignored, or below the top of a
    non-recursive root): a moved file would otherwise be found, synced again and moved again. A
    ``move_to`` holding the root would put ``inbox/x`` of the root back into the root.
    """
    real_root, target = root.resolve(), move_to.resolve()
    if target == real_root or real_root.is_relative_to(target):
        return f"{move_to} holds the watched folder {root}: moved files would land back in it"
    if not target.is_relative_to(real_root):
        return None
    rel = target.relative_to(real_root).as_posix()
    if not recursive or compile_rules(RootRules(ignore=ignore)).ignores_dir(rel):
        return None
    return (
        f"{move_to} is inside the watched folder {root} and not ignored: put it outside, or add"
        f' "{rel}/" to ignore'
    )


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


_LISTEN_RE = re.compile(r"^(\[[^\]]+\]|[^:\[\]]+):(\d{1,5})$")
LISTEN_EXAMPLES = "127.0.0.1:9464, [::1]:9464, localhost:9464 or /run/syncd/http.sock"


def is_loopback_host(host: str) -> bool:
    """localhost or a loopback literal (127.0.0.0/8, ::1): names no DNS answer can point elsewhere."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def parse_listen(value: str) -> tuple[str, int] | Path:
    """(host, port) for a loopback TCP address, or the path of a unix socket; ValueError otherwise."""
    if value.startswith("/"):
        return Path(value)
    match = _LISTEN_RE.match(value)
    if match is None or not is_loopback_host(match.group(1)):
        raise ValueError(
            "must be a loopback host:port or an absolute unix socket path (the listener has no login),"
            f" like {LISTEN_EXAMPLES}; got {value!r}"
        )
    port = int(match.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535, got {port}")
    return match.group(1).removeprefix("[").removesuffix("]"), port


class HttpConfig(_Section):
    # Off by default: /metrics and the status page are opt-in. Loopback or a unix socket only, because
    # they need no login (reach them from elsewhere through an SSH tunnel).
    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _local_only(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value

    @property
    def address(self) -> tuple[str, int] | Path | None:
        return None if self.listen is None else parse_listen(self.listen)


class Config(_Section):
    remote: RemoteConfig = RemoteConfig()
    state: StateConfig = StateConfig()
    watch: tuple[WatchConfig, ...] = ()
    reconcile: ReconcileConfig = ReconcileConfig()
    log: LogConfig = LogConfig()
    http: HttpConfig = HttpConfig()
    # Not a TOML key: resolved from env, api_key_file or the systemd credential at load time.
    api_key: SecretStr | None = Field(default=None, exclude=True)
    # Where the key came from, for check-config: "env VLMRUN_API_KEY", "api_key_file PATH",
    # "credential PATH" or "none".
    api_key_source: str = Field(default="none", exclude=True)
    # Problems worth one line at start that do not stop syncd (a key file others can read); the CLI prints
    # them, so a SIGHUP reload does not repeat them.
    warnings: tuple[str, ...] = Field(default=(), exclude=True)
    source: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _distinct_roots(self) -> Config:
        seen: set[Path] = set()
        for watch in self.watch:
            if watch.path in seen:
                raise ValueError(f"watch path {watch.path} is listed twice")
            seen.add(watch.path)
        for index, watch in enumerate(self.watch):
            for other in self.watch:
                if watch.move_to is None or other is watch:
                    continue
                problem = move_target_problem(
                    other.path, watch.move_to, ignore=other.ignore, recursive=other.recursive
                )
                if problem is not None:
                    raise ValueError(f"watch[{index}].move_to: {problem}")
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
            if not isinstance(watch, dict):
                continue
            for key in ("path", "move_to"):
                if key in watch:
                    watch[key] = fix(watch[key])
            for hook in watch.get("hooks") or ():
                # A program named by a relative path ("./hooks/predict.py") is found next to the config,
                # like every other path here; a bare name ("python3") is looked up in PATH.
                argv = hook.get("exec") if isinstance(hook, dict) else None
                if isinstance(argv, list) and argv and isinstance(argv[0], str) and "/" in argv[0]:
                    argv[0] = fix(argv[0])


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A resolved key, where it came from (never the key itself), and a warning about its file, if any."""

    secret: SecretStr | None
    source: str
    warning: str | None = None


def _read_key_file(path: Path, what: str, source: str, *, leaky: int) -> ApiKey:
    """Read a key file; warn, as ssh does for private keys, when its `leaky` mode bits let others read it."""
    try:
        with path.open(encoding="utf-8") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            text = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror or exc}") from exc
    if not text:
        raise ConfigError(f"{path}: {what} is empty")
    exposed = mode & leaky
    if not exposed:
        return ApiKey(SecretStr(text), source)
    who = "g" * bool(exposed & stat.S_IRGRP) + "o" * bool(exposed & stat.S_IROTH)
    readers = {"g": "its group", "o": "all users", "go": "its group and all users"}[who]
    warning = f"{path}: {what} is readable by {readers} (mode {stat.S_IMODE(mode):04o}); chmod {who}-r {path}"
    return ApiKey(SecretStr(text), source, warning)


def resolve_api_key(remote: RemoteConfig, source: str) -> ApiKey:
    """VLMRUN_API_KEY, then remote.api_key_file, then systemd's $CREDENTIALS_DIRECTORY/api-key."""
    env = os.environ.get(ENV_API_KEY)
    if env:
        return ApiKey(SecretStr(env), f"env {ENV_API_KEY}")
    if remote.api_key_file is not None:
        path = remote.api_key_file
        what = f"remote.api_key_file (named in {source})"
        return _read_key_file(path, what, f"api_key_file {path}", leaky=stat.S_IRGRP | stat.S_IROTH)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).is_file():
        path = Path(creds) / CREDENTIAL_NAME
        # systemd writes a credential 0400 and lets the service user read it through an ACL entry, whose
        # mask stat shows as group read (0440): only a world-readable credential is a leak.
        what = "the systemd credential api-key"
        return _read_key_file(path, what, f"credential {path}", leaky=stat.S_IROTH)
    return ApiKey(None, "none")


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
    warnings = (key.warning,) if key.warning else ()
    return config.model_copy(
        update={
            "api_key": key.secret,
            "api_key_source": key.source,
            "warnings": warnings,
            "source": Path(source),
        }
    )


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


def require_api_key(config: Config) -> str:
    """The key, or a one-line error saying where a key can come from."""
    if config.api_key is None:
        raise ConfigError(
            f"{config.source}: no API key: set VLMRUN_API_KEY, remote.api_key_file, or a systemd credential "
            "api-key (or use `syncd run --embedded`)"
        )
    return config.api_key.get_secret_value()


def redacted(config: Config) -> dict[str, Any]:
    """The effective config as plain data with the key masked, for check-config and logs."""
    data = config.model_dump(mode="json", exclude={"api_key", "source"})
    data["remote"]["api_key"] = "**********" if config.api_key is not None else None
    return data
