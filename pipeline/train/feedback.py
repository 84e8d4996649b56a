"""What KTO, DPO and SFT share: replies scored by users and by the reward, the champion's own samples,
and a KL probe for the bounds. The methods themselves are `pipeline.train.kto`, `.dpo` and `.sft`.

A night of one of these methods:
1. collects tonight's scored replies: the logged ones (scored by their user's feedback, else the
   judged reward) and, for DPO and SFT with `train.on_policy` and a reward to rank by, replies the
   champion samples now (`num_generations` per prompt), scored by the track's reward functions: the
   same ones GRPO would use (judge, graders, reward model). Scores that are not finite numbers in
   [0, 1] (a NaN from a broken reward model) are dropped, never used as labels;
2. turns them into the method's dataset (`pipeline.train.examples`); too little data (one class
   only for KTO, too few pairs for DPO) is a night with no adapter and the reason in words;
3. trains with TRL's trainer from the champion, the champion as the frozen "ref" adapter, under the
   same bounds as GRPO. TRL's preference and SFT trainers log no KL to the reference, so the bounds
   callback gets a probe: after every step the policy samples replies to a few of tonight's prompts
   and the exact per-token KL to the reference is measured on them (`pipeline.train.kl`), the same
   quantity GRPO's `kl` estimates, so one `kl_budget` means the same for every method.

Why hand-written: sampling and ranking the champion's replies for DPO/SFT is what TRL's online
trainers do inside GRPO only; the KL probe is the bounds' need, not a trainer's.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from abc import abstractmethod
from collections.abc import Callable, Sequence
from copy import deepcopy
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from evals.graders import combine_scores
from pipeline.config import TrainConfig
from pipeline.results import TrainPrompt
from pipeline.train import examples
from pipeline.train.bounds import planned_steps
from pipeline.train.examples import ScoredReply
from pipeline.train.kl import kl_to_reference
from pipeline.train.recipe import Progress, Recipe, RewardFunction, lora_config, training_args

logger = logging.getLogger(__name__)

KL_STEP_PROBE_PROMPTS = 4  # prompts sampled after every step to measure the KL to the reference
SAMPLE_BATCH = 16  # prompts per generate call when sampling the champion's replies


class ProbedRecipe(Recipe):
    """A method whose TRL trainer logs no KL to the champion (KTO, DPO, SFT, distillation): it builds
    its config on the shared bounds and gives the bounds callback a probe of that KL after each step."""

    def trainer_args(self, config_type: type, **specific: Any) -> Any:
        """The method's TRL config: the shared bounds plus `specific` settings."""
        shared = training_args(
            self.settings,
            output_dir=self.out_dir / ".trainer",
            max_steps=self.max_steps,
            batch_size=self.settings.prompts_per_step,
        )
        return config_type(**shared, **specific)

    def _kl_probe(self) -> float:
        policy = self.policy()
        chats = [prompt.messages for prompt in self.prompts[:KL_STEP_PROBE_PROMPTS]]
        return kl_to_reference(
            policy,
            self.trainer.processing_class,
            chats,
            reference=lambda: reference_context(policy),
            max_new_tokens=self.settings.max_completion_tokens,
            temperature=self.settings.temperature,
            seed=self.settings.seed + (self.trainer.state.global_step if self.trainer else 0),
        )


def add_frozen_reference(model: Any, champion: Any) -> None:
    """The champion loaded a second time as a frozen "ref" adapter next to the trained "default" one,
    for trainers that do not add a reference themselves (SFT, distillation)."""
    model.load_adapter(str(champion), adapter_name="ref", is_trainable=False)
    model.set_adapter("default")  # the trained one stays active (and the only trainable one)


