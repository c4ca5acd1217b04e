"""Files API client: typed models, an error taxonomy by status, retries; httpx stays inside this package."""

from syncd.api.client import FilesClient
from syncd.api.errors import (
    ApiError,
    AuthError,
    InvalidResponseError,
    NetworkError,
    NotFoundError,
    OutcomeUnknownError,
    RateLimitedError,
    ServerError,
    SourceChangedError,
    TooLargeError,
    UnsupportedTypeError,
    ValidationError,
)
from syncd.api.models import (
    PURPOSES,
    ErrorDetail,
    FileResponse,
    PresignedUrlRequest,
    PresignedUrlResponse,
    Purpose,
)
from syncd.api.retry import RetryPolicy
from syncd.api.transport import TRANSPORTS, TransportKind, make_transport

__all__ = [
    "PURPOSES",
    "TRANSPORTS",
    "ApiError",
    "AuthError",
    "ErrorDetail",
    "FileResponse",
    "FilesClient",
    "InvalidResponseError",
    "NetworkError",
    "NotFoundError",
    "OutcomeUnknownError",
    "PresignedUrlRequest",
    "PresignedUrlResponse",
    "Purpose",
    "RateLimitedError",
    "RetryPolicy",
    "ServerError",
    "SourceChangedError",
    "TooLargeError",
    "TransportKind",
    "UnsupportedTypeError",
    "ValidationError",
    "make_transport",
]
