"""The interaction record: what an application logs, validated strictly.

The record is the public write contract (DESIGN.md): every ingest path, the Python API and external
harvest sources go through `parse_record`, so a bad row is caught once, with one reason, before it can
reach training data. Validation is strict on purpose: `"yes"` is not a boolean, `1.0` is not a thumb,
a timestamp without a timezone is ambiguous, and an unknown key is probably a typo.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from storage.errors import InvalidRecord

Role = Literal["system", "user", "assistant", "tool"]
MAX_ID_CHARS = 200


def _parse_iso8601(value: object) -> datetime:
    """ISO-8601 string (or aware datetime) -> aware UTC datetime; anything else is an error."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not an ISO-8601 timestamp: {value[:40]!r}") from None
    else:
        raise ValueError(f"must be an ISO-8601 string, got {type(value).__name__}")
    if parsed.tzinfo is None:
        raise ValueError("timestamp has no timezone offset (add 'Z' or '+00:00')")
    return parsed.astimezone(UTC)


Timestamp = Annotated[datetime, BeforeValidator(_parse_iso8601)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Message(_Strict):
    role: Role
    content: str


class Feedback(_Strict):
    thumb: int | None = None  # 1 (up) or -1 (down)
    rating: Annotated[int, Field(ge=1, le=5)] | None = None  # 1..5 stars
    comment: str | None = None

    @field_validator("thumb")
    @classmethod
    def _thumb_is_up_or_down(cls, value: int | None) -> int | None:
        if value is not None and value not in (1, -1):
            raise ValueError("thumb must be 1 or -1")
        return value

    def is_empty(self) -> bool:
        return self.thumb is None and self.rating is None and not self.comment


class InteractionRecord(_Strict):
    """One logged interaction: the conversation up to the response, the response, and what users said."""

    id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)] | None = None
    ts: Timestamp
    track: Annotated[str, Field(min_length=1, max_length=100)]
    user_id: Annotated[str, Field(min_length=1, max_length=200)]
    session_id: Annotated[str, Field(max_length=200)] | None = None
    messages: Annotated[list[Message], Field(min_length=1)]
    response: str
    model: Annotated[str, Field(min_length=1, max_length=200)]
    feedback: Feedback | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    consent: bool = True

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, value: list[Message]) -> list[Message]:
        if not any(m.role == "user" for m in value):
            raise ValueError("needs at least one message with role 'user'")
        return value

    def content_sha256(self) -> str:
        """Hash of what makes two records the same interaction (not feedback, not consent)."""
        return content_sha256(self)

    def dedup_key(self) -> str:
        """The idempotency key: the client's id when given, the content hash otherwise."""
        return f"id:{self.id}" if self.id is not None else f"sha256:{self.content_sha256()}"

    def prompt_text(self) -> str:
        """The last user message: what the model was asked."""
        return next(m.content for m in reversed(self.messages) if m.role == "user")


def content_sha256(record: InteractionRecord) -> str:
    canonical = {
        "ts": record.ts.isoformat(),
        "track": record.track,
        "user_id": record.user_id,
        "session_id": record.session_id,
        "messages": [[m.role, m.content] for m in record.messages],
        "response": record.response,
        "model": record.model,
    }
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def describe_validation_error(error: ValidationError) -> str:
    """First problem of a pydantic error as one short line: `field.path: problem`."""
    first = error.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "record"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "required key is missing"
    return f"{where}: {message}"


def parse_record(data: object) -> InteractionRecord:
    """Validate one decoded JSON value as an interaction record or raise `InvalidRecord`."""
    if isinstance(data, InteractionRecord):
        return data
    if not isinstance(data, Mapping):
        raise InvalidRecord(f"record must be a JSON object, got {type(data).__name__}")
    try:
        return InteractionRecord.model_validate(dict(data))
    except ValidationError as error:
        raise InvalidRecord(describe_validation_error(error)) from None


def parse_record_line(line: str) -> InteractionRecord:
    """Validate one JSONL line; the reason of a failure is a short phrase fit for quarantine."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise InvalidRecord(f"invalid JSON: {error.msg} (column {error.colno})") from None
    return parse_record(data)


def record_to_json(record: InteractionRecord) -> dict[str, Any]:
    """The record as the JSON object of the public contract (timestamps in ISO-8601, UTC)."""
    return record.model_dump(mode="json", exclude_none=True)
