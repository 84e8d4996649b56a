"""Programmatic graders: one scoring function serves both the regression suites and the RL reward.

A grader looks at one `Sample` (the prompt messages, the model's response, an optional reference)
and returns a score in [0, 1]. The nightly gate averages those scores over a suite to catch
forgetting; training wraps the very same grader with `as_reward_function` so that what is rewarded
is what is measured (nanochat's `tasks/common.py`, TRL's `trl/rewards/`).

Suites and configs name graders with a small JSON object, e.g. `{"type": "regex", "pattern": "..."}`.
Its checking comes from pydantic: one strict model per grader type (`ExactSpec` ... `JudgeSpec`),
`extra="forbid"`, in the discriminated union `GraderSpec` on `type`, so an unknown key, a wrong type
or a missing key is reported with its location and the first problem becomes a one-line `UserError`
(`storage.records.describe_validation_error`), not a crash in the middle of a night. Kept by hand,
because pydantic cannot know them: that a regex compiles, that a JSON schema is valid
(`jsonschema`'s own `check_schema`), that a `python` target imports, and which graders need the
case's reference (`missing_answer`). The graders themselves stay small dataclasses, built from the
validated spec (`grader_from_spec`) or directly in code.

The reward a night trains on is usually a blend: the LLM judge's score, a format check and whatever
the user said (`feedback_score`). `combine_scores` blends them with weights and copes with the parts
that are missing for a given row (most rows have no feedback; a judgment can fail).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, TypeVar

import jsonschema
import jsonschema.exceptions
import jsonschema.validators
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from evals.arithmetic import ArithmeticGrader
from evals.sample import Sample, last_number
from storage.errors import UserError
from storage.records import describe_validation_error

logger = logging.getLogger(__name__)

__all__ = [
    "ArithmeticSpec",
    "CallableGrader",
    "ContainsGrader",
    "ContainsSpec",
    "ExactGrader",
    "ExactSpec",
    "Grader",
    "GraderSpec",
    "JsonSchemaGrader",
    "JsonSchemaSpec",
    "JudgeSpec",
    "NumericGrader",
    "NumericSpec",
    "PythonSpec",
    "RegexGrader",
    "RegexSpec",
    "Sample",
    "WeightedReward",
    "as_reward_function",
    "combine_scores",
    "feedback_score",
    "grader_from_spec",
    "last_number",
    "load_callable",
    "regex_flags",
    "safe_score",
    "validate_grader_spec",
    "validated",
    "weighted_grader",
]


class Grader(Protocol):
    """Scores one sample in [0, 1]; `name` is what the score is logged under."""

    @property
    def name(self) -> str: ...

    def score(self, sample: Sample) -> float: ...


def _reference(grader_name: str, expected: str | None, sample: Sample) -> str:
    """The fixed `expected` value, else the sample's reference; a suite line without either is a user error."""
    if expected is not None:
        return expected
    if sample.reference is not None:
        return sample.reference
    raise UserError(f"grader {grader_name!r}: the sample has no reference and the grader no 'expected'")


@dataclass(frozen=True)
class ExactGrader:
    """1.0 when the response equals the reference after normalisation, else 0.0."""

    expected: str | None = None  # fixed answer; None means use each sample's reference
    case_sensitive: bool = False
    strip: bool = True  # ignore leading and trailing whitespace
    normalize_whitespace: bool = True  # treat any run of whitespace as one space
    name: str = "exact"

    def _normalise(self, text: str) -> str:
        if self.normalize_whitespace:
            text = " ".join(text.split()) if self.strip else re.sub(r"\s+", " ", text)
        elif self.strip:
            text = text.strip()
        return text if self.case_sensitive else text.casefold()

    def score(self, sample: Sample) -> float:
        expected = _reference(self.name, self.expected, sample)
        return float(self._normalise(sample.response) == self._normalise(expected))


