"""What bounds a night's update (GRPO, KTO, DPO, SFT): batch layout, per-step metrics, the stop rules, the cost
and the cost estimate. (The KL of an adapter to its base is in `pipeline.train.kl`, the job file of
`python -m pipeline.train` in `pipeline.train.job`.)

Why a module of its own: the rules that decide when a night's update stops (steps, wall clock, KL
to the champion, no learning signal) and the arithmetic that predicts its cost are what an operator
reasons about when a night goes wrong, so they must be readable and unit-tested without a trainer
or a process group. `pipeline.train.recipe` (the recipe) feeds them what TRL logs and acts on what they
say. Everything here but `model_shape` is pure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.config import TrainConfig

PROMPT_TOKENS_GUESS = 256  # prompt length assumed by `estimate` when the prompts are not known yet
STOP_REASONS = ("max_steps", "wall_clock", "kl_budget", "no_signal", "completed")
KL_WINDOW = 3  # steps in the rolling mean of KL to the reference that the KL budget is checked against
NO_SIGNAL_STEPS = 2  # stop as `no_signal` once this many first steps had zero reward variance in every group
_ZERO_STD_ALL = 1.0 - 1e-9  # TRL's frac_reward_zero_std at (or within float noise of) 1.0


# --------------------------------------------------------------------------- batch layout


@dataclass(frozen=True)
class BatchLayout:
    """How one optimisation step's prompts and completions are spread over the processes."""

    prompts_per_step: int  # distinct prompts per optimisation step, over all processes
    num_generations: int  # completions per prompt: one GRPO group
    num_processes: int  # data-parallel processes (accelerate)

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.num_generations

    @property
    def per_device_completions(self) -> int:
        """TRL's `per_device_train_batch_size`: completions each process scores per step."""
        return self.completions_per_step // self.num_processes


def batch_layout(prompts_per_step: int, num_generations: int, num_processes: int) -> BatchLayout:
    """The layout, or ValueError when a step's completions do not split evenly over the processes."""
    if min(prompts_per_step, num_generations, num_processes) < 1:
        raise ValueError("prompts_per_step, num_generations and num_processes must be >= 1")
    if num_generations < 2:
        raise ValueError("GRPO needs num_generations >= 2 (a group of one has no relative advantage)")
    layout = BatchLayout(prompts_per_step, num_generations, num_processes)
    if layout.completions_per_step % num_processes:
        raise ValueError(
            f"prompts_per_step * num_generations = {layout.completions_per_step} completions per step "
            f"do not split evenly over {num_processes} processes"
        )
    return layout


def planned_steps(num_prompts: int, prompts_per_step: int, max_steps: int, epochs: int = 1) -> int:
    """Steps in `epochs` passes over the night's prompts, capped at `max_steps`."""
    return min(max_steps, num_prompts // prompts_per_step * epochs)


# --------------------------------------------------------------------------- per-step metrics


@dataclass(frozen=True)
class StepMetrics:
    """One optimisation step as written to metrics.jsonl (None: TRL did not log that figure)."""

    step: int
    reward_mean: float | None  # mean weighted reward of the step's completions
    reward_std: float | None
    kl: float | None  # mean per-token KL of the policy to the reference (champion), before this step's update
    kl_rolling: float | None  # mean of `kl` over the last KL_WINDOW steps: what the budget is checked against
    loss: float | None
    grad_norm: float | None  # before clipping
    completion_length: float | None  # mean completion length in tokens
    frac_reward_zero_std: float | None  # share of completions in groups whose rewards all tie
    learning_rate: float | None
    entropy: float | None
    step_seconds: float  # wall time since the previous step ended
    elapsed_seconds: float  # wall time since the update started (model loading included)
    rewards: dict[str, float] = field(default_factory=dict)  # mean of each reward function
    # What preference and SFT trainers log instead of a reward (`PREFERENCE_FIGURES`), by TRL's names.
    preference: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, float]:
        """The figures that are known, one level deep (`reward/<function>` for each reward function)."""
        figures = {key: value for key, value in self.as_json().items() if isinstance(value, int | float)}
        return (
            {key: float(value) for key, value in figures.items()}
            | {f"reward/{name}": value for name, value in self.rewards.items()}
            | dict(self.preference)
        )


