"""Start-up cost: ``syncd sync --once`` on an empty folder and ``syncd --help``, beside ``python -c "import
httpx"`` in the same run (best of five each): what a no-change pass pays before it looks at one file."""

from __future__ import annotations

from bench.common import PYTHON, Context, Outcome, Row, clean_env, run_timed, server, write_config

RUNS = 5


def startup(ctx: Context) -> Outcome:
    out = Outcome()
    base = ctx.fresh_dir("startup")
    root = base / "root"
    root.mkdir()
    with server(ctx, "startup") as srv:
        config = write_config(
            base / "config.toml", base_url=srv.base_url, state_dir=base / "state", root=root
        )
        env = clean_env(VLMRUN_API_KEY=srv.api_key)
        commands = {
            "sync --once, empty folder": [PYTHON, "-m", "syncd", "sync", "--once", "--config", str(config)],
            "syncd --help": [PYTHON, "-m", "syncd", "--help"],
            "import httpx": [PYTHON, "-c", "import httpx"],
        }
        best = {
            name: min(run_timed(argv, logs=base, env=env, timeout=60).seconds for _ in range(RUNS))
            for name, argv in commands.items()
        }
    peer = best["import httpx"]
    for name in ("sync --once, empty folder", "syncd --help"):
        out.rows.append(
            Row(
                f"start-up: {name} (best of {RUNS})",
                f"{best[name] * 1000:.0f} ms",
                f'python -c "import httpx": {peer * 1000:.0f} ms',
                f"{best[name] / peer:.2f}x its time",
                "printed",
                "n/a",
            )
        )
    return out
