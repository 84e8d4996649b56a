"""Select: weakest first, spread over topics, a stable held-out split that never overlaps training."""

from pipeline.select import is_heldout, select, topic_signature


def row(n: int, question: str, reward: float | None) -> dict:
    return {
        "interaction_id": n,
        "messages": [{"role": "user", "content": question}],
        "reward": reward,
        "metadata": {},
    }


def test_weakest_first_and_spread_over_topics() -> None:
    rows = [row(i, f"please reset my password {i}", 0.9 - i / 100) for i in range(10)]
    rows += [row(100 + i, f"refund my order right {i}", 0.5 + i / 100) for i in range(10)]
    selection = select(rows, max_prompts=6, heldout_fraction=0.01)
    firsts = [p.messages[0]["content"] for p in selection.train]
    assert firsts[0].startswith("refund my order right 0")  # the weakest of all
    assert {topic_signature(p.messages) for p in selection.train[:2]} == {
        "please reset my password",
        "refund my order right",
    }
    password_rewards = [
        p.metadata["served_reward"] for p in selection.train if "password" in p.messages[0]["content"]
    ]
    assert password_rewards == sorted(password_rewards)


def test_unscored_rows_come_last() -> None:
    rows = [row(1, "alpha question", None), row(2, "beta question", 0.9)]
    selection = select(rows, max_prompts=2, heldout_fraction=0.01)
    assert [p.metadata["interaction_id"] for p in selection.train] == [2, 1] and selection.unscored == 1


def test_heldout_split_is_stable_and_disjoint() -> None:
    rows = [row(i, f"question number {i} about topic {i % 13}", i / 400) for i in range(400)]
    first = select(rows, max_prompts=1000, heldout_fraction=0.25)
    again = select(list(reversed(rows)), max_prompts=1000, heldout_fraction=0.25)
    train = {p.messages[0]["content"] for p in first.train}
    heldout = {p.messages[0]["content"] for p in first.heldout}
    assert not train & heldout and len(train) + len(heldout) == 400
    assert heldout == {p.messages[0]["content"] for p in again.heldout}
    assert 60 <= len(heldout) <= 140  # about a quarter
    assert is_heldout([{"role": "user", "content": "Question number 7 about topic 7!"}], 0.25) == (
        "question number 7 about topic 7" in heldout
    )


def test_references_reach_training_prompts() -> None:
    selection = select(
        [{**row(1, "what is 2+2", 0.1), "metadata": {"answer": 4}}], max_prompts=5, heldout_fraction=0.01
    )
    assert selection.train[0].reference == "4"