# The figures KTO, DPO and SFT log per step that say whether they learn: the implicit rewards of the
# chosen and rejected replies, their margin, the share of pairs ranked right, the token accuracy;
# distillation from an endpoint teacher its estimate of the reverse KL to the teacher.
PREFERENCE_FIGURES = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "mean_token_accuracy",
    "teacher_reverse_kl",
)


def is_step_log(logs: Mapping[str, Any]) -> bool:
    """A trainer's log of one optimisation step (GRPO logs a reward, every method a loss), not its
    final summary."""
    return ("reward" in logs or "loss" in logs) and "train_runtime" not in logs


def _number(logs: Mapping[str, Any], key: str) -> float | None:
    value = logs.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def step_metrics(
    logs: Mapping[str, Any],
    *,
    step: int,
    step_seconds: float,
    elapsed_seconds: float,
    previous: Sequence[StepMetrics] = (),
) -> StepMetrics | None:
    """TRL's log of one training step as StepMetrics; None for logs that are not a step (the final summary)."""
    if not is_step_log(logs):
        return None
    kl = _number(logs, "kl")
    kl_history = [m.kl for m in previous if m.kl is not None] + ([kl] if kl is not None else [])
    rewards = {
        key.removeprefix("rewards/").removesuffix("/mean"): value
        for key in logs
        if key.startswith("rewards/") and key.endswith("/mean") and (value := _number(logs, key)) is not None
    }
    return StepMetrics(
        step=step,
        reward_mean=_number(logs, "reward"),
        reward_std=_number(logs, "reward_std"),
        kl=kl,
        kl_rolling=rolling_mean(kl_history, KL_WINDOW),
        loss=_number(logs, "loss"),
        grad_norm=_number(logs, "grad_norm"),
        completion_length=_number(logs, "completions/mean_length"),
        frac_reward_zero_std=_number(logs, "frac_reward_zero_std"),
        learning_rate=_number(logs, "learning_rate"),
        entropy=_number(logs, "entropy"),
        step_seconds=step_seconds,
        elapsed_seconds=elapsed_seconds,
        rewards=rewards,
        preference={key: value for key in PREFERENCE_FIGURES if (value := _number(logs, key)) is not None},
    )


def rolling_mean(values: Sequence[float], window: int) -> float | None:
    """Mean of the last `window` values (of all of them while there are fewer); None when empty."""
    if window < 1:
        raise ValueError("window must be >= 1")
    tail = list(values)[-window:]
    return sum(tail) / len(tail) if tail else None


# --------------------------------------------------------------------------- stop rules


def _no_signal(history: Sequence[StepMetrics]) -> bool:
    """Every step so far had zero reward variance in every group (an unknown share counts as signal)."""
    return bool(history) and all(
        m.frac_reward_zero_std is not None and m.frac_reward_zero_std >= _ZERO_STD_ALL for m in history
    )


def early_stop_reason(
    history: Sequence[StepMetrics], *, kl_budget: float, max_wall_seconds: float, elapsed_seconds: float
) -> str | None:
    """Why to stop after the last step in `history`, or None to go on.

    In order: `no_signal` when the first NO_SIGNAL_STEPS steps all lacked reward variance (GRPO's
    advantages are then all zero and nothing can be learned), `kl_budget` when the rolling KL to the
    reference exceeds the budget, `wall_clock` when the update ran past its time budget.
    """
    if len(history) >= NO_SIGNAL_STEPS and _no_signal(history):
        return "no_signal"
    kl_rolling = history[-1].kl_rolling if history else None
    if kl_rolling is not None and kl_rolling > kl_budget:
        return "kl_budget"
    if elapsed_seconds > max_wall_seconds:
        return "wall_clock"
    return None


