"""On-policy distillation for real, on the competent demo base: the demo's teacher (a larger model
grown from the base and trained on to full arithmetic competence) grades every token of the student's own replies, and the student's
greedy accuracy on 200 held-out sums rises; the night is bounded (its KL budget stops it) and
guarded like GRPO (distilled from a teacher that knows nothing, the forgetting guard refuses it).

The same teacher served by a real vLLM server (its OpenAI-compatible API, `prompt_logprobs`) teaches
through `train.teacher.base_url` too; a student with another tokenizer, or a model the endpoint does
not serve, is refused before anything trains. The teacher's server runs without LoRA
(`ServerSpec.enable_lora`): vLLM 0.32's CPU engine fails on batched prompt log-probabilities with
LoRA enabled."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evals.arithmetic import ArithmeticGrader
from evals.gate import GateThresholds
from evals.graders import Sample, as_reward_function
from pipeline.config import TeacherConfig
from pipeline.demo_world import planted, skills
from pipeline.demo_world.base_model import read_stamp
from pipeline.gate.evaluation import evaluate_candidate
from pipeline.gate.generation import Decoding, InProcessGenerator
from pipeline.train.distill import TeacherMismatch, check_teacher
from pipeline.train.recipe import TrainResult
from pipeline.train.stage import train
from tests.conftest import serve_vllm

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(3000)]

TRAIN, HELDOUT = planted.arithmetic_prompts(240, 200)
EXACT = ArithmeticGrader()
SETTINGS = planted.HACK_SETTINGS  # one pass at temperature 1, rank 8 on all linear layers, lr 1e-3
MIN_GAIN = 0.08


@pytest.fixture(scope="module")
def generator(base_model_dir: Path) -> InProcessGenerator:
    return InProcessGenerator(str(base_model_dir), batch_size=64)


def accuracy(generator: InProcessGenerator, adapter: Path | None) -> float:
    replies = generator.replies(adapter, [p.messages for p in HELDOUT], Decoding(max_new_tokens=16))
    return sum(EXACT.score(Sample(p.messages, r)) for p, r in zip(HELDOUT, replies, strict=True)) / len(
        HELDOUT
    )


def distill(
    teacher: Path | TeacherConfig, out_dir: Path, base_model_dir: Path, **settings: object
) -> TrainResult:
    if isinstance(teacher, Path):
        teacher = TeacherConfig(path=str(teacher))
    return train(
        SETTINGS.model_copy(update={"method": "distill", "teacher": teacher, **settings}),
        TRAIN,
        [as_reward_function(EXACT)],  # the gate's reward; distillation learns from the teacher alone
        base_model=str(base_model_dir),
        out_dir=out_dir,
    )


def test_the_teacher_knows_more_arithmetic_than_the_base(
    base_model_dir: Path, teacher_model_dir: Path
) -> None:
    base, teacher = read_stamp(base_model_dir), read_stamp(teacher_model_dir)
    assert base is not None and teacher is not None
    print(f"\nbase {base['skills']}\nteacher {teacher['skills']}")
    print(f"parameters: base {base['parameters']:,}, teacher {teacher['parameters']:,}")
    assert teacher["parameters"] > 1.25 * base["parameters"]  # the larger model, grown from the base
    assert teacher["skills"]["demo-arithmetic"] >= base["skills"]["demo-arithmetic"] + 0.2
    for skill in ("demo-support", "demo-json", "demo-refusals"):
        assert teacher["skills"][skill] >= base["skills"][skill] - 0.05, skill


def test_distillation_raises_held_out_accuracy(
    generator: InProcessGenerator, base_model_dir: Path, teacher_model_dir: Path, tmp_path: Path
) -> None:
    before = accuracy(generator, None)
    result = distill(teacher_model_dir, tmp_path, base_model_dir)
    assert result.adapter_dir is not None and result.method == "distill" and result.steps > 0
    assert result.stop_reason in ("completed", "max_steps")
    assert result.kl_to_champion is not None and result.kl_to_base is not None
    after = accuracy(generator, result.adapter_dir)
    print(f"\ndistill: {result.steps} steps in {result.wall_seconds:.1f}s: {before:.3f} -> {after:.3f}")
    assert after >= before + MIN_GAIN, f"held-out accuracy {before:.3f} -> {after:.3f}"
    metrics = result.metrics_path.read_text(encoding="utf-8").splitlines()
    assert len(metrics) == result.steps  # one line per step, with the probe's KL to the champion
    assert '"kl": null' not in metrics[-1] and '"loss": null' not in metrics[-1]


def test_distillation_stops_on_the_kl_budget(
    base_model_dir: Path, teacher_model_dir: Path, tmp_path: Path
) -> None:
    result = distill(teacher_model_dir, tmp_path, base_model_dir, kl_budget=1e-6)
    assert result.stop_reason == "kl_budget", result
    assert 0 < result.steps < 5
    assert result.adapter_dir is not None  # what it learned until then still goes to the gate


def test_distilled_from_a_teacher_that_knows_nothing_is_refused_by_the_guard(
    generator: InProcessGenerator, base_model_dir: Path, tmp_path: Path
) -> None:
    """The base's architecture and tokenizer with fresh random weights: a teacher that passes every
    check but teaches noise. What the student learns from it the suites refuse, as they refuse a
    reward hack."""
    from transformers import AutoConfig, AutoModelForCausalLM

    noise = tmp_path / "noise-teacher"
    shutil.copytree(base_model_dir, noise)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_model_dir))
    model.save_pretrained(noise)
    result = distill(noise, tmp_path / "student", base_model_dir, kl_budget=50.0)
    assert result.adapter_dir is not None, result.detail
    evaluation = evaluate_candidate(
        str(base_model_dir),
        result.adapter_dir,
        None,
        skills.demo_suites(),
        thresholds=GateThresholds(tolerance=0.05),  # the demo's margin
        generator=generator,
        scorer=planted.grader_scorer(EXACT),
        heldout=HELDOUT,
        decoding=Decoding(max_new_tokens=32),
        score_base=False,
        confirm_with=["demo-arithmetic"],
    )
    report = evaluation.report
    print(f"\ndistilled from noise: {report.reason()}")
    assert not report.passed and "suite/demo-arithmetic" in set(report.failed_gates())


@pytest.fixture(scope="module")
def teacher_server(teacher_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The demo's teacher served by vLLM (without LoRA), as a platform serves its big model."""
    yield from serve_vllm(tmp_path_factory, "teacher-server", model=str(teacher_model_dir), served_name="teacher",
                          max_model_len=1024, enable_lora=False)  # fmt: skip


