"""Select: choose tonight's training prompts and the held-out prompts the gate will judge.

Training time is bounded, so it goes where the model is weakest: prompts whose served response was
judged worst come first. Near-duplicates were dropped at harvest; here prompts are also spread over
topics (a coarse signature of the prompt) so one frequent question cannot fill the night. The
held-out split is decided by a hash of the prompt, not by chance: the same prompt always lands on the
same side, so tonight's gate never judges what tonight's update trained on, and a re-run after a
crash selects exactly the same sets.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.harvest.stage import normalize_prompt, normalize_text
from pipeline.judge.stage import reference_of
from pipeline.results import TrainPrompt

SIGNATURE_WORDS = 4  # words of the last user message that name a prompt's topic


@dataclass(frozen=True)
class Selection:
    train: list[TrainPrompt]
    heldout: list[TrainPrompt]
    considered: int  # judged rows read
    unscored: int  # rows without a reward (failed or skipped judgments), still eligible, ranked last

    def as_json(self) -> dict[str, Any]:
        return {
            "train": len(self.train),
            "heldout": len(self.heldout),
            "considered": self.considered,
            "unscored": self.unscored,
        }


def select(
    judged: Iterable[dict[str, Any]],
    *,
    max_prompts: int,
    heldout_fraction: float,
    seed: int = 0,
    feedback_first: bool = False,
) -> Selection:
    """From judged records (see `pipeline.judge.stage`), the training and held-out prompts.

    `feedback_first` (the feedback methods: KTO, DPO, SFT): rows a user gave feedback on are chosen
    before the rest, since their replies carry the labels those methods learn from.
    """
    rows = list(judged)
    train_rows, heldout_rows = [], []
    for row in rows:
        (heldout_rows if is_heldout(row["messages"], heldout_fraction, seed) else train_rows).append(row)
    heldout_cap = max(1, round(max_prompts * heldout_fraction / (1 - heldout_fraction)))
    if feedback_first:
        rated = [row for row in train_rows if row.get("feedback_score") is not None]
        rest = [row for row in train_rows if row.get("feedback_score") is None]
        chosen = _weakest_first_spread(rated, max_prompts)
        chosen += _weakest_first_spread(rest, max_prompts - len(chosen))
    else:
        chosen = _weakest_first_spread(train_rows, max_prompts)
    return Selection(
        train=[_prompt(row) for row in chosen],
        heldout=[_prompt(row) for row in _weakest_first_spread(heldout_rows, heldout_cap)],
        considered=len(rows),
        unscored=sum(1 for row in rows if row.get("reward") is None),
    )


def is_heldout(messages: Sequence[dict[str, str]], fraction: float, seed: int = 0) -> bool:
    """A stable split: the same prompt is held out (or not) every night, on every machine."""
    digest = hashlib.blake2b(
        normalize_prompt(messages), digest_size=8, salt=seed.to_bytes(8, "little")
    ).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def topic_signature(messages: Sequence[dict[str, str]]) -> str:
    """A coarse topic: the first words of the last user message, case and punctuation folded."""
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return " ".join(normalize_text(last_user).decode().split()[:SIGNATURE_WORDS])


def _weakest_first_spread(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Round-robin over topics, each topic's prompts weakest first; topics ordered by their weakest."""
    by_topic: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in sorted(rows, key=_weakness):
        by_topic[topic_signature(row["messages"])].append(row)
    queues = deque(deque(topic_rows) for topic_rows in by_topic.values())
    chosen: list[dict[str, Any]] = []
    while queues and len(chosen) < limit:
        queue = queues.popleft()
        chosen.append(queue.popleft())
        if queue:
            queues.append(queue)
    return chosen


def _weakness(row: dict[str, Any]) -> tuple[int, float, int]:
    """Scored rows by reward ascending, then unscored ones; ties by log position (deterministic)."""
    reward = row.get("reward")
    return (reward is None, reward if reward is not None else 0.0, row.get("interaction_id") or 0)


def _prompt(row: dict[str, Any]) -> TrainPrompt:
    """A judged row as a training prompt, with its logged reply and that reply's score: the user's
    feedback when there is some (what they thought beats what the judge thought), else the reward."""
    feedback, reward = row.get("feedback_score"), row.get("reward")
    score, source = (feedback, "feedback") if feedback is not None else (reward, "reward")
    return TrainPrompt(
        messages=[{"role": m["role"], "content": m["content"]} for m in row["messages"]],
        reference=reference_of(row),
        metadata={"interaction_id": row.get("interaction_id"), "served_reward": reward},
        response=row.get("response"),
        score=score,
        score_source=source if score is not None else None,
    )
