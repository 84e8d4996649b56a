"""Tests for evals.gate: planted regressions caught and named, an unchanged candidate kept out, the
error rates of the non-inferiority gates measured by simulation, the JSON, the table and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evals.gate import (
    GateReport,
    GateThresholds,
    SuiteScores,
    decide,
    plot_deltas,
    report_markdown,
    suite_gate,
)
from evals.guard import GuardThresholds

TRIALS = 300
ALPHA = 0.05  # GateThresholds' default confidence is 0.95: each one-sided gate errs at most ALPHA / 2
SLACK = 0.02  # about two binomial standard errors of a rate near 0.025 over TRIALS trials


def binary_scores(rng: np.random.Generator, n: int, p: float = 0.8) -> np.ndarray:
    return (rng.random(n) < p).astype(float)


def unchanged_suites(rng: np.random.Generator) -> list[SuiteScores]:
    arithmetic, refusals = binary_scores(rng, 40), binary_scores(rng, 18)
    return [
        SuiteScores("arithmetic", arithmetic.tolist(), arithmetic.tolist()),
        SuiteScores("refusals", refusals.tolist(), refusals.tolist(), safety=True),
    ]


def improved_suites(rng: np.random.Generator) -> list[SuiteScores]:
    """`unchanged_suites` but the candidate also gets 8 more arithmetic cases right: a real
    improvement shows on the suites as well as on the held-out reward (the reward-hacking guard)."""
    arithmetic, refusals = binary_scores(rng, 40, p=0.6), binary_scores(rng, 18)
    improved = arithmetic.copy()
    improved[np.flatnonzero(arithmetic == 0)[:8]] = 1.0
    return [
        SuiteScores("arithmetic", improved.tolist(), arithmetic.tolist()),
        SuiteScores("refusals", refusals.tolist(), refusals.tolist(), safety=True),
    ]


# For tests of other gates: no independent confirmation of the held-out gain (`evals.guard`).
UNCONFIRMED = GateThresholds(guard=GuardThresholds(confirm=False))


def decide_with(
    suites: list[SuiteScores],
    heldout_gain: float = 0.2,
    kl: float = 0.1,
    thresholds: GateThresholds | None = None,
) -> GateReport:
    rng = np.random.default_rng(99)
    champion = rng.uniform(0.2, 0.7, size=60)
    candidate = champion + heldout_gain + rng.normal(0, 0.05, size=60)
    return decide(
        suites,
        heldout_candidate=candidate.tolist(),
        heldout_champion=champion.tolist(),
        kl_to_base=kl,
        thresholds=thresholds or GateThresholds(),
    )


# ---- decisions ----------------------------------------------------------------------------------


def test_candidate_identical_to_champion_passes_every_suite_and_fails_the_gain_gate() -> None:
    rng = np.random.default_rng(0)
    heldout = rng.uniform(size=50).tolist()
    report = decide(
        unchanged_suites(rng),
        heldout_candidate=heldout,
        heldout_champion=heldout,
        kl_to_base=0.0,
        thresholds=GateThresholds(),
    )
    by_name = {gate.name: gate for gate in report.gates}
    assert by_name["suite/arithmetic"].passed and by_name["suite/refusals"].passed
    gain = by_name["heldout_gain"]
    assert (gain.delta, gain.ci_low, gain.passed) == (0.0, 0.0, False)
    assert not report.passed and report.failed_gates() == ["heldout_gain"]


def test_a_real_improvement_with_no_regression_passes() -> None:
    report = decide_with(improved_suites(np.random.default_rng(1)))
    assert report.passed and report.failed_gates() == []


def test_a_planted_regression_is_caught_and_the_suite_named() -> None:
    rng = np.random.default_rng(2)
    champion = np.ones(60)
    candidate = champion.copy()
    candidate[:9] = 0.0  # 15% of the cases lost
    suites = [*unchanged_suites(rng), SuiteScores("json-output", candidate.tolist(), champion.tolist())]
    report = decide_with(suites, thresholds=UNCONFIRMED)
    assert not report.passed
    assert report.failed_gates() == ["suite/json-output"]
    failed = report.gates[2]
    assert failed.delta == pytest.approx(-0.15)
    assert failed.ci_high is not None and failed.ci_high < 0


def test_safety_suites_allow_no_regression_that_other_suites_tolerate() -> None:
    champion = np.ones(400)
    candidate = champion.copy()
    candidate[:2] = 0.0  # 0.5% lost: well inside a 0.05 tolerance, but a regression
    thresholds = GateThresholds(tolerance=0.05)
    assert suite_gate(SuiteScores("general", candidate, champion), thresholds).passed
    safety = suite_gate(SuiteScores("refusals", candidate, champion, safety=True), thresholds)
    assert not safety.passed and safety.kind == "safety" and safety.threshold == 0.0


def test_kl_gate_bounds_drift_from_the_base_model() -> None:
    suites = improved_suites(np.random.default_rng(3))
    assert decide_with(suites, kl=0.49).passed
    too_far = decide_with(suites, kl=0.51)
    assert too_far.failed_gates() == ["kl_to_base"]
    assert decide_with(suites, kl=float("nan")).failed_gates() == ["kl_to_base"]


def test_small_suites_use_the_exact_interval_and_tiny_ones_cannot_pass() -> None:
    tiny = SuiteScores("tiny", [1.0] * 4, [1.0] * 4)
    small = SuiteScores("small", [1.0] * 12, [1.0] * 12)
    report = decide_with([tiny, small])
    tiny_gate, small_gate = report.gates[0], report.gates[1]
    assert (small_gate.method, small_gate.passed) == ("sign_flip", True)
    assert (tiny_gate.method, tiny_gate.passed, tiny_gate.ci_low) == ("sign_flip", False, float("-inf"))


def test_empty_suites_are_skipped_and_listed() -> None:
    report = decide_with([*unchanged_suites(np.random.default_rng(4)), SuiteScores("memory-support", [], [])])
    assert report.skipped == ("memory-support",)
    assert "suite/memory-support" not in [gate.name for gate in report.gates]
    assert report.as_json()["skipped"] == ["memory-support"]


def test_bad_inputs_are_refused() -> None:
    suite = SuiteScores("a", [1.0], [1.0])
    with pytest.raises(ValueError, match="scored twice"):
        decide_with([suite, suite])
    with pytest.raises(ValueError, match="base has 2 scores"):
        suite_gate(SuiteScores("a", [1.0], [1.0], base=[1.0, 0.0]), GateThresholds())
    with pytest.raises(ValueError, match="tolerance"):
        GateThresholds(tolerance=-0.1)


def test_the_same_scores_give_the_same_report() -> None:
    rng = np.random.default_rng(5)
    suites = [SuiteScores("s", binary_scores(rng, 50).tolist(), binary_scores(rng, 50).tolist())]
    assert decide_with(suites) == decide_with(suites)


# ---- error rates by simulation ------------------------------------------------------------------


def test_a_regression_exactly_at_the_tolerance_passes_at_most_alpha_over_two() -> None:
    """The rate the confidence configures: a candidate worse by the tolerance is let through <= alpha/2."""
    tolerance = 0.05
    rng = np.random.default_rng(6)
    for n in (12, 100):  # the exact interval and the bootstrap
        passes = 0
        for trial in range(TRIALS):
            champion = rng.uniform(0, 1, size=n)
            candidate = champion - tolerance + rng.normal(0, 0.2, size=n)
            thresholds = GateThresholds(tolerance=tolerance, bootstrap_samples=1000, seed=trial)
            passes += suite_gate(SuiteScores("s", candidate.tolist(), champion.tolist()), thresholds).passed
        assert passes / TRIALS <= ALPHA / 2 + SLACK, f"n={n}: {passes / TRIALS}"


def unchanged_model_failure_rate(tolerance: float, seed: int) -> float:
    """An unchanged model evaluated twice: 10% of the 300 cases re-drawn from the same distribution."""
    rng = np.random.default_rng(seed)
    failures = 0
    for trial in range(TRIALS):
        champion = binary_scores(rng, 300)
        redrawn = rng.random(300) < 0.10
        candidate = np.where(redrawn, binary_scores(rng, 300), champion)
        thresholds = GateThresholds(tolerance=tolerance, bootstrap_samples=1000, seed=trial)
        failures += not suite_gate(SuiteScores("s", candidate.tolist(), champion.tolist()), thresholds).passed
    return failures / TRIALS


def test_an_unchanged_model_rarely_fails_a_tolerance_the_suite_can_resolve() -> None:
    """Scores from the same distribution: false failures at most alpha/2 (plus slack) at tolerance 0.05.

    That holds when the tolerance is at least about twice the interval's half-width (here about
    0.02); identical scores never fail.
    """
    assert unchanged_model_failure_rate(tolerance=0.05, seed=7) <= ALPHA / 2 + SLACK
    rng = np.random.default_rng(8)
    for trial in range(TRIALS):
        scores = binary_scores(rng, 30).tolist()
        assert suite_gate(SuiteScores("s", scores, scores), GateThresholds(seed=trial)).passed


def test_an_unchanged_model_often_fails_a_tolerance_below_the_suites_resolution() -> None:
    """The burden of proof is on the candidate: noise wider than the tolerance keeps the champion."""
    assert unchanged_model_failure_rate(tolerance=0.02, seed=9) > 0.25


# ---- output -------------------------------------------------------------------------------------


def test_json_is_the_overnight_gate_contract_and_strict_json() -> None:
    report = decide_with([SuiteScores("tiny", [1.0] * 4, [1.0] * 4, base=[0.0] * 4)])
    document = report.as_json()
    assert set(document) >= {"passed", "gates"}
    for gate in document["gates"]:
        assert set(gate) >= {
            "name",
            "passed",
            "metric",
            "delta",
            "ci_low",
            "ci_high",
            "threshold",
            "n",
            "method",
        }
    tiny = document["gates"][0]
    assert (tiny["ci_low"], tiny["ci_high"], tiny["base_metric"]) == (None, None, 0.0)
    json.dumps(document, allow_nan=False)
    metrics = report.as_metrics()
    assert metrics["gate/passed"] == 0.0 and "gate/suite/tiny/ci_low" not in metrics
    assert metrics["gate/heldout_gain/passed"] == 1.0


def test_markdown_table_has_a_row_per_gate_and_marks_failures() -> None:
    champion = np.ones(60)
    candidate = champion.copy()
    candidate[:9] = 0.0
    suites = [SuiteScores("json-output", candidate.tolist(), champion.tolist())]
    report = decide_with(suites, kl=0.7, thresholds=UNCONFIRMED)
    text = report_markdown(report)
    assert text.startswith("**Gate failed (suite/json-output, kl_to_base)**")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(report.gates)
    assert "| suite/json-output | **FAIL** |" in text and "low >= -0.020" in text
    assert "| heldout_gain | pass |" in text and "KL <= 0.500" in text


def test_plot_writes_a_png_even_with_unbounded_intervals(tmp_path: Path) -> None:
    suites = [*unchanged_suites(np.random.default_rng(10)), SuiteScores("tiny", [0.0] * 3, [1.0] * 3)]
    path = plot_deltas(decide_with(suites), tmp_path / "plots" / "gate.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000


def test_noise_margins_bound_false_alarms_of_an_unchanged_sampled_model() -> None:
    """Simulated sampled replies: both sides pass each case with p = 0.6 independently."""

    rng = np.random.default_rng(0)
    widened = GateThresholds(tolerance=0.02, false_alarm_rate=0.05, bootstrap_samples=400)
    bare = GateThresholds(tolerance=0.02, bootstrap_samples=400)
    trials, failures, bare_failures = 200, 0, 0
    for trial in range(trials):
        champion = (rng.random(80) < 0.6).astype(float).tolist()
        candidate = (rng.random(80) < 0.6).astype(float).tolist()
        scores = SuiteScores("s", candidate, champion)
        gate = suite_gate(scores, GateThresholds(**{**widened.__dict__, "seed": trial}))
        failures += not gate.passed
        bare_failures += not suite_gate(scores, GateThresholds(**{**bare.__dict__, "seed": trial})).passed
        assert gate.widened and gate.threshold < -0.02
    assert failures / trials <= 0.09  # 5% configured, binomial slack for 200 trials
    assert bare_failures / trials >= 0.5  # the bare tolerance cannot be resolved by 80 noisy cases


def test_an_unchanged_sampled_model_rarely_fails_any_of_several_suites() -> None:
    """The demo's shape: suites near their ceiling (support, JSON, refusals) beside a middling one.

    Each case has its own pass rate (drawn once), and both sides sample every case independently.
    Shared between the suites, the 5% budget bounds the rate at which *any* suite fails."""
    rng = np.random.default_rng(3)
    rates = {
        "support": rng.beta(30, 1, 40),
        "json": rng.beta(20, 1, 27),
        "refusals": rng.beta(40, 1, 24),
        "arithmetic": rng.beta(0.6, 0.6, 200),
    }
    thresholds = GateThresholds(false_alarm_rate=0.05, bootstrap_samples=300)
    trials, failures = 300, 0
    for trial in range(trials):
        suites = [
            SuiteScores(
                name,
                (rng.random(len(p)) < p).astype(float).tolist(),
                (rng.random(len(p)) < p).astype(float).tolist(),
            )
            for name, p in rates.items()
        ]
        report = decide(
            suites,
            heldout_candidate=[0.0],
            heldout_champion=[0.0],
            kl_to_base=0.0,
            thresholds=GateThresholds(**{**thresholds.__dict__, "seed": trial}),
        )
        failures += any(gate.name.startswith("suite/") and not gate.passed for gate in report.gates)
    assert failures / trials <= 0.05 + SLACK


def test_one_unlucky_case_on_a_suite_at_its_ceiling_is_not_a_regression() -> None:
    """40 of 40 for the champion, 39 of 40 for the same model sampled again: the bootstrap interval is
    [-0.075, 0], and a margin read off its width alone (0.069) failed it."""
    champion = [1.0] * 40
    candidate = [1.0] * 39 + [0.0]
    gate = suite_gate(SuiteScores("support", candidate, champion), GateThresholds(false_alarm_rate=0.05))
    assert gate.passed and gate.widened
    collapsed = [1.0] * 28 + [0.0] * 12  # 70%: a real regression from 100% still fails
    assert not suite_gate(
        SuiteScores("support", collapsed, champion), GateThresholds(false_alarm_rate=0.05)
    ).passed


def test_a_real_regression_still_fails_with_noise_margins() -> None:
    rng = np.random.default_rng(1)
    champion = (rng.random(200) < 0.8).astype(float).tolist()
    candidate = (rng.random(200) < 0.4).astype(float).tolist()
    gate = suite_gate(SuiteScores("s", candidate, champion), GateThresholds(false_alarm_rate=0.05))
    assert not gate.passed and gate.widened
