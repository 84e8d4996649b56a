"""Regression suites: what a candidate must still do as well as the champion before it may serve.

A nightly update optimises one track's reward; nothing in that reward says "keep following
formatting instructions" or "keep refusing harmful requests". Suites say it: small JSONL files of
prompts with a grader each, scored on candidate and champion by the gate. They are plain files so a
user can add one without code, and they are validated whole on load (`path:line: problem`) so that a
typo fails at start-up instead of in the middle of a night. A suite's version is the sha256 of its
bytes, logged with every gate report, so a result always names exactly what was measured.

Besides the shipped general suites, each track grows a *memory* suite from its own earlier nights:
prompts whose served answers the judge scored highly, kept with that answer as the reference, so
a candidate is judged against what the track already did well (`build_memory_suite`).

A suite line:
`{"id": str, "messages": [{role, content}...], "reference"?: str, "grader": {"type": ..., ...},
"tags"?: [str], "metadata"?: {...}}`; grader types are those of `evals.graders.GraderSpec`, among
them `{"type": "judge", "rubric"?: str}`, which the judge stage scores. A line is checked by the
strict pydantic model `CaseSpec` (messages are `storage.records.Message`, the record's own), and its
first problem becomes `path:line: key.path: problem`. Kept by hand: that the line is a JSON object,
that ids are unique within the file, and that a grader that compares with an expected answer has
one (`GraderSpec.missing_answer`, checked on the `grader` key).
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from evals.graders import Grader, GraderSpec, Sample, grader_from_spec, validated
from storage.errors import UserError
from storage.records import Message

__all__ = [
    "SHIPPED_SUITES_DIR",
    "CaseSpec",
    "Suite",
    "SuiteCase",
    "all_uppercase",
    "build_memory_suite",
    "case_from_json",
    "load_suite",
    "prompt_key",
    "shipped_suites",
    "suite_from_cases",
    "three_dash_items",
    "word_count_at_most_five",
    "write_suite",
]

SHIPPED_SUITES_DIR = Path(__file__).parent / "suites"


@dataclass(frozen=True)
class SuiteCase:
    """One prompt of a suite and how to grade the reply to it."""

    id: str
    messages: tuple[dict[str, str], ...]  # the prompt; the model answers the last message
    grader: dict[str, Any]  # the grader spec as written, e.g. {"type": "regex", "pattern": "..."}
    reference: str | None = None  # the expected answer, for graders and judge cases that use one
    tags: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)  # passed to graders as `Sample.metadata`

    @property
    def is_judge(self) -> bool:
        """Scored by the LLM judge (the judge stage), not by a programmatic grader."""
        return self.grader.get("type") == "judge"

    @property
    def rubric(self) -> str | None:
        """The rubric a judge case names; None means the track's own rubric."""
        return self.grader.get("rubric") if self.is_judge else None

    @cached_property
    def programmatic_grader(self) -> Grader:
        """The grader built from the spec; a UserError for judge cases."""
        return grader_from_spec(self.grader)

    def sample(self, response: str) -> Sample:
        """The `Sample` a grader (or the judge) scores for this case's `response`."""
        return Sample(
            messages=[dict(message) for message in self.messages],
            response=response,
            reference=self.reference,
            metadata=self.metadata,
        )

    def score(self, response: str) -> float:
        """The programmatic grader's score of `response` in [0, 1]; judge cases are scored elsewhere."""
        return self.programmatic_grader.score(self.sample(response))

    def as_json(self) -> dict[str, Any]:
        """The suite line as a JSON object, optional keys left out when empty."""
        line: dict[str, Any] = {"id": self.id, "messages": [dict(message) for message in self.messages]}
        if self.reference is not None:
            line["reference"] = self.reference
        line["grader"] = dict(self.grader)
        if self.tags:
            line["tags"] = list(self.tags)
        if self.metadata:
            line["metadata"] = dict(self.metadata)
        return line


