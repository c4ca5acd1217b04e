"""The daemon under a systemd-like supervisor: sd_notify, SIGHUP reload, SIGTERM exit 0, --embedded."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, wait_for

from syncd.server import RunningServer
from syncd.service import Notifier

pytestmark = pytest.mark.timeout(120)


class NotifySocket:
    """A unix datagram socket playing systemd's side of sd_notify."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.extend(self.sock.recv(4096).decode().splitlines())
            except BlockingIOError:
                return self.messages

    def saw(self, line: str) -> bool:
        return line in self.drain()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def write_config(path: Path, base_url: str, inbox: Path, *, settle: float = 0.2) -> None:
    path.write_text(
        f'[remote]\nbase_url = "{base_url}"\n[state]\ndir = "state"\n'
        f'[[watch]]\npath = "{inbox}"\nsettle_seconds = {settle}\n[log]\nformat = "json"\nlevel = "debug"\n',
        encoding="utf-8",
    )


def start_daemon(tmp_path: Path, config: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    log = (tmp_path / "daemon.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "syncd", "run", "--config", str(config), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )


def remote_md5s(base_url: str, api_key: str) -> list[str]:
    response = httpx.get(
        f"{base_url}/files", params={"limit": 1000}, headers={"Authorization": f"Bearer {api_key}"}
    )
    response.raise_for_status()
    return [item["md5"] for item in response.json()]


def test_notifier_is_silent_without_systemd() -> None:
    notifier = Notifier({})
    assert notifier.watchdog_interval is None
    notifier.ready("x")  # no socket: nothing happens, nothing raises


def test_watchdog_interval_is_half_of_systemds(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "s"), "WATCHDOG_USEC": "4000000"})
    assert notifier.watchdog_interval == 2.0
    other_pid = Notifier({"NOTIFY_SOCKET": "x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_interval is None


def test_ready_status_watchdog_reload_and_clean_stop(
    tmp_path: Path, server: RunningServer, notify: NotifySocket
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "syncd.toml"
    write_config(config, server.base_url, inbox)
    env = {"VLMRUN_API_KEY": server.api_key, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    proc = start_daemon(tmp_path, config, env)
    try:
        wait_for(lambda: notify.saw("READY=1"), what="READY=1")
        wait_for(lambda: notify.saw("WATCHDOG=1"), what="WATCHDOG=1")
        assert any(m.startswith("STATUS=") for m in notify.drain())
        (inbox / "a.txt").write_bytes(b"first")
        wait_for(lambda: hashlib.md5(b"first").hexdigest() in remote_md5s(server.base_url, server.api_key))

        # SIGHUP with a broken config keeps the running one (no crash loop) ...
        config.write_text("[remote\n", encoding="utf-8")
        proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: b"config reload failed" in (tmp_path / "daemon.log").read_bytes(), what="reload error"
        )
        (inbox / "b.txt").write_bytes(b"second")
        wait_for(lambda: hashlib.md5(b"second").hexdigest() in remote_md5s(server.base_url, server.api_key))

        # ... and a good one is applied: a second watch root starts syncing.
        extra = tmp_path / "extra"
        extra.mkdir()
        write_config(config, server.base_url, inbox)
        with config.open("a", encoding="utf-8") as fh:
            fh.write(f'[[watch]]\npath = "{extra}"\nsettle_seconds = 0.2\n')
        notify.messages.clear()
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: notify.saw("RELOADING=1"), what="RELOADING=1")
        wait_for(lambda: notify.saw("READY=1"), what="READY=1 after reload")
        (extra / "c.txt").write_bytes(b"third")
        wait_for(lambda: hashlib.md5(b"third").hexdigest() in remote_md5s(server.base_url, server.api_key))
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
    assert notify.saw("STOPPING=1")


def test_embedded_server_runs_the_quick_start(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "scan 001.pdf").write_bytes(b"%PDF-1.4 demo")
    config = tmp_path / "demo.toml"
    port = free_port()
    write_config(config, f"http://127.0.0.1:{port}/v1", inbox)
    env = {k: v for k, v in os.environ.items() if k != "VLMRUN_API_KEY"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "syncd", "run", "--embedded", "--config", str(config)],
        stdout=(tmp_path / "daemon.log").open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    key_file = tmp_path / "state" / "embedded-api-key"
    try:
        wait_for(key_file.exists, what="the embedded key file")
        assert key_file.stat().st_mode & 0o077 == 0
        key = key_file.read_text().strip()
        base_url = f"http://127.0.0.1:{port}/v1"
        md5 = hashlib.md5(b"%PDF-1.4 demo").hexdigest()

        def uploaded() -> bool:
            try:
                return md5 in remote_md5s(base_url, key)
            except httpx.HTTPError:
                return False

        wait_for(uploaded, what="the demo file on the embedded server")

        def status() -> dict[str, Any]:
            out = subprocess.run(
                [sys.executable, "-m", "syncd", "status", "--json", "--config", str(config)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            report: dict[str, Any] = json.loads(out.stdout)
            return report

        wait_for(lambda: status()["counts"].get("synced") == 1, what="status to report the file synced")
        assert status()["running"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    log_text = (tmp_path / "daemon.log").read_text()
    assert key not in log_text


def test_embedded_server_on_a_busy_port_is_a_one_line_error(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = tmp_path / "syncd.toml"
        write_config(config, f"http://127.0.0.1:{busy.getsockname()[1]}/v1", inbox)
        out = subprocess.run(
            [sys.executable, "-m", "syncd", "run", "--embedded", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1
    assert "remote.base_url: cannot start the embedded server" in out.stderr
