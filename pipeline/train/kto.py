"""KTO: learn from thumbs. Each desirable reply is made more likely and each undesirable one less,
relative to the champion (TRL's `KTOTrainer`, unpaired: no two replies to one prompt needed).

The replies are the logged ones with their users' thumbs (or ratings) and, with `train.on_policy`
and a reward to rank by, the champion's own samples tonight labelled by that reward (measured on the
demo base: logged thumbs alone moved held-out sums 0.46 -> 0.51 at best; with the samples 0.645).

KTO's loss estimates the policy's KL to the reference from mismatched prompt/reply pairs of one
batch, which TRL builds from neighbours in a fixed order: the rows are shuffled here (seeded) and fed
in that order, and a step holds at least two examples (`train.prompts_per_step` >= 2, checked with
the config). The two classes are weighted so that they count alike however lopsided the night's
thumbs are (TRL's guidance: desirable x weight vs undesirable x weight within [1, 4/3]).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from pipeline.train.examples import ScoredReply, kto_rows
from pipeline.train.feedback import FeedbackRecipe


class KtoRecipe(FeedbackRecipe):
    method = "kto"
    sequences_per_example = 2  # the reply and its mismatched KL completion

    def wants_samples(self) -> bool:
        return self.settings.on_policy

    def rows(self, replies: Sequence[ScoredReply]) -> list[dict[str, Any]]:
        rows = kto_rows(replies, self.settings)
        random.Random(self.settings.seed).shuffle(rows)
        return rows

    def build_trainer(
        self, model: Any, dataset: Any, tokenizer: PreTrainedTokenizerBase, callbacks: list[Any]
    ) -> Any:
        from trl.trainer.kto_config import KTOConfig
        from trl.trainer.kto_trainer import KTOTrainer

        desirable = max(1, self.data.get("desirable", 0))
        undesirable = max(1, self.data.get("undesirable", 0))
        args = self.trainer_args(
            KTOConfig,
            beta=self.settings.preference_beta,
            desirable_weight=max(1.0, undesirable / desirable),
            undesirable_weight=max(1.0, desirable / undesirable),
            max_length=self.max_length(model),
        )
        return KTOTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
        )
