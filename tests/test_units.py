"""The systemd units: each passes `systemd-analyze verify`, the system units stay hardened (exposure <= 3.5)
and keep what the daemon needs, and the daemon works under the parts of that sandbox a process can apply
to itself (containers have no service manager to run the real unit).

Without systemd-analyze the unit checks skip, except under CI (CI=true), where `.ci/run` installs it and a
missing tool is a failure: a green CI run must mean the units were checked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Syncd, md5_of

from syncd.server import RunningServer

pytestmark = pytest.mark.timeout(60)

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SYSTEM_UNITS = (UNITS / "syncd.service", UNITS / "syncd@.service")
USER_UNIT = UNITS / "user" / "syncd.service"
MAX_EXPOSURE = 3.5
EXPOSURE_RE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) ")

# Applies, then execs argv[3:]: MemoryDenyWriteExecute= through the kernel's own switch (PR_SET_MDWE = 65,
# PR_MDWE_REFUSE_EXEC_GAIN = 1; inherited across fork and exec) and UMask=.
SANDBOX = """
import ctypes, os, sys
if sys.argv[1] == "yes" and ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    raise SystemExit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.umask(int(sys.argv[2], 8))
os.execvp(sys.argv[3], sys.argv[3:])
"""


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def systemd_analyze_path() -> str:
    """Called inside each test, not as a fixture, so that under CI a missing tool is a FAILED test."""
    path = shutil.which("systemd-analyze")
    if path is None:
        if on_ci():
            pytest.fail("systemd-analyze is missing under CI (.ci/run installs the systemd package)")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd); CI runs these checks")
    return path


def directives(unit: Path) -> dict[str, list[str]]:
    """Every Key=Value of the unit, values in file order (systemd appends repeated keys)."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def runnable_copy(unit: Path, into: Path) -> Path:
    """The unit with ExecStart running this interpreter's syncd: verify refuses a program that is absent."""
    program = f'ExecStart="{sys.executable}" -m syncd'
    text, count = re.subn(r"^ExecStart=\S+", program, unit.read_text(encoding="utf-8"), flags=re.M)
    assert count == 1, f"{unit.name}: expected one ExecStart="
    into.mkdir(parents=True, exist_ok=True)
    copy = into / unit.name
    copy.write_text(text, encoding="utf-8")
    return copy


def systemd_analyze(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "runtime"  # --user needs a runtime dir even offline; a container has none
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "XDG_RUNTIME_DIR": str(runtime)}
    return subprocess.run(
        ["nice", systemd_analyze_path(), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("unit", [*SYSTEM_UNITS, USER_UNIT], ids=lambda u: str(u.relative_to(UNITS)))
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    copy = runnable_copy(unit, tmp_path / "units")
    scope = ("--user",) if unit == USER_UNIT else ()
    done = systemd_analyze(*scope, "verify", str(copy), tmp_path=tmp_path)
    output = done.stdout + done.stderr
    # Unknown keys and bad values are only warnings (exit 0): any line about our unit is a finding.
    findings = [line for line in output.splitlines() if "syncd" in line]
    assert done.returncode == 0, output
    assert findings == [], output


@pytest.mark.parametrize("unit", SYSTEM_UNITS, ids=lambda u: u.name)
def test_system_unit_exposure_is_at_most_3_5(unit: Path, tmp_path: Path) -> None:
    copy = runnable_copy(unit, tmp_path / "units")
    done = systemd_analyze("security", "--offline=yes", str(copy), tmp_path=tmp_path)
    match = EXPOSURE_RE.search(done.stdout + done.stderr)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, done.stdout


@pytest.mark.parametrize("unit", SYSTEM_UNITS, ids=lambda u: u.name)
def test_system_unit_keeps_what_the_daemon_needs(unit: Path) -> None:
    """Hardening must not take away the service contract (design §7) or what the daemon uses."""
    d = directives(unit)
    assert d["Type"] == ["notify"]
    assert d["WatchdogSec"]
    assert d["RestartPreventExitStatus"] == ["2 3"]
    assert d["StateDirectory"][0]
    assert d["LoadCredential"][0].startswith("api-key:")
    # sd_notify and a unix-socket listener, the remote API and the loopback listener.
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(" ".join(d["RestrictAddressFamilies"]).split())
    assert d.get("PrivateNetwork", ["no"]) == ["no"]
    assert d.get("ProcSubset", ["all"]) == ["all"]  # prometheus-client's process_* metrics read /proc/stat


def test_daemon_syncs_under_the_units_process_sandbox(tmp_path: Path, server: RunningServer) -> None:
    """MemoryDenyWriteExecute, UMask, no capabilities, no_new_privs and a read-only watched folder: the
    daemon still watches with inotify (watchdog's ctypes calls), uploads, and stops cleanly."""
    d = directives(SYSTEM_UNITS[0])
    assert d["MemoryDenyWriteExecute"] == ["yes"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""]
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    probe = subprocess.run(
        [sys.executable, "-c", SANDBOX, "yes", "022", "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"this kernel cannot apply MemoryDenyWriteExecute to a process: {probe.stderr.strip()}")
    caps = ("--bounding-set=-all", "--inh-caps=-all") if os.geteuid() == 0 else ()
    launcher = (sys.executable, "-c", SANDBOX, "yes", d["UMask"][0], setpriv, "--no-new-privs", *caps, "--")
    w = Syncd(tmp_path / "w", server, launcher=launcher)
    w.configure(mode="inotify", settle=0.2)
    if os.geteuid() == 0:
        os.chown(w.root, 65534, 65534)  # as ReadOnlyPaths= for a dynamic user: readable, not writable
    try:
        daemon = w.start()
        daemon.wait_ready()
        status = Path(f"/proc/{daemon.proc.pid}/status").read_text(encoding="utf-8")
        assert re.search(r"^CapEff:\s+0+$", status, re.M), status
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        assert re.search(rf"^Umask:\s+{d['UMask'][0]}$", status, re.M), status
        (w.root / "scan.pdf").write_bytes(b"%PDF-1.4 sandboxed")
        w.wait_synced("scan.pdf", md5={"scan.pdf": md5_of(b"%PDF-1.4 sandboxed")}, daemon=daemon)
        assert daemon.stop() == 0, daemon.tail()
    finally:
        w.close()
