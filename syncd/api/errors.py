"""Error taxonomy of the Files API client.

Callers decide by class (or by the two flags) and never see an httpx exception:

- ``retryable``: the client's own retry loop tries again (429, 5xx, timeouts, connection errors); when it
  still raises one of these, the caller may schedule a later attempt.
- ``permanent``: the server rejected this *content* (413, 415, 400/422); retrying the same file cannot
  succeed, so the uploader marks the row ``failed`` until the file changes (design §3).

Anything else (401/403, 404, an unexpected 4xx) is neither: the configuration or the remote state is wrong,
not the file.
"""

from __future__ import annotations


class ApiError(Exception):
    """Base class of every error the client raises for a request it sent (or tried to send)."""

    retryable: bool = False
    permanent: bool = False

    def __init__(self, detail: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {detail}" if status is not None else detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        """The server's ``Retry-After`` in seconds (429 and 503 carry one, RFC 9110 §10.2.3), if sent."""


class AuthError(ApiError):
    """401/403: the API key is missing, wrong or lacks access."""


class NotFoundError(ApiError):
    """404: no such file (or route)."""


class TooLargeError(ApiError):
    """413: the file exceeds the server's size limit."""

    permanent = True


class UnsupportedTypeError(ApiError):
    """415: the server refuses this file type."""

    permanent = True


class ValidationError(ApiError):
    """400/422: the server rejected the request's parameters or body."""

    permanent = True


class RateLimitedError(ApiError):
    """429: too many requests; ``retry_after`` is the server's ``Retry-After`` in seconds, if it sent one."""

    retryable = True


class ServerError(ApiError):
    """5xx: the server failed; worth another try."""

    retryable = True


class NetworkError(ApiError):
    """No usable response: timeout, refused or reset connection, malformed HTTP. ``status`` is None."""

    retryable = True


class InvalidResponseError(ApiError):
    """The server answered, but not as the API documents: not JSON, wrong types, or too large to read.

    Neither retryable nor permanent: a server (or a proxy before it) that answers garbage is misconfigured,
    and the same request need not be wrong elsewhere.
    """


class OutcomeUnknownError(ApiError):
    """A request that stores a new file got no answer saying whether it did (a timeout, a reset, a 500):
    the file may be stored. Never retried by the client, since sending it again could store a second
    copy; the caller asks the remote cache (md5 lookup) before sending it again (design §3)."""


class SourceChangedError(Exception):
    """The local file changed size or mtime while it was being sent, so the upload was aborted.

    Not an :class:`ApiError`: the server did nothing wrong and a retry would send a moving target. The
    uploader puts the path back to settle (design §1) instead.
    """

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


def error_for_status(status: int, detail: str, *, retry_after: float | None = None) -> ApiError:
    """Map an HTTP error status to its class; an unexpected 4xx is a plain, non-retryable ApiError."""
    if status in (401, 403):
        return AuthError(detail, status=status)
    if status == 404:
        return NotFoundError(detail, status=status)
    if status == 413:
        return TooLargeError(detail, status=status)
    if status == 415:
        return UnsupportedTypeError(detail, status=status)
    if status in (400, 422):
        return ValidationError(detail, status=status)
    if status == 429:
        return RateLimitedError(detail, status=status, retry_after=retry_after)
    if status >= 500:
        return ServerError(detail, status=status, retry_after=retry_after if status == 503 else None)
    return ApiError(detail, status=status)
