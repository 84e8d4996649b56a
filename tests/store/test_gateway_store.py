"""The gateway's store, on SQLite and PostgreSQL: routes, keys, ordered batches, an outage under load.

The outage is real on both backends: the SQLite database's directory disappears (new connections
cannot open the file), the PostgreSQL database stops accepting connections and its sessions are
killed. Meanwhile clients keep calling; every request must be answered, and once the store is back
every exchange must be stored exactly once, in the order the gateway logged them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.engine import make_url

import storage
from pipeline.deploy.gateway.capture import Capture
from pipeline.deploy.gateway.exchange import ANONYMOUS, Outcome, new_exchange
from pipeline.deploy.gateway.openai_wire import Reply
from pipeline.deploy.gateway.routing import Resolved
from pipeline.deploy.gateway.spool import Spool
from storage.errors import UserError
from storage.keys import (
    InteractionOwner,
    create_api_key,
    find_api_key,
    interaction_owner,
    key_sha256,
    revoke_api_key,
)
from storage.models import ApiKey
from storage.records import Feedback, parse_record
from storage.routes import RouteMoved, flip_route, read_routes
from storage.writes import LaterFeedback, log_in_order
from tests.conftest import BACKENDS, POSTGRES_ADMIN_URL, T0, make_record
from tests.fakes.openai_upstream import FakeUpstream, reply_text
from tests.gateway_fixtures import running_gateway, stored, stored_feedback, wait_until

# -- storage functions ------------------------------------------------------------------------------------


def test_a_flip_keeps_the_previous_version_and_a_repeat_changes_nothing(engine: Engine) -> None:
    first = flip_route(engine, "support", "1", "support@v1")
    assert (first.version, first.adapter_name, first.previous_version) == ("1", "support@v1", None)
    flip_route(engine, "support", "2", "support@v2")
    again = flip_route(engine, "support", "2", "support@v2")  # a deploy re-run after a crash
    assert (again.version, again.previous_version) == ("2", "1")
    rollback = flip_route(engine, "support", "1", "support@v1")
    assert (rollback.version, rollback.adapter_name, rollback.previous_version) == ("1", "support@v1", "2")
    flip_route(engine, "math", "4", "math@v4")
    assert {track: route.version for track, route in read_routes(engine).items()} == {
        "support": "1",
        "math": "4",
    }


def test_a_conditional_flip_happens_only_from_the_expected_route(engine: Engine) -> None:
    from storage.models import Deployment

    flip_route(engine, "support", "1", "support@v1", expected=None)
    with pytest.raises(RouteMoved):
        flip_route(engine, "support", "2", "support@v2", expected=None)  # a route exists already
    row = Deployment(track="support", version="3", adapter_name="support@v3", endpoint="e", action="deploy",
                     status="ok", detail={})  # fmt: skip
    with pytest.raises(RouteMoved, match="moved while this deploy ran"):
        flip_route(engine, "support", "3", "support@v3", expected="support@v2", deployments=[row])
    assert read_routes(engine)["support"].adapter_name == "support@v1"
    with engine.connect() as connection:  # the refused flip's record was not written either
        assert connection.scalar(select(func.count()).select_from(Deployment)) == 0
    moved = flip_route(engine, "support", "3", "support@v3", expected="support@v1")
    assert (moved.adapter_name, moved.previous_version) == ("support@v3", "1")


def test_api_keys_are_stored_hashed_found_and_revoked(engine: Engine) -> None:
    key = create_api_key(engine, "web-app", ["support"], consent_default=False, store_traffic=False)
    assert key.startswith("ovn-") and len(key) > 40
    with engine.connect() as connection:
        stored_hashes = connection.execute(text("SELECT key_sha256 FROM api_keys")).scalars().all()
    assert stored_hashes == [key_sha256(key)]  # the clear key is nowhere in the store
    found = find_api_key(engine, key)
    assert isinstance(found, ApiKey) and found.name == "web-app" and found.tracks == ["support"]
    assert found.allows("support") and not found.allows("math")
    assert (found.consent_default, found.store_traffic) == (False, False)
    assert find_api_key(engine, key + "x") is None
    with pytest.raises(UserError, match="already exists"):
        create_api_key(engine, "web-app")
    assert revoke_api_key(engine, "web-app") and not revoke_api_key(engine, "web-app")
    assert find_api_key(engine, key) is None


def test_an_interactions_owner_is_the_key_in_its_metadata(engine: Engine) -> None:
    storage.log_interaction(engine, make_record(1, metadata={"gateway": {"key": "web-app"}}))
    storage.log_interaction(engine, make_record(2, metadata={}))
    assert interaction_owner(engine, "req-1") == InteractionOwner("web-app")
    assert interaction_owner(engine, "req-2") == InteractionOwner(None)
    assert interaction_owner(engine, "req-3") is None


def test_a_batch_is_written_in_order_with_feedback_after_its_record(engine: Engine) -> None:
    records = [parse_record(make_record(n, feedback=None)) for n in range(3)]
    thumbs_up = LaterFeedback("req-1", Feedback(thumb=1), "gateway")
    orphan = LaterFeedback("req-404", Feedback(rating=2), "gateway")
    report = log_in_order(engine, [records[0], records[1], thumbs_up, orphan, records[2]])
    assert (report.accepted, report.quarantined) == (3, 1)
    replay = log_in_order(engine, records)  # a replayed batch stores nothing twice
    assert (replay.accepted, replay.duplicates) == (0, 3)
    assert [row.client_id for row in stored(engine)] == ["req-0", "req-1", "req-2"]
    assert stored_feedback(engine) == [("req-1", 1, None, None, "gateway")]
    with engine.connect() as connection:
        reason = connection.execute(text("SELECT reason FROM quarantine")).scalar_one()
    assert reason == "feedback for unknown interaction 'req-404'"


def test_feedback_written_twice_is_stored_once(engine: Engine) -> None:
    storage.log_interaction(engine, make_record(1, feedback=None))
    thumbs_down = LaterFeedback("req-1", Feedback(thumb=-1), "gateway")
    log_in_order(engine, [thumbs_down])
    log_in_order(engine, [thumbs_down, thumbs_down])  # a spooled batch replayed after a crash
    later = LaterFeedback("req-1", Feedback(thumb=1), "gateway")
    log_in_order(engine, [later])
    assert stored_feedback(engine) == [
        ("req-1", -1, None, None, "gateway"),
        ("req-1", 1, None, None, "gateway"),
    ]
    with engine.connect() as connection:
        given = connection.execute(text("SELECT ts FROM feedback ORDER BY id")).scalars().all()
    assert len(given) == 2  # stamped when given, not when written


def test_an_exchange_the_store_refuses_is_quarantined_and_logging_goes_on(
    engine: Engine, tmp_path: Path
) -> None:
    """PostgreSQL refuses a NUL character (psycopg's own error, on the COPY path); SQLite stores it."""
    capture = Capture(
        partial(log_in_order, engine), Spool(tmp_path), queue_size=10, batch_size=10, flush_seconds=0.01
    )
    route = Resolved("support", "support", "support@v3", "3")
    for prompt in ("before", "nul \x00 inside", "after"):
        body = {"model": "support", "messages": [{"role": "user", "content": prompt}]}
        ex = new_exchange("chat", body, route, ANONYMOUS, {}, T0)
        capture.expect(ex)
        capture.record(ex, Outcome(Reply("fine"), "http://a:8000", 1.0))
        capture.drain_once()
    capture.close()
    prompts = [row.messages[0]["content"] for row in stored(engine)]
    if engine.dialect.name == "postgresql":
        assert prompts == ["before", "after"]
        with engine.connect() as connection:
            reason = connection.execute(text("SELECT reason FROM quarantine")).scalar_one()
        assert reason.startswith("store refused it:")
    else:
        assert prompts == ["before", "nul \x00 inside", "after"]
    assert not list(tmp_path.glob("*.jsonl")) and capture.store_ok


# -- several gateway processes ------------------------------------------------------------------------------


def test_a_route_flip_is_seen_by_a_second_gateway_within_a_second(database_url: str, tmp_path: Path) -> None:
    engines = [storage.connect(database_url) for _ in range(2)]
    flip_route(engines[0], "support", "1", "support@v1")
    try:
        with (
            FakeUpstream("a") as upstream,
            running_gateway(engines[0], [upstream.base_url], tmp_path / "spool-0") as first,
            running_gateway(engines[1], [upstream.base_url], tmp_path / "spool-1") as second,
        ):
            clients = [first.openai(), second.openai()]
            for client in clients:
                assert client.completions.create(model="support", prompt="hi").model == "support@v1"
            flipped_at = time.monotonic()
            flip_route(engines[0], "support", "2", "support@v2")
            seen_after = []
            for client in clients:
                wait_until(
                    lambda c=client: c.completions.create(model="support", prompt="hi").model == "support@v2"
                )
                seen_after.append(time.monotonic() - flipped_at)
            assert max(seen_after) < 1.0, seen_after
            answer = clients[1].completions.create(model="support", prompt="after")
            assert answer.choices[0].text == reply_text("a", "support@v2", "after")
    finally:
        for engine in engines:
            engine.dispose()


# -- a store outage under load ------------------------------------------------------------------------------


@dataclass
class Outage:
    engine: Engine  # the gateway's engine on the store
    cut: Callable[[], None]
    restore: Callable[[], None]


@pytest.fixture(params=BACKENDS)
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Outage]:
    if request.param == "sqlite":
        yield from _sqlite_outage(tmp_path)
    else:
        yield from _postgres_outage(request.getfixturevalue("empty_postgres_url"))


