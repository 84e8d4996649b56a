"""What the feedback methods (KTO, DPO, SFT) learn from: examples from scored replies, the skip
reasons, the scores that never become labels, and the selection that puts rated rows first."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from pipeline.config import TrainConfig
from pipeline.results import TrainPrompt
from pipeline.select import select
from pipeline.train import examples
from pipeline.train.examples import ScoredReply, dpo_rows, kto_rows, logged_replies, sft_rows, shortage
from pipeline.train.feedback import score_replies

SETTINGS = TrainConfig(min_examples=2)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def reply(question: str, text: str, score: float, source: str = "feedback") -> ScoredReply:
    return ScoredReply(chat(question), text, score, source)


def test_kto_labels_clear_replies_and_leaves_the_ambiguous_out() -> None:
    replies = [
        reply("q1", "good", 1.0),
        reply("q2", "bad", 0.0),
        reply("q3", "meh", 0.5),  # a thumb up with a rating of 1: neither
        reply("q4", "fine", 0.75),  # rating 4: desirable (at the threshold)
        reply("q5", "poor", 0.25),  # rating 2: undesirable (at the threshold)
    ]
    rows = kto_rows(replies, SETTINGS)
    assert [(row["completion"][0]["content"], row["label"]) for row in rows] == [
        ("good", True),
        ("bad", False),
        ("fine", True),
        ("poor", False),
    ]
    assert rows[0]["prompt"] == chat("q1")
    assert rows[0]["completion"] == [{"role": "assistant", "content": "good"}]
    assert examples.counts("kto", rows) == {"desirable": 2, "undesirable": 2}


def test_kto_with_one_class_only_says_why_it_skips() -> None:
    rows = kto_rows([reply(f"q{i}", "good", 1.0) for i in range(20)], SETTINGS)
    reason = shortage("kto", rows, SETTINGS, replies=20)
    assert (
        reason
        == "kto needs both desirable and undesirable replies: 20 desirable, 0 undesirable among 20 scored replies"
    )


def test_too_few_examples_is_a_reason_naming_the_setting() -> None:
    settings = TrainConfig(min_examples=8)
    rows = kto_rows([reply("a", "x", 1.0), reply("b", "y", 0.0)], settings)
    assert "fewer than train.min_examples=8" in (shortage("kto", rows, settings, replies=2) or "")
    assert shortage("dpo", [], settings, replies=5) == (
        "dpo has 0 preference pairs from 5 scored replies, fewer than train.min_examples=8"
    )
    assert shortage("sft", [{}] * 8, settings, replies=8) is None


def test_dpo_pairs_the_best_and_worst_reply_of_a_prompt_when_far_enough_apart() -> None:
    replies = [
        reply("How do I reset my password?", "wrong", 0.0),
        reply("how do i reset my password", "right", 1.0),  # the same prompt, normalised
        reply("How do I reset my password?", "partly", 0.5),
        reply("close call", "a", 0.6),
        reply("close call", "b", 0.5),  # 0.1 apart: below pair_margin 0.25
        reply("single", "only", 1.0),
    ]
    rows = dpo_rows(replies, SETTINGS)
    assert rows == [
        {
            "prompt": chat("How do I reset my password?"),
            "chosen": [{"role": "assistant", "content": "right"}],
            "rejected": [{"role": "assistant", "content": "wrong"}],
        }
    ]


def test_identical_replies_never_make_a_pair() -> None:
    rows = dpo_rows([reply("q", "same", 1.0), reply("q", "same", 0.0, "sample")], SETTINGS)
    assert rows == []


def test_sft_keeps_the_best_reply_of_each_prompt_when_it_is_desirable() -> None:
    replies = [
        reply("q1", "ok", 0.8),
        reply("q1", "best", 1.0, "sample"),
        reply("q2", "weak", 0.5),
        reply("q3", "bad", 0.0),
    ]
    assert sft_rows(replies, SETTINGS) == [
        {"prompt": chat("q1"), "completion": [{"role": "assistant", "content": "best"}]}
    ]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -0.1, 1.5, None, True, "1"])
def test_scores_that_are_not_finite_numbers_in_range_never_become_labels(bad: object) -> None:
    prompts = [TrainPrompt(chat("q"), response="reply", score=bad, score_source="reward")]  # type: ignore[arg-type]
    assert logged_replies(prompts) == []


def test_logged_replies_keep_their_source_and_skip_prompts_without_a_reply() -> None:
    prompts = [
        TrainPrompt(chat("a"), response="x", score=1.0, score_source="feedback"),
        TrainPrompt(chat("b"), response=None, score=1.0, score_source="feedback"),
        TrainPrompt(chat("c"), response="z", score=None),
    ]
    assert logged_replies(prompts) == [ScoredReply(chat("a"), "x", 1.0, "feedback")]


def test_sampled_replies_get_the_weighted_reward_and_nan_scores_are_dropped() -> None:
    prompts = [TrainPrompt(chat("p1"), reference="r1"), TrainPrompt(chat("p2"), reference="r2")]
    seen: dict[str, object] = {}

    def exact(prompts: list, completions: list, reference: list, **_: object) -> list[float]:
        seen["reference"] = reference
        return [1.0 if c[0]["content"] == "yes" else 0.0 for c in completions]

    def broken(prompts: list, completions: list, **_: object) -> list[float]:
        return [math.nan, 0.0, math.nan, math.nan]

    scores = score_replies(prompts, ["yes", "no", "yes", "no"], 2, [exact, broken], [3.0, 1.0])
    assert scores == [1.0, 0.0, 1.0, 0.0]  # NaN parts left out, weights renormalised over the rest
    assert seen["reference"] == ["r1", "r1", "r2", "r2"]

    def all_nan(prompts: list, completions: list, **_: object) -> list[float]:
        return [math.nan] * len(completions)

    assert score_replies(prompts, ["a", "b", "c", "d"], 2, [all_nan], None) == [None] * 4


def test_async_reward_functions_are_awaited() -> None:
    async def judge(prompts: list, completions: list, **_: object) -> list[float]:
        return [0.25] * len(completions)

    assert score_replies([TrainPrompt(chat("p"))], ["a", "b"], 2, [judge], None) == [0.25, 0.25]


def test_config_refuses_unknown_methods_and_crossed_thresholds() -> None:
    with pytest.raises(ValidationError, match="method"):
        TrainConfig.model_validate({"method": "ppo"})
    with pytest.raises(ValidationError, match="undesirable_score"):
        TrainConfig(desirable_score=0.5, undesirable_score=0.6)
    with pytest.raises(ValidationError, match="prompts_per_step >= 2"):
        TrainConfig(method="kto", prompts_per_step=1)
    assert TrainConfig(method="dpo").method == "dpo"


def judged_row(index: int, text: str, *, feedback: float | None, reward: float | None) -> dict[str, object]:
    return {
        "interaction_id": index,
        "messages": chat(text),
        "response": f"reply {index}",
        "feedback_score": feedback,
        "reward": reward,
    }


def test_selection_carries_the_reply_and_prefers_the_users_score() -> None:
    rows = [
        judged_row(1, "alpha question one", feedback=0.0, reward=0.9),
        judged_row(2, "beta question two", feedback=None, reward=0.4),
    ]
    chosen = select(rows, max_prompts=10, heldout_fraction=0.01, seed=0)
    by_reply = {prompt.response: prompt for prompt in chosen.train}
    assert by_reply["reply 1"].score == 0.0 and by_reply["reply 1"].score_source == "feedback"
    assert by_reply["reply 2"].score == 0.4 and by_reply["reply 2"].score_source == "reward"
    again = TrainPrompt.from_json(by_reply["reply 1"].as_json())
    assert again == by_reply["reply 1"]


def test_feedback_first_selection_takes_rated_rows_before_the_rest() -> None:
    rows = [judged_row(i, f"topic{i} words here", feedback=None, reward=0.0) for i in range(6)]
    rows += [judged_row(10 + i, f"rated{i} words here", feedback=1.0, reward=1.0) for i in range(3)]
    plain = select(rows, max_prompts=3, heldout_fraction=0.01, seed=0)
    rated = select(rows, max_prompts=3, heldout_fraction=0.01, seed=0, feedback_first=True)
    assert all(prompt.score_source == "reward" for prompt in plain.train)  # weakest first
    assert sorted(prompt.response or "" for prompt in rated.train) == ["reply 10", "reply 11", "reply 12"]


def test_the_reward_models_held_out_split_keeps_every_reply_to_a_prompt_on_one_side() -> None:
    from pipeline.train.reward_model import split

    replies = [reply(f"question {i % 40}", f"reply {i}", float(i % 2)) for i in range(200)]
    train, heldout = split(replies, 0.25, seed=0)
    assert train and heldout and len(train) + len(heldout) == 200
    assert not {r.messages[0]["content"] for r in train} & {r.messages[0]["content"] for r in heldout}
    assert split(replies, 0.25, seed=0) == (train, heldout)  # stable


def test_reward_model_agreement_counts_clear_thumbs_only() -> None:
    from pipeline.train.reward_model import agreement_with_users

    replies = [reply("a", "x", 1.0), reply("b", "y", 0.0), reply("c", "z", 0.5), reply("d", "w", 1.0)]
    agreement, rank = agreement_with_users([0.9, 0.2, 0.99, 0.1], replies, SETTINGS)
    assert agreement == pytest.approx(2 / 3)  # "c" (0.5) is no thumb either way; "d" is called wrong
    assert rank is not None and -1.0 <= rank <= 1.0
    assert agreement_with_users([0.5], [reply("a", "x", 0.5)], SETTINGS)[0] is None
