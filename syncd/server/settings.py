"""Settings of the reference Files API server, built by ``syncd serve`` or by the embedded daemon."""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from pathlib import Path

FAULT_KINDS: tuple[str, ...] = ("500", "503", "429", "reset", "slow")


@dataclass(frozen=True)
class ServerSettings:
    """What the server does, fixed for its lifetime.

    ``reject_types`` entries are matched case-insensitively: an entry starting with ``.`` is a filename
    extension (``.exe``), an entry with a ``/`` is a MIME type (``application/pdf``) or a MIME family
    (``video/*``), and a bare word is taken as an extension (``exe`` = ``.exe``). A MIME entry matches the
    type the client declared for the part (or the presigned PUT) and the type guessed from the filename,
    because the official SDK declares none.
    """

    data_dir: Path
    api_key: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_bytes: int | None = None
    reject_types: tuple[str, ...] = ()
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = FAULT_KINDS
    fault_seed: int | None = None
    latency_ms: int = 0
    public_only: bool = False

    def __post_init__(self) -> None:
        if not self.api_key:
            raise ValueError("an API key is required (--api-key or SYNCD_SERVER_API_KEY)")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {self.max_bytes}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be between 0 and 1, got {self.fault_rate}")
        unknown = sorted(set(self.fault_kinds) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; choose from {', '.join(FAULT_KINDS)}")
        if self.fault_rate > 0 and not self.fault_kinds:
            raise ValueError("fault_rate > 0 needs at least one fault kind")
        if self.latency_ms < 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")
        if any(not entry.strip() for entry in self.reject_types):
            raise ValueError("reject_types contains an empty entry")


def is_rejected_type(reject_types: tuple[str, ...], filename: str, declared_type: str | None) -> bool:
    """Whether a file is refused (415) by ``reject_types``; see :class:`ServerSettings` for the syntax."""
    if not reject_types:
        return False
    name = filename.lower()
    guessed, _ = mimetypes.guess_type(name, strict=False)
    types = {t.split(";", 1)[0].strip().lower() for t in (declared_type, guessed) if t}
    for raw in reject_types:
        entry = raw.strip().lower()
        if "/" in entry:
            if entry.endswith("/*"):
                if any(t.startswith(entry[:-1]) for t in types):
                    return True
            elif entry in types:
                return True
        else:
            suffix = entry if entry.startswith(".") else f".{entry}"
            if name.endswith(suffix):
                return True
    return False
