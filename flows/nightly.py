"""The nightly flow: for each track, harvest → judge → select → train → gate → register → deploy → commit.

The flow body is a table of contents: every stage is a Prefect task named by its verb, around the
plain stage function in `pipeline.night` (which keeps the stage state in SQL, so a re-run of a night
that died resumes after its last finished stage). External calls (judge, MLflow, vLLM) retry;
training never does (a half-spent budget is not retried blindly) and takes the machine's training
slot (`training_slot`), so two trainings never share one accelerator. Tracks run
concurrently on the task runner's threads: each track's stages are chained, tracks are independent.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, wait

import storage
from pipeline import night as stages
from pipeline.config import OvernightConfig, load_config
from pipeline.deploy.release import night_services
from pipeline.night import Night, NightServices, night_of
from storage import runs as ledger

logger = logging.getLogger(__name__)

EXTERNAL = {"retries": 2, "retry_delay_seconds": [5, 30]}  # judge, MLflow, vLLM


def _stage(name: str, body: Callable[[Night], dict[str, Any]]) -> Callable[[Night], dict[str, Any]]:
    def run(night: Night) -> dict[str, Any]:
        try:
            return night.stage(name, body)
        except BaseException as error:
            night.fail(error)
            raise

    run.__name__ = name
    return run


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


def _train(night: Night) -> dict[str, Any]:
    with training_slot(night.config.home):
        return _stage("train", stages.train)(night)


def _task(name: str, body: Callable[[Night], dict[str, Any]], *, external: bool = False) -> Any:
    options: dict[str, Any] = {"name": name, "cache_policy": NO_CACHE}
    if external:
        options |= EXTERNAL
    return task(**options)(body)


TASKS = {
    "harvest": _task("harvest", _stage("harvest", stages.harvest)),
    "judge": _task("judge", _stage("judge", stages.judge), external=True),
    "select": _task("select", _stage("select", stages.select)),
    "train": _task("train", _train),
    "gate": _task("gate", _stage("gate", stages.gate), external=True),
    "register": _task("register", _stage("register", stages.register), external=True),
    "deploy": _task("deploy", _stage("deploy", stages.deploy), external=True),
    "commit": _task("commit", _stage("commit", stages.commit)),
}


@flow(name="overnight-nightly", log_prints=True)
def nightly(
    config_path: str | None = None,
    tracks: list[str] | None = None,
    night: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run tonight for every track (or `tracks`); returns `{tracks: [...]}` as `overnight run --json` prints it."""
    config = load_config(config_path)
    return run_nights(config, tracks=tracks, night=night, force=force)


def run_nights(
    config: OvernightConfig,
    *,
    tracks: Sequence[str] | None = None,
    night: str | None = None,
    force: bool = False,
    services: NightServices | None = None,
) -> dict[str, Any]:
    """The flow's body, callable inside any flow (the demo's included)."""
    engine = storage.connect(config.database.url)
    label = night or night_of(datetime.now(UTC), config.schedule.timezone)
    names = list(tracks) if tracks else [track.name for track in config.tracks]
    for name in names:
        config.track(name)  # an unknown track is a one-line error before anything runs
    services = services or night_services(config, engine)
    nights = [Night(config, engine, name, label, services, force=force) for name in names]
    chains: dict[str, PrefectFuture[Any]] = {}
    for track_night in nights:
        if track_night.finished is None:
            chains[track_night.track] = _chain(track_night)
    wait(list(chains.values()))
    results = [_result(track_night, chains.get(track_night.track)) for track_night in nights]
    engine.dispose()
    return {"night": label, "tracks": results}


def _chain(track_night: Night) -> PrefectFuture[Any]:
    future: PrefectFuture[Any] | None = None
    for name in stages.STAGES:
        future = TASKS[name].submit(track_night, wait_for=[future] if future is not None else [])
    assert future is not None
    return future


def _result(track_night: Night, future: PrefectFuture[Any] | None) -> dict[str, Any]:
    if future is None:  # finished on an earlier run: report what it recorded
        return {**(track_night.finished or {}), "resumed": False, "already_done": True}
    state = future.state
    if state.is_completed():
        return stages.summarize(track_night, stages.night_status(track_night.details))
    run = ledger.get_run(track_night.engine, track_night.run_id)
    error = (run.summary or {}).get("error") or state.message or "failed"
    return {"track": track_night.track, "night": track_night.night, "status": "failed", "error": error}
