"""`overnight demo` end to end on the competent base: its own vLLM server, two nights of traffic, the
math track learning from a verifiable reward under the guard, the support track learning from its
simulated users' thumbs (SFT on its own samples ranked by a reward model fitted to those thumbs)."""

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.deploy.vllm_process import vllm_installed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000)]  # builds the base when run first
USERS = 128


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if not vllm_installed():
        if os.environ.get("OVERNIGHT_REQUIRE_VLLM") == "1":
            pytest.fail("vLLM is not installed (OVERNIGHT_REQUIRE_VLLM=1)")
        pytest.skip("vLLM is not installed")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_demo_runs_two_nights_and_the_math_track_learns(workdir: Path, base_model_dir: Path) -> None:
    # The demo's base model is cached in its home: hand it the one this run built already.
    shutil.copytree(base_model_dir, workdir / ".overnight/demo/base-model")
    # 128 users a day rather than the demo's 256: the test checks the loop, the README the learning.
    result = CliRunner().invoke(app, ["demo", "--nights", "2", "--users", str(USERS), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [night["night"] for night in summary["nights"]] == [1, 2]
    assert summary["base_skills"]["demo-support"] >= 0.8
    second = summary["nights"][1]
    assert second["ingest"]["accepted"] > 0 and second["ingest"]["quarantined"] > 0
    entries = [entry for night in summary["nights"] for entry in night["tracks"]]
    assert {entry["status"] for entry in entries} <= {"promoted", "rejected", "skipped"}
    math = [entry for entry in entries if entry["track"] == "math"]
    print("\n" + "\n".join(f"math night {e['night']}: {e['status']}: {e['reason']}" for e in math))
    # The math track learns from the exact-answer reward: a night is promoted on a held-out gain the
    # arithmetic suite confirms, with no regression of the skills the base already had.
    promoted = [entry for entry in math if entry["status"] == "promoted"]
    assert promoted, [entry["reason"] for entry in math]
    for entry in promoted:
        gates = {gate["name"]: gate for gate in entry["gate"]["gates"]}
        assert gates["heldout_gain"]["ci_low"] > 0 and entry["deployed"] is True
        assert gates["reward_hacking"]["passed"] and gates["reward_hacking"]["delta"] > 0
        assert all(
            gates[f"suite/{name}"]["passed"]
            for name in ("demo-support", "demo-concise-support", "demo-json", "demo-refusals")
        )
    # A refused night names the gate and says why.
    assert all(entry["reason"].split(":")[0] for entry in math if entry["status"] == "rejected")
    # The support track learns from its users' feedback (SFT), with a reward model fitted to their
    # thumbs every night (its held-out agreement with them reported) ranking its own samples.
    support = [entry for entry in entries if entry["track"] == "support"]
    assert len(support) == 2 and all(entry["rows"] > 0 for entry in support)
    for entry in support:
        fitted = entry["train"].get("reward_model") or {}
        print(f"support night {entry['night']}: {entry['status']}: {entry['reason']}; reward model {fitted}")
        assert entry["train"]["method"] == "sft" and fitted.get("agreement") is not None, entry["train"]
        if entry["status"] == "promoted":  # a gain in sampled replies the users' preference confirms
            gates = {gate["name"]: gate for gate in entry["gate"]["gates"]}
            assert gates["heldout_gain"]["ci_low"] > 0 and gates["reward_hacking"]["passed"]
        else:
            assert entry["reason"]
    # Every day the simulated users chat with the support track through the gateway and rate the
    # replies; their exchanges and verdicts are in the store before the night harvests. They come
    # once more after the last night, to rate the champion it left.
    for users in [night["users"] for night in summary["nights"]] + [summary["users_after"]]:
        print(f"users: {users}")
        assert users["asked"] == USERS and users["failed"] == 0 and users["feedback_sent"] > 0
        assert 0.0 <= users["thumbs_up_rate"] <= 1.0
    # Night 2 is guarded by the memory suite built from night 1.
    night2_gates = {g["name"] for e in second["tracks"] for g in ((e.get("gate") or {}).get("gates") or [])}
    assert any(name.startswith("suite/memory-") for name in night2_gates)
    # After the last night the promoted math champion answers through the server.
    answers = {answer["track"]: answer for answer in summary["answers"]}
    assert set(answers) == {"support", "math"} and all(a["answer"] for a in answers.values())
    assert answers["math"]["served_by"] == "math"
    # Through the server, the promoted champion answers more unseen sums right than the base does.
    math_answers = answers["math"]
    print(f"\nmath through the server: {math_answers}")
    assert math_answers["asked"] == 200 and math_answers["right"] > math_answers["base_right"], math_answers
    assert (workdir / ".overnight/demo/suites/demo-arithmetic.jsonl").exists()
    assert (workdir / ".overnight/demo/mlflow.db").exists()