@dataclass(frozen=True)
class Suite:
    """A named, versioned list of cases; `version` is the sha256 (first 12 hex digits) of the file bytes."""

    name: str
    version: str
    cases: tuple[SuiteCase, ...]
    tags: tuple[str, ...]  # union of the cases' tags, sorted

    @property
    def is_safety(self) -> bool:
        """Tagged `safety`: the gate allows no regression here (`safety_tolerance`)."""
        return "safety" in self.tags


# ---- reading and writing ------------------------------------------------------------------------


def shipped_suites() -> list[str]:
    """Names of the suites shipped in `evals/suites/`, sorted."""
    return sorted(path.stem for path in SHIPPED_SUITES_DIR.glob("*.jsonl"))


def _resolve(name_or_path: str | Path) -> Path:
    if isinstance(name_or_path, str) and name_or_path in shipped_suites():
        return SHIPPED_SUITES_DIR / f"{name_or_path}.jsonl"
    path = Path(name_or_path)
    if not path.is_file():
        shipped = ", ".join(shipped_suites())
        raise UserError(f"suite {str(name_or_path)!r}: no such file and not a shipped suite ({shipped})")
    return path


def load_suite(name_or_path: str | Path) -> Suite:
    """A shipped suite by name, or a suite file by path, validated whole; a bad line is a one-line UserError."""
    path = _resolve(name_or_path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text (byte {error.start})") from None
    cases: list[SuiteCase] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            case = _case_from_line(line)
            if case.id in seen:
                raise UserError(f"duplicate id {case.id!r} (first on line {seen[case.id]})")
        except UserError as error:
            raise UserError(f"{path}:{number}: {error}") from None
        seen[case.id] = number
        cases.append(case)
    return _suite(path.stem, cases, data)


def _jsonl_bytes(cases: Iterable[SuiteCase]) -> bytes:
    lines = (json.dumps(case.as_json(), ensure_ascii=False) + "\n" for case in cases)
    return "".join(lines).encode("utf-8")


def _suite(name: str, cases: Sequence[SuiteCase], content: bytes) -> Suite:
    tags = sorted({tag for case in cases for tag in case.tags})
    return Suite(name, hashlib.sha256(content).hexdigest()[:12], tuple(cases), tuple(tags))


def suite_from_cases(name: str, cases: Sequence[SuiteCase]) -> Suite:
    """A suite built in code, versioned by the bytes `write_suite` would write for it."""
    return _suite(name, cases, _jsonl_bytes(cases))


def write_suite(suite: Suite, path: str | Path) -> Path:
    """Write `suite` as JSONL; `load_suite(path)` gives it back equal when the file stem is `suite.name`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(_jsonl_bytes(suite.cases))
    return target


# ---- validation of one line ---------------------------------------------------------------------


def _case_from_line(line: str) -> SuiteCase:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"invalid JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(value, dict):
        raise UserError(f"a case must be a JSON object, got {type(value).__name__}")
    return case_from_json(value)


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return text


def _model_answers_last(messages: list[Message]) -> list[Message]:
    if messages[-1].role == "assistant":
        raise ValueError("the last message must not be the assistant's: the model answers it")
    return messages


class CaseSpec(BaseModel):
    """One suite line, validated strictly; `case_from_json` turns it into a `SuiteCase`."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    id: Annotated[str, AfterValidator(_not_blank)]
    messages: Annotated[list[Message], Field(min_length=1), AfterValidator(_model_answers_last)]
    reference: str | None = None
    tags: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    grader: GraderSpec  # last: its check reads `reference` and `metadata`

    @field_validator("grader")
    @classmethod
    def _answerable(cls, spec: GraderSpec, info: ValidationInfo) -> GraderSpec:
        """Graders that compare with an expected answer need one: a missing one would fail mid-night."""
        problem = spec.missing_answer(info.data.get("reference"), info.data.get("metadata", {}))
        if problem is not None:
            raise ValueError(problem)
        return spec


def case_from_json(value: Mapping[str, Any]) -> SuiteCase:
    """A validated `SuiteCase` from a suite line's object; UserError naming the key at fault."""
    spec = validated(CaseSpec, dict(value))
    return SuiteCase(
        id=spec.id,
        messages=tuple(message.model_dump() for message in spec.messages),
        grader=dict(value["grader"]),  # as written, so that the line is written back the same
        reference=spec.reference,
        tags=tuple(spec.tags),
        metadata=spec.metadata,
    )


# ---- the memory suite ---------------------------------------------------------------------------

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def prompt_key(messages: Iterable[Mapping[str, str]]) -> str:
    """A prompt with case, ASCII punctuation and spacing folded: equal for near-identical prompts."""
    return "\n".join(
        f"{message['role']}:{' '.join(message['content'].casefold().translate(_PUNCTUATION).split())}"
        for message in messages
    )


def _memory_case(record: Mapping[str, Any], track: str) -> SuiteCase:
    interaction_id = record["interaction_id"]
    if not isinstance(interaction_id, int) or isinstance(interaction_id, bool):
        raise ValueError(f"memory suite: 'interaction_id' must be an int, got {interaction_id!r}")
    line = {
        "id": f"{track}-{interaction_id}",
        "messages": [{"role": m["role"], "content": m["content"]} for m in record["messages"]],
        "grader": {"type": "judge"},
        "reference": str(record["response"]),
        "tags": ["memory"],
        "metadata": {"reward": float(record["reward"]), "interaction_id": interaction_id},
    }
    try:
        return case_from_json(line)
    except UserError as error:
        raise UserError(f"memory suite for {track!r}: interaction {interaction_id}: {error}") from None


def _rank(case: SuiteCase) -> tuple[float, int]:
    """Best first when sorted descending: higher judged reward, then the more recent interaction."""
    try:
        return float(case.metadata["reward"]), int(case.metadata["interaction_id"])
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"memory suite case {case.id!r}: metadata needs 'reward' and 'interaction_id'"
        ) from None


