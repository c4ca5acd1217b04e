"""Processing hooks (design §6): a command or a JSON webhook run for each file the manifest says is synced.

At least once, driven by the manifest. When the upload stage marks a row synced, ``record`` adds one
pending ``hook_runs`` row per matching hook in the *same transaction* as the ``synced`` state, so a crash
keeps both or neither: a row that is synced has its runs, and the next start runs what was left pending.
A run is keyed by (hook id, md5, purpose), plus the path for ``per = "path"``: the same content under a
second path (a copy, a rename, a re-synced row) does not fire a hook again, and a run once done is never
repeated. A hook added later hears only of files synced after it (nothing is recorded for older ones);
the ``hooks`` table remembers when each hook id was first seen.

Never in the upload pipeline's way: ``record`` is a few inserts into a transaction the upload stage writes
anyway, and a full hook queue only means a run waits for the next poll of the manifest. Hooks run with
bounded concurrency (``HOOK_CONCURRENCY``), each within its ``timeout_seconds``. A failure (an exit code
other than 0, a timeout, a program that cannot start, a non-2xx answer, a network error) is retried with
capped backoff, counted in ``status`` with its last error, and never un-syncs a file.

A hook's id is a hash of its watch path and its definition, every key except ``timeout_seconds`` (which
changes how long it may take, not what it does): editing a hook makes a new hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from syncd.config import Config, HookConfig, parse_template
from syncd.counters import Counters
from syncd.manifest import CommitPolicy, FileKey, HookRun, Manifest, ManifestReader
from syncd.plan import SyncedFile, retry_delay
from syncd.rules import matcher
from syncd.supervise import Gate, supervised

log = structlog.get_logger("syncd.hooks")

HOOK_CONCURRENCY = 4
"""Hooks running at once: one slow hook (a 1 s webhook) does not hold up the others, and a burst of synced
files does not fork a process per file on a 2-core machine (a guess)."""
HOOK_QUEUE = 256
"""Runs waiting for a slot; past it, new runs wait in the manifest for the next poll."""
HOOK_POLL_SECONDS = 1.0
"""How often the daemon looks for runs due (a retry, a run a full queue left behind): one indexed query
over the pending runs only."""
HOOK_RETRY_BASE_SECONDS = 2.0
"""First retry of a failed hook: a webhook that restarts is back within seconds; doubling from there keeps
a broken hook from running hot."""
HOOK_RETRY_CAP_SECONDS = 3600.0
"""Failed runs are retried forever (a webhook may be down for a day), but at least hourly."""
HOOK_DRAIN_SECONDS = 10.0
"""On SIGTERM, hooks in flight get this long; then they are killed and run again at the next start."""
STDERR_TAIL_BYTES = 4096
"""What is kept of a command's stderr: its last line is the error `status` shows."""
SECRET_ENV = frozenset({"VLMRUN_API_KEY", "SYNCD_API_KEY", "SYNCD_SERVER_API_KEY", "CREDENTIALS_DIRECTORY"})
"""Never inherited by a command: the key (or where systemd keeps it) reaches a hook only by pass_api_key."""


# -- the configured hooks ---------------------------------------------------------------------------------


def definition(root_path: Path, hook: HookConfig) -> str:
    """What identifies a hook: its watch and every key but ``timeout_seconds``, as canonical JSON."""
    keys = hook.model_dump(mode="json", exclude={"timeout_seconds"})
    return json.dumps({"watch": str(root_path), **keys}, sort_keys=True, separators=(",", ":"))