def test_distillation_from_a_served_teacher_raises_held_out_accuracy(
    generator: InProcessGenerator, teacher_server: Any, base_model_dir: Path, tmp_path: Path
) -> None:
    teacher = TeacherConfig(base_url=teacher_server.base_url, model="teacher", max_retries=1)
    check_teacher(teacher, str(base_model_dir))  # served, gives log-probabilities, the same tokenizer
    before = accuracy(generator, None)
    result = distill(teacher, tmp_path, base_model_dir)
    assert result.adapter_dir is not None and result.method == "distill"
    after = accuracy(generator, result.adapter_dir)
    steps = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    estimates = [step["preference"]["teacher_reverse_kl"] for step in steps]
    print(f"\ndistill from {teacher.where}: {result.steps} steps in {result.wall_seconds:.1f}s: "
          f"{before:.3f} -> {after:.3f}; reverse-KL estimate {estimates[0]:.3f} -> {estimates[-1]:.3f}")  # fmt: skip
    assert len(estimates) == result.steps > 0
    assert after >= before + MIN_GAIN, f"held-out accuracy {before:.3f} -> {after:.3f}"


def test_a_student_with_another_tokenizer_is_refused_by_the_served_teacher(
    teacher_server: Any, tiny_model_dir: Path
) -> None:
    teacher = TeacherConfig(base_url=teacher_server.base_url, model="teacher")
    with pytest.raises(TeacherMismatch) as caught:
        check_teacher(teacher, str(tiny_model_dir))  # the tiny model's tokenizer is not the demo's
    message = str(caught.value)
    assert message.startswith(f"teacher teacher at {teacher_server.base_url}/v1 ") and "\n" not in message
    assert "tokenizer" in message


def test_a_model_the_endpoint_does_not_serve_is_refused(teacher_server: Any, base_model_dir: Path) -> None:
    teacher = TeacherConfig(base_url=teacher_server.base_url, model="no-such-model")
    with pytest.raises(TeacherMismatch, match=r"does not serve 'no-such-model' \(it serves teacher\)$"):
        check_teacher(teacher, str(base_model_dir))
