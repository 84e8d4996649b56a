"""The nightly flow: for each track, harvest → judge → select → train → gate → register → deploy → commit.

The flow body is a table of contents (`track_night`): every stage is a Prefect task named by its
verb, handed the typed results it needs, around the plain stage function in `pipeline.night` (which
keeps the stage results in SQL, so a re-run of a night that died resumes after its last finished
stage). External calls (judge, MLflow, vLLM) retry;
training never does (a half-spent budget is not retried blindly) and takes the machine's training
slot (`training_slot`), so two trainings never share one accelerator. Tracks run
concurrently on the task runner's threads: each track's stages are chained, tracks are independent.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, wait
from sqlalchemy import Engine

import storage
from pipeline import night as stages
from pipeline.config import OvernightConfig, load_config
from pipeline.night import Night, night_of
from pipeline.results import (
    Committed,
    Deployed,
    GateDecision,
    Harvested,
    Judged,
    Registered,
    Selected,
    StageResult,
    Trained,
)
from pipeline.services import NightServices, night_services
from pipeline.train.distill import check_teachers
from storage import runs as ledger

logger = logging.getLogger(__name__)

EXTERNAL = {"retries": 2, "retry_delay_seconds": [5, 30]}  # judge, MLflow, vLLM

R = TypeVar("R", bound=StageResult)
T = TypeVar("T")


@contextmanager
def training_slot(home: str) -> Iterator[None]:
    """The machine's one training slot: an exclusive lock on `<home>/locks/training.lock`.

    Two trainings on one machine would share its accelerator, so they queue here, across tracks,
    flows and processes. The kernel releases the lock when its process dies, so a night killed in
    the middle of training never leaves the slot taken (Prefect's global concurrency slots are
    leased by the API server; with a temporary server that dies with the flow, the kill test showed
    the slot stay occupied forever).
    """
    path = Path(home) / "locks" / "training.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("waiting for the training slot (%s): another training is running", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


EXTERNAL_TASK: dict[str, Any] = {"cache_policy": NO_CACHE, **EXTERNAL}
LOCAL_TASK: dict[str, Any] = {"cache_policy": NO_CACHE}


def _run(night: Night, name: str, body: Callable[..., R], *inputs: StageResult) -> R:
    """One stage through the night's ledger. A failure is recorded on the stage and re-raised; Prefect
    may retry it (the lease is kept meanwhile); the night is marked failed only when its chain ends so."""
    return night.stage(name, body, *inputs)


@task(name="harvest", **LOCAL_TASK)
def harvest(night: Night) -> Harvested:
    return _run(night, "harvest", stages.harvest)


@task(name="judge", **EXTERNAL_TASK)
def judge(night: Night, harvested: Harvested) -> Judged:
    return _run(night, "judge", stages.judge, harvested)


@task(name="select", **LOCAL_TASK)
def select(night: Night, judged: Judged) -> Selected:
    return _run(night, "select", stages.select, judged)


@task(name="train", **LOCAL_TASK)  # never retried: a half-spent budget is not repeated blindly
def train(night: Night, selected: Selected) -> Trained:
    with training_slot(night.config.home):
        return _run(night, "train", stages.train, selected)


@task(name="gate", **EXTERNAL_TASK)
def gate(night: Night, trained: Trained, selected: Selected) -> GateDecision:
    return _run(night, "gate", stages.gate, trained, selected)


@task(name="register", **EXTERNAL_TASK)
def register(
    night: Night, harvested: Harvested, judged: Judged, trained: Trained, decision: GateDecision
) -> Registered:
    return _run(night, "register", stages.register, harvested, judged, trained, decision)


@task(name="deploy", **EXTERNAL_TASK)
def deploy(night: Night, registered: Registered) -> Deployed:
    return _run(night, "deploy", stages.deploy, registered)


@task(name="commit", **LOCAL_TASK)
def commit(night: Night, *results: StageResult) -> Committed:
    return _run(night, "commit", stages.commit, *results)


def track_night(night: Night) -> PrefectFuture[Committed]:
    """One track's night as a chain of tasks, each handed the typed results it needs."""
    harvested = result_of(harvest.submit(night))
    judged = result_of(judge.submit(night, harvested))
    selected = result_of(select.submit(night, judged))
    trained = result_of(train.submit(night, selected))
    decision = result_of(gate.submit(night, trained, selected))
    registered = result_of(register.submit(night, harvested, judged, trained, decision))
    deployed = result_of(deploy.submit(night, registered))
    return commit.submit(night, harvested, judged, selected, trained, decision, registered, deployed)


