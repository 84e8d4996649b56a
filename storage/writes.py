"""The write path: interactions, feedback and quarantine, in batches, idempotently.

An interaction is identified by its client id or, without one, by the hash of its content, and
stored with INSERT ... ON CONFLICT DO NOTHING: re-sending a record, re-running an import or a
crash-and-retry never stores it twice. Rows that fail validation go to quarantine with where they
came from and why; nothing a user sends is silently lost.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError
from sqlalchemy import Connection, Engine, Insert, insert, select

from storage.errors import InvalidRecord, UserError
from storage.models import Base, FeedbackEvent, Interaction, QuarantinedRow, utc_now
from storage.records import (
    Feedback,
    InteractionRecord,
    describe_validation_error,
    parse_record,
    parse_record_line,
)

DEFAULT_BATCH_SIZE = 1000
Progress = Callable[[int], None]


@dataclass
class IngestReport:
    """What an import did; `reasons` counts quarantined rows by reason."""

    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "quarantined": self.quarantined,
            "reasons": dict(self.reasons.most_common()),
        }


@dataclass(frozen=True)
class BadRow:
    """A row that failed validation, kept whole for the quarantine table."""

    source: str
    line_no: int | None
    reason: str
    raw: str
    track: str | None = None


def dialect_insert(connection: Connection, table: type[Base]) -> Any:
    """An INSERT with the dialect's ON CONFLICT clauses (PostgreSQL and SQLite share them)."""
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif connection.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise UserError(f"database.url: dialect {connection.dialect.name!r} is not supported")
    return insert(table)


def insert_ignoring_conflicts(connection: Connection, table: type[Base], key: str) -> Insert:
    """INSERT ... ON CONFLICT (key) DO NOTHING for the connection's dialect."""
    return dialect_insert(connection, table).on_conflict_do_nothing(index_elements=[key])


def log_interaction(engine: Engine, record: InteractionRecord | Mapping[str, Any]) -> bool:
    """Store one interaction; True when new, False when already stored. Raises `InvalidRecord`."""
    parsed = parse_record(record)
    with engine.begin() as connection:
        return _insert_records(connection, [parsed]) == 1


