"""Training benchmark: where a GRPO step's time goes, tokens/s, peak memory, LoRA vs full-parameter.

Each measurement runs in a fresh process (so peak memory is its own), side by side in one run:
  - LoRA through the real stage (`pipeline.train.grpo.run`): per step, generation vs optimisation seconds
    (generation timed around `generate`), completion tokens/s, peak memory;
  - full-parameter GRPO on the same model, data and settings (TRL without PEFT): peak memory;
  - the ratio of the two peaks.
Shapes: `tiny` (the project's tiny Llama) and, meant for a GPU, `qwen2.5-0.5b` (random weights written
from the Qwen2.5-0.5B config: real sizes, no download).

    .venv/bin/python bench/train.py [--shape tiny|qwen2.5-0.5b] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

QWEN_05B = {  # Qwen2.5-0.5B's architecture (config.json of the published model)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "hidden_act": "silu",
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=["tiny", "qwen2.5-0.5b"], default="tiny")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model, out = args.child
        result = (
            _lora_child(model, Path(out), args.steps)
            if mode == "lora"
            else _full_child(model, Path(out), args.steps)
        )
        print(json.dumps(result))
        return
    work = Path(tempfile.mkdtemp(prefix="overnight-bench-train-"))
    model = _model_dir(args.shape, work)
    lora = _in_child("lora", model, work / "lora", args.steps)
    full = _in_child("full", model, work / "full", args.steps)
    figures = {
        "shape": args.shape,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "steps": lora["steps"],
        **{f"lora_{key}": value for key, value in lora.items() if key != "steps"},
        "full_peak_memory_mb": full["peak_memory_mb"],
        "full_step_seconds": full["step_seconds"],
    }
    figures["lora_vs_full_peak_memory"] = figures["lora_peak_memory_mb"] / figures["full_peak_memory_mb"]
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, indent=2))
    print(
        f"\n{figures['shape']} on {figures['device']}: step {lora['step_seconds']:.2f}s, of which generation "
        f"{lora['generation_share']:.0%}; {lora['completion_tokens_per_s']:.0f} completion tokens/s; peak memory "
        f"LoRA {lora['peak_memory_mb']:.0f} MB vs full-parameter {full['peak_memory_mb']:.0f} MB "
        f"({figures['lora_vs_full_peak_memory']:.2f}x)"
    )


def _model_dir(shape: str, work: Path) -> Path:
    from pipeline.demo_world.tiny_model import build_tiny_model

    tiny = build_tiny_model(work / "tiny-model")
    if shape == "tiny":
        return tiny
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model(**{k: v for k, v in QWEN_05B.items() if k != "architectures"})
    tokenizer = AutoTokenizer.from_pretrained(tiny)  # ids stay below 1024, inside Qwen's vocabulary
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    target = work / "qwen2.5-0.5b-random"
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _in_child(mode: str, model: Path, out: Path, steps: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--steps", str(steps), "--child", mode, str(model), str(out)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _settings(steps: int) -> Any:
    from pipeline.config import TrainConfig

    return TrainConfig(
        max_steps=steps, max_wall_seconds=3600, kl_budget=10.0, num_generations=4, prompts_per_step=4,
        max_completion_tokens=32, temperature=1.0, learning_rate=1e-4,
    )  # fmt: skip


def _prompts() -> list[Any]:
    from pipeline.demo_world.synthetic_traffic import generate_records
    from pipeline.train.recipe import TrainPrompt

    records = generate_records(64, seed=5, tracks=("math",))
    return [TrainPrompt(messages=r["messages"], reference=str(r["metadata"]["answer"])) for r in records]


def _reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """Shorter is better: a preference with reward variance on a random model."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 / (1.0 + len(text)) for text in texts]


class _GenerationClock:
    """Seconds spent inside `generate` (the rollout part of a GRPO step)."""

    def __init__(self) -> None:
        from transformers.generation.utils import GenerationMixin

        self.seconds = 0.0
        original = GenerationMixin.generate

        def timed(model: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(model, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        GenerationMixin.generate = timed  # type: ignore[method-assign]


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lora_child(model: str, out: Path, steps: int) -> dict[str, Any]:
    from pipeline.train.grpo import run

    clock = _GenerationClock()
    start = time.perf_counter()
    result = run(_settings(steps), _prompts(), [_reward], base_model=model, out_dir=out)
    seconds = time.perf_counter() - start
    lines = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    step_seconds = sum(line.get("step_seconds", 0.0) for line in lines) or seconds
    completions = result.steps * 16  # prompts_per_step x num_generations
    mean_length = sum(line.get("completion_length", 0.0) for line in lines) / max(len(lines), 1)
    return {
        "steps": result.steps,
        "step_seconds": step_seconds / max(result.steps, 1),
        "generation_seconds_per_step": clock.seconds / max(result.steps, 1),
        "optimisation_seconds_per_step": (step_seconds - clock.seconds) / max(result.steps, 1),
        "generation_share": clock.seconds / step_seconds,
        "completion_tokens_per_s": completions * mean_length / clock.seconds if clock.seconds else 0.0,
        "peak_memory_mb": _peak_memory_mb(),
        "trainable_parameters": result.trainable_parameters,
    }


def _full_child(model: str, out: Path, steps: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from pipeline.train.grpo import grpo_args, prompt_dataset

    settings = _settings(steps)
    args = grpo_args(
        settings, output_dir=out, per_device_completions=16, max_steps=steps, reward_weights=None
    )
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    trainer = GRPOTrainer(
        model=policy, reward_funcs=[_reward], args=args, train_dataset=prompt_dataset(_prompts()),
        processing_class=AutoTokenizer.from_pretrained(model),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    return {"step_seconds": (time.perf_counter() - start) / steps, "peak_memory_mb": _peak_memory_mb()}


if __name__ == "__main__":
    main()
