"""Unit tests of the training stage's pure parts: batch layout, stop rules from a metrics history,
rolling KL, the estimate arithmetic, the KL arithmetic, the job file and the result JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import LoraConfig, TrainConfig
from pipeline.results import TrainPrompt
from pipeline.train.bounds import (
    KL_WINDOW,
    NO_SIGNAL_STEPS,
    ModelShape,
    StepMetrics,
    batch_layout,
    early_stop_reason,
    estimate,
    estimate_from_shape,
    final_stop_reason,
    lora_parameters,
    matches_target,
    planned_steps,
    rolling_mean,
    step_metrics,
)
from pipeline.train.grpo import prompt_dataset, run
from pipeline.train.job import (
    load_job,
)
from pipeline.train.kl import (
    completion_mask,
    kl_to_base,
    masked_token_kl,
)
from pipeline.train.recipe import TrainResult, lora_config, night_bounds
from storage.errors import UserError


def make_step(
    step: int, *, kl: float | None = 0.0, zero_std: float | None = 0.0, **overrides: Any
) -> StepMetrics:
    fields: dict[str, Any] = {
        "step": step,
        "reward_mean": 0.5,
        "reward_std": 0.1,
        "kl": kl,
        "kl_rolling": kl,
        "loss": 0.0,
        "grad_norm": 1.0,
        "completion_length": 4.0,
        "frac_reward_zero_std": zero_std,
        "learning_rate": 1e-3,
        "entropy": 6.0,
        "step_seconds": 0.1,
        "elapsed_seconds": 0.1 * step,
    }
    return StepMetrics(**(fields | overrides))


def history_from_kls(kls: list[float], zero_std: float = 0.0) -> list[StepMetrics]:
    """StepMetrics as the callback builds them: each step's rolling KL over the ones before it."""
    history: list[StepMetrics] = []
    for step, kl in enumerate(kls, start=1):
        logs = {"reward": 0.5, "reward_std": 0.1, "kl": kl, "frac_reward_zero_std": zero_std}
        metrics = step_metrics(
            logs, step=step, step_seconds=0.1, elapsed_seconds=0.1 * step, previous=history
        )
        assert metrics is not None
        history.append(metrics)
    return history


# --------------------------------------------------------------------------- batch layout


def test_batch_layout_splits_a_steps_completions_over_the_processes() -> None:
    layout = batch_layout(prompts_per_step=4, num_generations=4, num_processes=2)
    assert layout.completions_per_step == 16
    assert layout.per_device_completions == 8


def test_batch_layout_refuses_an_uneven_split_and_groups_of_one() -> None:
    with pytest.raises(ValueError, match="split evenly"):
        batch_layout(prompts_per_step=3, num_generations=3, num_processes=2)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        batch_layout(prompts_per_step=4, num_generations=1, num_processes=1)


def test_planned_steps_is_epochs_passes_over_the_prompts_capped_at_max_steps() -> None:
    assert planned_steps(num_prompts=100, prompts_per_step=8, max_steps=40) == 12
    assert planned_steps(num_prompts=1000, prompts_per_step=8, max_steps=40) == 40
    assert planned_steps(num_prompts=100, prompts_per_step=8, max_steps=40, epochs=3) == 36
    assert planned_steps(num_prompts=7, prompts_per_step=8, max_steps=40) == 0


# --------------------------------------------------------------------------- metrics and rolling KL


def test_rolling_mean_uses_the_last_window_values_or_all_while_fewer() -> None:
    assert rolling_mean([1.0, 2.0, 3.0, 4.0], 3) == pytest.approx(3.0)
    assert rolling_mean([2.0, 4.0], 3) == pytest.approx(3.0)
    assert rolling_mean([], 3) is None
    with pytest.raises(ValueError):
        rolling_mean([1.0], 0)


def test_step_metrics_reads_trls_step_log_and_rolls_the_kl() -> None:
    logs = {
        "loss": 0.02,
        "grad_norm": 1.3,
        "learning_rate": 0.005,
        "completions/mean_length": 3.9,
        "rewards/digit/mean": 0.56,
        "rewards/digit/std": 0.5,
        "reward": 0.56,
        "reward_std": 0.5,
        "frac_reward_zero_std": 0.25,
        "kl": 0.6,
        "entropy": 6.6,
        "step_time": 0.15,
    }
    previous = history_from_kls([0.0, 0.3])
    metrics = step_metrics(logs, step=3, step_seconds=0.2, elapsed_seconds=5.0, previous=previous)
    assert metrics is not None
    assert (metrics.reward_mean, metrics.kl, metrics.grad_norm, metrics.completion_length) == (
        0.56,
        0.6,
        1.3,
        3.9,
    )
    assert metrics.kl_rolling == pytest.approx((0.0 + 0.3 + 0.6) / 3)
    assert metrics.rewards == {"digit": 0.56}
    flat = metrics.flat()
    assert flat["reward/digit"] == 0.56 and flat["step"] == 3.0 and "rewards" not in flat


