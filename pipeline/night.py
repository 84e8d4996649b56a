"""One track's night, stage by stage, resumable: harvest → judge → select → train → gate → register → deploy → commit.

Each stage is a plain function of the night and the details the stages before it recorded. `Night.stage`
runs one through the SQL ledger (`storage.runs`): a stage that already finished for this run is not
run again, its recorded detail is returned instead; so a night killed anywhere is re-run for the same
window and continues after its last finished stage, without a second harvest, a second registered
version or a second deployment. Registration is also idempotent on its own (a version carries the
run's key as a tag), for the case where the process died after MLflow created the version but before
the ledger heard of it. The watermark moves in the last stage only.

`OVERNIGHT_CRASH_AT=<stage>` makes the process exit abruptly (as a SIGKILL would) right after that
stage's side effects and before the ledger records it: the tests use it to kill a night in each stage.

Prefect is not imported here: `flows/nightly.py` wraps each stage in a task.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from evals.gate import GateReport
from pipeline.adapters import AdapterVersion, file_digests, file_sha256
from pipeline.config import OvernightConfig, TrackConfig
from pipeline.gate import stage as gating
from pipeline.gate.evaluation import ReplyGenerator
from pipeline.harvest import stage as harvest_stage
from pipeline.judge.client import Judge, LlmJudge
from pipeline.judge.rubrics import load_rubric
from pipeline.judge.stage import judge_records, judge_settings, read_judged
from pipeline.register.mlflow_run import NightRun
from pipeline.register.registry import Registry, version_tags
from pipeline.results import TrainPrompt
from pipeline.select import select as select_prompts
from pipeline.train.recipe import RESULT_FILE
from pipeline.train.recipe import run as train_run
from pipeline.train.rewards import reward_functions
from storage import runs as ledger
from storage.reads import get_snapshot

__all__ = ["STAGES", "Night", "NightServices", "night_of"]

logger = logging.getLogger(__name__)

STAGES = ("harvest", "judge", "select", "train", "gate", "register", "deploy", "commit")
CRASH_ENV = "OVERNIGHT_CRASH_AT"

Deployer = Callable[[AdapterVersion], dict[str, Any]]  # hot-swap onto every endpoint; raises on failure


@dataclass
class NightServices:
    """The external systems a night uses, so tests can hand in fakes."""

    registry: Registry
    deploy: Deployer | None  # None: no serving configured or reachable; promotion waits as `challenger`
    generator: ReplyGenerator | None = None  # gate replies through vLLM; None: in-process
    judge: Judge | None = None  # None: the configured LLM judge


def night_of(now: Any, timezone: str) -> str:
    """The night's label (YYYY-MM-DD) in the schedule's time zone."""
    from zoneinfo import ZoneInfo

    return now.astimezone(ZoneInfo(timezone)).date().isoformat()


@dataclass
class Night:
    """One track's night: its config, store, ledger row and working directory."""

    config: OvernightConfig
    engine: Engine
    track: str
    night: str
    services: NightServices
    force: bool = False
    run_id: int = 0
    finished: dict[str, Any] | None = None  # the summary of a night that had already finished
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    _mlflow_run: NightRun | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.run_id, done = ledger.open_run(self.engine, self.track, self.night, force=self.force)
        if done is not None:
            self.finished = dict(done.summary)

    @property
    def spec(self) -> TrackConfig:
        return self.config.track(self.track)

    @property
    def run_dir(self) -> Path:
        path = Path(self.config.home) / "runs" / self.track / f"{self.night}-{self.run_id}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------------ ledger

    def stage(self, name: str, body: Callable[[Night], dict[str, Any]]) -> dict[str, Any]:
        """Run `body` as stage `name` unless this run already finished it; returns its detail."""
        done = ledger.finished_stage(self.engine, self.run_id, name)
        if done is not None:
            logger.info("%s %s: %s already done, not repeated", self.track, self.night, name)
            self.details[name] = done
            return done
        ledger.start_stage(self.engine, self.run_id, name)
        try:
            detail = body(self)
        except BaseException as error:
            ledger.finish_stage(self.engine, self.run_id, name, {"error": str(error)[:500]}, status="failed")
            raise
        if os.environ.get(CRASH_ENV) == name:
            logger.error("%s=%s: exiting abruptly after the stage's side effects", CRASH_ENV, name)
            os._exit(137)
        ledger.finish_stage(self.engine, self.run_id, name, detail)
        self.details[name] = detail
        return detail

    def mlflow(self) -> NightRun:
        """The night's MLflow run, created once and resumed by id after a crash."""
        if self._mlflow_run is not None:
            return self._mlflow_run
        mlflow = self.config.mlflow
        run = ledger.get_run(self.engine, self.run_id)
        night_run = NightRun(
            mlflow.tracking_uri,
            f"{mlflow.experiment_prefix}{self.track}",
            f"{self.track}-{self.night}-a{run.attempt}",
            artifact_location=mlflow.artifact_location,
            tags={"track": self.track, "night": self.night, "overnight_run": str(self.run_id)},
        )
        if run.mlflow_run_id:
            night_run.resume(run.mlflow_run_id)
        else:
            ledger.set_run_fields(self.engine, self.run_id, mlflow_run_id=night_run.start())
        self._mlflow_run = night_run
        return night_run

    def fail(self, error: BaseException) -> None:
        ledger.finish_run(
            self.engine, self.run_id, "failed", {"track": self.track, "error": str(error)[:500]}
        )

    def judge(self) -> Judge:
        if self.services.judge is not None:
            return self.services.judge
        return LlmJudge(judge_settings(self.config.judge, self.config.serving), engine=self.engine)


