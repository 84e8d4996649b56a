"""A night driven with fakes on SQLite (no Prefect, no vLLM, no MLflow): every status, resume after a
failure in each stage, idempotent registration, one judge per track-night, one runner per night.

Training and the gate's KL probe run for real, in-process, on the tiny model; the registry, judge,
deployer, reply generator and night log are the fakes in `tests/fakes/`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

import storage
from pipeline import night as stages
from pipeline.config import OvernightConfig
from pipeline.judge.client import JudgeSettings, LlmJudge
from pipeline.night import LeaseLost, Night, run_through
from pipeline.results import Committed, GateDecision, Harvested, Judged, Trained
from pipeline.services import NightServices
from storage import runs as ledger
from storage.models import Snapshot
from tests.conftest import make_record
from tests.fakes.chat_server import ChatServer
from tests.fakes.judge import FakeJudge
from tests.fakes.night import CountingFactory, FakeDeployer, FakeGenerator, NightLogs
from tests.fakes.registry import FakeRegistry

NIGHT = "2026-11-22"
TRACK = "support"


def night_config(tmp_path: Path, model: Path, database_url: str, **gate: Any) -> OvernightConfig:
    return OvernightConfig.model_validate(
        {
            "home": str(tmp_path / "home"),
            "database": {"url": database_url},
            "serving": {"base_model": str(model), "endpoints": []},
            "schedule": {"lease_seconds": 30},
            "train": {
                "max_steps": 2,
                "prompts_per_step": 2,
                "num_generations": 2,
                "max_completion_tokens": 4,
                "max_prompts": 16,
                "heldout_fraction": 0.5,
                "learning_rate": 1e-3,
                "kl_budget": 100.0,
                "beta": 0.0,
            },
            "gate": {"max_new_tokens": 4, "max_kl_to_base": 1e6, "bootstrap_samples": 200, **gate},
            "tracks": [{"name": TRACK, "rubric": "helpfulness", "suites": [], "reward": {"judge": 1.0}}],
        }
    )


def digit_score(response: str) -> float:
    return 1.0 if any(ch.isdigit() for ch in response) else 0.0


class World:
    """A store with a day's traffic, the fakes, and helpers to open and run the night."""

    def __init__(self, tmp_path: Path, model: Path, engine: Engine, url: str, rows: int = 40, **gate: Any):
        self.engine = engine
        self.config = night_config(tmp_path, model, url, **gate)
        self.registry = FakeRegistry(tmp_path / "registry")
        self.deployer = FakeDeployer()
        self.generator = FakeGenerator()
        self.judges = CountingFactory(lambda: FakeJudge(digit_score))
        self.logs = NightLogs()
        if rows:
            storage.log_interactions(engine, [make_record(n) for n in range(rows)])

    def services(self, *, deploy: bool = True) -> NightServices:
        return NightServices(
            registry=self.registry,
            deploy=self.deployer if deploy else None,
            generator=self.generator,
            judge_factory=self.judges,
            night_log=self.logs,
        )

    def open(self, services: NightServices | None = None, **kwargs: Any) -> Night:
        return Night(self.config, self.engine, TRACK, NIGHT, services or self.services(), **kwargs)

    def config_home_runs(self, night: str) -> list[Path]:
        """The run directories of the track's `night` (one per attempt)."""
        return sorted((Path(self.config.home) / "runs" / TRACK).glob(f"{night}-*"))

    def snapshots(self) -> int:
        with Session(self.engine) as session:
            return session.scalar(select(func.count()).select_from(Snapshot)) or 0


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> tuple[Engine, str]:
    url = f"sqlite:///{tmp_path / 'night.db'}"
    engine = storage.make_engine(url)
    storage.upgrade(engine)
    return engine, url


@pytest.fixture
def world(tmp_path: Path, tiny_model_dir: Path, sqlite_engine: tuple[Engine, str]) -> World:
    engine, url = sqlite_engine
    # Any gain passes; the track has no suites, so no independent measure could confirm it: the
    # night's plumbing is under test here, not the reward-hacking guard (`confirm_with: []`).
    return World(tmp_path, tiny_model_dir, engine, url, min_gain=-1.0, confirm_with=[])


