"""The demo's simulated users: their hidden preference and the questions they ask."""

from __future__ import annotations

import random

from pipeline.demo_world import skills
from pipeline.demo_world.skills import SHORT_REPLY_CHARS
from pipeline.demo_world.users import verdict

INVOICE = next(intent for intent in skills.INTENTS if intent.name == "invoice")


def test_a_short_reply_with_the_right_steps_is_liked_and_the_rest_is_not() -> None:
    rng = random.Random(0)
    good = verdict(INVOICE, INVOICE.answer, rng)
    assert (good.liked, good.thumb, good.why) == (True, 1, "good") and good.rating >= 4
    padded = "Thanks for reaching out! " + INVOICE.answer + " " + "We are always happy to help. " * 3
    assert len(padded) > SHORT_REPLY_CHARS
    long = verdict(INVOICE, padded, rng)
    assert (long.liked, long.thumb, long.rating, long.why) == (False, -1, 3, "too long")
    other = next(intent for intent in skills.INTENTS if intent.name == "refund")
    wrong = verdict(INVOICE, other.answer, rng)
    assert (wrong.liked, wrong.thumb, wrong.why) == (False, -1, "wrong steps") and wrong.rating <= 2
    assert not verdict(INVOICE, "", rng).liked


def test_the_users_ask_questions_neither_pretraining_nor_the_suite_saw() -> None:
    questions = skills.support_questions()
    suite = next(suite for suite in skills.demo_suites() if suite.name == "demo-support")
    in_suite = {case.messages[-1]["content"] for case in suite.cases}
    assert len(questions) > 100
    assert all(skills.is_heldout("support", text) for _, text in questions)
    assert not in_suite & {text for _, text in questions}
    assert {intent.name for intent, _ in questions} == {intent.name for intent in skills.INTENTS}