# ---------------------------------------------------------------------- stages


def harvest(night: Night) -> dict[str, Any]:
    stored = _unfinished_snapshot(night)
    if stored is not None:  # the process died after harvesting: the same window, already on disk
        return stored
    spec = night.spec
    snapshot = harvest_stage.harvest(
        night.engine,
        night.track,
        spec.harvest,
        spec.filter,
        batch_size=night.config.database.batch_size,
        snapshot_dir=night.config.snapshot_dir(),
    )
    ledger.set_run_fields(night.engine, night.run_id, snapshot_id=snapshot.snapshot_id)
    detail = snapshot.as_json()
    run = night.mlflow()
    run.log_window(detail)
    run.log_params(night.config.model_dump(exclude={"tracks"}), prefix="config.")
    run.log_params(spec.model_dump(), prefix="track.")
    return detail


def _unfinished_snapshot(night: Night) -> dict[str, Any] | None:
    """The snapshot this run harvested before it died, when its file is intact."""
    snapshot_id = ledger.get_run(night.engine, night.run_id).snapshot_id
    if snapshot_id is None:
        return None
    snapshot = get_snapshot(night.engine, snapshot_id)
    path = Path(snapshot.path)
    if snapshot.committed_at is not None or not path.exists() or file_sha256(path) != snapshot.sha256:
        return None
    window = {
        key: value.isoformat() if isinstance(value, datetime) else value
        for key, value in (
            ("after_id", snapshot.after_id),
            ("until_id", snapshot.until_id),
            ("since_ts", snapshot.since_ts),
            ("until_ts", snapshot.until_ts),
        )
        if value is not None
    }
    logger.info(
        "%s %s: reusing snapshot %d harvested before the crash", night.track, night.night, snapshot_id
    )
    return {
        "track": night.track,
        "rows": snapshot.rows_kept,
        "read": snapshot.rows_read,
        "dropped": dict(snapshot.dropped),
        "redactions": dict(snapshot.redactions),
        "sha256": snapshot.sha256,
        "window": window,
        "source": snapshot.source,
        "snapshot_id": snapshot_id,
        "path": str(path),
        "reused": True,
    }


def judge(night: Night) -> dict[str, Any]:
    snapshot = night.details["harvest"]
    rubric = load_rubric(night.spec.rubric)
    out = Path(snapshot["path"]).with_suffix(".judged.jsonl")
    judge_ = night.judge()
    result = judge_records(
        harvest_stage.read_snapshot(Path(snapshot["path"])),
        rubric=rubric,
        judge=judge_,
        reward=night.spec.reward,
        out=out,
    )
    detail = {"rubric": rubric.key, "judge_model": getattr(judge_, "model", None), **result.as_json()}
    run = night.mlflow()
    run.log_judge(detail["judge"], detail["calibration"])
    run.log_metrics({"judge/mean_reward": result.mean_reward, "judge/scored": result.scored})
    run.log_text("rubric.md", rubric.text)
    return detail


