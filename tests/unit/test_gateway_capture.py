"""The gateway's log writer and spool without a network: ordering, durability, consent, feedback.

`FakeStore` stands in for `storage.writes.log_in_order`: it records each batch written, fails as an
unreachable database does (SQLAlchemy's OperationalError) while `down`, and refuses chosen items as
bad data. Tests drive the writer and the spill thread one turn at a time (`Capture.drain_once`,
`Capture.spill_once`), so every interleaving of outage, overflow and recovery below happens exactly
as written, not by timing luck.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.exc import OperationalError as SqlOperationalError

from pipeline.deploy.gateway.capture import Capture
from pipeline.deploy.gateway.exchange import Caller, Exchange, Outcome, new_exchange
from pipeline.deploy.gateway.openai_wire import Reply
from pipeline.deploy.gateway.routing import Resolved
from pipeline.deploy.gateway.spool import Spool
from storage.errors import UserError
from storage.keys import InteractionOwner
from storage.records import Feedback, InteractionRecord
from storage.writes import BadRow, LaterFeedback, LogItem

T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
UNREACHABLE = SqlOperationalError("INSERT", {}, ConnectionRefusedError("connection refused"))
SUPPORT = Resolved("support", "support", "support@v3", "3")
MakeCapture = Callable[..., Capture]


class DataError(Exception):
    """What psycopg raises, unwrapped by SQLAlchemy, when PostgreSQL's COPY meets a NUL character."""


class OperationalError(Exception):
    """A driver's own "cannot reach the server" error (psycopg.OperationalError), unwrapped."""


class FakeStore:
    def __init__(self) -> None:
        self.down: Exception | None = None  # raised while set: the store is unreachable
        self.refuse: dict[str, Exception] = {}  # interaction id -> what its insert raises, as bad data does
        self.batches: list[list[LogItem]] = []

    def write(self, items: Sequence[LogItem]) -> None:
        if self.down is not None:
            raise self.down
        for item in items:
            if isinstance(item, InteractionRecord) and item.id in self.refuse:
                raise self.refuse[item.id]
        self.batches.append(list(items))

    def items(self) -> list[LogItem]:
        return [item for batch in self.batches for item in batch]

    def prompts(self) -> list[str]:
        return [item.prompt_text() for item in self.items() if isinstance(item, InteractionRecord)]


def exchange(
    n: int, *, key: str | None = None, consent: str | None = None, store_traffic: bool = True
) -> Exchange:
    body = {"model": "support", "messages": [{"role": "user", "content": f"q{n}"}]}
    headers = {"x-overnight-consent": consent} if consent else {}
    return new_exchange("chat", body, SUPPORT, Caller(key, ("*",), True, store_traffic), headers, T0)


def outcome(text: str = "answer") -> Outcome:
    return Outcome(Reply(text=text, finish_reason="stop", choices=1), "http://a:8000", 12.5)


def finish(capture: Capture, ex: Exchange) -> Exchange:
    capture.expect(ex)
    capture.record(ex, outcome())
    return ex


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def make_capture(store: FakeStore, tmp_path: Path) -> Iterator[MakeCapture]:
    made: list[Capture] = []

    def build(queue_size: int = 100, batch_size: int = 100, flush_seconds: float = 0.0) -> Capture:
        """flush_seconds 0: `drain_once` never waits (the tests drive the writer turn by turn)."""
        capture = Capture(
            store.write,
            Spool(tmp_path / "spool"),
            queue_size=queue_size,
            batch_size=batch_size,
            flush_seconds=flush_seconds,
        )
        made.append(capture)
        return capture

    yield build
    for capture in made:
        capture.spool.close()


