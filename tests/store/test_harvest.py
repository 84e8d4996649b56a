"""Harvest on SQLite and PostgreSQL: drop reasons in order, redaction, snapshots and the watermark."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, select, text

import storage
from pipeline.config import ExternalSource, HarvestConfig, TrackFilter
from pipeline.harvest.stage import commit, harvest, read_snapshot
from storage import reads
from storage.models import QuarantinedRow, Snapshot
from tests.conftest import T0, make_record

KEY = b"test-pseudonym-key-0123456789"  # the keyed pseudonyms of user ids


def prompt(n: int, text: str) -> list[dict]:
    return [{"role": "user", "content": text}] if n >= 0 else []


def seeded(engine: Engine) -> None:
    """Ten rows, each planted to be kept or dropped for one reason."""
    records = [
        make_record(0, user_id="alice"),
        make_record(1, user_id="bob", consent=False),
        make_record(2, messages=prompt(2, "QUESTION number 0:   how do I reset my password")),  # dup of 0
        make_record(3, user_id="heavy"),
        make_record(4, user_id="heavy"),
        make_record(5, user_id="heavy"),  # over the cap of 2
        make_record(6, user_id="carol", response="x" * 500),  # too long
        make_record(7, user_id="dave", model="other-model"),  # filtered out
        make_record(8, user_id="erin", messages=prompt(8, "Mail me at erin@example.com or +44 20 7946 0958")),
        make_record(
            9,
            user_id="frank",
            response="Card 4111 1111 1111 1111 noted.",
            feedback={"comment": "ip 10.0.0.1"},
        ),
    ]
    records[2]["messages"] = [records[0]["messages"][0], *records[2]["messages"]]
    report = storage.log_interactions(engine, records)
    assert report.accepted == 10


SETTINGS = HarvestConfig(max_rows_per_user=2, max_chars=400)
FILTER = TrackFilter(models=["support"])


def test_drops_are_counted_by_reason_and_pii_redacted(engine: Engine, tmp_path: Path) -> None:
    seeded(engine)
    result = harvest(
        engine, "support", SETTINGS, FILTER, batch_size=3, out=tmp_path / "preview.jsonl", pseudonym_key=KEY
    )
    assert result.rows_read == 10
    assert dict(result.dropped) == {
        "no_consent": 1,
        "filtered": 1,
        "duplicate_prompt": 1,
        "user_cap": 1,
        "too_long": 1,
    }
    assert result.rows_kept == 5
    assert dict(result.redactions) == {"EMAIL": 1, "PHONE": 1, "CARD": 1, "IP": 1}
    records = list(read_snapshot(tmp_path / "preview.jsonl"))
    assert [r["id"] for r in records] == ["req-0", "req-3", "req-4", "req-8", "req-9"]
    text = json.dumps(records)
    assert "erin@example.com" not in text and "4111" not in text and "10.0.0.1" not in text
    assert "[EMAIL]" in text and "[CARD]" in text
    assert all(r["user"].startswith("u_") and "alice" not in r["user"] for r in records)
    assert records[0]["feedback"] == {"rating": 5, "thumb": 1}


def test_a_filter_on_a_served_name_keeps_its_pinned_versions(engine: Engine) -> None:
    models = ["support@v3", "support@v12", "support@v3", "support-old", "support@vX", "math@v1"]
    storage.log_interactions(engine, [make_record(n, model=model) for n, model in enumerate(models)])
    by_name = harvest(engine, "support", SETTINGS, TrackFilter(models=["support"]), pseudonym_key=KEY)
    assert (by_name.rows_kept, by_name.dropped["filtered"]) == (3, 3)  # the gateway logs support@v<N>
    pinned = harvest(engine, "support", SETTINGS, TrackFilter(models=["support@v3"]), pseudonym_key=KEY)
    assert (pinned.rows_kept, pinned.dropped["filtered"]) == (2, 4)


def test_preview_moves_nothing_and_is_reproducible(engine: Engine) -> None:
    seeded(engine)
    first = harvest(engine, "support", SETTINGS, FILTER, pseudonym_key=KEY)
    second = harvest(engine, "support", SETTINGS, FILTER, pseudonym_key=KEY)
    assert first.sha256 == second.sha256 and first.rows_kept == second.rows_kept == 5
    assert reads.get_watermark(engine, "support").last_id is None
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Snapshot)) == 0


def test_watermark_moves_only_on_commit(engine: Engine, tmp_path: Path) -> None:
    seeded(engine)
    night = harvest(engine, "support", SETTINGS, FILTER, snapshot_dir=tmp_path, pseudonym_key=KEY)
    assert night.snapshot_id is not None and night.path is not None and night.path.exists()
    # The night failed after harvest: nothing committed, the same window comes again.
    retry = harvest(engine, "support", SETTINGS, FILTER, snapshot_dir=tmp_path, pseudonym_key=KEY)
    assert (retry.window, retry.sha256) == (night.window, night.sha256)
    state = commit(engine, retry.snapshot_id)
    assert state.last_id == 10
    assert commit(engine, night.snapshot_id).last_id == 10  # never backwards, idempotent
    storage.log_interactions(engine, [make_record(n, user_id=f"new-{n}") for n in range(20, 23)])
    nxt = harvest(engine, "support", SETTINGS, FILTER, pseudonym_key=KEY)
    assert (nxt.window.after_id, nxt.window.until_id, nxt.rows_read, nxt.rows_kept) == (10, 13, 3, 3)


def test_snapshot_file_matches_manifest(engine: Engine, tmp_path: Path) -> None:
    import hashlib

    seeded(engine)
    result = harvest(engine, "support", SETTINGS, FILTER, snapshot_dir=tmp_path, pseudonym_key=KEY)
    assert result.path is not None
    assert hashlib.sha256(result.path.read_bytes()).hexdigest() == result.sha256
    manifest = reads.get_snapshot(engine, result.snapshot_id)
    assert (manifest.rows_kept, manifest.sha256, manifest.path) == (5, result.sha256, str(result.path))
    assert manifest.dropped["user_cap"] == 1 and manifest.committed_at is None


def test_streams_in_batches(engine: Engine) -> None:
    storage.log_interactions(engine, [make_record(n, user_id=f"u{n}") for n in range(50)])
    seen: list[int] = []
    harvest(
        engine,
        "support",
        HarvestConfig(),
        TrackFilter(),
        batch_size=8,
        progress=seen.append,
        pseudonym_key=KEY,
    )
    assert sum(seen) == 50 and max(seen) <= 8 and len(seen) >= 7


def test_rows_written_behind_the_api_are_rechecked(engine: Engine) -> None:
    storage.log_interaction(engine, make_record(1))
    with engine.begin() as connection:
        connection.execute(
            text("UPDATE interactions SET messages = :m WHERE id = 1"), {"m": json.dumps([{"role": "x"}])}
        )
    result = harvest(engine, "support", HarvestConfig(), TrackFilter(), snapshot_dir=None, pseudonym_key=KEY)
    assert dict(result.dropped) == {"malformed": 1}


def test_external_source_with_column_mapping(engine: Engine, tmp_path: Path) -> None:
    source_url = f"sqlite:///{tmp_path / 'app.db'}"
    app_db = create_engine(source_url)
    with app_db.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE chat (ev TEXT, at TIMESTAMP, who TEXT, convo TEXT, answer TEXT, srv TEXT, ok INTEGER)"
            )
        )
        rows = [
            ("e1", T0, "u1", json.dumps(prompt(0, "hello, my email is a@b.co")), "hi", "support", 1),
            ("e2", T0 + timedelta(hours=1), "u2", json.dumps(prompt(0, "second")), "ok", "support", 1),
            ("e3", T0 + timedelta(hours=2), "u3", "not json", "ok", "support", 1),
            ("e4", T0 + timedelta(hours=3), "u4", json.dumps(prompt(0, "later")), "ok", "support", 1),
        ]
        connection.execute(
            text("INSERT INTO chat VALUES (:ev, :at, :who, :convo, :answer, :srv, :ok)"),
            [
                dict(zip(["ev", "at", "who", "convo", "answer", "srv", "ok"], row, strict=True))
                for row in rows
            ],
        )
    app_db.dispose()
    source = ExternalSource(
        url=source_url,
        query="SELECT * FROM chat WHERE at > :since AND at <= :until ORDER BY at",
        columns={
            "id": "ev",
            "ts": "at",
            "user_id": "who",
            "messages": "convo",
            "response": "answer",
            "model": "srv",
        },
    )
    settings = HarvestConfig(source=source)
    until = (T0 + timedelta(hours=2, minutes=30)).replace(tzinfo=None).replace(tzinfo=UTC)
    first = harvest(
        engine,
        "support",
        settings,
        TrackFilter(),
        snapshot_dir=tmp_path / "snaps",
        until=until,
        pseudonym_key=KEY,
    )
    assert (first.rows_read, first.rows_kept, dict(first.dropped)) == (3, 2, {"malformed": 1})
    assert first.redactions["EMAIL"] == 1
    with engine.connect() as connection:
        reason, source_name = connection.execute(select(QuarantinedRow.reason, QuarantinedRow.source)).one()
    assert reason.startswith("messages") and source_name == "harvest:support"
    commit(engine, first.snapshot_id)
    later = harvest(
        engine, "support", settings, TrackFilter(), until=datetime(2030, 1, 1, tzinfo=UTC), pseudonym_key=KEY
    )
    assert (later.rows_read, later.rows_kept) == (1, 1)


def test_external_source_errors_are_one_line(engine: Engine, tmp_path: Path) -> None:
    source = ExternalSource(
        url=f"sqlite:///{tmp_path / 'x.db'}", query="SELECT * FROM missing WHERE a > :since AND a <= :until"
    )
    with pytest.raises(
        storage.UserError, match=r"harvest source query failed on sqlite.*no such table: missing"
    ):
        harvest(engine, "support", HarvestConfig(source=source), TrackFilter(), pseudonym_key=KEY)


def test_contradictory_feedback_keeps_the_latest_and_the_harvest_scores_it(
    engine: Engine, tmp_path: Path
) -> None:
    """A thumb up, then a rating of 1 on the same answer: the harvest keeps the latest (the rating), so a
    feedback method sees an undesirable reply; a thumb up with a rating of 1 in one event is ambiguous."""
    from evals.graders import feedback_score

    storage.log_interactions(
        engine,
        [make_record(0, feedback=None), make_record(1, feedback={"thumb": 1, "rating": 1})],
    )
    storage.log_feedback(engine, "req-0", thumb=1)
    storage.log_feedback(engine, "req-0", rating=1)
    harvest(engine, "support", SETTINGS, FILTER, out=tmp_path / "preview.jsonl", pseudonym_key=KEY)
    records = {r["id"]: r for r in read_snapshot(tmp_path / "preview.jsonl")}
    assert records["req-0"]["feedback"] == {"rating": 1}
    assert feedback_score(records["req-0"]["feedback"]) == 0.0
    assert feedback_score(records["req-1"]["feedback"]) == 0.5  # neither desirable nor undesirable
