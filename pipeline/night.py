"""One track's night, stage by stage, resumable: harvest → judge → select → train → gate → register → deploy → commit.

Each stage is a plain function of the night and the typed results of the stages before it
(`pipeline.results`), and returns its own. `Night.stage` runs one through the SQL ledger
(`storage.runs`): a stage that already finished for this run is not run again, its recorded result
is read back (typed) instead; so a night killed anywhere is re-run for the same window and continues
after its last finished stage, without a second harvest, a second registered version or a second
deployment. Registration is also idempotent on its own (a version carries the run's key as a tag),
for the case where the process died after MLflow created the version but before the ledger heard of
it. The watermark moves in the last stage only. Every result goes to the night's log (MLflow) through
one hook, `NightLog.log`.

One runner per track-night: opening a `Night` takes the run's lease (`storage.runs.take_lease`) and a
thread renews it while the night runs; a second runner sees `busy` (who, since when) and does not run
a stage. A runner killed mid-night loses its lease after `schedule.lease_seconds`, and the next one
resumes the night.

`OVERNIGHT_CRASH_AT=<stage>` makes the process exit abruptly (as a SIGKILL would) right after that
stage's side effects and before the ledger records it: the tests use it to kill a night in each stage.

Prefect is not imported here: `flows/nightly.py` wraps each stage in a task.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy import Engine

from pipeline.adapters import AdapterVersion, file_digests, file_sha256
from pipeline.config import OvernightConfig, TrackConfig, TrainConfig
from pipeline.gate import stage as gate_stage
from pipeline.gate.memory import update_memory_suite
from pipeline.harvest import stage as harvest_stage
from pipeline.harvest.pseudonyms import pseudonym_key
from pipeline.judge import stage as judge_stage
from pipeline.judge.client import Judge
from pipeline.judge.rubrics import load_rubric
from pipeline.register.night_log import NightLog, NightLogContext
from pipeline.register.registry import version_tags
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
    TrainPrompt,
)
from pipeline.select import is_heldout
from pipeline.select import select as select_prompts
from pipeline.services import NightServices
from pipeline.train import recipe
from pipeline.train import stage as train_stage
from pipeline.train.rewards import reward_functions
from storage import runs as ledger
from storage.reads import get_snapshot

__all__ = ["STAGES", "Night", "NightOutcome", "night_of", "night_status", "run_through", "summarize"]

logger = logging.getLogger(__name__)

STAGES = ("harvest", "judge", "select", "train", "gate", "register", "deploy", "commit")
RESULT_TYPES: dict[str, type[StageResult]] = {
    "harvest": Harvested,
    "judge": Judged,
    "select": Selected,
    "train": Trained,
    "gate": GateDecision,
    "register": Registered,
    "deploy": Deployed,
    "commit": Committed,
}
CRASH_ENV = "OVERNIGHT_CRASH_AT"
REWARD_MODEL_FACTS = "facts.json"  # tonight's reward model facts, next to it in the run directory

R = TypeVar("R", bound=StageResult)


def night_of(now: datetime, timezone: str) -> str:
    """The night's label (YYYY-MM-DD) in the schedule's time zone."""
    from zoneinfo import ZoneInfo

    return now.astimezone(ZoneInfo(timezone)).date().isoformat()


def runner_name() -> str:
    """This runner, as others are told who holds a night: `host:pid:nonce` (unique within a process too)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaseLost(RuntimeError):
    """Another runner took this night over (this one stopped renewing in time); it must stop."""


