"""Wire models of the Files API, shared by the client and the reference server.

Extra fields are ignored on input so that syncd keeps working when the service adds fields, and
optional ones (``md5``) are how syncd notices an extension before it relies on it (design §5).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from syncd.config import PURPOSES as PURPOSES
from syncd.config import Purpose as Purpose


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class FileResponse(_Wire):
    id: str
    filename: str | None = None
    bytes: int
    purpose: Purpose
    created_at: datetime
    object: str = "file"
    public_url: str | None = None
    md5: str | None = Field(default=None, description="server extension; absent on the public API")


class PresignedUrlRequest(_Wire):
    filename: str = Field(min_length=1, max_length=1024)
    purpose: Annotated[
        Purpose,
        WithJsonSchema({"anyOf": [{"type": "string", "enum": list(PURPOSES)}, {"type": "null"}]}),
    ] = "assistants"
    expiration: int | None = Field(default=None, ge=1, le=7 * 24 * 3600, strict=True)

    @field_validator("purpose", mode="before")
    @classmethod
    def _null_purpose(cls, value: object) -> object:
        """The SDK's ``generate_presigned_url`` sends ``"purpose": null``; read it as the default."""
        return "assistants" if value is None else value

    @field_validator("expiration", mode="before")
    @classmethod
    def _integral(cls, value: object) -> object:
        """JSON Schema counts ``60.0`` as an integer; strict mode still refuses ``true`` and ``"60"``."""
        return int(value) if isinstance(value, float) and value.is_integer() else value


class PresignedUrlResponse(_Wire):
    id: str
    url: str
    filename: str | None = None
    content_type: str = "application/octet-stream"
    upload_method: str = "PUT"
    public_url: str | None = None
    created_at: datetime
    expiration: int | None = None


class ErrorDetail(_Wire):
    detail: str