def _sqlite_outage(tmp_path: Path) -> Iterator[Outage]:
    folder, away = tmp_path / "db", tmp_path / "db-away"
    engine = storage.make_engine(f"sqlite:///{folder / 'overnight.db'}")
    storage.upgrade(engine)

    def cut() -> None:
        folder.rename(away)  # new connections cannot open the database file any more
        engine.dispose()  # and the pooled ones are dropped, as after a crash of the disk

    def restore() -> None:
        away.rename(folder)

    yield Outage(engine, cut, restore)
    engine.dispose()


def _postgres_outage(url: str) -> Iterator[Outage]:
    engine = storage.make_engine(url)
    storage.upgrade(engine)
    name = make_url(url).database
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def allow(allowed: bool) -> None:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'))
            if not allowed:
                connection.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                    {"name": name},
                )

    yield Outage(engine, lambda: allow(False), lambda: allow(True))
    allow(True)
    engine.dispose()
    admin.dispose()


def test_a_store_outage_under_load_loses_nothing_and_keeps_the_order(outage: Outage, tmp_path: Path) -> None:
    key = create_api_key(outage.engine, "load")
    flip_route(outage.engine, "support", "3", "support@v3")
    spool = tmp_path / "spool"
    settings = {"require_keys": True, "queue_size": 16, "batch_size": 20, "key_cache_seconds": 0.2}
    with (
        FakeUpstream("a") as upstream,
        running_gateway(outage.engine, [upstream.base_url], spool, **settings) as gw,
    ):
        client = gw.async_openai(key)
        capture = gw.gateway.capture

        async def ask(n: int) -> str:
            completion = await client.completions.create(model="support", prompt=f"question {n}")
            assert completion.choices[0].text == reply_text("a", "support@v3", f"question {n}")
            return completion.id

        async def calls(numbers: range, halfway: Callable[[], None] | None = None) -> list[str]:
            tasks = [asyncio.create_task(ask(n)) for n in numbers]
            if halfway is not None:
                await asyncio.wait(tasks[: len(tasks) // 2])
                await asyncio.to_thread(halfway)  # while the other half is still in flight
            return list(await asyncio.gather(*tasks))

        async def scenario() -> list[str]:
            ids = await calls(range(50), halfway=outage.cut)
            ids += await calls(range(50, 150))
            await asyncio.to_thread(wait_until, lambda: not capture.store_ok, what="the writer to notice")
            async with gw.async_openai(key) as other:
                late = await other.post(
                    "/feedback", body={"interaction_id": ids[100], "thumb": 1}, cast_to=object
                )
            assert late == {"object": "feedback", "interaction_id": ids[100], "status": "accepted"}
            assert len(capture.spool) > 0 and gw.gateway.readiness()[0]  # spooling, still ready
            return ids + await calls(range(150, 200), halfway=outage.restore)

        ids = asyncio.run(scenario())
        assert len(set(ids)) == 200
        wait_until(lambda: len(stored(outage.engine)) == 200 and len(capture.spool) == 0, timeout=30)
        wait_until(lambda: stored_feedback(outage.engine), what="the feedback")
    rows = stored(outage.engine)
    assert sorted(str(row.client_id) for row in rows) == sorted(ids)  # every exchange, each once
    order = [row.metadata_["gateway"]["log_seq"] for row in rows]
    assert order == sorted(order)  # log positions follow the order the gateway logged them in
    assert stored_feedback(outage.engine) == [(ids[100], 1, None, None, "gateway")]
    assert not list(spool.glob("*.jsonl"))