def log_interactions(
    engine: Engine,
    records: Iterable[InteractionRecord | Mapping[str, Any]],
    *,
    source: str = "api",
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> IngestReport:
    """Store many interactions in batches; invalid ones are quarantined, never raised."""
    return _ingest(engine, _validate_objects(records, source), batch_size)


def ingest_jsonl(
    engine: Engine,
    path: str | Path,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> IngestReport:
    """Import a JSONL file of interaction records; `progress` is told how many bytes were read."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as error:
        raise UserError(f"{path}: cannot read: {error.strerror or error}") from None
    with handle:
        lines = _numbered_lines(handle, progress)
        return _ingest(engine, _validate_lines(lines, f"ingest:{path.name}"), batch_size)


def quarantine(connection: Connection, rows: Sequence[BadRow]) -> int:
    """Keep bad rows with their reason; the same row from the same place is kept once."""
    if not rows:
        return 0
    statement = insert_ignoring_conflicts(connection, QuarantinedRow, "row_key")
    now = utc_now()
    connection.execute(statement, [_quarantine_params(row, now) for row in rows])
    return len(rows)


def log_feedback(
    engine: Engine,
    interaction_id: str,
    *,
    thumb: int | None = None,
    rating: int | None = None,
    comment: str | None = None,
) -> None:
    """Attach later feedback to an interaction logged with client id `interaction_id`."""
    try:
        feedback = Feedback.model_validate(
            {k: v for k, v in {"thumb": thumb, "rating": rating, "comment": comment}.items() if v is not None}
        )
    except ValidationError as error:
        raise InvalidRecord(f"feedback.{describe_validation_error(error)}") from None
    with engine.begin() as connection:
        row_id = connection.scalar(
            select(Interaction.id).where(Interaction.dedup_key == f"id:{interaction_id}")
        )
        if row_id is None:
            raise UserError(f"no interaction with id {interaction_id!r}")
        connection.execute(insert(FeedbackEvent), [_feedback_params(row_id, feedback, "api")])


@dataclass(frozen=True)
class LaterFeedback:
    """Feedback on an interaction logged before it (in an earlier batch or earlier in the same one).

    Stored once however often it is written (a replayed batch): an event with the same interaction,
    source and `given_at` is already there.
    """

    interaction_id: str  # the interaction's client id
    feedback: Feedback
    source: str = "api"
    given_at: datetime = field(default_factory=utc_now)  # when it was given: the event's `ts`


LogItem = InteractionRecord | LaterFeedback | BadRow


def log_in_order(engine: Engine, items: Sequence[LogItem]) -> IngestReport:
    """Write records, later feedback and bad rows in one transaction, in the order given.

    For a writer that must not lose anything (the gateway's): the batch is stored whole or not at all,
    records keep their order as log positions, a replayed batch stores no record or feedback twice, and
    feedback whose interaction is not stored is quarantined with the reason instead of failing the batch.
    """
    report = IngestReport()
    with engine.begin() as connection:
        for group in _runs_of_one_kind(items):
            records = [item for item in group if isinstance(item, InteractionRecord)]
            feedback = [item for item in group if isinstance(item, LaterFeedback)]
            bad = [item for item in group if isinstance(item, BadRow)]
            if records:
                inserted = _insert_records(connection, records)
                report.accepted += inserted
                report.duplicates += len(records) - inserted
            if feedback:
                bad += _insert_later_feedback(connection, feedback)
            report.quarantined += quarantine(connection, bad)
            report.reasons.update(_reason_kind(row.reason) for row in bad)
    return report


# -- internals ---------------------------------------------------------------------------------------


def _runs_of_one_kind(items: Sequence[LogItem]) -> Iterator[list[LogItem]]:
    """Consecutive items of the same type, in order."""
    group: list[LogItem] = []
    for item in items:
        if group and type(item) is not type(group[0]):
            yield group
            group = []
        group.append(item)
    if group:
        yield group


def _insert_later_feedback(connection: Connection, items: Sequence[LaterFeedback]) -> list[BadRow]:
    """Insert feedback on stored interactions, once each; the rest come back as bad rows to quarantine."""
    keys = {f"id:{item.interaction_id}" for item in items}
    statement = select(Interaction.dedup_key, Interaction.id).where(Interaction.dedup_key.in_(keys))
    row_ids: dict[str, int] = {key: row_id for key, row_id in connection.execute(statement)}
    events = select(FeedbackEvent.interaction_id, FeedbackEvent.source, FeedbackEvent.ts).where(
        FeedbackEvent.interaction_id.in_(set(row_ids.values()))
    )
    stored = {tuple(row) for row in connection.execute(events)}
    params: list[dict[str, Any]] = []
    unknown: list[LaterFeedback] = []
    for item in items:
        row_id = row_ids.get(f"id:{item.interaction_id}")
        if row_id is None:
            unknown.append(item)
        elif (row_id, item.source, item.given_at) not in stored:
            stored.add((row_id, item.source, item.given_at))
            params.append({**_feedback_params(row_id, item.feedback, item.source), "ts": item.given_at})
    if params:
        connection.execute(insert(FeedbackEvent), params)
    return [_unknown_feedback_row(item) for item in unknown]


def _unknown_feedback_row(item: LaterFeedback) -> BadRow:
    data = {
        "interaction_id": item.interaction_id,
        **item.feedback.model_dump(exclude_none=True),
        "given_at": item.given_at.isoformat(),
    }
    return BadRow(
        item.source, None, f"feedback for unknown interaction {item.interaction_id!r}", json.dumps(data)
    )


Validated = InteractionRecord | BadRow


def _ingest(engine: Engine, rows: Iterator[Validated], batch_size: int) -> IngestReport:
    report = IngestReport()
    good: list[InteractionRecord] = []
    bad: list[BadRow] = []
    for row in rows:
        (bad if isinstance(row, BadRow) else good).append(row)  # type: ignore[arg-type]
        if len(good) + len(bad) >= batch_size:
            _flush(engine, good, bad, report)
    _flush(engine, good, bad, report)
    return report


def _flush(engine: Engine, good: list[InteractionRecord], bad: list[BadRow], report: IngestReport) -> None:
    if not good and not bad:
        return
    with engine.begin() as connection:
        inserted = _insert_records(connection, good)
        quarantine(connection, bad)
    report.accepted += inserted
    report.duplicates += len(good) - inserted
    report.quarantined += len(bad)
    report.reasons.update(_reason_kind(row.reason) for row in bad)
    good.clear()
    bad.clear()


def _reason_kind(reason: str) -> str:
    """The reason as counted in reports: the full one-line reason, cut at 80 characters."""
    return reason if len(reason) <= 80 else reason[:77] + "..."


def _insert_records(connection: Connection, records: Sequence[InteractionRecord]) -> int:
    """Insert, skipping ones already stored (also within the batch); returns how many were new."""
    unique: dict[str, InteractionRecord] = {}
    for record in records:  # in order, the first of a key wins: log positions follow the input
        unique.setdefault(record.dedup_key(), record)
    if not unique:
        return 0
    now = utc_now()
    params = [_interaction_params(key, record, now) for key, record in unique.items()]
    if connection.dialect.driver == "psycopg":
        inserted = _copy_then_insert(connection, params)
    else:
        statement = insert_ignoring_conflicts(connection, Interaction, "dedup_key")
        inserted = connection.execute(
            statement.returning(Interaction.id, Interaction.dedup_key), params
        ).all()
    feedback = [
        _feedback_params(row_id, unique[key].feedback, "record")
        for row_id, key in inserted
        if unique[key].feedback is not None and not unique[key].feedback.is_empty()  # type: ignore[union-attr]
    ]
    if feedback:
        connection.execute(insert(FeedbackEvent), feedback)
    return len(inserted)


_STAGED = (
    "dedup_key text, client_id text, ts timestamptz, ingested_at timestamptz, track text, user_id text, "
    "session_id text, messages jsonb, response text, model text, metadata jsonb, consent boolean, "
    "content_sha256 text"
)
_STAGED_COLUMNS = ", ".join(column.split()[0] for column in _STAGED.split(", "))
_JSON_COLUMNS = frozenset({"messages", "metadata"})


def _copy_then_insert(connection: Connection, params: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """PostgreSQL: COPY the batch into a session temp table, then one INSERT ... ON CONFLICT DO NOTHING.

    An order of magnitude faster than a multi-row INSERT with RETURNING, whose statement text
    psycopg has to parse anew for every batch.
    """
    raw = connection.connection.driver_connection
    assert raw is not None
    names = _STAGED_COLUMNS.split(", ")
    with raw.cursor() as cursor:
        cursor.execute(f"CREATE TEMP TABLE IF NOT EXISTS overnight_ingest_stage (ord integer, {_STAGED})")
        cursor.execute("TRUNCATE overnight_ingest_stage")
        with cursor.copy(f"COPY overnight_ingest_stage (ord, {_STAGED_COLUMNS}) FROM STDIN") as copy:
            for order, row in enumerate(params):
                values = [orjson.dumps(row[n]).decode() if n in _JSON_COLUMNS else row[n] for n in names]
                copy.write_row([order, *values])
        cursor.execute(
            f"INSERT INTO interactions ({_STAGED_COLUMNS}) SELECT {_STAGED_COLUMNS} FROM overnight_ingest_stage "
            "ORDER BY ord ON CONFLICT (dedup_key) DO NOTHING RETURNING id, dedup_key"
        )
        return [(row[0], row[1]) for row in cursor.fetchall()]


def _interaction_params(key: str, record: InteractionRecord, now: Any) -> dict[str, Any]:
    return {
        "dedup_key": key,
        "client_id": record.id,
        "ts": record.ts,
        "ingested_at": now,
        "track": record.track,
        "user_id": record.user_id,
        "session_id": record.session_id,
        "messages": [{"role": m.role, "content": m.content} for m in record.messages],
        "response": record.response,
        "model": record.model,
        "metadata": record.metadata,
        "consent": record.consent,
        "content_sha256": record.content_sha256(),
    }


def _feedback_params(interaction_id: int, feedback: Any, source: str) -> dict[str, Any]:
    return {
        "interaction_id": interaction_id,
        "ts": utc_now(),
        "thumb": feedback.thumb,
        "rating": feedback.rating,
        "comment": feedback.comment,
        "source": source,
    }


def _quarantine_params(row: BadRow, now: Any) -> dict[str, Any]:
    key = hashlib.sha256(f"{row.source}\n{row.line_no}\n{row.raw}".encode()).hexdigest()
    return {
        "row_key": key,
        "source": row.source,
        "line_no": row.line_no,
        "track": row.track,
        "reason": row.reason,
        "raw": row.raw,
        "created_at": now,
    }


def _numbered_lines(handle: Any, progress: Progress | None) -> Iterator[tuple[int, bytes]]:
    for line_no, raw in enumerate(handle, start=1):
        if progress is not None:
            progress(len(raw))
        if raw.strip():
            yield line_no, raw


def _validate_lines(lines: Iterable[tuple[int, bytes]], source: str) -> Iterator[Validated]:
    for line_no, raw in lines:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield BadRow(source, line_no, "invalid UTF-8", raw.decode("utf-8", errors="replace"))
            continue
        try:
            yield parse_record_line(text)
        except InvalidRecord as error:
            yield BadRow(source, line_no, str(error), text.rstrip("\r\n"), _track_hint(text))


def _validate_objects(records: Iterable[Any], source: str) -> Iterator[Validated]:
    for index, data in enumerate(records, start=1):
        try:
            yield parse_record(data)
        except InvalidRecord as error:
            raw = (
                json.dumps(data, default=str, ensure_ascii=False) if isinstance(data, Mapping) else repr(data)
            )
            track = data.get("track") if isinstance(data, Mapping) else None
            yield BadRow(source, index, str(error), raw, track if isinstance(track, str) else None)


def _track_hint(text: str) -> str | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    track = data.get("track") if isinstance(data, dict) else None
    return track if isinstance(track, str) else None
