"""GRPO rewards: the judge sees each prompt's completions as one group; failures stay None."""

import asyncio

from pipeline.config import RewardConfig
from pipeline.judge.rubrics import load_rubric
from pipeline.train.rewards import judge_reward, reward_functions
from tests.fakes.judge import FakeJudge

RUBRIC = load_rubric("helpfulness")


class RecordingJudge(FakeJudge):
    def __init__(self) -> None:
        super().__init__(lambda text: None if "fail" in text else len(text) / 10)
        self.groups: list[list[str]] = []

    async def score_groups(self, rubric, conversations, candidates, references=None):
        self.groups.extend(list(group) for group in candidates)
        return await super().score_groups(rubric, conversations, candidates, references)


def test_consecutive_completions_of_a_prompt_form_a_group() -> None:
    judge = RecordingJudge()
    p1 = [{"role": "user", "content": "one"}]
    p2 = [{"role": "user", "content": "two"}]
    prompts = [p1, p1, p1, p2, p2, p2]
    completions = [
        [{"role": "assistant", "content": text}] for text in ["a", "bb", "fail", "cccc", "d", "ee"]
    ]
    rewards = asyncio.run(judge_reward(judge, RUBRIC)(prompts=prompts, completions=completions))
    assert judge.groups == [["a", "bb", "fail"], ["cccc", "d", "ee"]]
    assert rewards == [0.1, 0.2, None, 0.4, 0.1, 0.2]


def test_reward_functions_follow_the_track_weights() -> None:
    config = RewardConfig(judge=0.7, graders=[{"type": "contains", "substrings": ["thanks"], "weight": 0.3}])
    functions, weights = reward_functions(config, RecordingJudge(), RUBRIC)
    assert weights == [0.7, 0.3] and functions[0].__name__ == "judge_helpfulness"
    assert functions[1](
        prompts=["p"],
        completions=[
            "no",
        ][:1],
    ) == [0.0]
    without_judge, only = reward_functions(RewardConfig(judge=0.0), None, RUBRIC)
    assert without_judge == [] and only == []
