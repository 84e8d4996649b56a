"""A reward model learned from users' scores, and that model as a reward for any method.

What users thought of logged replies (thumbs, ratings, as scores in [0, 1]) is fitted by the base
model with a LoRA adapter and a one-logit score head (`AutoModelForSequenceClassification`,
PEFT's `SEQ_CLS` task, the head trained in full): the reward of a reply is the sigmoid of its logit,
the predicted chance that a user likes it. It is trained with transformers' `Trainer` and a
binary cross-entropy on the (soft) scores, the standard pointwise route for unpaired feedback:
thumbs are unpaired, so TRL's `RewardTrainer`, which needs a chosen and a rejected reply to the same
prompt, would see almost no data from them.

Before anything uses it, its agreement with users is measured on replies it never saw (a stable
split by prompt, as the gate's held-out split): the share of clear thumbs (score >= desirable or
<= undesirable) it calls right, and the Spearman correlation of its scores with the users' scores.
Below `reward_model.min_agreement` it is not used, and the night says so. Its scores are only
rewards when they are finite; a NaN logit (a broken adapter) gives None, which every method skips.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from evals.calibration import spearman, thumb_accuracy
from pipeline.adapters import file_digests
from pipeline.config import RewardModelConfig, TrainConfig
from pipeline.select import is_heldout
from pipeline.train.examples import ScoredReply
from pipeline.train.rewards import completion_text

__all__ = ["RewardModelResult", "RewardModelScorer", "fit_reward_model"]

logger = logging.getLogger(__name__)

ADAPTER_DIR = "reward-model"
SCORE_BATCH = 32
# Added to the seed of its held-out split: the night's prompts are already what the gate's split (the
# same hash, the track's seed) left for training, so the same seed would hold none of them out.
SPLIT_SALT = 1_000_003


@dataclass(frozen=True)
class RewardModelResult:
    """A night's reward model: where it is, how well it agrees with users, whether it may be used."""

    adapter_dir: Path | None  # None when there was too little feedback to fit one
    train_examples: int
    heldout_examples: int
    agreement: float | None  # held-out thumbs it calls right (score >= 0.5 means up)
    spearman: float | None  # held-out rank correlation of its scores with the users' scores
    usable: bool
    reason: str  # in words: why it is (not) used
    steps: int = 0
    adapter_sha256: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapter_dir"] = str(self.adapter_dir) if self.adapter_dir else None
        return data


def _texts(tokenizer: Any, replies: Sequence[ScoredReply]) -> list[str]:
    return [
        str(
            tokenizer.apply_chat_template(
                [*reply.messages, {"role": "assistant", "content": reply.reply}], tokenize=False
            )
        )
        for reply in replies
    ]


def split(
    replies: Sequence[ScoredReply], fraction: float, seed: int
) -> tuple[list[ScoredReply], list[ScoredReply]]:
    """(train, held-out) by a stable hash of each prompt: every reply to one prompt lands on one side."""
    train, heldout = [], []
    for reply in replies:
        (heldout if is_heldout(reply.messages, fraction, seed) else train).append(reply)
    return train, heldout


def agreement_with_users(
    predicted: Sequence[float], replies: Sequence[ScoredReply], train: TrainConfig
) -> tuple[float | None, float | None]:
    """(thumb agreement on the clear cases, Spearman with all the users' scores)."""
    clear = [
        (score, 1 if reply.score >= train.desirable_score else -1)
        for score, reply in zip(predicted, replies, strict=True)
        if reply.score >= train.desirable_score or reply.score <= train.undesirable_score
    ]
    agreement = thumb_accuracy([s for s, _ in clear], [t for _, t in clear]) if clear else None
    return agreement, spearman(list(predicted), [reply.score for reply in replies])