@dataclass
class Night:
    """One track's night: its config, store, ledger row, lease, log and working directory."""

    config: OvernightConfig
    engine: Engine
    track: str
    night: str
    services: NightServices
    force: bool = False
    runner: str = field(default_factory=runner_name)
    run_id: int = 0
    finished: dict[str, Any] | None = None  # the summary of a night that had already finished
    busy: ledger.Lease | None = None  # another runner holds this night
    _log: NightLog | None = field(default=None, init=False, repr=False)
    _stop_renewing: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _lost: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def __post_init__(self) -> None:
        self.run_id, done = ledger.open_run(self.engine, self.track, self.night, force=self.force)
        if done is not None:
            self.finished = dict(done.summary)
            return
        lease = ledger.take_lease(self.engine, self.run_id, self.runner, self._ttl)
        if not lease.held:
            self.busy = lease
            return
        threading.Thread(target=self._renew, name=f"lease-{self.track}", daemon=True).start()

    @property
    def _ttl(self) -> timedelta:
        return timedelta(seconds=self.config.schedule.lease_seconds)

    def _renew(self) -> None:
        """Renew every third of the lease; a failed renewal (a busy store) is retried at the next tick,
        and a lease found taken by another runner marks this night lost (its next stage refuses)."""
        interval = self.config.schedule.lease_seconds / 3
        while not self._stop_renewing.wait(interval):
            try:
                held = ledger.renew_lease(self.engine, self.run_id, self.runner, self._ttl)
            except Exception as error:  # the store is briefly unreachable or locked: try again soon
                logger.warning("%s %s: could not renew the lease: %s", self.track, self.night, error)
                continue
            if not held:
                logger.error("%s %s: lost the lease of run %d", self.track, self.night, self.run_id)
                self._lost.set()
                return

    def release(self) -> None:
        """Stop renewing and give the lease up (the night is done, failed or abandoned)."""
        self._stop_renewing.set()
        ledger.release_lease(self.engine, self.run_id, self.runner)

    @property
    def spec(self) -> TrackConfig:
        return self.config.track(self.track)

    @property
    def run_dir(self) -> Path:
        path = Path(self.config.home) / "runs" / self.track / f"{self.night}-{self.run_id}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def judge(self) -> Judge:
        return self.services.judge_for(self.track)

    @property
    def log(self) -> NightLog:
        if self._log is None:
            self._log = self.services.night_log(self._log_context())
        return self._log

    # ------------------------------------------------------------------ ledger

    def stage(self, name: str, body: Callable[..., R], *inputs: StageResult) -> R:
        """Run `body(self, *inputs)` as stage `name` unless this run already finished it; returns its result."""
        if self._lost.is_set():
            raise LeaseLost(f"{self.track} {self.night}: another runner took this night over; {name} not run")
        result_type = RESULT_TYPES[name]
        done = ledger.finished_stage(self.engine, self.run_id, name)
        if done is not None:
            try:
                recorded = result_type.model_validate(done)
            except ValidationError:  # recorded by an older version in another shape: run it again
                logger.warning("%s %s: %s's recorded result is unreadable; running it again", self.track,
                               self.night, name)  # fmt: skip
            else:
                logger.info("%s %s: %s already done, not repeated", self.track, self.night, name)
                return recorded  # type: ignore[return-value]
        ledger.start_stage(self.engine, self.run_id, name)
        try:
            result = body(self, *inputs)
            self.log.log(result)
        except BaseException as error:
            ledger.finish_stage(self.engine, self.run_id, name, {"error": str(error)[:500]}, status="failed")
            raise
        if os.environ.get(CRASH_ENV) == name:
            logger.error("%s=%s: exiting abruptly after the stage's side effects", CRASH_ENV, name)
            os._exit(137)
        ledger.finish_stage(self.engine, self.run_id, name, result.as_json())
        return result

    def fail(self, error: BaseException | str) -> None:
        """The night failed for good (no retry left): record why, end its MLflow run, give the lease up."""
        reason = str(error)[:500]
        ledger.finish_run(self.engine, self.run_id, "failed", {"track": self.track, "error": reason})
        if self._log is not None:
            self._log.fail(reason)
        self.release()

    def _log_context(self) -> NightLogContext:
        mlflow = self.config.mlflow
        run = ledger.get_run(self.engine, self.run_id)
        return NightLogContext(
            tracking_uri=mlflow.tracking_uri,
            experiment=f"{mlflow.experiment_prefix}{self.track}",
            run_name=f"{self.track}-{self.night}-a{run.attempt}",
            artifact_location=mlflow.artifact_location,
            tags={"track": self.track, "night": self.night, "overnight_run": str(self.run_id)},
            config_params=self.config.model_copy(update={"tracks": []}),
            track_params=self.spec,
            rubric_text=lambda: load_rubric(self.spec.rubric).text,
            resume_id=run.mlflow_run_id,
            on_start=lambda run_id: ledger.set_run_fields(self.engine, self.run_id, mlflow_run_id=run_id),
        )


