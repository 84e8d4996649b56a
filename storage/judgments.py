"""The judgment cache: a verdict per (judge model, rubric id+version, prompt, response) hash.

Judging is the expensive, rate-limited part of a night; the same response judged by the same judge
under the same rubric must cost nothing the second time. A failed judgment is recorded too (so it
can be counted and inspected) but does not satisfy a lookup: the next night tries it again, and a
later success replaces it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine, select

from storage.models import Judgment, utc_now
from storage.writes import dialect_insert

LOOKUP_CHUNK = 500  # keys per IN (...) query


@dataclass(frozen=True)
class StoredJudgment:
    cache_key: str
    judge_model: str
    rubric_id: str
    rubric_version: str
    prompt_sha256: str
    response_sha256: str
    status: str  # ok | failed
    score: float | None  # normalised to [0, 1]
    raw_score: float | None
    rationale: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def cached_judgments(engine: Engine, keys: Iterable[str]) -> dict[str, StoredJudgment]:
    """The successful judgments among `keys`."""
    wanted = list(dict.fromkeys(keys))
    found: dict[str, StoredJudgment] = {}
    with engine.connect() as connection:
        for start in range(0, len(wanted), LOOKUP_CHUNK):
            chunk = wanted[start : start + LOOKUP_CHUNK]
            query = select(Judgment).where(Judgment.cache_key.in_(chunk), Judgment.status == "ok")
            for row in connection.execute(query).mappings():
                found[row["cache_key"]] = _from_row(row)
    return found


def store_judgments(engine: Engine, judgments: Sequence[StoredJudgment]) -> None:
    """Insert verdicts; a success replaces an earlier failure, nothing replaces a success."""
    if not judgments:
        return
    now = utc_now()
    with engine.begin() as connection:
        statement = dialect_insert(connection, Judgment)
        rows = [{**judgment.__dict__, "created_at": now} for judgment in judgments]
        replace_failed = statement.on_conflict_do_update(
            index_elements=["cache_key"],
            set_={name: getattr(statement.excluded, name) for name in rows[0] if name != "cache_key"},
            where=(Judgment.status == "failed") & (statement.excluded.status == "ok"),
        )
        connection.execute(replace_failed, rows)


def _from_row(row: object) -> StoredJudgment:
    fields = StoredJudgment.__dataclass_fields__
    return StoredJudgment(**{name: row[name] for name in fields})  # type: ignore[index]