@dataclass(frozen=True)
class ContainsGrader:
    """1.0 when the response contains all (or any) of the substrings, else 0.0.

    With no substrings given, the sample's reference is the one substring to look for; a plain
    string is one substring, not a set of characters. With `max_chars`, a response longer than that
    (leading and trailing whitespace aside) scores 0.0 whatever it contains: "the right steps, short".
    """

    substrings: Sequence[str] = ()
    mode: Literal["all", "any"] = "all"
    case_sensitive: bool = False
    max_chars: int | None = None
    name: str = "contains"

    def __post_init__(self) -> None:
        substrings = self.substrings
        object.__setattr__(
            self, "substrings", (substrings,) if isinstance(substrings, str) else tuple(substrings)
        )

    def score(self, sample: Sample) -> float:
        needles = tuple(self.substrings) or (_reference(self.name, None, sample),)
        haystack = sample.response
        if self.max_chars is not None and len(haystack.strip()) > self.max_chars:
            return 0.0
        if not self.case_sensitive:
            haystack = haystack.casefold()
            needles = tuple(needle.casefold() for needle in needles)
        found = [needle in haystack for needle in needles]
        return float(all(found) if self.mode == "all" else any(found))


_REGEX_FLAGS = {
    "IGNORECASE": re.IGNORECASE,
    "I": re.IGNORECASE,
    "MULTILINE": re.MULTILINE,
    "M": re.MULTILINE,
    "DOTALL": re.DOTALL,
    "S": re.DOTALL,
    "VERBOSE": re.VERBOSE,
    "X": re.VERBOSE,
    "ASCII": re.ASCII,
    "A": re.ASCII,
}


def regex_flags(names: str | Sequence[str]) -> int:
    """`["IGNORECASE", "DOTALL"]` (or short names, any case) as the `re` flags integer; ValueError if unknown."""
    flags = 0
    for flag_name in [names] if isinstance(names, str) else names:
        flag = _REGEX_FLAGS.get(flag_name.upper())
        if flag is None:
            known = ", ".join(name for name in _REGEX_FLAGS if len(name) > 1)
            raise ValueError(f"unknown regex flag {flag_name!r} (known: {known})")
        flags |= flag
    return flags


def _compile(pattern: str, flags: int) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as error:
        raise ValueError(f"invalid regex {pattern!r}: {error}") from None


@dataclass(frozen=True)
class RegexGrader:
    """1.0 when the pattern is found in the response ("search") or matches all of it ("fullmatch").

    "fullmatch" ignores leading and trailing whitespace, which models add freely.
    """

    pattern: str
    mode: Literal["search", "fullmatch"] = "search"
    flags: int = 0  # `re` flags; see `regex_flags` for names
    name: str = "regex"
    _compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", _compile(self.pattern, self.flags))

    def score(self, sample: Sample) -> float:
        if self.mode == "fullmatch":
            return float(self._compiled.fullmatch(sample.response.strip()) is not None)
        return float(self._compiled.search(sample.response) is not None)


_JSON_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


def _extract_json(text: str) -> tuple[bool, Any]:
    """(found, value): all of the text as JSON, else a fenced block's body, else the first object or array."""
    candidates = [text.strip(), *(match.group(1).strip() for match in _JSON_FENCE.finditer(text))]
    for candidate in candidates:
        try:
            return True, json.loads(candidate)
        except ValueError:
            continue
    decoder = json.JSONDecoder()
    for start in (index for index, char in enumerate(text) if char in "{["):
        try:
            return True, decoder.raw_decode(text, start)[0]
        except ValueError:
            continue
    return False, None


def _schema_validator(schema: Mapping[str, Any]) -> Any:
    """A jsonschema validator for `schema` (its draft from `$schema`); ValueError if the schema is invalid."""
    validator_class = jsonschema.validators.validator_for(dict(schema))
    try:
        validator_class.check_schema(dict(schema))
    except jsonschema.exceptions.SchemaError as error:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise ValueError(f"invalid schema at {where}: {error.message.splitlines()[0]}") from None
    return validator_class(dict(schema))


@dataclass(frozen=True)
class JsonSchemaGrader:
    """1.0 when the response holds JSON (bare, fenced or embedded) that validates against the schema."""

    schema: Mapping[str, Any]
    name: str = "json_schema"
    _validator: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_validator", _schema_validator(self.schema))

    def score(self, sample: Sample) -> float:
        found, value = _extract_json(sample.response)
        return float(found and self._validator.is_valid(value))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def load_callable(target: str) -> Callable[..., Any]:
    """Import `"package.module:function"` (the part after the colon may be dotted); ValueError if it fails."""
    module_name, colon, attribute = target.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"must look like 'module:function', got {target!r}")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except Exception as error:
        raise ValueError(f"cannot load {target!r}: {_first_line(error)}") from None
    if not callable(found):
        raise ValueError(f"{target!r} is not callable")
    return found