# ---------------------------------------------------------------------- stages


def harvest(night: Night) -> Harvested:
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
        pseudonym_key=pseudonym_key(night.config.pseudonym_key_text(), night.config.home),
    )
    ledger.set_run_fields(night.engine, night.run_id, snapshot_id=snapshot.snapshot_id)
    return snapshot.result()


def _unfinished_snapshot(night: Night) -> Harvested | None:
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
    return Harvested(
        track=night.track,
        rows=snapshot.rows_kept,
        read=snapshot.rows_read,
        dropped=dict(snapshot.dropped),
        redactions=dict(snapshot.redactions),
        sha256=snapshot.sha256,
        window=window,
        source=snapshot.source,
        snapshot_id=snapshot_id,
        path=path,
        reused=True,
    )


def judge(night: Night, harvested: Harvested) -> Judged:
    assert harvested.path is not None, "a night's harvest always writes its snapshot"
    return judge_stage.judge_snapshot(
        harvest_stage.read_snapshot(harvested.path),
        spec=night.spec,
        judge=night.judge if night.spec.reward.judge > 0 else None,
        out=harvested.path.with_suffix(".judged.jsonl"),
        stage_items=night.config.judge.stage_items,
    )


def select(night: Night, judged: Judged) -> Selected:
    train = night.config.train_for(night.track)
    assert judged.path is not None, "a night's judge stage always writes the judged snapshot"
    chosen = select_prompts(
        judge_stage.read_judged(judged.path),
        max_prompts=train.max_prompts,
        heldout_fraction=train.heldout_fraction,
        seed=train.seed,
        # The feedback methods and the reward model learn from rated rows: those go first.
        feedback_first=train.method != "grpo" or night.spec.reward.reward_model > 0,
    )
    paths = {}
    for name, prompts in (("train", chosen.train), ("heldout", chosen.heldout)):
        path = night.run_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(p.as_json()) + "\n" for p in prompts), encoding="utf-8")
        paths[name] = path
    return Selected(
        train=len(chosen.train),
        heldout=len(chosen.heldout),
        considered=chosen.considered,
        unscored=chosen.unscored,
        train_path=paths["train"],
        heldout_path=paths["heldout"],
    )


