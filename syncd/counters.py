"""What one process run did, as plain numbers: the progress bar, the one-shot summary and the live state
read them; the stages only add to them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Counters:
    scanned: int = 0
    hashed: int = 0
    unchanged: int = 0
    uploaded: int = 0
    reused: int = 0
    failed: int = 0
    retry: int = 0
    changed: int = 0
    unreadable: int = 0
    bytes_uploaded: int = 0
    deleted: int = 0
    walk_errors: int = 0
    crashed: int = 0
    """Jobs that hit a bug: logged with a traceback, counted here and in `status`, the row retried later."""
    in_flight: int = 0
    """Uploads being resolved or sent right now."""
