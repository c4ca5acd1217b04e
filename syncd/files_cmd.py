"""`syncd files`: the Files API by hand (design §6), over the daemon's own client.

Every command builds :class:`syncd.api.FilesClient` from the config (base URL, key, timeout, retries), so
retries and error mapping are the daemon's. Only ``cleanup`` writes the manifest. The client, pydantic,
the manifest and rich are imported inside the commands: ``syncd --help`` should not pay for them.

Choices where design §6 is silent, and why:

- ``upload`` reuses a hash hit only when its purpose matches: the SDK's cache check returns a hit of any
  purpose, which would hand back a file filed under the wrong one. It never touches the manifest: a file
  uploaded by hand is not syncd's (a later sync of the same content adopts it, unowned).
- ``list --skip/--limit`` is the server's window; ``--purpose`` is also filtered here because the public
  API ignores it, so there a page may show fewer than ``--limit`` files. ``--all`` is exact.
- ``download`` without ``-o`` writes the remote filename (its last component only) into the current
  directory and refuses to replace a file there; an explicit ``-o FILE`` replaces it, atomically.
- ``delete`` is remote only. A manifest row synced to a deleted file is named in a note, since the next
  sync uploads it again (``cleanup`` marks such rows ``expired`` instead).
- ``cleanup`` lists everything before it deletes anything (a failed page: nothing deleted), then deletes
  remote first and writes the manifest after each delete, as the reconciler does. It holds the state
  dir's lock only when it needs the manifest: ``--owned-only`` (taken before listing), or a file to delete
  that a row references (found read-only; the lock is then taken before asking). Without the lock a daemon
  may adopt a file between the listing and its delete; it then sees the remote copy vanish and uploads it
  again: a duplicate upload, never a loss. A crash between a delete and its commit ends the same way.
  Answering "no" at the prompt deletes nothing and exits 1 (the work was not done).
"""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    import asyncio

    from syncd.api import FileResponse, FilesClient
    from syncd.config import Config
    from syncd.manifest import Manifest, ManifestReader
    from syncd.state import StateLock

T = TypeVar("T")
R = TypeVar("R")

# The exit codes of syncd.cli (which imports this module, so they cannot be imported from it).
EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3

files_app = typer.Typer(
    name="files",
    help="Upload, list, download and delete remote files by hand; clean up old ones.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (default: $SYNCD_CONFIG or the user config dir)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object per file on stdout.")]
PurposeFilter = Annotated[
    str | None,
    typer.Option("--purpose", help="Only files of this purpose (assistants, vision, fine-tune, batch, ...)."),
]


