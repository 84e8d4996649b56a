"""The night's MLflow run, fed by one hook: every stage result goes through `NightLog.log`.

Why one hook: stages return typed results and know nothing of MLflow; what each result puts in the
night's run (window and config for `Harvested`, judge figures and the rubric for `Judged`, step
metrics and the adapter for `Trained`, the gate report for `GateDecision`, the status for
`Committed`) is decided here, in one place. The run is created on first use and its id is kept in the
run ledger, so a night resumed after a crash logs into the same MLflow run.

`NightLog` is the protocol the night uses; `MlflowNightLog` the real one; tests hand in a recorder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel

from pipeline.register.mlflow_run import NightRun
from pipeline.results import Committed, GateDecision, Harvested, Judged, StageResult, Trained
from storage.errors import UserError

__all__ = ["MlflowNightLog", "NightLog", "NightLogContext"]

logger = logging.getLogger(__name__)


class NightLog(Protocol):
    """Where a night's stage results are recorded for people to review."""

    @property
    def run_id(self) -> str | None: ...

    def log(self, result: StageResult) -> None: ...

    def fail(self, reason: str) -> None: ...


@dataclass(frozen=True)
class NightLogContext:
    """What the log needs besides the results: the night's identity and how to reach its run."""

    tracking_uri: str
    experiment: str  # <prefix><track>
    run_name: str  # <track>-<night>-a<attempt>
    artifact_location: str | None
    tags: dict[str, str]
    config_params: BaseModel  # the whole config, tracks excluded (secrets are dropped by NightRun)
    track_params: BaseModel  # this track's section
    rubric_text: Callable[[], str]  # the rubric as the judge saw it
    resume_id: str | None  # the MLflow run id recorded by an earlier attempt of this run
    on_start: Callable[[str], None]  # records a new run's id (in the ledger)


class MlflowNightLog:
    """One MLflow run per track-night; `log` dispatches on the result's type."""

    def __init__(self, context: NightLogContext) -> None:
        self.context = context
        self._run: NightRun | None = None

    @property
    def run_id(self) -> str | None:
        return self._run.run_id if self._run is not None else self.context.resume_id

    def log(self, result: StageResult) -> None:
        run = self._open()
        if isinstance(result, Harvested):  # a reused snapshot logs the same params again: they must match
            run.log_window(result.model_dump(mode="json", exclude={"reused"}))
            run.log_params(self.context.config_params, prefix="config.")
            run.log_params(self.context.track_params, prefix="track.")
        elif isinstance(result, Judged):
            run.log_judge(result.judge, result.calibration)
            run.log_metrics({"judge/mean_reward": result.mean_reward, "judge/scored": result.scored})
            run.log_text("rubric.md", self.context.rubric_text())
        elif isinstance(result, Trained):  # logged again after a resume: metrics and files, both repeatable
            if result.metrics_path is not None and result.metrics_path.exists():
                run.log_training(result.metrics_path)
            if result.adapter_dir is not None:  # kept with the run whether or not it is promoted
                run.log_adapter(result.adapter_dir)
            run.log_metrics({f"train/data/{kind}": count for kind, count in result.data.items()})
            if result.reward_model is not None:
                run.log_reward_model(result.reward_model)
        elif isinstance(result, GateDecision) and not result.skipped:
            run.log_gate(result.report(), result.cases())
        elif isinstance(result, Committed):  # the night is over: a logging failure must not undo that
            try:
                run.set_tags({"status": result.status})
                run.finish()
            except UserError as error:
                logger.warning(
                    "the night ended %s, but its MLflow run was not closed: %s", result.status, error
                )

    def fail(self, reason: str) -> None:
        """Mark the night's run FAILED (with the reason as a tag), when it was started."""
        if self._run is None and self.context.resume_id is None:
            return
        try:
            run = self._open()
            run.set_tags({"status": "failed", "error": reason[:250]})
            run.finish("FAILED")
        except UserError as error:
            logger.warning("could not mark the night's MLflow run failed: %s", error)

    def _open(self) -> NightRun:
        if self._run is not None:
            return self._run
        context = self.context
        run = NightRun(
            context.tracking_uri,
            context.experiment,
            context.run_name,
            artifact_location=context.artifact_location,
            tags=context.tags,
        )
        if context.resume_id:
            run.resume(context.resume_id)
        else:
            context.on_start(run.start())
        self._run = run
        return run