def hook_id(root_path: Path, hook: HookConfig) -> str:
    return hashlib.sha256(definition(root_path, hook).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Hook:
    """One ``[[watch.hooks]]`` entry, compiled: its id, its watch and its path filter."""

    id: str
    root_index: int
    root_path: Path
    config: HookConfig
    matches: Callable[[str], bool]

    @property
    def name(self) -> str:
        """How logs and ``status`` name it: the program's file name, or the webhook without its query
        (which may carry a token)."""
        if self.config.exec is not None:
            return f"exec {Path(self.config.exec[0]).name}"
        url = urlsplit(self.config.post or "")
        return f"post {url.scheme}://{url.netloc}{url.path}"

    def scope(self, relpath: str) -> str:
        """The part of a run's key beyond (hook, md5, purpose): the path for ``per = "path"``."""
        return relpath if self.config.per == "path" else ""


def _everything(relpath: str) -> bool:
    return True


class HookTable:
    """Every configured hook, by id and by watch root (``Root.index``)."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.by_id = {h.id: h for h in hooks}
        self._by_root: dict[int, tuple[Hook, ...]] = {}
        for hook in hooks:
            self._by_root[hook.root_index] = (*self._by_root.get(hook.root_index, ()), hook)
        self.ids = frozenset(self.by_id)
        self.webhooks = any(h.config.post is not None for h in hooks)

    def __iter__(self) -> Iterator[Hook]:
        return iter(self.by_id.values())

    def for_root(self, root_index: int) -> tuple[Hook, ...]:
        return self._by_root.get(root_index, ())

    def ids_for_root(self, root_index: int) -> frozenset[str]:
        return frozenset(h.id for h in self.for_root(root_index))


def compile_hooks(config: Config) -> HookTable:
    """The hooks of every watch (patterns were checked when the config loaded). Two identical entries in
    one watch are one hook."""
    hooks = []
    for index, watch in enumerate(config.watch):
        for entry in watch.hooks:
            matches = matcher(entry.pattern) if entry.pattern is not None else _everything
            hooks.append(Hook(hook_id(watch.path, entry), index, watch.path, entry, matches))
    return HookTable(hooks)


# -- what a run is told (pure) ----------------------------------------------------------------------------


def values(run: HookRun, path: Path) -> dict[str, str]:
    """The placeholders' values (and the environment's, and the webhook's keys) for one run."""
    return {
        "path": str(path),
        "relpath": run.relpath,
        "remote_id": run.remote_id,
        "purpose": run.purpose,
        "md5": run.md5,
        "bytes": str(run.bytes),
        "public_url": run.public_url or "",
    }


def expand(argv: Sequence[str], fields: Mapping[str, str]) -> list[str]:
    """Fill the placeholders of each argument: one argument in, one out, whatever a value contains (no
    shell ever parses them)."""
    return ["".join(text + (fields[name] if name else "") for text, name in parse_template(a)) for a in argv]


def environment(
    inherited: Mapping[str, str],
    fields: Mapping[str, str],
    *,
    hook: Hook,
    base_url: str,
    api_key: str | None,
) -> dict[str, str]:
    """A command's environment: the daemon's without any key, the run's values as ``SYNCD_*``, and the key
    (as ``SYNCD_API_KEY`` and ``VLMRUN_API_KEY``, beside ``VLMRUN_BASE_URL``, for the SDK) only with
    ``pass_api_key``."""
    env = {k: v for k, v in inherited.items() if k not in SECRET_ENV}
    env.update({f"SYNCD_{name.upper()}": value for name, value in fields.items()})
    env["SYNCD_HOOK_ID"] = hook.id
    env["SYNCD_BASE_URL"] = base_url
    if hook.config.pass_api_key and api_key:
        env["SYNCD_API_KEY"] = env["VLMRUN_API_KEY"] = api_key
        env["VLMRUN_BASE_URL"] = base_url
    return env


def payload(hook: Hook, fields: Mapping[str, str]) -> dict[str, Any]:
    """A webhook's JSON body: the same fields, ``bytes`` as a number, an absent public URL as null."""
    return {
        "event": hook.config.on,
        "hook_id": hook.id,
        **fields,
        "bytes": int(fields["bytes"]),
        "public_url": fields["public_url"] or None,
    }


def next_attempt_in(attempts: int) -> float:
    """Seconds until a run that failed ``attempts`` times before this failure is tried again."""
    return retry_delay(attempts, base=HOOK_RETRY_BASE_SECONDS, cap=HOOK_RETRY_CAP_SECONDS)


# -- running one (I/O) ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HookResult:
    ok: bool
    detail: str
    """"exit 0", "HTTP 204", or the error shown in the log and in ``status``."""


def _last_line(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


async def _tail(stream: asyncio.StreamReader) -> bytes:
    kept = b""
    while chunk := await stream.read(65536):
        kept = (kept + chunk)[-STDERR_TAIL_BYTES:]
    return kept


def _kill(proc: asyncio.subprocess.Process) -> None:
    """The command and anything it started: it leads its own process group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def run_command(argv: Sequence[str], *, env: Mapping[str, str], seconds: float) -> HookResult:
    """Run ``argv`` (no shell) with stdout discarded and stderr's tail kept; killed after ``seconds``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as exc:
        return HookResult(False, f"cannot start {argv[0]}: {exc.strerror or exc}")
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(seconds):
            tail = await _tail(proc.stderr)
            code = await proc.wait()
    except TimeoutError:
        _kill(proc)
        await proc.wait()
        return HookResult(False, f"timed out after {seconds:g} s (killed)")
    except asyncio.CancelledError:  # shutdown: never leave the command behind, and go on cancelling
        _kill(proc)
        raise
    if code == 0:
        return HookResult(True, "exit 0")
    why = f"exit {code}" if code > 0 else f"killed by signal {-code}"
    last = _last_line(tail)
    return HookResult(False, f"{why}: {last}" if last else why)


def webhook_client() -> httpx.AsyncClient:
    """httpx's own client (not the Files client: a webhook is another service, with no key and no
    retries of its own; the stage retries)."""
    return httpx.AsyncClient(follow_redirects=False, headers={"User-Agent": "syncd-hooks"})


async def run_post(
    http: httpx.AsyncClient, url: str, body: Mapping[str, Any], *, seconds: float
) -> HookResult:
    """POST ``body`` as JSON within ``seconds``; any 2xx is success, a redirect is not followed (fails)."""
    try:
        async with asyncio.timeout(seconds):
            response = await http.post(url, json=dict(body), timeout=seconds)
    except TimeoutError:
        return HookResult(False, f"timed out after {seconds:g} s")
    except httpx.HTTPError as exc:
        return HookResult(False, f"{type(exc).__name__}: {exc}"[:300])
    if response.is_success:
        return HookResult(True, f"HTTP {response.status_code}")
    text = _last_line(response.content[:STDERR_TAIL_BYTES])
    return HookResult(False, f"HTTP {response.status_code}" + (f": {text}" if text else ""))


Execute = Callable[[Hook, Mapping[str, str]], Awaitable[HookResult]]


def executor(
    *, base_url: str, api_key: str | None, http: httpx.AsyncClient | None, inherited: Mapping[str, str]
) -> Execute:
    """How the stage runs a hook: the command with its environment, or the webhook through ``http``."""

    async def execute(hook: Hook, fields: Mapping[str, str]) -> HookResult:
        seconds = hook.config.timeout_seconds
        if hook.config.exec is not None:
            env = environment(inherited, fields, hook=hook, base_url=base_url, api_key=api_key)
            return await run_command(expand(hook.config.exec, fields), env=env, seconds=seconds)
        assert hook.config.post is not None, "a hook without exec has post (config)"
        assert http is not None, "wire() makes the webhook client when any hook posts"
        return await run_post(http, hook.config.post, payload(hook, fields), seconds=seconds)

    return execute


# -- the stage --------------------------------------------------------------------------------------------


def record(manifest: Manifest, hooks: Sequence[Hook], done: SyncedFile) -> list[HookRun]:
    """The runs a newly synced row calls for, added to the transaction that holds its ``synced`` state;
    content (or a path, for per = "path") a hook already has a run for adds nothing."""
    runs = []
    for hook in hooks:
        if not hook.matches(done.key.relpath):
            continue
        run = manifest.add_hook_run(
            hook.id,
            scope=hook.scope(done.key.relpath),
            key=done.key,
            md5=done.md5,
            purpose=done.purpose,
            remote_id=done.remote_id,
            size=done.size,
            public_url=done.public_url,
        )
        if run is not None:
            runs.append(run)
    return runs


class HookQueue:
    """The hook stage's input: a bounded queue and the run ids in it or running, so a run is never queued
    twice; ``seen`` is every id queued by this wiring (one pass runs each run at most once)."""

    def __init__(self, maxsize: int) -> None:
        self.queue: asyncio.Queue[HookRun | None] = asyncio.Queue(maxsize)
        self.pending: set[int] = set()
        self.seen: set[int] = set()

    def offer(self, run: HookRun) -> None:
        """Queue it if there is room now; otherwise it waits in the manifest for the next poll."""
        if run.id not in self.pending and not self.queue.full():
            self._add(run)
            self.queue.put_nowait(run)

    async def submit(self, run: HookRun) -> None:
        if run.id not in self.pending:
            self._add(run)
            await self.queue.put(run)

    def _add(self, run: HookRun) -> None:
        self.pending.add(run.id)
        self.seen.add(run.id)

    def done(self, run_id: int) -> None:
        self.pending.discard(run_id)

    def drop_waiting(self) -> None:
        """Forget runs not started (shutdown): they stay pending in the manifest for the next start."""
        while not self.queue.empty():
            run = self.queue.get_nowait()
            if run is not None:
                self.pending.discard(run.id)


async def run(
    runs: HookQueue,
    *,
    manifest: Manifest,
    commit: CommitPolicy,
    table: HookTable,
    execute: Execute,
    path_of: Callable[[FileKey], Path | None],
    clock: Callable[[], float],
    counters: Counters,
    finished: Callable[[HookRun], None],
    gate: Gate | None = None,
) -> None:
    """Runs in until ``None``, ``HOOK_CONCURRENCY`` at once; each ends done or scheduled for a retry, with
    one log line. ``finished(run)`` follows every attempt (after_sync waits for a path's hooks)."""

    async def one(item: HookRun) -> None:
        try:
            await _run_one(item)
        finally:
            runs.done(item.id)

    async def _run_one(item: HookRun) -> None:
        hook = table.by_id.get(item.hook_id)
        path = path_of(FileKey(item.root_id, item.relpath))
        if hook is None or path is None:
            return  # no longer configured: its runs wait, pending, in case it comes back
        if manifest.pending_writes:
            commit.now()  # the synced state this run answers to is durable before anything runs
        started = time.monotonic()
        result = await execute(hook, values(item, path))
        context = {
            "hook": hook.name,
            "hook_id": hook.id,
            "path": item.relpath,
            "remote_id": item.remote_id,
            "attempt": item.attempts + 1,
            "seconds": round(time.monotonic() - started, 3),
        }
        if result.ok:
            manifest.hook_run_done(item.id)
            counters.hooks_ran += 1
            log.info("hook ran", result=result.detail, **context)
        else:
            wait = next_attempt_in(item.attempts)
            manifest.hook_run_failed(item.id, error=result.detail, next_attempt_at=clock() + wait)
            counters.hooks_failed += 1
            log.warning(
                "hook failed; it will be retried", error=result.detail, retry_in=round(wait, 1), **context
            )
        commit.maybe()
        finished(item)

    await supervised(runs.queue, one, workers=HOOK_CONCURRENCY, counters=counters, what="hook", gate=gate)


async def poll(runs: HookQueue, *, manifest: Manifest, table: HookTable, clock: Callable[[], float]) -> None:
    """The daemon's source of runs: at start every pending one, then each time one is due again. Never
    returns (cancelled at shutdown)."""
    while True:
        for item in manifest.pending_hook_runs(
            table.ids, due_by=clock(), limit=HOOK_QUEUE + len(runs.pending)
        ):
            await runs.submit(item)
        await asyncio.sleep(HOOK_POLL_SECONDS)


async def submit_all_pending(runs: HookQueue, *, manifest: Manifest, table: HookTable) -> None:
    """One pass: every pending run not yet tried in this pass, due or not (as one pass retries every
    upload)."""
    for item in manifest.pending_hook_runs(table.ids, due_by=None):
        if item.id not in runs.seen:
            await runs.submit(item)


def status(reader: ManifestReader, table: HookTable) -> list[dict[str, Any]]:
    """Per configured hook: runs done, pending and failing, failed attempts, the last error."""
    stats = reader.hook_stats()
    since = reader.hooks_first_seen()
    report = []
    for hook in table:
        s = stats.get(hook.id)
        report.append(
            {
                "id": hook.id,
                "name": hook.name,
                "watch": str(hook.root_path),
                "per": hook.config.per,
                "since": since.get(hook.id),
                "done": s.done if s else 0,
                "pending": s.pending if s else 0,
                "failing": s.failing if s else 0,
                "failures": s.failures if s else 0,
                "last_error": s.last_error if s else None,
                "last_error_at": s.last_error_at if s else None,
                "last_error_path": s.last_error_path if s else None,
            }
        )
    return report
