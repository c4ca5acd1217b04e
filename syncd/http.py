"""The opt-in local listener (design §7): `/metrics`, `/api/status` and the status page.

It runs on the daemon's own event loop (aiohttp's server: no second process, no extra dependency) and is
given plain data and callables, never a stage. Everything that reads the manifest runs in a thread, one
query at a time, so a busy scraper or an open page cannot stall the pipeline or fill the default
executor. It has no login: it only listens on loopback or a unix socket (config.py), and it refuses a
request whose ``Host`` is not a loopback name, so a web page cannot reach it by DNS rebinding.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import re
import socket
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import structlog
from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from syncd.config import Config, ConfigError, is_loopback_host
from syncd.counters import Counters
from syncd.manifest import NOTE_HELD, ManifestMissing, ManifestReader, SchemaMismatch, held_guards

log = structlog.get_logger("syncd.http")
T = TypeVar("T")

CACHE_SOURCES = ("local", "listing", "lookup")
"""Exposed from the start (at 0), so rate() has a series before the first hit."""
SHUTDOWN_SECONDS = 2.0
"""A request still running at shutdown gets this long: every route answers in well under a second."""

_HOST_RE = re.compile(r"^(\[[^\]]+\]|[^:\[\]]+)(?::\d{1,5})?$")
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page's own inline script and style, requests to this origin only, never inside a frame.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline';"
    " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}


# -- /metrics ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """One scrape's numbers: the counters as copied on the event loop, the manifest's as read off it."""

    uploaded: int
    bytes_uploaded: int
    hits: Mapping[str, int]
    failures: Mapping[str, int]
    pruned: Mapping[str, int]
    upload_bounds: tuple[float, ...]
    upload_counts: tuple[int, ...]
    upload_sum: float
    in_flight: int
    last_reconcile_at: float | None
    queues: Mapping[str, int]
    files: Mapping[str, int]
    held_prunes: int


def figures(
    counters: Counters, queues: Mapping[str, int], files: Mapping[str, int], held_prunes: int
) -> Figures:
    """Copy the Counters in one go, on the event loop (the stages mutate them there, between awaits)."""
    seconds = counters.upload_seconds
    return Figures(
        uploaded=counters.uploaded,
        bytes_uploaded=counters.bytes_uploaded,
        hits={**dict.fromkeys(CACHE_SOURCES, 0), **counters.hits},
        failures=dict(counters.failures),
        pruned=dict(counters.pruned),
        upload_bounds=seconds.bounds,
        upload_counts=tuple(seconds.counts),
        upload_sum=seconds.total,
        in_flight=counters.in_flight,
        last_reconcile_at=counters.last_reconcile_at,
        queues=dict(queues),
        files=files,
        held_prunes=held_prunes,
    )


def manifest_figures(state_dir: Path) -> tuple[dict[str, int], int]:
    """Rows per state and the number of held guards; blocking (run it in a thread)."""
    try:
        reader = ManifestReader.open_readonly(state_dir)
    except (ManifestMissing, SchemaMismatch):
        return {}, 0
    with reader:
        files = {state.value: n for state, n in reader.counts_by_state().items()}
        return files, len(held_guards(reader.notes().get(NOTE_HELD)))


class _Collector:
    """The families of design §7 over one `Figures` (a fresh registry per scrape: nothing is shared)."""

    def __init__(self, figures: Figures) -> None:
        self._f = figures

    def collect(self) -> Iterator[Metric]:
        f = self._f
        yield CounterMetricFamily("syncd_files_uploaded", "Files uploaded by this process.", f.uploaded)
        yield CounterMetricFamily("syncd_bytes_uploaded", "Bytes uploaded by this process.", f.bytes_uploaded)
        yield _labelled(
            CounterMetricFamily,
            "syncd_cache_hits",
            "Uploads avoided: the content was found remotely.",
            "source",
            f.hits,
        )
        yield _labelled(
            CounterMetricFamily, "syncd_failures", "Failed upload attempts by kind.", "kind", f.failures
        )
        yield _labelled(
            GaugeMetricFamily, "syncd_queue_depth", "Items waiting for a stage.", "stage", f.queues
        )
        cumulative, buckets = 0, []
        for bound, n in zip((*f.upload_bounds, float("inf")), f.upload_counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(cumulative)))
        yield HistogramMetricFamily(
            "syncd_upload_seconds", "Duration of successful uploads.", buckets=buckets, sum_value=f.upload_sum
        )
        yield GaugeMetricFamily("syncd_in_flight", "Uploads being resolved or sent now.", f.in_flight)
        yield _labelled(GaugeMetricFamily, "syncd_files", "Manifest rows per state.", "state", f.files)
        reconciled = GaugeMetricFamily(
            "syncd_last_reconcile_timestamp_seconds",
            "When the last reconcile run ended (no sample until one has run).",
        )
        if f.last_reconcile_at is not None:
            reconciled.add_metric([], f.last_reconcile_at)
        yield reconciled
        yield _labelled(
            CounterMetricFamily,
            "syncd_pruned",
            "Remote files the reconciler deleted, by why.",
            "reason",
            f.pruned,
        )
        yield GaugeMetricFamily(
            "syncd_held_prunes",
            "Reconcile guards holding deletes back until `syncd reconcile --once --confirm`.",
            f.held_prunes,
        )


def _labelled(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    label: str,
    values: Mapping[str, int],
) -> Metric:
    family = kind(name, doc, labels=[label])
    for value, n in sorted(values.items()):
        family.add_metric([value], n)
    return family


def render_metrics(figures: Figures) -> bytes:
    """The Prometheus text exposition of one scrape."""
    registry = CollectorRegistry()
    registry.register(_Collector(figures))
    return generate_latest(registry)


# -- the application -------------------------------------------------------------------------------


def host_allowed(host: str | None) -> bool:
    """A ``Host`` naming localhost or a loopback literal, any port (an SSH tunnel may map another).

    DNS rebinding needs a name the attacker's DNS answers for; those are refused."""
    match = _HOST_RE.match(host or "")
    return match is not None and is_loopback_host(match.group(1))


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if not host_allowed(request.headers.get(hdrs.HOST)):
        return web.Response(
            status=421,
            text="syncd answers only to Host: localhost or a loopback address (DNS rebinding guard)\n",
        )
    response = await handler(request)
    response.headers.update(_SECURITY_HEADERS)
    return response


