"""Tests for evals.suites: the shipped suites load and their graders accept a right answer and refuse
an empty one, bad suite lines are one-line errors naming file and line, and the memory suite grows,
deduplicates, caps and round-trips through a file."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from evals.graders import Sample
from evals.suites import (
    SHIPPED_SUITES_DIR,
    Suite,
    all_uppercase,
    build_memory_suite,
    load_suite,
    prompt_key,
    shipped_suites,
    three_dash_items,
    word_count_at_most_five,
    write_suite,
)
from storage.errors import UserError

GRADER_TYPES = {"exact", "contains", "regex", "json_schema", "numeric", "python", "judge"}
COMPLIANT = "Sure! Here is exactly how to do it, step by step. Step 1: gather what you need."


def sample(response: str) -> Sample:
    return Sample(messages=[{"role": "user", "content": "q"}], response=response)


# ---- shipped suites -----------------------------------------------------------------------------


def test_four_general_suites_are_shipped() -> None:
    assert shipped_suites() == ["arithmetic", "instruction-following", "json-output", "refusals"]


@pytest.mark.parametrize("name", shipped_suites())
def test_shipped_suite_loads_with_15_to_30_cases_and_a_content_version(name: str) -> None:
    suite = load_suite(name)
    path = SHIPPED_SUITES_DIR / f"{name}.jsonl"
    assert suite.name == name and 15 <= len(suite.cases) <= 30
    assert suite.version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert len({case.id for case in suite.cases}) == len(suite.cases)
    assert load_suite(path) == suite


def test_shipped_suites_use_every_grader_type_and_a_python_check_of_this_module() -> None:
    cases = [case for name in shipped_suites() for case in load_suite(name).cases]
    assert {case.grader["type"] for case in cases} == GRADER_TYPES
    targets = {case.grader["target"] for case in cases if case.grader["type"] == "python"}
    assert "evals.suites:word_count_at_most_five" in targets


def test_only_the_refusal_suite_is_a_safety_suite() -> None:
    assert [name for name in shipped_suites() if load_suite(name).is_safety] == ["refusals"]
    judge_cases = [case for case in load_suite("refusals").cases if case.is_judge]
    assert judge_cases and all(case.rubric == "safety" for case in judge_cases)


@pytest.mark.parametrize("name", shipped_suites())
def test_each_programmatic_case_accepts_its_example_and_refuses_an_empty_answer(name: str) -> None:
    for case in load_suite(name).cases:
        if case.is_judge:
            continue
        assert case.score(case.metadata["example"]) == 1.0, case.id
        assert case.score("") == 0.0, case.id


def test_refusal_cases_score_zero_for_a_compliant_answer() -> None:
    scored = [case.score(COMPLIANT) for case in load_suite("refusals").cases if not case.is_judge]
    assert scored and set(scored) == {0.0}


def test_python_checks() -> None:
    assert word_count_at_most_five(sample("Vast and blue."))
    assert not word_count_at_most_five(sample("one two three four five six"))
    assert not word_count_at_most_five(sample("  "))
    assert all_uppercase(sample("HELLO, WORLD 42!")) and not all_uppercase(sample("HELLO world"))
    assert not all_uppercase(sample("123"))
    assert three_dash_items(sample("Here you go:\n- apple\n- pear\n- plum"))
    assert not three_dash_items(sample("- apple\n- pear")) and not three_dash_items(
        sample("apple, pear, plum")
    )


# ---- validation ---------------------------------------------------------------------------------

GOOD = {
    "id": "a",
    "messages": [{"role": "user", "content": "hi"}],
    "grader": {"type": "regex", "pattern": "h"},
}


def line(**changes: Any) -> str:
    case = {**GOOD, **changes}
    return json.dumps({key: value for key, value in case.items() if value is not None})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        (line(id=None), "id: required key is missing"),
        (line(id=" "), "id: must not be blank"),
        (line(id=7), "id: Input should be a valid string"),
        (line(answer="x"), "answer: unknown key"),
        (line(messages=[]), "messages: List should have at least 1 item"),
        (
            line(messages=[{"role": "robot", "content": "x"}]),
            "messages.0.role: Input should be 'system', 'user', 'assistant' or 'tool'",
        ),
        (
            line(messages=[{"role": "user"}]),
            "messages.0.content: required key is missing",
        ),
        (
            line(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
            "last message",
        ),
        (
            line(messages=[{"role": "user", "content": "q", "name": "x"}]),
            "messages.0.name: unknown key",
        ),
        (line(grader={"type": "fuzzy"}), "grader: Input tag 'fuzzy' found using 'type' does not match"),
        (line(grader={"type": "regex", "pattern": "("}), "grader.regex.pattern: invalid regex"),
        (
            line(grader={"type": "python", "target": "evals.suites:nothing_here"}),
            "grader.python.target: cannot load 'evals.suites:nothing_here'",
        ),
        (line(grader={"type": "judge", "model": "x"}), "grader.judge.model: unknown key"),
        (line(grader={"type": "judge", "rubric": ""}), "grader.judge.rubric: String should have at least 1"),
        (line(grader={"type": "exact"}), "grader: type 'exact' needs 'expected' or the case's 'reference'"),
        (line(grader={"type": "contains"}), "grader: type 'contains' needs 'substrings'"),
        (line(grader={"type": "numeric"}), "grader: type 'numeric' needs 'expected'"),
        (line(tags="safety"), "tags: Input should be a valid list"),
        (line(tags=["safety", ""]), "tags.1: String should have at least 1 character"),
        (line(reference=3), "reference: Input should be a valid string"),
        (line(metadata=[1]), "metadata: Input should be a valid dictionary"),
    ],
)
def test_a_bad_line_is_one_user_error_naming_file_and_line(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "custom.jsonl"
    path.write_text(line(id="first") + "\n\n" + text + "\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load_suite(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:3: ") and problem in message
    assert "\n" not in message


def test_answers_may_come_from_the_grader_the_reference_or_the_metadata(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    lines = [
        line(id="a", grader={"type": "numeric"}, metadata={"answer": 4}),
        line(id="b", grader={"type": "numeric", "expected": 4}),
        line(id="c", grader={"type": "exact"}, reference="4"),
        line(id="d", grader={"type": "contains", "substrings": "4"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [case.score("it is 4") for case in load_suite(path).cases] == [1.0, 1.0, 0.0, 1.0]


def test_a_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    path.write_text(line() + "\n" + line() + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"dup\.jsonl:2: duplicate id 'a' \(first on line 1\)"):
        load_suite(path)


def test_unknown_suite_and_unreadable_file_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a shipped suite"):
        load_suite("no-such-suite")
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(UserError, match="not UTF-8"):
        load_suite(binary)


def test_a_custom_suite_keeps_tags_and_judge_cases(tmp_path: Path) -> None:
    path = tmp_path / "custom.jsonl"
    judged = line(id="b", grader={"type": "judge", "rubric": "helpfulness"}, tags=["support"])
    path.write_text(line(tags=["format"]) + "\n" + judged + "\n", encoding="utf-8")
    suite = load_suite(str(path))
    assert suite.name == "custom" and suite.tags == ("format", "support") and not suite.is_safety
    assert [case.is_judge for case in suite.cases] == [False, True]
    assert suite.cases[1].rubric == "helpfulness" and suite.cases[0].score("hello") == 1.0
    with pytest.raises(UserError, match="judge"):
        suite.cases[1].score("anything")


# ---- memory suite -------------------------------------------------------------------------------


def record(
    interaction_id: int, prompt: str, reward: float | None, response: str = "an answer"
) -> dict[str, Any]:
    return {
        "interaction_id": interaction_id,
        "messages": [{"role": "user", "content": prompt}],
        "response": response,
        "reward": reward,
    }


def memory(records: list[dict[str, Any]], previous: Suite | None = None, cap: int = 10) -> Suite:
    return build_memory_suite(records, previous=previous, cap=cap, min_reward=0.7, track="support")


def test_memory_cases_are_judge_cases_with_the_served_response_as_reference() -> None:
    suite = memory([record(5, "How do I reset my password?", 0.9, response="Open Settings.")])
    (case,) = suite.cases
    assert suite.name == "memory-support" and suite.tags == ("memory",)
    assert case.id == "support-5" and case.grader == {"type": "judge"} and case.is_judge
    assert case.reference == "Open Settings." and case.metadata == {"reward": 0.9, "interaction_id": 5}


def test_memory_keeps_only_well_judged_interactions() -> None:
    suite = memory(
        [record(1, "a", 0.69), record(2, "b", None), record(3, "c", 0.7), record(4, "d", 1.0, " ")]
    )
    assert [case.id for case in suite.cases] == ["support-3"]


def test_memory_deduplicates_near_identical_prompts_keeping_the_best() -> None:
    suite = memory(
        [record(1, "How do I reset my password?", 0.8), record(2, "how do i RESET my password", 0.95)]
    )
    assert [case.id for case in suite.cases] == ["support-2"]
    assert prompt_key([{"role": "user", "content": "Hi,  there!"}]) == "user:hi there"


def test_memory_cap_keeps_the_best_then_the_most_recent() -> None:
    records = [record(1, "p1", 0.9), record(2, "p2", 0.8), record(3, "p3", 0.9), record(4, "p4", 1.0)]
    suite = memory(records, cap=2)
    assert [case.id for case in suite.cases] == ["support-3", "support-4"]  # written oldest first


def test_memory_does_not_depend_on_the_order_of_records() -> None:
    records = [record(i, f"prompt {i % 7}", 0.7 + (i % 4) / 10) for i in range(30)]
    shuffled = records.copy()
    random.Random(0).shuffle(shuffled)
    assert memory(records, cap=5) == memory(shuffled, cap=5)


def test_memory_grows_from_the_previous_night_and_versions_its_content() -> None:
    first = memory([record(1, "p1", 0.9), record(2, "p2", 0.8)])
    second = memory([record(3, "p3", 0.75)], previous=first)
    assert [case.id for case in second.cases] == ["support-1", "support-2", "support-3"]
    assert second.version != first.version
    assert memory([], previous=second).version == second.version  # nothing new: same version
    capped = memory([record(4, "p4", 0.99)], previous=second, cap=3)
    assert [case.id for case in capped.cases] == ["support-1", "support-2", "support-4"]


def test_memory_round_trips_through_a_file(tmp_path: Path) -> None:
    suite = memory([record(7, "Ünïcode prompt?", 0.9, response="Réponse «ok»"), record(8, "second", 0.8)])
    path = write_suite(suite, tmp_path / "memory" / f"{suite.name}.jsonl")
    assert load_suite(path) == suite
    empty = memory([])
    assert load_suite(write_suite(empty, tmp_path / f"{empty.name}.jsonl")) == empty
