"""The write path on SQLite and PostgreSQL: idempotent inserts, feedback, quarantine, migrations."""

import json
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select

import storage
from storage.errors import InvalidRecord, SchemaNotReady, UserError
from storage.migrate import current_revision, head_revision
from storage.models import FeedbackEvent, Interaction, QuarantinedRow
from tests.conftest import BACKENDS, make_record


def count(engine: Engine, model: type) -> int:
    with engine.connect() as connection:
        return connection.scalar(select(func.count()).select_from(model)) or 0


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_upgrade_is_idempotent(database_url: str) -> None:
    engine = storage.make_engine(database_url)
    assert storage.upgrade(engine) == (head_revision(), head_revision())
    assert current_revision(engine) == head_revision()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmigrated_database_is_refused_with_the_fix(backend: str, tmp_path: Path, request) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        url = request.getfixturevalue("empty_postgres_url")
    with pytest.raises(SchemaNotReady, match="has no overnight schema; run `overnight db upgrade`"):
        storage.connect(url)


def test_unreachable_database_is_one_line() -> None:
    with pytest.raises(
        UserError, match=r"cannot connect to database postgresql\+psycopg://nobody:\*\*\*@127.0.0.1:1/x"
    ):
        storage.make_engine("postgresql+psycopg://nobody:secret@127.0.0.1:1/x")


def test_log_interaction_is_idempotent_by_id(engine: Engine) -> None:
    assert storage.log_interaction(engine, make_record(1)) is True
    assert storage.log_interaction(engine, make_record(1, response="changed")) is False
    assert count(engine, Interaction) == 1
    assert count(engine, FeedbackEvent) == 1


def test_records_without_id_dedupe_by_content(engine: Engine) -> None:
    record = make_record(2)
    del record["id"]
    assert storage.log_interaction(engine, record)
    assert not storage.log_interaction(engine, {**record, "feedback": {"thumb": -1}})
    assert storage.log_interaction(engine, {**record, "response": "different"})
    assert count(engine, Interaction) == 2


def test_log_interaction_raises_on_invalid(engine: Engine) -> None:
    with pytest.raises(InvalidRecord, match="consent"):
        storage.log_interaction(engine, make_record(consent="yes"))
    assert count(engine, Interaction) == 0


def test_batched_api_quarantines_bad_records(engine: Engine) -> None:
    records = [make_record(n) for n in range(25)] + [make_record(99, ts="not a time"), "nonsense"]
    report = storage.log_interactions(engine, records, batch_size=10)
    assert (report.accepted, report.duplicates, report.quarantined) == (25, 0, 2)
    again = storage.log_interactions(engine, records, batch_size=7)
    assert (again.accepted, again.duplicates, again.quarantined) == (0, 25, 2)
    assert count(engine, QuarantinedRow) == 2  # the same bad row is kept once


def test_duplicates_within_one_batch_keep_the_first(engine: Engine) -> None:
    report = storage.log_interactions(engine, [make_record(5), make_record(5, response="later copy")])
    assert (report.accepted, report.duplicates) == (1, 1)
    with engine.connect() as connection:
        assert connection.scalar(select(Interaction.response)).startswith("Answer 5")


def test_ingest_jsonl_counts_and_quarantines_with_line_numbers(engine: Engine, tmp_path: Path) -> None:
    lines = [json.dumps(make_record(n)) for n in range(10)]
    lines.insert(3, "{broken")
    lines.insert(6, json.dumps(make_record(50, consent="yes")))
    lines.insert(8, "")
    lines.append(json.dumps(make_record(0)))  # duplicate of line 1
    path = write_lines(tmp_path / "traffic.jsonl", lines)
    report = storage.ingest_jsonl(engine, path, batch_size=4)
    assert report.as_json()["accepted"] == 10
    assert (report.duplicates, report.quarantined) == (1, 2)
    with engine.connect() as connection:
        bad = connection.execute(
            select(QuarantinedRow.line_no, QuarantinedRow.reason, QuarantinedRow.raw)
        ).all()
    assert sorted((line, reason.split(":")[0]) for line, reason, _ in bad) == [
        (4, "invalid JSON"),
        (7, "consent"),
    ]
    assert {raw for _, _, raw in bad} >= {"{broken"}
    again = storage.ingest_jsonl(engine, path)
    assert (again.accepted, again.duplicates, again.quarantined) == (0, 11, 2)
    assert count(engine, QuarantinedRow) == 2


def test_invalid_utf8_line_is_quarantined_not_fatal(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        json.dumps(make_record(1)).encode() + b"\n\xff\xfe broken\n" + json.dumps(make_record(2)).encode()
    )
    report = storage.ingest_jsonl(engine, path)
    assert (report.accepted, report.quarantined, dict(report.reasons)) == (2, 1, {"invalid UTF-8": 1})


def test_unreadable_file_is_a_user_error(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read"):
        storage.ingest_jsonl(engine, tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="cannot read"):
        storage.ingest_jsonl(engine, tmp_path)


def test_timestamps_round_trip_as_utc(engine: Engine) -> None:
    storage.log_interaction(engine, make_record(1, ts="2026-11-21T23:30:00-05:00"))
    with engine.connect() as connection:
        ts = connection.scalar(select(Interaction.ts))
    assert ts.isoformat() == "2026-11-22T04:30:00+00:00"


def test_later_feedback_attaches_by_client_id(engine: Engine) -> None:
    storage.log_interaction(engine, make_record(1, feedback=None))
    storage.log_feedback(engine, "req-1", thumb=-1, comment="wrong answer")
    with engine.connect() as connection:
        assert connection.execute(select(FeedbackEvent.thumb, FeedbackEvent.comment)).one() == (
            -1,
            "wrong answer",
        )
    with pytest.raises(InvalidRecord, match=r"feedback\.rating"):
        storage.log_feedback(engine, "req-1", rating=9)
    with pytest.raises(UserError, match="no interaction with id 'nope'"):
        storage.log_feedback(engine, "nope", thumb=1)
