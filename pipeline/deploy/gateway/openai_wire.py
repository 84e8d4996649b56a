"""The OpenAI wire format as the gateway needs it: error bodies, reply summaries, SSE rewriting.

The gateway forwards bodies as they are and only touches three things: the error body it answers
itself (`{"error": {message, type, param, code}}`, which every OpenAI client parses into a typed
exception), the completion's `id` (replaced by the interaction id, so the id a client sees is the one
it gives feedback on), and the reply it reads out to log. Hand-written because it is that small: a
full OpenAI model layer (the `openai` package's types) would validate, and could reject, bodies the
gateway must pass through untouched. Pure: no I/O, unit-tested on bytes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = [
    "GatewayError",
    "Reply",
    "SseEvent",
    "SseRewriter",
    "error_body",
    "fold_event",
    "rewrite_completion",
]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
}
_EVENT_END = re.compile(rb"\r?\n\r?\n")


class GatewayError(Exception):
    """A request the gateway refuses itself, answered with `status` and an OpenAI-style error body."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, code=self.code, param=self.param)


def error_body(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Reply:
    """What the model answered, as logged: the first choice's text, why it stopped, token usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    choices: int = 0  # how many choices the reply had (only the first one is logged)


def _choice_text(choice: dict[str, Any], kind: str, *, streamed: bool) -> str:
    if kind == "completion":
        text = choice.get("text")
    else:
        message = choice.get("delta" if streamed else "message") or {}
        text = message.get("content") if isinstance(message, dict) else None
    return text if isinstance(text, str) else ""


def rewrite_completion(body: bytes, interaction_id: str, kind: str) -> tuple[bytes, Reply]:
    """A non-streamed completion with its `id` replaced, and its reply; bodies that are not a JSON
    object with choices come back unchanged with an empty reply."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body, Reply()
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return body, Reply()
    data["id"] = interaction_id
    choices = [choice for choice in data["choices"] if isinstance(choice, dict)]
    first = min(choices, key=lambda choice: choice.get("index", 0), default={})
    reply = Reply(
        text=_choice_text(first, kind, streamed=False),
        finish_reason=first.get("finish_reason"),
        usage=data.get("usage") if isinstance(data.get("usage"), dict) else None,
        choices=len(choices),
    )
    return orjson.dumps(data), reply


@dataclass
class SseEvent:
    """One server-sent event as it goes to the client, with what it adds to the reply."""

    data: bytes
    text: str = ""  # reply text this event carries (first choice)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    choice_indexes: set[int] = field(default_factory=set)
    error: str | None = None  # the endpoint reported a failure in the stream (vLLM: `{"error": {...}}`)


class SseRewriter:
    """Splits an upstream SSE byte stream into events, replacing each chunk's `id` with `interaction_id`.

    Bytes arrive in arbitrary pieces; `feed` returns only whole events, `flush` what is left at the end.
    Events that are not JSON chunks (comments, `[DONE]`, anything unparsable) pass through unchanged.
    """

    def __init__(self, interaction_id: str, kind: str) -> None:
        self.interaction_id = interaction_id
        self.kind = kind
        self._buffer = b""

    def feed(self, chunk: bytes) -> Iterator[SseEvent]:
        self._buffer += chunk
        while (match := _EVENT_END.search(self._buffer)) is not None:
            raw, self._buffer = self._buffer[: match.start()], self._buffer[match.end() :]
            yield self._event(raw)

    def flush(self) -> Iterator[SseEvent]:
        if self._buffer.strip():
            yield SseEvent(self._buffer)
        self._buffer = b""

    def _event(self, raw: bytes) -> SseEvent:
        lines = raw.splitlines()
        data_lines = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
        if len(data_lines) != 1 or len(lines) != 1:
            return SseEvent(raw + b"\n\n")
        try:
            chunk = orjson.loads(data_lines[0])
        except orjson.JSONDecodeError:
            return SseEvent(raw + b"\n\n")  # `[DONE]` and anything else that is not JSON
        if not isinstance(chunk, dict):
            return SseEvent(raw + b"\n\n")
        return self._chunk_event(chunk)

    def _chunk_event(self, chunk: dict[str, Any]) -> SseEvent:
        if "id" in chunk:
            chunk["id"] = self.interaction_id
        event = SseEvent(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if isinstance(chunk.get("usage"), dict):
            event.usage = chunk["usage"]
        if isinstance(chunk.get("error"), dict):
            event.error = str(chunk["error"].get("message") or chunk["error"])[:300]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict) or not isinstance(choice.get("index", 0), int):
                continue
            index = choice.get("index", 0)
            event.choice_indexes.add(index)
            if index == 0:
                event.text = _choice_text(choice, self.kind, streamed=True)
                event.finish_reason = choice.get("finish_reason")
        return event


def fold_event(reply: Reply, event: SseEvent) -> None:
    """Add what a sent event carried to the reply being logged."""
    reply.text += event.text
    reply.finish_reason = event.finish_reason or reply.finish_reason
    reply.usage = event.usage or reply.usage
    if event.choice_indexes:
        reply.choices = max(reply.choices, max(event.choice_indexes) + 1)