def test_step_metrics_ignores_the_final_summary_log() -> None:
    summary = {"train_runtime": 4.6, "train_loss": 0.01, "epoch": 0.6}
    assert step_metrics(summary, step=30, step_seconds=0.0, elapsed_seconds=9.0) is None


def test_step_metrics_leaves_missing_and_non_finite_figures_out() -> None:
    metrics = step_metrics({"reward": 0.5, "kl": math.nan}, step=1, step_seconds=0.1, elapsed_seconds=0.1)
    assert metrics is not None
    assert metrics.kl is None and metrics.kl_rolling is None and metrics.grad_norm is None


# --------------------------------------------------------------------------- stop rules


def test_kl_budget_stops_when_the_rolling_kl_exceeds_it() -> None:
    history = history_from_kls([0.0, 0.1, 0.2, 0.9])  # rolling over 3: 0.4 at step 4
    assert KL_WINDOW == 3
    assert early_stop_reason(history[:3], kl_budget=0.35, max_wall_seconds=60, elapsed_seconds=1) is None
    assert early_stop_reason(history, kl_budget=0.35, max_wall_seconds=60, elapsed_seconds=1) == "kl_budget"
    assert early_stop_reason(history, kl_budget=0.4001, max_wall_seconds=60, elapsed_seconds=1) is None


def test_one_noisy_step_does_not_exceed_a_rolling_budget() -> None:
    history = history_from_kls([0.05, 0.05, 0.05, 0.05, 0.25])  # one spike: rolling 0.117
    assert early_stop_reason(history, kl_budget=0.15, max_wall_seconds=60, elapsed_seconds=1) is None


def test_wall_clock_stops_once_the_budget_is_spent() -> None:
    history = history_from_kls([0.0])
    assert early_stop_reason(history, kl_budget=1, max_wall_seconds=10, elapsed_seconds=9.9) is None
    assert early_stop_reason(history, kl_budget=1, max_wall_seconds=10, elapsed_seconds=10.1) == "wall_clock"


def test_no_signal_needs_the_first_steps_all_without_reward_variance() -> None:
    flat = [make_step(step, zero_std=1.0) for step in range(1, NO_SIGNAL_STEPS + 1)]
    assert early_stop_reason(flat[:-1], kl_budget=1, max_wall_seconds=60, elapsed_seconds=1) is None
    assert early_stop_reason(flat, kl_budget=1, max_wall_seconds=60, elapsed_seconds=1) == "no_signal"
    learning_first = [make_step(1, zero_std=0.5), *[make_step(s, zero_std=1.0) for s in range(2, 5)]]
    assert early_stop_reason(learning_first, kl_budget=1, max_wall_seconds=60, elapsed_seconds=1) is None
    unknown = [make_step(step, zero_std=None) for step in range(1, 4)]
    assert early_stop_reason(unknown, kl_budget=1, max_wall_seconds=60, elapsed_seconds=1) is None


def test_no_signal_takes_precedence_over_kl_and_wall_clock() -> None:
    flat = [make_step(step, kl=5.0, zero_std=1.0) for step in range(1, NO_SIGNAL_STEPS + 1)]
    assert early_stop_reason(flat, kl_budget=0.1, max_wall_seconds=1, elapsed_seconds=99) == "no_signal"
    assert early_stop_reason(
        history_from_kls([5.0]), kl_budget=0.1, max_wall_seconds=1, elapsed_seconds=99
    ) == ("kl_budget")


def test_final_stop_reason() -> None:
    learning = [make_step(1), make_step(2)]
    assert final_stop_reason(learning, early_reason="kl_budget", steps=2, max_steps=10) == "kl_budget"
    assert final_stop_reason(learning, early_reason=None, steps=10, max_steps=10) == "max_steps"
    assert final_stop_reason(learning, early_reason=None, steps=2, max_steps=10) == "completed"
    flat = [make_step(1, zero_std=1.0)]  # max_steps=1 never reaches the early rule
    assert final_stop_reason(flat, early_reason=None, steps=1, max_steps=1) == "no_signal"


