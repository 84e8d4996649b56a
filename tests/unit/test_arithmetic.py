"""Tests for evals.arithmetic: the value of the question's expression, the exact-answer grader, its
failure on a question without arithmetic (an error the reward turns into 0.0) and its grader spec."""

from __future__ import annotations

from fractions import Fraction

import pytest

from evals.arithmetic import ArithmeticGrader, question_value
from evals.graders import ArithmeticSpec, Sample, as_reward_function, grader_from_spec, safe_score
from storage.errors import UserError


def ask(question: str, reply: str) -> Sample:
    return Sample(messages=[{"role": "user", "content": question}], response=reply)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("What is 38 + 45?", 83),
        ("what's 12+30", 42),
        ("52 - 17 = ?", 35),
        ("Compute (3 + 4) × 5.", 35),
        ("Compute 2 × (3 + 4).", 14),
        ("144 ÷ 12", 12),
        ("what is 6x7", 42),
        ("What is 10 / 4?", Fraction(5, 2)),
    ],
)
def test_question_value_of_the_expression_in_the_question(text: str, value: Fraction | int) -> None:
    assert question_value(text) == value


@pytest.mark.parametrize("text", ["Hello, how are you?", "What is 7?", "", "What is 8 / 0?"])
def test_question_value_is_none_without_an_expression_or_a_value(text: str) -> None:
    assert question_value(text) is None


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("What is 1.5 + 2?", None),  # read as 5 + 2 = 7: a decimal the grader cannot read exactly
        ("What is 1,000 + 1?", None),  # read as 000 + 1 = 1
        ("What is 2^3 + 1?", None),  # read as 3 + 1 = 4
        ("What is -5 + 3?", -2),  # read as 5 + 3 = 8: the sign is dropped
    ],
)
def test_question_value_never_reads_a_fragment(text: str, value: int | None) -> None:
    assert question_value(text) == value


def test_question_value_takes_the_last_expression() -> None:
    assert question_value("Earlier I asked 1 + 1. Now: what is 20 - 5?") == 15


def test_grader_scores_the_exact_answer() -> None:
    grader = ArithmeticGrader()
    assert grader.score(ask("What is 38 + 45?", "38 + 45 = 83.")) == 1.0
    assert grader.score(ask("What is 38 + 45?", "83")) == 1.0
    assert grader.score(ask("What is 38 + 45?", "38 + 45 = 73.")) == 0.0  # the forgotten carry
    assert grader.score(ask("What is 38 + 45?", "I am not sure.")) == 0.0
    assert grader.score(ask("What is 10 / 4?", "It is 2.5")) == 1.0


def test_grader_reads_the_last_user_turn() -> None:
    sample = Sample(
        messages=[
            {"role": "system", "content": "Answer 1 + 1 style questions."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 30 + 12?"},
        ],
        response="42",
    )
    assert ArithmeticGrader().score(sample) == 1.0


def test_a_question_without_arithmetic_raises_and_safe_score_makes_it_zero() -> None:
    grader = ArithmeticGrader()
    sample = ask("How do I reset my password?", "42")
    with pytest.raises(ValueError, match="no arithmetic expression"):
        grader.score(sample)
    assert safe_score(grader, sample) == 0.0
    no_user = Sample(messages=[], response="42")
    with pytest.raises(ValueError):
        grader.score(no_user)
    assert safe_score(grader, no_user) == 0.0


def test_reward_function_of_the_grader() -> None:
    reward = as_reward_function(ArithmeticGrader())
    assert reward.__name__ == "exact_answer"
    scores = reward(
        prompts=["What is 38 + 45?", "What is 38 + 45?", "Tell me a joke."],
        completions=["38 + 45 = 83.", "38 + 45 = 73.", "7"],
    )
    assert scores == [1.0, 0.0, 0.0]


def test_grader_from_spec() -> None:
    grader = grader_from_spec({"type": "arithmetic"})
    assert isinstance(grader, ArithmeticGrader)
    assert grader.score(ask("52 - 17 = ?", "52 - 17 = 35.")) == 1.0
    named = grader_from_spec({"type": "arithmetic", "name": "sum_check", "tolerance": 0.5})
    assert isinstance(named, ArithmeticGrader) and named.name == "sum_check" and named.tolerance == 0.5
    assert named.score(ask("What is 10 / 4?", "2.9")) == 1.0
    assert ArithmeticSpec.model_validate({"type": "arithmetic"}).build() == ArithmeticGrader()


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"type": "arithmetic", "expected": 3}, "expected"),
        ({"type": "arithmetic", "tolerance": -1}, "tolerance"),
    ],
)
def test_bad_spec_is_a_one_line_user_error(spec: dict[str, object], needle: str) -> None:
    with pytest.raises(UserError) as error:
        grader_from_spec(spec)
    message = str(error.value)
    assert "\n" not in message and needle in message
