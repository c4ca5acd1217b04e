"""The [http] listener against a real daemon process: /metrics parsed as Prometheus does, the status page
in a real (headless) Chromium, the DNS-rebinding guard, no API key anywhere, and a start that fails in one
line when the address is taken."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import DaemonProcess, ServerFactory, Syncd, free_port, wait_for
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from syncd.config import ConfigError, load_config
from syncd.http import host_allowed
from syncd.manifest import held_guards

# pytest-playwright 0.10's own `base_url` fixture trips a pytest 9 deprecation; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Session-scoped fixtures defined as instance methods")

MAX_BYTES = 4096
SYNCED = {
    "a.txt": b"alpha\n",
    "docs/b.txt": b"bravo " * 100,
    "scans/c.pdf": b"%PDF-1.4 charlie\n",
}
GONE = "gone.txt"
GONE_DATA = b"deleted locally; its prune is held by max_delete = 0\n"
TOO_BIG = "big.bin"

FAMILIES = {
    "syncd_files_uploaded": "counter",
    "syncd_bytes_uploaded": "counter",
    "syncd_cache_hits": "counter",
    "syncd_failures": "counter",
    "syncd_queue_depth": "gauge",
    "syncd_upload_seconds": "histogram",
    "syncd_in_flight": "gauge",
    "syncd_files": "gauge",
    "syncd_last_reconcile_timestamp_seconds": "gauge",
    "syncd_pruned": "counter",
    "syncd_held_prunes": "gauge",
}
"""Design §7's families (the parser names counters without their `_total` suffix)."""


@dataclass
class Watched:
    """A daemon with the listener on, after it synced SYNCED, failed TOO_BIG (413) and held one prune."""

    ws: Syncd
    daemon: DaemonProcess
    base: str
    port: int
    started_at: float

    def get(self, path: str, *, host: str | None = None) -> httpx.Response:
        headers = {"Host": host} if host is not None else {}
        return httpx.get(self.base + path, headers=headers, timeout=10)

    def metrics(self) -> dict[str, Metric]:
        response = self.get("/metrics")
        assert response.status_code == 200, response.text
        return {family.name: family for family in text_string_to_metric_families(response.text)}


