"""SQLAlchemy 2.0 typed models: the store's tables, identical on SQLite and PostgreSQL.

Timestamps are stored in UTC. JSON columns are JSONB on PostgreSQL and JSON text on SQLite. Every
table that a pipeline stage writes to has a natural unique key, so a stage re-run after a crash
writes nothing twice (idempotent writes are the basis of crash-safe nightly runs).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# BIGINT primary keys on PostgreSQL, INTEGER (the rowid alias, so autoincrement works) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")
JsonDoc = JSON().with_variant(JSONB(), "postgresql")


class UtcDateTime(TypeDecorator[datetime]):
    """Aware datetimes in, aware UTC datetimes out, on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Interaction(Base):
    """One logged interaction; `id` is the log position that harvest watermarks refer to."""

    __tablename__ = "interactions"
    __table_args__ = (Index("ix_interactions_track_id", "track", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    dedup_key: Mapped[str] = mapped_column(String(220), unique=True)
    client_id: Mapped[str | None] = mapped_column(String(200))
    ts: Mapped[datetime] = mapped_column(UtcDateTime())
    ingested_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)
    track: Mapped[str] = mapped_column(String(100))
    user_id: Mapped[str] = mapped_column(String(200))
    session_id: Mapped[str | None] = mapped_column(String(200))
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JsonDoc)
    response: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(200))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JsonDoc, default=dict)
    consent: Mapped[bool] = mapped_column(Boolean, default=True)
    content_sha256: Mapped[str] = mapped_column(String(64))


class FeedbackEvent(Base):
    """User feedback on an interaction; several may arrive over time, the latest one counts."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    interaction_id: Mapped[int] = mapped_column(ForeignKey("interactions.id", ondelete="CASCADE"), index=True)
    ts: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)
    thumb: Mapped[int | None] = mapped_column(Integer)
    rating: Mapped[int | None] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(100), default="record")


class Judgment(Base):
    """A cached judge verdict, keyed by (judge model, rubric id+version, prompt, response) hash."""

    __tablename__ = "judgments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    cache_key: Mapped[str] = mapped_column(String(64), unique=True)
    judge_model: Mapped[str] = mapped_column(String(200))
    rubric_id: Mapped[str] = mapped_column(String(100))
    rubric_version: Mapped[str] = mapped_column(String(50))
    prompt_sha256: Mapped[str] = mapped_column(String(64))
    response_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20))  # ok | failed
    score: Mapped[float | None] = mapped_column(Float)  # normalised to [0, 1]; None when failed
    raw_score: Mapped[float | None] = mapped_column(Float)
    rationale: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)


class Snapshot(Base):
    """The manifest of one harvest: window, counts by reason, sha256 of the redacted content."""

    __tablename__ = "snapshots"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    track: Mapped[str] = mapped_column(String(100), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)
    source: Mapped[str] = mapped_column(String(20))  # store | external
    after_id: Mapped[int | None] = mapped_column(BigInteger)  # window start (exclusive), store source
    until_id: Mapped[int | None] = mapped_column(BigInteger)  # window end (inclusive), store source
    since_ts: Mapped[datetime | None] = mapped_column(UtcDateTime())  # window start, external source
    until_ts: Mapped[datetime | None] = mapped_column(UtcDateTime())  # window end
    rows_read: Mapped[int] = mapped_column(Integer)
    rows_kept: Mapped[int] = mapped_column(Integer)
    dropped: Mapped[dict[str, int]] = mapped_column(JsonDoc)
    redactions: Mapped[dict[str, int]] = mapped_column(JsonDoc)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    committed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Watermark(Base):
    """How far a track's harvest has committed: a log position (store) or a timestamp (external)."""

    __tablename__ = "watermarks"

    track: Mapped[str] = mapped_column(String(100), primary_key=True)
    last_id: Mapped[int | None] = mapped_column(BigInteger)
    last_ts: Mapped[datetime | None] = mapped_column(UtcDateTime())
    snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("snapshots.id"))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)


class NightlyRun(Base):
    """One track's run for one night; its stages record their own state for crash-safe resume."""

    __tablename__ = "runs"
    __table_args__ = (UniqueConstraint("track", "night", "attempt"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    track: Mapped[str] = mapped_column(String(100))
    night: Mapped[str] = mapped_column(String(10))  # YYYY-MM-DD
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(20))  # running | promoted | rejected | skipped | failed
    started_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("snapshots.id"))
    candidate_version: Mapped[str | None] = mapped_column(String(50))
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    summary: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)
    runner: Mapped[str | None] = mapped_column(String(200))  # host:pid of the process holding the lease
    runner_since: Mapped[datetime | None] = mapped_column(UtcDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime())  # renewed while the runner lives


class RunStage(Base):
    """State of one stage of a nightly run (harvest, judge, select, train, gate, register, deploy)."""

    __tablename__ = "run_stages"
    __table_args__ = (UniqueConstraint("run_id", "stage"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(30))
    status: Mapped[str] = mapped_column(String(20))  # running | done | failed | skipped
    started_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    detail: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)


class Deployment(Base):
    """One deploy or rollback of a track's version onto one serving endpoint (load, probe, route flip)."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    track: Mapped[str] = mapped_column(String(100), index=True)
    version: Mapped[str] = mapped_column(String(50))
    adapter_name: Mapped[str] = mapped_column(String(200))
    endpoint: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(String(20))  # deploy | rollback
    status: Mapped[str] = mapped_column(String(20))  # ok | failed
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)
    detail: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)


class Route(Base):
    """What a track's stable name serves now: the gateway resolves `<track>` to `adapter_name`.

    One row per track, changed only by a flip (deploy or rollback) in one statement, so every gateway
    process reading the table sees either the old route or the new one, never a mix.
    """

    __tablename__ = "routes"

    track: Mapped[str] = mapped_column(String(100), primary_key=True)
    version: Mapped[str] = mapped_column(String(50))  # the registry version, e.g. "3"
    adapter_name: Mapped[str] = mapped_column(String(200))  # the pinned vLLM name, `<track>@v<N>`
    previous_version: Mapped[str | None] = mapped_column(String(50))  # what a rollback flips back to
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)


class ApiKey(Base):
    """A gateway API key: only its sha256 is stored; the clear key is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)  # who holds it; logged with its traffic
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    tracks: Mapped[list[str]] = mapped_column(JsonDoc)  # tracks it may call; ["*"]: all
    consent_default: Mapped[bool] = mapped_column(Boolean, default=True)  # without X-Overnight-Consent
    # False: traffic without consent is not stored at all (True: stored with consent false)
    store_traffic: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    def allows(self, track: str) -> bool:
        return "*" in self.tracks or track in self.tracks


class QuarantinedRow(Base):
    """A row that could not be used, kept whole with where it came from and why."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    row_key: Mapped[str] = mapped_column(String(64), unique=True)  # sha256(source, line, raw)
    source: Mapped[str] = mapped_column(Text)  # e.g. "ingest:traffic.jsonl" or "harvest:support"
    line_no: Mapped[int | None] = mapped_column(Integer)
    track: Mapped[str | None] = mapped_column(String(100))
    reason: Mapped[str] = mapped_column(Text)
    raw: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utc_now)
