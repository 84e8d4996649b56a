"""Tests for evals.graders: each grader passing and failing, suite specs and their errors, the TRL
reward-function wrapper, user feedback as a score and the weighted blend of reward components."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pytest

from evals.graders import (
    CallableGrader,
    ContainsGrader,
    ExactGrader,
    Grader,
    JsonSchemaGrader,
    JudgeSpec,
    NumericGrader,
    RegexGrader,
    RegexSpec,
    Sample,
    WeightedReward,
    as_reward_function,
    combine_scores,
    feedback_score,
    grader_from_spec,
    safe_score,
    validate_grader_spec,
    weighted_grader,
)
from storage.errors import UserError

PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def make_sample(response: str, reference: str | None = None, **metadata: Any) -> Sample:
    return Sample(
        messages=[{"role": "user", "content": "q"}], response=response, reference=reference, metadata=metadata
    )


def is_even_length(sample: Sample) -> bool:
    """A grader function importable as "tests.unit.test_graders:is_even_length"."""
    return len(sample.response) % 2 == 0


def returns_two(sample: Sample) -> float:
    return 2.0


def assert_one_line_user_error(error: pytest.ExceptionInfo[UserError], *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# ---- ExactGrader ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "reference", "score"),
    [
        ("Paris", "Paris", 1.0),
        ("  paris\n", "Paris", 1.0),
        ("New   York\tCity", "new york city", 1.0),
        ("Paris.", "Paris", 0.0),
        ("Lyon", "Paris", 0.0),
    ],
)
def test_exact_default_normalisation(response: str, reference: str, score: float) -> None:
    assert ExactGrader().score(make_sample(response, reference)) == score


def test_exact_options_turn_normalisation_off() -> None:
    strict = ExactGrader(case_sensitive=True, strip=False, normalize_whitespace=False)
    assert strict.score(make_sample("Paris", "Paris")) == 1.0
    assert strict.score(make_sample("paris", "Paris")) == 0.0
    assert strict.score(make_sample(" Paris", "Paris")) == 0.0
    assert ExactGrader(case_sensitive=True).score(make_sample("paris", "Paris")) == 0.0
    keeps_inner = ExactGrader(normalize_whitespace=False)
    assert keeps_inner.score(make_sample(" a  b ", "a b")) == 0.0
    assert keeps_inner.score(make_sample(" a b ", "a b")) == 1.0


def test_exact_fixed_expected_wins_over_reference() -> None:
    grader = ExactGrader(expected="yes")
    assert grader.score(make_sample("YES", reference="no")) == 1.0
    assert grader.score(make_sample("no", reference="no")) == 0.0


def test_exact_without_any_reference_is_a_user_error() -> None:
    with pytest.raises(UserError) as error:
        ExactGrader().score(make_sample("Paris"))
    assert_one_line_user_error(error, "exact", "reference")


# ---- ContainsGrader ---------------------------------------------------------------------------


def test_contains_all_and_any() -> None:
    response = "Open Settings, then Security."
    both = ("settings", "security")
    assert ContainsGrader(both).score(make_sample(response)) == 1.0
    assert ContainsGrader(("settings", "billing")).score(make_sample(response)) == 0.0
    assert ContainsGrader(("settings", "billing"), mode="any").score(make_sample(response)) == 1.0
    assert ContainsGrader(("billing", "invoice"), mode="any").score(make_sample(response)) == 0.0


def test_contains_case_and_reference_and_single_string() -> None:
    assert ContainsGrader(("settings",), case_sensitive=True).score(make_sample("Open Settings")) == 0.0
    assert ContainsGrader().score(make_sample("The capital is Paris.", reference="paris")) == 1.0
    # A plain string is one substring, not a set of characters.
    assert ContainsGrader("xyz").score(make_sample("x y z")) == 0.0  # type: ignore[arg-type]


def test_contains_within_max_chars_is_the_right_steps_in_a_short_reply() -> None:
    short = ContainsGrader(("Billing > Invoices",), max_chars=60)
    assert short.score(make_sample("  Every invoice is under Settings > Billing > Invoices.  ")) == 1.0
    padded = "Thanks for reaching out! Every invoice is under Settings > Billing > Invoices. Bye!"
    assert short.score(make_sample(padded)) == 0.0  # right, but too long
    assert short.score(make_sample("Go to Settings > Security.")) == 0.0  # short, but wrong
    spec = grader_from_spec({"type": "contains", "substrings": ["Invoices"], "max_chars": 60})
    assert spec.score(make_sample(padded)) == 0.0 and spec.score(make_sample("Billing > Invoices")) == 1.0
    with pytest.raises(UserError):
        grader_from_spec({"type": "contains", "substrings": ["x"], "max_chars": 0})


# ---- RegexGrader ------------------------------------------------------------------------------


def test_regex_search_versus_fullmatch() -> None:
    search = RegexGrader(r"\d+")
    fullmatch = RegexGrader(r"\d+", mode="fullmatch")
    assert search.score(make_sample("the answer is 42")) == 1.0
    assert fullmatch.score(make_sample("the answer is 42")) == 0.0
    assert fullmatch.score(make_sample(" 42\n")) == 1.0
    assert search.score(make_sample("forty-two")) == 0.0


def test_regex_flags() -> None:
    assert RegexGrader("^yes$").score(make_sample("YES")) == 0.0
    assert (
        grader_from_spec({"type": "regex", "pattern": "^yes$", "flags": ["ignorecase"]}).score(
            make_sample("YES")
        )
        == 1.0
    )
    multiline = grader_from_spec({"type": "regex", "pattern": "^b$", "flags": "M"})
    assert multiline.score(make_sample("a\nb\nc")) == 1.0


# ---- JsonSchemaGrader -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ('{"name": "Ada", "age": 36}', 1.0),
        ('Here you go:\n```json\n{"name": "Ada", "age": 36}\n```\nAnything else?', 1.0),
        ('```\n{"name": "Ada", "age": 36}\n```', 1.0),
        ('Sure! {"name": "Ada", "age": 36} is the record.', 1.0),
        ('```json\n{"name": "Ada", "age": -1}\n```', 0.0),  # parses, fails "minimum"
        ('{"name": "Ada"}', 0.0),  # missing "age"
        ('{"name": "Ada", "age": 36, "x": 1}', 0.0),  # additional property
        ("```json\n{name: Ada}\n```", 0.0),  # not JSON
        ("no json here", 0.0),
    ],
)
def test_json_schema(response: str, score: float) -> None:
    assert JsonSchemaGrader(PERSON_SCHEMA).score(make_sample(response)) == score


def test_json_schema_first_array() -> None:
    grader = JsonSchemaGrader({"type": "array", "items": {"type": "integer"}, "minItems": 2})
    assert grader.score(make_sample("The primes: [2, 3, 5].")) == 1.0
    assert grader.score(make_sample("The primes: [2].")) == 0.0


# ---- CallableGrader ---------------------------------------------------------------------------


def test_callable_from_function_and_from_import_path() -> None:
    direct = CallableGrader(is_even_length)
    imported = CallableGrader("tests.unit.test_graders:is_even_length")
    for grader in (direct, imported):
        assert grader.name == "is_even_length"
        assert grader.score(make_sample("ab")) == 1.0
        assert grader.score(make_sample("abc")) == 0.0
    assert CallableGrader(lambda sample: 0.25, name="quarter").score(make_sample("x")) == 0.25


@pytest.mark.parametrize("bad", [2.0, -0.1, math.nan, "1", None])
def test_callable_out_of_range_result_is_value_error_naming_grader(bad: Any) -> None:
    grader = CallableGrader(lambda sample: bad, name="my_check")
    with pytest.raises(ValueError, match="my_check"):
        grader.score(make_sample("x"))


def test_callable_out_of_range_via_import_path() -> None:
    with pytest.raises(ValueError, match="returns_two"):
        CallableGrader("tests.unit.test_graders:returns_two").score(make_sample("x"))


# ---- NumericGrader ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "reference", "score"),
    [
        ("3 + 4 = 7", "7", 1.0),
        ("So the total is 1,234.5 dollars.", "1234.5", 1.0),
        ("Step 1: 2*3=6. Step 2: 6-10 = -4", "-4", 1.0),
        ("Pages 3-5", "5", 1.0),
        ("The answer is 42.", "#### 42", 1.0),
        ("7 apples, so 8", "7", 0.0),  # the last number counts
        ("I do not know", "7", 0.0),
        ("0.3333", "0.33333333", 0.0),  # outside the default tolerance
    ],
)
def test_numeric_last_number(response: str, reference: str, score: float) -> None:
    assert NumericGrader().score(make_sample(response, reference)) == score


def test_numeric_tolerance_and_sources() -> None:
    assert NumericGrader(tolerance=0.01).score(make_sample("about 0.3333", "0.33333333")) == 1.0
    assert NumericGrader(tolerance=0.01).score(make_sample("about 0.35", "0.33333333")) == 0.0
    assert NumericGrader(relative_tolerance=0.01).score(make_sample("1005", "1000")) == 1.0
    assert NumericGrader().score(make_sample("x = 12", answer=12)) == 1.0
    assert NumericGrader().score(make_sample("x = 13", answer=12)) == 0.0
    assert NumericGrader(expected=2.5).score(make_sample("2.5", reference="9")) == 1.0


def test_numeric_without_expected_number_is_user_error() -> None:
    with pytest.raises(UserError) as error:
        NumericGrader().score(make_sample("12"))
    assert_one_line_user_error(error, "numeric", "answer")
    with pytest.raises(UserError) as error:
        NumericGrader().score(make_sample("12", reference="twelve"))
    assert_one_line_user_error(error, "twelve")


# ---- grader_from_spec -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kind", "good", "bad"),
    [
        ({"type": "exact"}, ExactGrader, make_sample("paris", "Paris"), make_sample("Lyon", "Paris")),
        (
            {"type": "exact", "expected": "Paris", "case_sensitive": True},
            ExactGrader,
            make_sample("Paris"),
            make_sample("paris"),
        ),
        (
            {"type": "contains", "substrings": ["a", "b"], "mode": "any"},
            ContainsGrader,
            make_sample("b"),
            make_sample("c"),
        ),
        (
            {"type": "contains", "substrings": "refund"},
            ContainsGrader,
            make_sample("Refund"),
            make_sample("no"),
        ),
        (
            {"type": "regex", "pattern": r"\d+", "mode": "fullmatch"},
            RegexGrader,
            make_sample("12"),
            make_sample("a12"),
        ),
        (
            {"type": "json_schema", "schema": PERSON_SCHEMA},
            JsonSchemaGrader,
            make_sample('{"name": "A", "age": 1}'),
            make_sample("{}"),
        ),
        (
            {"type": "python", "target": "tests.unit.test_graders:is_even_length"},
            CallableGrader,
            make_sample("ab"),
            make_sample("a"),
        ),
        (
            {"type": "numeric", "tolerance": 0.5},
            NumericGrader,
            make_sample("9.6", "10"),
            make_sample("9.4", "10"),
        ),
    ],
)
def test_spec_builds_each_type(spec: dict[str, Any], kind: type, good: Sample, bad: Sample) -> None:
    grader = grader_from_spec(spec)
    assert isinstance(grader, kind)
    assert grader.score(good) == 1.0
    assert grader.score(bad) == 0.0


def test_spec_name_is_kept() -> None:
    assert grader_from_spec({"type": "exact", "name": "capital"}).name == "capital"
    assert grader_from_spec({"type": "regex", "pattern": "x"}).name == "regex"


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ({"type": "bleu"}, ["grader: ", "'bleu'", "does not match", "'exact'", "'judge'"]),
        ({"pattern": "x"}, ["grader: ", "'type'"]),
        ("exact", ["grader: ", "valid dictionary"]),
        ({"type": "judge", "rubric": "helpful"}, ["judge", "judge stage"]),
        ({"type": "regex"}, ["grader.regex.pattern: required key is missing"]),
        ({"type": "json_schema"}, ["grader.json_schema.schema: required key is missing"]),
        ({"type": "python"}, ["grader.python.target: required key is missing"]),
        ({"type": "exact", "expcted": "x"}, ["grader.exact.expcted: unknown key"]),
        ({"type": "exact", "case_sensitive": "yes"}, ["grader.exact.case_sensitive: ", "valid boolean"]),
        ({"type": "exact", "name": ""}, ["grader.exact.name: ", "at least 1 character"]),
        ({"type": "numeric", "tolerance": True}, ["grader.numeric.tolerance: ", "valid number"]),
        ({"type": "numeric", "tolerance": -1}, ["grader.numeric.tolerance: ", "greater than or equal to 0"]),
        (
            {"type": "numeric", "tolerance": math.nan},
            ["grader.numeric.tolerance: ", "greater than or equal to 0"],
        ),
        ({"type": "contains", "substrings": ["a", 1]}, ["grader.contains.substrings.1: ", "valid string"]),
        ({"type": "contains", "mode": "most"}, ["grader.contains.mode: ", "'all' or 'any'"]),
        (
            {"type": "regex", "pattern": "(unclosed"},
            ["grader.regex.pattern: ", "invalid regex", "(unclosed", "missing )"],
        ),
        ({"type": "regex", "pattern": "x", "mode": "match"}, ["grader.regex.mode: ", "'fullmatch'"]),
        ({"type": "regex", "pattern": "x", "flags": ["CASELESS"]}, ["grader.regex.flags: ", "CASELESS"]),
        ({"type": "regex", "pattern": "x", "flags": 2}, ["grader.regex.flags: ", "valid list"]),
        (
            {"type": "json_schema", "schema": {"type": "strin"}},
            ["grader.json_schema.schema: ", "invalid schema at type"],
        ),
        (
            {"type": "json_schema", "schema": {"properties": {"a": {"minimum": "zero"}}}},
            ["grader.json_schema.schema: ", "invalid schema at properties/a/minimum"],
        ),
        ({"type": "json_schema", "schema": "object"}, ["grader.json_schema.schema: ", "valid dictionary"]),
        (
            {"type": "python", "target": "no_such_module_xyz:f"},
            ["grader.python.target: ", "cannot load", "no_such_module_xyz"],
        ),
        (
            {"type": "python", "target": "tests.unit.test_graders:no_such_function"},
            ["grader.python.target: ", "cannot load", "no_such_function"],
        ),
        (
            {"type": "python", "target": "tests.unit.test_graders"},
            ["grader.python.target: ", "module:function"],
        ),
        (
            {"type": "python", "target": "tests.unit.test_graders:PERSON_SCHEMA"},
            ["grader.python.target: ", "not callable"],
        ),
    ],
)
def test_spec_errors_are_one_line_user_errors(spec: Any, needles: list[str]) -> None:
    with pytest.raises(UserError) as error:
        grader_from_spec(spec)
    assert_one_line_user_error(error, *needles)


def test_spec_validates_to_its_model_and_accepts_any_mapping() -> None:
    spec = validate_grader_spec(MappingProxyType({"type": "regex", "pattern": "a", "flags": "i"}))
    assert isinstance(spec, RegexSpec) and spec.flags == ["i"] and spec.mode == "search"
    judge = validate_grader_spec({"type": "judge", "rubric": "safety"})
    assert isinstance(judge, JudgeSpec) and judge.rubric == "safety"


@pytest.mark.parametrize(
    ("spec", "weight"),
    [
        ({"type": "exact"}, 1.0),
        ({"type": "exact", "weight": 2}, 2.0),
        ({"type": "exact", "weight": 0.0}, 0.0),
    ],
)
def test_weighted_grader_reads_the_weight(spec: dict[str, Any], weight: float) -> None:
    assert weighted_grader(spec) == (weight, ExactGrader())


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ({"type": "exact", "weight": -1}, ["weight: ", "greater than or equal to 0"]),
        ({"type": "exact", "weight": math.inf}, ["weight: ", "finite number"]),
        ({"type": "exact", "weight": True}, ["weight: ", "valid number"]),
        ({"type": "exact", "weight": "1"}, ["weight: ", "valid number"]),
        ({"type": "regex", "pattern": "(", "weight": 1}, ["grader.regex.pattern: ", "invalid regex"]),
    ],
)
def test_weighted_grader_errors_name_the_key(spec: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(UserError) as error:
        weighted_grader(spec)
    assert_one_line_user_error(error, *needles)


def test_weight_belongs_to_reward_entries_not_to_grader_specs() -> None:
    with pytest.raises(UserError) as error:
        grader_from_spec({"type": "exact", "weight": 1})
    assert_one_line_user_error(error, "grader.exact.weight: unknown key")


def test_every_grader_satisfies_the_protocol() -> None:
    graders: list[Grader] = [
        ExactGrader(),
        ContainsGrader(("a",)),
        RegexGrader("a"),
        JsonSchemaGrader({"type": "object"}),
        CallableGrader(is_even_length),
        NumericGrader(),
    ]
    assert len({grader.name for grader in graders}) == len(graders)


# ---- as_reward_function -----------------------------------------------------------------------


def test_reward_function_with_string_completions_and_references() -> None:
    reward = as_reward_function(grader_from_spec({"type": "numeric", "name": "arithmetic"}))
    assert reward.__name__ == "arithmetic"
    rewards = reward(
        prompts=["2+2?", "3*3?", "10-4?"],
        completions=["It is 4", "It is 6", "6"],
        reference=["4", "9", "6"],
        trainer_state=object(),  # TRL passes non-column kwargs too; they are ignored
    )
    assert rewards == [1.0, 0.0, 1.0]


def test_reward_function_with_chat_completions_and_answer_column() -> None:
    reward = as_reward_function(NumericGrader())
    prompts = [[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "5+5?"}]]
    completions = [
        [{"role": "assistant", "content": "The sum is 4."}],
        [{"role": "assistant", "content": "The sum is 11."}],
    ]
    assert reward(prompts, completions, answer=[4, 10]) == [1.0, 0.0]


def test_reward_function_passes_prompt_and_columns_to_the_grader() -> None:
    seen: list[Sample] = []

    def record(sample: Sample) -> float:
        seen.append(sample)
        return 1.0

    reward = as_reward_function(CallableGrader(record))
    assert reward.__name__ == "record"
    reward(["hi", "yo"], ["a", "b"], reference=["A", "B"], lang=["en", "fr"], log_metric=print)
    assert [sample.messages for sample in seen] == [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "yo"}],
    ]
    assert [sample.reference for sample in seen] == ["A", "B"]
    assert [sample.metadata["lang"] for sample in seen] == ["en", "fr"]
    assert "log_metric" not in seen[0].metadata


def test_reward_function_format_check_on_chat_completions() -> None:
    reward = as_reward_function(JsonSchemaGrader(PERSON_SCHEMA, name="person_json"))
    completions = [
        [{"role": "assistant", "content": '```json\n{"name": "Ada", "age": 36}\n```'}],
        [{"role": "assistant", "content": "Ada, 36"}],
    ]
    assert reward(prompts=["p", "p"], completions=completions) == [1.0, 0.0]
    assert reward.__name__ == "person_json"


# ---- safe_score -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FixedGrader:
    """A grader that returns `value`, or raises it when it is an exception."""

    value: float | BaseException
    name: str = "fixed"

    def score(self, sample: Sample) -> float:
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


@pytest.mark.parametrize("value", [0.0, 0.25, 1.0])
def test_safe_score_keeps_a_score_in_range(value: float) -> None:
    assert safe_score(FixedGrader(value), make_sample("x")) == value


@pytest.mark.parametrize(
    "value",
    [RuntimeError("boom"), ValueError("no number"), KeyError("answer"), math.nan, 1.5, -0.5, math.inf],
)
def test_safe_score_turns_a_failed_score_into_zero(value: float | BaseException) -> None:
    assert safe_score(FixedGrader(value, name=f"bad-{value!r}"), make_sample("x")) == 0.0


def test_safe_score_zero_for_a_callable_grader_returning_out_of_range() -> None:
    assert safe_score(CallableGrader("tests.unit.test_graders:returns_two"), make_sample("x")) == 0.0


def test_safe_score_reraises_user_errors() -> None:
    with pytest.raises(UserError, match="broken suite line"):
        safe_score(FixedGrader(UserError("broken suite line")), make_sample("x"))
    with pytest.raises(UserError, match="no reference"):
        safe_score(ExactGrader(), make_sample("x"))  # a suite line without a reference


def test_safe_score_warns_once_per_grader(caplog: pytest.LogCaptureFixture) -> None:
    grader = FixedGrader(RuntimeError("boom"), name="warns-once")
    with caplog.at_level(logging.WARNING, logger="evals.graders"):
        for _ in range(3):
            assert safe_score(grader, make_sample("x")) == 0.0
    warnings = [record for record in caplog.records if "warns-once" in record.getMessage()]
    assert len(warnings) == 1 and "RuntimeError: boom" in warnings[0].getMessage()


def test_reward_function_of_a_failing_grader_gives_zeros() -> None:
    reward = as_reward_function(FixedGrader(RuntimeError("boom"), name="raiser"))
    assert reward(prompts=["a", "b", "c"], completions=["1", "2", "3"]) == [0.0, 0.0, 0.0]
    assert as_reward_function(FixedGrader(math.nan, name="nan"))(["a"], ["1"]) == [0.0]
    assert as_reward_function(FixedGrader(1.5, name="too_big"))(["a"], ["1"]) == [0.0]
    with pytest.raises(UserError):
        as_reward_function(FixedGrader(UserError("bad config")))(["a"], ["1"])


# ---- feedback_score ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("feedback", "expected"),
    [
        (None, None),
        ({}, None),
        ({"comment": "meh"}, None),
        ({"thumb": None, "rating": None}, None),
        ({"thumb": 1}, 1.0),
        ({"thumb": -1}, 0.0),
        ({"rating": 1}, 0.0),
        ({"rating": 2}, 0.25),
        ({"rating": 3}, 0.5),
        ({"rating": 5}, 1.0),
        ({"thumb": 1, "rating": 3}, 0.75),
        ({"thumb": -1, "rating": 5}, 0.5),
        ({"thumb": -1, "rating": 1, "comment": "bad"}, 0.0),
    ],
)
def test_feedback_score_table(feedback: dict[str, Any] | None, expected: float | None) -> None:
    assert feedback_score(feedback) == expected


@pytest.mark.parametrize("feedback", [{"thumb": 0}, {"thumb": True}, {"rating": 6}, {"rating": 0}])
def test_feedback_score_rejects_invalid_values(feedback: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        feedback_score(feedback)


# ---- combine_scores / WeightedReward ---------------------------------------------------------

WEIGHTS = {"judge": 0.6, "format": 0.2, "feedback": 0.2}


def test_combine_all_present_is_weighted_mean() -> None:
    combined = combine_scores({"judge": 0.5, "format": 1.0, "feedback": 0.0}, WEIGHTS)
    assert combined == pytest.approx(0.6 * 0.5 + 0.2 * 1.0 + 0.2 * 0.0)


def test_combine_renormalises_over_present_components() -> None:
    combined = combine_scores({"judge": 0.5, "format": 1.0, "feedback": None}, WEIGHTS)
    assert combined == pytest.approx((0.6 * 0.5 + 0.2 * 1.0) / 0.8)
    assert combine_scores({"judge": 0.3}, WEIGHTS) == pytest.approx(0.3)


def test_combine_none_when_no_weighted_component_present() -> None:
    assert combine_scores({"judge": None, "feedback": None}, WEIGHTS) is None
    assert combine_scores({}, WEIGHTS) is None
    assert combine_scores({"unweighted": 1.0}, WEIGHTS) is None
    assert combine_scores({"judge": 1.0, "format": 0.0}, {"judge": 0.0, "format": 1.0}) == 0.0


def test_combine_ignores_components_without_weight() -> None:
    assert combine_scores({"judge": 1.0, "extra": 0.0}, {"judge": 1.0}) == 1.0


def test_combine_rejects_negative_weights_and_nan_scores() -> None:
    with pytest.raises(UserError, match="'format'"):
        combine_scores({"judge": 1.0}, {"judge": 1.0, "format": -0.5})
    with pytest.raises(UserError, match="'format'"):
        WeightedReward({"judge": 1.0, "format": -0.5})
    with pytest.raises(ValueError, match="'judge'"):
        combine_scores({"judge": math.nan}, {"judge": 1.0})


def test_weighted_reward_blends_judge_format_and_feedback() -> None:
    reward = WeightedReward(WEIGHTS)
    format_check = JsonSchemaGrader(PERSON_SCHEMA)
    sample = make_sample('{"name": "Ada", "age": 36}')
    components = {
        "judge": 0.8,
        "format": format_check.score(sample),
        "feedback": feedback_score({"thumb": -1}),
    }
    assert reward(components) == pytest.approx(0.6 * 0.8 + 0.2 * 1.0 + 0.2 * 0.0)
    assert reward({"judge": None, "format": 1.0, "feedback": None}) == 1.0
