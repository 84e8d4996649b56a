"""The nightly flow end to end: Prefect, the real vLLM CPU server, MLflow's store, SQLite and PostgreSQL.

One track rewarded by a programmatic grader (the tiny model cannot make an LLM judge meaningful),
bounded to a few GRPO steps, gated (held-out gain threshold opened so promotion is exercised), then
registered and hot-swapped into the running server. The crash test kills the flow's process in
each stage in turn (`OVERNIGHT_CRASH_AT`, an abrupt exit right after the stage's side effects, the
worst moment) and re-runs it: the night completes with exactly one version, one deployment, one
committed snapshot and one MLflow run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session

import storage
from pipeline.demo_world import synthetic_traffic as synthetic_traffic
from pipeline.deploy.serving import serving_state
from pipeline.night import STAGES
from pipeline.register.mlflow_run import mlflow_client
from pipeline.register.registry import MlflowRegistry
from storage.models import Deployment, NightlyRun, Route, RunStage, Snapshot, Watermark
from storage.routes import read_routes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NIGHT = "2026-11-21"


def write_config(root: Path, *, track: str, database_url: str, server: Any, model_dir: Path) -> Path:
    settings = {
        "home": str(root / "home"),
        # A killed runner's lease runs out after this; the next `overnight run --wait` resumes the night.
        "schedule": {"lease_seconds": 2},
        "database": {"url": database_url},
        "mlflow": {
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "artifact_location": str(root / "mlartifacts"),
        },
        "serving": {
            "base_model": str(model_dir),
            "base_name": server.spec.served_name,
            "endpoints": [server.base_url],
            "dtype": "float32",
        },
        "train": {
            "max_steps": 2,
            "learning_rate": 5e-3,
            "temperature": 0.3,
            "kl_budget": 50.0,
            "max_completion_tokens": 16,
            "num_generations": 4,
            "prompts_per_step": 4,
            "max_prompts": 24,
            "heldout_fraction": 0.4,
        },
        # No suites, so nothing independent could confirm a gain: confirmation off (`confirm_with: []`);
        # the random tiny model's replies are noise, so the degeneration thresholds are opened too:
        # this test is about the night's plumbing (the guard has its own tests).
        "gate": {
            "min_gain": -1.0,
            "max_kl_to_base": 50.0,
            "max_new_tokens": 8,
            "confirm_with": [],
            "max_repetition": 1.0,
            "min_distinct_ratio": 0.0,
            "max_identical_share": 1.0,
            "max_length_ratio": 100.0,
        },
        "tracks": [
            {
                "name": track,
                "rubric": "correctness",
                "suites": [],
                "reward": {"judge": 0.0, "graders": [{"type": "regex", "pattern": r"\d", "weight": 1.0}]},
            }
        ],
    }
    path = root / "overnight.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


def routes_of(database_url: str) -> dict[str, Route]:
    engine = storage.make_engine(database_url)
    try:
        return read_routes(engine)
    finally:
        engine.dispose()


def seed_traffic(database_url: str, track: str, rows: int = 60) -> int:
    """`rows` interactions of the synthetic math traffic, logged under `track`; returns the last id."""
    engine = storage.make_engine(database_url)
    storage.upgrade(engine)
    records = [r for r in synthetic_traffic.generate_records(rows * 3, seed=7) if r["track"] == "math"][:rows]
    for index, record in enumerate(records):
        record.update(track=track, id=f"{track}-{index}")
    storage.log_interactions(engine, records)
    with Session(engine) as session:
        from storage.models import Interaction

        last = session.scalar(select(func.max(Interaction.id)).where(Interaction.track == track))
    engine.dispose()
    assert last is not None
    return last


def registry_for(root: Path) -> MlflowRegistry:
    return MlflowRegistry(f"sqlite:///{root / 'mlflow.db'}", cache_dir=root / "home" / "adapters")


def counts(database_url: str, track: str) -> dict[str, Any]:
    engine = storage.make_engine(database_url)
    with Session(engine) as session:
        runs = session.scalars(select(NightlyRun).where(NightlyRun.track == track)).all()
        result = {
            "runs": [(run.attempt, run.status) for run in runs],
            "stages": sorted(
                session.scalars(
                    select(RunStage.stage).where(
                        RunStage.run_id.in_([run.id for run in runs]), RunStage.status == "done"
                    )
                ).all()
            ),
            "snapshots": session.scalar(
                select(func.count()).select_from(Snapshot).where(Snapshot.track == track)
            ),
            "committed": session.scalar(
                select(func.count())
                .select_from(Snapshot)
                .where(Snapshot.track == track, Snapshot.committed_at.is_not(None))
            ),
            "deployments_ok": session.scalar(
                select(func.count())
                .select_from(Deployment)
                .where(Deployment.track == track, Deployment.status == "ok")
            ),
            "watermark": session.scalar(select(Watermark.last_id).where(Watermark.track == track)),
        }
    engine.dispose()
    return result


def test_a_night_promotes_registers_and_hot_swaps_then_is_not_repeated(
    tmp_path: Path, database_url: str, vllm_server: Any, tiny_model_dir: Path
) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.nightly import nightly

    track = f"nightly-{database_url.split(':')[0].split('+')[0]}"
    config = write_config(
        tmp_path, track=track, database_url=database_url, server=vllm_server, model_dir=tiny_model_dir
    )
    last_id = seed_traffic(database_url, track)
    with prefect_test_harness(server_startup_timeout=120):
        summary = nightly(config_path=str(config), night=NIGHT)
        (entry,) = summary["tracks"]
        assert entry["status"] == "promoted", entry
        assert entry["version"] == 1 and entry["deployed"] is True
        assert entry["train"]["steps"] == 2 and entry["train"]["stop_reason"] == "max_steps"
        names = {gate["name"] for gate in entry["gate"]["gates"]}
        assert {"heldout_gain", "kl_to_base", "reward_hacking"} <= names
        assert {name for name in names if name.startswith("degeneration/")} == {
            f"degeneration/{name}" for name in ("repetition", "distinct", "identical", "length_ratio")
        }
        assert entry["gate"]["backend"] == "vllm"
        again = nightly(config_path=str(config), night=NIGHT)
        assert again["tracks"][0]["already_done"] is True and again["tracks"][0]["status"] == "promoted"

    registry = registry_for(tmp_path)
    (version,) = registry.versions(track)
    assert version.version == 1 and "champion" in version.aliases
    assert version.tags["stop_reason"] == "max_steps" and version.tags["gate"] == "passed"
    (state,) = serving_state([vllm_server.base_url], routes_of(database_url), [track])
    assert state.serving[track] == 1  # the route sends the stable name to v1, loaded on the server
    seen = counts(database_url, track)
    assert seen["runs"] == [(1, "promoted")] and seen["stages"] == sorted(STAGES)
    assert seen["committed"] == 1 and seen["watermark"] == last_id and seen["deployments_ok"] == 1
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"overnight-{track}")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.metrics["gate/passed"] == 1.0 and run.info.status == "FINISHED"
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "gate.md", "gate.json", "plots", "rubric.md"} <= artifacts


def run_cli(config: Path, env: dict[str, str], logs: Path) -> tuple[int, str, str]:
    """`overnight run` in its own process group; whatever it started is killed with it afterwards,
    as a machine restart would (the ephemeral Prefect API server outlives an abruptly killed parent)."""
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "-c",
                str(config),
                "run",
                "--night",
                NIGHT,
                "--wait",
                "--json",
            ],
            env=env,
            stdout=stdout,
            stderr=stderr,
            cwd=Path(__file__).resolve().parents[2],
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return code, out.read_text(), err.read_text()


def test_killed_in_each_stage_in_turn_the_night_resumes_and_completes_exactly_once(
    tmp_path: Path, vllm_server: Any, tiny_model_dir: Path
) -> None:
    track = "killed"
    database_url = f"sqlite:///{tmp_path / 'store.db'}"
    config = write_config(
        tmp_path, track=track, database_url=database_url, server=vllm_server, model_dir=tiny_model_dir
    )
    last_id = seed_traffic(database_url, track)
    base_env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    base_env.pop("PREFECT_API_URL", None)
    for stage in STAGES:
        code, _, stderr = run_cli(
            config, {**base_env, "OVERNIGHT_CRASH_AT": stage}, tmp_path / f"crash-{stage}"
        )
        assert code == 137, f"{stage}: exit {code}\n{stderr[-3000:]}"
        done = counts(database_url, track)["stages"]
        assert stage not in done, f"{stage} was recorded although the process died before recording it"
    code, stdout, stderr = run_cli(config, base_env, tmp_path / "final")
    assert code == 0, stderr[-3000:]
    (entry,) = json.loads(stdout)["tracks"]
    # The last crash came after the commit stage's side effects: the night had already finished.
    assert entry["status"] == "promoted" and entry["version"] == 1

    seen = counts(database_url, track)
    assert seen["runs"] == [(1, "promoted")]
    assert seen["snapshots"] == 1 and seen["committed"] == 1 and seen["watermark"] == last_id
    assert seen["deployments_ok"] == 1
    assert [v.version for v in registry_for(tmp_path).versions(track)] == [1]
    client = mlflow_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"overnight-{track}")
    assert experiment is not None
    assert len(client.search_runs([experiment.experiment_id], filter_string="tags.night = '2026-11-21'")) == 1


def test_deploy_then_rollback_through_the_cli_and_the_rollback_flow(
    tmp_path: Path, vllm_server: Any, tiny_model_dir: Path
) -> None:
    """Two registered versions: `overnight deploy` serves v2 and moves the aliases after the swap;
    the Prefect rollback flow serves v1 again and moves them back."""
    from prefect.testing.utilities import prefect_test_harness
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.rollback import rollback
    from tests.serving_fixtures import distinct_adapters

    track = "released"
    database_url = f"sqlite:///{tmp_path / 'store.db'}"
    config = write_config(
        tmp_path, track=track, database_url=database_url, server=vllm_server, model_dir=tiny_model_dir
    )
    storage.upgrade(storage.make_engine(database_url))
    registry = registry_for(tmp_path)
    v1, v2 = distinct_adapters(tiny_model_dir, tmp_path / "made", track, [1, 2])
    assert registry.register(track, v1.path, run_id=None, tags={}) == 1
    runner = CliRunner()
    first = runner.invoke(app, ["-c", str(config), "deploy", track, "1", "--json"])
    assert first.exit_code == 0, first.output
    assert registry.register(track, v2.path, run_id=None, tags={}) == 2
    assert registry.version_for(track, "challenger") == 2

    second = runner.invoke(app, ["-c", str(config), "deploy", track, "2", "--json"])
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["previous"] == 1
    assert (registry.version_for(track, "champion"), registry.version_for(track, "previous")) == (2, 1)
    assert serving_state([vllm_server.base_url], routes_of(database_url), [track])[0].serving[track] == 2

    with prefect_test_harness(server_startup_timeout=120):
        result = rollback(track, config_path=str(config))
    assert result["version"] == 1 and result["action"] == "rollback"
    assert (registry.version_for(track, "champion"), registry.version_for(track, "previous")) == (1, 2)
    assert serving_state([vllm_server.base_url], routes_of(database_url), [track])[0].serving[track] == 1

    status = runner.invoke(app, ["-c", str(config), "status", "--json"])
    (entry,) = json.loads(status.stdout)["tracks"]
    assert entry["champion"] == 1 and entry["previous"] == 2
    assert entry["serving"] == {vllm_server.base_url: 1}


def test_a_failing_stage_fails_its_track_only_and_says_why(tmp_path: Path, tiny_model_dir: Path) -> None:
    """An unreachable source database fails `harvest` for its track with the one-line reason; the
    other track's night still runs, and the failed night is retried (same attempt) next time."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.nightly import nightly

    database_url = f"sqlite:///{tmp_path / 'store.db'}"

    class Down:  # no server: candidates would be registered, not deployed
        class spec:
            served_name = "base"

        base_url = "http://127.0.0.1:9"

    config = write_config(
        tmp_path, track="healthy", database_url=database_url, server=Down, model_dir=tiny_model_dir
    )
    settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    broken = dict(settings["tracks"][0], name="broken")
    broken["harvest"] = {
        "source": {
            "url": "postgresql+psycopg://nobody@127.0.0.1:1/nothing",
            "query": "SELECT * FROM logs WHERE ts > :since AND ts <= :until",
        }
    }
    settings["tracks"].append(broken)
    settings["train"]["max_steps"] = 1
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    seed_traffic(database_url, "healthy", rows=30)
    with prefect_test_harness(server_startup_timeout=120):
        summary = nightly(config_path=str(config), night=NIGHT)
    entries = {entry["track"]: entry for entry in summary["tracks"]}
    assert entries["broken"]["status"] == "failed"
    assert "127.0.0.1:1" in entries["broken"]["error"] and "\n" not in entries["broken"]["error"]
    assert entries["healthy"]["status"] in {"registered", "rejected", "skipped"}
    seen = counts(database_url, "broken")
    assert seen["runs"] == [(1, "failed")] and seen["stages"] == [] and seen["watermark"] is None
    engine = storage.make_engine(database_url)
    with Session(engine) as session:
        (stage,) = session.scalars(
            select(RunStage).join(NightlyRun).where(NightlyRun.track == "broken")
        ).all()
        assert (
            stage.stage == "harvest" and stage.status == "failed" and "127.0.0.1:1" in stage.detail["error"]
        )
    from storage import runs as ledger

    again, finished = ledger.open_run(engine, "broken", NIGHT)
    assert finished is None and ledger.get_run(engine, again).attempt == 1
