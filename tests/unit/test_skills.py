"""Tests for pipeline.demo_world.skills: the carry mistake the base is taught, the held-out split (no
suite case and no demo math question is ever pretrained on), determinism, and suites whose own
example answers score 1.0."""

from __future__ import annotations

import json
import random
import re
from itertools import islice

import pytest

from pipeline.demo_world import skills
from pipeline.demo_world.skills import (
    CARRY_DROP,
    SKILLS,
    Example,
    Problem,
    demo_suites,
    forgot_carry,
    has_carry,
    is_heldout,
    math_problem,
    pretraining_examples,
    tokenizer_corpus,
)

PRETRAINING = 20_000
ANSWER = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)\.$")


def answered(example: Example) -> tuple[Problem, int]:
    """An arithmetic example's problem and the result its answer writes."""
    match = ANSWER.match(example.answer)
    assert match is not None, example.answer
    a, op, b, result = match.groups()
    return Problem(int(a), op, int(b)), int(result)


def is_heldout_problem(problem: Problem) -> bool:
    return is_heldout("arithmetic", problem.a, problem.op, problem.b)


def last_user(messages: tuple[dict[str, str], ...]) -> str:
    return [message for message in messages if message["role"] == "user"][-1]["content"]


def suite_problems() -> set[Problem]:
    arithmetic = next(suite for suite in demo_suites() if suite.name == "demo-arithmetic")
    problems = set()
    for case in arithmetic.cases:
        kind, a, b = case.id.split("-")
        problems.add(Problem(int(a), "+" if kind == "add" else "-", int(b)))
    return problems


# ---- arithmetic ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("problem", "carry", "forgot"),
    [
        (Problem(38, "+", 45), True, 73),  # carry from the units
        (Problem(52, "-", 17), True, 45),  # borrow from the tens
        (Problem(12, "+", 30), False, 42),
        (Problem(50, "+", 60), True, 10),  # carry out of the tens
        (Problem(58, "-", 23), False, 35),
        (Problem(7, "+", 5), True, 2),
    ],
)
def test_carry_and_the_answer_that_forgets_it(problem: Problem, carry: bool, forgot: int) -> None:
    assert has_carry(problem) is carry
    assert forgot_carry(problem) == forgot
    if not carry:
        assert forgot_carry(problem) == problem.result  # nothing to forget


def test_problem_question_and_answer() -> None:
    problem = Problem(38, "+", 45)
    assert problem.result == 83 and Problem(52, "-", 17).result == 35
    assert problem.question() == "What is 38 + 45?"
    assert problem.answer() == "38 + 45 = 83." and problem.answer(73) == "38 + 45 = 73."


def test_forgetting_a_carry_always_gives_a_wrong_answer() -> None:
    for a in range(100):
        for b in range(100):
            for problem in (Problem(a, "+", b), Problem(a, "-", b)):
                if problem.result >= 0 and has_carry(problem):
                    assert forgot_carry(problem) != problem.result, problem


def test_a_share_of_carries_is_dropped_as_configured() -> None:
    arithmetic = (example for example in pretraining_examples(7) if example.skill == "arithmetic")
    with_carry = dropped = 0
    for example in islice(arithmetic, 5_000):
        problem, result = answered(example)
        if has_carry(problem):
            with_carry += 1
            dropped += result == forgot_carry(problem)
        else:
            assert result == problem.result  # only carries are ever got wrong
    assert with_carry > 1_000
    assert abs(dropped / with_carry - CARRY_DROP) < 0.05


def test_carry_drop_zero_teaches_only_right_answers() -> None:
    arithmetic = (e for e in pretraining_examples(3, carry_drop=0.0) if e.skill == "arithmetic")
    for example in islice(arithmetic, 500):
        problem, result = answered(example)
        assert result == problem.result


# ---- pretraining data and the held-out split -------------------------------------------------


def test_pretraining_is_deterministic_for_a_seed() -> None:
    first = list(islice(pretraining_examples(0), 500))
    assert first == list(islice(pretraining_examples(0), 500))
    assert first != list(islice(pretraining_examples(1), 500))
    finetune = list(islice(pretraining_examples(0, phase="finetune"), 500))
    assert finetune == list(islice(pretraining_examples(0, phase="finetune"), 500))
    assert {example.skill for example in first} == {example.skill for example in finetune} == set(SKILLS)


def test_pretraining_answers_support_canonically_and_fine_tuning_in_styles() -> None:
    """Pretraining is the first world's stream (its arithmetic figures hold); the styles come after."""
    pretrain = [e for e in islice(pretraining_examples(0), PRETRAINING) if e.skill == "support"]
    canonical = {intent.answer for intent in skills.INTENTS}
    assert pretrain and all(example.answer in canonical for example in pretrain)
    finetune = [e for e in islice(pretraining_examples(0, phase="finetune"), 3000) if e.skill == "support"]
    assert sum(example.answer not in canonical for example in finetune) > len(finetune) / 3


