"""``python -m bench.soak`` (`make soak`): the test suite under the soak profile, then one table of the soak
scenarios' figures.

``HYPOTHESIS_PROFILE=soak`` gives every property and state machine 1,000+ examples and the soak tests their
long sizes: the crash harness (1,000 files of ~1.5 GiB, 50 kills), the fault soak (2,000 files at 20%
faults, then a clean run for the time ratio), the bad-input cases at full size, and the schemathesis fuzz
(tests/test_server_fuzz.py) where present. Each scenario appends its figures to a JSON-lines file
(``SYNCD_SOAK_REPORT``); pytest's JUnit XML gives each test file's outcome. Figures are printed, never
asserted here; the exit code is pytest's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = (
    "scenario",
    "runs",
    "kills",
    "files",
    "duplicates",
    "lost",
    "wrong bytes",
    "wrong deletions",
    "time",
    "time ratio",
    "result",
)
SOAK_FILES = ("tests/test_crash.py", "tests/test_fault_soak.py", "tests/test_server_fuzz.py")
"""Test files whose tests without figures of their own (the fuzz) get a row of their own."""


def outcomes(junit: Path) -> dict[str, tuple[bool, float]]:
    """pytest node id (``tests/test_x.py::[Class::]test``) → (passed, seconds), from pytest's JUnit XML."""
    out: dict[str, tuple[bool, float]] = {}
    if not junit.exists():
        return out
    for case in ET.parse(junit).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")
        cut = next(
            (i for i in range(len(parts), 0, -1) if (ROOT / "/".join(parts[:i])).with_suffix(".py").exists()),
            0,
        )
        node = "::".join(["/".join(parts[:cut]) + ".py", *parts[cut:], case.get("name", "")])
        failed = any(child.tag in ("failure", "error") for child in case)
        out[node] = (not failed, float(case.get("time", 0.0)))
    return out


def _result(outcome: list[tuple[bool, float]]) -> str:
    bad = sum(1 for passed, _ in outcome if not passed)
    return "n/a" if not outcome else "pass" if bad == 0 else f"FAIL ({bad} of {len(outcome)})"


def _tests_row(name: str, outcome: list[tuple[bool, float]]) -> list[str]:
    seconds = sum(s for _, s in outcome)
    return [name, f"{len(outcome)} tests", *["—"] * 6, f"{seconds:.1f} s", "", _result(outcome)]


def rows(figures: Sequence[dict[str, Any]], results: dict[str, tuple[bool, float]]) -> list[list[str]]:
    table = []
    for fig in figures:
        clean = fig.get("clean_seconds")
        ratio = f"{fig['seconds'] / clean:.2f}x" if clean else "—"
        windows = ", ".join(f"{k} {v}" for k, v in sorted(fig.get("windows", {}).items()))
        outcome = [results[fig["test"]]] if fig.get("test") in results else []
        table.append(
            [
                fig["scenario"] + (f" ({windows})" if windows else ""),
                str(fig["runs"]),
                str(fig["kills"]),
                f"{fig['files']:,}" + (f" ({fig['bytes'] / 2**20:,.0f} MiB)" if fig.get("bytes") else ""),
                str(fig["duplicates"]),
                str(fig["lost"]),
                str(fig["wrong_bytes"]),
                str(fig["wrong_deletions"]),
                f"{fig['seconds']:.1f} s" + (f" (clean {clean:.1f} s)" if clean else ""),
                ratio,
                _result(outcome),
            ]
        )
    reported = {fig.get("test") for fig in figures}
    rest = {node: outcome for node, outcome in results.items() if node not in reported}
    for path in SOAK_FILES:
        mine = [o for node, o in rest.items() if node.startswith(path + "::")]
        if mine:
            table.append(_tests_row(path, mine))
    others = [o for node, o in rest.items() if not node.startswith(tuple(p + "::" for p in SOAK_FILES))]
    if others:
        table.append(_tests_row("the rest of the suite", others))
    return table


def render(table: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(COLUMNS)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in table]
    return "\n".join([line, rule, *body])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__.splitlines()[0],
        epilog="Other arguments go to pytest (default: the whole suite).",
    )
    _, pytest_args = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="syncd-soak-") as tmp:
        report, junit = Path(tmp) / "figures.jsonl", Path(tmp) / "junit.xml"
        env = {**os.environ, "HYPOTHESIS_PROFILE": "soak", "SYNCD_SOAK_REPORT": str(report)}
        argv_ = [sys.executable, "-m", "pytest", "-q", "--timeout", "7200", f"--junitxml={junit}"]
        code = subprocess.run([*argv_, *(pytest_args or ["tests"])], cwd=ROOT, env=env, check=False)
        lines = report.read_text(encoding="utf-8").splitlines() if report.exists() else []
        figures = [json.loads(line) for line in lines if line.strip()]
        print()
        print(render(rows(figures, outcomes(junit))))
        return code.returncode


if __name__ == "__main__":
    raise SystemExit(main())
