"""KTO, DPO and SFT for real, on the competent demo base: each learns from users' thumbs, each is
bounded and guarded like GRPO (its KL budget stops it; the forgetting guard refuses it when it learns
the labellers' mistake), and a night with one class of feedback only is skipped with the reason.

The feedback: the base answered tonight's arithmetic questions (sampled at temperature 1, so it
forgot some carries) and simulated users gave a thumb up to the right sums and a thumb down to the
wrong ones. With `on_policy` each method also ranks the champion's own samples by the track's reward
(the exact answer). What counts is the greedy accuracy on 200 held-out sums none of them saw: the
base answers 46% of them (its forgotten carries).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evals.arithmetic import ArithmeticGrader
from evals.gate import GateThresholds
from evals.graders import Sample, as_reward_function
from pipeline.demo_world import planted, skills
from pipeline.gate.evaluation import evaluate_candidate
from pipeline.gate.generation import Decoding, InProcessGenerator
from pipeline.results import TrainPrompt
from pipeline.train.recipe import TrainResult
from pipeline.train.stage import train

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3000)]

METHODS = ("kto", "dpo", "sft")
TRAIN, HELDOUT = planted.arithmetic_prompts(240, 200)
EXACT = ArithmeticGrader()
SETTINGS = planted.HACK_SETTINGS  # one pass at temperature 1, rank 8 on all linear layers, lr 1e-3
# Seen on 2 cores (base 0.46): KTO 0.645, DPO 0.635, SFT 0.69 after 21-30 steps of about 0.3 s.
MIN_GAIN = 0.08


@pytest.fixture(scope="module")
def generator(base_model_dir: Path) -> InProcessGenerator:
    return InProcessGenerator(str(base_model_dir), batch_size=64)


def accuracy(generator: InProcessGenerator, adapter: Path | None) -> float:
    replies = generator.replies(adapter, [p.messages for p in HELDOUT], Decoding(max_new_tokens=16))
    return sum(EXACT.score(Sample(p.messages, r)) for p, r in zip(HELDOUT, replies, strict=True)) / len(
        HELDOUT
    )


@pytest.fixture(scope="module")
def rated(generator: InProcessGenerator) -> list[TrainPrompt]:
    """Tonight's logged replies with the simulated users' thumbs (up: the right sum)."""
    replies = generator.replies(
        None, [p.messages for p in TRAIN], Decoding(max_new_tokens=16, temperature=1.0, seed=3)
    )
    rated = []
    for prompt, reply in zip(TRAIN, replies, strict=True):
        thumb = EXACT.score(Sample(prompt.messages, reply))
        rated.append(TrainPrompt(prompt.messages, response=reply, score=thumb, score_source="feedback"))
    ups = sum(1 for p in rated if p.score == 1.0)
    assert 0 < ups < len(rated), "the base must answer right some of the time, or there is nothing to learn"
    return rated


@pytest.fixture(scope="module")
def base_accuracy(generator: InProcessGenerator) -> float:
    return accuracy(generator, None)


def night(
    method: str, prompts: list[TrainPrompt], out_dir: Path, base_model_dir: Path, **settings: object
) -> TrainResult:
    return train(
        SETTINGS.model_copy(update={"method": method, **settings}),
        prompts,
        [as_reward_function(EXACT)],
        base_model=str(base_model_dir),
        out_dir=out_dir,
    )


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_from_thumbs_on_held_out_sums(
    method: str,
    rated: list[TrainPrompt],
    base_accuracy: float,
    generator: InProcessGenerator,
    base_model_dir: Path,
    tmp_path: Path,
) -> None:
    result = night(method, rated, tmp_path, base_model_dir)
    assert result.adapter_dir is not None, result.detail
    assert result.method == method and result.steps > 0
    assert result.stop_reason in ("completed", "max_steps")
    assert result.kl_to_champion is not None and result.kl_to_base is not None
    after = accuracy(generator, result.adapter_dir)
    print(
        f"\n{method}: {result.data}, {result.steps} steps in {result.wall_seconds:.1f}s: {base_accuracy:.3f} -> {after:.3f}"
    )
    assert after >= base_accuracy + MIN_GAIN, (
        f"{method}: held-out accuracy {base_accuracy:.3f} -> {after:.3f}"
    )
    metrics = result.metrics_path.read_text(encoding="utf-8").splitlines()
    assert len(metrics) == result.steps  # one line per step, with the probe's KL to the champion
    assert '"kl": null' not in metrics[-1]


@pytest.mark.parametrize("method", METHODS)
def test_each_method_stops_on_the_kl_budget(
    method: str, rated: list[TrainPrompt], base_model_dir: Path, tmp_path: Path
) -> None:
    result = night(method, rated, tmp_path, base_model_dir, kl_budget=1e-6)
    assert result.stop_reason == "kl_budget", result
    assert 0 < result.steps < 5
    assert result.adapter_dir is not None  # what it learned until then still goes to the gate


def test_one_class_of_thumbs_is_a_skipped_night_with_the_reason(
    rated: list[TrainPrompt], base_model_dir: Path, tmp_path: Path
) -> None:
    ups = [p for p in rated if p.score == 1.0]
    result = night("kto", ups, tmp_path, base_model_dir, on_policy=False)
    assert result.adapter_dir is None and result.steps == 0
    assert result.stop_reason == "too_little_data"
    assert result.detail is not None and result.detail.startswith(
        f"kto needs both desirable and undesirable replies: {len(ups)} desirable, 0 undesirable"
    )
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_on_the_labellers_mistake_is_refused_by_the_guard(
    method: str, generator: InProcessGenerator, base_model_dir: Path, tmp_path: Path
) -> None:
    """Each method ranking the base's samples by a reward model that learned its labellers' mistake
    (it pays for the sum with the carry forgotten, `planted.REWARDS["popular"]`) is refused by the same
    forgetting guard as GRPO on that reward (`test_reward_hacking`).

    Seen: SFT learns the mistaken preference (its held-out reward rises, +0.055) and the guard names
    it a hack: the rise is not confirmed by the arithmetic suite (-0.125); KTO and DPO drift further
    from both (arithmetic -0.23 and -0.21) and the suite refuses them."""
    popular = planted.REWARDS["popular"]
    result = train(
        SETTINGS.model_copy(update={"method": method}),
        TRAIN,
        [as_reward_function(popular)],
        base_model=str(base_model_dir),
        out_dir=tmp_path,
    )
    assert result.adapter_dir is not None, result.detail
    evaluation = evaluate_candidate(
        str(base_model_dir),
        result.adapter_dir,
        None,
        skills.demo_suites(),
        thresholds=GateThresholds(tolerance=0.05),  # the demo's margin
        generator=generator,
        scorer=planted.grader_scorer(popular),
        heldout=HELDOUT,
        decoding=Decoding(max_new_tokens=32),
        score_base=False,
        confirm_with=["demo-arithmetic"],
    )
    report = evaluation.report
    print(f"\n{method} on the labellers' mistake: {report.reason()}")
    failed = set(report.failed_gates())
    assert not report.passed and "suite/demo-arithmetic" in failed, failed
    if {gate.name: gate for gate in report.gates}["heldout_gain"].passed:  # it learned the mistake
        assert "reward_hacking" in failed
