"""One served exchange and the interaction record it becomes: who asked, what, what answered, how.

The record is the store's public contract (`storage.records.InteractionRecord`), so served traffic is
harvested the next night like any logged interaction: the track from the requested name, `model` the
adapter that actually answered (`support@v3`, not `support`), the user from the OpenAI `user` field
or `X-Overnight-User`, the session from `X-Overnight-Session`, consent from `X-Overnight-Consent` or
the API key's default. `metadata.gateway` keeps the rest: the key's name (never the key), endpoint,
latency, usage, finish reason, streamed or not, and whether the client disconnected mid-stream.

Pure: building a record does no I/O. An exchange that cannot be a valid record (a chat without a
user turn) becomes a quarantine row with the reason, so nothing served is silently unlogged.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from pipeline.deploy.gateway.openai_wire import GatewayError, Reply
from pipeline.deploy.gateway.routing import Resolved
from storage.errors import InvalidRecord
from storage.models import ApiKey
from storage.records import Feedback, InteractionRecord, parse_record, record_to_json
from storage.writes import BadRow, LaterFeedback, LogItem

__all__ = [
    "ANONYMOUS",
    "Caller",
    "Exchange",
    "Outcome",
    "build_record",
    "item_from_json",
    "item_to_json",
    "new_exchange",
]

USER_HEADER = "x-overnight-user"
SESSION_HEADER = "x-overnight-session"
CONSENT_HEADER = "x-overnight-consent"
REQUEST_ID_HEADER = "x-request-id"
ANONYMOUS_USER = "anonymous"
MAX_ID_CHARS = 200
SOURCE = "gateway"
_ROLES = {
    "system": "system",
    "developer": "system",  # OpenAI's newer name for system instructions
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",  # OpenAI's older name for tool results
}
_TRUE, _FALSE = {"1", "true", "yes"}, {"0", "false", "no"}


@dataclass(frozen=True)
class Caller:
    """Who is calling: an API key's grants, or anonymous (a gateway that does not require keys)."""

    key_name: str | None
    tracks: tuple[str, ...] = ("*",)
    consent_default: bool = True
    store_traffic: bool = True  # False: traffic without consent is not stored at all

    @classmethod
    def from_key(cls, key: ApiKey) -> Caller:
        return cls(key.name, tuple(key.tracks), key.consent_default, key.store_traffic)

    def allows(self, track: str) -> bool:
        return "*" in self.tracks or track in self.tracks


ANONYMOUS = Caller(None)


@dataclass(frozen=True)
class Exchange:
    """What the gateway knows about a request when it forwards it."""

    interaction_id: str  # returned to the client; the record's id and the completion's id
    kind: str  # chat | completion
    started_at: datetime
    body: Mapping[str, Any]  # the request body as the client sent it
    route: Resolved
    caller: Caller
    user_id: str
    session_id: str | None
    consent: bool
    request_id: str

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def stored(self) -> bool:
        """Whether the exchange is logged at all (traffic without consent only if the key says so)."""
        return self.consent or self.caller.store_traffic


@dataclass
class Outcome:
    """How an exchange ended."""

    reply: Reply
    endpoint: str
    latency_ms: float
    disconnected: bool = False  # the client went away before the stream ended; `reply` is what was sent
    upstream_error: str | None = None  # the endpoint failed mid-stream
    retried_from: tuple[str, ...] = field(default_factory=tuple)  # endpoints that failed before it


def new_interaction_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(16)}"


def new_exchange(
    kind: str,
    body: Mapping[str, Any],
    route: Resolved,
    caller: Caller,
    headers: Mapping[str, str],
    started_at: datetime,
) -> Exchange:
    """The exchange for a request; raises a 400 `GatewayError` on a bad overnight header."""
    interaction_id = new_interaction_id(kind)
    user = body.get("user")
    user_id = user if isinstance(user, str) and user else headers.get(USER_HEADER) or caller.key_name
    session_id = headers.get(SESSION_HEADER)
    return Exchange(
        interaction_id=interaction_id,
        kind=kind,
        started_at=started_at,
        body=body,
        route=route,
        caller=caller,
        user_id=(user_id or ANONYMOUS_USER)[:MAX_ID_CHARS],
        session_id=session_id[:MAX_ID_CHARS] if session_id else None,
        consent=parse_consent(headers.get(CONSENT_HEADER), caller.consent_default),
        request_id=(headers.get(REQUEST_ID_HEADER) or interaction_id)[:MAX_ID_CHARS],
    )