def test_a_passing_candidate_is_promoted_and_every_result_is_logged_once(world: World) -> None:
    committed = run_through(world.open())

    assert committed.status == "promoted"
    assert world.registry.version_for(TRACK, "champion") == 1
    assert world.deployer.swapped == [(TRACK, 1)]
    run = ledger.last_runs(world.engine)[TRACK]
    assert run.status == "promoted" and run.summary["version"] == 1 and run.runner is None  # lease given up
    kinds = [type(result).__name__ for log in world.logs.made for result in log.results]
    assert kinds == ["Harvested", "Judged", "Selected", "Trained", "GateDecision", "Registered", "Deployed",
                     "Committed"]  # fmt: skip
    decision = world.logs.logged(GateDecision)[0]
    assert isinstance(decision, GateDecision) and decision.passed
    assert {gate.name for gate in decision.gates} == {
        "heldout_gain",
        "kl_to_base",
        "reward_hacking",
        "degeneration/repetition",
        "degeneration/distinct",
        "degeneration/identical",
        "degeneration/length_ratio",
    }
    assert decision.summary()["reason"].startswith("every gate passed; held-out reward")


def test_without_a_serving_endpoint_the_version_is_registered_not_deployed(world: World) -> None:
    committed = run_through(world.open(world.services(deploy=False)))

    assert committed.status == "registered"
    assert world.registry.version_for(TRACK, "challenger") == 1
    assert world.registry.version_for(TRACK, "champion") is None


def test_a_candidate_the_gate_refuses_is_rejected_and_not_registered(
    tmp_path: Path, tiny_model_dir: Path, sqlite_engine: tuple[Engine, str]
) -> None:
    engine, url = sqlite_engine
    world = World(tmp_path, tiny_model_dir, engine, url, min_gain=2.0)  # a gain no reward can reach

    committed = run_through(world.open())

    assert committed.status == "rejected"
    assert world.registry.versions(TRACK) == [] and world.deployer.swapped == []


def test_a_night_without_traffic_is_skipped(
    tmp_path: Path, tiny_model_dir: Path, sqlite_engine: tuple[Engine, str]
) -> None:
    engine, url = sqlite_engine
    world = World(tmp_path, tiny_model_dir, engine, url, rows=0)

    committed = run_through(world.open())

    assert committed.status == "skipped"
    trained = world.logs.logged(Trained)[0]
    assert isinstance(trained, Trained) and trained.stop_reason == "no_prompts"


def test_a_failing_stage_fails_the_night_with_its_reason(world: World) -> None:
    world.deployer.fail = True

    with pytest.raises(ConnectionError):
        run_through(world.open())

    run = ledger.last_runs(world.engine)[TRACK]
    assert run.status == "failed" and "connection refused" in run.summary["error"]
    assert run.runner is None  # a failed night gives its lease up for the retry


