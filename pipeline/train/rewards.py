"""Rewards for GRPO: the track's judge in group mode, plus programmatic graders, with weights.

TRL calls a reward function with the prompts and completions of a batch, where each prompt's
completions sit next to each other. The judge scores a prompt's completions together (group mode),
which is what GRPO's group-relative advantages compare; a completion whose judgment failed gets
`None`, which TRL leaves out of that sample's reward instead of counting it as zero.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import groupby
from typing import Any

import orjson

from evals.graders import as_reward_function, weighted_grader
from pipeline.config import RewardConfig
from pipeline.judge.client import Judge
from pipeline.judge.rubrics import Rubric

RewardFunction = Callable[..., Any]


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes strings, or chat messages for conversational prompts."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content", "") for message in completion if message.get("role") == "assistant")


def judge_reward(judge: Judge, rubric: Rubric) -> RewardFunction:
    """An async TRL reward function: consecutive completions of one prompt are judged as a group."""

    async def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        references = kwargs.get("reference") or [None] * len(prompts)
        keyed = [_prompt_key(prompt) for prompt in prompts]
        conversations, candidates, group_references = [], [], []
        start = 0
        for _, members in groupby(range(len(prompts)), key=lambda index: keyed[index]):
            size = len(list(members))
            conversations.append(list(prompts[start]))
            candidates.append([completion_text(c) for c in completions[start : start + size]])
            group_references.append(references[start])
            start += size
        groups = await judge.score_groups(rubric, conversations, candidates, group_references)
        return [verdict.score for group in groups for verdict in group]

    reward.__name__ = f"judge_{rubric.id}"
    return reward


def reward_functions(
    reward: RewardConfig, judge: Judge | None, rubric: Rubric
) -> tuple[list[RewardFunction], list[float]]:
    """The track's reward as TRL reward functions and their weights (user feedback does not apply to
    fresh completions, so its weight only shapes the judged-snapshot reward used to select prompts)."""
    functions: list[RewardFunction] = []
    weights: list[float] = []
    if reward.judge > 0 and judge is not None:
        functions.append(judge_reward(judge, rubric))
        weights.append(reward.judge)
    for spec in reward.graders:
        weight, grader = weighted_grader(spec)
        functions.append(as_reward_function(grader))
        weights.append(weight)
    return functions, weights


def _prompt_key(prompt: Any) -> bytes:
    return (
        orjson.dumps(prompt, option=orjson.OPT_SORT_KEYS) if not isinstance(prompt, str) else prompt.encode()
    )
