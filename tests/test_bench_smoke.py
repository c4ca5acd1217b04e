"""The benchmark harness runs end to end at quick sizes and prints its table.

Figures are printed, never asserted: a busy shared machine must not fail the suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHEAP = ("hashing", "nochange_100k", "initial")


def test_quick_run_prints_a_table(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", ",".join(CHEAP), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| benchmark ")
    assert any(line.startswith("| hashing ") for line in lines)
    assert any(line.startswith("| no-change pass") for line in lines)
    assert any(line.startswith("| initial sync") for line in lines)
    assert any(line.startswith("Server: ") for line in lines)
    assert not any("crash" in line for line in lines), result.stdout
    assert list(tmp_path.iterdir()) == []  # the work dir is cleaned up


def test_unknown_benchmark_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "nope", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 2
    assert "unknown benchmark nope" in result.stderr