@pytest.mark.parametrize("broken", ["judge", "select", "train", "gate", "register", "deploy", "commit"])
def test_a_night_resumes_after_the_stage_that_failed(
    world: World, broken: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = getattr(stages, broken)
    calls = {name: 0 for name in stages.STAGES}
    for name in stages.STAGES:
        monkeypatch.setattr(stages, name, _counted(getattr(stages, name), name, calls))

    def fail_once(*args: Any) -> Any:
        raise RuntimeError(f"{broken} fell over")

    monkeypatch.setattr(stages, broken, fail_once)
    with pytest.raises(RuntimeError, match="fell over"):
        run_through(world.open())
    monkeypatch.setattr(stages, broken, _counted(real, broken, calls))
    committed = run_through(world.open())

    assert committed.status == "promoted"
    before = stages.STAGES[: stages.STAGES.index(broken)]
    assert all(calls[name] == 1 for name in before), calls  # finished stages were not run again
    assert world.snapshots() == 1
    assert [info.version for info in world.registry.versions(TRACK)] == [1]
    assert world.deployer.swapped == [(TRACK, 1)]
    resumed = world.logs.logged(Harvested)
    assert len(resumed) == 1  # the second attempt read the harvest back from the ledger, typed


def test_registration_is_idempotent_when_the_ledger_missed_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_deploy = stages.deploy

    def die_after_registering(*args: Any) -> Any:
        raise RuntimeError("process died")

    monkeypatch.setattr(stages, "deploy", die_after_registering)
    with pytest.raises(RuntimeError):
        run_through(world.open())
    run_id = ledger.last_runs(world.engine)[TRACK].id
    with Session(world.engine) as session, session.begin():  # as if the ledger never heard of register
        from storage.models import RunStage

        session.query(RunStage).filter_by(run_id=run_id, stage="register").delete()
    monkeypatch.setattr(stages, "deploy", real_deploy)

    committed = run_through(world.open())

    assert committed.status == "promoted"
    assert [info.version for info in world.registry.versions(TRACK)] == [1]


def test_one_judge_serves_every_stage_and_retry_of_a_track_night(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = world.services()
    real_gate = stages.gate
    attempts = {"gate": 0}

    def flaky_gate(*args: Any) -> Any:
        attempts["gate"] += 1
        if attempts["gate"] == 1:
            raise RuntimeError("judge endpoint hiccup")
        return real_gate(*args)

    monkeypatch.setattr(stages, "gate", flaky_gate)
    with pytest.raises(RuntimeError):
        run_through(world.open(services))
    run_through(world.open(services))  # the retry of the same night, same services

    assert world.judges.calls == 1
    judge = world.judges.made[0]
    judged = world.logs.logged(Judged)[0]
    assert isinstance(judged, Judged)
    # The judge stage's calls, then the training rewards' and the gate's, all on the one instance.
    assert judge.stats.calls > judged.judge["judge_calls"] > 0


def test_the_judge_budget_holds_across_the_judge_train_and_gate_stages(world: World) -> None:
    """A real `LlmJudge` over HTTP (the scripted chat server): the night's 40 rows take 40 of a budget
    of 45, training's rewards the last 5, and every judgment after that (the rest of training, the
    gate's held-out replies) is skipped, not made: the budget is the night's, not each stage's."""
    with ChatServer(keep_alive=True) as server:
        settings = JudgeSettings(
            base_url=server.base_url, model="judge", timeout_seconds=5.0, budget_items=45
        )
        world.judges.make = lambda: LlmJudge(settings, engine=world.engine)
        run_through(world.open())

    judge = world.judges.made[0]
    judged = world.logs.logged(Judged)[0]
    assert world.judges.calls == 1
    assert isinstance(judged, Judged) and judged.judge["judge_judged"] == 40
    assert judge.stats.judged == 45 and judge.stats.skipped > 0
    assert len(server.state.requests) <= 45


def test_one_runner_per_night_and_a_dead_runner_loses_the_night(world: World) -> None:
    first = world.open(runner="host-a:1")
    second = world.open(runner="host-b:2")

    assert first.busy is None
    assert second.busy is not None and second.busy.runner == "host-a:1" and second.busy.since is not None

    first._stop_renewing.set()  # host-a is killed: it stops renewing and never releases
    ledger.take_lease(world.engine, first.run_id, "host-a:1", ttl=_seconds(0.2))
    time.sleep(0.3)
    third = world.open(runner="host-c:3")

    assert third.busy is None and third.run_id == first.run_id  # the same run, resumed by another runner
    assert run_through(third).status == "promoted"


def test_two_runners_started_at_once_run_the_night_once(world: World) -> None:
    outcomes: dict[str, Any] = {}

    def runner(name: str) -> None:
        night = world.open(runner=name)
        outcomes[name] = night.busy or run_through(night)

    threads = [threading.Thread(target=runner, args=(name,)) for name in ("cron:1", "manual:2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    ran = [name for name, outcome in outcomes.items() if isinstance(outcome, Committed)]
    refused = [outcome for outcome in outcomes.values() if isinstance(outcome, ledger.Lease)]
    assert len(ran) == 1 and len(refused) == 1
    assert refused[0].runner == ran[0]
    assert world.snapshots() == 1 and len(world.logs.logged(Harvested)) == 1
    assert world.open(runner="later:3").finished is not None  # afterwards: reported, not run again


def test_a_runner_whose_night_was_taken_over_runs_no_further_stage(world: World) -> None:
    world.config = world.config.model_copy(
        update={"schedule": world.config.schedule.model_copy(update={"lease_seconds": 0.3})}
    )
    night = world.open(runner="slow:1")
    harvested = night.stage("harvest", stages.harvest)
    with Session(world.engine) as session, session.begin():  # it stalled; another runner took the night
        from storage.models import NightlyRun

        session.get(NightlyRun, night.run_id).runner = "fast:2"  # type: ignore[union-attr]
    time.sleep(0.5)  # the stalled runner's next renewal finds the lease gone

    with pytest.raises(LeaseLost, match="another runner took this night over"):
        night.stage("judge", stages.judge, harvested)
    assert ledger.finished_stage(world.engine, night.run_id, "judge") is None


def _counted(body: Any, name: str, calls: dict[str, int]) -> Any:
    def counted(*args: Any) -> Any:
        calls[name] += 1
        return body(*args)

    return counted


def _seconds(value: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=value)


def feedback_world(
    tmp_path: Path, model: Path, sqlite_engine: tuple[Engine, str], *, train: dict[str, Any], reward: dict[str, Any],
    thumbs: list[int], reward_model: dict[str, Any] | None = None,
) -> World:  # fmt: skip
    """A world whose rows carry the given thumbs (cycled) and whose track trains by `train` on `reward`."""
    engine, url = sqlite_engine
    world = World(tmp_path, model, engine, url, rows=0, min_gain=-1.0, confirm_with=[])
    data = world.config.model_dump()
    data["tracks"][0] |= {"train": train, "reward": reward}
    data["reward_model"] |= reward_model or {}
    world.config = OvernightConfig.model_validate(data)
    records = [
        make_record(n, feedback={"thumb": thumbs[n % len(thumbs)]}, response=f"Answer {n}: {'x' * (n % 5)}")
        for n in range(40)
    ]
    storage.log_interactions(engine, records)
    return world


def test_a_kto_night_with_one_class_of_thumbs_is_skipped_with_the_reason(
    tmp_path: Path, tiny_model_dir: Path, sqlite_engine: tuple[Engine, str]
) -> None:
    world = feedback_world(
        tmp_path, tiny_model_dir, sqlite_engine,
        train={"method": "kto", "on_policy": False}, reward={"judge": 1.0}, thumbs=[1],
    )  # fmt: skip

    committed = run_through(world.open())

    assert committed.status == "skipped"
    trained = world.logs.logged(Trained)[0]
    assert (
        isinstance(trained, Trained) and trained.stop_reason == "too_little_data" and trained.method == "kto"
    )
    summary = ledger.last_runs(world.engine)[TRACK].summary
    assert summary["reason"].startswith("skipped: kto needs both desirable and undesirable replies: ")
    assert summary["train"]["method"] == "kto" and summary["train"]["data"]["undesirable"] == 0
    assert world.registry.versions(TRACK) == []


@pytest.mark.parametrize("method", ["kto", "dpo", "sft"])
def test_a_feedback_night_trains_from_the_users_thumbs_and_goes_through_the_gate(
    method: str, tmp_path: Path, tiny_model_dir: Path, sqlite_engine: tuple[Engine, str]
) -> None:
    world = feedback_world(
        tmp_path, tiny_model_dir, sqlite_engine,
        train={"method": method, "min_examples": 2}, reward={"judge": 1.0}, thumbs=[1, -1],
    )  # fmt: skip

    committed = run_through(world.open())

    trained = world.logs.logged(Trained)[0]
    assert isinstance(trained, Trained) and trained.method == method, trained
    assert trained.adapter_dir is not None and trained.steps > 0 and trained.kl is not None
    decision = world.logs.logged(GateDecision)[0]
    assert isinstance(decision, GateDecision) and not decision.skipped  # the same guard as GRPO's
    assert "heldout_gain" in {gate.name for gate in decision.gates}
    assert committed.status in ("promoted", "rejected")


def test_a_reward_model_fitted_to_the_thumbs_is_registered_and_used_when_it_agrees(
    tmp_path: Path, tiny_model_dir: Path, sqlite_engine: tuple[Engine, str]
) -> None:
    world = feedback_world(
        tmp_path, tiny_model_dir, sqlite_engine,
        train={"method": "grpo"}, reward={"judge": 0.0, "reward_model": 1.0}, thumbs=[1, -1],
        reward_model={"min_examples": 4, "min_heldout": 2, "max_steps": 3, "min_agreement": 0.0,
                      "heldout_fraction": 0.5},
    )  # fmt: skip

    committed = run_through(world.open())

    trained = world.logs.logged(Trained)[0]
    assert isinstance(trained, Trained) and trained.reward_model is not None
    facts = trained.reward_model
    assert facts["usable"] and facts["version"] == 1 and 0.0 <= facts["agreement"] <= 1.0, facts
    name = stages.reward_model_name(TRACK)
    assert world.registry.version_for(name, "champion") == 1
    assert world.registry.versions(name)[0].tags["usable"] == "true"
    assert trained.adapter_dir is not None  # GRPO trained on the reward model's scores alone
    assert committed.status in ("promoted", "rejected")
    assert ledger.last_runs(world.engine)[TRACK].summary["train"]["reward_model"]["usable"] is True


@pytest.mark.parametrize(
    ("method", "what"),
    [("grpo", "to train on"), ("kto", "to score the gate's held-out replies with")],
)
def test_a_reward_model_that_disagrees_with_users_is_not_used_and_the_night_says_so(
    method: str, what: str, tmp_path: Path, tiny_model_dir: Path, sqlite_engine: tuple[Engine, str]
) -> None:
    """GRPO has nothing to learn from; KTO could learn from the thumbs, but nothing could gate it."""
    world = feedback_world(
        tmp_path, tiny_model_dir, sqlite_engine,
        train={"method": method}, reward={"judge": 0.0, "reward_model": 1.0}, thumbs=[1, -1],
        reward_model={"min_examples": 4, "min_heldout": 2, "max_steps": 1, "min_agreement": 1.0,
                      "heldout_fraction": 0.5, "learning_rate": 1e-9},
    )  # fmt: skip

    committed = run_through(world.open())

    assert committed.status == "skipped"
    trained = world.logs.logged(Trained)[0]
    assert isinstance(trained, Trained) and trained.stop_reason == "no_reward" and trained.method == method
    assert trained.reward_model is not None and not trained.reward_model["usable"]
    reason = ledger.last_runs(world.engine)[TRACK].summary["reason"]
    assert reason.startswith(
        f"skipped: no reward {what}: the reward model is not used (agrees with users on "
    )
    assert "below reward_model.min_agreement=100%" in reason
    name = stages.reward_model_name(TRACK)
    assert world.registry.versions(name)[0].tags["usable"] == "false"  # versioned all the same
    assert world.registry.version_for(name, "champion") is None


def test_the_reward_model_also_learns_from_earlier_nights_feedback_but_never_tonights_heldout(
    tmp_path: Path, tiny_model_dir: Path, sqlite_engine: tuple[Engine, str]
) -> None:
    world = feedback_world(
        tmp_path, tiny_model_dir, sqlite_engine,
        train={"method": "grpo"}, reward={"judge": 0.0, "reward_model": 1.0}, thumbs=[1, -1],
        reward_model={"min_examples": 4, "min_heldout": 2, "max_steps": 1, "min_agreement": 0.0,
                      "heldout_fraction": 0.5},
    )  # fmt: skip
    run_through(world.open())
    first = world.logs.logged(Trained)[0]
    assert isinstance(first, Trained) and first.reward_model is not None
    assert first.reward_model["earlier_prompts"] == 0  # nothing came before the first night
    first_rated = first.reward_model["train_examples"] + first.reward_model["heldout_examples"]
    # The next day: 40 new rated exchanges.
    storage.log_interactions(
        world.engine,
        [make_record(n, feedback={"thumb": 1 - 2 * (n % 2)}, response=f"Reply {n}") for n in range(40, 80)],
    )

    run_through(Night(world.config, world.engine, TRACK, "2026-11-23", world.services()))

    second = world.logs.logged(Trained)[1]
    assert isinstance(second, Trained) and second.reward_model is not None
    facts = second.reward_model
    # Last night's training prompts came back (all rated; none held out by the track's split), and
    # together with tonight's they are what the reward model was fitted and measured on.
    assert facts["earlier_prompts"] == first_rated
    tonight = stages.read_prompts(world.config_home_runs("2026-11-23")[0] / "train.jsonl")
    assert facts["train_examples"] + facts["heldout_examples"] == first_rated + len(tonight)
    summary = ledger.last_runs(world.engine)[TRACK].summary["train"]["reward_model"]
    assert summary["earlier_prompts"] == first_rated


def test_an_earlier_nights_lost_prompts_file_only_costs_its_feedback(
    tmp_path: Path, tiny_model_dir: Path, sqlite_engine: tuple[Engine, str]
) -> None:
    world = feedback_world(
        tmp_path, tiny_model_dir, sqlite_engine,
        train={"method": "grpo"}, reward={"judge": 0.0, "reward_model": 1.0}, thumbs=[1, -1],
        reward_model={"min_examples": 4, "min_heldout": 2, "max_steps": 1, "min_agreement": 0.0,
                      "heldout_fraction": 0.5},
    )  # fmt: skip
    run_through(world.open())
    for path in world.config_home_runs(NIGHT):
        (path / "train.jsonl").unlink()
    storage.log_interactions(
        world.engine,
        [make_record(n, feedback={"thumb": 1 - 2 * (n % 2)}, response=f"Reply {n}") for n in range(40, 80)],
    )

    committed = run_through(Night(world.config, world.engine, TRACK, "2026-11-23", world.services()))

    second = world.logs.logged(Trained)[1]
    assert isinstance(second, Trained) and second.reward_model is not None
    assert second.reward_model["earlier_prompts"] == 0 and committed.status in ("promoted", "rejected")


def test_a_distillation_night_learns_from_its_teacher_and_goes_through_the_gate(
    tmp_path: Path, tiny_model_dir: Path, sqlite_engine: tuple[Engine, str]
) -> None:
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    world = feedback_world(
        tmp_path, tiny_model_dir, sqlite_engine,
        train={"method": "distill", "teacher": {"path": str(teacher)}}, reward={"judge": 1.0}, thumbs=[1, -1],
    )  # fmt: skip

    committed = run_through(world.open())

    trained = world.logs.logged(Trained)[0]
    assert isinstance(trained, Trained) and trained.method == "distill", trained
    assert trained.adapter_dir is not None and trained.steps > 0 and trained.kl is not None
    decision = world.logs.logged(GateDecision)[0]
    assert isinstance(decision, GateDecision) and not decision.skipped  # the same guard as GRPO's
    assert "heldout_gain" in {gate.name for gate in decision.gates}
    assert committed.status in ("promoted", "rejected")


def test_a_distillation_night_whose_teacher_is_unreachable_fails_its_train_stage_in_one_line(
    tmp_path: Path, tiny_model_dir: Path, sqlite_engine: tuple[Engine, str]
) -> None:
    from pipeline.deploy.vllm_process import free_port
    from pipeline.train.teacher import TeacherUnavailable

    url = f"http://127.0.0.1:{free_port()}"
    world = feedback_world(
        tmp_path, tiny_model_dir, sqlite_engine,
        train={"method": "distill", "teacher": {"base_url": url, "model": "big", "max_retries": 1}},
        reward={"judge": 1.0}, thumbs=[1, -1],
    )  # fmt: skip

    with pytest.raises(TeacherUnavailable) as caught:
        run_through(world.open())

    message = str(caught.value)
    assert (
        message.startswith(f"teacher big at {url}/v1 failed after 2 attempts: ConnectError")
        and "\n" not in message
    )
    run = ledger.last_runs(world.engine)[TRACK]
    assert run.status == "failed" and run.summary["error"] == message
    stages_run = {name: status for name, status, _, _ in ledger.stage_rows(world.engine, run.id)}
    assert stages_run["train"] == "failed" and "gate" not in stages_run  # nothing trained, nothing gated
    assert not world.logs.logged(Trained) and not world.registry.versions(TRACK)