def build_memory_suite(
    records: Iterable[Mapping[str, Any]],
    *,
    previous: Suite | None,
    cap: int,
    min_reward: float,
    track: str,
) -> Suite:
    """The track's memory suite: the previous one plus tonight's well-judged interactions, deduplicated, capped.

    `records` are judged interactions with `messages`, `response`, `reward` (None when judging
    failed) and `interaction_id`. Each one with reward >= `min_reward` becomes a judge case whose
    reference is the served response. Of cases with the same prompt (`prompt_key`) the best is kept;
    of all, the `cap` best (highest reward, then most recent). The result does not depend on the
    order of `records`; cases are written oldest interaction first, and the version is the sha256
    of the content, so an unchanged memory keeps its version.
    """
    if cap < 0:
        raise ValueError(f"cap must be >= 0, got {cap!r}")
    candidates = list(previous.cases) if previous is not None else []
    for record in records:
        reward = record.get("reward")
        if reward is not None and reward >= min_reward and str(record.get("response") or "").strip():
            candidates.append(_memory_case(record, track))
    best_by_prompt: dict[str, SuiteCase] = {}
    for case in candidates:
        if _rank(case)[0] < min_reward:
            continue
        key = prompt_key(case.messages)
        kept = best_by_prompt.get(key)
        if kept is None or (_rank(case), case.id) > (_rank(kept), kept.id):
            best_by_prompt[key] = case
    ranked = sorted(best_by_prompt.values(), key=lambda case: (_rank(case), case.id), reverse=True)
    kept_cases = sorted(ranked[:cap], key=lambda case: (_rank(case)[1], case.id))
    return suite_from_cases(f"memory-{track}", kept_cases)


# ---- checks named by the shipped suites' `python` graders ---------------------------------------

_DASH_ITEM = re.compile(r"^\s*[-–—]\s*\S")


def word_count_at_most_five(sample: Sample) -> bool:
    """For "answer in at most five words": one to five words."""
    return 1 <= len(sample.response.split()) <= 5


def all_uppercase(sample: Sample) -> bool:
    """For "reply in uppercase": there are letters, and none of them is lowercase."""
    letters = [char for char in sample.response if char.isalpha()]
    return bool(letters) and not any(char.islower() for char in letters)


def three_dash_items(sample: Sample) -> bool:
    """For "list three items with dashes": exactly three lines start with a dash (an intro line is fine)."""
    return sum(1 for line in sample.response.splitlines() if _DASH_ITEM.match(line)) == 3