# --------------------------------------------------------------------------- estimate

TINY_LAYER = (  # (name, in, out) of one decoder block of the tiny model
    ("self_attn.q_proj", 128, 128),
    ("self_attn.k_proj", 128, 64),
    ("self_attn.v_proj", 128, 64),
    ("self_attn.o_proj", 128, 128),
    ("mlp.gate_proj", 128, 256),
    ("mlp.up_proj", 128, 256),
    ("mlp.down_proj", 256, 128),
)
TINY_LINEARS = (
    *(
        (f"model.layers.{layer}.{name}", fan_in, fan_out)
        for layer in range(2)
        for name, fan_in, fan_out in TINY_LAYER
    ),
    ("lm_head", 128, 1024),
)
TINY = ModelShape(
    parameters=557_696, hidden_size=128, num_layers=2, vocab_size=1024, linear_layers=TINY_LINEARS
)


def test_target_matching_follows_peft() -> None:
    assert matches_target("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not matches_target("model.layers.0.self_attn.q_proj_extra", ["q_proj"])
    assert matches_target("lm_head", ["lm_head"])


def test_lora_parameters_are_rank_times_fan_in_plus_fan_out() -> None:
    # per layer: q 8*(128+128) + k 8*(128+64) + v 8*(128+64) + o 8*(128+128) = 7168; two layers
    assert lora_parameters(TINY_LINEARS, ["q_proj", "k_proj", "v_proj", "o_proj"], rank=8) == 14_336
    assert lora_parameters(TINY_LINEARS, ["down_proj"], rank=4) == 2 * 4 * (256 + 128)


def test_estimate_arithmetic() -> None:
    common: dict[str, Any] = {
        "rank": 8,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "sequences_per_device": 16,
        "prompt_tokens": 30,
        "completion_tokens": 4,
        "max_steps": 40,
        "max_wall_seconds": 900,
    }
    fresh = estimate_from_shape(TINY, **common)
    assert fresh.trainable_parameters == 14_336
    assert fresh.weights_bytes == 557_696 * 4
    assert fresh.lora_bytes == 14_336 * 4
    assert fresh.optimizer_bytes == 14_336 * 4 * 3  # gradients + two AdamW moments
    parts = fresh.weights_bytes + fresh.lora_bytes + fresh.optimizer_bytes + fresh.activations_bytes
    assert fresh.total_bytes == parts
    assert fresh.max_seconds == pytest.approx(40 * fresh.seconds_per_step)
    continual = estimate_from_shape(TINY, **common, with_champion=True)
    assert continual.lora_bytes == 2 * fresh.lora_bytes  # the frozen champion copy
    checkpointed = estimate_from_shape(TINY, **common, gradient_checkpointing=True)
    assert checkpointed.activations_bytes < fresh.activations_bytes
    capped = estimate_from_shape(TINY, **(common | {"max_wall_seconds": 0.5}))
    assert capped.max_seconds == 0.5
    longer = estimate_from_shape(TINY, **(common | {"completion_tokens": 64}))
    assert longer.seconds_per_step > fresh.seconds_per_step
    assert "14,336 trainable" in fresh.summary()


def test_estimate_reads_the_shape_from_the_model_config(tiny_model_dir: Path) -> None:
    settings = TrainConfig()
    guess = estimate(settings, str(tiny_model_dir))
    assert guess.trainable_parameters == 14_336
    assert guess.base_parameters == 557_696
    with pytest.raises(ValueError, match="split evenly"):
        estimate(
            settings.model_copy(update={"prompts_per_step": 3, "num_generations": 3}),
            str(tiny_model_dir),
            num_processes=2,
        )


# --------------------------------------------------------------------------- KL arithmetic


def test_completion_mask_keeps_tokens_up_to_the_first_stop() -> None:
    ids = torch.tensor([[5, 2, 7, 0], [5, 5, 5, 5], [6, 9, 7, 2]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.float)
    assert torch.equal(
        completion_mask(ids, [2, 6]), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0.0]])
    )
    assert torch.equal(completion_mask(ids, [2]), expected)


def test_masked_token_kl_is_exact_over_the_vocabulary() -> None:
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    policy = torch.log(p).view(1, 1, 2).repeat(1, 2, 1)
    base = torch.log(q).view(1, 1, 2).repeat(1, 2, 1)
    closed_form = float((p * (p / q).log()).sum())
    total, count = masked_token_kl(policy, base, torch.tensor([[1.0, 0.0]]))
    assert count == 1.0 and total == pytest.approx(closed_form)
    same, _ = masked_token_kl(policy, policy, torch.ones(1, 2))
    assert same == pytest.approx(0.0, abs=1e-7)


