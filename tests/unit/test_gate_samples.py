"""The gate's sampled decoding: `samples` replies per suite case and held-out prompt, one seed each,
each case scored by their mean (what `gate.samples` buys: a gain in how often sampled replies are
good becomes measurable). Generation and the KL probe are faked; the scoring and pairing are real."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from evals.gate import GateThresholds
from evals.suites import case_from_json, suite_from_cases
from pipeline.gate import evaluation
from pipeline.gate.generation import Chat, Decoding
from pipeline.results import TrainPrompt

CANDIDATE, CHAMPION = Path("candidate"), Path("champion")
SUITE = suite_from_cases(
    "concise",
    [
        case_from_json(
            {
                "id": f"case-{index}",
                "messages": [{"role": "user", "content": f"question {index}"}],
                "grader": {"type": "contains", "substrings": ["right"], "max_chars": 10},
            }
        )
        for index in range(6)
    ],
)
HELDOUT = [TrainPrompt([{"role": "user", "content": f"held-out {index}"}]) for index in range(5)]


class SeededGenerator:
    """The candidate's sampled reply is right for 3 seeds of 4, the champion's for 1 of 4."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path | None, int, float]] = []

    def replies(self, adapter: Path | None, prompts: Sequence[Chat], decoding: Decoding) -> list[str]:
        self.calls.append((adapter, decoding.seed, decoding.temperature))
        right = decoding.seed % 4 != 0 if adapter == CANDIDATE else decoding.seed % 4 == 0
        return ["right" if right else "right, but far too long" for _ in prompts]


def scorer(conversations, replies, references, rubrics) -> list[float | None]:
    return [1.0 if reply == "right" else 0.0 for reply in replies]


@pytest.fixture(autouse=True)
def no_kl_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluation, "probe_kl", lambda *args, **kwargs: 0.0)


def evaluate(decoding: Decoding, generator: SeededGenerator) -> evaluation.Evaluation:
    return evaluation.evaluate_candidate(
        "base",
        CANDIDATE,
        CHAMPION,
        [SUITE],
        thresholds=GateThresholds(tolerance=0.05),
        generator=generator,
        scorer=scorer,
        heldout=HELDOUT,
        decoding=decoding,
        score_base=False,
        confirm_with=[],
    )


def test_sampled_decoding_averages_several_seeded_replies_per_case() -> None:
    generator = SeededGenerator()
    result = evaluate(Decoding(temperature=1.0, seed=8, samples=4), generator)
    assert sorted(seed for adapter, seed, _ in generator.calls if adapter == CANDIDATE) == [8, 9, 10, 11]
    assert sorted(seed for adapter, seed, _ in generator.calls if adapter == CHAMPION) == [8, 9, 10, 11]
    assert result.generated == 2 * 4 * (len(SUITE.cases) + len(HELDOUT))
    (suite,) = result.suites
    assert suite.candidate == [0.75] * 6 and suite.champion == [0.25] * 6
    assert result.heldout_candidate == [0.75] * 5 and result.heldout_champion == [0.25] * 5
    assert [row["candidate"] for row in result.cases][:1] == ["right, but far too long"]  # the first draw


def test_greedy_decoding_draws_once_whatever_samples_says() -> None:
    generator = SeededGenerator()
    result = evaluate(Decoding(temperature=0.0, seed=8, samples=4), generator)
    assert len(generator.calls) == 2
    assert result.suites[0].candidate == [0.0] * 6  # seed 8: the candidate's one draw is the long one


def test_a_failed_judgment_is_left_out_of_the_mean_and_all_failed_drops_the_pair() -> None:
    assert evaluation._mean_scores([[1.0, None, None], [0.0, 1.0, None]]) == [0.5, 1.0, None]
