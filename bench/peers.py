"""Child programs the benchmarks time: the official SDK's upload loop, syncd's hasher on its own, and the
plain ``os.scandir`` walk (kept as source text so it runs as ``python -c`` with nothing of ours imported).

``python -m bench.peers sdk-upload --base-url URL --list FILE`` (key in ``VLMRUN_API_KEY``)
``python -m bench.peers hash --workers N FILE...`` (prints JSON: seconds, bytes, md5 per file)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

WALK_SOURCE = """
import os, sys
count = 0
stack = [sys.argv[1]]
while stack:
    with os.scandir(stack.pop()) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            else:
                entry.stat(follow_symlinks=False)
                count += 1
print(count)
"""
"""The peer of the no-change pass: what any tool must at least do to notice a change (one lstat per file)."""


def sdk_upload(base_url: str, list_file: Path, purpose: str) -> None:
    """What a user of the official SDK writes: one ``files.upload`` per file, in a loop."""
    from vlmrun.client import VLMRun

    client = VLMRun(api_key=os.environ["VLMRUN_API_KEY"], base_url=base_url)
    count = 0
    for line in list_file.read_text().splitlines():
        if line:
            client.files.upload(Path(line), purpose=purpose)
            count += 1
    print(count)


def hash_files(paths: list[str], workers: int) -> None:
    """syncd's hashing stage alone (xxh3_128 + md5 in one pass), timed from the first submit to the last
    digest, so interpreter start and imports are not charged to it."""
    from syncd.hashing import Digest, Hasher

    async def run(hasher: Hasher) -> list[object]:
        return list(await asyncio.gather(*(hasher.hash(p) for p in paths)))

    with Hasher(workers=workers) as hasher:
        start = time.perf_counter()
        results = asyncio.run(run(hasher))
        elapsed = time.perf_counter() - start
    md5s: dict[str, str] = {}
    total = 0
    for path, result in zip(paths, results, strict=True):
        if not isinstance(result, Digest):
            print(f"{path}: {result}", file=sys.stderr)
            sys.exit(1)
        md5s[path] = result.md5
        total += result.size
    print(json.dumps({"seconds": elapsed, "bytes": total, "md5": md5s, "workers": hasher.workers}))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("sdk-upload")
    up.add_argument("--base-url", required=True)
    up.add_argument("--list", type=Path, required=True)
    up.add_argument("--purpose", default="assistants")
    hs = sub.add_parser("hash")
    hs.add_argument("--workers", type=int, required=True)
    hs.add_argument("paths", nargs="+")
    args = parser.parse_args()
    if args.command == "sdk-upload":
        sdk_upload(args.base_url, args.list, args.purpose)
    else:
        hash_files(args.paths, args.workers)


if __name__ == "__main__":
    main()