def sample(families: dict[str, Metric], name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels}``, or None when there is none."""
    family = families[name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    for s in family.samples:
        if s.name == name and s.labels == labels:
            return float(s.value)
    return None


def held_one(w: Watched) -> dict[str, Metric] | None:
    families = w.metrics()
    return families if sample(families, "syncd_held_prunes") == 1 else None


@pytest.fixture
def watched(server_factory: ServerFactory, syncd_factory: Callable[..., Syncd]) -> Iterator[Watched]:
    server = server_factory(max_bytes=MAX_BYTES)
    ws = syncd_factory(server)
    ws.configure(settle=0.2, delete_grace=0.2, rescan=1.0)
    port = free_port()
    with ws.config_path.open("a", encoding="utf-8") as config:
        config.write(
            f'[http]\nlisten = "127.0.0.1:{port}"\n'
            # Reconcile every second; deleting even one file needs --confirm, so a prune is held.
            "[reconcile]\ninterval_seconds = 1.0\nmax_delete = 0\n"
        )
    for relpath, data in {**SYNCED, GONE: GONE_DATA, TOO_BIG: b"x" * (2 * MAX_BYTES)}.items():
        (ws.root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (ws.root / relpath).write_bytes(data)
    started_at = time.time()
    daemon = ws.start()
    daemon.wait_ready()
    ws.wait_synced(*SYNCED, GONE, daemon=daemon)
    wait_for(
        lambda: (row := ws.rows().get(TOO_BIG)) is not None and row.state.value == "failed",
        what="the oversized file to fail",
        diagnose=daemon.tail,
    )
    (ws.root / GONE).unlink()
    w = Watched(ws, daemon, f"http://127.0.0.1:{port}", port, started_at)
    wait_for(lambda: held_one(w), what="the reconciler to hold the prune", diagnose=daemon.tail)
    yield w
    assert daemon.stop() == 0, daemon.tail()


def test_metrics_count_what_the_server_holds(watched: Watched) -> None:
    families = watched.metrics()
    assert {name: families[name].type for name in FAMILIES if name in families} == FAMILIES

    remote = watched.ws.remote()
    assert len(remote) == len(SYNCED) + 1  # the deleted file's prune is held: still on the server
    assert sample(families, "syncd_files_uploaded_total") == len(remote)
    assert sample(families, "syncd_bytes_uploaded_total") == sum(f["bytes"] for f in remote)
    assert sample(families, "syncd_failures_total", kind="too_large") == 1
    assert sample(families, "syncd_files", state="synced") == len(SYNCED)
    assert sample(families, "syncd_files", state="failed") == 1
    assert sample(families, "syncd_files", state="deleted") == 1
    assert sample(families, "syncd_held_prunes") == 1
    assert families["syncd_pruned"].samples == []
    for source in ("local", "listing", "lookup"):
        assert sample(families, "syncd_cache_hits_total", source=source) == 0
    for stage in ("hash", "upload"):
        assert sample(families, "syncd_queue_depth", stage=stage) == 0
    assert sample(families, "syncd_in_flight") == 0
    reconciled = sample(families, "syncd_last_reconcile_timestamp_seconds")
    assert reconciled is not None
    assert watched.started_at <= reconciled <= time.time()

    buckets = [s for s in families["syncd_upload_seconds"].samples if s.name.endswith("_bucket")]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts)
    assert buckets[-1].labels == {"le": "+Inf"}
    assert counts[-1] == sample(families, "syncd_upload_seconds_count") == len(remote)
    assert 0 < (sample(families, "syncd_upload_seconds_sum") or 0) < 60


def chromium() -> str:
    """Debian's chromium; missing is a failure in CI (the test must run there) and a skip elsewhere."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (apt-get install chromium): the status page test needs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture
