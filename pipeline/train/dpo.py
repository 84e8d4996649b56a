"""DPO: learn from preference pairs, two replies to one prompt of which users (or the reward) liked
one better, without a reward model (TRL's `DPOTrainer`, sigmoid loss, the champion as reference).

Pairs come from the logs (the same prompt answered twice and rated apart, which needs
`harvest.dedup_prompts: false` to survive the harvest) and, with `train.on_policy`, from the
champion's own replies sampled tonight and ranked by the track's reward: the best against the worst
when they differ by `train.pair_margin`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from pipeline.train.examples import ScoredReply, dpo_rows
from pipeline.train.feedback import FeedbackRecipe


class DpoRecipe(FeedbackRecipe):
    method = "dpo"
    sequences_per_example = 2  # chosen and rejected

    def wants_samples(self) -> bool:
        return self.settings.on_policy

    def rows(self, replies: Sequence[ScoredReply]) -> list[dict[str, Any]]:
        return dpo_rows(replies, self.settings)

    def build_trainer(
        self, model: Any, dataset: Any, tokenizer: PreTrainedTokenizerBase, callbacks: list[Any]
    ) -> Any:
        from trl.trainer.dpo_config import DPOConfig
        from trl.trainer.dpo_trainer import DPOTrainer

        args = self.trainer_args(
            DPOConfig, beta=self.settings.preference_beta, max_length=self.max_length(model)
        )
        return DPOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
        )
