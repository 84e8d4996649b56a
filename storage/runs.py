"""The nightly run ledger: which track-nights ran, and which of their stages finished, in SQL.

A night can die anywhere (process killed, machine restarted). The stages record here, not only in
the orchestrator's own database, when they start and finish and what they produced, so a re-run of
the same night resumes after the last finished stage instead of repeating its side effects (a second
harvest, a second registered version, a second deployment).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from storage.models import NightlyRun, RunStage, utc_now

__all__ = [
    "FINAL_STATUSES",
    "finish_run",
    "finish_stage",
    "finished_stage",
    "last_runs",
    "open_run",
    "set_run_fields",
    "stage_rows",
    "start_stage",
]

FINAL_STATUSES = ("promoted", "rejected", "skipped")  # a night in one of these is done; failed is retried


def open_run(engine: Engine, track: str, night: str, *, force: bool = False) -> tuple[int, NightlyRun | None]:
    """The run to continue for (track, night), or a new attempt; also the finished run when there is one.

    Returns `(run_id, finished)`: `finished` is the latest attempt when it already ended in a final
    status (the caller reports it instead of running again, unless `force` asked for a new attempt).
    An unfinished latest attempt (running when it died, or failed) is continued with its stages.
    """
    with Session(engine, expire_on_commit=False) as session, session.begin():
        latest = session.scalars(
            select(NightlyRun)
            .where(NightlyRun.track == track, NightlyRun.night == night)
            .order_by(NightlyRun.attempt.desc())
            .limit(1)
        ).first()
        if latest is not None and latest.status in FINAL_STATUSES and not force:
            return latest.id, latest
        if latest is not None and latest.status not in FINAL_STATUSES:
            latest.status = "running"
            return latest.id, None
        attempt = (latest.attempt + 1) if latest is not None else 1
        run = NightlyRun(track=track, night=night, attempt=attempt, status="running", summary={})
        session.add(run)
        session.flush()
        return run.id, None


def set_run_fields(engine: Engine, run_id: int, **fields: Any) -> None:
    """Record e.g. `snapshot_id`, `mlflow_run_id`, `candidate_version` on the run as soon as they exist."""
    with Session(engine) as session, session.begin():
        run = session.get(NightlyRun, run_id)
        assert run is not None, f"run {run_id} vanished"
        for key, value in fields.items():
            setattr(run, key, value)


def get_run(engine: Engine, run_id: int) -> NightlyRun:
    with Session(engine, expire_on_commit=False) as session:
        run = session.get(NightlyRun, run_id)
        assert run is not None, f"run {run_id} vanished"
        return run


def finish_run(engine: Engine, run_id: int, status: str, summary: dict[str, Any]) -> None:
    with Session(engine) as session, session.begin():
        run = session.get(NightlyRun, run_id)
        assert run is not None, f"run {run_id} vanished"
        run.status = status
        run.summary = summary
        run.finished_at = utc_now()


def finished_stage(engine: Engine, run_id: int, stage: str) -> dict[str, Any] | None:
    """The detail a stage recorded when it finished, None when it has not finished."""
    with Session(engine) as session:
        row = session.scalars(
            select(RunStage).where(
                RunStage.run_id == run_id, RunStage.stage == stage, RunStage.status == "done"
            )
        ).first()
        return dict(row.detail) if row is not None else None


def start_stage(engine: Engine, run_id: int, stage: str) -> None:
    with Session(engine) as session, session.begin():
        row = session.scalars(
            select(RunStage).where(RunStage.run_id == run_id, RunStage.stage == stage)
        ).first()
        if row is None:
            session.add(RunStage(run_id=run_id, stage=stage, status="running", detail={}))
        else:
            row.status, row.started_at, row.finished_at = "running", utc_now(), None


def finish_stage(
    engine: Engine, run_id: int, stage: str, detail: dict[str, Any], *, status: str = "done"
) -> None:
    with Session(engine) as session, session.begin():
        row = session.scalars(
            select(RunStage).where(RunStage.run_id == run_id, RunStage.stage == stage)
        ).one()
        row.status, row.detail, row.finished_at = status, detail, utc_now()


def stage_rows(engine: Engine, run_id: int) -> list[tuple[str, str, datetime, datetime | None]]:
    """(stage, status, started_at, finished_at) of a run's stages in the order they started."""
    with Session(engine) as session:
        rows = session.scalars(select(RunStage).where(RunStage.run_id == run_id).order_by(RunStage.id)).all()
        return [(row.stage, row.status, row.started_at, row.finished_at) for row in rows]


def last_runs(engine: Engine) -> dict[str, NightlyRun]:
    """Each track's latest run (by id)."""
    with Session(engine, expire_on_commit=False) as session:
        latest = select(func.max(NightlyRun.id)).group_by(NightlyRun.track)
        runs = session.scalars(select(NightlyRun).where(NightlyRun.id.in_(latest))).all()
        return {run.track: run for run in runs}