class FeedbackRecipe(ProbedRecipe):
    """A night of KTO, DPO or SFT; a subclass names its `method` and builds its dataset and trainer."""

    sequences_per_example = 1  # sequences a step scores per example (the estimate's figure)

    @abstractmethod
    def rows(self, replies: Sequence[ScoredReply]) -> list[dict[str, Any]]:
        """The method's dataset rows from tonight's scored replies."""

    @abstractmethod
    def build_trainer(
        self, model: Any, dataset: Any, tokenizer: PreTrainedTokenizerBase, callbacks: list[Any]
    ) -> Any:
        """The method's TRL trainer on `model` (a PeftModel) and `dataset`."""

    @staticmethod
    def max_length(model: Any) -> int:
        """Tokens of prompt and reply together: what the model's positions allow, at most 1,024."""
        return min(1024, int(getattr(model.config, "max_position_embeddings", 1024) or 1024))

    def wants_samples(self) -> bool:
        """Whether tonight's replies include the champion's own samples, ranked by the reward."""
        return False

    # ------------------------------------------------------------------ setup

    def setup(
        self,
        prompts: Sequence[TrainPrompt],
        reward_funcs: Sequence[RewardFunction],
        reward_weights: Sequence[float] | None,
        progress: Progress | None,
    ) -> None:
        settings = self.settings
        self.prompts = list(prompts)[: settings.max_prompts]
        self.start()
        tokenizer = self.tokenizer()
        model = self.load_policy()
        replies = examples.logged_replies(self.prompts)
        if self.wants_samples() and reward_funcs:
            replies += sample_replies(
                model, tokenizer, self.prompts, reward_funcs, reward_weights, settings=settings
            )
        rows = self.rows(replies)
        self.data = examples.counts(self.method, rows) | {"scored_replies": len(replies)}
        end = turn_end(tokenizer)
        rows = [as_text(row, tokenizer, end) for row in rows]
        self.detail = examples.shortage(self.method, rows, settings, len(replies))
        if self.detail is not None:
            logger.warning("%s: nothing to train on tonight: %s", self.method, self.detail)
            return
        self.max_steps = planned_steps(
            len(rows), settings.prompts_per_step, settings.max_steps, settings.epochs
        )
        if self.max_steps == 0:
            self.detail = (
                f"{self.method} has {len(rows)} examples, fewer than one step of "
                f"train.prompts_per_step={settings.prompts_per_step}"
            )
            logger.warning("%s: nothing to train on tonight: %s", self.method, self.detail)
            return
        self.log_estimate(tokenizer, sequences_per_prompt=self.sequences_per_example)
        from datasets import Dataset

        if self.champion is None:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(settings.lora))
        else:
            self.add_reference(model)
        callbacks = [self.night_bounds_callback(progress, kl_probe=self._kl_probe)]
        # `epochs` passes: the rows repeated (the trainer's sampler shuffles them).
        trainer = self.build_trainer(
            model, Dataset.from_list(rows * settings.epochs), trainer_tokenizer(tokenizer, end), callbacks
        )
        self.attach(trainer)

    def add_reference(self, model: Any) -> None:
        """The champion as a frozen "ref" adapter next to the trained one (DPO and KTO add it themselves)."""


# --------------------------------------------------------------------------- rows as the model sees them


def as_text(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, end: str) -> dict[str, Any]:
    """A conversational row as plain text: the rendered prompt, and each reply up to the token that
    ends the turn (`turn_end`).

    TRL renders conversational rows whole with the chat template, whose closing text (often a
    newline after the end-of-turn marker, then the tokenizer's end-of-sequence token TRL appends)
    the model never generates: the loss would spend its steps on what comes after a reply (measured
    on the demo base: SFT's first-step loss 1.04 with it, 0.04 without, and held-out accuracy
    0.46 -> 0.435 with it against 0.46 -> 0.69 without).
    """
    prompt = str(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False))
    bos = str(tokenizer.bos_token or "")
    if bos and prompt.startswith(bos) and _adds_bos(tokenizer):
        prompt = prompt[len(bos) :]  # the tokenizer adds it again
    text = {key: row[key][0]["content"] + end for key in ("completion", "chosen", "rejected") if key in row}
    return {**row, "prompt": prompt, **text}


def trainer_tokenizer(tokenizer: PreTrainedTokenizerBase, end: str) -> PreTrainedTokenizerBase:
    """The tokenizer handed to the trainer: a copy whose end-of-sequence token is the turn's end, so
    that TRL appends nothing after a reply that already ends with it."""
    if tokenizer.eos_token == end or len(tokenizer(end, add_special_tokens=False)["input_ids"]) != 1:
        return tokenizer
    copy = deepcopy(tokenizer)
    copy.eos_token = end
    return copy


