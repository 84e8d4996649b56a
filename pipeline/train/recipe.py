"""The bounded LoRA RL update (GRPO): one night's training of a track's adapter, from its champion.

Why it is built this way:

- TRL's `GRPOTrainer` does the RL (sampling groups, group-relative advantages, the clipped loss and
  the KL penalty) and PEFT the adapter. Written here is only what they do not do for a nightly loop:
  continue from the champion with the champion (not the base) as the KL reference, bound the night
  (steps, wall clock, KL budget, no learning signal), measure the candidate's KL to the base, and
  leave a vLLM-loadable adapter directory with per-step metrics and sha256s for the gate and registry.
- The KL reference is what is serving. Each night's drift is then bounded against the champion, so
  a line of adapters cannot walk away from the base a budget's worth per night unnoticed; the KL to
  the base is measured after training and reported for the gate's own bound.
- A night that cannot learn (every group's rewards tie, so every advantage is zero) stops early and
  writes nothing: the champion stays what it was, byte for byte.
- Recipe layout as in torchtune: `setup / train / save / cleanup`; the pure rules live in
  `pipeline.train.bounds`. The same code runs as several processes under `accelerate launch`
  (gloo on CPU): only the main process writes files, and stop decisions are taken on figures every
  process agrees on.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback

from pipeline.adapters import check_adapter_dir, digest_of, file_digests
from pipeline.config import LoraConfig, TrainConfig
from pipeline.results import TrainPrompt
from pipeline.train.bounds import (
    PROMPT_TOKENS_GUESS,
    StepMetrics,
    TrainEstimate,
    batch_layout,
    early_stop_reason,
    estimate,
    final_stop_reason,
    planned_steps,
    step_metrics,
)
from pipeline.train.job import load_job
from pipeline.train.kl import kl_to_base
from storage.errors import UserError

__all__ = ["TrainEstimate", "TrainPrompt", "TrainResult", "estimate", "kl_to_base", "load_champion", "run"]

logger = logging.getLogger(__name__)

RewardFunction = Callable[..., list[float]]
Progress = Callable[[int, dict[str, float]], None]

ADAPTER_DIR = "adapter"  # the candidate PEFT adapter inside out_dir
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "train_result.json"
KL_PROBE_PROMPTS = 16  # training prompts the KL to the base is measured on after training
# TRL computes reference log-probs (and logs `kl`) only when beta != 0. With beta = 0 the KL budget
# still needs that figure, so the penalty is made negligible instead of absent.
_MEASURE_ONLY_BETA = 1e-12


@dataclass(frozen=True)
class TrainResult:
    """What a night's update produced; `as_json` is the `train` entry of the run JSON."""

    adapter_dir: Path | None  # PEFT adapter directory (safetensors); None when nothing was trained
    steps: int
    stop_reason: str  # max_steps | wall_clock | kl_budget | no_signal | completed
    kl_to_champion: float | None  # last rolling KL to the reference (the champion, or the base without one)
    kl_to_base: float | None  # KL of the final adapter to the base on the prompts, measured after training
    metrics_path: Path  # metrics.jsonl, one line per step
    adapter_sha256: dict[str, str]  # file name -> sha256 of every file in adapter_dir
    wall_seconds: float
    trainable_parameters: int
    bounds: dict[str, float] = field(
        default_factory=dict
    )  # the limits this night ran under (see `night_bounds`)

    @property
    def adapter_digest(self) -> str | None:
        """The adapter directory's digest (`pipeline.adapters.adapter_sha256`), None without an adapter."""
        return digest_of(self.adapter_sha256) if self.adapter_dir else None

    def as_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "stop_reason": self.stop_reason,
            "kl": self.kl_to_champion,
            "kl_to_champion": self.kl_to_champion,
            "kl_to_base": self.kl_to_base,
            "adapter_dir": str(self.adapter_dir) if self.adapter_dir else None,
            "adapter_sha256": dict(self.adapter_sha256),
            "adapter_digest": self.adapter_digest,
            "metrics_path": str(self.metrics_path),
            "wall_seconds": self.wall_seconds,
            "trainable_parameters": self.trainable_parameters,
            "bounds": dict(self.bounds),
        }


def night_bounds(settings: TrainConfig, planned_steps: int) -> dict[str, float]:
    """The limits a night runs under, reported next to what it did (steps planned: one pass, capped)."""
    return {
        "max_steps": settings.max_steps,
        "planned_steps": planned_steps,
        "max_wall_seconds": settings.max_wall_seconds,
        "kl_budget": settings.kl_budget,
        "learning_rate": settings.learning_rate,
        "max_grad_norm": settings.max_grad_norm,
        "beta": settings.beta,
        "lora_rank": settings.lora.rank,
        "lora_alpha": settings.lora.alpha,
    }