def page() -> Iterator[Any]:
    """A page in headless Debian chromium, for this test only: pytest-playwright's own session-scoped
    `page` keeps Playwright's event loop running for the rest of the session, and later tests that run
    an event loop of their own (run_until_complete) then fail."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium(),
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_status_page_in_a_browser(watched: Watched, page: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 1280, "height": 1000})
    page.goto(watched.base + "/")
    expect(page.locator("#count-synced .v")).to_have_text(str(len(SYNCED)))
    expect(page.locator("#count-failed .v")).to_have_text("1")
    expect(page.locator("#roots")).to_contain_text(str(watched.ws.root))
    expect(page.locator("#roots")).to_contain_text("available")
    failed = page.locator("#failed tr.failed-row")
    expect(failed).to_have_count(1)
    expect(failed.locator("td.path")).to_have_text(TOO_BIG)
    expect(failed.locator("td.reason")).to_contain_text("TooLargeError")
    expect(failed.locator("td.advice")).to_contain_text("max_file_size")
    expect(page.locator("#held-section")).to_be_visible()
    expect(page.locator("#held")).to_contain_text("max-delete")
    expect(page.locator("#confirm")).to_have_text(
        f"syncd reconcile --once --confirm --config {watched.ws.config_path}"
    )
    for relpath in SYNCED:
        expect(page.locator("#recent")).to_contain_text(relpath)
    page.screenshot(path=str(tmp_path / "status-page.png"), full_page=True)

    # It refreshes itself from /api/status, in place: a value set on the window survives the update.
    page.evaluate("window.loadedOnce = true")
    first = page.locator("#updated").inner_text()
    expect(page.locator("#updated")).not_to_have_text(first, timeout=15_000)
    assert page.evaluate("window.loadedOnce") is True


def test_foreign_host_is_refused_and_the_key_is_nowhere(watched: Watched) -> None:
    for path in ("/", "/metrics", "/api/status"):
        for host in ("evil.example", f"rebind.example:{watched.port}", "127.0.0.1.nip.io"):
            response = watched.get(path, host=host)
            assert response.status_code == 421, (path, host)
        # localhost on another port is an SSH tunnel (ssh -L 8080:127.0.0.1:PORT), not a rebinding.
        for host in (f"localhost:{watched.port}", "localhost:8080", f"127.0.0.1:{watched.port}"):
            assert watched.get(path, host=host).status_code == 200, (path, host)

    status_json = watched.ws.cli("status", "--json")
    assert status_json.returncode == 0, status_json.stderr
    shown = {path: watched.get(path).text for path in ("/metrics", "/api/status", "/")}
    shown["status --json"] = status_json.stdout + status_json.stderr
    over_http, from_cli = json.loads(shown["/api/status"]), json.loads(status_json.stdout)
    assert over_http.keys() == from_cli.keys()
    assert (over_http["counts"], over_http["failed"]) == (from_cli["counts"], from_cli["failed"])
    assert watched.daemon.stop() == 0
    shown["daemon log"] = watched.daemon.stdout_path.read_text() + watched.daemon.stderr()
    key = watched.ws.server.api_key
    assert [where for where, text in shown.items() if key in text] == []


def test_an_address_in_use_fails_the_start_in_one_line(
    server_factory: ServerFactory, syncd_factory: Callable[..., Syncd]
) -> None:
    ws = syncd_factory(server_factory())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with ws.config_path.open("a", encoding="utf-8") as config:
            config.write(f'[http]\nlisten = "127.0.0.1:{port}"\n')
        daemon = ws.start()
        assert daemon.proc.wait(20) == 2
    assert daemon.stderr().strip() == (
        f"syncd: {ws.config_path}: http.listen = '127.0.0.1:{port}': cannot listen: address in use"
    )
    assert daemon.logged("watching") == []  # never said READY


@pytest.mark.parametrize(
    ("listen", "error"),
    [
        ("0.0.0.0:9464", "http.listen: must be a loopback host:port"),
        ("192.168.1.5:9464", "http.listen: must be a loopback host:port"),
        ("example.com:9464", "http.listen: must be a loopback host:port"),
        ("127.0.0.1", "http.listen: must be a loopback host:port"),
        ("::1:9464", "http.listen: must be a loopback host:port"),
        ("relative.sock", "http.listen: must be a loopback host:port"),
        ("localhost:0", "http.listen: port must be 1-65535"),
        ("[::1]:70000", "http.listen: port must be 1-65535"),
    ],
)
def test_listen_must_be_local(tmp_path: Path, listen: str, error: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[http]\nlisten = "{listen}"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert error in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("127.8.0.1:1", ("127.8.0.1", 1)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:9464", ("localhost", 9464)),
        ("/run/syncd/http.sock", Path("/run/syncd/http.sock")),
    ],
)
def test_local_addresses_are_accepted(tmp_path: Path, listen: str, address: object) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[http]\nlisten = "{listen}"\n', encoding="utf-8")
    assert load_config(config).http.address == address


def test_off_by_default(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("", encoding="utf-8")
    assert load_config(config).http.address is None


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("LOCALHOST:9464", True),
        ("127.0.0.1:9464", True),
        ("127.1.2.3", True),
        ("[::1]:9464", True),
        (None, False),
        ("", False),
        ("evil.example", False),
        ("localhost.evil.example:9464", False),
        ("10.0.0.1:9464", False),
        ("[::2]:9464", False),
        ("localhost:notaport", False),
    ],
)
def test_host_guard(host: str | None, allowed: bool) -> None:
    assert host_allowed(host) is allowed


def test_held_guards_split_on_guard_names_only() -> None:
    note = (
        "root-unavailable: /srv/scans: root is missing (unmounted or renamed?); none of its files count as"
        " deleted (0 action(s) held); max-delete: the plan deletes 150 remote files, more than max_delete"
        " = 100; run `syncd reconcile --once --confirm` to apply it"
    )
    assert [g.split(":")[0] for g in held_guards(note)] == ["root-unavailable", "max-delete"]
    assert held_guards(None) == []
