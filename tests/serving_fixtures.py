"""Distinct, deterministic LoRA adapters on the tiny model, for serving tests and the serving benchmark.

A hot-swap test is only as good as its ability to tell versions apart: if two adapters gave the same
greedy replies, "the stable name now serves v2" could not fail. PEFT initialises LoRA B to zero (an
adapter that changes nothing), so these adapters draw A and B from a seeded RNG with a scale large
enough that the tiny model's greedy replies change; `distinct_adapters` checks in-process, with
transformers, that every pair of adapters answers the probe prompts differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.adapters import AdapterVersion, adapter_sha256
from pipeline.deploy.hotswap import PROBE_MAX_TOKENS, PROBE_PROMPTS

LORA_RANK = 8
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WEIGHT_STD = 0.35  # std of the random A and B entries: large enough to move greedy replies


def make_adapter(model_dir: Path, out_dir: Path, *, seed: int) -> Path:
    """Save a PEFT LoRA adapter (safetensors) with seeded random A/B weights into `out_dir`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(TARGET_MODULES))
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * WEIGHT_STD)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    for path in [out_dir, *out_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out_dir


def greedy_replies(
    model_dir: Path, adapter_dir: Path | None, max_new_tokens: int = PROBE_MAX_TOKENS
) -> list[str]:
    """The probe prompts' greedy replies in-process (transformers), base model or base + adapter."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    replies = []
    for chat in PROBE_PROMPTS:
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
        input_ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
        replies.append(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True))
    return replies


def distinct_adapters(
    model_dir: Path, root: Path, track: str, versions: Sequence[int], *, seed: int = 0
) -> list[AdapterVersion]:
    """One adapter per version under `root/<track>/v<N>`, each answering the probes differently."""
    adapters = []
    for version in versions:
        path = make_adapter(model_dir, root / track / f"v{version}", seed=seed * 1000 + version)
        adapters.append(AdapterVersion(track, version, path, adapter_sha256(path)))
    replies = [tuple(greedy_replies(model_dir, adapter.path)) for adapter in adapters]
    if len(set(replies)) != len(replies):
        raise AssertionError(f"adapters for {track} do not differ under greedy decoding: {replies}")
    return adapters
