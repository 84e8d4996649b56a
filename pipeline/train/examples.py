"""Training examples for the feedback methods (KTO, DPO, SFT) from scored replies.

A scored reply is a prompt, a reply and a score in [0, 1]: a logged reply scored by its user's
feedback (or the judged reward where the user said nothing), or a reply the champion sampled tonight
scored by the track's reward. From those:

- KTO takes every reply that is clearly desirable (score >= `desirable_score`) or clearly
  undesirable (<= `undesirable_score`) as one labelled example; replies in between (a thumb up with a
  rating of 1 scores 0.5) are ambiguous and left out. KTO needs both kinds.
- DPO takes, per prompt, the best and the worst reply as a pair when the best outscores the worst by
  `pair_margin` (replies to the same prompt after normalisation: case, spaces and punctuation).
- SFT takes, per prompt, the best reply when it is desirable (rejection sampling).

Pure (no model, no I/O), so that what a night learns from is unit-tested; `shortage` says in words
why a night has too little data for its method, which the night reports as `skipped`. Why written
here: TRL's trainers take finished datasets in these three shapes, and building them from a
night's mixed sources (feedback, judge, samples) is this project's business.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.config import TrainConfig
from pipeline.harvest.stage import normalize_prompt
from pipeline.results import TrainPrompt

__all__ = [
    "ScoredReply",
    "dpo_rows",
    "kto_rows",
    "logged_replies",
    "sft_rows",
    "shortage",
]


@dataclass(frozen=True)
class ScoredReply:
    """One reply to a prompt and how good it was."""

    messages: list[dict[str, str]]  # the prompt (ends with a user turn)
    reply: str
    score: float  # in [0, 1], finite
    source: str  # "feedback" (the user), "reward" (the judged log) or "sample" (tonight's sample, the reward)


def valid_score(value: Any) -> float | None:
    """A finite score in [0, 1], else None: a NaN or out-of-range score never becomes a label."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= 1.0 else None


def logged_replies(prompts: Iterable[TrainPrompt]) -> list[ScoredReply]:
    """The logged replies of tonight's prompts that carry a usable score."""
    replies = []
    for prompt in prompts:
        score = valid_score(prompt.score)
        if prompt.response and score is not None:
            replies.append(
                ScoredReply(prompt.messages, prompt.response, score, prompt.score_source or "reward")
            )
    return replies


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def kto_rows(replies: Sequence[ScoredReply], settings: TrainConfig) -> list[dict[str, Any]]:
    """KTO's unpaired examples: {prompt, completion, label}, desirable replies labelled True."""
    rows = []
    for reply in _distinct(replies):
        if reply.score >= settings.desirable_score:
            label = True
        elif reply.score <= settings.undesirable_score:
            label = False
        else:
            continue
        rows.append({"prompt": reply.messages, "completion": _assistant(reply.reply), "label": label})
    return rows


def dpo_rows(replies: Sequence[ScoredReply], settings: TrainConfig) -> list[dict[str, Any]]:
    """DPO's pairs: {prompt, chosen, rejected}, the best and worst reply of each prompt when far enough
    apart (the prompt as first seen: replies to the same prompt differ only in case and punctuation)."""
    rows = []
    for group in _by_prompt(replies):
        ranked = sorted(group, key=lambda reply: reply.score)
        worst, best = ranked[0], ranked[-1]
        if best.score - worst.score >= settings.pair_margin and best.reply != worst.reply:
            rows.append(
                {
                    "prompt": group[0].messages,
                    "chosen": _assistant(best.reply),
                    "rejected": _assistant(worst.reply),
                }
            )
    return rows


def sft_rows(replies: Sequence[ScoredReply], settings: TrainConfig) -> list[dict[str, Any]]:
    """SFT's examples: {prompt, completion}, the best reply of each prompt when it is desirable."""
    rows = []
    for group in _by_prompt(replies):
        best = max(group, key=lambda reply: reply.score)
        if best.score >= settings.desirable_score:
            rows.append({"prompt": group[0].messages, "completion": _assistant(best.reply)})
    return rows


def counts(method: str, rows: Sequence[dict[str, Any]]) -> dict[str, int]:
    """What a method's examples are, by kind (reported with the night's training result)."""
    if method == "kto":
        desirable = sum(1 for row in rows if row["label"])
        return {"desirable": desirable, "undesirable": len(rows) - desirable}
    if method == "dpo":
        return {"pairs": len(rows)}
    return {"examples": len(rows)}


def shortage(method: str, rows: Sequence[dict[str, Any]], settings: TrainConfig, replies: int) -> str | None:
    """Why `rows` are too little for `method` tonight, in words; None when there is enough."""
    found = counts(method, rows)
    if method == "kto":
        if found["desirable"] == 0 or found["undesirable"] == 0:
            return (
                f"kto needs both desirable and undesirable replies: {found['desirable']} desirable, "
                f"{found['undesirable']} undesirable among {replies} scored replies"
            )
        if len(rows) < settings.min_examples:
            return (
                f"kto has {len(rows)} labelled replies, fewer than train.min_examples={settings.min_examples}"
            )
        return None
    noun = "preference pairs" if method == "dpo" else "desirable replies"
    if len(rows) < settings.min_examples:
        return (
            f"{method} has {len(rows)} {noun} from {replies} scored replies, fewer than "
            f"train.min_examples={settings.min_examples}"
        )
    return None


def _distinct(replies: Sequence[ScoredReply]) -> list[ScoredReply]:
    """Each (prompt, reply) once: the first score seen for it wins (logged replies come first)."""
    seen: set[tuple[bytes, str]] = set()
    kept = []
    for reply in replies:
        key = (normalize_prompt(reply.messages), reply.reply)
        if key not in seen:
            seen.add(key)
            kept.append(reply)
    return kept


def _by_prompt(replies: Sequence[ScoredReply]) -> list[list[ScoredReply]]:
    groups: dict[bytes, list[ScoredReply]] = defaultdict(list)
    for reply in _distinct(replies):
        groups[normalize_prompt(reply.messages)].append(reply)
    return list(groups.values())