def train(night: Night, selected: Selected) -> Trained:
    prompts = read_prompts(selected.train_path)
    if not prompts:
        return Trained(steps=0, stop_reason="no_prompts")
    champion = champion_adapter(night)
    champion_version = champion.version if champion else None
    finished = _finished_training(night.run_dir / "train")
    if finished is not None:  # the process died after training finished: keep the adapter
        facts = night.run_dir / "reward-model" / REWARD_MODEL_FACTS
        fitted = json.loads(facts.read_text(encoding="utf-8")) if facts.exists() else None
        update = {"champion_version": champion_version, "reused": True, "reward_model": fitted}
        return finished.model_copy(update=update)
    spec = night.spec
    settings = night.config.train_for(night.track)
    functions, weights = reward_functions(
        spec.reward, night.judge if spec.reward.judge > 0 else None, load_rubric(spec.rubric)
    )
    fitted: dict[str, Any] | None = None
    if spec.reward.reward_model > 0:
        fitted, scorer = _reward_model(night, settings, prompts)
        if scorer is not None:
            functions.append(scorer)
            weights.append(spec.reward.reward_model)
    if not functions:
        # GRPO has nothing to learn from; the feedback methods could learn from the users' scores
        # alone, but the gate would have nothing to score the held-out replies with.
        what = "to train on" if settings.method == "grpo" else "to score the gate's held-out replies with"
        reason = (
            f"no reward {what}: the reward model is not used ({fitted['reason']})"
            if fitted
            else f"no reward {what}"
        )
        return Trained(
            method=settings.method, steps=0, stop_reason="no_reward", detail=reason, reward_model=fitted
        )
    result = train_stage.train(
        settings,
        prompts,
        functions,
        reward_weights=weights,
        base_model=night.config.base_model_for(night.track),
        out_dir=night.run_dir / "train",
        champion=champion.path if champion else None,
    )
    return Trained.model_validate(
        {**result.as_json(), "champion_version": champion_version, "reward_model": fitted}
    )


def _reward_model(
    night: Night, settings: TrainConfig, prompts: list[TrainPrompt]
) -> tuple[dict[str, Any], Any]:
    """Fit tonight's reward model to the users' scores, register it as `<track>-reward-model` (its
    own registered model in MLflow, `champion` alias on the latest one agreeing with users), and
    return (its facts, a reward function when it may be used, else None)."""
    from pipeline.train.examples import logged_replies
    from pipeline.train.reward_model import RewardModelScorer, fit_reward_model

    base_model = night.config.base_model_for(night.track)
    earlier = _earlier_rated_prompts(night, settings)
    result = fit_reward_model(
        night.config.reward_model,
        settings,
        logged_replies([*prompts, *earlier]),
        base_model=base_model,
        out_dir=night.run_dir / "reward-model",
    )
    facts = result.as_json() | {"earlier_prompts": len(earlier)}
    if result.adapter_dir is not None:
        name = reward_model_name(night.track)
        registry = night.services.registry
        key = str(night.run_id)
        version = next(
            (info.version for info in registry.versions(name) if info.tags.get("overnight_run") == key), None
        )
        if version is None:
            tags = {
                "overnight_run": key,
                "night": night.night,
                "base_model": base_model,
                "agreement": "" if result.agreement is None else f"{result.agreement:.4f}",
                "spearman": "" if result.spearman is None else f"{result.spearman:.4f}",
                "usable": str(result.usable).lower(),
                "heldout_examples": str(result.heldout_examples),
            }
            version = registry.register(name, result.adapter_dir, run_id=night.log.run_id, tags=tags)
            if result.usable:
                registry.promote(name, version)
        facts["version"] = version
        (night.run_dir / "reward-model" / REWARD_MODEL_FACTS).write_text(json.dumps(facts), encoding="utf-8")
    logger.info("%s %s: reward model %s", night.track, night.night, result.reason)
    scorer = (
        RewardModelScorer(base_model, result.adapter_dir) if result.usable and result.adapter_dir else None
    )
    return facts, scorer


def _earlier_rated_prompts(night: Night, settings: TrainConfig) -> list[TrainPrompt]:
    """The training prompts of the track's last `reward_model.history_nights` nights that a user rated,
    less any that tonight's gate holds out (the split by prompt hash, with tonight's settings)."""
    details = ledger.earlier_stage_details(
        night.engine,
        night.track,
        "select",
        before_night=night.night,
        nights=night.config.reward_model.history_nights,
    )
    earlier = []
    for detail in details:
        path = Path(str(detail.get("train_path") or ""))
        if not path.is_file():
            logger.warning("%s %s: an earlier night's prompts are gone (%s); its feedback not used",
                           night.track, night.night, path)  # fmt: skip
            continue
        earlier += [
            prompt
            for prompt in read_prompts(path)
            if prompt.score_source == "feedback"
            and not is_heldout(prompt.messages, settings.heldout_fraction, settings.seed)
        ]
    return earlier


