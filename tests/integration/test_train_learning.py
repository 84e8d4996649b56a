"""The training stage for real, on the tiny model on CPU: it learns, it stops on every bound, it
continues from the champion with the champion as KL reference, it is reproducible, and it runs as
two processes under accelerate.

The task the random tiny model learns: "the reply contains a digit" (the project's RegexGrader),
with 4-token replies. About 12% of its vocabulary is digits, so a reply has one about 35% of the
time; the learnable signal is strong. Its final RMSNorm bounds how far LoRA can move any single
logit (about 2.5 for this init), so the runs sample at temperature 0.3, where that is enough to
matter; the held-out reward is measured at the same temperature.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from evals.graders import CallableGrader, RegexGrader, as_reward_function
from pipeline.config import TrainConfig
from pipeline.results import TrainPrompt
from pipeline.train.bounds import NO_SIGNAL_STEPS
from pipeline.train.grpo import GrpoRecipe, run
from pipeline.train.recipe import TrainResult, file_digests, load_base, load_champion

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DIGIT = as_reward_function(RegexGrader(r"\d", name="digit"))
CONSTANT = as_reward_function(CallableGrader(lambda sample: 1.0, name="constant"))
LEARN = TrainConfig.model_validate(
    {
        "max_steps": 30,
        "learning_rate": 5e-3,
        "temperature": 0.3,
        "max_completion_tokens": 4,
        "prompts_per_step": 8,
        "num_generations": 8,
        "beta": 0.04,
        "kl_budget": 5.0,  # per-token KL at temperature 0.3; the night reaches about 2-3
        "max_prompts": 1000,
        "seed": 0,
    }
)
SMALL = LEARN.model_copy(update={"max_steps": 3, "prompts_per_step": 4, "num_generations": 4})
MIN_GAIN = 0.25  # held-out reward must rise by this much (seen: about 0.35 -> 0.9)


def order_prompts(start: int, count: int) -> list[TrainPrompt]:
    return [
        TrainPrompt(
            [{"role": "user", "content": f"Hi, question {i}: my order #{1000 + 37 * i} is late. What now?"}]
        )
        for i in range(start, start + count)
    ]


TRAIN_PROMPTS = order_prompts(0, 400)
HELDOUT_PROMPTS = order_prompts(5000, 16)  # never trained on


def heldout_reward(model_dir: Path, adapter_dir: Path | None, *, samples: int = 16) -> float:
    """Mean digit reward of `samples` seeded completions per held-out prompt, with or without the adapter."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model: Any = load_base(str(model_dir))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    encoded: Any = tokenizer.apply_chat_template(
        [p.messages for p in HELDOUT_PROMPTS], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    inputs = tokenizer.pad({"input_ids": encoded["input_ids"]}, return_tensors="pt")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1234)
        output = model.generate(
            **inputs,
            do_sample=True,
            temperature=LEARN.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=LEARN.max_completion_tokens,
            num_return_sequences=samples,
        )
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    rewards = DIGIT(completions=texts)
    return sum(rewards) / len(rewards)


