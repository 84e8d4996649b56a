"""Harvest: turn a track's new interactions into a clean, redacted, countable training snapshot.

Rows are streamed in batches from the store (past the track's watermark) or from an external
database (a query and a column mapping), and go through, in this order: consent, validation,
the track filter, PII redaction, near-duplicate prompts, the per-user cap and the length limit.
Every drop is counted by reason. Kept records are written as canonical JSONL whose sha256 is the
snapshot's identity. The watermark moves only when the night commits (`commit`), so a night that
fails later harvests the same window again.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import shutil
import string
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
from sqlalchemy import Engine

from pipeline.config import HarvestConfig, TrackFilter
from pipeline.harvest.hash_set import CompactHashSet
from pipeline.harvest.pseudonyms import pseudonym
from pipeline.harvest.redaction import redact
from pipeline.results import Harvested
from storage import reads
from storage.errors import InvalidRecord, UserError
from storage.records import InteractionRecord, parse_record
from storage.writes import BadRow, quarantine

Progress = Callable[[int], None]
ROLES = frozenset({"system", "user", "assistant", "tool"})
DROP_REASONS = ("no_consent", "malformed", "filtered", "duplicate_prompt", "user_cap", "too_long")
_PUNCTUATION = bytes.maketrans(string.punctuation.encode(), b" " * len(string.punctuation))


@dataclass(frozen=True)
class HarvestWindow:
    """Store source: log positions (after_id, until_id]; external source: times (since_ts, until_ts]."""

    after_id: int | None = None
    until_id: int | None = None
    since_ts: datetime | None = None
    until_ts: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            key: value.isoformat() if isinstance(value, datetime) else value
            for key, value in self.__dict__.items()
            if value is not None
        }


@dataclass
class HarvestResult:
    track: str
    source: str  # store | external
    window: HarvestWindow
    rows_read: int = 0
    rows_kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    redactions: Counter[str] = field(default_factory=Counter)
    sha256: str = ""
    path: Path | None = None  # the snapshot's JSONL, when one was written
    snapshot_id: int | None = None  # set when the manifest was stored

    def as_json(self) -> dict[str, Any]:
        return {
            "track": self.track,
            "rows": self.rows_kept,
            "read": self.rows_read,
            "dropped": {reason: self.dropped[reason] for reason in DROP_REASONS if self.dropped[reason]},
            "redactions": dict(sorted(self.redactions.items())),
            "sha256": self.sha256,
            "window": self.window.as_json(),
            "source": self.source,
            "snapshot_id": self.snapshot_id,
            "path": str(self.path) if self.path else None,
        }

    def result(self) -> Harvested:
        """The stage result a night hands on."""
        return Harvested.model_validate(self.as_json())


@dataclass
class _Candidate:
    """A row that passed consent, validation and filter, redacted, waiting for dedup and caps."""

    record: dict[str, Any]
    user_id: str
    prompt_hash: int
    chars: int


def harvest(
    engine: Engine,
    track: str,
    settings: HarvestConfig,
    track_filter: TrackFilter,
    *,
    batch_size: int = 1000,
    out: Path | None = None,
    snapshot_dir: Path | None = None,
    until: datetime | None = None,
    progress: Progress | None = None,
    pseudonym_key: bytes,
) -> HarvestResult:
    """Harvest tonight's window for `track`; user ids become pseudonyms keyed by `pseudonym_key`.

    `snapshot_dir` given: the snapshot is stored (JSONL under it, manifest in SQL, malformed rows
    quarantined) ready for `commit`. Otherwise this is a preview that stores nothing; `out` writes
    the redacted records to a file either way.
    """
    persist = snapshot_dir is not None
    mark = reads.get_watermark(engine, track)
    until = until or datetime.now(UTC)
    if settings.source is None:
        last = reads.last_interaction_id(engine, track)
        window = HarvestWindow(after_id=mark.last_id or 0, until_id=max(last or 0, mark.last_id or 0))
        rows = _stored_rows(engine, track, window, batch_size)
        source = "store"
    else:
        window = HarvestWindow(since_ts=mark.last_ts, until_ts=until)
        rows = _external_rows(settings, track, window, batch_size)
        source = "external"
    result = HarvestResult(track=track, source=source, window=window)
    target = _SnapshotTarget(snapshot_dir / track if persist else (out.parent if out else None))
    try:
        with _few_gc_pauses():
            bad = _run(rows, result, settings, track_filter, target, progress, pseudonym_key)
    except BaseException:
        target.discard()
        raise
    result.sha256 = target.close()
    if persist:
        result.path = target.keep_as(target.directory / f"{until:%Y%m%dT%H%M%S}-{result.sha256[:12]}.jsonl")
        with engine.begin() as connection:
            quarantine(connection, bad)
        result.snapshot_id = reads.save_snapshot(engine, _manifest(result))
        if out is not None:
            shutil.copyfile(result.path, out)
    elif out is not None:
        result.path = target.keep_as(out)
    return result


@contextmanager
def _few_gc_pauses() -> Iterator[None]:
    """Harvest allocates millions of short-lived, acyclic dicts from JSON; the default collector
    thresholds turn that into a third of the run time. Freeze what exists and collect less often."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(50_000, 20, 50)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def commit(engine: Engine, snapshot_id: int) -> reads.WatermarkState:
    """The night committed: the track's watermark moves past the snapshot's window."""
    return reads.commit_snapshot(engine, snapshot_id)


