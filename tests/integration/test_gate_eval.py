"""The forgetting guard end to end on the tiny model (CPU): generation, suite scores, KL and the gate.

The suite's grader is a property the tiny base model's greedy replies have (they begin with "ama"
for these prompts), so the champion, a fresh LoRA with zero B (equal to the base), passes it and a
damaged adapter can visibly lose it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from evals.gate import GateThresholds, SuiteScores, suite_gate
from evals.suites import Suite, load_suite
from pipeline.config import GateConfig, LoraConfig
from pipeline.deploy.vllm_client import VllmClient
from pipeline.gate.evaluation import (
    Scorer,
    evaluate_candidate,
    score_suite,
)
from pipeline.gate.generation import (
    Decoding,
    InProcessGenerator,
    ServerGenerator,
    generate,
    probe_kl,
)
from pipeline.gate.stage import thresholds_from
from pipeline.results import TrainPrompt
from pipeline.train.recipe import load_base, lora_config, save_adapter

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
    ).report
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
    ).report
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


def regex_scorer(pattern: str) -> Scorer:
    """A held-out/judge-case scorer that needs no judge: 1.0 when the reply matches `pattern`."""

    def score(conversations: Any, replies: Any, references: Any, rubrics: Any) -> list[float | None]:
        return [1.0 if re.search(pattern, reply) else 0.0 for reply in replies]

    return score


def heldout_prompts(n: int) -> list[TrainPrompt]:
    return [
        TrainPrompt([{"role": "user", "content": f"Held-out {i}: is order #{2000 + 13 * i} late?"}])
        for i in range(n)
    ]


@pytest.mark.integration
def test_the_gate_through_the_vllm_server_decides_as_in_process(
    vllm_server: Any, tiny_model_dir: Path, champion: Path, damaged: Path, suite: Suite
) -> None:
    client = VllmClient(vllm_server.base_url)
    before = set(client.adapters())
    served = ServerGenerator(client, base_name=vllm_server.spec.served_name)
    kwargs: dict[str, Any] = {
        "thresholds": THRESHOLDS,
        "scorer": regex_scorer("^ama"),
        "heldout": heldout_prompts(12),
        "decoding": Decoding(max_new_tokens=12),
    }
    through_server = evaluate_candidate(
        str(tiny_model_dir), damaged, champion, [suite], generator=served, **kwargs
    )
    in_process = evaluate_candidate(str(tiny_model_dir), damaged, champion, [suite], **kwargs)
    assert through_server.backend == "vllm" and in_process.backend == "in-process"
    # The same decision, and the same scores up to float32 kernel differences in greedy decoding.
    assert through_server.report.failed_gates() == in_process.report.failed_gates()
    assert "suite/orders" in through_server.report.failed_gates()
    for server_scores, local_scores in zip(through_server.suites, in_process.suites, strict=True):
        assert server_scores.champion == local_scores.champion  # the base's greedy replies agree exactly
        assert abs(np.mean(server_scores.candidate) - np.mean(local_scores.candidate)) <= 0.15
    # The judge case was scored by the scorer (17 cases, not 16), and held-out rewards were paired.
    assert {gate.name: gate.n for gate in through_server.report.gates}["suite/orders"] == CASES + 1
    assert len(through_server.heldout_candidate) == 12
    # The temporary adapter names are gone; nothing the server served changed.
    assert set(client.adapters()) == before


def test_the_base_is_asked_once_while_it_is_the_champion(
    tiny_model_dir: Path, damaged: Path, suite: Suite
) -> None:
    """Before a track's first promotion the champion is the base: its replies serve both roles."""
    inner = InProcessGenerator(str(tiny_model_dir))
    asked: list[Path | None] = []

    class Counting:
        def replies(self, adapter: Path | None, prompts: Any, decoding: Decoding) -> list[str]:
            asked.append(adapter)
            return inner.replies(adapter, prompts, decoding)

    evaluation = evaluate_candidate(
        str(tiny_model_dir),
        damaged,
        None,
        [suite],
        thresholds=THRESHOLDS,
        generator=Counting(),
        heldout_candidate=HELDOUT,
        heldout_champion=HELDOUT,
    )
    assert asked == [damaged, None]
    gate = {gate.name: gate for gate in evaluation.report.gates}["suite/orders"]
    assert gate.base_metric == gate.champion_metric
    assert evaluation.generated == 2 * gate.n


def test_held_out_rewards_are_generated_and_scored_for_both_models(
    tiny_model_dir: Path, champion: Path, suite: Suite
) -> None:
    evaluation = evaluate_candidate(
        str(tiny_model_dir),
        champion,
        champion,
        [suite],
        thresholds=THRESHOLDS,
        scorer=regex_scorer("^ama"),
        heldout=heldout_prompts(10),
        decoding=Decoding(max_new_tokens=12),
    )
    assert len(evaluation.heldout_candidate) == 10
    assert evaluation.heldout_candidate == evaluation.heldout_champion  # the same model, greedy
    assert evaluation.report.failed_gates() == ["heldout_gain"]
    assert evaluation.suites[0].base == evaluation.suites[0].champion  # the champion's B is zero


