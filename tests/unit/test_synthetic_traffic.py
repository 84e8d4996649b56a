"""Synthetic traffic: deterministic, structurally valid, and as messy as designed."""

from __future__ import annotations

import ast
import itertools
import json
import operator
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from pipeline.demo_world.synthetic_traffic import (
    DEFAULT_START,
    dumps_record,
    generate_records,
    malformed_lines,
    write_jsonl,
)

N = 2000
SEED = 11

# ---------------------------------------------------------------- an independent contract checker

ALLOWED_KEYS = {
    "id",
    "ts",
    "track",
    "user_id",
    "session_id",
    "messages",
    "response",
    "model",
    "feedback",
    "metadata",
    "consent",
}
REQUIRED_KEYS = {"ts", "track", "user_id", "messages", "response", "model"}
ROLES = {"system", "user", "assistant", "tool"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ts_errors(value: object) -> list[str]:
    if not isinstance(value, str):
        return ["ts not a string"]
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return ["ts not ISO-8601"]
    return [] if parsed.tzinfo is not None else ["ts without timezone"]


def _messages_errors(messages: object) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return ["messages not a non-empty list"]
    errors = []
    for message in messages:
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            errors.append("message shape")
        elif message["role"] not in ROLES or not isinstance(message["content"], str):
            errors.append("message role or content")
    if not errors and messages[-1]["role"] != "user":
        errors.append("conversation does not end with a user message")
    return errors


def _feedback_errors(feedback: object) -> list[str]:
    if not isinstance(feedback, dict) or not feedback or not set(feedback) <= {"thumb", "rating", "comment"}:
        return ["feedback shape"]
    errors = []
    if "thumb" in feedback and not (_is_int(feedback["thumb"]) and feedback["thumb"] in (1, -1)):
        errors.append("thumb")
    if "rating" in feedback and not (_is_int(feedback["rating"]) and 1 <= feedback["rating"] <= 5):
        errors.append("rating")
    if "comment" in feedback and not isinstance(feedback["comment"], str):
        errors.append("comment")
    return errors


def contract_errors(record: object) -> list[str]:
    """Problems with one decoded record; empty when it meets the interaction-record contract."""
    if not isinstance(record, dict):
        return ["not an object"]
    errors = [f"missing {key}" for key in REQUIRED_KEYS - set(record)]
    errors += [f"unknown key {key}" for key in set(record) - ALLOWED_KEYS]
    if errors:
        return errors
    for key in ("track", "user_id", "model"):
        if not isinstance(record[key], str) or not record[key]:
            errors.append(key)
    for key in ("id", "session_id"):
        if key in record and (not isinstance(record[key], str) or not record[key]):
            errors.append(key)
    errors += _ts_errors(record["ts"])
    errors += _messages_errors(record["messages"])
    if not isinstance(record["response"], str):
        errors.append("response")
    if "feedback" in record:
        errors += _feedback_errors(record["feedback"])
    if not isinstance(record.get("metadata", {}), dict):
        errors.append("metadata")
    if "consent" in record and not isinstance(record["consent"], bool):
        errors.append("consent")
    return errors


# ---------------------------------------------------------------- helpers

_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def safe_eval(expression: str) -> float:
    """Value of an arithmetic expression with + - * / × ÷ and parentheses, nothing else."""

    def walk(node: ast.AST) -> float:
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int)
            and not isinstance(node.value, bool)
        ):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unexpected syntax in {expression!r}")

    return walk(ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval").body)


def user_texts(record: dict[str, Any]) -> list[str]:
    return [m["content"] for m in record["messages"] if m["role"] == "user"]


def last_int(text: str) -> int:
    return int(re.findall(r"-?\d+", text)[-1])


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


def luhn_ok(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


PII_PATTERNS: list[tuple[str, re.Pattern[str], Callable[[str], bool]]] = [
    ("api_key", re.compile(r"\bsk-[A-Za-z0-9-]{20,}"), lambda _: True),
    ("email", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), lambda _: True),
    (
        "iban",
        re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,3})?\b"),
        lambda s: iban_ok(s.replace(" ", "")),
    ),
    ("card", re.compile(r"\b(?:\d{4}[ -]?){3}\d{4}\b"), lambda s: luhn_ok(re.sub(r"\D", "", s))),
    (
        "phone",
        re.compile(r"\+\d{1,3}(?: \d{2,4}){2,4}|\(\d{3}\) \d{3}-\d{4}|\b0\d{4} \d{6}\b"),
        lambda _: True,
    ),
    ("ipv4", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"), lambda _: True),
]