def read_snapshot(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a stored snapshot, one dict per line."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


# -- sources -----------------------------------------------------------------------------------------

Row = tuple[Mapping[str, Any] | None, str | None]  # (record fields, or None with a malformed reason)


def _stored_rows(engine: Engine, track: str, window: HarvestWindow, batch_size: int) -> Iterator[list[Row]]:
    assert window.after_id is not None and window.until_id is not None
    batch: list[Row] = []
    for values in reads.stream_interactions(engine, track, window.after_id, window.until_id, batch_size):
        batch.append((_stored_fields(values), None))
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stored_fields(values: tuple[Any, ...]) -> dict[str, Any]:
    (interaction_id, client_id, ts, track, user_id, session_id, messages, response, model, metadata, consent,
     thumb, rating, comment) = values  # fmt: skip
    feedback = None
    if thumb is not None or rating is not None or comment is not None:
        feedback = {
            k: v for k, v in (("thumb", thumb), ("rating", rating), ("comment", comment)) if v is not None
        }
    return {
        "interaction_id": interaction_id,
        "id": client_id,
        "ts": ts,
        "track": track,
        "user_id": user_id,
        "session_id": session_id,
        "messages": messages,
        "response": response,
        "model": model,
        "metadata": metadata,
        "consent": consent,
        "feedback": feedback,
    }


def _external_rows(
    settings: HarvestConfig, track: str, window: HarvestWindow, batch_size: int
) -> Iterator[list[Row]]:
    source = settings.source
    assert source is not None and window.until_ts is not None
    batch: list[Row] = []
    for mapping in reads.stream_external(
        source.url, source.query, window.since_ts, window.until_ts, batch_size
    ):
        batch.append(_external_fields(mapping, source.columns, track))
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _external_fields(row: Mapping[Any, Any], columns: Mapping[str, str], track: str) -> Row:
    """Map a source row onto the record fields and validate it fully (untrusted input)."""
    data: dict[str, Any] = {"track": track}
    for name in InteractionRecord.model_fields:
        column = columns.get(name, name)
        if column in row and row[column] is not None:
            data[name] = _decode_json_text(name, row[column])
    if isinstance(data.get("ts"), datetime):
        ts = data["ts"]
        data["ts"] = (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).isoformat()
    if data.get("id") is not None and not isinstance(data["id"], str):
        data["id"] = str(data["id"])
    try:
        record = parse_record(data)
    except InvalidRecord as error:
        return None, f"{error} | {json.dumps(data, default=str, ensure_ascii=False)}"
    fields = record.model_dump(mode="json")
    fields["interaction_id"] = record.id
    return fields, None


def _decode_json_text(name: str, value: Any) -> Any:
    """Databases without a JSON type hand messages/feedback/metadata over as text."""
    if name in ("messages", "feedback", "metadata") and isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# -- the steps -----------------------------------------------------------------------------------------


def _run(
    batches: Iterable[list[Row]],
    result: HarvestResult,
    settings: HarvestConfig,
    track_filter: TrackFilter,
    target: _SnapshotTarget,
    progress: Progress | None,
    pseudonym_key: bytes,
) -> list[BadRow]:
    seen = CompactHashSet()
    per_user: Counter[str] = Counter()
    bad: list[BadRow] = []
    for batch in batches:
        result.rows_read += len(batch)
        candidates = [
            candidate
            for fields, error in batch
            if (candidate := _admit(fields, error, result, settings, track_filter, bad, pseudonym_key))
            is not None
        ]
        for candidate in _unique_prompts(candidates, seen, settings, result):
            if per_user[candidate.user_id] >= settings.max_rows_per_user:
                result.dropped["user_cap"] += 1
                continue
            per_user[candidate.user_id] += 1
            if candidate.chars > settings.max_chars:
                result.dropped["too_long"] += 1
                continue
            target.write(candidate.record)
            result.rows_kept += 1
        if progress is not None:
            progress(len(batch))
    return bad


def _admit(
    fields: Mapping[str, Any] | None,
    error: str | None,
    result: HarvestResult,
    settings: HarvestConfig,
    track_filter: TrackFilter,
    bad: list[BadRow],
    pseudonym_key: bytes,
) -> _Candidate | None:
    """Consent, validation, filter and redaction of one row; None when it is dropped."""
    if fields is None or error is not None:
        reason, _, raw = (error or "malformed").partition(" | ")
        result.dropped["malformed"] += 1
        bad.append(BadRow(f"harvest:{result.track}", None, reason, raw, result.track))
        return None
    if fields.get("consent") is not True:
        result.dropped["no_consent"] += 1
        return None
    problem = stored_row_problem(fields)
    if problem is not None:
        result.dropped["malformed"] += 1
        raw = json.dumps(fields, default=str, ensure_ascii=False)
        bad.append(BadRow(f"harvest:{result.track}", None, problem, raw, result.track))
        return None
    if not _matches(fields, track_filter):
        result.dropped["filtered"] += 1
        return None
    record = _snapshot_record(fields, settings.redact_pii, result.redactions, pseudonym_key)
    chars = sum(len(m["content"]) for m in record["messages"]) + len(record["response"])
    return _Candidate(record, str(fields["user_id"]), prompt_hash(record["messages"]), chars)


def stored_row_problem(fields: Mapping[str, Any]) -> str | None:
    """A cheap structural re-check of a row read back from the store (written by anyone with SQL access)."""
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: must be a non-empty list"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages.{index}.role: unknown or missing role"
        if not isinstance(message.get("content"), str):
            return f"messages.{index}.content: must be a string"
    if not any(message["role"] == "user" for message in messages):
        return "messages: needs at least one message with role 'user'"
    if not isinstance(fields.get("response"), str):
        return "response: must be a string"
    if not isinstance(fields.get("user_id"), str) or not fields["user_id"]:
        return "user_id: must be a non-empty string"
    return None


def _served_name(model: Any) -> Any:
    """`support@v3` (a pinned version, as the gateway logs what answered) is served as `support`."""
    if isinstance(model, str) and "@v" in model:
        name, _, version = model.rpartition("@v")
        if version.isdigit():
            return name
    return model


def _matches(fields: Mapping[str, Any], track_filter: TrackFilter) -> bool:
    if not track_filter.models and not track_filter.metadata:
        return True
    model = fields.get("model")
    if (
        track_filter.models
        and model not in track_filter.models
        and _served_name(model) not in track_filter.models
    ):
        return False
    metadata = fields.get("metadata") or {}
    return all(metadata.get(key) == value for key, value in track_filter.metadata.items())


def _snapshot_record(
    fields: Mapping[str, Any], redact_pii: bool, counts: Counter[str], key: bytes
) -> dict[str, Any]:
    """The record as it enters the snapshot: redacted, the user pseudonymised, times in ISO-8601."""
    ts = fields["ts"]
    feedback = fields.get("feedback")
    record = {
        "interaction_id": fields.get("interaction_id"),
        "id": fields.get("id"),
        "ts": ts.isoformat() if isinstance(ts, datetime) else ts,
        "track": fields["track"],
        "user": pseudonym(str(fields["user_id"]), key),
        "session_id": fields.get("session_id"),
        "messages": fields["messages"],  # fresh objects from the driver: redacted in place, not copied
        "response": fields["response"],
        "model": fields.get("model"),
        "feedback": dict(feedback) if feedback else None,
        "metadata": fields.get("metadata") or {},
    }
    if redact_pii:
        _redact_in_place(record, counts)
    return record


def _redact_in_place(record: dict[str, Any], counts: Counter[str]) -> None:
    for message in record["messages"]:
        message["content"] = _redacted(message["content"], counts)
    record["response"] = _redacted(record["response"], counts)
    if record["feedback"] and isinstance(record["feedback"].get("comment"), str):
        record["feedback"]["comment"] = _redacted(record["feedback"]["comment"], counts)
    record["metadata"] = _redact_values(record["metadata"], counts)


def _redacted(text: str, counts: Counter[str]) -> str:
    clean, found = redact(text)
    if found:
        counts.update(found)
    return clean


def _redact_values(value: Any, counts: Counter[str]) -> Any:
    if isinstance(value, str):
        return _redacted(value, counts)
    if isinstance(value, dict):
        return {key: _redact_values(item, counts) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact_values(item, counts) for item in value]
    return value


def normalize_prompt(messages: Iterable[Mapping[str, str]]) -> bytes:
    """Case, ASCII punctuation and spacing folded, so near-identical prompts compare equal."""
    return b"\n".join(m["role"].encode() + b":" + normalize_text(m["content"]) for m in messages)


@functools.lru_cache(maxsize=4096)  # system prompts and common questions repeat on every row
def normalize_text(text: str) -> bytes:
    return b" ".join(text.lower().encode().translate(_PUNCTUATION).split())


def prompt_hash(messages: Iterable[Mapping[str, str]]) -> int:
    return int.from_bytes(hashlib.blake2b(normalize_prompt(messages), digest_size=8).digest(), "little")


def _unique_prompts(
    candidates: list[_Candidate], seen: CompactHashSet, settings: HarvestConfig, result: HarvestResult
) -> list[_Candidate]:
    if not settings.dedup_prompts or not candidates:
        return candidates
    hashes = np.fromiter((c.prompt_hash for c in candidates), dtype=np.uint64, count=len(candidates))
    is_new = seen.add_batch(hashes)
    duplicates = int(len(candidates) - is_new.sum())
    if duplicates:
        result.dropped["duplicate_prompt"] += duplicates
    return [candidate for candidate, new in zip(candidates, is_new.tolist(), strict=True) if new]


# -- output ------------------------------------------------------------------------------------------


class _SnapshotTarget:
    """Canonical JSONL to a temporary file in `directory` (or nowhere), hashed as it is written."""

    def __init__(self, directory: Path | None) -> None:
        self._digest = hashlib.sha256()
        self._handle: IO[bytes] | None = None
        self._temp: Path | None = None
        self.directory = directory or Path()
        if directory is not None:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(prefix=".harvest-", suffix=".jsonl", dir=directory)
            except OSError as error:
                raise UserError(
                    f"{directory}: cannot write the snapshot: {error.strerror or error}"
                ) from None
            self._handle = os.fdopen(fd, "wb")
            self._temp = Path(name)

    def write(self, record: dict[str, Any]) -> None:
        line = orjson.dumps(record, option=orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
        self._digest.update(line)
        if self._handle is not None:
            self._handle.write(line)

    def close(self) -> str:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
        return self._digest.hexdigest()

    def keep_as(self, path: Path) -> Path:
        assert self._temp is not None, "nothing was written"
        self._temp.replace(path)
        return path

    def discard(self) -> None:
        self.close()
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)


def _manifest(result: HarvestResult) -> dict[str, Any]:
    return {
        "track": result.track,
        "source": result.source,
        "after_id": result.window.after_id,
        "until_id": result.window.until_id,
        "since_ts": result.window.since_ts,
        "until_ts": result.window.until_ts,
        "rows_read": result.rows_read,
        "rows_kept": result.rows_kept,
        "dropped": dict(result.dropped),
        "redactions": dict(result.redactions),
        "sha256": result.sha256,
        "path": str(result.path),
    }