def fit_reward_model(
    settings: RewardModelConfig,
    train_settings: TrainConfig,
    replies: Sequence[ScoredReply],
    *,
    base_model: str,
    out_dir: Path,
) -> RewardModelResult:
    """Fit a reward model to users' scored replies and measure it on held-out ones."""
    scored = [reply for reply in replies if reply.source == "feedback"]
    train, heldout = split(scored, settings.heldout_fraction, train_settings.seed + SPLIT_SALT)
    if len(train) < settings.min_examples or len(heldout) < settings.min_heldout:
        reason = (
            f"too little feedback for a reward model: {len(train)} rated replies to train on (needs "
            f"{settings.min_examples}) and {len(heldout)} held out (needs {settings.min_heldout})"
        )
        return RewardModelResult(None, len(train), len(heldout), None, None, False, reason)
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model, num_labels=1, problem_type="multi_label_classification", dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    lora = train_settings.lora
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="SEQ_CLS",  # the `score` head is trained in full and saved with the adapter
        ),
    )
    encoded = tokenizer(_texts(tokenizer, train), truncation=True, max_length=settings.max_length)
    dataset = [
        {"input_ids": ids, "attention_mask": mask, "labels": [reply.score]}
        for ids, mask, reply in zip(encoded["input_ids"], encoded["attention_mask"], train, strict=True)
    ]
    steps = max(1, min(settings.max_steps, math.ceil(len(dataset) * settings.epochs / settings.batch_size)))
    trainer = Trainer(
        model=peft_model,
        args=TrainingArguments(
            output_dir=str(out_dir / ".reward-trainer"),
            use_cpu=not torch.cuda.is_available(),
            max_steps=steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="constant",
            seed=train_settings.seed,
            data_seed=train_settings.seed,
            logging_steps=max(1, steps // 10),
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=dataset,  # type: ignore[arg-type]  # a list of features is a map-style dataset
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer.train()
    adapter_dir = out_dir / ADAPTER_DIR
    shutil.rmtree(adapter_dir, ignore_errors=True)
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True)
    (adapter_dir / "README.md").unlink(missing_ok=True)
    shutil.rmtree(out_dir / ".reward-trainer", ignore_errors=True)
    scorer = RewardModelScorer(base_model, adapter_dir, model=peft_model, tokenizer=tokenizer)
    predicted = scorer.score_replies(heldout)
    agreement, rank = agreement_with_users(
        [p if p is not None else 0.5 for p in predicted], heldout, train_settings
    )
    usable = agreement is not None and agreement >= settings.min_agreement
    reason = (
        f"agrees with users on {agreement:.0%} of {len(heldout)} held-out rated replies"
        if agreement is not None
        else f"no clear thumbs among {len(heldout)} held-out replies to measure agreement on"
    )
    reason += (
        f" ({'at or above' if usable else 'below'} reward_model.min_agreement={settings.min_agreement:.0%})"
    )
    logger.info("reward model: %s", reason)
    return RewardModelResult(
        adapter_dir,
        len(train),
        len(heldout),
        agreement,
        rank,
        usable,
        reason,
        steps,
        file_digests(adapter_dir),
    )


class RewardModelScorer:
    """A reward model loaded in-process: scores replies as the sigmoid of its logit (None when not finite).

    Also a TRL reward function (`__call__(prompts, completions, **kwargs)`), so GRPO and the ranking
    of samples for KTO, DPO and SFT use it like any grader.
    """

    def __init__(
        self, base_model: str, adapter_dir: Path, *, model: Any = None, tokenizer: Any = None
    ) -> None:
        from transformers import AutoTokenizer

        self.adapter_dir = Path(adapter_dir)
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(base_model)
        if model is None:
            from peft import PeftModel
            from transformers import AutoModelForSequenceClassification

            base = AutoModelForSequenceClassification.from_pretrained(
                base_model, num_labels=1, problem_type="multi_label_classification", dtype=torch.float32
            )
            base.config.pad_token_id = self.tokenizer.pad_token_id
            model = PeftModel.from_pretrained(base, str(adapter_dir))
        self.model = model
        self.__name__ = "reward_model"

    @torch.no_grad()
    def score_texts(self, texts: Sequence[str]) -> list[float | None]:
        was_training = self.model.training
        self.model.eval()
        scores: list[float | None] = []
        try:
            for start in range(0, len(texts), SCORE_BATCH):
                batch = self.tokenizer(
                    list(texts[start : start + SCORE_BATCH]),
                    truncation=True,
                    max_length=1024,
                    padding=True,
                    return_tensors="pt",
                ).to(next(self.model.parameters()).device)
                logits = self.model(**batch).logits[:, 0].float()
                scores += [
                    float(value) if math.isfinite(value) else None for value in torch.sigmoid(logits).tolist()
                ]
        finally:
            self.model.train(was_training)
        return scores

    def score_replies(self, replies: Sequence[ScoredReply]) -> list[float | None]:
        return self.score_texts(_texts(self.tokenizer, replies))

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        replies = [
            ScoredReply(list(prompt), completion_text(completion), 0.0, "sample")
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
        return self.score_replies(replies)
