"""The gateway's pure parts: name resolution, the OpenAI wire format, record building, keys, the pool."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import create_engine

from pipeline.config import ConfigError, OvernightConfig, load_config
from pipeline.deploy.gateway.access import bearer_token
from pipeline.deploy.gateway.app import parse_feedback, refuse_prompt_logprobs
from pipeline.deploy.gateway.endpoint_pool import EndpointPool
from pipeline.deploy.gateway.exchange import (
    Caller,
    Outcome,
    build_record,
    item_from_json,
    item_to_json,
    new_exchange,
    parse_consent,
)
from pipeline.deploy.gateway.openai_wire import (
    GatewayError,
    Reply,
    SseRewriter,
    fold_event,
    rewrite_completion,
)
from pipeline.deploy.gateway.routing import Resolved, RouteTable, listed_models, resolve_model
from storage.keys import KEY_PREFIX, key_sha256, new_key
from storage.models import Route
from storage.records import Feedback, InteractionRecord
from storage.writes import BadRow, LaterFeedback

T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
ROUTES = {"support": Route(track="support", version="3", adapter_name="support@v3", previous_version="2")}
TRACKS = ("support", "math")


def resolve(name: str) -> Resolved:
    return resolve_model(name, ROUTES, base_name="base", tracks=TRACKS)


# -- routing ------------------------------------------------------------------------------------------------


def test_stable_pinned_base_and_unrouted_names_resolve() -> None:
    assert resolve("support") == Resolved("support", "support", "support@v3", "3")
    assert resolve("support@v2") == Resolved("support@v2", "support", "support@v2", "2")
    assert resolve("math@v7") == Resolved("math@v7", "math", "math@v7", "7")  # configured track, pinned
    assert resolve("math") == Resolved("math", "math", "base", None)  # nothing promoted yet: the base
    assert resolve("base") == Resolved("base", "base", "base", None)


@pytest.mark.parametrize("name", ["nope", "nope@v1", "support@vx", "support@", "@v1", "Support"])
def test_unknown_names_are_an_openai_404(name: str) -> None:
    with pytest.raises(GatewayError) as error:
        resolve(name)
    assert error.value.status == 404
    assert error.value.body() == {
        "error": {
            "message": f"The model `{name}` does not exist.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_stable_names_wait_for_a_first_read_of_the_routes(tmp_path: Path) -> None:
    unreachable = create_engine(f"sqlite:///{tmp_path / 'missing' / 'overnight.db'}")
    table = RouteTable(unreachable, base_name="base", tracks=TRACKS)
    assert table.refresh() is False and table.state() == "never read"
    with pytest.raises(GatewayError) as error:
        table.resolve("support")  # not the base model in its place
    assert error.value.status == 503
    assert table.resolve("support@v3").upstream == "support@v3" and table.resolve("base").upstream == "base"
    table.routes, table.read_at = dict(ROUTES), 1.0
    assert table.resolve("support").upstream == "support@v3"


def test_listed_models_follow_what_the_caller_may_call() -> None:
    everything = listed_models(ROUTES, base_name="base", tracks=TRACKS, allows=lambda track: True)
    assert [(m["id"], m.get("serves"), m.get("parent")) for m in everything] == [
        ("math", "base", None),
        ("support", "support@v3", None),
        ("support@v3", None, "support"),
        ("support@v2", None, "support"),
        ("base", None, None),
    ]
    only_math = listed_models(ROUTES, base_name="base", tracks=TRACKS, allows=lambda track: track == "math")
    assert [m["id"] for m in only_math] == ["math"]


# -- the wire format ----------------------------------------------------------------------------------------


def sse(chunk: dict) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def delta(text: str, finish: str | None = None) -> dict:
    return {
        "id": "up",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


def test_sse_events_are_rewritten_whole_however_the_bytes_are_cut() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    stream = (
        b": keep-alive\n\n"
        + sse(delta("Hel"))
        + sse(delta("lo", "stop"))
        + sse({"id": "up", "choices": [], "usage": usage})
        + b"data: [DONE]\r\n\r\n"
    )
    for cut in (1, 7, len(stream)):
        rewriter, reply, out = SseRewriter("chatcmpl-mine", "chat"), Reply(), b""
        for start in range(0, len(stream), cut):
            for event in rewriter.feed(stream[start : start + cut]):
                out += event.data
                fold_event(reply, event)
        assert list(rewriter.flush()) == []
        assert (reply.text, reply.finish_reason, reply.usage, reply.choices) == ("Hello", "stop", usage, 1)
        events = out.split(b"\n\n")
        assert (events[0], events[4:]) == (b": keep-alive", [b"data: [DONE]", b""])  # passed through
        assert [orjson.loads(e[6:])["id"] for e in events[1:4]] == ["chatcmpl-mine"] * 3


def test_an_error_the_endpoint_reports_mid_stream_is_read_out() -> None:
    failure = {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}
    rewriter = SseRewriter("chatcmpl-mine", "chat")
    events = list(rewriter.feed(sse(delta("Hel")) + sse(failure) + sse({"choices": [{"index": None}]})))
    assert [event.error for event in events] == [None, "engine died", None]
    assert orjson.loads(events[1].data[6:]) == failure  # passed on to the client as it is
    assert events[2].choice_indexes == set()


def test_a_whole_completion_gets_the_interaction_id_and_its_reply_read() -> None:
    body = {
        "id": "cmpl-up",
        "model": "support@v3",
        "choices": [{"index": 1, "text": "second"}, {"index": 0, "text": "first", "finish_reason": "length"}],
        "usage": {"completion_tokens": 1},
    }
    data, reply = rewrite_completion(orjson.dumps(body), "cmpl-mine", "completion")
    assert orjson.loads(data) == {**body, "id": "cmpl-mine"}
    assert (reply.text, reply.finish_reason, reply.choices) == ("first", "length", 2)
    assert rewrite_completion(b"not json", "x", "chat") == (b"not json", Reply())


# -- records ------------------------------------------------------------------------------------------------


def test_an_exchange_becomes_the_interaction_record_of_the_contract() -> None:
    body = {
        "model": "support",
        "user": "u-1",
        "metadata": {"client": "web"},
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url"},
                    {"type": "text", "text": "here"},
                ],
            },
        ],
    }
    headers = {"x-overnight-session": "s-9", "x-overnight-consent": "no", "x-request-id": "req-1"}
    ex = new_exchange("chat", body, resolve("support"), Caller("web-key"), headers, T0)
    reply = Reply("Fine.", "stop", {"completion_tokens": 2}, 1)
    record = build_record(
        ex, Outcome(reply, "http://a:8000", 3.14159, retried_from=("http://b:8000",)), log_seq=7
    )
    assert isinstance(record, InteractionRecord)
    assert (record.id, record.ts, record.track, record.model) == (
        ex.interaction_id,
        T0,
        "support",
        "support@v3",
    )
    assert (record.user_id, record.session_id, record.consent) == ("u-1", "s-9", False)
    assert [(m.role, m.content) for m in record.messages] == [("system", "Be brief."), ("user", "look\nhere")]
    assert record.metadata["client"] == "web"
    assert record.metadata["gateway"] == {
        "key": "web-key",
        "request_id": "req-1",
        "requested_model": "support",
        "version": "3",
        "kind": "chat",
        "endpoint": "http://a:8000",
        "latency_ms": 3.14,
        "usage": {"completion_tokens": 2},
        "finish_reason": "stop",
        "choices": 1,
        "stream": False,
        "disconnected": False,
        "log_seq": 7,
        "retried_from": ["http://b:8000"],
    }


def test_the_user_comes_from_the_body_the_header_or_the_key() -> None:
    def user(body_user: object, headers: dict[str, str], key: str | None) -> str:
        body = {"model": "base", "prompt": "p", "user": body_user}
        return new_exchange("completion", body, resolve("base"), Caller(key), headers, T0).user_id

    assert user("body", {"x-overnight-user": "header"}, "key") == "body"
    assert user(None, {"x-overnight-user": "header"}, "key") == "header"
    assert user("", {}, "key") == "key"
    assert user(None, {}, None) == "anonymous"


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "system", "content": "no user turn"}], "needs at least one message with role 'user'"),
        ([{"role": ["user"], "content": "hi"}], "request.messages.0: not a message with a known role"),
        (["hi"], "request.messages.0: not a message with a known role"),
        ("hi", "request.messages: must be a list"),
    ],
)
def test_an_exchange_that_cannot_be_a_record_is_kept_as_a_quarantine_row(
    messages: object, reason: str
) -> None:
    body = {"model": "support", "messages": messages}
    ex = new_exchange("chat", body, resolve("support"), Caller(None), {}, T0)
    row = build_record(ex, Outcome(Reply("x"), "http://a:8000", 1.0), log_seq=1)
    assert isinstance(row, BadRow) and row.source == "gateway" and row.track == "support"
    assert reason in row.reason and orjson.loads(row.raw)["request"] == body


@pytest.mark.parametrize(
    ("prompt", "text"), [("plain", "plain"), (["first", "second"], "first"), ([1, 2, 3], "[1,2,3]")]
)
def test_completion_prompts_become_one_user_message(prompt: object, text: str) -> None:
    ex = new_exchange(
        "completion", {"model": "base", "prompt": prompt}, resolve("base"), Caller(None), {}, T0
    )
    record = build_record(ex, Outcome(Reply("r"), "http://a:8000", 1.0), log_seq=1)
    assert isinstance(record, InteractionRecord) and record.messages[0].content == text


def test_consent_header_values() -> None:
    assert parse_consent(None, True) is True and parse_consent(" ", False) is False
    assert parse_consent("FALSE", True) is False and parse_consent("1", False) is True
    with pytest.raises(GatewayError, match="X-Overnight-Consent must be true or false"):
        parse_consent("maybe", True)


def test_log_items_round_trip_through_spool_lines() -> None:
    ex = new_exchange("completion", {"model": "base", "prompt": "p"}, resolve("base"), Caller("k"), {}, T0)
    record = build_record(ex, Outcome(Reply("r", usage=None), "http://a:8000", 1.0), log_seq=5)
    items = [
        record,
        LaterFeedback("cmpl-1", Feedback(thumb=-1, comment="no"), "gateway"),
        BadRow("gateway", None, "why", '{"raw": 1}', "support"),
    ]
    for seq, item in enumerate(items):
        line = orjson.loads(orjson.dumps(item_to_json(seq, item)))
        assert item_from_json(line) == (seq, item)


def test_feedback_bodies_are_checked() -> None:
    assert parse_feedback({"interaction_id": "x", "thumb": 1, "comment": None}) == ("x", Feedback(thumb=1))
    for body, message in [
        ({"interaction_id": "x"}, "Give a `thumb`"),
        ({"thumb": 1}, "`interaction_id` is required"),
        ({"interaction_id": "x", "rating": 9}, "rating"),
        ({"interaction_id": "x", "thumb": True}, "thumb"),
        ({"interaction_id": "x", "stars": 5}, "Unknown field `stars`"),
    ]:
        with pytest.raises(GatewayError, match=message) as error:
            parse_feedback(body)
        assert error.value.status == 400


# -- keys ---------------------------------------------------------------------------------------------------


def test_keys_are_random_prefixed_and_hashed() -> None:
    first, second = new_key(), new_key()
    assert first.startswith(KEY_PREFIX) and first != second and len(first) == len(KEY_PREFIX) + 43
    assert key_sha256(first) == key_sha256(first) != key_sha256(second) and len(key_sha256(first)) == 64
    assert bearer_token(f"Bearer {first}") == first and bearer_token(f"bearer  {first} ") == first
    assert (
        bearer_token(None) is None and bearer_token("Basic abc") is None and bearer_token("Bearer ") is None
    )


# -- the endpoint pool --------------------------------------------------------------------------------------


def test_the_pool_picks_the_least_busy_healthy_endpoint_and_counts_per_adapter() -> None:
    pool = EndpointPool(["http://a/", "http://b", "http://c"], client=httpx.AsyncClient())
    a, b, c = pool.endpoints
    assert a.url == "http://a"
    picked = [pool.pick() for _ in range(6)]
    assert {e.url for e in picked if e is not None} == {"http://a", "http://b", "http://c"}  # idle: in turn
    pool.begin(a, "support@v3")
    pool.begin(b, "support@v3")
    pool.begin(b, "support@v2")
    assert pool.pick() is c
    assert pool.pick(exclude=["http://c"]) is a
    pool.take_out(c, "/health: HTTP 503")
    assert pool.pick() is a and pool.healthy_count() == 2
    assert pool.in_flight("support@v3") == 2 and pool.in_flight("support@v3", "http://b") == 1
    pool.end(b, "support@v3")
    pool.end(b, "support@v2")
    assert pool.in_flight("support@v2") == 0 and pool.pick() is b
    pool.take_out(a, "down")
    pool.take_out(b, "down")
    assert pool.pick() is None
    pool.put_back(c)
    assert pool.pick() is c and pool.states()["http://a"] == "out: down"


# -- config -------------------------------------------------------------------------------------------------


def test_the_gateway_section_has_defaults_resolves_its_spool_and_is_overridable(tmp_path: Path) -> None:
    assert OvernightConfig().gateway.require_keys is False  # the embedded default: no keys
    file = tmp_path / "overnight.yaml"
    file.write_text("gateway:\n  spool_dir: spool\n  port: 9090\n")
    config = load_config(file, environ={"OVERNIGHT_GATEWAY__REQUIRE_KEYS": "true"})
    assert config.gateway.spool_dir == str(tmp_path / "spool")
    assert (config.gateway.port, config.gateway.require_keys, config.gateway.flush_seconds) == (
        9090,
        True,
        0.5,
    )
    file.write_text("gateway:\n  flush_second: 1\n")
    with pytest.raises(ConfigError, match=r"gateway.flush_second: unknown key"):
        load_config(file, environ={})


def _relay_with(
    outcomes: list[type[httpx.TransportError] | None], urls: list[str]
) -> tuple[object, list[str]]:
    """`open_upstream` against a transport that fails (or answers, for None) in the order given."""
    import anyio

    from pipeline.deploy.gateway.relay import open_upstream

    tried: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        tried.append(f"{request.url.scheme}://{request.url.netloc.decode()}")
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome("dropped", request=request)
        return httpx.Response(200, json={"ok": True})

    async def main() -> object:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            pool = EndpointPool(urls, client=client)
            try:
                upstream = await open_upstream(
                    client, pool, "/v1/completions", b"{}", adapter="base", headers={}
                )
            except GatewayError as error:
                return error
            await upstream.close()
            return upstream

    return anyio.run(main), tried


@pytest.mark.parametrize("dropped", [httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError])
def test_a_dropped_connection_is_retried_on_the_same_endpoint_when_it_is_the_only_one(
    dropped: type[httpx.TransportError],
) -> None:
    upstream, tried = _relay_with([dropped, None], ["http://a:8000"])
    assert tried == ["http://a:8000", "http://a:8000"]
    assert getattr(upstream, "retried_from", None) == ("http://a:8000",)


def test_a_dropped_connection_goes_to_another_endpoint_first() -> None:
    upstream, tried = _relay_with([httpx.ReadError, None], ["http://a:8000", "http://b:8000"])
    assert len(set(tried)) == 2 and getattr(upstream, "retried_from", None) == (tried[0],)


def test_an_endpoint_that_refuses_connections_is_not_tried_again() -> None:
    error, tried = _relay_with([httpx.ConnectError], ["http://a:8000"])
    assert tried == ["http://a:8000"]
    assert isinstance(error, GatewayError) and error.status == 502


def test_a_connection_dropped_twice_is_a_502() -> None:
    error, tried = _relay_with([httpx.ReadError, httpx.ReadError], ["http://a:8000"])
    assert tried == ["http://a:8000"] * 2
    assert isinstance(error, GatewayError) and error.status == 502


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "math", "prompt": "2+2", "prompt_logprobs": 0}, "prompt_logprobs"),
        ({"model": "math", "messages": [], "prompt_logprobs": 5}, "prompt_logprobs"),
        ({"model": "math", "prompt": "2+2", "echo": True, "logprobs": 1}, "echo"),
    ],
)
def test_prompt_logprobs_are_refused_before_they_reach_the_engine(body: dict[str, Any], param: str) -> None:
    """vLLM's CPU engine with LoRA fails on batched prompt log-probabilities, and then serves no track."""
    with pytest.raises(GatewayError) as caught:
        refuse_prompt_logprobs(body)
    assert caught.value.status == 400 and caught.value.param == param


def test_ordinary_logprobs_and_echo_alone_pass() -> None:
    refuse_prompt_logprobs({"model": "math", "prompt": "2+2", "logprobs": 2})
    refuse_prompt_logprobs({"model": "math", "prompt": "2+2", "echo": True})
    refuse_prompt_logprobs({"model": "math", "messages": [], "logprobs": True, "top_logprobs": 2})
    refuse_prompt_logprobs({"model": "math", "prompt": "2+2", "prompt_logprobs": None})
