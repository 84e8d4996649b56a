"""`overnight demo` end to end: its own vLLM server, two nights of traffic, harvest and judge."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.deploy.vllm_process import vllm_installed

pytestmark = pytest.mark.integration


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if not vllm_installed():
        if os.environ.get("OVERNIGHT_REQUIRE_VLLM") == "1":
            pytest.fail("vLLM is not installed (OVERNIGHT_REQUIRE_VLLM=1)")
        pytest.skip("vLLM is not installed")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_demo_runs_two_nights_and_promotes_at_least_once(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--nights", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [night["night"] for night in summary["nights"]] == [1, 2]
    second = summary["nights"][1]
    assert second["ingest"]["accepted"] > 0 and second["ingest"]["quarantined"] > 0
    entries = [entry for night in summary["nights"] for entry in night["tracks"]]
    assert {entry["status"] for entry in entries} <= {"promoted", "rejected", "skipped"}
    promoted = [entry for entry in entries if entry["status"] == "promoted"]
    assert promoted, [(e["track"], e["status"]) for e in entries]
    # A promotion is a real learning step: the held-out reward's lower bound rose above the champion's.
    for entry in promoted:
        gain = {gate["name"]: gate for gate in entry["gate"]["gates"]}["heldout_gain"]
        assert gain["ci_low"] > 0 and entry["deployed"] is True
    # The support track was judged by the LLM judge served by vLLM (its reward exists every night).
    support = [entry for entry in entries if entry["track"] == "support"]
    assert len(support) == 2 and all(entry["mean_reward"] is not None for entry in support)
    # Night 2 is guarded by the memory suite built from night 1.
    night2_gates = {g["name"] for e in second["tracks"] for g in ((e.get("gate") or {}).get("gates") or [])}
    assert any(name.startswith("suite/memory-") for name in night2_gates)
    # After the last night each stable name answered through the server; a promoted track by its adapter.
    answers = {answer["track"]: answer for answer in summary["answers"]}
    assert set(answers) == {"support", "math"} and all(a["answer"] for a in answers.values())
    for entry in promoted:
        assert answers[entry["track"]]["served_by"] == entry["track"]
    assert (workdir / ".overnight/demo/tiny-model/config.json").exists()
    assert (workdir / ".overnight/demo/mlflow.db").exists()