@dataclass(frozen=True)
class CallableGrader:
    """Any function `Sample -> float | bool`, given directly or as an importable "module:function"."""

    target: str | Callable[[Sample], float | bool]
    name: str = ""  # defaults to the function's name
    _function: Callable[[Sample], float | bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        function = load_callable(self.target) if isinstance(self.target, str) else self.target
        object.__setattr__(self, "_function", function)
        if not self.name:
            object.__setattr__(self, "name", getattr(function, "__name__", None) or str(self.target))

    def score(self, sample: Sample) -> float:
        value = self._function(sample)
        if isinstance(value, bool):
            return float(value)
        if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ValueError(f"grader {self.name!r} returned {value!r}; a score must be a number in [0, 1]")
        return float(value)


@dataclass(frozen=True)
class NumericGrader:
    """1.0 when the last number in the response equals the expected one within the tolerance.

    The expected number is `expected`, else the sample's reference, else `metadata["answer"]`; a
    text reference such as "#### 42" counts by its last number too. For arithmetic tasks.
    """

    expected: float | str | None = None
    tolerance: float = 1e-6  # absolute, >= 0
    relative_tolerance: float = 0.0  # >= 0
    name: str = "numeric"

    def _expected(self, sample: Sample) -> float:
        for source in (self.expected, sample.reference, sample.metadata.get("answer")):
            if isinstance(source, int | float) and not isinstance(source, bool):
                return float(source)
            if isinstance(source, str):
                number = last_number(source)
                if number is not None:
                    return number
                raise UserError(f"grader {self.name!r}: expected answer {source!r} holds no number")
        raise UserError(f"grader {self.name!r}: the sample has no reference or metadata 'answer'")

    def score(self, sample: Sample) -> float:
        expected = self._expected(sample)
        got = last_number(sample.response)
        if got is None:
            return 0.0
        return float(math.isclose(got, expected, rel_tol=self.relative_tolerance, abs_tol=self.tolerance))


# ---- grader specs: the JSON objects suites and configs name graders with ----------------------


def _one_or_many(value: Any) -> Any:
    """A plain string where a list of strings is expected stands for the list of that one string."""
    return [value] if isinstance(value, str) else value


def _known_flags(names: list[str]) -> list[str]:
    regex_flags(names)
    return names


def _loadable(target: str) -> str:
    load_callable(target)
    return target


def _valid_schema(schema: dict[str, Any]) -> dict[str, Any]:
    _schema_validator(schema)
    return schema


_Strings = Annotated[list[str], BeforeValidator(_one_or_many)]  # "x" or ["x", "y"]
_NonNegative = Annotated[float, Field(ge=0)]


class _Spec(BaseModel):
    """Strict: `"yes"` is not a boolean, `1` is not a string, and an unknown key is probably a typo."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class _GraderSpec(_Spec):
    name: Annotated[str, Field(min_length=1)] | None = None  # what the score is logged under

    def options(self) -> dict[str, Any]:
        """The grader's keyword arguments: the keys the spec sets; the grader's defaults for the rest."""
        written = self.model_dump(exclude={"type"}, exclude_unset=True, by_alias=True)
        return {key: value for key, value in written.items() if value is not None}

    def missing_answer(self, reference: str | None, metadata: Mapping[str, Any]) -> str | None:
        """What a case with this reference and metadata lacks for this grader to score it; None if nothing."""
        return None


class ExactSpec(_GraderSpec):
    type: Literal["exact"]
    expected: str | None = None
    case_sensitive: bool = False
    strip: bool = True
    normalize_whitespace: bool = True

    def build(self) -> Grader:
        return ExactGrader(**self.options())

    def missing_answer(self, reference: str | None, metadata: Mapping[str, Any]) -> str | None:
        if self.expected is None and reference is None:
            return "type 'exact' needs 'expected' or the case's 'reference'"
        return None


class ContainsSpec(_GraderSpec):
    type: Literal["contains"]
    substrings: _Strings = Field(default_factory=list)
    mode: Literal["all", "any"] = "all"
    case_sensitive: bool = False
    max_chars: int | None = Field(default=None, ge=1)  # longer responses (stripped) score 0

    def build(self) -> Grader:
        return ContainsGrader(**self.options())

    def missing_answer(self, reference: str | None, metadata: Mapping[str, Any]) -> str | None:
        if not self.substrings and reference is None:
            return "type 'contains' needs 'substrings' or the case's 'reference'"
        return None


class RegexSpec(_GraderSpec):
    type: Literal["regex"]
    flags: Annotated[_Strings, AfterValidator(_known_flags)] = Field(default_factory=list)  # before `pattern`
    pattern: str
    mode: Literal["search", "fullmatch"] = "search"

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str, info: ValidationInfo) -> str:
        _compile(pattern, regex_flags(info.data.get("flags", [])))
        return pattern

    def build(self) -> Grader:
        return RegexGrader(**{**self.options(), "flags": regex_flags(self.flags)})


class JsonSchemaSpec(_GraderSpec):
    type: Literal["json_schema"]
    json_schema: Annotated[dict[str, Any], AfterValidator(_valid_schema)] = Field(alias="schema")

    def build(self) -> Grader:
        return JsonSchemaGrader(**self.options())


class PythonSpec(_GraderSpec):
    type: Literal["python"]
    target: Annotated[str, AfterValidator(_loadable)]  # "package.module:function"

    def build(self) -> Grader:
        return CallableGrader(**self.options())


class NumericSpec(_GraderSpec):
    type: Literal["numeric"]
    expected: float | str | None = None
    tolerance: _NonNegative = 1e-6
    relative_tolerance: _NonNegative = 0.0

    def build(self) -> Grader:
        return NumericGrader(**self.options())

    def missing_answer(self, reference: str | None, metadata: Mapping[str, Any]) -> str | None:
        if self.expected is None and reference is None and "answer" not in metadata:
            return "type 'numeric' needs 'expected', the case's 'reference' or metadata 'answer'"
        return None


class ArithmeticSpec(_GraderSpec):
    """The exact-answer reward for arithmetic questions (`evals.arithmetic`): no reference needed."""

    type: Literal["arithmetic"]
    tolerance: _NonNegative = 1e-9

    def build(self) -> Grader:
        return ArithmeticGrader(**self.options())


class JudgeSpec(_GraderSpec):
    """A suite case the LLM judge scores (the judge stage), with the track's rubric unless one is named."""

    type: Literal["judge"]
    rubric: Annotated[str, Field(min_length=1)] | None = None

    def build(self) -> Grader:
        raise UserError("grader type 'judge' needs an LLM judge: it is scored by the judge stage, not here")


GraderSpec = Annotated[
    ExactSpec
    | ContainsSpec
    | RegexSpec
    | JsonSchemaSpec
    | PythonSpec
    | NumericSpec
    | ArithmeticSpec
    | JudgeSpec,
    Field(discriminator="type"),
]


SpecModel = TypeVar("SpecModel", bound=BaseModel)


class _Graded(_Spec):
    grader: GraderSpec  # so that every error's location starts with "grader"


class _Weighted(_Graded):
    weight: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0


def validated(model: type[SpecModel], data: dict[str, Any]) -> SpecModel:
    """`data` as `model`; its first problem as a one-line UserError `key.path: problem`."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise UserError(describe_validation_error(error)) from None


def validate_grader_spec(spec: Any) -> GraderSpec:
    """The spec as its validated model (judge specs too); a one-line UserError such as
    `grader.regex.pattern: invalid regex '(': ...` names the key at fault."""
    return validated(_Graded, {"grader": dict(spec) if isinstance(spec, Mapping) else spec}).grader


def grader_from_spec(spec: Mapping[str, Any]) -> Grader:
    """Build a grader from a suite line's `grader` object, e.g. `{"type": "regex", "pattern": "^\\d+$"}`."""
    return validate_grader_spec(spec).build()


def weighted_grader(spec: Mapping[str, Any]) -> tuple[float, Grader]:
    """A reward config entry: a grader spec plus an optional `weight` (default 1.0, a finite number >= 0)."""
    data: dict[str, Any] = {"grader": {key: value for key, value in spec.items() if key != "weight"}}
    if "weight" in spec:
        data["weight"] = spec["weight"]
    entry = validated(_Weighted, data)
    return entry.weight, entry.grader.build()


def _completion_text(completion: Any) -> str:
    """A TRL completion as text: a string as is, or the last assistant message's content."""
    if isinstance(completion, str):
        return completion
    messages = [message for message in completion if message.get("role", "assistant") == "assistant"]
    if not messages:
        raise ValueError(f"completion has no assistant message: {completion!r}")
    content = messages[-1].get("content")
    if not isinstance(content, str):
        raise ValueError(f"completion content must be a string, got {type(content).__name__}")
    return content


def _prompt_messages(prompt: Any) -> list[dict[str, str]]:
    if prompt is None:
        return []
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def _samples(
    prompts: Sequence[Any] | None, completions: Sequence[Any], columns: Mapping[str, Any]
) -> list[Sample]:
    """One Sample per completion; per-item dataset columns become metadata, `reference`/`answer` the reference."""
    count = len(completions)
    per_item = {
        key: value
        for key, value in columns.items()
        if isinstance(value, list | tuple) and len(value) == count
    }
    references = per_item.get("reference", per_item.get("answer"))
    samples = []
    for index, completion in enumerate(completions):
        reference = references[index] if references is not None else None
        samples.append(
            Sample(
                messages=_prompt_messages(prompts[index] if prompts is not None else None),
                response=_completion_text(completion),
                reference=None if reference is None else str(reference),
                metadata={key: values[index] for key, values in per_item.items()},
            )
        )
    return samples


_warned: set[str] = set()


def safe_score(grader: Grader, sample: Sample) -> float:
    """The grader's score as a reward: 0.0 (failed, never a positive reward) when the grader cannot
    score the sample (it raised, or returned NaN or a value outside [0, 1]). A `UserError` (a wrong
    config or suite line) is not a scoring failure and is raised."""
    try:
        value = float(grader.score(sample))
    except UserError:
        raise
    except Exception as error:  # any grader, including user code: never a crash mid-night
        _warn_once(grader.name, f"{type(error).__name__}: {error}")
        return 0.0
    if not 0.0 <= value <= 1.0:  # also NaN
        _warn_once(grader.name, f"returned {value!r}")
        return 0.0
    return value


def _warn_once(name: str, problem: str) -> None:
    if name not in _warned:
        _warned.add(name)
        logger.warning("grader %r could not score a reply (%s); such replies score 0", name, problem)


def as_reward_function(grader: Grader) -> Callable[..., list[float]]:
    """The grader as a TRL reward function `(prompts, completions, **kwargs) -> list[float]`.

    Completions may be strings or chat messages; the dataset's `reference` (or `answer`) column gives
    each item's reference, and every per-item column is in `Sample.metadata`. TRL logs the reward
    under the function's `__name__`, which is the grader's name.
    """

    def reward(
        prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **kwargs: Any
    ) -> list[float]:
        return [safe_score(grader, sample) for sample in _samples(prompts, completions, kwargs)]

    reward.__name__ = grader.name
    reward.__qualname__ = grader.name
    return reward


def feedback_score(feedback: Mapping[str, Any] | None) -> float | None:
    """User feedback as a score in [0, 1]: thumb up 1.0, down 0.0, rating r (1..5) (r-1)/4; both averaged."""
    if not feedback:
        return None
    parts = []
    thumb, rating = feedback.get("thumb"), feedback.get("rating")
    if thumb is not None:
        if thumb not in (1, -1) or isinstance(thumb, bool):
            raise ValueError(f"feedback thumb must be 1 or -1, got {thumb!r}")
        parts.append(1.0 if thumb == 1 else 0.0)
    if rating is not None:
        if isinstance(rating, bool) or not isinstance(rating, int | float) or not 1 <= rating <= 5:
            raise ValueError(f"feedback rating must be in 1..5, got {rating!r}")
        parts.append((rating - 1) / 4)
    return sum(parts) / len(parts) if parts else None


def _check_weights(weights: Mapping[str, float]) -> None:
    for name, weight in weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"reward weight {name!r} must be a finite number >= 0, got {weight!r}")


def combine_scores(components: Mapping[str, float | None], weights: Mapping[str, float]) -> float | None:
    """Weighted mean of the components that are present, weights renormalised over them.

    A component that is None (a failed judgment, no feedback) or has no weight is left out; the
    result is None when no component with a positive weight is present.
    """
    _check_weights(weights)
    total = weight_sum = 0.0
    for name, score in components.items():
        weight = weights.get(name, 0.0)
        if score is None or weight == 0:
            continue
        if not math.isfinite(score):
            raise ValueError(f"reward component {name!r} is {score!r}; scores must be finite")
        total += weight * score
        weight_sum += weight
    return total / weight_sum if weight_sum > 0 else None


@dataclass(frozen=True)
class WeightedReward:
    """A fixed set of weights, e.g. `{"judge": 0.6, "format": 0.2, "feedback": 0.2}`, applied per row."""

    weights: Mapping[str, float]

    def __post_init__(self) -> None:
        _check_weights(self.weights)

    def __call__(self, components: Mapping[str, float | None]) -> float | None:
        return combine_scores(components, self.weights)