# -- pure rules ------------------------------------------------------------------------------------------

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` (decimals allowed) as seconds; ``0d`` means any age."""
    match = _AGE.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not an age: use a number and a unit s, m, h or d (30d, 12h, 0d for all)"
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def format_span(seconds: float) -> str:
    """The largest unit that fits, one decimal at most: 45.2d, 3h, 12m, 0s."""
    seconds = max(0.0, seconds)
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit]:
            value = seconds / _UNITS[unit]
            return f"{value:.1f}".rstrip("0").rstrip(".") + unit
    return f"{seconds:.0f}s"


@dataclass(frozen=True, slots=True)
class Listed:
    """What the cleanup rule reads from one listed remote file (times are Unix seconds)."""

    id: str
    filename: str | None
    purpose: str
    created_at: float
    bytes: int

    @classmethod
    def from_response(cls, item: FileResponse) -> Listed:
        from datetime import UTC

        created = (
            item.created_at if item.created_at.tzinfo is not None else item.created_at.replace(tzinfo=UTC)
        )
        return cls(item.id, item.filename, item.purpose, created.timestamp(), item.bytes)


@dataclass(frozen=True, slots=True)
class Doomed:
    """A listed file cleanup deletes, and why (the reason is printed next to it)."""

    file: Listed
    age: float
    reason: str


@dataclass(frozen=True, slots=True)
class Selection:
    """What cleanup deletes, and how many files each rule kept (each kept file counted once, first rule)."""

    delete: tuple[Doomed, ...]
    too_young: int = 0
    other_purpose: int = 0
    not_owned: int = 0

    @property
    def kept(self) -> int:
        return self.too_young + self.other_purpose + self.not_owned


def select_cleanup(
    files: Iterable[Listed],
    *,
    now: float,
    older_than: float,
    purpose: str | None,
    owned: Collection[str] | None,
) -> Selection:
    """The files ``cleanup`` deletes, in listing order: at least ``older_than`` seconds old (0: any age,
    even a file the server's clock stamped in our future), of ``purpose`` when given, and in ``owned``
    (the manifest's ledger) when given, which is ``--owned-only``."""
    delete: list[Doomed] = []
    young = other = foreign = 0
    limit = "any age (--older-than 0)" if older_than == 0 else f"older than {format_span(older_than)}"
    for f in files:
        age = now - f.created_at
        if older_than > 0 and age < older_than:
            young += 1
        elif purpose is not None and f.purpose != purpose:
            other += 1
        elif owned is not None and f.id not in owned:
            foreign += 1
        else:
            why = [f"{format_span(age)} old, {limit}"]
            if purpose is not None:
                why.append(f"purpose {purpose}")
            if owned is not None:
                why.append("uploaded by this syncd")
            delete.append(Doomed(f, age, "; ".join(why)))
    return Selection(tuple(delete), young, other, foreign)


# -- shared plumbing -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failed:
    """One item's error, already phrased as one line, and the exit code it calls for."""

    message: str
    code: int = EXIT_INCOMPLETE


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"syncd: {message}", err=True)
    raise typer.Exit(code)


def _complain(failure: Failed) -> int:
    typer.echo(f"syncd: {failure.message}", err=True)
    return failure.code


def failure(what: str, exc: Exception, base_url: str) -> Failed:
    """``exc`` as one line that names ``what`` failed and what to do about it."""
    from syncd.api import (
        ApiError,
        AuthError,
        NetworkError,
        NotFoundError,
        RateLimitedError,
        ServerError,
        SourceChangedError,
        TooLargeError,
        UnsupportedTypeError,
    )

    if isinstance(exc, NotFoundError):
        return Failed(f"{what}: not found (404)")
    if isinstance(exc, AuthError):
        return Failed(
            f"{what}: the server refused the API key ({exc.status}); check VLMRUN_API_KEY or "
            "remote.api_key_file",
            EXIT_USAGE,
        )
    if isinstance(exc, NetworkError):
        return Failed(f"{what}: cannot reach {base_url} ({exc.detail}); is the server up?")
    if isinstance(exc, RateLimitedError | ServerError):
        return Failed(f"{what}: the server failed ({exc}) after retries; try again later")
    if isinstance(exc, TooLargeError):
        return Failed(f"{what}: too large for the server (413 {exc.detail})")
    if isinstance(exc, UnsupportedTypeError):
        return Failed(f"{what}: the server refuses this file type (415 {exc.detail})")
    if isinstance(exc, ApiError):
        return Failed(f"{what}: the server answered {exc}")
    if isinstance(exc, SourceChangedError):
        return Failed(f"{what}: {exc.detail}; try again once it stops changing")
    if isinstance(exc, OSError):
        return Failed(f"{what}: {exc.strerror or exc}")
    raise exc


def _expected_errors() -> tuple[type[Exception], ...]:
    from syncd.api import ApiError, SourceChangedError

    return (ApiError, SourceChangedError, OSError)


def _load(path: Path | None) -> Config:
    """The config, with a key, and logging that keeps stdout for command output."""
    from syncd import logs
    from syncd.config import ConfigError, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        _fail(str(exc))
    if cfg.api_key is None:
        _fail(
            f"{cfg.source}: no API key: set VLMRUN_API_KEY, remote.api_key_file, or a systemd credential"
            " api-key"
        )
    level = "debug" if cfg.log.level == "debug" else "warning"
    logs.configure(fmt="console", level=level, secrets=(cfg.api_key.get_secret_value(),))
    return cfg


def _client(cfg: Config) -> FilesClient:
    """The client as the daemon builds it, from ``[remote]``."""
    from syncd.remote import make_client

    assert cfg.api_key is not None  # _load checked it
    return make_client(cfg, cfg.remote.base_url, cfg.api_key.get_secret_value())


def _run(cfg: Config, body: Callable[[FilesClient], Awaitable[int]]) -> NoReturn:
    import asyncio

    async def main() -> int:
        async with _client(cfg) as client:
            return await body(client)

    raise typer.Exit(asyncio.run(main()))


def _check_purpose(purpose: str | None) -> None:
    from syncd.api import PURPOSES

    if purpose is not None and purpose not in PURPOSES:
        _fail(f"--purpose: unknown purpose {purpose!r}; choose from {', '.join(PURPOSES)}")


async def _in_order(items: Sequence[T], job: Callable[[T], Awaitable[R]]) -> AsyncIterator[tuple[T, R]]:
    """Run ``job`` on every item concurrently; yield (item, result) in the given order, each as soon as it
    and those before it are done (output streams, yet reads the same on every run)."""
    import asyncio

    tasks = [asyncio.ensure_future(job(item)) for item in items]
    try:
        for item, task in zip(items, tasks, strict=True):
            yield item, await task
    finally:
        for task in tasks:
            task.cancel()


def _file_json(item: FileResponse, **extra: Any) -> str:
    import json

    return json.dumps({**item.model_dump(mode="json"), **extra})


def _name(item: FileResponse) -> str:
    return item.filename if item.filename is not None else ""


def _md5_of(path: Path) -> tuple[int, int, str]:
    """(size, mtime_ns, md5) of a regular file, read once; a file that changes meanwhile raises."""
    import errno
    import hashlib
    import os
    import stat

    from syncd.api import SourceChangedError

    mode = os.stat(path).st_mode  # before open: opening a FIFO would wait for a writer
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory (a [[watch]] root syncs folders)")
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file")
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        digest = hashlib.file_digest(f, "md5").hexdigest()
        after = os.fstat(f.fileno())
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise SourceChangedError(str(path), "changed while it was hashed")
    return before.st_size, before.st_mtime_ns, digest


@dataclass(frozen=True, slots=True)
class RowsOf:
    """The manifest rows that name one remote file, as local paths: ``synced`` ones hold it (cleanup marks
    them expired), ``deleted`` ones await its prune (cleanup drops them)."""

    synced: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()


NO_ROWS = RowsOf()


def _synced_paths(state_dir: Path, ids: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Remote id → local paths synced to it, read without the lock ({} before the first sync)."""
    from syncd.manifest import ManifestMissing, ManifestReader, SchemaMismatch

    try:
        reader = ManifestReader.open_readonly(state_dir)
    except (ManifestMissing, SchemaMismatch):
        return {}
    with reader:
        return {rid: rows.synced for rid, rows in _referencing(reader, ids).items() if rows.synced}


def _referencing(reader: ManifestReader, ids: Iterable[str]) -> dict[str, RowsOf]:
    from syncd.manifest import State

    roots = {r.root_id: r.path for r in reader.roots()}
    found: dict[str, RowsOf] = {}
    for rid in ids:
        paths: dict[State, list[str]] = {State.SYNCED: [], State.DELETED: []}
        for e in reader.rows_for_remote(rid):
            if e.state in paths:
                paths[e.state].append(str(Path(roots.get(e.root_id, f"root {e.root_id}")) / e.relpath))
        if any(paths.values()):
            found[rid] = RowsOf(tuple(paths[State.SYNCED]), tuple(paths[State.DELETED]))
    return found


# -- upload, get, download, delete, list -----------------------------------------------------------------


@files_app.command()
def upload(
    paths: Annotated[list[Path], typer.Argument(help="Files to upload.", show_default=False)],
    purpose: Annotated[str, typer.Option(help="Purpose to file them under.")] = "assistants",
    force: Annotated[
        bool, typer.Option("--force", help="Upload even when the server has the content.")
    ] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Upload files, reusing a remote file with the same md5 and purpose; print each id."""
    _check_purpose(purpose)
    cfg = _load(config)

    async def one(
        client: FilesClient, path: Path, slots: asyncio.Semaphore
    ) -> tuple[FileResponse, bool] | Failed:
        import asyncio

        async with slots:
            try:
                size, mtime_ns, md5 = await asyncio.to_thread(_md5_of, path)
                if not force:
                    extensions = client.extensions
                    hit = await client.find_by_md5(md5, purpose=purpose)
                    if hit is not None and hit.purpose != purpose and client.extensions and not extensions:
                        # The answer showed the md5 extension: ask again, now narrowed to the purpose.
                        hit = await client.find_by_md5(md5, purpose=purpose)
                    if hit is not None and hit.purpose == purpose:
                        return hit, True
                from syncd.plan import remote_name

                name = remote_name(path.name)  # a Latin-1 name from an old share is not valid UTF-8
                return (
                    await client.upload(path, purpose=purpose, filename=name, expected=(size, mtime_ns)),
                    False,
                )
            except _expected_errors() as exc:
                return failure(f"files upload {path}", exc, cfg.remote.base_url)

    async def body(client: FilesClient) -> int:
        import asyncio

        from syncd.remote import pool_size

        slots = asyncio.Semaphore(pool_size(cfg))
        code = EXIT_OK
        async for path, result in _in_order(paths, lambda p: one(client, p, slots)):
            if isinstance(result, Failed):
                code = max(code, _complain(result))
                continue
            item, reused = result
            if as_json:
                typer.echo(_file_json(item, path=str(path), reused=reused))
            else:
                typer.echo(f"{item.id}\t{'reused' if reused else 'uploaded'}\t{path}")
        return code

    _run(cfg, body)


@files_app.command()
def get(
    file_id: Annotated[str, typer.Argument(metavar="ID", help="Remote file id.", show_default=False)],
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Show one remote file's metadata."""
    cfg = _load(config)

    async def body(client: FilesClient) -> int:
        try:
            item = await client.get(file_id)
        except _expected_errors() as exc:
            return _complain(failure(f"files get {file_id}", exc, cfg.remote.base_url))
        if as_json:
            typer.echo(_file_json(item))
        else:
            for key, value in item.model_dump(mode="json").items():
                if value is not None:
                    typer.echo(f"{key}: {value}")
        return EXIT_OK

    _run(cfg, body)


def _local_name(item: FileResponse) -> str:
    """The remote filename's last component, or the id when that is empty or could name a directory."""
    name = Path(_name(item).replace("\\", "/")).name
    return item.id if name in ("", ".", "..") or "\x00" in name else name


@files_app.command()
def download(
    file_id: Annotated[str, typer.Argument(metavar="ID", help="Remote file id.", show_default=False)],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="File (replaced if it exists) or directory to write to."),
    ] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Download a file's bytes (needs the server's content route; the public API has none)."""
    cfg = _load(config)
    what = f"files download {file_id}"

    async def body(client: FilesClient) -> int:
        from syncd.api import NotFoundError

        try:
            item = await client.get(file_id)
        except _expected_errors() as exc:
            return _complain(failure(what, exc, cfg.remote.base_url))
        dest = output
        if dest is None or dest.is_dir():
            dest = (dest or Path.cwd()) / _local_name(item)
            if dest.exists() or dest.is_symlink():
                return _complain(Failed(f"{what}: {dest} exists; pass -o {dest} to replace it", EXIT_USAGE))
        try:
            written = await client.download(file_id, dest=dest)
        except NotFoundError:
            try:
                await client.get(file_id)
            except _expected_errors() as exc:
                return _complain(failure(what, exc, cfg.remote.base_url))
            return _complain(
                Failed(
                    f"{what}: this server has no content route (GET /files/{{id}}/content answered 404 "
                    "for a file that exists), so it cannot be downloaded from here"
                )
            )
        except _expected_errors() as exc:
            return _complain(failure(what, exc, cfg.remote.base_url))
        if as_json:
            typer.echo(_file_json(item, path=str(dest), written=written))
        else:
            typer.echo(f"{item.id}\t{written} bytes\t{dest}")
        return EXIT_OK

    _run(cfg, body)


@files_app.command()
def delete(
    file_ids: Annotated[
        list[str], typer.Argument(metavar="ID...", help="Remote file ids.", show_default=False)
    ],
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Delete remote files (any client's: this is by hand)."""
    cfg = _load(config)
    synced = _synced_paths(cfg.state_dir, file_ids)

    async def one(client: FilesClient, file_id: str) -> FileResponse | Failed:
        try:
            return await client.delete(file_id)
        except _expected_errors() as exc:
            return failure(f"files delete {file_id}", exc, cfg.remote.base_url)

    async def body(client: FilesClient) -> int:
        code = EXIT_OK
        async for file_id, result in _in_order(file_ids, lambda i: one(client, i)):
            if isinstance(result, Failed):
                code = max(code, _complain(result))
                continue
            typer.echo(_file_json(result) if as_json else f"deleted\t{result.id}\t{_name(result)}")
            if file_id in synced:
                typer.echo(
                    f"syncd: note: {', '.join(synced[file_id])} was synced to {file_id}; the next sync"
                    " uploads it again (`syncd files cleanup` marks such rows expired instead)",
                    err=True,
                )
        return code

    _run(cfg, body)


@files_app.command("list")
def list_files(
    purpose: PurposeFilter = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Files per page (the API's limit).")] = 100,
    skip: Annotated[int, typer.Option(min=0, help="Files to skip, newest first.")] = 0,
    all_: Annotated[
        bool, typer.Option("--all", help="Every file, paging to the end (--skip/--limit ignored).")
    ] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """List remote files, newest first: a table on a terminal, JSON lines otherwise."""
    _check_purpose(purpose)
    cfg = _load(config)
    table = not as_json and sys.stdout.isatty()

    async def items(client: FilesClient) -> AsyncIterator[FileResponse]:
        if all_:
            async for item in client.iter_all(purpose=purpose):
                yield item
        else:
            for item in await client.list_page(skip=skip, limit=limit, purpose=purpose):
                yield item

    async def body(client: FilesClient) -> int:
        shown: list[FileResponse] = []
        try:
            async for item in items(client):
                if purpose is not None and item.purpose != purpose:
                    continue  # the public API ignores the filter
                if table:
                    shown.append(item)
                else:
                    typer.echo(_file_json(item))
        except _expected_errors() as exc:
            code = _complain(failure("files list", exc, cfg.remote.base_url))
        else:
            code = EXIT_OK
        if table:
            _print_table(shown)
        return code

    _run(cfg, body)


def _print_table(items: Sequence[FileResponse]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not items:
        console.print("no remote files")
        return
    with_md5 = any(item.md5 is not None for item in items)
    table = Table(box=None, header_style="bold")
    # On a narrow terminal only the filename and the md5 give way; an id cut short is of no use.
    table.add_column("id", no_wrap=True)
    table.add_column("filename", overflow="fold")
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("purpose", no_wrap=True)
    table.add_column("created", no_wrap=True)
    if with_md5:
        table.add_column("md5", overflow="ellipsis", no_wrap=True)
    for item in items:
        row = [
            item.id,
            _name(item),
            f"{item.bytes:,}",
            item.purpose,
            item.created_at.astimezone().strftime("%Y-%m-%d %H:%M"),
        ]
        table.add_row(*row, *([item.md5 or ""] if with_md5 else []))
    console.print(table)


# -- cleanup ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanupOptions:
    older_than: float
    purpose: str | None
    owned_only: bool
    dry_run: bool
    yes: bool
    as_json: bool


class _Book:
    """The manifest as cleanup uses it: read-only until it must write, then under the state dir's lock."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.lock: StateLock | None = None
        self.reader: ManifestReader | None = None
        self.writer: Manifest | None = None

    def read(self) -> None:
        from syncd.manifest import ManifestMissing, ManifestReader

        try:
            self.reader = ManifestReader.open_readonly(self.state_dir)
        except ManifestMissing:
            self.reader = None

    def take_lock(self) -> None:
        """Hold the state dir's lock and open the manifest for writing (if there is one); AlreadyRunning if
        a daemon holds it."""
        from syncd.manifest import Manifest
        from syncd.state import MANIFEST_NAME, StateLock

        lock = StateLock(self.state_dir)
        lock.acquire()
        self.lock = lock
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if (self.state_dir / MANIFEST_NAME).exists():
            self.writer = Manifest.open(lock)

    @property
    def view(self) -> ManifestReader | None:
        return self.writer if self.writer is not None else self.reader

    def owned(self) -> frozenset[str]:
        return frozenset(self.view.owned_remote_ids()) if self.view is not None else frozenset()

    def referencing(self, ids: Iterable[str]) -> dict[str, RowsOf]:
        return _referencing(self.view, ids) if self.view is not None else {}

    def expire(self, remote_id: str) -> int:
        """After ``remote_id`` was deleted: its synced rows become ``expired`` (not re-uploaded until the
        file changes), deleted rows are dropped, the ledger forgets it. Returns the rows expired."""
        from syncd.manifest import State

        if self.writer is None:
            return 0
        expired = 0
        for entry in self.writer.rows_for_remote(remote_id):
            if entry.state is State.DELETED:
                self.writer.remove(entry.key)
            elif entry.state is State.SYNCED:
                self.writer.mark_expired(entry.key)
                expired += 1
        self.writer.forget_owned(remote_id)
        self.writer.commit()
        return expired

    def close(self) -> None:
        for db in (self.reader, self.writer):
            if db is not None:
                db.close()
        if self.lock is not None:
            self.lock.release()


@files_app.command()
def cleanup(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Minimum age: 30d, 12h, 90m, 45s; 0d means any age.")
    ],
    purpose: PurposeFilter = None,
    owned_only: Annotated[
        bool, typer.Option("--owned-only", help="Only files this syncd uploaded (the manifest's ledger).")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be deleted; change nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Delete remote files older than an age; rows of deleted files in the manifest become expired."""
    try:
        age = parse_age(older_than)
    except ValueError as exc:
        _fail(f"--older-than: {exc}")
    _check_purpose(purpose)
    cfg = _load(config)
    opts = CleanupOptions(age, purpose, owned_only, dry_run, yes, as_json)
    ask = _confirm if sys.stdin.isatty() else None

    from syncd.remote import pool_size

    async def body(client: FilesClient) -> int:
        return await run_cleanup(
            client,
            state_dir=cfg.state_dir,
            opts=opts,
            ask=ask,
            base_url=cfg.remote.base_url,
            concurrency=pool_size(cfg),
        )

    _run(cfg, body)


def _confirm(question: str) -> bool:
    return typer.confirm(question, default=False, err=True)


async def run_cleanup(
    client: FilesClient,
    *,
    state_dir: Path,
    opts: CleanupOptions,
    ask: Callable[[str], bool] | None,
    base_url: str,
    concurrency: int,
) -> int:
    """``syncd files cleanup`` once the config is read: list, select, show, ask, delete, expire, sum up.

    ``ask`` is None without a terminal (then only ``--yes`` deletes). Returns the exit code.
    """
    import time

    book = _Book(state_dir)
    try:
        locked = opts.owned_only and not opts.dry_run
        problem = _open_manifest(book, lock_for="--owned-only reads the manifest" if locked else None)
        if problem is not None:
            return _complain(problem)
        try:
            listing = [Listed.from_response(item) for item in await client.list_all()]
        except _expected_errors() as exc:
            what = "files cleanup: listing remote files failed, nothing deleted"
            return _complain(failure(what, exc, base_url))
        owned = book.owned() if opts.owned_only else None
        selection = select_cleanup(
            listing, now=time.time(), older_than=opts.older_than, purpose=opts.purpose, owned=owned
        )
        doomed = selection.delete
        rows = book.referencing(d.file.id for d in doomed)
        if rows and not opts.dry_run and book.lock is None:
            problem = _open_manifest(
                book, lock_for=f"{len(rows)} of the files to delete are synced from {state_dir}"
            )
            if problem is not None:
                return _complain(problem)
            rows = book.referencing(d.file.id for d in doomed)  # as they are now, under the lock
        if not doomed:
            _summary(opts, selection, deleted=0, expired=0, failed=0)
            return EXIT_OK
        if opts.dry_run:
            for d in doomed:
                _show(d, rows.get(d.file.id, NO_ROWS), "would delete", opts.as_json)
            _summary(opts, selection, deleted=0, expired=0, failed=0)
            return EXIT_OK
        if not opts.yes:
            if ask is None:
                return _complain(
                    Failed(
                        f"files cleanup: {len(doomed)} files to delete and no terminal to ask on; pass --yes"
                        " to delete them, or --dry-run to list them",
                        EXIT_USAGE,
                    )
                )
            for d in doomed:
                _show(d, rows.get(d.file.id, NO_ROWS), "delete", as_json=False, err=opts.as_json)
            if not ask(f"Delete these {len(doomed)} remote files?"):
                return _complain(Failed("files cleanup: nothing deleted"))
        return await _delete_all(client, book, doomed, rows, opts, selection, base_url, concurrency)
    finally:
        book.close()


def _open_manifest(book: _Book, *, lock_for: str | None) -> Failed | None:
    """Open the manifest read-only, or (``lock_for`` says why) under the state dir's lock; the one-line
    failure when a daemon holds the lock (exit 3) or the manifest is another syncd version's (exit 2)."""
    from syncd.manifest import SchemaMismatch
    from syncd.state import AlreadyRunning

    try:
        if lock_for is None:
            book.read()
        else:
            book.take_lock()
    except AlreadyRunning as exc:
        return Failed(f"files cleanup: {lock_for}, and {exc}; stop it and run again", EXIT_LOCKED)
    except SchemaMismatch as exc:
        return Failed(f"files cleanup: {exc}", EXIT_USAGE)
    return None


async def _delete_all(
    client: FilesClient,
    book: _Book,
    doomed: Sequence[Doomed],
    rows: dict[str, RowsOf],
    opts: CleanupOptions,
    selection: Selection,
    base_url: str,
    concurrency: int,
) -> int:
    """Delete remote first, then the manifest side of that file, committed; stop starting new deletes after
    the first failure (the server is likely down or the key wrong)."""
    import asyncio

    from syncd.api import NotFoundError

    slots = asyncio.Semaphore(concurrency)
    stopped = False

    async def one(d: Doomed) -> tuple[str, int] | Failed | None:
        nonlocal stopped
        async with slots:
            if stopped:
                return None
            try:
                await client.delete(d.file.id)
                outcome = "deleted"
            except NotFoundError:
                outcome = "gone"  # deleted meanwhile (or a retried delete that landed): the same end
            except _expected_errors() as exc:
                stopped = True
                return failure(f"files cleanup: deleting {d.file.id}", exc, base_url)
            return outcome, book.expire(d.file.id)

    code = EXIT_OK
    deleted = expired = failed = 0
    async for d, result in _in_order(doomed, one):
        if result is None:
            _show(d, rows.get(d.file.id, NO_ROWS), "skipped", opts.as_json)
            failed += 1
        elif isinstance(result, Failed):
            code = max(code, _complain(result))
            _show(d, rows.get(d.file.id, NO_ROWS), "failed", opts.as_json)
            failed += 1
        else:
            outcome, n = result
            _show(d, rows.get(d.file.id, NO_ROWS), outcome, opts.as_json)
            deleted += 1
            expired += n
    _summary(opts, selection, deleted=deleted, expired=expired, failed=failed)
    return code


def _show(d: Doomed, rows: RowsOf, action: str, as_json: bool, *, err: bool = False) -> None:
    """One line per file: what happens (or happened) to it, why, and which manifest rows expire."""
    if as_json:
        import json
        from datetime import UTC, datetime

        f = d.file
        obj = {
            "id": f.id,
            "filename": f.filename,
            "purpose": f.purpose,
            "bytes": f.bytes,
            "created_at": datetime.fromtimestamp(f.created_at, UTC).isoformat().replace("+00:00", "Z"),
            "action": action,
            "reason": d.reason,
            "rows_expired": list(rows.synced),
            "rows_dropped": list(rows.deleted),
        }
        typer.echo(json.dumps(obj), err=err)
        return
    line = f"{action}\t{d.file.id}\t{d.file.filename or ''}\t{d.file.purpose}\t{d.reason}"
    if rows.synced:
        line += f"; rows become expired: {', '.join(rows.synced)}"
    if rows.deleted:
        line += f"; rows of deleted files dropped: {', '.join(rows.deleted)}"
    typer.echo(line, err=err)


def _summary(opts: CleanupOptions, sel: Selection, *, deleted: int, expired: int, failed: int) -> None:
    """One line: what was (or would be) deleted, what the manifest now says, and what was kept and why."""
    reasons = [
        (sel.too_young, f"younger than {format_span(opts.older_than)}"),
        (sel.other_purpose, "of other purposes"),
        (sel.not_owned, "not uploaded by this syncd"),
    ]
    kept = ", ".join(f"{n} {why}" for n, why in reasons if n)
    parts: list[str] = []
    if not sel.delete:
        parts.append("nothing to delete")
    elif opts.dry_run:
        size = sum(d.file.bytes for d in sel.delete)
        parts.append(f"would delete {len(sel.delete)} files ({size:,} bytes)")
    else:
        parts.append(f"deleted {deleted} of {len(sel.delete)} files")
        if expired:
            parts.append(f"{expired} manifest rows now expired")
        if failed:
            parts.append(f"{failed} not deleted")
    if kept:
        parts.append(f"kept {sel.kept} ({kept})")
    head = "files cleanup (dry run)" if opts.dry_run else "files cleanup"
    typer.echo(f"{head}: {'; '.join(parts)}", err=opts.as_json)
