"""The gateway in front of the real vLLM CPU server, on SQLite and PostgreSQL, with real clients.

The `openai` SDK (sync, async, streamed chats and completions) and plain HTTP call the stable name
`support` through the gateway (keys required); the traffic, the feedback given on it (also through
the SDK) and a `consent: false` exchange reach the store, and the next night's harvest takes the
served exchanges with their feedback and drops the one without consent. Bad input gets OpenAI's
error body and status and touches nothing already stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import Engine

from pipeline.adapters import AdapterVersion
from pipeline.config import HarvestConfig, TrackFilter
from pipeline.deploy.serving import load_champions, seed_routes
from pipeline.deploy.vllm_client import VllmClient
from pipeline.harvest.stage import harvest, read_snapshot
from storage.keys import create_api_key
from tests.gateway_fixtures import running_gateway, stored, stored_feedback, wait_until
from tests.serving_fixtures import distinct_adapters

pytestmark = pytest.mark.integration

PSEUDONYM_KEY = b"gateway-vllm-test-key-0123456789"
CHAT: Any = [{"role": "user", "content": "My printer is missing a part."}]


@pytest.fixture(scope="module")
def champion(
    vllm_server: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdapterVersion]:
    [v1] = distinct_adapters(tiny_model_dir, tmp_path_factory.mktemp("adapters"), "support", [1], seed=7)
    with VllmClient(vllm_server.base_url) as client:
        load_champions(client, [v1])
    yield v1
    with VllmClient(vllm_server.base_url) as client:
        client.unload_adapter(v1.pinned_name)


def test_served_traffic_and_its_feedback_are_stored_and_harvested(
    engine: Engine, vllm_server: Any, champion: AdapterVersion, tmp_path: Path
) -> None:
    seed_routes(engine, [champion])
    key = create_api_key(engine, "support-app", ["support"])
    with running_gateway(
        engine, [vllm_server.base_url], tmp_path / "spool", base_name="tiny", require_keys=True
    ) as gateway:
        client = gateway.openai(key)
        chat = client.chat.completions.create(model="support", messages=CHAT, max_tokens=12, user="alice")
        assert chat.model == champion.pinned_name and chat.choices[0].message.content

        chunks = list(
            client.chat.completions.create(
                model="support", messages=CHAT, max_tokens=12, stream=True, user="bob"
            )
        )
        streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len({c.id for c in chunks}) == 1 and chunks[-1].choices[0].finish_reason is not None

        async def asynchronous() -> tuple[str, str]:
            async with gateway.async_openai(key) as aclient:
                completion = await aclient.completions.create(
                    model="support", prompt="Order 7:", max_tokens=8
                )
                stream = await aclient.completions.create(
                    model="support", prompt="Order 8:", max_tokens=8, stream=True, user="carol"
                )
                pieces = [piece async for piece in stream]
            return completion.id, pieces[0].id

        completion_id, streamed_completion_id = asyncio.run(asynchronous())
        private = client.chat.completions.create(
            model="support", messages=CHAT, max_tokens=4, extra_headers={"X-Overnight-Consent": "false"}
        )
        pinned = client.chat.completions.create(model=champion.pinned_name, messages=CHAT, max_tokens=4)
        assert [m.id for m in client.models.list()] == ["support", champion.pinned_name]

        client.post("/feedback", body={"interaction_id": chat.id, "thumb": 1}, cast_to=object)
        client.post(
            "/feedback",
            body={"interaction_id": chunks[0].id, "rating": 2, "comment": "too vague"},
            cast_to=object,
        )
        with pytest.raises(openai.NotFoundError):
            client.post("/feedback", body={"interaction_id": "chatcmpl-unknown", "thumb": 1}, cast_to=object)

        with gateway.http() as anonymous, gateway.http(key) as http:
            refused = {
                "no key": anonymous.post("/v1/chat/completions", json={"model": "support", "messages": CHAT}),
                "other track": http.post("/v1/chat/completions", json={"model": "math", "messages": CHAT}),
                "unknown model": http.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT}),
                "malformed": http.post(
                    "/v1/chat/completions",
                    content=b'{"model": "support", ',
                    headers={"Content-Type": "application/json"},
                ),
                "oversized": http.post("/v1/completions", content=b"x" * (4 * 1024 * 1024 + 1)),
            }
        assert {why: r.status_code for why, r in refused.items()} == {
            "no key": 401,
            "other track": 403,
            "unknown model": 404,
            "malformed": 400,
            "oversized": 413,
        }
        assert all(set(r.json()["error"]) == {"message", "type", "param", "code"} for r in refused.values())
        served = [chat.id, chunks[0].id, completion_id, streamed_completion_id, private.id, pinned.id]
        wait_until(lambda: len(stored(engine)) == len(served), what="every exchange stored")
        wait_until(lambda: len(stored_feedback(engine)) == 2, what="the feedback stored")

    rows = {row.client_id: row for row in stored(engine)}
    assert sorted(rows) == sorted(served)  # the refused requests stored nothing
    assert {row.model for row in rows.values()} == {champion.pinned_name}
    assert rows[chunks[0].id].response == streamed_text and rows[chat.id].user_id == "alice"
    assert rows[private.id].consent is False and rows[chat.id].metadata_["gateway"]["key"] == "support-app"

    night = harvest(
        engine,
        "support",
        HarvestConfig(dedup_prompts=False),
        TrackFilter(models=["support"]),
        out=tmp_path / "night.jsonl",
        pseudonym_key=PSEUDONYM_KEY,
    )
    assert dict(night.dropped) == {"no_consent": 1}
    snapshot = {record["id"]: record for record in read_snapshot(tmp_path / "night.jsonl")}
    assert sorted(snapshot) == sorted(set(served) - {private.id})
    assert snapshot[chat.id]["feedback"] == {"thumb": 1}
    assert snapshot[chunks[0].id]["feedback"] == {"rating": 2, "comment": "too vague"}
    assert snapshot[chat.id]["model"] == champion.pinned_name


def test_simulated_users_chat_and_give_feedback_that_the_harvest_finds(
    engine: Engine, vllm_server: Any, champion: AdapterVersion, tmp_path: Path
) -> None:
    """The demo's simulated users (`pipeline.demo_world.users`) through the gateway: each question is
    answered by the routed version, each verdict they send is stored as feedback on its exchange, and
    tonight's harvest carries it (a random tiny model never gives the right steps: every verdict is
    a thumb down). The random model may also emit a NUL byte, which PostgreSQL refuses in text: that
    exchange (and the feedback on it) is quarantined with the reason, and everything else is stored."""
    from sqlalchemy import func, select

    from pipeline.demo_world.users import chat_with_users
    from storage.models import QuarantinedRow

    def quarantined() -> int:
        with engine.connect() as connection:
            return int(connection.scalar(select(func.count()).select_from(QuarantinedRow)) or 0)

    seed_routes(engine, [champion])
    with running_gateway(engine, [vllm_server.base_url], tmp_path / "spool", base_name="tiny") as gateway:
        report = chat_with_users(gateway.base_url, "support", 12, seed=1)
        wait_until(
            lambda: (
                len(stored(engine)) + len(stored_feedback(engine)) + quarantined()
                == report.asked + report.feedback_sent
            ),
            what="every exchange and verdict stored or quarantined",
        )
    assert report.asked == 12 and report.failed == 0
    assert report.served_by == {champion.pinned_name: 12}
    assert report.thumbs_up_rate == 0.0 and report.why == {"wrong steps": 12}
    assert 0 < report.feedback_sent <= 12
    rows = stored(engine)
    assert len(rows) >= 10 and all(row.user_id.startswith("sim-user-") for row in rows)
    assert {thumb for _, thumb, _, _, _ in stored_feedback(engine)} == {-1}
    snapshot = harvest(
        engine,
        "support",
        HarvestConfig(),
        TrackFilter(),
        out=tmp_path / "h.jsonl",
        pseudonym_key=PSEUDONYM_KEY,
    )
    assert snapshot.rows_kept >= 1
    rated = [r for r in read_snapshot(tmp_path / "h.jsonl") if r["feedback"]]
    assert rated and all(r["feedback"]["thumb"] == -1 for r in rated)