def reward_model_name(track: str) -> str:
    """The registered model (after the registry's prefix) that holds a track's reward models."""
    return f"{track}-reward-model"


def _finished_training(out_dir: Path) -> Trained | None:
    """A training result written before a crash, when its adapter files still match their digests."""
    result_file = out_dir / recipe.RESULT_FILE
    if not result_file.exists():
        return None
    result = Trained.model_validate_json(result_file.read_text(encoding="utf-8"))
    if result.adapter_dir and file_digests(result.adapter_dir) != result.adapter_sha256:
        return None
    return result


def gate(night: Night, trained: Trained, selected: Selected) -> GateDecision:
    if trained.adapter_dir is None:
        return GateDecision(passed=False, skipped=True, reason=trained.detail or trained.stop_reason)
    champion = champion_adapter(night)
    return gate_stage.gate_track(
        night.config,
        night.track,
        candidate=trained.adapter_dir,
        champion=champion.path if champion else None,
        heldout=read_prompts(selected.heldout_path),
        judge=night.judge if night.spec.reward.judge > 0 else None,
        generator=night.services.generator,
        report_dir=night.run_dir / "gate",
        reward_model=_usable_reward_model(night, trained),
    )


def _usable_reward_model(night: Night, trained: Trained) -> Any:
    """Tonight's reward model as a scorer for the gate, when the track weighs it and it agreed with users."""
    facts = trained.reward_model
    if (
        night.spec.reward.reward_model <= 0
        or not facts
        or not facts.get("usable")
        or not facts.get("adapter_dir")
    ):
        return None
    from pipeline.train.reward_model import RewardModelScorer

    return RewardModelScorer(night.config.base_model_for(night.track), Path(facts["adapter_dir"]))


def register(
    night: Night, harvested: Harvested, judged: Judged, trained: Trained, decision: GateDecision
) -> Registered:
    if not decision.passed or trained.adapter_dir is None:
        return Registered(version=None)
    registry = night.services.registry
    key = str(night.run_id)
    for info in registry.versions(night.track):  # the process may have died after MLflow registered it
        if info.tags.get("overnight_run") == key:
            return Registered(version=info.version, reused=True)
    tags = {
        "overnight_run": key,
        "night": night.night,
        **version_tags(
            gate=decision.report(),
            base_model=night.config.base_model_for(night.track),
            dataset_sha256=harvested.sha256,
            judge_model=str(judged.judge_model),
            rubric_version=judged.rubric,
            stop_reason=trained.stop_reason,
        ),
    }
    version = registry.register(night.track, trained.adapter_dir, run_id=night.log.run_id, tags=tags)
    ledger.set_run_fields(night.engine, night.run_id, candidate_version=str(version))
    return Registered(version=version)


def deploy(night: Night, registered: Registered) -> Deployed:
    version = registered.version
    if version is None:
        return Deployed(deployed=False)
    registry = night.services.registry
    if registry.version_for(night.track, "champion") == version:
        return Deployed(deployed=True, version=version, already=True)
    if night.services.deploy is None:
        logger.warning(
            "%s v%s registered as challenger: no serving endpoint to deploy to", night.track, version
        )
        return Deployed(deployed=False, version=version, reason="no serving endpoint")
    adapter = registry.fetch(night.track, version)
    swap = night.services.deploy(adapter)
    registry.promote(night.track, version)
    return Deployed(deployed=True, version=version, swap=swap)


