"""NightRun on MLflow's own logging: batches past MLflow's per-call limits, log_dict, one-line errors.

Runs against an embedded MLflow store (SQLite in a tmp dir, local artifacts); one store per module,
one experiment per test.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline.register.mlflow_run import NightRun, TrackingError, mlflow_client

# MLflow 3.17's limits per log_batch request (mlflow.utils.validation); the SQL store refuses a
# request past them, so these tests fail unless MlflowClient.log_batch splits what NightRun passes.
PARAMS_PER_CALL = 100
METRICS_PER_CALL = 1000


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow_client(uri).search_experiments()  # creates the schema once for the module
    return uri


@pytest.fixture
def night(tracking_uri: str, tmp_path: Path) -> NightRun:
    return NightRun(
        tracking_uri, f"test-{uuid.uuid4().hex[:8]}", "night", artifact_location=str(tmp_path / "artifacts")
    )


def test_more_params_tags_and_metrics_than_one_request_takes_are_logged_in_full(night: NightRun) -> None:
    params = {f"p{index:03d}": index for index in range(PARAMS_PER_CALL * 2 + 50)}
    metrics = {f"m{index:04d}": index / 2 for index in range(METRICS_PER_CALL + 500)}
    tags = {f"t{index:03d}": "x" * 9000 for index in range(PARAMS_PER_CALL + 20)}
    with night:
        logged = night.log_params({**params, "judge": {"api_key": "sk-never-logged"}})
        night.log_metrics(metrics, step=3)
        night.set_tags(tags)

    run = mlflow_client(night.tracking_uri).get_run(night.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == logged == {key: str(value) for key, value in params.items()}
    assert run.data.metrics == metrics
    assert {key: len(value) for key, value in run.data.tags.items() if key in tags} == dict.fromkeys(
        tags, 8000
    )


def test_training_logs_step_metrics_and_the_file_but_no_plot(night: NightRun, tmp_path: Path) -> None:
    metrics_path = tmp_path / "metrics.jsonl"
    rows = [{"step": step, "reward_mean": step / 10, "kl": 0.01 * step} for step in range(1, 1201)]
    metrics_path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with night:
        assert night.log_training(metrics_path) == 1200  # 2400 metric values: past one request

    client = mlflow_client(night.tracking_uri)
    history = client.get_metric_history(night.run_id, "train/kl")
    assert [entry.step for entry in history] == list(range(1, 1201))
    artifacts = {item.path for item in client.list_artifacts(night.run_id)}
    assert artifacts == {"train"}  # `train/metrics.jsonl`; MLflow charts the curves, no plots/ folder


def test_json_and_yaml_artifacts_through_log_dict(night: NightRun, tmp_path: Path) -> None:
    value = {"b": [1, 2.5, None], "a": {"path": tmp_path}}
    with night:
        night.log_json("detail.json", value)
        night.log_json("detail.yaml", {"a": 1, "b": ["x"]})
        night.log_text("notes/rubric.md", "# rubric\n")

    client = mlflow_client(night.tracking_uri)
    download = tmp_path / "download"

    def read(name: str) -> str:
        return Path(client.download_artifacts(night.run_id, name, str(download))).read_text()

    assert json.loads(read("detail.json")) == {"b": [1, 2.5, None], "a": {"path": str(tmp_path)}}
    assert yaml.safe_load(read("detail.yaml")) == {"a": 1, "b": ["x"]}
    assert read("notes/rubric.md") == "# rubric\n"


def test_a_refused_write_is_one_line_naming_the_store(night: NightRun) -> None:
    with night:
        night.log_params({"lr": 0.1})
        with pytest.raises(TrackingError, match=r"^MLflow at sqlite:///.*: could not log params: ") as caught:
            night.log_params({"lr": 0.2})  # MLflow refuses to change a logged param
        assert "\n" not in str(caught.value)
    with pytest.raises(TrackingError, match="could not resume run"):
        NightRun(night.tracking_uri, night.experiment_name, "again").resume("0" * 32)


def test_the_gate_is_reviewable_on_the_run_page_and_its_cases_are_a_table(
    night: NightRun, tmp_path: Path
) -> None:
    from evals.gate import GateThresholds, SuiteScores, decide

    champion = [1.0] * 30 + [0.0] * 10
    report = decide(
        [SuiteScores("arithmetic", candidate=[0.0] * 10 + champion[10:], champion=champion)],
        heldout_candidate=[1.0] * 40,
        heldout_champion=[0.0] * 40,
        kl_to_base=0.1,
        thresholds=GateThresholds(),
    )
    cases = [
        {"suite": "arithmetic", "case": f"c{i}", "prompt": f"What is {i} + 1?", "champion": f"{i} + 1 = {i + 1}.",
         "candidate": "107 107 107", "champion_score": 1.0, "candidate_score": 0.0}
        for i in range(3)
    ]  # fmt: skip
    with night:
        night.log_gate(report, cases)
        night.log_gate(report, cases)  # a resumed night logs its gate again: the table is not doubled

    client = mlflow_client(night.tracking_uri)
    tags = client.get_run(night.run_id).data.tags
    assert tags["gate"] == "failed" and "suite/arithmetic" in tags["gate.failed"]
    assert tags["gate.reason"] == report.reason() and tags["gate.reason"].startswith("suite/arithmetic: ")
    description = tags["mlflow.note.content"]
    assert description.startswith("## Rejected: suite/arithmetic") and "| gate | result |" in description
    path = Path(client.download_artifacts(night.run_id, "gate/cases.json", str(tmp_path / "download")))
    table = json.loads(path.read_text())
    assert table["columns"][:5] == ["suite", "case", "prompt", "champion", "candidate"]
    assert [row[4] for row in table["data"]] == ["107 107 107"] * 3
