"""The KL of an adapter to its base (or to the champion): exact, per token, over the full vocabulary,
on sampled completions.

Why its own module: the training stage measures it after an update (the night's `kl` figure and the
KL budget's last word), the feedback methods measure it after every step for their KL budget, and the
forgetting guard measures it again on suite prompts; all must use the same arithmetic.
`completion_mask` and `masked_token_kl` are pure tensor functions; `kl_to_reference` samples with the
adapter on and scores the same tokens inside a reference context (`kl_to_base`: adapters off).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

KL_PROBE_SAMPLES = 2  # completions sampled per prompt when measuring the KL to the base
KL_PROBE_BATCH = 4  # prompts per forward pass there (bounds the full-vocabulary logits held at once)


def completion_mask(completion_ids: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """1.0 for each generated token up to and including the first stop token, 0.0 after it.

    completion_ids: (B, C) token ids; returns (B, C) float.
    """
    is_stop = torch.isin(completion_ids, torch.tensor(list(stop_ids), device=completion_ids.device)).int()
    stops_before = torch.cumsum(is_stop, dim=1) - is_stop
    return (stops_before == 0).float()


def masked_token_kl(
    policy_logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor
) -> tuple[float, float]:
    """Sum over the masked positions of KL(policy || base) over the vocabulary, and the number of positions.

    policy_logits, base_logits: (B, C, V), already divided by the sampling temperature; mask: (B, C).
    """
    policy_logp = torch.log_softmax(policy_logits.float(), dim=-1)
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    per_token = (policy_logp.exp() * (policy_logp - base_logp)).sum(dim=-1)  # (B, C)
    return float((per_token * mask).sum()), float(mask.sum())


def kl_to_base(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    samples_per_prompt: int = KL_PROBE_SAMPLES,
) -> float:
    """Mean per-token KL(adapter || base) on completions the PeftModel `model` samples for `chats`.

    Exact over the vocabulary at each generated position, at the training temperature (the same
    quantity TRL's `kl` estimates per token), with the adapter disabled for the base. Sampling is
    seeded, so the figure is reproducible.
    """
    return kl_to_reference(
        model,
        tokenizer,
        chats,
        reference=model.disable_adapter,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        samples_per_prompt=samples_per_prompt,
    )


@torch.no_grad()
def kl_to_reference(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[list[dict[str, str]]],
    *,
    reference: Callable[[], AbstractContextManager[Any]],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    samples_per_prompt: int = KL_PROBE_SAMPLES,
) -> float:
    """Mean per-token KL(policy || reference) on completions `model` samples for `chats`, where
    `reference()` is a context in which `model` computes the reference (adapters off, or the "ref"
    adapter active)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop_ids = _stop_ids(model, tokenizer)
    total = count = 0.0
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(chats), KL_PROBE_BATCH):
                batch = chats[start : start + KL_PROBE_BATCH]
                part, tokens = _probe_batch_kl(
                    model,
                    tokenizer,
                    batch,
                    stop_ids,
                    max_new_tokens,
                    temperature,
                    samples_per_prompt,
                    reference,
                )
                total, count = total + part, count + tokens
    finally:
        model.train(was_training)
    return total / count if count else 0.0


def _stop_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids: list[int] = [configured] if isinstance(configured, int) else list(configured or [])
    eos = tokenizer.eos_token_id
    if isinstance(eos, int) and eos not in ids:
        ids.append(eos)
    return ids


def _probe_batch_kl(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    chats: Sequence[list[dict[str, str]]],
    stop_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    samples: int,
    reference: Callable[[], AbstractContextManager[Any]],
) -> tuple[float, float]:
    device = next(model.parameters()).device
    encoded: Any = tokenizer.apply_chat_template(
        list(chats), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    inputs = tokenizer.pad({"input_ids": encoded["input_ids"]}, padding_side="left", return_tensors="pt").to(
        device
    )
    sequences = model.generate(
        **inputs,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=samples,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    prompt_length = inputs["input_ids"].shape[1]
    mask = completion_mask(sequences[:, prompt_length:], stop_ids)
    attention = torch.cat([inputs["attention_mask"].repeat_interleave(samples, dim=0), mask.long()], dim=1)
    scored = slice(prompt_length - 1, -1)  # logits at position t predict token t + 1
    policy = model(input_ids=sequences, attention_mask=attention).logits[:, scored] / temperature
    with reference():
        base = model(input_ids=sequences, attention_mask=attention).logits[:, scored] / temperature
    return masked_token_kl(policy, base, mask)