def run_through(night: Night) -> Committed:
    """The whole night in this process, stage after stage (what `flows.nightly.track_night` runs as
    Prefect tasks); for tests and for running a night without an orchestrator."""
    try:
        harvested = night.stage("harvest", harvest)
        judged = night.stage("judge", judge, harvested)
        selected = night.stage("select", select, judged)
        trained = night.stage("train", train, selected)
        decision = night.stage("gate", gate, trained, selected)
        registered = night.stage("register", register, harvested, judged, trained, decision)
        deployed = night.stage("deploy", deploy, registered)
        return night.stage(
            "commit", commit, harvested, judged, selected, trained, decision, registered, deployed
        )
    except BaseException as error:
        night.fail(error)
        raise
    finally:
        night.release()


@dataclass(frozen=True)
class NightOutcome:
    """Every stage's result of a night that ran to its end: what commit and the summary read."""

    harvested: Harvested
    judged: Judged
    selected: Selected
    trained: Trained
    decision: GateDecision
    registered: Registered
    deployed: Deployed


def commit(
    night: Night,
    harvested: Harvested,
    judged: Judged,
    selected: Selected,
    trained: Trained,
    decision: GateDecision,
    registered: Registered,
    deployed: Deployed,
) -> Committed:
    outcome = NightOutcome(harvested, judged, selected, trained, decision, registered, deployed)
    state = harvest_stage.commit(night.engine, harvested.snapshot_id) if harvested.snapshot_id else None
    gate_config = night.config.gate_for(night.track)
    memory = (
        update_memory_suite(
            night.config.home,
            night.track,
            _memory_rows(judged.path),
            cap=gate_config.memory_cap,
            min_reward=gate_config.memory_min_reward,
        )
        if judged.path
        else None
    )
    status = night_status(outcome)
    ledger.finish_run(night.engine, night.run_id, status, summarize(night, outcome))
    return Committed(
        status=status,
        watermark=getattr(state, "last_id", None),
        memory_cases=len(memory.cases) if memory else None,
        memory_version=memory.version if memory else None,
    )


def night_status(outcome: NightOutcome) -> str:
    if not outcome.harvested.rows or outcome.trained.adapter_dir is None:
        return "skipped"
    if not outcome.decision.passed:
        return "rejected"
    return "promoted" if outcome.deployed.deployed else "registered"


def summarize(night: Night, outcome: NightOutcome) -> dict[str, Any]:
    """The night's entry of the `overnight run` JSON."""
    trained, decision = outcome.trained, outcome.decision
    return {
        "track": night.track,
        "night": night.night,
        "status": night_status(outcome),
        "version": outcome.registered.version,
        "gate": None if decision.skipped else decision.summary(),
        "reason": f"skipped: {decision.reason or trained.stop_reason}"
        if decision.skipped
        else decision.report().reason(),
        "train": {
            "method": trained.method,
            "steps": trained.steps,
            "stop_reason": trained.stop_reason,
            "kl": trained.kl,
            **({"data": dict(trained.data)} if trained.data else {}),
            **({"reward_model": _reward_model_summary(trained.reward_model)} if trained.reward_model else {}),
        },
        "deployed": outcome.deployed.deployed,
        "rows": outcome.harvested.rows,
        "mean_reward": outcome.judged.mean_reward,
        # the judge's agreement with the users who rated tonight's rows (`evals.calibration`)
        "calibration": dict(outcome.judged.calibration),
    }


# ---------------------------------------------------------------------- helpers


def _reward_model_summary(facts: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "version",
        "agreement",
        "usable",
        "reason",
        "train_examples",
        "heldout_examples",
        "earlier_prompts",
    )
    return {key: facts.get(key) for key in keys}


def champion_adapter(night: Night) -> AdapterVersion | None:
    """The track's champion adapter (verified, cached), None before its first promotion."""
    registry = night.services.registry
    if registry.version_for(night.track, "champion") is None:
        return None
    return registry.fetch(night.track, "champion")


def read_prompts(path: Path) -> list[TrainPrompt]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [TrainPrompt.from_json(json.loads(line)) for line in lines]


def _memory_rows(judged_path: Path) -> list[dict[str, Any]]:
    rows = []
    for record in judge_stage.read_judged(judged_path):
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
