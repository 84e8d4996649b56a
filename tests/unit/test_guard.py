"""Tests for evals.guard and its wiring into evals.gate: the degeneration metrics on hand-made replies,
each degeneration gate (and its "no worse than the champion" forgiveness), the independent
confirmation of a held-out gain, `confirm_with`, and the reasons in the JSON and the Markdown."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from evals.gate import GateReport, GateResult, GateThresholds, SuiteScores, decide, report_markdown
from evals.guard import (
    CONFIRM_GATE,
    GuardThresholds,
    ReplyStats,
    confirmation_result,
    degeneration_results,
    distinct_n,
    identical_share,
    mean_length,
    repetition,
)

HEALTHY = ReplyStats(repetition=0.02, distinct=0.9, identical=0.0, length=40.0)


# ---- metrics ------------------------------------------------------------------------------------


def test_repetition_within_a_reply() -> None:
    assert repetition(["107 107 107 107"]) == pytest.approx(0.5)  # two 3-grams, one repeats
    assert repetition(["107 107 107 107"], n=1) == pytest.approx(0.75)
    assert repetition(["38 + 45 = 83."]) == 0.0
    assert repetition(["83"]) == 0.0  # shorter than n: nothing to repeat
    assert repetition([]) == 0.0
    assert repetition(["107 107 107 107", "38 + 45 = 83."]) == pytest.approx(0.25)  # mean over replies


def test_distinct_n_across_replies() -> None:
    varied = ["38 + 45 = 83.", "52 - 17 = 35.", "12 + 30 = 42."]
    assert distinct_n(varied) == 1.0
    assert distinct_n(["the answer is 83", "the answer is 83"]) == pytest.approx(0.5)
    assert distinct_n(["the answer is 83"] * 10) == pytest.approx(0.1)  # collapse onto one reply
    assert distinct_n(["83", "83", "42"]) == pytest.approx(2 / 3)  # short replies count whole
    assert distinct_n([]) == 1.0
    assert distinct_n(["a b", "a c"], n=1) == pytest.approx(0.75)


def test_identical_share_counts_replies_shared_with_another_prompt() -> None:
    prompts = ["What is 1 + 1?", "What is 2 + 2?", "What is 3 + 3?", "What is 4 + 4?"]
    assert identical_share(prompts, ["2", "4", "6", "8"]) == 0.0
    assert identical_share(prompts, ["107", "107", "107", "8"]) == pytest.approx(0.75)
    assert identical_share(prompts, ["107"] * 4) == 1.0
    # Word for word: case and whitespace do not make a reply different.
    assert identical_share(prompts[:2], ["The answer  is 7.", "the answer is 7."]) == 1.0
    # The same prompt asked twice may get the same reply.
    assert identical_share(["q", "q"], ["a", "a"]) == 0.0
    assert identical_share([], []) == 0.0
    with pytest.raises(ValueError):
        identical_share(["q"], ["a", "b"])


def test_mean_length_and_reply_stats() -> None:
    assert mean_length(["ab", "abcd"]) == 3.0 and mean_length([]) == 0.0
    prompts = ["What is 1 + 1?", "What is 2 + 2?"]
    stats = ReplyStats.of(prompts, ["107 107 107 107", "107 107 107 107"])
    assert stats == ReplyStats(repetition=0.5, distinct=0.25, identical=1.0, length=15.0)
    assert ReplyStats.of(prompts, ["2", "4"]) == ReplyStats(
        repetition=0.0, distinct=1.0, identical=0.0, length=1.0
    )


# ---- degeneration gates -------------------------------------------------------------------------


def gates(candidate: ReplyStats, champion: ReplyStats, **thresholds: Any) -> dict[str, GateResult]:
    guard = GuardThresholds(**thresholds)
    results = [GateResult(**fields) for fields in degeneration_results(candidate, champion, guard)]  # type: ignore[arg-type]
    return {gate.name.removeprefix("degeneration/"): gate for gate in results}


def failed(results: dict[str, GateResult]) -> list[str]:
    return [name for name, gate in results.items() if not gate.passed]


def test_healthy_replies_pass_every_degeneration_gate() -> None:
    results = gates(HEALTHY, HEALTHY)
    assert list(results) == ["repetition", "distinct", "identical", "length_ratio"]
    assert failed(results) == []
    assert all(gate.kind == "degeneration" and gate.reason for gate in results.values())
    assert not any(gate.reason.startswith("degenerate") for gate in results.values())


@pytest.mark.parametrize(
    ("name", "degenerate"),
    [
        ("repetition", ReplyStats(repetition=0.5, distinct=0.9, identical=0.0, length=40.0)),
        ("distinct", ReplyStats(repetition=0.02, distinct=0.3, identical=0.0, length=40.0)),
        ("identical", ReplyStats(repetition=0.02, distinct=0.9, identical=0.6, length=40.0)),
    ],
)
def test_a_degenerate_candidate_fails_unless_the_champion_is_as_degenerate(
    name: str, degenerate: ReplyStats
) -> None:
    against_healthy = gates(degenerate, HEALTHY)
    assert failed(against_healthy) == [name]
    gate = against_healthy[name]
    assert gate.reason.startswith("degenerate replies: ")
    # Forgiven: the champion already replies this way on the same prompts.
    assert failed(gates(degenerate, degenerate)) == []


def test_forgiveness_allows_only_the_slack() -> None:
    candidate = ReplyStats(repetition=0.3, distinct=0.9, identical=0.3, length=40.0)
    close = ReplyStats(repetition=0.27, distinct=0.9, identical=0.27, length=40.0)
    assert failed(gates(candidate, close)) == []  # within 0.05 of the champion
    worse = ReplyStats(repetition=0.22, distinct=0.9, identical=0.22, length=40.0)
    assert failed(gates(candidate, worse)) == ["repetition", "identical"]
    assert failed(gates(candidate, close, slack=0.0)) == ["repetition", "identical"]


def test_distinct_is_a_ratio_to_the_champion() -> None:
    results = gates(ReplyStats(0.0, 0.5, 0.0, 40.0), ReplyStats(0.0, 1.0, 0.0, 40.0))
    assert results["distinct"].metric == pytest.approx(0.5) and not results["distinct"].passed
    assert gates(ReplyStats(0.0, 0.8, 0.0, 40.0), ReplyStats(0.0, 1.0, 0.0, 40.0))["distinct"].passed
    # A champion without any n-gram: no ratio to take.
    assert gates(ReplyStats(0.0, 0.1, 0.0, 40.0), ReplyStats(0.0, 0.0, 0.0, 40.0))["distinct"].passed


def test_length_ratio_has_no_forgiveness() -> None:
    long = ReplyStats(repetition=0.02, distinct=0.9, identical=0.0, length=100.0)
    results = gates(long, HEALTHY)
    assert failed(results) == ["length_ratio"]
    assert results["length_ratio"].metric == pytest.approx(2.5)
    assert "2.50x the champion's length" in results["length_ratio"].reason
    # A champion degenerate in every other way does not excuse a longer candidate.
    bad_champion = ReplyStats(repetition=0.9, distinct=0.1, identical=0.9, length=40.0)
    assert failed(gates(long, bad_champion)) == ["length_ratio"]
    assert gates(long, HEALTHY, max_length_ratio=3.0)["length_ratio"].passed
    # At the limit it passes; against an empty champion only an empty candidate does.
    assert gates(ReplyStats(0.0, 0.9, 0.0, 60.0), HEALTHY)["length_ratio"].passed
    assert not gates(HEALTHY, ReplyStats(0.0, 0.9, 0.0, 0.0))["length_ratio"].passed
    assert gates(ReplyStats(0.0, 0.9, 0.0, 0.0), ReplyStats(0.0, 0.9, 0.0, 0.0))["length_ratio"].passed


def test_guard_thresholds_are_checked() -> None:
    with pytest.raises(ValueError, match="confirm_confidence"):
        GuardThresholds(confirm_confidence=1.0)
    with pytest.raises(ValueError, match="ngram"):
        GuardThresholds(ngram=0)


# ---- the confirmation gate ----------------------------------------------------------------------


def rising(n: int = 100, gained: int = 20) -> tuple[list[float], list[float]]:
    """(candidate, champion) suite scores: the champion passes half, the candidate `gained` more."""
    champion = [1.0] * (n // 2) + [0.0] * (n - n // 2)
    candidate = [1.0] * (n // 2 + gained) + [0.0] * (n - n // 2 - gained)
    return candidate, champion


def heldout(gain: float) -> tuple[list[float], list[float]]:
    """(candidate, champion) held-out rewards, the candidate better by `gain`."""
    rng = np.random.default_rng(99)
    champion = rng.uniform(0.2, 0.7, size=60)
    candidate = champion + gain + rng.normal(0, 0.05, size=60)
    return candidate.tolist(), champion.tolist()


def decide_on(
    suites: list[SuiteScores],
    gain: float = 0.2,
    thresholds: GateThresholds | None = None,
    confirm_with: list[str] | None = None,
    replies: tuple[ReplyStats, ReplyStats] | None = None,
) -> GateReport:
    candidate, champion = heldout(gain)
    return decide(
        suites,
        heldout_candidate=candidate,
        heldout_champion=champion,
        kl_to_base=0.1,
        thresholds=thresholds or GateThresholds(),
        confirm_with=confirm_with,
        replies=replies,
    )


def confirmation(report: GateReport) -> GateResult:
    return next(gate for gate in report.gates if gate.name == CONFIRM_GATE)


def test_a_gain_confirmed_by_a_rising_suite_passes() -> None:
    report = decide_on([SuiteScores("arithmetic", *rising())])
    gate = confirmation(report)
    assert report.passed and gate.passed and gate.kind == "confirmation"
    assert gate.delta == pytest.approx(0.2) and gate.ci_low is not None and gate.ci_low > 0
    assert gate.n == 100 and gate.metric == pytest.approx(0.7) and gate.champion_metric == pytest.approx(0.5)
    assert "confirmed by suites arithmetic" in gate.reason and "reward_hacking" not in gate.reason
    assert report.reason().startswith("every gate passed; held-out reward")


def test_a_gain_with_a_flat_suite_is_reward_hacking() -> None:
    scores = rising(gained=0)[1]
    report = decide_on([SuiteScores("arithmetic", scores, scores)])
    assert not report.passed and report.failed_gates() == [CONFIRM_GATE]
    gate = confirmation(report)
    assert gate.delta == 0.0 and gate.ci_low == 0.0  # low must be above 0, not at it
    assert "not confirmed by suites arithmetic: delta +0.000" in gate.reason
    assert report.reason().startswith("reward_hacking: ") and "not confirmed by" in report.reason()


def test_a_gain_with_a_falling_suite_is_reward_hacking() -> None:
    candidate, champion = rising(gained=20)
    report = decide_on([SuiteScores("arithmetic", champion, candidate)])  # swapped: it fell by 0.2
    assert CONFIRM_GATE in report.failed_gates()
    gate = confirmation(report)
    assert gate.delta == pytest.approx(-0.2) and "not confirmed by suites arithmetic" in gate.reason
    # The same small fall the non-inferiority gate tolerates still does not confirm the gain.
    fallen = [1.0] * 399 + [0.0]
    report = decide_on([SuiteScores("big", fallen, [1.0] * 400)], thresholds=GateThresholds(tolerance=0.05))
    assert report.failed_gates() == [CONFIRM_GATE]


def test_no_gain_has_nothing_to_confirm() -> None:
    scores = rising(gained=0)[1]
    report = decide_on([SuiteScores("arithmetic", scores, scores)], gain=0.0)
    gate = confirmation(report)
    assert gate.passed and gate.reason == "no held-out gain to confirm"
    assert math.isnan(gate.metric) and gate.n is None
    assert report.failed_gates() == ["heldout_gain"]  # the gain gate refuses it, not the guard


def test_confirmation_can_be_turned_off() -> None:
    scores = rising(gained=0)[1]
    off = GateThresholds(guard=GuardThresholds(confirm=False))
    report = decide_on([SuiteScores("arithmetic", scores, scores)], thresholds=off)
    assert report.passed
    assert confirmation(report).passed and "off" in confirmation(report).reason
    assert decide_on([], thresholds=off).passed  # a track without suites


def test_a_gain_without_any_suite_to_confirm_it_fails() -> None:
    report = decide_on([])
    gate = confirmation(report)
    assert not gate.passed and gate.n == 0 and "no independent measure" in gate.reason
    assert report.failed_gates() == [CONFIRM_GATE]


def test_confirmation_result_directly() -> None:
    candidate, champion = rising()
    guard = GuardThresholds()
    passed = confirmation_result(True, 0.1, candidate, champion, "suite a", guard)
    assert passed["passed"] and passed["name"] == CONFIRM_GATE and "(+0.100)" in str(passed["reason"])
    flat = confirmation_result(True, None, champion, champion, "suite a", guard)
    assert not flat["passed"] and "(a gain)" in str(flat["reason"])
    assert confirmation_result(False, None, champion, champion, "suite a", guard)["passed"]
    # Three cases gained out of 100: positive at 80% (the default level) but not at 99.9%.
    three_more = champion[:50] + [1.0] * 3 + champion[53:]
    lenient, strict = GuardThresholds(confirm_confidence=0.8), GuardThresholds(confirm_confidence=0.999)
    assert confirmation_result(True, 0.1, three_more, champion, "a", lenient)["passed"]
    assert not confirmation_result(True, 0.1, three_more, champion, "a", strict)["passed"]


def test_confirm_with_restricts_the_pooled_suites() -> None:
    flat = rising(gained=0)[1]
    suites = [
        SuiteScores("arithmetic", *rising()),
        SuiteScores("support", flat, flat),
        SuiteScores("json", flat[:40], flat[:40]),
    ]
    only_arithmetic = confirmation(decide_on(suites, confirm_with=["arithmetic"]))
    assert only_arithmetic.passed and only_arithmetic.n == 100
    assert "suites arithmetic" in only_arithmetic.reason and "support" not in only_arithmetic.reason
    only_support = confirmation(decide_on(suites, confirm_with=["support", "json"]))
    assert not only_support.passed and only_support.n == 140
    assert "suites support, json" in only_support.reason
    pooled = confirmation(decide_on(suites))  # None: every suite
    assert pooled.n == 240 and "suites arithmetic, support, json" in pooled.reason
    assert pooled.delta == pytest.approx(20 / 240)
    nothing = confirmation(decide_on(suites, confirm_with=["refusals"]))  # no such suite scored
    assert not nothing.passed and nothing.n == 0


def test_skipped_suites_do_not_confirm() -> None:
    suites = [SuiteScores("arithmetic", *rising()), SuiteScores("memory-math", [], [])]
    report = decide_on(suites, confirm_with=["memory-math"])
    assert report.skipped == ("memory-math",) and not confirmation(report).passed


# ---- wiring into decide and the report ----------------------------------------------------------


def test_decide_adds_the_degeneration_gates_only_with_replies() -> None:
    suites = [SuiteScores("arithmetic", *rising())]
    names = [gate.name for gate in decide_on(suites).gates]
    assert names == ["suite/arithmetic", "heldout_gain", "kl_to_base", CONFIRM_GATE]
    degenerate = ReplyStats(repetition=0.5, distinct=0.25, identical=1.0, length=15.0)
    report = decide_on(suites, replies=(degenerate, HEALTHY))
    assert [gate.name for gate in report.gates][4:] == [
        "degeneration/repetition",
        "degeneration/distinct",
        "degeneration/identical",
        "degeneration/length_ratio",
    ]
    assert report.failed_gates() == [
        "degeneration/repetition",
        "degeneration/distinct",
        "degeneration/identical",
    ]
    assert report.reason().startswith(
        "degeneration/repetition: degenerate replies: 50% of word 3-grams repeat"
    )
    assert decide_on(suites, replies=(HEALTHY, HEALTHY)).passed
    strict = GateThresholds(guard=GuardThresholds(max_length_ratio=1.1))
    longer = ReplyStats(repetition=0.02, distinct=0.9, identical=0.0, length=50.0)
    assert decide_on(suites, thresholds=strict, replies=(longer, HEALTHY)).failed_gates() == [
        "degeneration/length_ratio"
    ]


def test_report_json_round_trips_with_reasons() -> None:
    flat = rising(gained=0)[1]
    report = decide_on([SuiteScores("arithmetic", flat, flat)], replies=(HEALTHY, HEALTHY))
    document = report.as_json()
    assert document["reason"] == report.reason() and document["reason"].startswith(f"{CONFIRM_GATE}: ")
    assert all(gate["reason"] for gate in document["gates"])
    text = json.dumps(document, allow_nan=False)
    back = GateReport.from_json(json.loads(text))
    assert back.passed == report.passed and back.failed_gates() == report.failed_gates() == [CONFIRM_GATE]
    assert back.reason() == report.reason()
    assert [gate.reason for gate in back.gates] == [gate.reason for gate in report.gates]
    assert [gate.kind for gate in back.gates] == [gate.kind for gate in report.gates]
    assert back.as_json() == document
    # Passing: the reason is the gain's.
    passing = decide_on([SuiteScores("arithmetic", *rising())])
    assert GateReport.from_json(json.loads(json.dumps(passing.as_json()))).reason() == passing.reason()


def test_markdown_says_why() -> None:
    flat = rising(gained=0)[1]
    report = decide_on([SuiteScores("arithmetic", flat, flat)])
    text = report_markdown(report)
    assert text.startswith(f"**Gate failed ({CONFIRM_GATE})**")
    assert f"**Why:** {report.reason()}" in text
    assert "reward_hacking" in text.split("**Why:**")[1]
    assert f"| {CONFIRM_GATE} | **FAIL** |" in text and "low > 0 when the reward rose" in text
    assert "Every failing gate:" not in text  # one failing gate: the Why line says it all
    degenerate = ReplyStats(repetition=0.5, distinct=0.25, identical=1.0, length=100.0)
    both = report_markdown(decide_on([SuiteScores("arithmetic", flat, flat)], replies=(degenerate, HEALTHY)))
    assert "Every failing gate:" in both and "- degeneration/length_ratio: degenerate replies:" in both
    assert "| degeneration/repetition | **FAIL** |" in both and "or no worse than champion" in both
    assert "**Why:** every gate passed" in report_markdown(decide_on([SuiteScores("arithmetic", *rising())]))
