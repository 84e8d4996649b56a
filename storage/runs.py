"""The nightly run ledger: which track-nights ran, and which of their stages finished, in SQL.

A night can die anywhere (process killed, machine restarted). The stages record here, not only in
the orchestrator's own database, when they start and finish and what they produced, so a re-run of
the same night resumes after the last finished stage instead of repeating its side effects (a second
harvest, a second registered version, a second deployment).

One runner per track-night: a scheduled run and a manual `overnight run` may start the same night at
once. The runner that opens a night takes its lease (`take_lease`, one conditional UPDATE, so exactly
one of two racing runners gets it) and renews it while it works; the other is told who holds it and
since when. A runner killed mid-night stops renewing, its lease runs out after `ttl`, and the next
runner resumes the night after its last finished stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.models import NightlyRun, RunStage, utc_now

__all__ = [
    "FINAL_STATUSES",
    "finish_run",
    "finish_stage",
    "finished_stage",
    "last_error",
    "last_runs",
    "open_run",
    "release_lease",
    "renew_lease",
    "set_run_fields",
    "stage_rows",
    "start_stage",
    "take_lease",
]

FINAL_STATUSES = (
    "promoted",
    "registered",
    "rejected",
    "skipped",
)  # a night in one of these is done; failed is retried


def open_run(engine: Engine, track: str, night: str, *, force: bool = False) -> tuple[int, NightlyRun | None]:
    """The run to continue for (track, night) (see `_open_run`); a runner racing to create it retries once."""
    try:
        return _open_run(engine, track, night, force=force)
    except IntegrityError:  # another runner created the same attempt first: continue that one
        return _open_run(engine, track, night, force=False)


def _open_run(engine: Engine, track: str, night: str, *, force: bool) -> tuple[int, NightlyRun | None]:
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


def earlier_stage_details(
    engine: Engine, track: str, stage: str, *, before_night: str, nights: int
) -> list[dict[str, Any]]:
    """What `stage` recorded in the track's `nights` latest nights before `before_night` (newest
    first): per night, the latest attempt that finished that stage."""
    if nights <= 0:
        return []
    with Session(engine) as session:
        rows = session.execute(
            select(NightlyRun.night, RunStage.detail)
            .join(RunStage, RunStage.run_id == NightlyRun.id)
            .where(
                NightlyRun.track == track,
                NightlyRun.night < before_night,
                RunStage.stage == stage,
                RunStage.status == "done",
            )
            .order_by(NightlyRun.night.desc(), NightlyRun.attempt.desc())
        ).all()
    latest: dict[str, dict[str, Any]] = {}
    for night, detail in rows:
        if night not in latest and len(latest) < nights:
            latest[night] = dict(detail)
    return list(latest.values())


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


@dataclass(frozen=True)
class Lease:
    """Who holds a run: `held` is True for the caller; otherwise `runner` and `since` say who and when."""

    held: bool
    runner: str | None
    since: datetime | None
    until: datetime | None


def take_lease(engine: Engine, run_id: int, runner: str, ttl: timedelta) -> Lease:
    """Take the run's lease for `runner` unless another runner holds an unexpired one.

    One conditional UPDATE: free, expired or already ours. On success the run is marked `running`.
    """
    now = utc_now()
    with engine.begin() as connection:
        taken = connection.execute(
            update(NightlyRun)
            .where(
                NightlyRun.id == run_id,
                or_(NightlyRun.runner.is_(None), NightlyRun.lease_until < now, NightlyRun.runner == runner),
            )
            .values(runner=runner, runner_since=now, lease_until=now + ttl, status="running")
        ).rowcount
    run = get_run(engine, run_id)
    return Lease(held=taken == 1, runner=run.runner, since=run.runner_since, until=run.lease_until)


def renew_lease(engine: Engine, run_id: int, runner: str, ttl: timedelta) -> bool:
    """Extend `runner`'s lease; False when it no longer holds it (it expired and was taken)."""
    with engine.begin() as connection:
        renewed = connection.execute(
            update(NightlyRun)
            .where(NightlyRun.id == run_id, NightlyRun.runner == runner)
            .values(lease_until=utc_now() + ttl)
        ).rowcount
    return renewed == 1


def release_lease(engine: Engine, run_id: int, runner: str) -> None:
    """Give the lease up (the runner is done with the night, or stopped)."""
    with engine.begin() as connection:
        connection.execute(
            update(NightlyRun)
            .where(NightlyRun.id == run_id, NightlyRun.runner == runner)
            .values(runner=None, runner_since=None, lease_until=None)
        )


def last_error(engine: Engine, run_id: int) -> str | None:
    """The error the run's most recently failed stage recorded, if any."""
    with Session(engine) as session:
        row = session.scalars(
            select(RunStage)
            .where(RunStage.run_id == run_id, RunStage.status == "failed")
            .order_by(RunStage.finished_at.desc())
            .limit(1)
        ).first()
        return str(row.detail.get("error")) if row is not None and row.detail.get("error") else None
