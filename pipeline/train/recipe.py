"""What every training method of a night shares: the result, the model loading, the bounds callback,
the recipe skeleton and the adapter files. One module per method builds on it: `pipeline.train.grpo`
(RL on rewards), `pipeline.train.kto`, `pipeline.train.dpo` and `pipeline.train.sft` (feedback and
preferences, through `pipeline.train.feedback`); `pipeline.train.stage` picks one by `train.method`.

Why it is built this way:

- TRL's trainers do the learning and PEFT the adapter. Written here is only what they do not do for
  a nightly loop: continue from the champion with the champion (not the base) as the reference,
  bound the night (steps, wall clock, KL budget, no learning signal), measure the candidate's KL to
  the base, and leave a vLLM-loadable adapter directory with per-step metrics and sha256s for the
  gate and registry. Every method goes through the same `Recipe.save`, so every candidate carries
  the same facts to the same forgetting guard.
- The KL reference is what is serving. Each night's drift is then bounded against the champion, so
  a line of adapters cannot walk away from the base a budget's worth per night unnoticed; the KL to
  the base is measured after training and reported for the gate's own bound.
- A night that cannot learn (no signal, or too little data for its method) writes no adapter: the
  champion stays what it was, byte for byte, and the night says why.
- Recipe layout as in torchtune: `setup / train / save / cleanup`; the pure rules live in
  `pipeline.train.bounds`. The same code runs as several processes under `accelerate launch`
  (gloo on CPU): only the main process writes files, and stop decisions are taken on figures every
  process agrees on.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from abc import ABC, abstractmethod
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
    early_stop_reason,
    estimate,
    final_stop_reason,
    is_step_log,
    step_metrics,
)
from pipeline.train.kl import kl_to_base

__all__ = [
    "Recipe",
    "TrainEstimate",
    "TrainPrompt",
    "TrainResult",
    "estimate",
    "kl_to_base",
    "load_base",
    "load_champion",
    "lora_config",
    "save_adapter",
]

logger = logging.getLogger(__name__)

RewardFunction = Callable[..., list[float]]
Progress = Callable[[int, dict[str, float]], None]
KlProbe = Callable[[], float]

ADAPTER_DIR = "adapter"  # the candidate PEFT adapter inside out_dir
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "train_result.json"
KL_PROBE_PROMPTS = 16  # training prompts the KL to the base is measured on after training
METHODS = ("grpo", "kto", "dpo", "sft", "distill")


@dataclass(frozen=True)
class TrainResult:
    """What a night's update produced; `as_json` is the `train` entry of the run JSON."""

    adapter_dir: Path | None  # PEFT adapter directory (safetensors); None when nothing was trained
    steps: int
    stop_reason: str  # max_steps | wall_clock | kl_budget | no_signal | completed | too_little_data
    kl_to_champion: float | None  # last rolling KL to the reference (the champion, or the base without one)
    kl_to_base: float | None  # KL of the final adapter to the base on the prompts, measured after training
    metrics_path: Path  # metrics.jsonl, one line per step
    adapter_sha256: dict[str, str]  # file name -> sha256 of every file in adapter_dir
    wall_seconds: float
    trainable_parameters: int
    bounds: dict[str, float] = field(
        default_factory=dict
    )  # the limits this night ran under (see `night_bounds`)
    method: str = "grpo"
    detail: str | None = None  # why nothing was trained (too little data), in words
    data: dict[str, int] = field(default_factory=dict)  # examples the method trained on, by kind

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
            "method": self.method,
            "detail": self.detail,
            "data": dict(self.data),
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
        "beta": settings.beta if settings.method == "grpo" else settings.preference_beta,
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
    Methods whose trainer logs no KL to the reference (KTO, DPO, SFT) give a `kl_probe`: it measures
    the policy's KL to the reference on the same sampled prompts after each step (every process
    samples with the same seed, so all get the same figure) and replaces what the trainer logged.
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
        kl_probe: KlProbe | None = None,
    ) -> None:
        self.kl_probe = kl_probe
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
        logs = logs or {}
        if self.kl_probe is not None and is_step_log(logs):
            logs = {**logs, "kl": self.kl_probe()}
        now = time.perf_counter()
        metrics = step_metrics(
            logs,
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


def training_args(
    settings: TrainConfig, *, output_dir: Path, max_steps: int, batch_size: int
) -> dict[str, Any]:
    """The TrainingArguments every method's TRL config shares for one night; all bounds from `settings`."""
    on_cuda = torch.cuda.is_available()
    return {
        "output_dir": str(output_dir),
        "use_cpu": not on_cuda,
        "bf16": _dtype() == torch.bfloat16,
        "fp16": False,
        "seed": settings.seed,
        "data_seed": settings.seed,
        "max_steps": max_steps,
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": settings.learning_rate,
        # Constant: a night may end on its wall clock or KL budget, so a schedule that decays to zero at
        # max_steps would make the step size depend on a bound rather than on the learning rate.
        "lr_scheduler_type": "constant",
        "max_grad_norm": settings.max_grad_norm,
        # Memory for time on accelerators; tiny CPU models do not need it.
        "gradient_checkpointing": on_cuda,
        "ddp_find_unused_parameters": False,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
    }


class Recipe(ABC):
    """One night's update of a track's adapter: `setup`, `train`, `save`, `cleanup` (torchtune's shape).

    A method subclasses it and builds its TRL trainer in `setup` (with `start`, `load_policy` and
    `attach`); loading, bounds, saving and the result are the same for every method.
    """

    method = "grpo"

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
        self.prompts: list[TrainPrompt] = []  # tonight's prompts; the first KL_PROBE_PROMPTS probe the KL
        self.max_steps = 0
        self.trainer: Any = None
        self.bounds: NightBounds | None = None
        self.detail: str | None = None  # why nothing is trained tonight (too little data)
        self.data: dict[str, int] = {}

    @abstractmethod
    def setup(
        self,
        prompts: Sequence[TrainPrompt],
        reward_funcs: Sequence[RewardFunction],
        reward_weights: Sequence[float] | None,
        progress: Progress | None,
    ) -> None:
        """Build the method's trainer for tonight's prompts (or decide there is nothing to train)."""

    def run(
        self,
        prompts: Sequence[TrainPrompt],
        reward_funcs: Sequence[RewardFunction],
        reward_weights: Sequence[float] | None = None,
        progress: Progress | None = None,
    ) -> TrainResult:
        """setup, train and save; cleanup whatever happens."""
        try:
            self.setup(prompts, reward_funcs, reward_weights, progress)
            self.train()
            return self.save()
        finally:
            self.cleanup()

    # ------------------------------------------------------------------ setup helpers

    def start(self) -> None:
        """A clean output directory: no stale candidate from an earlier try, an empty metrics file."""
        candidate = self.out_dir / ADAPTER_DIR
        if self.champion is not None and self.champion.resolve() == candidate.resolve():
            raise ValueError(
                f"out_dir {self.out_dir} holds the champion; a night writes into a new directory"
            )
        if self.state.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(candidate, ignore_errors=True)
            self.metrics_path.write_text("", encoding="utf-8")
        self.state.wait_for_everyone()

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(self.base_model, padding_side="left")

    def load_policy(self) -> Any:
        """The base with the champion loaded trainable, or the bare base (the trainer adds a fresh LoRA)."""
        base = load_base(self.base_model)
        return base if self.champion is None else load_champion(base, self.champion, self.settings.lora)

    def night_bounds_callback(
        self, progress: Progress | None, kl_probe: KlProbe | None = None
    ) -> NightBounds:
        self.bounds = NightBounds(
            kl_budget=self.settings.kl_budget,
            max_wall_seconds=self.settings.max_wall_seconds,
            started=self.started,
            metrics_path=self.metrics_path,
            state=self.state,
            progress=progress,
            kl_probe=kl_probe,
        )
        return self.bounds

    def attach(self, trainer: Any) -> None:
        """Take the built trainer: silence its stdout logging and check it started from the champion."""
        self.trainer = trainer
        # Transformers prints every log line to stdout when tqdm is off; metrics.jsonl and `progress` replace it.
        trainer.remove_callback(PrinterCallback)
        if self.champion is not None:
            _check_loaded_champion(self.policy(), self.champion)
            check_champion_reference(self.policy())

    def log_estimate(
        self, tokenizer: PreTrainedTokenizerBase, *, sequences_per_prompt: int | None = None
    ) -> None:
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
            sequences_per_prompt=sequences_per_prompt,
        )
        backend = getattr(self.state, "backend", None) or "none"
        logger.info(
            "%d process(es), %s (backend %s)", self.state.num_processes, self.state.distributed_type, backend
        )
        logger.info("estimate (%s): %s", self.method, guess.summary())

    # ------------------------------------------------------------------ the rest of the night

    def policy(self) -> Any:
        """The PeftModel being trained, unwrapped from DDP."""
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def train(self) -> None:
        if self.trainer is not None:
            self.trainer.train()

    def nothing_trained_reason(self) -> str:
        """The stop reason of a night that built no trainer."""
        return "too_little_data" if self.detail else "no_signal"

    def save(self) -> TrainResult:
        history = self.bounds.history if self.bounds else []
        steps = self.trainer.state.global_step if self.trainer else 0
        stop_reason = final_stop_reason(
            history,
            early_reason=self.bounds.stop_reason if self.bounds else self.nothing_trained_reason(),
            steps=steps,
            max_steps=self.settings.max_steps,
        )
        adapter_dir, digests, kl_base = None, {}, None
        if stop_reason not in ("no_signal", "too_little_data") and steps > 0:
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
            method=self.method,
            detail=self.detail,
            data=dict(self.data),
        )
        if self.state.is_main_process:
            text = json.dumps(result.as_json(), indent=2, sort_keys=True) + "\n"
            (self.out_dir / RESULT_FILE).write_text(text, encoding="utf-8")
        logger.info(
            "train (%s): %s after %d steps, kl %s, kl to base %s%s",
            self.method,
            stop_reason,
            steps,
            result.kl_to_champion,
            kl_base,
            f" ({self.detail})" if self.detail else "",
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


def check_champion_reference(model: Any) -> None:
    """Fail loudly unless the champion is set up as a frozen "ref" adapter next to the trained one.

    GRPO, DPO and KTO (TRL 1.16) add it themselves when handed a PeftModel; `pipeline.train.feedback`
    adds it for SFT. Without it the reference would silently be the base.
    """
    if "ref" not in model.peft_config:
        raise RuntimeError(
            "the trainer did not create the frozen 'ref' adapter; the KL reference would be the base"
        )
    for name, parameter in model.named_parameters():
        if ".ref." in name and parameter.requires_grad:
            raise RuntimeError(f"reference adapter weight {name} is trainable")


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
