"""Reply generation for the forgetting guard: the base, the champion and a candidate answer prompts.

Two `ReplyGenerator`s: the serving engine (`ServerGenerator`: the candidate is loaded into the vLLM
server under a temporary adapter name and unloaded after, so the champion's serving names are never
touched; the base is asked through a temporary all-zero adapter, see `ServerGenerator`) and
transformers in-process (`InProcessGenerator`). Decoding is greedy by default, so a
rerun gives the same replies. `probe_kl` measures the candidate's exact per-token KL to the base from
full-vocabulary log-probabilities in-process (a server returns only the top few log-probabilities).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline.adapters import CONFIG_FILE, WEIGHTS_FILE, check_adapter_dir
from pipeline.deploy.vllm_client import VllmClient
from pipeline.train.kl import completion_mask, masked_token_kl
from pipeline.train.recipe import load_base

logger = logging.getLogger(__name__)

KL_PROBE_PROMPTS = 16  # suite prompts the candidate's KL to the base is measured on
END_TOKEN = "<|end|>"  # the chat template's end-of-turn marker, a stop token when the tokenizer has it

Chat = list[dict[str, str]]


def _tokenizer(base_model: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(base_model, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _stop_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The generation config's eos ids, the tokenizer's eos and `<|end|>` when it is in the vocabulary."""
    configured = model.generation_config.eos_token_id
    ids: list[int] = [configured] if isinstance(configured, int) else list(configured or [])
    end = tokenizer.convert_tokens_to_ids(END_TOKEN) if END_TOKEN in tokenizer.get_vocab() else None
    for token_id in (tokenizer.eos_token_id, end):
        if isinstance(token_id, int) and token_id not in ids:
            ids.append(token_id)
    return ids


@contextmanager
def _model(base_model: str, adapter_dir: Path | None, reference: Path | None = None) -> Iterator[Any]:
    """The base in eval mode, with `adapter_dir` as "default" (and `reference` as "reference") when given."""
    model: Any = load_base(base_model)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        if reference is not None:
            model.load_adapter(str(reference), adapter_name="reference")
    model.eval()
    with torch.no_grad():
        yield model


