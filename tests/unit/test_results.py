"""Stage results survive the run ledger's JSON: typed again on resume, infinite bounds included."""

import json
from pathlib import Path

from evals.gate import GateReport, GateResult
from pipeline.results import GateDecision, Harvested, Selected, Swap, Trained


def through_the_ledger(data: dict) -> dict:
    """What a JSON column gives back; `allow_nan=False` as PostgreSQL's JSONB refuses bare Infinity."""
    return json.loads(json.dumps(data, allow_nan=False))


def test_a_gate_decision_keeps_unbounded_intervals_and_prints_them_as_null() -> None:
    unbounded = GateResult(
        "heldout_gain", "gain", True, 0.6, 0.2, float("-inf"), float("inf"), 0.0, 3, "sign_flip"
    )
    decision = GateDecision.of(GateReport(True, (unbounded,), 0.95), backend="vllm", report_dir=Path("/r"))

    back = GateDecision.model_validate(through_the_ledger(decision.as_json()))

    assert back == decision
    assert back.report().gates[0].ci_low == float("-inf") and back.report().gates[0].ci_high == float("inf")
    printed = back.summary()["gates"][0]
    assert printed["ci_low"] is None and printed["ci_high"] is None  # the `overnight run --json` contract


def test_a_gate_decision_keeps_its_reasons_and_reads_its_cases(tmp_path: Path) -> None:
    gain = GateResult("heldout_gain", "gain", True, 0.6, 0.2, 0.1, 0.3, 0.0, 40, "bootstrap", reason="rose")
    hacking = GateResult(
        "reward_hacking", "confirmation", False, 0.5, 0.0, 0.0, 0.0, 0.0, 100, "bootstrap",
        reason="not confirmed by suites arithmetic",
    )  # fmt: skip
    off = GateResult("x", "confirmation", True, float("nan"), None, None, None, 0.0, None, None, reason="off")
    report = GateReport(False, (gain, hacking, off), 0.95)
    decision = GateDecision.of(report, backend="vllm", report_dir=tmp_path)

    back = GateDecision.model_validate(through_the_ledger(decision.as_json()))

    assert [gate.reason for gate in back.gates] == [
        "rose",
        "not confirmed by suites arithmetic",
        "off",
    ]
    assert back.report().reason() == "reward_hacking: not confirmed by suites arithmetic"
    summary = back.summary()
    assert summary["reason"] == back.report().reason() and summary["passed"] is False
    assert summary["gates"][2]["metric"] is None  # NaN printed as null
    assert back.cases() == []  # no cases.jsonl written
    rows = [
        {"suite": "arithmetic", "case": "add-1-2", "champion": "3", "candidate": "3"},
        {"suite": "held-out"},
    ]
    (tmp_path / "cases.jsonl").write_text(
        "\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8"
    )
    assert back.cases() == rows
    assert GateDecision(passed=False, skipped=True).cases() == []


def test_paths_and_nested_results_come_back_typed() -> None:
    harvested = Harvested(track="t", rows=3, read=4, sha256="ab", source="store", path=Path("/s/x.jsonl"),
                          window={"after_id": 0, "until_id": 4})  # fmt: skip
    selected = Selected(
        train=2, heldout=1, considered=3, unscored=0, train_path=Path("/a"), heldout_path=Path("/b")
    )
    trained = Trained(steps=2, stop_reason="max_steps", adapter_dir=Path("/ad"), kl=float("inf"))
    swap = Swap(track="t", version=2, action="deploy", endpoints=["e"], seconds=0.1, fingerprint="f",
                previous={"e": None})  # fmt: skip

    for result in (harvested, selected, trained, swap):
        back = type(result).model_validate(through_the_ledger(result.as_json()))
        assert back == result
    assert isinstance(Harvested.model_validate(through_the_ledger(harvested.as_json())).path, Path)
