"""The Files API client a config describes: one place that turns `[remote]` into a `FilesClient`, for the
daemon, the one-shot passes and `syncd files`."""

from __future__ import annotations

from syncd.api import FilesClient
from syncd.api.client import FLOOR_THROUGHPUT
from syncd.config import Config
from syncd.depth import for_setting


def pool_size(config: Config) -> int:
    """Requests the client may have in flight: the pinned depth, or the adaptive depth's ceiling."""
    r = config.remote
    return r.max_concurrency if r.concurrency == "auto" else r.concurrency


def upload_workers(config: Config) -> int:
    """Jobs the upload stage works on at once: enough that jobs waiting out a backoff or a stalled answer
    (which hold no request slot) leave the slots busy."""
    return max(pool_size(config), config.remote.max_concurrency)


def make_client(config: Config, base_url: str, key: str) -> FilesClient:
    r = config.remote
    return FilesClient(
        base_url=base_url,
        api_key=key,
        timeout=r.timeout,
        retries=r.retries,
        concurrency=pool_size(config),
        depth=for_setting(r.concurrency, maximum=pool_size(config)),
        presigned_threshold=r.presigned_threshold,
        transport=r.transport,
        # A cap shared by every upload in flight slows each one: its deadline must allow for that.
        floor_throughput=min(
            FLOOR_THROUGHPUT, (r.max_upload_rate or FLOOR_THROUGHPUT) / pool_size(config) / 2
        ),
    )