def turn_end(tokenizer: PreTrainedTokenizerBase) -> str:
    """The text that ends an assistant turn: what the chat template renders right after a reply, up
    to and including the first token that stops generation (e.g. `<|im_end|>`, `<|end|>`)."""
    chat = [{"role": "user", "content": "hi"}]
    reply = "REPLY"
    head = str(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    full = str(
        tokenizer.apply_chat_template([*chat, {"role": "assistant", "content": reply}], tokenize=False)
    )
    eos = str(tokenizer.eos_token or "")
    if not full.startswith(head + reply):
        return eos
    tail = full[len(head + reply) :]
    stops = [token for token in (eos, *_generation_stops(tokenizer)) if token]
    ends = [tail.index(token) + len(token) for token in stops if token in tail]
    return tail[: min(ends)] if ends else tail + eos


def _generation_stops(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(tokenizer.name_or_path)
    except OSError:
        return []
    ids = config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return [str(token) for token in tokenizer.convert_ids_to_tokens(ids)]


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("x")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def reference_context(model: Any) -> Any:
    """The reference as a context: the champion's frozen "ref" copy, or the base without a champion."""
    from trl.trainer.utils import use_adapter

    return use_adapter(model, "ref" if "ref" in model.peft_config else None)


# --------------------------------------------------------------------------- the champion's samples


@torch.no_grad()
def sample_replies(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[TrainPrompt],
    reward_funcs: Sequence[RewardFunction],
    reward_weights: Sequence[float] | None,
    *,
    settings: TrainConfig,
) -> list[ScoredReply]:
    """`num_generations` replies the model samples for each prompt, scored by the weighted reward."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    replies: list[ScoredReply] = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(settings.seed)
            for start in range(0, len(prompts), SAMPLE_BATCH):
                batch = list(prompts[start : start + SAMPLE_BATCH])
                texts = _generate(model, tokenizer, batch, settings, device)
                scores = score_replies(batch, texts, settings.num_generations, reward_funcs, reward_weights)
                for index, (text, score) in enumerate(zip(texts, scores, strict=True)):
                    if score is not None:
                        prompt = batch[index // settings.num_generations]
                        replies.append(ScoredReply(prompt.messages, text, score, "sample"))
    finally:
        model.train(was_training)
    logger.info("sampled %d scored replies to %d prompts", len(replies), len(prompts))
    return replies


def _generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    batch: Sequence[TrainPrompt],
    settings: TrainConfig,
    device: Any,
) -> list[str]:
    encoded: Any = tokenizer.apply_chat_template(
        [prompt.messages for prompt in batch], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    inputs = tokenizer.pad({"input_ids": encoded["input_ids"]}, padding_side="left", return_tensors="pt").to(
        device
    )
    sequences = model.generate(
        **inputs,
        do_sample=True,
        temperature=settings.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=settings.max_completion_tokens,
        num_return_sequences=settings.num_generations,
        pad_token_id=tokenizer.pad_token_id,
    )
    completions = sequences[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in tokenizer.batch_decode(completions, skip_special_tokens=True)]


def score_replies(
    prompts: Sequence[TrainPrompt],
    texts: Sequence[str],
    per_prompt: int,
    reward_funcs: Sequence[RewardFunction],
    reward_weights: Sequence[float] | None,
) -> list[float | None]:
    """The weighted mean of the reward functions for each reply (TRL's calling convention,
    `evals.graders.combine_scores` for the blend); None when no function gave a finite score in [0, 1]."""
    repeated = [prompt for prompt in prompts for _ in range(per_prompt)]
    keys = sorted({key for prompt in prompts for key in prompt.metadata})
    columns: dict[str, list[Any]] = {"reference": [prompt.reference for prompt in repeated]}
    columns |= {key: [prompt.metadata.get(key) for prompt in repeated] for key in keys if key != "reference"}
    weights = list(reward_weights) if reward_weights is not None else [1.0] * len(reward_funcs)
    completions = [[{"role": "assistant", "content": text}] for text in texts]
    per_function = [
        _call(func, [p.messages for p in repeated], completions, columns) for func in reward_funcs
    ]
    names = {f"reward{j}": weight for j, weight in enumerate(weights)}
    return [
        combine_scores(
            {
                f"reward{j}": examples.valid_score(values[index]) if index < len(values) else None
                for j, values in enumerate(per_function)
            },
            names,
        )
        for index in range(len(texts))
    ]


def _call(
    func: Callable[..., Any], prompts: list[Any], completions: list[Any], columns: dict[str, Any]
) -> list[Any]:
    result = func(prompts=prompts, completions=completions, **columns)
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))
    return list(result)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