def final_stop_reason(
    history: Sequence[StepMetrics], *, early_reason: str | None, steps: int, max_steps: int
) -> str:
    """The night's stop reason once training returned: the early one, else no_signal, max_steps or completed."""
    if early_reason is not None:
        return early_reason
    if _no_signal(history):
        return "no_signal"
    return "max_steps" if steps >= max_steps else "completed"


# --------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about the base model (read from its config, no weights)."""

    parameters: int
    hidden_size: int
    num_layers: int
    vocab_size: int
    linear_layers: tuple[tuple[str, int, int], ...]  # (module name, in_features, out_features)


def matches_target(module_name: str, target_modules: Sequence[str]) -> bool:
    """PEFT's rule for a list of targets: the module's name is a target or ends with "." + a target."""
    return any(module_name == target or module_name.endswith("." + target) for target in target_modules)


def lora_parameters(
    linear_layers: Sequence[tuple[str, int, int]], target_modules: Sequence[str], rank: int
) -> int:
    """Trainable LoRA parameters: A (rank x in) plus B (out x rank) for every targeted linear layer."""
    return sum(
        rank * (fan_in + fan_out)
        for name, fan_in, fan_out in linear_layers
        if matches_target(name, target_modules)
    )


# Order-of-magnitude throughput for the time estimate: sustained matmul FLOP/s, and the fixed cost of
# one forward pass (Python, kernel launches, sampling), which dominates small models. The CPU figures
# put the tiny model's measured steps on the project's 2-core machine within ~15%; CUDA's are guesses.
_FLOPS_PER_SECOND = {"cpu": 4e10, "cuda": 1e14}
_SECONDS_PER_PASS = {"cpu": 0.004, "cuda": 0.02}
# Activation elements kept per token, layer and unit of hidden size for the backward pass
# (attention projections, MLP at ~2.7x hidden, norms, residuals); without gradient checkpointing.
_ACTIVATION_ELEMENTS_PER_HIDDEN = 18
_ADAM_STATES = 2  # AdamW keeps two float32 moments per trainable parameter
_FLOAT32_BYTES = 4  # PEFT keeps LoRA weights, their gradients and the optimizer state in float32


@dataclass(frozen=True)
class TrainEstimate:
    """What one night's update should cost, logged before it starts (bytes are per process)."""

    device: str  # "cpu" or "cuda"
    trainable_parameters: int  # LoRA A and B matrices
    base_parameters: int  # frozen weights of the base model
    weights_bytes: int  # the base model, held once: the reference is an adapter on the same weights
    lora_bytes: int  # trainable adapter, plus the frozen champion copy when there is a champion
    optimizer_bytes: int  # gradients and AdamW moments of the trainable parameters
    activations_bytes: int  # saved activations for the backward pass and the generation KV cache
    total_bytes: int
    seconds_per_step: float  # generation, policy forward/backward and reference forward of one step
    max_seconds: float  # max_steps * seconds_per_step, capped by the wall-clock budget

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        gib = 1024**3
        return (
            f"{self.trainable_parameters:,} trainable LoRA parameters on a {self.base_parameters:,}-parameter "
            f"base ({self.device}); memory ~{self.total_bytes / gib:.2f} GiB per process (weights "
            f"{self.weights_bytes / gib:.2f}, LoRA {self.lora_bytes / gib:.3f}, optimizer "
            f"{self.optimizer_bytes / gib:.3f}, activations {self.activations_bytes / gib:.2f}); "
            f"~{self.seconds_per_step:.2f} s/step, at most ~{self.max_seconds:.1f} s"
        )


