"""The gateway for real: uvicorn on loopback, fake vLLM endpoints over HTTP, the `openai` SDK as client.

Each test starts its own gateway on a fresh SQLite store and checks what a client sees (status,
ids, streamed chunks, OpenAI error bodies) and what reached the store (the record, its version, its
metadata, its feedback). The store-outage and multi-process tests, on SQLite and PostgreSQL, are in
`test_gateway_store.py`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from sqlalchemy import Engine

import storage
from storage.keys import create_api_key
from storage.models import Interaction
from storage.routes import flip_route
from tests.conftest import make_record
from tests.fakes.openai_upstream import FakeUpstream, reply_text
from tests.gateway_fixtures import RunningGateway, running_gateway, stored, stored_feedback, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'store' / 'overnight.db'}"
    engine = storage.make_engine(url)
    storage.upgrade(engine)
    flip_route(engine, "support", "2", "support@v2")
    flip_route(engine, "support", "3", "support@v3")
    yield engine
    engine.dispose()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream("a") as fake:
        yield fake


@pytest.fixture
def gateway(store: Engine, upstream: FakeUpstream, tmp_path: Path) -> Iterator[RunningGateway]:
    with running_gateway(store, [upstream.base_url], tmp_path / "spool") as running:
        yield running


def one_record(engine: Engine, interaction_id: str) -> Interaction:
    found = wait_until(
        lambda: [row for row in stored(engine) if row.client_id == interaction_id],
        what=f"record {interaction_id}",
    )
    assert len(found) == 1
    return found[0]


def test_a_chat_goes_to_the_pinned_version_and_is_logged_with_it(
    gateway: RunningGateway, upstream: FakeUpstream, store: Engine
) -> None:
    raw = gateway.openai().chat.completions.with_raw_response.create(
        model="support",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "reset my password"},
        ],
        user="user-7",
        extra_headers={"X-Overnight-Session": "s-1", "X-Overnight-Consent": "false"},
        metadata={"client": "web"},
    )
    completion = raw.parse()
    interaction_id = raw.headers["X-Overnight-Interaction-Id"]
    assert completion.id == interaction_id and interaction_id.startswith("chatcmpl-")
    assert completion.model == "support@v3" == raw.headers["X-Overnight-Model"]
    assert completion.choices[0].message.content == reply_text("a", "support@v3", "reset my password")
    assert upstream.models_asked() == ["support@v3"]

    record = one_record(store, interaction_id)
    assert (record.track, record.model, record.user_id, record.session_id) == (
        "support",
        "support@v3",
        "user-7",
        "s-1",
    )
    assert record.consent is False
    assert record.response == completion.choices[0].message.content
    assert [m["role"] for m in record.messages] == ["system", "user"]
    assert record.metadata_["client"] == "web"
    meta = record.metadata_["gateway"]
    assert meta["endpoint"] == upstream.base_url and meta["stream"] is False and meta["disconnected"] is False
    assert meta["version"] == "3" and meta["requested_model"] == "support" and meta["key"] is None
    assert (
        meta["finish_reason"] == "stop" and meta["usage"]["completion_tokens"] > 0 and meta["latency_ms"] > 0
    )


def test_a_streamed_chat_is_relayed_as_it_comes_and_logged_whole(
    gateway: RunningGateway, store: Engine
) -> None:
    stream = gateway.openai().chat.completions.create(
        model="support",
        messages=[{"role": "user", "content": "tell me about the router"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply_text("a", "support@v3", "tell me about the router")
    ids = {chunk.id for chunk in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-")
    assert len([c for c in chunks if c.choices]) > 5  # relayed chunk by chunk, not buffered into one

    record = one_record(store, next(iter(ids)))
    assert record.response == text and record.consent is True
    meta = record.metadata_["gateway"]
    assert meta["stream"] is True and meta["disconnected"] is False and meta["finish_reason"] == "stop"
    assert meta["usage"]["completion_tokens"] == len(text.split())


def test_completions_pinned_names_and_the_base_model(gateway: RunningGateway, store: Engine) -> None:
    client = gateway.openai()
    pinned = client.completions.create(model="support@v2", prompt="old version please", max_tokens=8)
    assert pinned.choices[0].text == reply_text("a", "support@v2", "old version please")
    base = client.completions.create(model="base", prompt="plain base", stream=True)
    base_text = "".join(chunk.choices[0].text for chunk in base if chunk.choices)
    assert base_text == reply_text("a", "base", "plain base")
    unrouted = client.completions.create(model="math", prompt="2 + 2")  # no version promoted yet: the base
    assert unrouted.choices[0].text == reply_text("a", "base", "2 + 2")

    records = {row.client_id: row for row in wait_until(lambda: len(stored(store)) == 3 and stored(store))}
    assert records[pinned.id].track == "support" and records[pinned.id].model == "support@v2"
    assert records[pinned.id].messages == [{"role": "user", "content": "old version please"}]
    assert [(r.track, r.model) for r in records.values() if r.client_id != pinned.id] == [
        ("base", "base"),
        ("math", "base"),
    ]


def test_models_lists_the_tracks_a_key_may_call(
    store: Engine, upstream: FakeUpstream, tmp_path: Path
) -> None:
    support_only = create_api_key(store, "support-app", ["support"])
    everything = create_api_key(store, "admin", ["*"])
    with running_gateway(store, [upstream.base_url], tmp_path / "spool", require_keys=True) as gateway:
        listed = {model.id: model for model in gateway.openai(support_only).models.list()}
        assert sorted(listed) == ["support", "support@v2", "support@v3"]
        assert listed["support"].model_extra == {"serves": "support@v3", "version": "3"}
        all_ids = [model.id for model in gateway.openai(everything).models.list()]
        assert all_ids == ["math", "support", "support@v3", "support@v2", "base"]


def test_keys_are_required_and_limit_tracks(store: Engine, upstream: FakeUpstream, tmp_path: Path) -> None:
    key = create_api_key(store, "support-app", ["support"])
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with running_gateway(store, [upstream.base_url], tmp_path / "spool", require_keys=True) as gateway:
        with gateway.http() as http:  # the SDK always sends a key: no header at all through plain HTTP
            missing = http.post("/v1/chat/completions", json={"model": "support", **chat})
            oversized = http.post("/v1/chat/completions", content=b"x" * (4 * 1024 * 1024 + 1))
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        assert oversized.status_code == 401  # nothing is read for a caller without a key
        with pytest.raises(openai.AuthenticationError) as wrong:
            gateway.openai("ovn-not-a-key").chat.completions.create(model="support", **chat)  # type: ignore[arg-type]
        assert wrong.value.body["code"] == "invalid_api_key"  # type: ignore[index]
        with pytest.raises(openai.PermissionDeniedError) as denied:
            gateway.openai(key).chat.completions.create(model="math", **chat)  # type: ignore[arg-type]
        assert "may not call `math`" in denied.value.message
        with pytest.raises(openai.NotFoundError) as unknown:
            gateway.openai(key).chat.completions.create(model="nope", **chat)  # type: ignore[arg-type]
        assert unknown.value.body["code"] == "model_not_found"  # type: ignore[index]
        assert gateway.openai(key).chat.completions.create(model="support", **chat).choices  # type: ignore[arg-type]
    assert len(stored(store)) == 1  # refused requests reached neither the model nor the store
    assert upstream.models_asked() == ["support@v3"]


def test_bad_requests_get_openai_error_bodies(gateway: RunningGateway, upstream: FakeUpstream) -> None:
    with gateway.http() as http:
        malformed = http.post(
            "/v1/chat/completions",
            content=b'{"model": "support", "messages": [',
            headers={"Content-Type": "application/json"},
        )
        oversized = http.post("/v1/chat/completions", content=b"x" * (4 * 1024 * 1024 + 1))
        no_model = http.post("/v1/completions", json={"prompt": "hi"})
        wrong_path = http.get("/v1/nothing")
        bad_consent = http.post(
            "/v1/completions",
            json={"model": "base", "prompt": "hi"},
            headers={"X-Overnight-Consent": "maybe"},
        )
    for response, status in [
        (malformed, 400),
        (oversized, 413),
        (no_model, 400),
        (wrong_path, 404),
        (bad_consent, 400),
    ]:
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
    assert upstream.models_asked() == []


def test_an_error_of_the_endpoint_passes_through_unlogged(
    gateway: RunningGateway, upstream: FakeUpstream, store: Engine
) -> None:
    upstream.state.unloaded = {"support@v3"}  # the route points at an adapter this endpoint lacks
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as error:
            gateway.openai().chat.completions.create(
                model="support", messages=[{"role": "user", "content": "hi"}], stream=stream
            )
        assert error.value.message.endswith("The model `support@v3` does not exist.")
        assert "X-Overnight-Interaction-Id" not in error.value.response.headers
    assert gateway.gateway.capture.backlog() == {"queued": 0, "spooled_segments": 0, "pending": 0}
    assert upstream.models_asked() == ["support@v3", "support@v3"] and stored(store) == []


def test_feedback_later_on_an_unknown_id_and_from_another_key(
    store: Engine, upstream: FakeUpstream, tmp_path: Path
) -> None:
    mine, theirs = create_api_key(store, "mine"), create_api_key(store, "theirs")
    storage.log_interaction(store, make_record(1, feedback=None))  # logged by an application, not by a key
    with running_gateway(store, [upstream.base_url], tmp_path / "spool", require_keys=True) as gateway:
        completion = gateway.openai(mine).chat.completions.create(
            model="support", messages=[{"role": "user", "content": "hello"}]
        )
        one_record(store, completion.id)  # stored: the feedback below comes "days later"
        with gateway.http(mine) as http:
            accepted = http.post(
                "/v1/feedback", json={"interaction_id": completion.id, "thumb": -1, "comment": "wrong"}
            )
            unknown = http.post("/v1/feedback", json={"interaction_id": "chatcmpl-nope", "thumb": 1})
            invalid = http.post("/v1/feedback", json={"interaction_id": completion.id, "thumb": 5})
            empty = http.post("/v1/feedback", json={"interaction_id": completion.id})
        with gateway.http(theirs) as http:
            stolen = http.post("/v1/feedback", json={"interaction_id": completion.id, "rating": 5})
            not_a_keys = http.post("/v1/feedback", json={"interaction_id": "req-1", "rating": 1})
        assert accepted.status_code == 200 and accepted.json()["status"] == "accepted"
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "interaction_not_found")
        assert invalid.status_code == 400 and "thumb" in invalid.json()["error"]["message"]
        assert empty.status_code == 400
        assert (stolen.status_code, stolen.json()["error"]["code"]) == (403, "not_your_interaction")
        assert not_a_keys.status_code == 403
        wait_until(lambda: stored_feedback(store), what="feedback")
    assert stored_feedback(store) == [(completion.id, -1, None, "wrong", "gateway")]
    assert one_record(store, completion.id).metadata_["gateway"]["key"] == "mine"


def test_feedback_before_the_record_is_written_is_attached_after_it(
    store: Engine, upstream: FakeUpstream, tmp_path: Path
) -> None:
    # the writer waits up to a minute for a batch to fill: the record stays queued until the gateway stops
    with running_gateway(store, [upstream.base_url], tmp_path / "spool", flush_seconds=60) as gateway:
        completion = gateway.openai().chat.completions.create(
            model="support", messages=[{"role": "user", "content": "quick"}]
        )
        with gateway.http() as http:
            response = http.post("/v1/feedback", json={"interaction_id": completion.id, "rating": 4})
        assert response.status_code == 200
        assert stored(store) == []  # the record was still waiting in the queue
    assert [row.client_id for row in stored(store)] == [completion.id]
    assert stored_feedback(store) == [(completion.id, None, 4, None, "gateway")]


def test_traffic_without_consent_is_not_stored_when_the_gateway_says_so(
    store: Engine, upstream: FakeUpstream, tmp_path: Path
) -> None:
    key = create_api_key(store, "web", ["support"])  # its own setting would store such traffic
    chat = {"model": "support", "messages": [{"role": "user", "content": "hi"}]}
    no = {"X-Overnight-Consent": "false"}
    with running_gateway(
        store, [upstream.base_url], tmp_path / "spool", store_without_consent=False
    ) as gateway:
        answered = [
            gateway.openai().chat.completions.create(**chat, extra_headers=no),  # type: ignore[arg-type]
            gateway.openai(key).chat.completions.create(**chat, extra_headers=no),  # type: ignore[arg-type]
        ]
        kept = gateway.openai(key).chat.completions.create(**chat)  # type: ignore[arg-type]
        assert all(answer.choices[0].message.content for answer in answered)  # served all the same
        one_record(store, kept.id)
    assert [row.client_id for row in stored(store)] == [kept.id]


def test_feedback_on_anonymous_traffic_is_only_taken_without_a_key(
    store: Engine, upstream: FakeUpstream, tmp_path: Path
) -> None:
    key = create_api_key(store, "web-app")
    with running_gateway(store, [upstream.base_url], tmp_path / "spool") as gateway:  # keys not required
        completion = gateway.openai().chat.completions.create(
            model="support", messages=[{"role": "user", "content": "anonymous"}]
        )
        feedback = {"interaction_id": completion.id, "thumb": 1}
        with gateway.http(key) as http:
            assert http.post("/v1/feedback", json=feedback).status_code == 403
        with gateway.http() as http:
            assert http.post("/v1/feedback", json=feedback).status_code == 200
    assert stored_feedback(store) == [(completion.id, 1, None, None, "gateway")]


def test_an_unhealthy_endpoint_is_taken_out_and_put_back(store: Engine, tmp_path: Path) -> None:
    with (
        FakeUpstream("a") as a,
        FakeUpstream("b") as b,
        running_gateway(
            store, [a.base_url, b.base_url], tmp_path / "spool", health_interval_seconds=0.1
        ) as gateway,
    ):
        client = gateway.openai()

        def served_by() -> list[str]:
            replies = [client.completions.create(model="base", prompt="hi").choices[0].text for _ in range(6)]
            return sorted({reply[1] for reply in replies})  # "[a] ..." -> "a"

        assert served_by() == ["a", "b"]
        a.state.healthy = False
        with gateway.http() as http:
            wait_until(lambda: http.get("/ready").json()["endpoints"][a.base_url] != "healthy", what="a out")
            assert http.get("/ready").status_code == 200  # b still serves
        assert served_by() == ["b"]
        b.state.healthy = False
        with gateway.http() as http:
            wait_until(lambda: http.get("/ready").status_code == 503, what="no endpoint ready")
        with pytest.raises(openai.InternalServerError) as none_left:
            client.completions.create(model="base", prompt="hi")
        assert none_left.value.status_code == 503
        a.state.healthy = b.state.healthy = True
        with gateway.http() as http:
            wait_until(lambda: http.get("/ready").status_code == 200, what="endpoints back")
            wait_until(lambda: set(http.get("/ready").json()["endpoints"].values()) == {"healthy"})
        assert served_by() == ["a", "b"]


def test_a_request_is_retried_on_another_endpoint_when_one_dies(store: Engine, tmp_path: Path) -> None:
    with FakeUpstream("a") as a, FakeUpstream("b") as b:
        spool = tmp_path / "spool"
        with running_gateway(store, [a.base_url, b.base_url], spool, health_interval_seconds=60) as gateway:
            a.server.stop()  # dies between health checks: the pool still counts it healthy
            client = gateway.openai()
            replies = [client.completions.create(model="base", prompt=f"q{n}") for n in range(4)]
            assert [reply.choices[0].text for reply in replies] == [
                reply_text("b", "base", f"q{n}") for n in range(4)
            ]
            with gateway.http() as http:
                assert http.get("/ready").json()["endpoints"][a.base_url].startswith("out: ConnectError")
            records = wait_until(lambda: len(stored(store)) == 4 and stored(store))
        retried = [row.metadata_["gateway"].get("retried_from") for row in records]
        assert sorted(retried, key=bool) == [None, None, None, [a.base_url]]  # once a failed, it was out
        assert {row.metadata_["gateway"]["endpoint"] for row in records} == {b.base_url}


def test_a_client_leaving_mid_stream_is_logged_with_what_it_was_sent(
    gateway: RunningGateway, upstream: FakeUpstream, store: Engine
) -> None:
    upstream.state.chunk_delay = 0.05
    prompt = " ".join(f"word{n}" for n in range(40))
    full = reply_text("a", "support@v3", prompt)
    stream = gateway.openai().chat.completions.create(
        model="support", messages=[{"role": "user", "content": prompt}], stream=True
    )
    received = [next(stream) for _ in range(3)]
    assert gateway.gateway.in_flight("support@v3") == 1
    stream.close()
    record = one_record(store, received[0].id)
    meta = record.metadata_["gateway"]
    assert meta["disconnected"] is True and meta["stream"] is True
    assert 0 < len(record.response) < len(full) and full.startswith(record.response)
    assert record.response.startswith("".join(c.choices[0].delta.content or "" for c in received))
    wait_until(lambda: upstream.state.cut_streams == 1, what="the upstream stream closed")
    assert gateway.gateway.in_flight("support@v3") == 0


def test_an_engine_error_mid_stream_is_relayed_and_logged_as_such(
    gateway: RunningGateway, upstream: FakeUpstream, store: Engine
) -> None:
    upstream.state.fail_after_chunks = 2
    stream = gateway.openai().chat.completions.create(
        model="support", messages=[{"role": "user", "content": "a long question"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError, match="engine died"):
        for chunk in stream:
            received.append(chunk)
    record = one_record(store, received[0].id)
    meta = record.metadata_["gateway"]
    assert meta["upstream_error"] == "engine died" and meta["disconnected"] is False
    assert record.response == "".join(c.choices[0].delta.content or "" for c in received)


def test_health_and_readiness(gateway: RunningGateway) -> None:
    with gateway.http() as http:
        assert http.get("/health").json() == {"status": "ok"}
        ready = http.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True and ready.json()["store"] == "ok"