def detect_pii(text: str) -> set[str]:
    """Kinds of personal data in `text`; each match is cut out so later patterns don't see it."""
    found = set()
    for kind, pattern, valid in PII_PATTERNS:
        for match in pattern.finditer(text):
            if valid(match.group()):
                found.add(kind)
                text = text.replace(match.group(), " ")
    return found


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return list(generate_records(N, seed=SEED))


@pytest.fixture(scope="module")
def by_track(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped = defaultdict(list)
    for record in records:
        grouped[record["track"]].append(record)
    return grouped


# ---------------------------------------------------------------- determinism


def _lines(n: int, **kwargs: Any) -> list[str]:
    return [dumps_record(record) for record in generate_records(n, **kwargs)]


def test_same_seed_gives_identical_output_and_another_seed_does_not() -> None:
    assert _lines(300, seed=7) == _lines(300, seed=7)
    assert _lines(300, seed=7) != _lines(300, seed=8)


def test_id_fraction_changes_only_the_ids() -> None:
    with_ids = list(generate_records(500, seed=5, id_fraction=0.8))
    without = list(generate_records(500, seed=5, id_fraction=0.0))
    assert all("id" not in record for record in without)
    assert [{k: v for k, v in r.items() if k != "id"} for r in with_ids] == without
    share = sum("id" in record for record in with_ids) / len(with_ids)
    assert 0.7 <= share <= 0.9
    ids = [record["id"] for record in generate_records(500, seed=5, id_fraction=1.0)]
    assert len(ids) == len(set(ids)) == 500


def test_generates_exactly_n_records() -> None:
    assert list(generate_records(0)) == []
    assert len(list(generate_records(37, seed=3))) == 37


# ---------------------------------------------------------------- structure


def test_every_record_meets_the_contract(records: list[dict[str, Any]]) -> None:
    problems = {index: contract_errors(record) for index, record in enumerate(records)}
    assert {index: errs for index, errs in problems.items() if errs} == {}
    assert all(record["model"].split("@")[0] == record["track"] for record in records)


def test_records_survive_a_json_round_trip(records: list[dict[str, Any]]) -> None:
    assert [json.loads(dumps_record(record)) for record in records] == records


def test_both_tracks_present_and_tracks_argument_respected(by_track: dict[str, list[dict[str, Any]]]) -> None:
    assert set(by_track) == {"support", "math"}
    assert all(len(group) > N / 4 for group in by_track.values())
    assert {record["track"] for record in generate_records(200, seed=1, tracks=("math",))} == {"math"}


def test_timestamps_sorted_and_within_the_span(records: list[dict[str, Any]]) -> None:
    stamps = [datetime.fromisoformat(record["ts"]) for record in records]
    assert stamps == sorted(stamps)
    assert all(DEFAULT_START <= stamp < DEFAULT_START + timedelta(hours=24) for stamp in stamps)
    assert records[0]["ts"].startswith("2026-11-21T") and records[0]["ts"].endswith("+00:00")


def test_custom_start_and_span() -> None:
    start = datetime(2027, 3, 1, 22, 0, tzinfo=timezone(timedelta(hours=2)))
    got = list(generate_records(300, seed=2, start=start, span_hours=2.0))
    stamps = [datetime.fromisoformat(record["ts"]) for record in got]
    assert stamps == sorted(stamps)
    assert all(start <= stamp < start + timedelta(hours=2) for stamp in stamps)
    assert all(record["ts"].endswith("+02:00") for record in got)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": -1},
        {"n": 5, "tracks": ("chess",)},
        {"n": 5, "tracks": ()},
        {"n": 5, "start": datetime(2026, 1, 1)},
        {"n": 5, "span_hours": 0},
        {"n": 5, "id_fraction": 1.5},
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        list(generate_records(**kwargs))


# ---------------------------------------------------------------- math track


def test_math_metadata_answer_matches_the_prompt(by_track: dict[str, list[dict[str, Any]]]) -> None:
    bare = 0
    for record in by_track["math"]:
        prompt, answer = user_texts(record)[-1], record["metadata"]["answer"]
        expression = record["metadata"]["expression"]
        assert _is_int(answer) and safe_eval(expression) == answer
        if re.search(r"[+\-*/×÷]", prompt):
            bare += 1
            shown = re.search(r"[\d(][\d\s+\-*/×÷()]*[\d)]", prompt)
            assert shown is not None and safe_eval(shown.group()) == answer, prompt
        else:
            assert Counter(re.findall(r"\d+", expression)) <= Counter(re.findall(r"\d+", prompt)), prompt
    assert 0 < bare < len(by_track["math"])


def test_math_error_rate_is_configurable() -> None:
    def wrong_share(rate: float) -> float:
        got = list(generate_records(600, seed=4, tracks=("math",), math_error_rate=rate))
        return sum(last_int(r["response"]) != r["metadata"]["answer"] for r in got) / len(got)

    assert wrong_share(0.0) == 0.0
    assert wrong_share(1.0) == 1.0
    assert 0.15 <= wrong_share(0.25) <= 0.35


def _thumb_up_share(group: list[dict[str, Any]]) -> float:
    thumbs = [r["feedback"]["thumb"] for r in group if "thumb" in r.get("feedback", {})]
    return sum(thumb == 1 for thumb in thumbs) / len(thumbs)


def test_math_feedback_follows_correctness(by_track: dict[str, list[dict[str, Any]]]) -> None:
    correct = [r for r in by_track["math"] if last_int(r["response"]) == r["metadata"]["answer"]]
    wrong = [r for r in by_track["math"] if last_int(r["response"]) != r["metadata"]["answer"]]
    assert correct and wrong
    assert _thumb_up_share(correct) > _thumb_up_share(wrong) + 0.4


# ---------------------------------------------------------------- support track


def test_support_has_a_system_prompt_and_mixed_quality(by_track: dict[str, list[dict[str, Any]]]) -> None:
    support = by_track["support"]
    assert all(record["messages"][0]["role"] == "system" for record in support)
    qualities = Counter(record["metadata"]["quality"] for record in support)
    assert set(qualities) == {"good", "curt", "wrong", "off_topic"}
    assert 0.45 <= qualities["good"] / len(support) <= 0.75
    topics = {record["metadata"]["topic"] for record in support}
    assert topics == {"billing", "password_reset", "shipping", "refund", "account_deletion", "api_usage"}


def test_support_feedback_follows_quality(by_track: dict[str, list[dict[str, Any]]]) -> None:
    good = [r for r in by_track["support"] if r["metadata"]["quality"] == "good"]
    bad = [r for r in by_track["support"] if r["metadata"]["quality"] != "good"]
    assert _thumb_up_share(good) > _thumb_up_share(bad) + 0.4

    def mean_rating(group: list[dict[str, Any]]) -> float:
        return statistics.mean(r["feedback"]["rating"] for r in group if "rating" in r.get("feedback", {}))

    assert mean_rating(good) > mean_rating(bad) + 1.0
    shapes = {tuple(sorted(r["feedback"])) for r in by_track["support"] if "feedback" in r}
    assert len(shapes) >= 4


def test_pii_share_and_kinds_match_what_is_in_the_text(by_track: dict[str, list[dict[str, Any]]]) -> None:
    support = by_track["support"]
    for record in support:
        detected = set().union(*(detect_pii(text) for text in user_texts(record)))
        assert detected == set(record["metadata"]["pii"]), user_texts(record)
    share = sum(bool(record["metadata"]["pii"]) for record in support) / len(support)
    assert 0.15 <= share <= 0.32
    kinds = Counter(kind for record in support for kind in record["metadata"]["pii"])
    assert set(kinds) == {"email", "phone", "card", "iban", "ipv4", "api_key"}
    assert not any(detect_pii(text) for record in by_track["math"] for text in user_texts(record))


def test_multi_turn_sessions_share_a_session_id_and_grow(by_track: dict[str, list[dict[str, Any]]]) -> None:
    sessions = defaultdict(list)
    for record in by_track["support"]:
        if "session_id" in record:
            sessions[record["session_id"]].append(record)
    multi = [turns for turns in sessions.values() if len(turns) > 1]
    assert len(multi) >= 20
    for turns in multi:
        assert len({record["user_id"] for record in turns}) == 1
        assert [len(user_texts(record)) for record in turns] == list(range(1, len(turns) + 1))
        for earlier, later in itertools.pairwise(turns):
            assert later["messages"][: len(earlier["messages"])] == earlier["messages"]
            assistant = [m["content"] for m in later["messages"] if m["role"] == "assistant"]
            assert earlier["response"] in assistant
    assert max(len(turns) for turns in multi) == 3


def test_some_responses_are_very_long(by_track: dict[str, list[dict[str, Any]]]) -> None:
    assert any(len(record["response"]) > 5000 for record in by_track["support"])


# ---------------------------------------------------------------- harvest realism


def test_consent_false_present_and_sometimes_omitted(records: list[dict[str, Any]]) -> None:
    refused = sum(record.get("consent") is False for record in records) / len(records)
    assert 0.01 <= refused <= 0.06
    assert any("consent" not in record for record in records)


def test_near_duplicate_prompts_present(records: list[dict[str, Any]]) -> None:
    raw_by_norm = defaultdict(set)
    for record in records:
        first = user_texts(record)[0]
        raw_by_norm[normalize(first)].add(first)
    near = [variants for variants in raw_by_norm.values() if len(variants) > 1]
    assert len(near) >= 20


def test_a_few_heavy_users(records: list[dict[str, Any]]) -> None:
    counts = Counter(record["user_id"] for record in records)
    top = counts.most_common(3)
    assert len(counts) > 30
    assert all(count > 3 * statistics.median(counts.values()) for _, count in top)


# ---------------------------------------------------------------- malformed lines and the writer

REQUIRED_REASONS = {"json", "track", "consent", "role", "ts", "rating", "thumb", "messages", "response"}


def _rejected(line: str) -> bool:
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        return True
    return bool(contract_errors(data))


def test_malformed_lines_are_all_rejected_and_cover_the_cases() -> None:
    cases = malformed_lines()
    assert len(cases) == 13
    assert {reason for _, reason in cases} >= REQUIRED_REASONS
    assert all(_rejected(line) for line, _ in cases)
    assert all("\n" not in line for line, _ in cases)
    assert malformed_lines(seed=0) == cases
    assert malformed_lines(seed=1) != cases
    by_reason = defaultdict(list)
    for line, reason in cases:
        by_reason[reason].append(line)
    assert json.loads(by_reason["consent"][0])["consent"] == "yes"
    assert any(json.loads(line)["ts"] == "yesterday" for line in by_reason["ts"])


def test_write_jsonl_interleaves_and_counts_malformed_lines(tmp_path: Path) -> None:
    got = list(generate_records(30, seed=3))
    path = tmp_path / "nested" / "traffic.jsonl"
    counts = write_jsonl(path, got, malformed_every=2, seed=3)
    assert counts == {"records": 30, "malformed": 15}
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert len(lines) == 45
    bad = [line for line, _ in malformed_lines(seed=3)]
    malformed_positions = [index for index in range(len(lines)) if index % 3 == 2]
    assert [lines[index] for index in malformed_positions] == [bad[i % len(bad)] for i in range(15)]
    written = [json.loads(line) for index, line in enumerate(lines) if index % 3 != 2]
    assert written == got


def test_write_jsonl_plain_is_compact_utf8_and_byte_stable(tmp_path: Path) -> None:
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert write_jsonl(first, generate_records(400, seed=9)) == {"records": 400, "malformed": 0}
    write_jsonl(second, generate_records(400, seed=9))
    assert first.read_bytes() == second.read_bytes()
    text = first.read_text(encoding="utf-8")
    compact = [
        json.dumps(json.loads(line), ensure_ascii=False, separators=(",", ":")) for line in text.splitlines()
    ]
    assert text == "".join(f"{line}\n" for line in compact)
    assert any(ord(char) > 127 for char in text)
    assert "\\u00" not in text
    with pytest.raises(ValueError):
        write_jsonl(tmp_path / "c.jsonl", [], malformed_every=0)


def test_against_the_store_validator(records: list[dict[str, Any]]) -> None:
    """The real ingest validator accepts every record and rejects each malformed line for its reason."""
    store = pytest.importorskip("storage.records")
    errors = pytest.importorskip("storage.errors")
    for record in records:
        store.parse_record(record)
    for line, reason in malformed_lines():
        with pytest.raises(errors.InvalidRecord, match=f"(?i){reason}"):
            store.parse_record_line(line)
