"""Harvest queries: stream a track's interactions past its watermark, and manage snapshots.

Reads are streamed (server-side cursor on PostgreSQL, `yield_per` batches everywhere) so a night with
millions of interactions never holds the table in memory. The watermark is a position in the log
(the interaction's sequence id), not a timestamp: a late-arriving row with an old `ts` is still
harvested exactly once. External sources have no such sequence and use a time window instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, RowMapping, func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from storage.engine import make_engine, safe_url
from storage.errors import UserError
from storage.models import FeedbackEvent, Interaction, Snapshot, Watermark, utc_now

STORED_COLUMNS = (
    "id",
    "client_id",
    "ts",
    "track",
    "user_id",
    "session_id",
    "messages",
    "response",
    "model",
    "metadata",
    "consent",
    "thumb",
    "rating",
    "comment",
)


@dataclass(frozen=True)
class WatermarkState:
    track: str
    last_id: int | None
    last_ts: datetime | None
    snapshot_id: int | None


def last_interaction_id(engine: Engine, track: str) -> int | None:
    """The newest log position of a track: the fixed end of tonight's window."""
    with engine.connect() as connection:
        return connection.scalar(select(func.max(Interaction.id)).where(Interaction.track == track))


def stream_interactions(
    engine: Engine, track: str, after_id: int, until_id: int, batch_size: int
) -> Iterator[tuple[Any, ...]]:
    """Rows of `track` with after_id < id <= until_id in log order, with their latest feedback.

    Each row is a tuple in `STORED_COLUMNS` order.
    """
    interactions = Interaction.__table__
    feedback = FeedbackEvent.__table__
    latest = (
        select(feedback.c.interaction_id, func.max(feedback.c.id).label("feedback_id"))
        .where(feedback.c.interaction_id > after_id, feedback.c.interaction_id <= until_id)
        .group_by(feedback.c.interaction_id)
        .subquery()
    )
    columns = [interactions.c[name] for name in STORED_COLUMNS[:11]]
    query = (
        select(*columns, feedback.c.thumb, feedback.c.rating, feedback.c.comment)
        .outerjoin(latest, latest.c.interaction_id == interactions.c.id)
        .outerjoin(feedback, feedback.c.id == latest.c.feedback_id)
        .where(interactions.c.track == track, interactions.c.id > after_id, interactions.c.id <= until_id)
        .order_by(interactions.c.id)
    )
    with engine.connect().execution_options(stream_results=True, yield_per=batch_size) as connection:
        for partition in connection.execute(query).partitions():
            yield from (tuple(row) for row in partition)


def stream_external(
    url: str, query: str, since: datetime | None, until: datetime, batch_size: int
) -> Iterator[RowMapping]:
    """Rows of a user-supplied SQL query on another database, bound to `:since` and `:until`."""
    engine = make_engine(url)
    try:
        with engine.connect().execution_options(stream_results=True, yield_per=batch_size) as connection:
            params = {"since": since or datetime(1970, 1, 1, tzinfo=until.tzinfo), "until": until}
            try:
                result = connection.execute(text(query), params)
            except SQLAlchemyError as error:
                reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
                raise UserError(f"harvest source query failed on {safe_url(url)}: {reason}") from None
            for partition in result.mappings().partitions():
                yield from partition
    finally:
        engine.dispose()


def get_watermark(engine: Engine, track: str) -> WatermarkState:
    with Session(engine) as session:
        row = session.get(Watermark, track)
        if row is None:
            return WatermarkState(track, None, None, None)
        return WatermarkState(track, row.last_id, row.last_ts, row.snapshot_id)


def save_snapshot(engine: Engine, fields: Mapping[str, Any]) -> int:
    """Store a snapshot manifest (uncommitted); returns its id."""
    with Session(engine) as session, session.begin():
        snapshot = Snapshot(**fields)
        session.add(snapshot)
        session.flush()
        return snapshot.id


def get_snapshot(engine: Engine, snapshot_id: int) -> Snapshot:
    with Session(engine, expire_on_commit=False) as session:
        snapshot = session.get(Snapshot, snapshot_id)
        if snapshot is None:
            raise UserError(f"no snapshot with id {snapshot_id}")
        return snapshot


def commit_snapshot(engine: Engine, snapshot_id: int) -> WatermarkState:
    """Move the track's watermark to the end of the snapshot's window; idempotent, never backwards."""
    with Session(engine) as session, session.begin():
        snapshot = session.get(Snapshot, snapshot_id)
        if snapshot is None:
            raise UserError(f"no snapshot with id {snapshot_id}")
        mark = session.get(Watermark, snapshot.track, with_for_update=True)
        if mark is None:
            mark = Watermark(track=snapshot.track)
            session.add(mark)
        mark.last_id = _max_or_none(mark.last_id, snapshot.until_id)
        mark.last_ts = _max_or_none(mark.last_ts, snapshot.until_ts)
        mark.snapshot_id = snapshot_id
        mark.updated_at = utc_now()
        if snapshot.committed_at is None:
            snapshot.committed_at = utc_now()
        return WatermarkState(snapshot.track, mark.last_id, mark.last_ts, snapshot_id)


def _max_or_none(current: Any, new: Any) -> Any:
    if current is None:
        return new
    if new is None:
        return current
    return max(current, new)