def result_of(future: PrefectFuture[T]) -> T:
    """A future handed on as the next task's argument: Prefect waits for it and passes its result."""
    return cast(T, future)


@flow(name="overnight-nightly", log_prints=True)
def nightly(
    config_path: str | None = None,
    tracks: list[str] | None = None,
    night: str | None = None,
    force: bool = False,
    wait_if_running: bool = False,
) -> dict[str, Any]:
    """Run tonight for every track (or `tracks`); returns `{tracks: [...]}` as `overnight run --json` prints it."""
    config = load_config(config_path)
    return run_nights(config, tracks=tracks, night=night, force=force, wait_if_running=wait_if_running)


def run_nights(
    config: OvernightConfig,
    *,
    tracks: Sequence[str] | None = None,
    night: str | None = None,
    force: bool = False,
    wait_if_running: bool = False,
    services: NightServices | None = None,
) -> dict[str, Any]:
    """The flow's body, callable inside any flow (the demo's included).

    A track whose night another runner holds is reported as `running` (who, since when) and not
    touched, or, with `wait_if_running`, waited for and then continued or reported as it ended.
    """
    engine = storage.connect(config.database.url)
    label = night or night_of(datetime.now(UTC), config.schedule.timezone)
    names = list(dict.fromkeys(tracks)) if tracks else [track.name for track in config.tracks]
    for name in names:
        config.track(name)  # an unknown track is a one-line error before anything runs
    check_teachers(config, names)  # so is a teacher that cannot teach the track's base model
    services = services or night_services(config, engine)
    nights = [_open_night(config, engine, name, label, services, force, wait_if_running) for name in names]
    chains = {n.track: track_night(n) for n in nights if n.finished is None and n.busy is None}
    wait(list(chains.values()))
    results = [_result(n, chains.get(n.track)) for n in nights]
    for opened in nights:
        if opened.busy is None:
            opened.release()
    engine.dispose()
    return {"night": label, "tracks": results}


def _open_night(
    config: OvernightConfig,
    engine: Engine,
    track: str,
    label: str,
    services: NightServices,
    force: bool,
    wait_if_running: bool,
) -> Night:
    """The track's night with its lease taken; while another runner holds it, wait or report it busy."""
    opened = Night(config, engine, track, label, services, force=force)
    while opened.busy is not None and wait_if_running:
        logger.warning("%s %s is running in %s since %s: waiting", track, label, opened.busy.runner,
                       opened.busy.since)  # fmt: skip
        time.sleep(config.schedule.lease_seconds / 3)
        opened = Night(config, engine, track, label, services, force=force)
    return opened


def _result(night: Night, future: PrefectFuture[Committed] | None) -> dict[str, Any]:
    if night.busy is not None:
        since = night.busy.since.isoformat() if night.busy.since else None
        return {
            "track": night.track,
            "night": night.night,
            "status": "running",
            "runner": night.busy.runner,
            "since": since,
            "error": f"already running in {night.busy.runner} since {since}; not started again",
        }
    if future is None:  # finished on an earlier run: report what it recorded
        return {**(night.finished or {}), "resumed": False, "already_done": True}
    if future.state.is_completed():
        return dict(ledger.get_run(night.engine, night.run_id).summary)
    error = ledger.last_error(night.engine, night.run_id) or future.state.message or "failed"
    night.fail(error)  # every retry is spent: the night failed, a later run resumes it
    return {"track": night.track, "night": night.night, "status": "failed", "error": error}