def metrics_lines(result: TrainResult) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.metrics_path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def night1(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The first night: a fresh LoRA trained on the digit reward (reference: the base)."""
    return run(
        LEARN,
        TRAIN_PROMPTS,
        [DIGIT],
        base_model=str(tiny_model_dir),
        out_dir=tmp_path_factory.mktemp("night1"),
    )


# --------------------------------------------------------------------------- learning


def test_grpo_raises_heldout_reward_within_the_kl_budget(tiny_model_dir: Path, night1: TrainResult) -> None:
    before = heldout_reward(tiny_model_dir, None)
    after = heldout_reward(tiny_model_dir, night1.adapter_dir)
    print(
        f"\nheld-out digit reward {before:.3f} -> {after:.3f}; rolling KL to reference "
        f"{night1.kl_to_champion:.3f}, KL to base {night1.kl_to_base:.3f}, "
        f"{night1.steps} steps in {night1.wall_seconds:.1f}s"
    )
    assert after >= before + MIN_GAIN
    assert night1.stop_reason == "max_steps" and night1.steps == LEARN.max_steps
    assert night1.kl_to_champion is not None and 0 < night1.kl_to_champion < LEARN.kl_budget
    assert night1.kl_to_base is not None and 0 < night1.kl_to_base < LEARN.kl_budget


def test_night_writes_a_loadable_adapter_metrics_and_result(
    tiny_model_dir: Path, night1: TrainResult
) -> None:
    assert night1.adapter_dir is not None
    config = json.loads((night1.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert (config["r"], config["lora_alpha"]) == (LEARN.lora.rank, LEARN.lora.alpha)
    assert config["target_modules"] == sorted(LEARN.lora.target_modules)
    assert sorted(night1.adapter_sha256) == ["adapter_config.json", "adapter_model.safetensors"]
    assert night1.adapter_sha256 == file_digests(night1.adapter_dir)
    assert night1.trainable_parameters == 14_336
    assert night1.bounds["kl_budget"] == LEARN.kl_budget and night1.bounds["planned_steps"] == LEARN.max_steps
    lines = metrics_lines(night1)
    assert [line["step"] for line in lines] == list(range(1, LEARN.max_steps + 1))
    for key in ("reward_mean", "reward_std", "kl", "loss", "grad_norm", "completion_length", "step_seconds"):
        assert all(line[key] is not None for line in lines), key
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # a fresh LoRA is the base: KL starts at 0
    written = json.loads((night1.metrics_path.parent / "train_result.json").read_text(encoding="utf-8"))
    assert written == json.loads(json.dumps(night1.as_json()))


def test_same_inputs_and_seed_give_the_same_adapter_bytes(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = run(SMALL, TRAIN_PROMPTS, [DIGIT], base_model=str(tiny_model_dir), out_dir=tmp_path / "a")
    second = run(SMALL, TRAIN_PROMPTS, [DIGIT], base_model=str(tiny_model_dir), out_dir=tmp_path / "b")
    assert first.adapter_sha256 and first.adapter_sha256 == second.adapter_sha256
    other_seed = SMALL.model_copy(update={"seed": 1})
    third = run(other_seed, TRAIN_PROMPTS, [DIGIT], base_model=str(tiny_model_dir), out_dir=tmp_path / "c")
    assert (
        third.adapter_sha256["adapter_model.safetensors"] != first.adapter_sha256["adapter_model.safetensors"]
    )


# --------------------------------------------------------------------------- bounds


def test_a_tiny_kl_budget_stops_early(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = LEARN.model_copy(update={"kl_budget": 1e-6, "max_steps": 10})
    result = run(settings, TRAIN_PROMPTS, [DIGIT], base_model=str(tiny_model_dir), out_dir=tmp_path)
    # Step 1 is measured before any update (KL 0); step 2's KL exceeds any positive budget.
    assert (result.stop_reason, result.steps) == ("kl_budget", 2)
    assert result.kl_to_champion is not None and result.kl_to_champion > settings.kl_budget
    assert len(metrics_lines(result)) == 2 and result.adapter_dir is not None


def test_a_tiny_wall_clock_budget_stops_after_one_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = LEARN.model_copy(update={"max_wall_seconds": 1e-3, "max_steps": 10})
    result = run(settings, TRAIN_PROMPTS, [DIGIT], base_model=str(tiny_model_dir), out_dir=tmp_path)
    assert (result.stop_reason, result.steps) == ("wall_clock", 1)


def test_running_out_of_prompts_is_completed(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = SMALL.model_copy(update={"max_steps": 10})
    prompts = TRAIN_PROMPTS[: 2 * settings.prompts_per_step + 1]
    result = run(settings, prompts, [DIGIT], base_model=str(tiny_model_dir), out_dir=tmp_path)
    assert (result.stop_reason, result.steps) == ("completed", 2)


def test_a_constant_reward_is_no_signal_and_changes_nothing(
    tiny_model_dir: Path, night1: TrainResult, tmp_path: Path
) -> None:
    assert night1.adapter_dir is not None
    champion_before = file_digests(night1.adapter_dir)
    out_dir = tmp_path / "night"
    result = run(
        SMALL.model_copy(update={"max_steps": 10}),
        TRAIN_PROMPTS,
        [CONSTANT],
        base_model=str(tiny_model_dir),
        out_dir=out_dir,
        champion=night1.adapter_dir,
    )
    assert (result.stop_reason, result.steps) == ("no_signal", NO_SIGNAL_STEPS)
    assert result.adapter_dir is None and result.adapter_sha256 == {} and result.kl_to_base is None
    assert not (out_dir / "adapter").exists()
    assert file_digests(night1.adapter_dir) == champion_before
    assert all(line["frac_reward_zero_std"] == 1.0 for line in metrics_lines(result))


# --------------------------------------------------------------------------- continual


def test_the_champion_is_loaded_trainable_with_its_exact_weights(
    tiny_model_dir: Path, night1: TrainResult
) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    assert night1.adapter_dir is not None
    model = load_champion(load_base(str(tiny_model_dir)), night1.adapter_dir, LEARN.lora)
    saved = load_file(str(night1.adapter_dir / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model, adapter_name="default")
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(loaded[key], saved[key]) for key in saved)
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    assert lora and all(p.requires_grad for p in lora)


def test_second_night_starts_from_the_champion_and_is_bounded_against_it(
    tiny_model_dir: Path, night1: TrainResult, tmp_path: Path
) -> None:
    assert night1.adapter_dir is not None and night1.kl_to_base is not None
    seen: list[tuple[int, dict[str, float]]] = []
    night2 = run(
        SMALL,
        order_prompts(400, 100),
        [DIGIT],
        base_model=str(tiny_model_dir),
        out_dir=tmp_path,
        champion=night1.adapter_dir,
        progress=lambda step, figures: seen.append((step, figures)),
    )
    # Step 1's KL is measured before the first update: ~0 means the policy starts equal to the
    # reference, and both are the champion. Against the base it would be about night1.kl_to_base.
    assert seen[0][0] == 1 and seen[0][1]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert night1.kl_to_base > 0.1
    assert night2.stop_reason == "max_steps" and night2.adapter_dir is not None
    assert (
        night2.adapter_sha256["adapter_model.safetensors"]
        != night1.adapter_sha256["adapter_model.safetensors"]
    )
    # The new candidate keeps the line's shape and is still an adapter of the base.
    config = json.loads((night2.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"] == str(tiny_model_dir) and config["r"] == LEARN.lora.rank


def test_the_reference_stays_the_frozen_champion_while_the_policy_trains(
    tiny_model_dir: Path, night1: TrainResult, tmp_path: Path
) -> None:
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    assert night1.adapter_dir is not None
    recipe = GrpoRecipe(
        SMALL,
        base_model=str(tiny_model_dir),
        out_dir=tmp_path,
        champion=night1.adapter_dir,
        started=time.perf_counter(),
    )
    try:
        recipe.setup(order_prompts(600, 40), [DIGIT], None, None)
        recipe.train()
        policy = recipe.policy()
        saved = load_file(str(night1.adapter_dir / "adapter_model.safetensors"))
        reference = get_peft_model_state_dict(policy, adapter_name="ref")
        trained = get_peft_model_state_dict(policy, adapter_name="default")
        assert all(torch.equal(reference[key], saved[key]) for key in saved)
        assert not all(torch.equal(trained[key], saved[key]) for key in saved)
        assert policy.active_adapter == "default"
        optimized = {id(p) for group in recipe.trainer.optimizer.param_groups for p in group["params"]}
        for name, parameter in policy.named_parameters():
            assert (id(parameter) in optimized) == (".default." in name), name
    finally:
        recipe.cleanup()


# --------------------------------------------------------------------------- several processes


def test_two_processes_under_accelerate_launch(tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    env = os.environ | {"PYTHON": sys.executable}  # the interpreter running the tests, in every process
    completed = subprocess.run(
        ["bash", str(ROOT / "scripts" / "train_2proc.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["stop_reason"] == "max_steps" and result["steps"] == 6
    assert "2 process(es), DistributedType.MULTI_CPU (backend gloo)" in completed.stderr
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_judge_in_group_mode_is_the_reward(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The track's judge scores each prompt's completions as one group, through TRL's async reward path."""
    from pipeline.judge.rubrics import load_rubric
    from pipeline.train.rewards import judge_reward
    from tests.fakes.judge import FakeJudge

    class GroupCountingJudge(FakeJudge):
        def __init__(self) -> None:
            super().__init__(lambda text: min(1.0, len(text) / 20))
            self.group_sizes: list[int] = []

        async def score_groups(self, rubric, conversations, candidates, references=None):
            self.group_sizes.extend(len(group) for group in candidates)
            return await super().score_groups(rubric, conversations, candidates, references)

    judge = GroupCountingJudge()
    result = run(
        SMALL,
        order_prompts(0, 12),
        [judge_reward(judge, load_rubric("helpfulness"))],
        base_model=str(tiny_model_dir),
        out_dir=tmp_path / "night",
    )
    assert result.steps == SMALL.max_steps and result.adapter_dir is not None
    assert judge.group_sizes and set(judge.group_sizes) == {SMALL.num_generations}
