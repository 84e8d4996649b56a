"""SFT on the best-rated replies: rejection-sampling fine-tuning (TRL's `SFTTrainer`, loss on the
reply only).

The replies are the logged ones users rated desirable and, with `train.on_policy`, the best of the
champion's own samples tonight when the track's reward rates it desirable. SFT has no reference in
its loss, so nothing holds it near the champion but the bounds: the champion is loaded a second time
as a frozen "ref" adapter for the per-step KL probe, and the KL budget stops a night that drifts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from pipeline.train.examples import ScoredReply, sft_rows
from pipeline.train.feedback import FeedbackRecipe, add_frozen_reference


class SftRecipe(FeedbackRecipe):
    method = "sft"

    def wants_samples(self) -> bool:
        return self.settings.on_policy

    def rows(self, replies: Sequence[ScoredReply]) -> list[dict[str, Any]]:
        return sft_rows(replies, self.settings)

    def add_reference(self, model: Any) -> None:
        assert self.champion is not None
        add_frozen_reference(model, self.champion)

    def build_trainer(
        self, model: Any, dataset: Any, tokenizer: PreTrainedTokenizerBase, callbacks: list[Any]
    ) -> Any:
        from trl.trainer.sft_config import SFTConfig
        from trl.trainer.sft_trainer import SFTTrainer

        args = self.trainer_args(
            SFTConfig,
            max_length=self.max_length(model),
            completion_only_loss=True,
            eos_token=tokenizer.eos_token,  # the turn's end (see `FeedbackRecipe.trainer_tokenizer`)
        )
        return SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
        )