def _encode(tokenizer: PreTrainedTokenizerBase, chats: Sequence[Chat], device: torch.device) -> Any:
    encoded: Any = tokenizer.apply_chat_template(
        [list(chat) for chat in chats], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return tokenizer.pad({"input_ids": encoded["input_ids"]}, padding_side="left", return_tensors="pt").to(
        device
    )


def _greedy(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    inputs: Any,
    stop_ids: list[int],
    n: int,
    temperature: float = 0.0,
) -> Any:
    sampling: dict[str, Any] = (
        {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    return model.generate(
        **inputs,
        **sampling,
        max_new_tokens=n,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )


def generate(
    base_model: str,
    adapter_dir: Path | None,
    prompts: Sequence[Chat],
    *,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Replies to chat `prompts` (one per prompt, in order), with the adapter when given.

    Greedy at temperature 0; sampled (seeded with `seed`) above it.
    """
    tokenizer = _tokenizer(base_model)
    replies: list[str] = []
    with _model(base_model, adapter_dir) as model:
        device = next(model.parameters()).device
        stop_ids = _stop_ids(model, tokenizer)
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            inputs = _encode(tokenizer, prompts[start : start + batch_size], device)
            output = _greedy(model, tokenizer, inputs, stop_ids, max_new_tokens, temperature)
            completions = output[:, inputs["input_ids"].shape[1] :]
            replies += tokenizer.batch_decode(completions, skip_special_tokens=True)
    return replies


def probe_kl(
    base_model: str,
    adapter_dir: Path,
    reference_adapter: Path | None,
    prompts: Sequence[Chat],
    *,
    max_new_tokens: int = 16,
) -> float:
    """Mean per-token KL(candidate || reference) over the candidate's greedy continuations of `prompts`.

    Exact over the full vocabulary at every generated position (up to and including the first stop
    token), from the log-softmax of both models' logits; `reference_adapter` None is the base.
    """
    if not prompts:
        return 0.0
    tokenizer = _tokenizer(base_model)
    with _model(base_model, adapter_dir, reference_adapter) as model:
        device = next(model.parameters()).device
        inputs = _encode(tokenizer, prompts, device)
        stop_ids = _stop_ids(model, tokenizer)
        sequences = _greedy(model, tokenizer, inputs, stop_ids, max_new_tokens)
        prompt_length = inputs["input_ids"].shape[1]
        mask = completion_mask(sequences[:, prompt_length:], stop_ids)
        attention = torch.cat([inputs["attention_mask"], mask.long()], dim=1)
        scored = slice(prompt_length - 1, -1)  # logits at position t predict token t + 1
        candidate = model(input_ids=sequences, attention_mask=attention).logits[:, scored]
        if reference_adapter is None:
            with model.disable_adapter():
                reference = model(input_ids=sequences, attention_mask=attention).logits[:, scored]
        else:
            model.set_adapter("reference")
            reference = model(input_ids=sequences, attention_mask=attention).logits[:, scored]
            model.set_adapter("default")
    total, count = masked_token_kl(candidate, reference, mask)
    return total / count if count else 0.0


# --------------------------------------------------------------------------- generators


@dataclass(frozen=True)
class Decoding:
    """How replies are decoded for the gate: greedy (temperature 0, the default) or sampled."""

    max_new_tokens: int = 48
    temperature: float = 0.0  # 0: greedy, deterministic; > 0: sampled with `seed`
    seed: int = 0
    # Sampled decoding only: replies drawn per prompt (seeds `seed`, `seed + 1`, ...), each case
    # scored by their mean, so a gain in how often sampled replies are good is measured, not guessed.
    samples: int = 1


class ReplyGenerator(Protocol):
    """Replies of the base (`adapter` None) or of an adapter directory to chat prompts, in order."""

    def replies(self, adapter: Path | None, prompts: Sequence[Chat], decoding: Decoding) -> list[str]: ...


@dataclass(frozen=True)
class InProcessGenerator:
    """transformers + PEFT in this process, batched (CPU is enough for the tiny model)."""

    base_model: str
    batch_size: int = 8

    def replies(self, adapter: Path | None, prompts: Sequence[Chat], decoding: Decoding) -> list[str]:
        return generate(
            self.base_model,
            adapter,
            prompts,
            max_new_tokens=decoding.max_new_tokens,
            batch_size=self.batch_size,
            temperature=decoding.temperature,
            seed=decoding.seed,
        )


def write_zero_adapter(template: Path, out_dir: Path) -> Path:
    """A LoRA adapter that is the base itself: `template`'s config and LoRA shapes, every weight zero.

    Only the `lora_*` tensors are kept (zeroed) and `modules_to_save` is dropped, so vLLM adds exactly
    zero wherever the adapter applies. Files are world-readable: the server may run as another user.
    """
    from safetensors.torch import load_file, save_file

    config = json.loads((template / CONFIG_FILE).read_text(encoding="utf-8"))
    config["modules_to_save"] = None
    tensors = load_file(str(template / WEIGHTS_FILE))
    zeros = {key: torch.zeros_like(value) for key, value in tensors.items() if ".lora_" in key}
    if not zeros:
        raise ValueError(f"{template}: no LoRA weights to shape a zero adapter on")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(zeros, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    for path in (out_dir, out_dir / CONFIG_FILE, out_dir / WEIGHTS_FILE):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return out_dir


@contextmanager
def _zero_adapter(template: Path) -> Iterator[Path]:
    """A temporary zero adapter beside `template` (where the server reads adapters), removed after."""
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".gate-zero-", dir=template.parent))
    except OSError:  # a read-only adapter directory: this machine's temporary directory
        scratch = Path(tempfile.mkdtemp(prefix="gate-zero-"))
    try:
        os.chmod(scratch, 0o755)
        yield write_zero_adapter(template, scratch / "adapter")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class ServerGenerator:
    """A running vLLM server: an adapter is loaded under a temporary name, asked, then unloaded.

    The temporary name (`<prefix>-<random>`) never collides with a serving name, so the pinned
    `<track>@v<N>` names the gateway routes to keep serving what they served. Requests go out
    `concurrency` at a time and the server batches them. The adapter directory must be readable by
    the server at the same path (same machine, or a shared volume).

    The base is asked through a temporary all-zero adapter shaped like the last adapter asked (the
    gate asks the candidate first), not under `base_name`: vLLM's CPU LoRA kernels
    (`vllm/lora/ops/torch_ops/lora_ops.py`, `lora_b_weights[lora_indices_tensor]`) give a token of
    a request without an adapter (index -1) the weights of the LAST adapter slot whenever its batch
    also holds an adapter request (another track's gate, a user of a served track), and slots keep
    their weights after an unload. Under an adapter of its own a base request has a real slot that
    adds exactly zero. Only when no adapter was asked yet is the base asked under `base_name`.
    """

    client: VllmClient
    base_name: str  # the name the server serves the base model under
    name_prefix: str = "gate"
    concurrency: int = 16
    # The last adapter asked, which the base's zero adapter copies the shape of (mutable on purpose).
    _shape_of: list[Path] = field(default_factory=list, init=False, repr=False, compare=False)

    def replies(self, adapter: Path | None, prompts: Sequence[Chat], decoding: Decoding) -> list[str]:
        if adapter is None:
            return self._base_replies(prompts, decoding)
        check_adapter_dir(adapter)
        resolved = Path(adapter).resolve()
        self._shape_of[:] = [resolved]
        return self._ask_adapter(resolved, prompts, decoding)

    def _base_replies(self, prompts: Sequence[Chat], decoding: Decoding) -> list[str]:
        if not self._shape_of:
            logger.warning(
                "asking the base as %r: with no adapter asked yet there is no zero adapter to ask it "
                "through, and batched with adapter requests its replies may carry an adapter's weights",
                self.base_name,
            )
            return self._ask(self.base_name, prompts, decoding)
        with _zero_adapter(self._shape_of[0]) as zero:
            return self._ask_adapter(zero, prompts, decoding, prefix=f"{self.name_prefix}-base")

    def _ask_adapter(
        self, adapter: Path, prompts: Sequence[Chat], decoding: Decoding, *, prefix: str | None = None
    ) -> list[str]:
        name = f"{prefix or self.name_prefix}-{uuid.uuid4().hex[:10]}"
        self.client.load_adapter(name, str(adapter))
        try:
            return self._ask(name, prompts, decoding)
        finally:
            try:
                self.client.unload_adapter(name)
            except Exception as error:  # the replies are good; a leftover temporary name is only logged
                logger.warning("could not unload temporary adapter %s: %s", name, error)

    def _ask(self, model: str, prompts: Sequence[Chat], decoding: Decoding) -> list[str]:
        return self.client.chat_many(
            model,
            prompts,
            max_tokens=decoding.max_new_tokens,
            temperature=decoding.temperature,
            seed=decoding.seed if decoding.temperature > 0 else None,
            concurrency=self.concurrency,
        )