# --------------------------------------------------------------------------- models and data


def _dtype() -> torch.dtype:
    """float32 on CPU; bfloat16 on GPUs that have it."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_base(base_model: str) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(base_model, dtype=_dtype())


def lora_config(lora: LoraConfig) -> Any:
    """PEFT's LoraConfig for a fresh adapter from the track's `lora` settings."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_champion(base: PreTrainedModel, champion: Path, lora: LoraConfig) -> Any:
    """The base with the champion adapter loaded TRAINABLE under the name "default".

    The champion's own rank, alpha and target modules win over the settings (an adapter line cannot
    change shape between nights); a mismatch is logged.
    """
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(champion), is_trainable=True)
    config: Any = model.peft_config["default"]
    saved = (config.r, config.lora_alpha, sorted(config.target_modules or []))
    wanted = (lora.rank, lora.alpha, sorted(lora.target_modules))
    if saved != wanted:
        logger.warning(
            "champion %s has LoRA (r, alpha, targets) %s, settings say %s; continuing with the champion's",
            champion,
            saved,
            wanted,
        )
    return model


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


def _check_loaded_champion(model: Any, champion: Path) -> None:
    """The trainable "default" adapter must equal the champion's saved weights, tensor for tensor.

    PEFT only warns about missing or unexpected keys when loading; a night that silently started
    from a partly initialised adapter would train and be gated against the wrong champion.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(champion / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model, adapter_name="default")
    if saved.keys() != loaded.keys():
        raise RuntimeError(f"champion {champion}: loaded adapter keys differ from the saved ones")
    for key, tensor in saved.items():
        if not torch.equal(loaded[key].detach().cpu().to(tensor.dtype), tensor):
            raise RuntimeError(f"champion {champion}: {key} differs from the saved weights after loading")


def _check_champion_reference(model: Any) -> None:
    """Fail loudly unless TRL set the champion up as a frozen "ref" adapter (see GrpoRecipe.setup)."""
    if "ref" not in model.peft_config:
        raise RuntimeError(
            "GRPOTrainer did not create the frozen 'ref' adapter; the KL reference would be the base"
        )
    for name, parameter in model.named_parameters():
        if ".ref." in name and parameter.requires_grad:
            raise RuntimeError(f"reference adapter weight {name} is trainable")


# --------------------------------------------------------------------------- bounds callback


def process_state() -> PartialState:
    """This process's place in the launch. On a machine without CUDA it must be created with cpu=True
    before anything else touches accelerate, or a multi-process launch is taken for a single process."""
    return PartialState(cpu=not torch.cuda.is_available())


def _slowest(seconds: float, state: PartialState) -> float:
    """The largest of every process's elapsed time, so that all processes take the same stop decision."""
    if state.num_processes == 1 or not torch.distributed.is_initialized():
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=state.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return float(value.item())


class NightBounds(TrainerCallback):
    """Writes metrics.jsonl and stops training at the end of a step once a bound is hit.

    Runs on every process. TRL's logged figures (reward, kl, zero-std share, loss) are already
    reduced over processes and the elapsed time is reduced here, so every process stops together.
    """

    def __init__(
        self,
        *,
        kl_budget: float,
        max_wall_seconds: float,
        started: float,
        metrics_path: Path,
        state: PartialState,
        progress: Progress | None,
    ) -> None:
        self.kl_budget = kl_budget
        self.max_wall_seconds = max_wall_seconds
        self.started = started
        self.metrics_path = metrics_path
        self.state = state
        self.progress = progress
        self.history: list[StepMetrics] = []
        self.stop_reason: str | None = None
        self._last_step_end = started

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last_step_end = time.perf_counter()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        now = time.perf_counter()
        metrics = step_metrics(
            logs or {},
            step=state.global_step,
            step_seconds=now - self._last_step_end,
            elapsed_seconds=now - self.started,
            previous=self.history,
        )
        if metrics is None:
            return
        self._last_step_end = now
        self.history.append(metrics)
        if self.state.is_main_process:
            with self.metrics_path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(metrics.as_json(), sort_keys=True) + "\n")
            if self.progress is not None:
                self.progress(metrics.step, metrics.flat())
        reason = early_stop_reason(
            self.history,
            kl_budget=self.kl_budget,
            max_wall_seconds=self.max_wall_seconds,
            elapsed_seconds=_slowest(now - self.started, self.state),
        )
        if reason is not None:
            logger.info("stopping after step %d: %s", metrics.step, reason)
            self.stop_reason = reason
            control.should_training_stop = True