def make_app(
    config: Config,
    *,
    counters: Counters,
    queues: Callable[[], Mapping[str, int]],
    status: Callable[[], dict[str, Any]],
) -> web.Application:
    """The three routes. ``status`` is blocking (it reads the manifest) and runs in a thread."""
    page = resources.files("syncd").joinpath("static/status.html").read_bytes()
    one_query = asyncio.Semaphore(1)
    state_dir = config.state_dir

    async def off_loop(fn: Callable[[], T]) -> T:
        async with one_query:
            try:
                return await asyncio.to_thread(fn)
            except sqlite3.Error as exc:
                log.warning("cannot read the manifest for the listener", error=str(exc))
                raise web.HTTPServiceUnavailable(text=f"cannot read the manifest: {exc}\n") from None

    async def metrics(_: web.Request) -> web.Response:
        files, held = await off_loop(lambda: manifest_figures(state_dir))
        body = render_metrics(figures(counters, queues(), files, held))
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})

    async def api_status(_: web.Request) -> web.Response:
        report = await off_loop(status)
        live = report.get("live")
        if isinstance(live, dict):
            # This process is the daemon: its numbers are current, the live-state file's up to 10 s old.
            live.update(
                in_flight=counters.in_flight,
                crashed=counters.crashed,
                last_reconcile_at=counters.last_reconcile_at,
                queues=dict(queues()),
                written_at=time.time(),
                age_seconds=0.0,
            )
        return web.json_response(report)

    async def index(_: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    app = web.Application(middlewares=[_guard])
    app.router.add_get("/", index)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/status", api_status)
    return app


# -- serving -------------------------------------------------------------------------------------------


def _answered(path: Path) -> bool:
    """Whether a live process listens on this socket file (then it is not ours to replace)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _bind_unix(path: Path) -> list[socket.socket]:
    if _answered(path):
        raise OSError(errno.EADDRINUSE, "another process listens on it")
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # left by a daemon that was killed: nothing answers on it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    return [sock]


def _bind_tcp(host: str, port: int) -> list[socket.socket]:
    """One socket per address the host resolves to (localhost: 127.0.0.1 and ::1). An address this
    machine lacks (::1 with IPv6 off) is skipped while another one binds."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = dict.fromkeys((family, addr[:2]) for family, _, _, _, addr in found)
    bound: list[socket.socket] = []
    missing: OSError | None = None
    try:
        for family, addr in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind at once after a reload
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(addr)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
                missing = exc
                continue
            bound.append(sock)
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    if not bound and missing is not None:
        raise missing
    return bound


def bind(config: Config) -> list[socket.socket]:
    """Bind ``http.listen`` now, before the daemon says READY: an address that cannot be bound is a
    ConfigError naming the key (the daemon exits 2, which the systemd units do not restart)."""
    address = config.http.address
    if address is None:
        raise ValueError("bind() needs http.listen")
    try:
        sockets = _bind_unix(address) if isinstance(address, Path) else _bind_tcp(*address)
    except OSError as exc:
        why = "address in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(
            f"{config.source}: http.listen = {config.http.listen!r}: cannot listen: {why}"
        ) from None
    for sock in sockets:
        sock.listen(128)
        sock.setblocking(False)
    return sockets


async def serve(
    sockets: list[socket.socket],
    *,
    config: Config,
    counters: Counters,
    queues: Callable[[], Mapping[str, int]],
    status: Callable[[], dict[str, Any]],
) -> None:
    """Serve on the sockets from `bind` until cancelled; closes them (and removes a unix socket file)."""
    try:
        app = make_app(config, counters=counters, queues=queues, status=status)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS)
        await runner.setup()
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    try:
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        log.info("http listener", listen=config.http.listen)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        address = config.http.address
        if isinstance(address, Path):
            with contextlib.suppress(OSError):
                address.unlink()
