"""Live request counters, read by tests and benchmarks from another thread while the server runs."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import Literal

RouteKind = Literal[
    "uploads",
    "presigns",
    "presigned_puts",
    "verifies",
    "hash_lookups",
    "lists",
    "gets",
    "contents",
    "deletes",
    "health",
    "unauthorized",
]


@dataclass
class ServerStats:
    """Requests that reached a handler, by route kind, plus faults injected before any handler ran.

    Counts are attempts, not successes: an upload answered 413 still counts in ``uploads``; a request
    that got an injected fault counts only in ``faults``; one refused with 401 only in ``unauthorized``.
    """

    uploads: int = 0
    presigns: int = 0
    presigned_puts: int = 0
    verifies: int = 0
    hash_lookups: int = 0
    lists: int = 0
    gets: int = 0
    contents: int = 0
    deletes: int = 0
    health: int = 0
    unauthorized: int = 0
    faults: int = 0
    faults_by_kind: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, kind: RouteKind) -> None:
        with self._lock:
            setattr(self, kind, getattr(self, kind) + 1)

    def count_fault(self, kind: str) -> None:
        with self._lock:
            self.faults += 1
            self.faults_by_kind[kind] = self.faults_by_kind.get(kind, 0) + 1

    def snapshot(self) -> dict[str, int]:
        """A consistent copy of the route counters and ``faults`` (per-kind faults are ``fault_<kind>``)."""
        with self._lock:
            out = {f.name: getattr(self, f.name) for f in fields(self) if f.name[0] != "_"}
            by_kind = out.pop("faults_by_kind")
            out.update({f"fault_{k}": v for k, v in by_kind.items()})
            return out