def select(night: Night) -> dict[str, Any]:
    train = night.config.train_for(night.track)
    chosen = select_prompts(
        read_judged(night.details["judge"]["path"]),
        max_prompts=train.max_prompts,
        heldout_fraction=train.heldout_fraction,
        seed=train.seed,
    )
    paths = {}
    for name, prompts in (("train", chosen.train), ("heldout", chosen.heldout)):
        path = night.run_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(_prompt_json(p)) + "\n" for p in prompts), encoding="utf-8")
        paths[f"{name}_path"] = str(path)
    return {**chosen.as_json(), **paths}


def train(night: Night) -> dict[str, Any]:
    selected = night.details["select"]
    prompts = _read_prompts(selected["train_path"])
    if not prompts:
        return {"stop_reason": "no_prompts", "steps": 0, "adapter_dir": None}
    champion = champion_adapter(night)
    finished = _finished_training(night.run_dir / "train")
    if finished is not None:  # the process died after training finished: keep the adapter
        return {**finished, "champion_version": champion.version if champion else None, "reused": True}
    judge_ = night.judge() if night.spec.reward.judge > 0 else None
    functions, weights = reward_functions(night.spec.reward, judge_, load_rubric(night.spec.rubric))
    result = train_run(
        night.config.train_for(night.track),
        prompts,
        functions,
        reward_weights=weights,
        base_model=night.config.base_model_for(night.track),
        out_dir=night.run_dir / "train",
        champion=champion.path if champion else None,
    )
    night.mlflow().log_training(result.metrics_path)
    return {**result.as_json(), "champion_version": champion.version if champion else None}


def _finished_training(out_dir: Path) -> dict[str, Any] | None:
    """A training result written before a crash, when its adapter files still match their digests."""
    result_file = out_dir / RESULT_FILE
    if not result_file.exists():
        return None
    result = json.loads(result_file.read_text(encoding="utf-8"))
    adapter_dir = result.get("adapter_dir")
    if adapter_dir and file_digests(Path(adapter_dir)) != result.get("adapter_sha256"):
        return None
    return result


def gate(night: Night) -> dict[str, Any]:
    trained = night.details["train"]
    if not trained.get("adapter_dir"):
        return {"passed": False, "skipped": True, "reason": trained["stop_reason"]}
    spec = night.spec
    champion = champion_adapter(night)
    judge_ = night.judge() if spec.reward.judge > 0 else None
    outcome = gating.gate_candidate(
        base_model=night.config.base_model_for(night.track),
        candidate=Path(trained["adapter_dir"]),
        champion=champion.path if champion else None,
        suites=gating.track_suites(night.config, night.track),
        gate=night.config.gate_for(night.track),
        scorer=gating.reward_scorer(spec.reward, judge_, load_rubric(spec.rubric)),
        heldout=_read_prompts(night.details["select"]["heldout_path"]),
        generator=night.services.generator,
        report_dir=night.run_dir / "gate",
    )
    run = night.mlflow()
    run.log_gate(outcome.evaluation.report)
    run.log_adapter(Path(trained["adapter_dir"]))  # kept with the run whether or not it is promoted
    return outcome.as_json()


def register(night: Night) -> dict[str, Any]:
    decided = night.details["gate"]
    if not decided.get("passed"):
        return {"version": None}
    registry = night.services.registry
    key = str(night.run_id)
    for info in registry.versions(night.track):  # the process may have died after MLflow registered it
        if info.tags.get("overnight_run") == key:
            return {"version": info.version, "reused": True}
    trained = night.details["train"]
    run = night.mlflow()
    tags = {
        "overnight_run": key,
        "night": night.night,
        **version_tags(
            gate=GateReport.from_json(decided),
            base_model=night.config.base_model_for(night.track),
            dataset_sha256=night.details["harvest"]["sha256"],
            judge_model=str(night.details["judge"].get("judge_model")),
            rubric_version=night.details["judge"]["rubric"],
            stop_reason=trained["stop_reason"],
        ),
    }
    version = registry.register(night.track, Path(trained["adapter_dir"]), run_id=run.run_id, tags=tags)
    ledger.set_run_fields(night.engine, night.run_id, candidate_version=str(version))
    return {"version": version, "reused": False}