def test_the_spool_keeps_whole_segments_in_order_for_one_process(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for seq in (30, 10, 20):
        spool.append(seq, [{"seq": seq}, {"seq": seq + 1}])
    assert spool.segments() == [10, 20, 30]
    assert spool.read(20) == [{"seq": 20}, {"seq": 21}]
    spool.remove(10)
    (tmp_path / f".{40:020d}.jsonl.tmp").write_text('{"seq": 40}')  # a write that never completed
    (tmp_path / f"{50:020d}.jsonl").write_text("not json\n")  # damaged by hand
    with pytest.raises(UserError, match="in use by another gateway process"):
        Spool(tmp_path)
    spool.close()
    reopened = Spool(tmp_path)
    assert reopened.segments() == [20, 30, 50]
    with pytest.raises(ValueError):
        reopened.read(50)
    reopened.set_aside(50, "not JSON")
    assert reopened.segments() == [20, 30]  # set aside, not replayed
    assert (tmp_path / f"{50:020d}.jsonl.bad").exists() and not list(tmp_path.glob("*.tmp"))
    reopened.close()


def test_order_survives_an_outage_an_overflow_and_the_recovery(
    store: FakeStore, make_capture: MakeCapture
) -> None:
    capture = make_capture(queue_size=4, batch_size=3)
    store.down = UNREACHABLE
    for n in range(1, 6):  # the fifth overflows the queue: handed to the spill thread
        finish(capture, exchange(n))
    assert capture.backlog()["queued"] == 4 and len(capture.spool) == 0  # the request wrote no file
    capture.spill_once()
    assert len(capture.spool) == 1
    capture.drain_once()  # q1-q3: the store is down, spooled before the spilled q5 by sequence
    assert store.batches == [] and len(capture.spool) == 2 and not capture.store_ok
    store.down = None
    finish(capture, exchange(6))  # still spilling: q4 is queued, and q6 must not overtake it
    capture.drain_once()  # q4, after the spooled q1-q3; q5 and q6 are newer than q4 and wait
    assert store.prompts() == ["q1", "q2", "q3", "q4"]
    finish(capture, exchange(7))  # q6 is not on disk yet: still spilling, or q7 would overtake it
    capture.drain_once()
    capture.spill_once()
    capture.drain_once()  # the queue drained and the overflow is on disk: back to queueing
    finish(capture, exchange(8))
    capture.drain_once()
    assert store.prompts() == [f"q{n}" for n in range(1, 9)]
    assert len(capture.spool) == 0 and capture.store_ok and capture.backlog()["pending"] == 0
    seqs = [
        item.metadata["gateway"]["log_seq"] for item in store.items() if isinstance(item, InteractionRecord)
    ]
    assert seqs == sorted(seqs)


def test_feedback_given_while_the_reply_streams_is_written_right_after_it(
    store: FakeStore, make_capture: MakeCapture
) -> None:
    capture = make_capture()
    ex = exchange(1, key="web")
    capture.expect(ex)
    assert capture.owner(ex.interaction_id) == InteractionOwner("web")
    capture.feedback(ex.interaction_id, Feedback(thumb=1))  # the stream has not ended yet
    finish(capture, exchange(2))
    capture.record(ex, outcome())
    capture.drain_once()
    kinds = [
        (type(item).__name__, getattr(item, "id", None) or getattr(item, "interaction_id", None))
        for item in store.items()
    ]
    assert [kind for kind, _ in kinds] == ["InteractionRecord", "InteractionRecord", "LaterFeedback"]
    assert kinds[1][1] == kinds[2][1] == ex.interaction_id
    assert capture.owner(ex.interaction_id) is None  # stored now: the store answers from here on


def test_traffic_without_consent_is_stored_as_such_or_not_at_all(
    store: FakeStore, make_capture: MakeCapture
) -> None:
    capture = make_capture()
    kept = finish(capture, exchange(1, consent="false"))
    dropped = finish(capture, exchange(2, consent="false", store_traffic=False))
    consented = finish(capture, exchange(3, consent="true", store_traffic=False))
    capture.drain_once()
    records = [item for item in store.items() if isinstance(item, InteractionRecord)]
    assert [(r.id, r.consent) for r in records] == [
        (kept.interaction_id, False),
        (consented.interaction_id, True),
    ]
    assert capture.owner(dropped.interaction_id) is None  # feedback on it will be refused as unknown


def test_spooled_interactions_outlive_the_process(store: FakeStore, make_capture: MakeCapture) -> None:
    first = make_capture()
    store.down = UNREACHABLE
    ex = finish(first, exchange(1, key="web"))
    first.drain_once()
    first.close()  # the process stops while the store is down: the record is on disk only
    second = make_capture()
    assert second.owner(ex.interaction_id) == InteractionOwner("web")  # feedback is still accepted
    second.feedback(ex.interaction_id, Feedback(rating=5))
    store.down = None
    second.drain_once()
    assert [type(item) for item in store.items()] == [InteractionRecord, LaterFeedback]


def test_an_exchange_the_store_refuses_is_quarantined_and_the_rest_written(
    store: FakeStore, make_capture: MakeCapture
) -> None:
    capture = make_capture()
    exchanges = [finish(capture, exchange(n)) for n in range(3)]
    store.refuse = {exchanges[1].interaction_id: IntegrityError("INSERT", {}, ValueError("value too long"))}
    capture.drain_once()
    items = store.items()
    assert [type(item) for item in items] == [InteractionRecord, BadRow, InteractionRecord]
    assert isinstance(items[1], BadRow) and items[1].reason.startswith("store refused it: value too long")
    assert len(capture.spool) == 0 and capture.store_ok


def test_data_the_driver_itself_refuses_is_quarantined_and_never_blocks_the_log(
    store: FakeStore, make_capture: MakeCapture
) -> None:
    capture = make_capture()
    poison = finish(capture, exchange(1))
    store.refuse = {
        poison.interaction_id: DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    }
    capture.drain_once()
    for n in range(2, 4):
        finish(capture, exchange(n))
        capture.drain_once()
    assert store.prompts() == ["q2", "q3"] and len(capture.spool) == 0 and capture.store_ok
    refused = [item for item in store.items() if isinstance(item, BadRow)]
    assert len(refused) == 1 and "cannot contain NUL" in refused[0].reason


def test_the_drivers_own_connection_errors_are_an_outage_not_bad_data(
    store: FakeStore, make_capture: MakeCapture
) -> None:
    capture = make_capture()
    store.down = OperationalError("server closed the connection unexpectedly")
    finish(capture, exchange(1))
    capture.drain_once()
    assert store.batches == [] and len(capture.spool) == 1 and not capture.store_ok  # kept, not quarantined
    store.down = None
    capture.drain_once()
    assert store.prompts() == ["q1"] and len(capture.spool) == 0


def test_a_spooled_segment_that_cannot_be_read_back_is_set_aside(
    store: FakeStore, make_capture: MakeCapture, tmp_path: Path
) -> None:
    first = make_capture()
    store.down = UNREACHABLE
    for n in range(1, 4):
        finish(first, exchange(n))
        first.drain_once()
        first._retry_at = 0.0  # retry the store at once: one segment per exchange
    first.close()
    middle = sorted((tmp_path / "spool").glob("*.jsonl"))[1]
    middle.write_text('{"seq": 1, "kind": "record", "record": {"id": "x"}}\n')  # damaged
    second = make_capture()
    store.down = None
    second.drain_once()
    assert store.prompts() == ["q1", "q3"] and len(second.spool) == 0
    assert middle.with_name(middle.name + ".bad").exists()


def test_early_feedback_on_an_exchange_that_cannot_be_a_record_is_quarantined_after_it(
    store: FakeStore, make_capture: MakeCapture
) -> None:
    capture = make_capture()
    body = {"model": "support", "messages": [{"role": "system", "content": "no user turn"}]}
    ex = new_exchange("chat", body, SUPPORT, Caller(None), {}, T0)
    capture.expect(ex)
    capture.feedback(ex.interaction_id, Feedback(thumb=-1))
    capture.record(ex, outcome())
    capture.drain_once()
    assert [type(item) for item in store.items()] == [BadRow, LaterFeedback]  # kept, not dropped


def test_closing_writes_what_is_queued(store: FakeStore, make_capture: MakeCapture) -> None:
    capture = make_capture(flush_seconds=0.05)  # its own thread this time
    capture.start()
    for n in range(5):
        finish(capture, exchange(n))
    capture.close()
    assert store.prompts() == [f"q{n}" for n in range(5)]
