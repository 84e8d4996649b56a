"""GRPO: the bounded RL update on the track's reward (judge, graders, reward model).

TRL's `GRPOTrainer` does the RL (sampling groups, group-relative advantages, the clipped loss and the
KL penalty) and PEFT the adapter; `pipeline.train.recipe` holds what every method shares (loading,
bounds, saving). A night that cannot learn (every group's rewards tie, so every advantage is zero)
stops early and writes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import TrainConfig
from pipeline.results import TrainPrompt
from pipeline.train.bounds import batch_layout, planned_steps
from pipeline.train.recipe import Progress, Recipe, RewardFunction, TrainResult, lora_config, training_args

__all__ = ["GrpoRecipe", "grpo_args", "prompt_dataset", "run"]

logger = logging.getLogger(__name__)

# TRL computes reference log-probs (and logs `kl`) only when beta != 0. With beta = 0 the KL budget
# still needs that figure, so the penalty is made negligible instead of absent.
_MEASURE_ONLY_BETA = 1e-12


def prompt_dataset(prompts: Sequence[TrainPrompt]) -> Any:
    """A `datasets.Dataset` with `prompt` (chat messages), `reference` and one column per metadata key."""
    from datasets import Dataset

    keys = sorted({key for prompt in prompts for key in prompt.metadata})
    clash = {"prompt", "reference"} & set(keys)
    if clash:
        raise ValueError(f"prompt metadata may not use the reserved column names {sorted(clash)}")
    rows = []
    for index, prompt in enumerate(prompts):
        if not prompt.messages or prompt.messages[-1].get("role") != "user":
            raise ValueError(f"prompt {index}: messages must end with a user turn")
        row = {"prompt": [dict(message) for message in prompt.messages], "reference": prompt.reference}
        rows.append(row | {key: prompt.metadata.get(key) for key in keys})
    return Dataset.from_list(rows)


def grpo_args(
    settings: TrainConfig,
    *,
    output_dir: Path,
    per_device_completions: int,
    max_steps: int,
    reward_weights: Sequence[float] | None,
) -> Any:
    """TRL's GRPOConfig for one night: every bound comes from `settings`."""
    from trl.trainer.grpo_config import GRPOConfig

    return GRPOConfig(
        **training_args(
            settings, output_dir=output_dir, max_steps=max_steps, batch_size=per_device_completions
        ),
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_tokens,
        temperature=settings.temperature,
        beta=settings.beta if settings.beta > 0 else _MEASURE_ONLY_BETA,
        reward_weights=list(reward_weights) if reward_weights is not None else None,
    )


class GrpoRecipe(Recipe):
    """One night's GRPO update."""

    method = "grpo"

    def setup(
        self,
        prompts: Sequence[TrainPrompt],
        reward_funcs: Sequence[RewardFunction],
        reward_weights: Sequence[float] | None,
        progress: Progress | None,
    ) -> None:
        settings = self.settings
        if not reward_funcs:
            raise ValueError("at least one reward function is needed")
        if reward_weights is not None and len(reward_weights) != len(reward_funcs):
            raise ValueError(f"{len(reward_weights)} reward weights for {len(reward_funcs)} reward functions")
        self.prompts = list(prompts)[: settings.max_prompts]
        layout = batch_layout(settings.prompts_per_step, settings.num_generations, self.state.num_processes)
        self.max_steps = planned_steps(
            len(self.prompts), settings.prompts_per_step, settings.max_steps, settings.epochs
        )
        self.start()
        if self.max_steps == 0:
            logger.warning(
                "%d prompts are fewer than prompts_per_step=%d: nothing to train on tonight",
                len(self.prompts),
                settings.prompts_per_step,
            )
            return

        from trl.trainer.grpo_trainer import GRPOTrainer

        tokenizer = self.tokenizer()
        self.log_estimate(tokenizer)
        # Continual: the champion is loaded trainable and handed to TRL as a PeftModel. For exactly that
        # case GRPOTrainer.__init__ (TRL 1.16) adds a second adapter "ref", a copy of "default" made
        # before any update and frozen (PEFT marks only the active adapter trainable), and computes the
        # reference log-probs under `use_adapter(model, "ref")`. That is the hook this stage needs, so it
        # is used as is instead of overridden: the reference is the champion, at the cost of one more
        # LoRA copy and no second base model. `check_champion_reference` fails the night if a TRL
        # version falls back to the base. Without a champion a fresh LoRA (B = 0) starts equal to the
        # base, and TRL's default reference (adapters disabled) is the base: what is serving.
        model = self.load_policy()
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=list[Any](reward_funcs),
            args=grpo_args(
                settings,
                output_dir=self.out_dir / ".trainer",
                per_device_completions=layout.per_device_completions,
                max_steps=self.max_steps,
                reward_weights=reward_weights,
            ),
            # `epochs` passes: the prompts repeated (the trainer's sampler shuffles them).
            train_dataset=prompt_dataset(self.prompts * settings.epochs),
            processing_class=tokenizer,
            peft_config=lora_config(settings.lora) if self.champion is None else None,
            callbacks=[self.night_bounds_callback(progress)],
        )
        self.attach(trainer)


def run(
    settings: TrainConfig,
    prompts: Sequence[TrainPrompt],
    reward_funcs: Sequence[RewardFunction],
    *,
    base_model: str,
    out_dir: Path,
    champion: Path | None = None,
    reward_weights: Sequence[float] | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train tonight's candidate adapter with GRPO from `champion` (or a fresh LoRA) within the bounds.

    Writes into `out_dir`: `adapter/` (unless no_signal), `metrics.jsonl` and `train_result.json`.
    `progress(step, figures)` is called after each step. Under `accelerate launch` every process
    calls this and gets the same result; only the main process writes and reports progress.
    """
    recipe = GrpoRecipe(
        settings, base_model=base_model, out_dir=out_dir, champion=champion, started=time.perf_counter()
    )
    return recipe.run(prompts, reward_funcs, reward_weights, progress)