def test_kl_to_base_is_zero_for_a_fresh_adapter_and_positive_once_it_moved(tiny_model_dir: Path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model: Any = get_peft_model(base, lora_config(LoraConfig()))
    chats = [[{"role": "user", "content": f"Where is order {n}?"}] for n in range(3)]
    fresh = kl_to_base(model, tokenizer, chats, max_new_tokens=4, temperature=1.0, seed=0)
    assert fresh == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    moved = kl_to_base(model, tokenizer, chats, max_new_tokens=4, temperature=1.0, seed=0)
    assert moved > 0.01
    assert kl_to_base(model, tokenizer, chats, max_new_tokens=4, temperature=1.0, seed=0) == moved


# --------------------------------------------------------------------------- data, result, job file


def test_prompt_dataset_has_prompt_reference_and_metadata_columns() -> None:
    prompts = [
        TrainPrompt([{"role": "user", "content": "2+2?"}], reference="4", metadata={"topic": "math"}),
        TrainPrompt([{"role": "user", "content": "hi"}]),
    ]
    dataset = prompt_dataset(prompts)
    assert dataset.column_names == ["prompt", "reference", "topic"]
    assert dataset[0]["reference"] == "4" and dataset[1]["topic"] is None


def test_prompt_dataset_refuses_bad_prompts() -> None:
    with pytest.raises(ValueError, match="end with a user turn"):
        prompt_dataset([TrainPrompt([{"role": "assistant", "content": "hello"}])])
    with pytest.raises(ValueError, match="reserved"):
        prompt_dataset([TrainPrompt([{"role": "user", "content": "q"}], metadata={"prompt": "x"})])


def test_result_json_is_the_run_entry() -> None:
    result = TrainResult(
        adapter_dir=Path("/n/adapter"),
        steps=12,
        stop_reason="kl_budget",
        kl_to_champion=0.2,
        kl_to_base=0.5,
        metrics_path=Path("/n/metrics.jsonl"),
        adapter_sha256={"adapter_model.safetensors": "ab"},
        wall_seconds=3.0,
        trainable_parameters=14_336,
    )
    entry = result.as_json()
    assert entry["steps"] == 12 and entry["stop_reason"] == "kl_budget" and entry["kl"] == 0.2
    assert entry["adapter_dir"] == "/n/adapter" and entry["kl_to_base"] == 0.5 and entry["bounds"] == {}
    bounds = night_bounds(TrainConfig(), planned_steps=12)
    assert bounds["kl_budget"] == 0.1 and bounds["max_grad_norm"] == 1.0 and bounds["lora_rank"] == 8
    assert bounds["planned_steps"] == 12 and bounds["max_steps"] == 40
    nothing = TrainResult(None, 2, "no_signal", 0.0, None, Path("m"), {}, 1.0, 14_336).as_json()
    assert nothing["adapter_dir"] is None and nothing["adapter_sha256"] == {}


def test_job_file_is_validated_with_one_line_errors(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        "base_model: m\nout_dir: o\ntrain: {max_steps: 3}\n"
        "prompts: [{messages: [{role: user, content: hi}]}]\n"
        "graders: [{type: regex, pattern: '\\d', weight: 0.5}]\n",
        encoding="utf-8",
    )
    loaded = load_job(job)
    assert loaded.train.max_steps == 3 and loaded.reward_weights() == [0.5]
    job.write_text(
        "base_model: m\nout_dir: o\ntrain: {max_stepz: 3}\nprompts: []\ngraders: []\n", encoding="utf-8"
    )
    with pytest.raises(UserError, match=r"job.yaml: (train\.max_stepz|prompts)"):
        load_job(job)
    with pytest.raises(UserError, match="cannot read"):
        load_job(tmp_path / "missing.yaml")


def test_fewer_prompts_than_one_step_is_no_signal_without_loading_a_model(tmp_path: Path) -> None:
    prompts = [TrainPrompt([{"role": "user", "content": "hi"}])] * 3
    settings = TrainConfig.model_validate({"prompts_per_step": 4})
    result = run(settings, prompts, [lambda **_: [1.0]], base_model="no/such-model", out_dir=tmp_path)
    assert (result.stop_reason, result.steps, result.adapter_dir) == ("no_signal", 0, None)
    assert (tmp_path / "train_result.json").is_file() and not (tmp_path / "adapter").exists()