FALSE_ALARM_REPEATS = 30


def test_an_unchanged_model_sampled_with_other_seeds_fails_non_inferiority_at_most_at_the_configured_rate(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Real sampled replies (temperature 1) of the same model under different seeds, scored by a grader
    the tiny model meets about two times in three: only sampling noise separates the two models."""
    cases = [
        {
            "id": f"s-{i}",
            "messages": [{"role": "user", "content": f"Question {i}: where is my order #{1000 + 37 * i}?"}],
            "grader": {"type": "regex", "pattern": "s", "name": "has_s"},
        }
        for i in range(60)
    ]
    path = tmp_path / "noisy.jsonl"
    path.write_text("".join(json.dumps(case) + "\n" for case in cases), encoding="utf-8")
    noisy = load_suite(path)
    thresholds = thresholds_from(GateConfig(temperature=1.0))  # the shipped defaults, sampled replies
    prompts = [list(case.messages) for case in noisy.cases]
    fixed = thresholds_from(GateConfig())  # the configured tolerance alone, as for greedy replies
    failures, fixed_failures, deltas = 0, 0, []
    for repeat in range(FALSE_ALARM_REPEATS):
        champion_scores, candidate_scores = (
            score_suite(
                noisy,
                generate(
                    str(tiny_model_dir),
                    None,
                    prompts,
                    max_new_tokens=12,
                    temperature=1.0,
                    seed=2 * repeat + side,
                    batch_size=60,
                ),
            )
            for side in (0, 1)
        )
        scores = SuiteScores("noisy", candidate_scores, champion_scores)
        gate = suite_gate(scores, thresholds)
        failures += not gate.passed
        fixed_failures += not suite_gate(scores, fixed).passed
        deltas.append(gate.delta)
    rate = thresholds.false_alarm_rate
    assert rate is not None
    allowed = binomial_upper(FALSE_ALARM_REPEATS, rate, tail=0.001)
    print(
        f"\nfalse alarms: {failures}/{FALSE_ALARM_REPEATS} with noise margins (configured rate {rate}, "
        f"allowed {allowed}); {fixed_failures}/{FALSE_ALARM_REPEATS} with the bare tolerance "
        f"{fixed.tolerance}; delta sd {np.std(deltas):.3f}"
    )
    assert np.std(deltas) > 0.02  # the noise is real: the two sides did differ
    assert failures <= allowed
    # Without the margin the same scores fail far more often: the margin is what bounds the rate.
    assert fixed_failures > allowed


def binomial_upper(n: int, p: float, *, tail: float) -> int:
    """The smallest k with P(X > k) < tail for X ~ Binomial(n, p)."""
    cumulative = 0.0
    for k in range(n + 1):
        cumulative += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        if 1 - cumulative < tail:
            return k
    return n


def test_overnight_gate_refuses_the_damaged_adapter_and_writes_the_report(
    tiny_model_dir: Path,
    champion: Path,
    damaged: Path,
    suite: Suite,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    suite_file = write_suite_file(tmp_path / "orders.jsonl")
    config = tmp_path / "overnight.yaml"
    config.write_text(
        json.dumps(
            {
                "home": str(tmp_path / "home"),
                "database": {"url": f"sqlite:///{tmp_path / 'store.db'}"},
                "serving": {"base_model": str(tiny_model_dir), "endpoints": ["http://127.0.0.1:9"]},
                "gate": {"tolerance": 0.05, "max_new_tokens": 12},
                "tracks": [
                    {
                        "name": "orders",
                        "suites": [str(suite_file)],
                        "reward": {
                            "judge": 0.0,
                            "graders": [{"type": "regex", "pattern": "^ama", "weight": 1.0}],
                        },
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    for name in [name for name in __import__("os").environ if name.startswith("OVERNIGHT_")]:
        monkeypatch.delenv(name)
    runner = CliRunner()
    assert runner.invoke(app, ["-c", str(config), "db", "upgrade"]).exit_code == 0
    args = ["-c", str(config), "gate", "orders", "--candidate", str(damaged), "--champion", str(champion)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "report"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["passed"] is False and payload["backend"] == "in-process"  # no server answers on :9
    gates = {gate["name"]: gate for gate in payload["gates"]}
    assert not gates["suite/orders"]["passed"] and gates["suite/orders"]["n"] == CASES + 1
    degeneration = {
        f"degeneration/{name}" for name in ("repetition", "distinct", "identical", "length_ratio")
    }
    assert set(gates) == {"suite/orders", "heldout_gain", "kl_to_base", "reward_hacking"} | degeneration
    assert payload["reason"].startswith("suite/orders: ")  # the first failing gate, and why
    for name in ("gate.json", "gate.md", "gate_deltas.png", "cases.jsonl"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "suite/orders" in (tmp_path / "report" / "gate.md").read_text(encoding="utf-8")