def parse_consent(value: str | None, default: bool) -> bool:
    if value is None or not value.strip():
        return default
    text = value.strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise GatewayError(400, f"X-Overnight-Consent must be true or false, got {value[:20]!r}.")


def build_record(exchange: Exchange, outcome: Outcome, *, log_seq: int) -> InteractionRecord | BadRow:
    """The interaction record of a finished exchange, or a quarantine row saying why it cannot be one."""
    data = {
        "id": exchange.interaction_id,
        "ts": exchange.started_at.isoformat(),
        "track": exchange.route.track,
        "user_id": exchange.user_id,
        "session_id": exchange.session_id,
        "response": outcome.reply.text,
        "model": exchange.route.upstream,
        "metadata": _metadata(exchange, outcome, log_seq),
        "consent": exchange.consent,
    }
    try:
        data["messages"] = _messages(exchange)
        return parse_record(data)
    except InvalidRecord as error:
        raw = orjson.dumps({**data, "request": exchange.body}, default=str).decode()
        return BadRow(SOURCE, None, str(error), raw, exchange.route.track)


def _metadata(exchange: Exchange, outcome: Outcome, log_seq: int) -> dict[str, Any]:
    client = exchange.body.get("metadata")
    gateway: dict[str, Any] = {
        "key": exchange.caller.key_name,
        "request_id": exchange.request_id,
        "requested_model": exchange.route.requested,
        "version": exchange.route.version,
        "kind": exchange.kind,
        "endpoint": outcome.endpoint,
        "latency_ms": round(outcome.latency_ms, 2),
        "usage": outcome.reply.usage,
        "finish_reason": outcome.reply.finish_reason,
        "choices": outcome.reply.choices,
        "stream": exchange.stream,
        "disconnected": outcome.disconnected,
        "log_seq": log_seq,  # order of logging within this gateway process
    }
    if outcome.upstream_error is not None:
        gateway["upstream_error"] = outcome.upstream_error
    if outcome.retried_from:
        gateway["retried_from"] = list(outcome.retried_from)
    return {**(client if isinstance(client, dict) else {}), "gateway": gateway}


def _messages(exchange: Exchange) -> list[dict[str, str]]:
    """The conversation up to the reply, in the record's `{role, content}` form."""
    if exchange.kind == "completion":
        return [{"role": "user", "content": _prompt_text(exchange.body.get("prompt"))}]
    messages = exchange.body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRecord("request.messages: must be a list")
    return [_message(index, message) for index, message in enumerate(messages)]


def _message(index: int, message: object) -> dict[str, str]:
    fields: dict[str, Any] = message if isinstance(message, dict) else {}
    role = fields.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidRecord(f"request.messages.{index}: not a message with a known role")
    return {"role": _ROLES[role], "content": _content_text(fields.get("content"))}


def _content_text(content: object) -> str:
    """Plain text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [part.get("text") for part in content if isinstance(part, dict)]
        return "\n".join(part for part in parts if isinstance(part, str))
    return ""


def _prompt_text(prompt: object) -> str:
    """A completion prompt as text: the string, the first of a list of strings, else its JSON."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
        return prompt[0]
    return orjson.dumps(prompt).decode()


# -- the spool's line format ---------------------------------------------------------------------------


def item_to_json(seq: int, item: LogItem) -> dict[str, Any]:
    """One log item as a spool line."""
    if isinstance(item, InteractionRecord):
        return {"seq": seq, "kind": "record", "record": record_to_json(item)}
    if isinstance(item, LaterFeedback):
        return {
            "seq": seq,
            "kind": "feedback",
            "interaction_id": item.interaction_id,
            "feedback": item.feedback.model_dump(exclude_none=True),
            "given_at": item.given_at.isoformat(),
        }
    return {
        "seq": seq,
        "kind": "bad",
        "source": item.source,
        "reason": item.reason,
        "raw": item.raw,
        "track": item.track,
    }


def item_from_json(line: Mapping[str, Any]) -> tuple[int, LogItem]:
    """A spool line back as (sequence number, log item); raises KeyError, TypeError, ValueError or
    `InvalidRecord` on a line that is not one."""
    if line["kind"] == "record":
        return line["seq"], parse_record(line["record"])
    if line["kind"] == "feedback":
        feedback = Feedback.model_validate(line["feedback"])
        given_at = datetime.fromisoformat(line["given_at"])
        return line["seq"], LaterFeedback(line["interaction_id"], feedback, SOURCE, given_at)
    return line["seq"], BadRow(line["source"], None, line["reason"], line["raw"], line["track"])
