"""The reference server as a separate process that reports its address and request counters on a pipe.

``syncd serve`` would do for serving, but its counters (``ServerStats``) live in its process and are not
exposed over HTTP, and it cannot tell its caller which port 0 became. This launcher runs the very same
``running_server`` (uvicorn + httptools, same app), prints ``{"base_url": ...}`` as its first stdout line,
answers each ``stats`` line on stdin with one JSON line of counters, and stops at end of input (so it also
stops when the benchmark process dies).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from syncd.server import ServerSettings, running_server


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._server")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--latency-ms", type=int, default=0)
    args = parser.parse_args()
    api_key = os.environ["SYNCD_SERVER_API_KEY"]
    # The protocol owns the real stdout; anything else printed (uvicorn, warnings) goes to stderr.
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    settings = ServerSettings(data_dir=args.data_dir, api_key=api_key, port=0, latency_ms=args.latency_ms)
    with running_server(settings) as server:
        proto.write(json.dumps({"base_url": server.base_url}) + "\n")
        for line in sys.stdin:
            if line.strip() == "stats":
                proto.write(json.dumps(server.stats.snapshot()) + "\n")


if __name__ == "__main__":
    main()
