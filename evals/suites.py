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
"tags"?: [str], "metadata"?: {...}}`; grader types are those of `evals.graders.grader_from_spec`
plus `{"type": "judge", "rubric"?: str}`, which the judge stage scores.
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
from typing import Any

from evals.graders import Grader, Sample, grader_from_spec
from storage.errors import UserError

__all__ = [
    "SHIPPED_SUITES_DIR",
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
ROLES = ("system", "user", "assistant", "tool")
_CASE_KEYS = ("id", "messages", "reference", "grader", "tags", "metadata")  # also the order written
_REQUIRED_KEYS = ("id", "messages", "grader")
_JUDGE_KEYS = {"type": (str,), "rubric": (str,), "name": (str,)}


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


def case_from_json(value: Mapping[str, Any]) -> SuiteCase:
    """A validated `SuiteCase` from a suite line's object; UserError naming the key at fault."""
    unknown = [key for key in value if key not in _CASE_KEYS]
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r} (allowed: {', '.join(_CASE_KEYS)})")
    missing = [key for key in _REQUIRED_KEYS if key not in value]
    if missing:
        raise UserError(f"missing key {missing[0]!r}")
    case_id = value["id"]
    if not isinstance(case_id, str) or not case_id.strip():
        raise UserError(f"'id' must be a non-empty string, got {case_id!r}")
    reference = value.get("reference")
    if reference is not None and not isinstance(reference, str):
        raise UserError(f"'reference' must be a string, got {reference!r}")
    metadata = value.get("metadata", {})
    if not isinstance(metadata, dict):
        raise UserError(f"'metadata' must be an object, got {metadata!r}")
    case = SuiteCase(
        id=case_id,
        messages=_checked_messages(value["messages"]),
        grader=_checked_grader(value["grader"]),
        reference=reference,
        tags=_checked_tags(value.get("tags", [])),
        metadata=dict(metadata),
    )
    _check_answerable(case)
    return case


def _checked_messages(messages: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"'messages' must be a non-empty list, got {messages!r}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise UserError(f"messages[{index}] must be an object with exactly 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UserError(f"messages[{index}]: role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise UserError(f"messages[{index}]: content must be a string, got {content!r}")
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] == "assistant":
        raise UserError("the last message must not be the assistant's: the model answers it")
    return tuple(checked)


def _checked_tags(tags: Any) -> tuple[str, ...]:
    if not isinstance(tags, list) or not all(isinstance(tag, str) and tag for tag in tags):
        raise UserError(f"'tags' must be a list of non-empty strings, got {tags!r}")
    return tuple(tags)


def _checked_grader(spec: Any) -> dict[str, Any]:
    """The spec, checked: judge specs here, the others by building them with `grader_from_spec`."""
    if isinstance(spec, dict) and spec.get("type") == "judge":
        for key, item in spec.items():
            if key not in _JUDGE_KEYS:
                raise UserError(f"grader type 'judge': unknown key {key!r} (allowed: name, rubric, type)")
            if not isinstance(item, _JUDGE_KEYS[key]) or not item:
                raise UserError(f"grader type 'judge': key {key!r} must be a non-empty string, got {item!r}")
        return dict(spec)
    grader_from_spec(spec)  # raises a one-line UserError naming the grader key at fault
    return dict(spec)


def _check_answerable(case: SuiteCase) -> None:
    """Graders that compare with an expected answer need one: a missing one would fail mid-night."""
    kind, spec = case.grader.get("type"), case.grader
    has_reference = case.reference is not None
    if kind == "exact" and "expected" not in spec and not has_reference:
        raise UserError("grader type 'exact' needs 'expected' or the case's 'reference'")
    if kind == "contains" and not spec.get("substrings") and not has_reference:
        raise UserError("grader type 'contains' needs 'substrings' or the case's 'reference'")
    if kind == "numeric" and "expected" not in spec and not has_reference and "answer" not in case.metadata:
        raise UserError("grader type 'numeric' needs 'expected', the case's 'reference' or metadata 'answer'")


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
    try:
        messages = _checked_messages(
            [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
        )
    except UserError as error:
        raise UserError(f"memory suite for {track!r}: interaction {interaction_id}: {error}") from None
    return SuiteCase(
        id=f"{track}-{interaction_id}",
        messages=messages,
        grader={"type": "judge"},
        reference=str(record["response"]),
        tags=("memory",),
        metadata={"reward": float(record["reward"]), "interaction_id": interaction_id},
    )


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
