"""The forgetting guard end to end on the tiny model (CPU): generation, suite scores, KL and the gate.

The suite's grader is a property the tiny base model's greedy replies have (they begin with "ama"
for these prompts), so the champion, a fresh LoRA with zero B (equal to the base), passes it and a
damaged adapter can visibly lose it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from evals.gate import GateThresholds
from evals.suites import Suite, load_suite
from pipeline.config import LoraConfig
from pipeline.evaluate import evaluate_candidate, generate, probe_kl, score_suite
from pipeline.train import load_base, lora_config, save_adapter

pytestmark = pytest.mark.slow

CASES = 16
THRESHOLDS = GateThresholds(tolerance=0.05, max_kl_to_base=0.5)
HELDOUT = [0.5, 0.7, 0.2, 0.9, 0.4, 0.6, 0.3, 0.8]  # per-prompt held-out rewards, equal for both models


def write_suite_file(path: Path) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for i in range(CASES):
            case = {
                "id": f"order-{i}",
                "messages": [
                    {"role": "user", "content": f"Question {i}: where is my order #{1000 + 37 * i}?"}
                ],
                "grader": {"type": "regex", "pattern": "^ama", "name": "starts_like_base"},
            }
            out.write(json.dumps(case) + "\n")
        judged = {
            "id": "judged",
            "messages": [{"role": "user", "content": "Hi"}],
            "grader": {"type": "judge"},
        }
        out.write(json.dumps(judged) + "\n")
    return path


def save_lora(tiny_model_dir: Path, adapter_dir: Path, *, b_std: float = 0.0) -> Path:
    """A fresh LoRA on the base (B zero: the base itself), or with B drawn at `b_std` (damage)."""
    from peft import get_peft_model

    model: Any = get_peft_model(load_base(str(tiny_model_dir)), lora_config(LoraConfig()))
    if b_std:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * b_std)
    save_adapter(model, adapter_dir, str(tiny_model_dir))
    return adapter_dir


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    return load_suite(write_suite_file(tmp_path_factory.mktemp("suites") / "orders.jsonl"))


@pytest.fixture(scope="module")
def champion(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lora(tiny_model_dir, tmp_path_factory.mktemp("champion") / "adapter")


@pytest.fixture(scope="module")
def damaged(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lora(tiny_model_dir, tmp_path_factory.mktemp("damaged") / "adapter", b_std=1.0)


def test_generation_is_greedy_and_the_base_passes_the_suite(
    tiny_model_dir: Path, champion: Path, suite: Suite
) -> None:
    prompts = [list(case.messages) for case in suite.cases if not case.is_judge]
    base = generate(str(tiny_model_dir), None, prompts, max_new_tokens=12, batch_size=5)
    assert base == generate(str(tiny_model_dir), None, prompts, max_new_tokens=12, batch_size=16)
    assert generate(str(tiny_model_dir), champion, prompts, max_new_tokens=12) == base
    scores = score_suite(suite, base)
    assert len(scores) == CASES and sum(scores) / CASES >= 0.9
    assert probe_kl(str(tiny_model_dir), champion, None, prompts[:4]) == pytest.approx(0.0, abs=1e-6)


def test_champion_against_itself_passes_every_guard_but_not_the_gain_gate(
    tiny_model_dir: Path, champion: Path, suite: Suite
) -> None:
    report = evaluate_candidate(
        str(tiny_model_dir),
        champion,
        champion,
        [suite],
        thresholds=THRESHOLDS,
        heldout_candidate=HELDOUT,
        heldout_champion=HELDOUT,
    )
    assert not report.passed and report.failed_gates() == ["heldout_gain"]
    gates = {gate.name: gate for gate in report.gates}
    assert gates["suite/orders"].n == CASES and gates["suite/orders"].delta == 0.0
    assert gates["kl_to_base"].metric == pytest.approx(0.0, abs=1e-6)


def test_a_planted_regression_is_rejected_on_the_suite_it_broke(
    tiny_model_dir: Path, champion: Path, damaged: Path, suite: Suite
) -> None:
    report = evaluate_candidate(
        str(tiny_model_dir),
        damaged,
        champion,
        [suite],
        thresholds=THRESHOLDS,
        heldout_candidate=HELDOUT,
        heldout_champion=HELDOUT,
    )
    print("\n" + json.dumps(report.as_json(), indent=1))
    # The damage breaks the grader; the KL stays under 0.5 because the tiny model's final RMSNorm
    # bounds how far any adapter can move a logit, so the suite gate is what catches it here.
    assert report.failed_gates() == ["suite/orders", "heldout_gain"]
    gates = {gate.name: gate for gate in report.gates}
    assert gates["suite/orders"].metric <= 0.2 and gates["suite/orders"].champion_metric == 1.0
    # The champion (B zero) is the base, so KL to it as a reference adapter equals KL to the base.
    prompts = [list(case.messages) for case in suite.cases[:4]]
    to_champion = probe_kl(str(tiny_model_dir), damaged, champion, prompts)
    assert to_champion > 0.0
    assert to_champion == pytest.approx(probe_kl(str(tiny_model_dir), damaged, None, prompts), rel=1e-4)