def estimate_from_shape(
    shape: ModelShape,
    *,
    rank: int,
    target_modules: Sequence[str],
    sequences_per_device: int,
    prompt_tokens: int,
    completion_tokens: int,
    max_steps: int,
    max_wall_seconds: float,
    device: str = "cpu",
    weight_bytes: int = 4,
    with_champion: bool = False,
    gradient_checkpointing: bool = False,
) -> TrainEstimate:
    """The cost of an update from the model's shape and the night's settings (see TrainEstimate).

    FLOPs per step: 2N per generated token, 4N per token for the policy's forward and backward (LoRA
    skips the base weights' gradients), 2N per token for the reference forward.
    """
    trainable = lora_parameters(shape.linear_layers, target_modules, rank)
    tokens = sequences_per_device * (prompt_tokens + completion_tokens)
    kept_layers = 1 if gradient_checkpointing else shape.num_layers
    per_token_elements = shape.hidden_size * (
        kept_layers * _ACTIVATION_ELEMENTS_PER_HIDDEN  # saved for the backward pass
        + shape.num_layers * 2  # generation KV cache (an upper bound: as many KV heads as query heads)
    )
    # TRL's fused LM head scores log-probs in chunks; one row of float32 logits per sequence while sampling.
    logits = sequences_per_device * shape.vocab_size * _FLOAT32_BYTES
    activations = tokens * per_token_elements * weight_bytes + logits
    flops = 2 * shape.parameters * (sequences_per_device * completion_tokens + 3 * tokens)
    passes = completion_tokens + 1 + 3 + 1  # decoding steps + prefill, policy forward/backward, reference
    seconds_per_step = flops / _FLOPS_PER_SECOND[device] + passes * _SECONDS_PER_PASS[device]
    weights = shape.parameters * weight_bytes
    lora = trainable * _FLOAT32_BYTES * (2 if with_champion else 1)
    optimizer = trainable * _FLOAT32_BYTES * (1 + _ADAM_STATES)
    return TrainEstimate(
        device=device,
        trainable_parameters=trainable,
        base_parameters=shape.parameters,
        weights_bytes=weights,
        lora_bytes=lora,
        optimizer_bytes=optimizer,
        activations_bytes=activations,
        total_bytes=weights + lora + optimizer + activations,
        seconds_per_step=seconds_per_step,
        max_seconds=min(max_steps * seconds_per_step, max_wall_seconds),
    )


def model_shape(base_model: str) -> ModelShape:
    """Parameter count and linear layers of the base model, built on the meta device (no weights read)."""
    config = AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    linears = tuple(
        (name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        hidden_size=int(text.hidden_size),
        num_layers=int(text.num_hidden_layers),
        vocab_size=int(text.vocab_size),
        linear_layers=linears,
    )


def estimate(
    settings: TrainConfig,
    base_model: str,
    *,
    prompt_tokens: int = PROMPT_TOKENS_GUESS,
    num_processes: int = 1,
    with_champion: bool = False,
    sequences_per_prompt: int | None = None,
) -> TrainEstimate:
    """Trainable parameters, memory per process and time per step of an update with these settings.

    `sequences_per_prompt`: sequences a step scores per example for methods other than GRPO (2 for a
    DPO pair, 1 for SFT); None is GRPO's group of `num_generations`.
    """
    on_cuda = torch.cuda.is_available()
    if sequences_per_prompt is None:
        layout = batch_layout(settings.prompts_per_step, settings.num_generations, num_processes)
        per_device = layout.per_device_completions
    else:
        per_device = max(1, settings.prompts_per_step * sequences_per_prompt // num_processes)
    return estimate_from_shape(
        model_shape(base_model),
        rank=settings.lora.rank,
        target_modules=settings.lora.target_modules,
        sequences_per_device=per_device,
        prompt_tokens=prompt_tokens,
        completion_tokens=settings.max_completion_tokens,
        max_steps=settings.max_steps,
        max_wall_seconds=settings.max_wall_seconds,
        device="cuda" if on_cuda else "cpu",
        weight_bytes=2 if on_cuda else 4,
        with_champion=with_champion,
        gradient_checkpointing=on_cuda,
    )