def deploy(night: Night) -> dict[str, Any]:
    version = night.details["register"].get("version")
    if version is None:
        return {"deployed": False}
    registry = night.services.registry
    if registry.version_for(night.track, "champion") == version:
        return {"deployed": True, "version": version, "already": True}
    if night.services.deploy is None:
        logger.warning(
            "%s v%s registered as challenger: no serving endpoint to deploy to", night.track, version
        )
        return {"deployed": False, "version": version, "reason": "no serving endpoint"}
    adapter = registry.fetch(night.track, version)
    swap = night.services.deploy(adapter)
    registry.promote(night.track, version)
    return {"deployed": True, "version": version, "swap": swap}


def commit(night: Night) -> dict[str, Any]:
    snapshot = night.details["harvest"]
    state = (
        harvest_stage.commit(night.engine, snapshot["snapshot_id"]) if snapshot.get("snapshot_id") else None
    )
    gate_config = night.config.gate_for(night.track)
    judged = night.details.get("judge", {}).get("path")
    memory = (
        gating.update_memory_suite(
            night.config.home,
            night.track,
            _memory_rows(judged),
            cap=gate_config.memory_cap,
            min_reward=gate_config.memory_min_reward,
        )
        if judged
        else None
    )
    status = night_status(night.details)
    summary = summarize(night, status)
    run = night.mlflow()
    run.set_tags({"status": status})
    run.finish()
    ledger.finish_run(night.engine, night.run_id, status, summary)
    return {
        "status": status,
        "watermark": getattr(state, "last_id", None),
        "memory_suite": {"cases": len(memory.cases), "version": memory.version} if memory else None,
    }


def night_status(details: dict[str, dict[str, Any]]) -> str:
    if not details.get("harvest", {}).get("rows"):
        return "skipped"
    if not details.get("train", {}).get("adapter_dir"):
        return "skipped"
    if not details.get("gate", {}).get("passed"):
        return "rejected"
    return "promoted" if details.get("deploy", {}).get("deployed") else "registered"


def summarize(night: Night, status: str) -> dict[str, Any]:
    """The night's entry of the `overnight run` JSON."""
    details = night.details
    trained = details.get("train", {})
    decided = details.get("gate", {})
    return {
        "track": night.track,
        "night": night.night,
        "status": status,
        "version": details.get("register", {}).get("version"),
        "gate": {key: decided.get(key) for key in ("passed", "gates", "backend")} if decided else None,
        "train": {
            "steps": trained.get("steps"),
            "stop_reason": trained.get("stop_reason"),
            "kl": trained.get("kl"),
        },
        "deployed": bool(details.get("deploy", {}).get("deployed")),
        "rows": details.get("harvest", {}).get("rows"),
        "mean_reward": details.get("judge", {}).get("mean_reward"),
    }


# ---------------------------------------------------------------------- helpers


def champion_adapter(night: Night) -> AdapterVersion | None:
    registry = night.services.registry
    if registry.version_for(night.track, "champion") is None:
        return None
    return registry.fetch(night.track, "champion")


def _prompt_json(prompt: TrainPrompt) -> dict[str, Any]:
    return {"messages": prompt.messages, "reference": prompt.reference, "metadata": prompt.metadata}


def _read_prompts(path: str) -> list[TrainPrompt]:
    prompts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        data = json.loads(line)
        prompts.append(TrainPrompt(data["messages"], data.get("reference"), data.get("metadata") or {}))
    return prompts


def _memory_rows(judged_path: str) -> list[dict[str, Any]]:
    rows = []
    for record in read_judged(judged_path):
        interaction_id = record.get("interaction_id")
        if isinstance(interaction_id, int):
            rows.append(
                {
                    "interaction_id": interaction_id,
                    "messages": record["messages"],
                    "response": record["response"],
                    "reward": record.get("reward"),
                }
            )
    return rows