# --------------------------------------------------------------------------- the recipe


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

    on_cuda = torch.cuda.is_available()
    return GRPOConfig(
        output_dir=str(output_dir),
        use_cpu=not on_cuda,
        bf16=_dtype() == torch.bfloat16,
        fp16=False,
        seed=settings.seed,
        data_seed=settings.seed,
        max_steps=max_steps,
        per_device_train_batch_size=per_device_completions,
        gradient_accumulation_steps=1,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_tokens,
        temperature=settings.temperature,
        beta=settings.beta if settings.beta > 0 else _MEASURE_ONLY_BETA,
        learning_rate=settings.learning_rate,
        # Constant: a night may end on its wall clock or KL budget, so a schedule that decays to zero at
        # max_steps would make the step size depend on a bound rather than on the learning rate.
        lr_scheduler_type="constant",
        max_grad_norm=settings.max_grad_norm,
        reward_weights=list(reward_weights) if reward_weights is not None else None,
        # Memory for time on accelerators; tiny CPU models do not need it.
        gradient_checkpointing=on_cuda,
        ddp_find_unused_parameters=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )


class GrpoRecipe:
    """One night's GRPO update: `setup`, `train`, `save`, `cleanup` (torchtune's recipe shape)."""

    def __init__(
        self, settings: TrainConfig, *, base_model: str, out_dir: Path, champion: Path | None, started: float
    ) -> None:
        self.settings = settings
        self.base_model = base_model
        self.out_dir = Path(out_dir)
        self.champion = Path(champion) if champion is not None else None
        self.started = started
        self.state = process_state()
        self.metrics_path = self.out_dir / METRICS_FILE
        self.prompts: list[TrainPrompt] = []
        self.max_steps = 0
        self.trainer: Any = None
        self.bounds: NightBounds | None = None

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
        candidate = self.out_dir / ADAPTER_DIR
        if self.champion is not None and self.champion.resolve() == candidate.resolve():
            raise ValueError(
                f"out_dir {self.out_dir} holds the champion; a night writes into a new directory"
            )
        if self.state.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(candidate, ignore_errors=True)  # a stale candidate from an earlier try
            self.metrics_path.write_text("", encoding="utf-8")
        self.state.wait_for_everyone()
        if self.max_steps == 0:
            logger.warning(
                "%d prompts are fewer than prompts_per_step=%d: nothing to train on tonight",
                len(self.prompts),
                settings.prompts_per_step,
            )
            return

        from trl.trainer.grpo_trainer import GRPOTrainer

        tokenizer = AutoTokenizer.from_pretrained(self.base_model, padding_side="left")
        self._log_estimate(tokenizer)
        base = load_base(self.base_model)
        # Continual: the champion is loaded trainable and handed to TRL as a PeftModel. For exactly that
        # case GRPOTrainer.__init__ (TRL 1.16) adds a second adapter "ref", a copy of "default" made
        # before any update and frozen (PEFT marks only the active adapter trainable), and computes the
        # reference log-probs under `use_adapter(model, "ref")`. That is the hook this stage needs, so it
        # is used as is instead of overridden: the reference is the champion, at the cost of one more
        # LoRA copy and no second base model. `_check_champion_reference` fails the night if a TRL
        # version falls back to the base. Without a champion a fresh LoRA (B = 0) starts equal to the
        # base, and TRL's default reference (adapters disabled) is the base: what is serving.
        model = base if self.champion is None else load_champion(base, self.champion, settings.lora)
        self.bounds = NightBounds(
            kl_budget=settings.kl_budget,
            max_wall_seconds=settings.max_wall_seconds,
            started=self.started,
            metrics_path=self.metrics_path,
            state=self.state,
            progress=progress,
        )
        self.trainer = GRPOTrainer(
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
            callbacks=[self.bounds],
        )
        # Transformers prints every log line to stdout when tqdm is off; metrics.jsonl and `progress` replace it.
        self.trainer.remove_callback(PrinterCallback)
        if self.champion is not None:
            _check_loaded_champion(self.policy(), self.champion)
            _check_champion_reference(self.policy())

    def _log_estimate(self, tokenizer: PreTrainedTokenizerBase) -> None:
        lengths = [
            len(
                tokenizer.apply_chat_template(
                    p.messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            for p in self.prompts[:64]  # a sample is enough for a length
        ]
        guess = estimate(
            self.settings,
            self.base_model,
            prompt_tokens=max(lengths, default=PROMPT_TOKENS_GUESS),
            num_processes=self.state.num_processes,
            with_champion=self.champion is not None,
        )
        backend = getattr(self.state, "backend", None) or "none"
        logger.info(
            "%d process(es), %s (backend %s)", self.state.num_processes, self.state.distributed_type, backend
        )
        logger.info("estimate: %s", guess.summary())

    def policy(self) -> Any:
        """The PeftModel being trained, unwrapped from DDP."""
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def train(self) -> None:
        if self.trainer is not None:
            self.trainer.train()

    def save(self) -> TrainResult:
        history = self.bounds.history if self.bounds else []
        steps = self.trainer.state.global_step if self.trainer else 0
        stop_reason = final_stop_reason(
            history,
            early_reason=self.bounds.stop_reason if self.bounds else "no_signal",
            steps=steps,
            max_steps=self.settings.max_steps,
        )
        adapter_dir, digests, kl_base = None, {}, None
        if stop_reason != "no_signal" and steps > 0:
            kl_base = kl_to_base(
                self.policy(),
                self.trainer.processing_class,
                [prompt.messages for prompt in self.prompts[:KL_PROBE_PROMPTS]],
                max_new_tokens=self.settings.max_completion_tokens,
                temperature=self.settings.temperature,
                seed=self.settings.seed,
            )
            adapter_dir = self.out_dir / ADAPTER_DIR
            if self.state.is_main_process:
                save_adapter(self.policy(), adapter_dir, self.base_model)
            self.state.wait_for_everyone()
            digests = file_digests(adapter_dir)
        result = TrainResult(
            adapter_dir=adapter_dir,
            steps=steps,
            stop_reason=stop_reason,
            kl_to_champion=history[-1].kl_rolling if history else None,
            kl_to_base=kl_base,
            metrics_path=self.metrics_path,
            adapter_sha256=digests,
            wall_seconds=time.perf_counter() - self.started,
            trainable_parameters=self._trainable_parameters(),
            bounds=night_bounds(self.settings, self.max_steps),
        )
        if self.state.is_main_process:
            text = json.dumps(result.as_json(), indent=2, sort_keys=True) + "\n"
            (self.out_dir / RESULT_FILE).write_text(text, encoding="utf-8")
        logger.info(
            "train: %s after %d steps, kl %s, kl to base %s",
            stop_reason,
            steps,
            result.kl_to_champion,
            kl_base,
        )
        return result

    def _trainable_parameters(self) -> int:
        if self.trainer is None:
            return 0
        return sum(p.numel() for p in self.policy().parameters() if p.requires_grad)

    def cleanup(self) -> None:
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            shutil.rmtree(self.out_dir / ".trainer", ignore_errors=True)
        self.trainer = None
        gc.collect()


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
    try:
        recipe.setup(prompts, reward_funcs, reward_weights, progress)
        recipe.train()
        return recipe.save()
    finally:
        recipe.cleanup()


# --------------------------------------------------------------------------- adapter files


def save_adapter(model: Any, adapter_dir: Path, base_model: str) -> None:
    """Write the trained adapter ("default" only, not TRL's "ref" copy) as safetensors, atomically."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = base_model
    # PEFT keeps target_modules as a set and writes it in hash order; sorted, the bytes are reproducible.
    config.target_modules = sorted(config.target_modules)
    staging = adapter_dir.with_name(f".{adapter_dir.name}.saving")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), selected_adapters=["default"], safe_serialization=True)
    # PEFT's placeholder model card ("More Information Needed"); the registry holds the real facts.
    (staging / "README.md").unlink(missing_ok=True)
    check_adapter_dir(staging)
    staging.chmod(0o755)  # readable by a vLLM server running as another user
    for path in staging.iterdir():
        path.chmod(0o644)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    staging.rename(adapter_dir)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.train JOB.yaml` (see `TrainJob`); prints the result JSON from the main process.

    Every process of an `accelerate launch` runs this; exit 2 with one line on stderr for a bad job.
    """
    parser = argparse.ArgumentParser(description="Run one bounded GRPO update (a night's training).")
    parser.add_argument(
        "job", type=Path, help="YAML or JSON job file: base_model, out_dir, train, prompts, graders"
    )
    args = parser.parse_args(argv)
    state = process_state()
    logging.basicConfig(
        level=logging.INFO if state.is_main_process else logging.WARNING,
        format=f"%(levelname)s [rank {state.process_index}] %(name)s: %(message)s",
    )
    from evals.graders import as_reward_function, weighted_grader

    try:
        job = load_job(args.job)
        graders = [weighted_grader(spec)[1] for spec in job.graders]
    except UserError as error:
        sys.stderr.write(f"{error}\n")
        return 2
    result = run(
        job.train,
        [TrainPrompt(p.messages, p.reference, p.metadata) for p in job.prompts],
        [as_reward_function(grader) for grader in graders],
        base_model=job.base_model,
        out_dir=job.out_dir,
        champion=job.champion,
        reward_weights=job.reward_weights(),
    )
    if state.is_main_process:
        sys.stdout.write(json.dumps(result.as_json(), sort_keys=True) + "\n")
    return 0
