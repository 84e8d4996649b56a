"""The interaction record is validated strictly: no coercion, no unknown keys, no naive times."""

import json

import pytest

from storage.errors import InvalidRecord
from storage.records import parse_record, parse_record_line
from tests.conftest import make_record


def test_valid_record_round_trips_to_utc() -> None:
    record = parse_record(make_record(ts="2026-11-21T10:00:00+02:00"))
    assert record.ts.isoformat() == "2026-11-21T08:00:00+00:00"
    assert record.dedup_key() == "id:req-0"
    assert record.prompt_text().startswith("Question number 0")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"consent": "yes"}, "consent"),
        ({"consent": 1}, "consent"),
        ({"ts": "yesterday"}, "ts: not an ISO-8601"),
        ({"ts": "2026-11-21T10:00:00"}, "no timezone"),
        ({"ts": 1763715600}, "ts: must be an ISO-8601 string"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "role 'user'"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"feedback": {"rating": 7}}, "feedback.rating"),
        ({"feedback": {"rating": 4.0}}, "feedback.rating"),
        ({"feedback": {"thumb": 0}}, "feedback.thumb"),
        ({"feedback": {"thumb": True}}, "feedback.thumb"),
        ({"response": None}, "response"),
        ({"user_id": ""}, "user_id"),
        ({"tokens": 12}, "tokens: unknown key"),
    ],
)
def test_invalid_records_are_refused_with_the_field_named(overrides: dict, fragment: str) -> None:
    with pytest.raises(InvalidRecord, match=fragment.replace("(", r"\(")):
        parse_record(make_record(**overrides))


def test_missing_required_key_is_named() -> None:
    data = make_record()
    del data["track"]
    with pytest.raises(InvalidRecord, match="track: required key is missing"):
        parse_record(data)


def test_optional_keys_default() -> None:
    data = make_record()
    for key in ("id", "session_id", "feedback", "metadata", "consent"):
        del data[key]
    record = parse_record(data)
    assert record.consent is True and record.metadata == {} and record.feedback is None
    assert record.dedup_key().startswith("sha256:")


def test_content_hash_ignores_feedback_but_not_content() -> None:
    base = make_record(id=None)
    del base["id"]
    same = parse_record({**base, "feedback": {"thumb": -1}})
    other = parse_record({**base, "response": "something else"})
    assert parse_record(base).dedup_key() == same.dedup_key() != other.dedup_key()


@pytest.mark.parametrize(
    ("line", "fragment"),
    [("{not json", "invalid JSON"), ("[1, 2]", "must be a JSON object"), ('"text"', "must be a JSON object")],
)
def test_bad_lines(line: str, fragment: str) -> None:
    with pytest.raises(InvalidRecord, match=fragment):
        parse_record_line(line)


def test_line_parses() -> None:
    assert parse_record_line(json.dumps(make_record(3))).id == "req-3"