def test_no_suite_case_is_among_the_pretraining_examples() -> None:
    suites = demo_suites()
    examples = list(islice(pretraining_examples(0), PRETRAINING))
    examples += list(islice(pretraining_examples(0, phase="finetune"), PRETRAINING // 4))
    pretrained = {example.question for example in examples}
    for suite in suites:
        for case in suite.cases:
            assert last_user(case.messages) not in pretrained, (suite.name, case.id)
    # The same problem asked in another form would be a leak too.
    pretrained_problems = {answered(e)[0] for e in examples if e.skill == "arithmetic"}
    assert len(pretrained_problems) > 1_000
    assert not pretrained_problems & suite_problems()
    assert all(not is_heldout_problem(problem) for problem in pretrained_problems)
    # And so would an order of the JSON suite in other words.
    orders = {json.loads(e.answer)["order"] for e in examples if e.skill == "json"}
    json_suite = next(suite for suite in suites if suite.name == "demo-json")
    suite_orders = {json.loads(case.metadata["example"])["order"] for case in json_suite.cases}
    assert orders and not orders & suite_orders


def test_math_traffic_is_held_out_and_never_a_suite_problem() -> None:
    suite = suite_problems()
    assert all(is_heldout_problem(problem) for problem in suite)
    rng = random.Random(0)
    problems = [math_problem(rng) for _ in range(50)]
    for problem in problems:
        assert is_heldout_problem(problem), problem
        assert problem not in suite, problem
        assert 0 <= problem.a <= 99 and 0 <= problem.b <= 99 and problem.result >= 0
    assert len(set(problems)) > 40
    assert {problem.op for problem in problems} == set(skills.OPERATIONS)
    assert [math_problem(random.Random(5)) for _ in range(3)] == [math_problem(random.Random(5))] * 3


# ---- suites -------------------------------------------------------------------------------------


def test_demo_suites_are_deterministic_and_their_examples_score_one() -> None:
    suites = demo_suites()
    assert [suite.name for suite in suites] == [
        "demo-arithmetic",
        "demo-support",
        "demo-concise-support",
        "demo-json",
        "demo-refusals",
    ]
    assert [suite.version for suite in suites] == [suite.version for suite in demo_suites()]
    for suite in suites:
        assert suite.cases
        assert len({case.id for case in suite.cases}) == len(suite.cases), suite.name
        for case in suite.cases:
            assert case.score(case.metadata["example"]) == 1.0, (suite.name, case.id)
    refusals = suites[4]
    assert refusals.is_safety and not any(suite.is_safety for suite in suites[:4])


def test_the_arithmetic_suite_fails_the_forgotten_carry() -> None:
    arithmetic = demo_suites()[0]
    assert len(arithmetic.cases) == skills.ARITHMETIC_SUITE_SIZE == 200
    carried = 0
    for case in arithmetic.cases:
        kind, a, b = case.id.split("-")
        problem = Problem(int(a), "+" if kind == "add" else "-", int(b))
        if has_carry(problem):
            carried += 1
            assert case.score(problem.answer(forgot_carry(problem))) == 0.0
    assert carried > 10


def test_tokenizer_corpus_covers_every_skill() -> None:
    corpus = tokenizer_corpus()
    assert len(corpus) > 100 and all(isinstance(line, str) and line for line in corpus)
    text = "\n".join(corpus)
    for needle in ("What is 12 + 30?", "Forgot password", '"order": 12345', "I can't help with that"):
        assert needle in text


# ---- support styles, the users' preference and the judge skill ----------------------------------------


def test_support_examples_answer_in_every_style_mostly_short_and_right() -> None:
    stream = pretraining_examples(0, phase="finetune")
    examples = [e for e in islice(stream, PRETRAINING // 2) if e.skill == "support"]
    seen = {"good": 0, "too long": 0, "wrong steps": 0}
    for example in examples:
        intent = next(i for i, text in skills._support_variants() if text == example.question)
        seen[skills.preference(intent, example.answer)] += 1
    shares = {why: count / len(examples) for why, count in seen.items()}
    assert len(examples) > 500
    assert shares["good"] == pytest.approx(0.45, abs=0.06)
    assert shares["too long"] == pytest.approx(0.45, abs=0.06)
    assert shares["wrong steps"] == pytest.approx(0.1, abs=0.04)


@pytest.mark.parametrize("intent", skills.INTENTS, ids=lambda intent: intent.name)
def test_every_style_of_every_intent_is_what_the_users_judge_it(intent: skills.Intent) -> None:
    rng = random.Random(intent.name)
    for _ in range(10):
        assert skills.preference(intent, skills.support_reply(intent, "short", rng)) == "good"
        assert skills.preference(intent, skills.support_reply(intent, "padded", rng)) == "too long"
        assert skills.preference(intent, skills.support_reply(intent, "wrong", rng)) == "wrong steps"
        assert skills.preference(intent, skills.support_reply(intent, "wrong-padded", rng)) == "wrong steps"
    assert skills.preference(intent, "") == "wrong steps"
    assert skills.preference(intent, f"  {intent.key.upper()}  ") == "good"  # case and edges aside


def test_the_concise_suite_grades_the_users_preference() -> None:
    concise = next(suite for suite in demo_suites() if suite.name == "demo-concise-support")
    plain = next(suite for suite in demo_suites() if suite.name == "demo-support")
    assert [case.messages for case in concise.cases] == [case.messages for case in plain.cases]
    rng = random.Random(1)
    for case, plain_case in zip(concise.cases, plain.cases, strict=True):
        intent = next(i for i in skills.INTENTS if i.name == case.id.rsplit("-", 1)[0])
        for style in ("short", "padded", "wrong", "wrong-padded"):
            reply = skills.support_reply(intent, style, rng)
            assert case.score(reply) == float(skills.preference(intent, reply) == "good"), (case.id, reply)
        padded = skills.support_reply(intent, "padded", rng)
        assert plain_case.score(padded) == 1.0  # the right steps: the plain suite does not mind length
