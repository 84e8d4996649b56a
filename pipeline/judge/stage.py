"""The judge stage: score a night's harvested interactions and blend them into one reward per row.

Reads the snapshot in batches, asks the track's judge (pointwise, cached, within budget), adds user
feedback and programmatic graders with the track's weights, and writes one JSONL line per record.
It also measures how well the judge agrees with users on the rows that have feedback (calibration),
so a drifting or gamed judge shows up in the night's report instead of in the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import orjson

from evals.calibration import CalibrationReport, calibrate
from evals.graders import Grader, Sample, combine_scores, feedback_score, weighted_grader
from pipeline.config import JudgeConfig, RewardConfig, ServingConfig, TrackConfig
from pipeline.judge.client import Judge, JudgeResult, JudgeSettings, JudgeStats, run_sync
from pipeline.judge.rubrics import Rubric, load_rubric
from pipeline.results import Judged

Progress = Callable[[int], None]
_OVER_CAP = JudgeResult(None, status="skipped", error="over judge.stage_items")


@dataclass
class JudgeStageResult:
    rows: int = 0
    scored: int = 0  # rows with a reward
    failed: int = 0  # judgments that failed (the row keeps its other reward parts)
    skipped: int = 0  # over the judge budget
    mean_reward: float | None = None
    calibration: CalibrationReport | None = None
    stats: JudgeStats = field(default_factory=JudgeStats)
    path: Path | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "scored": self.scored,
            "failed": self.failed,
            "skipped": self.skipped,
            "mean_reward": self.mean_reward,
            "calibration": self.calibration.as_metrics(prefix="") if self.calibration else {},
            "judge": self.stats.as_metrics(),
            "path": str(self.path) if self.path else None,
        }


def judge_settings(judge: JudgeConfig, serving: ServingConfig) -> JudgeSettings:
    """The judge's endpoint from config: its own, or the first serving endpoint's base model."""
    return JudgeSettings(
        base_url=judge.base_url or serving.endpoints[0],
        model=judge.model or serving.base_name,
        api_key=judge.api_key.get_secret_value() if judge.api_key else None,
        concurrency=judge.concurrency,
        timeout_seconds=judge.timeout_seconds,
        max_retries=judge.max_retries,
        budget_items=judge.budget_items,
        temperature=judge.temperature,
        max_tokens=judge.max_tokens,
        swap_orders=judge.swap_orders,
        prompt=judge.prompt,
    )


def reference_of(record: dict[str, Any]) -> str | None:
    """A known-good answer logged with the interaction (metadata `reference` or `answer`), if any."""
    metadata = record.get("metadata") or {}
    value = metadata.get("reference", metadata.get("answer"))
    return None if value is None else str(value)


def judge_records(
    records: Iterable[dict[str, Any]],
    *,
    rubric: Rubric,
    judge: Judge | None,
    reward: RewardConfig,
    out: Path,
    batch_size: int = 64,
    progress: Progress | None = None,
    max_judged: int | None = None,
) -> JudgeStageResult:
    """Score every record and write `{..record, judge, feedback_score, graders, reward}` lines to `out`.

    At most `max_judged` records go to the judge (the rest are `skipped`, keeping their other reward
    parts), so the judge stage leaves the night's judge budget to the training rewards and the gate.
    """
    graders = [weighted_grader(spec) for spec in reward.graders]
    weights = {"judge": reward.judge, "feedback": reward.feedback, **{g.name: w for w, g in graders}}
    result = JudgeStageResult(path=out, stats=judge.stats if judge is not None else JudgeStats())
    pairs: list[tuple[float | None, Any]] = []
    rewards: list[float] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as handle:
        sent = 0
        for batch in _batches(records, batch_size):
            verdicts: list[JudgeResult | None] = [None] * len(batch)
            if judge is not None and reward.judge > 0:
                room = len(batch) if max_judged is None else max(0, min(len(batch), max_judged - sent))
                judged = _judge_batch(judge, rubric, batch[:room]) if room else []
                verdicts = [*judged, *[_OVER_CAP] * (len(batch) - room)]
                sent += room
            for record, verdict in zip(batch, verdicts, strict=True):
                line = _scored_line(record, verdict, graders, weights, result)
                pairs.append((verdict.score if verdict else None, record.get("feedback")))
                if line["reward"] is not None:
                    rewards.append(line["reward"])
                handle.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
            if progress is not None:
                progress(len(batch))
    result.scored = len(rewards)
    result.mean_reward = sum(rewards) / len(rewards) if rewards else None
    result.calibration = calibrate(pairs)
    return result


def judge_snapshot(
    records: Iterable[dict[str, Any]],
    *,
    spec: TrackConfig,
    judge: Judge | None,
    out: Path,
    progress: Progress | None = None,
    stage_items: int | None = None,
) -> Judged:
    """The judge stage for one track: its rubric and reward over `records`, scored lines to `out`.

    `judge` may be None when the track's reward gives the judge no weight (graders and feedback only).
    The night and `overnight judge` both call this.
    """
    rubric = load_rubric(spec.rubric)
    if spec.reward.judge > 0 and judge is None:
        raise ValueError(f"track {spec.name!r} weighs the judge but no judge was given")
    result = judge_records(
        records,
        rubric=rubric,
        judge=judge,
        reward=spec.reward,
        out=out,
        progress=progress,
        max_judged=stage_items,
    )
    return Judged.model_validate(
        {"rubric": rubric.key, "judge_model": judge.model if judge else None, **result.as_json()}
    )


def read_judged(path: str | Path) -> Iterator[dict[str, Any]]:
    with Path(path).open("rb") as handle:
        for line in handle:
            yield orjson.loads(line)


def _judge_batch(judge: Judge, rubric: Rubric, batch: list[dict[str, Any]]) -> list[JudgeResult]:
    conversations = [record["messages"] for record in batch]
    responses = [record["response"] for record in batch]
    references = [reference_of(record) for record in batch]
    return run_sync(judge.score(rubric, conversations, responses, references))


def _scored_line(
    record: dict[str, Any],
    verdict: JudgeResult | None,
    graders: list[tuple[float, Grader]],
    weights: dict[str, float],
    result: JudgeStageResult,
) -> dict[str, Any]:
    result.rows += 1
    if verdict is not None and verdict.status == "failed":
        result.failed += 1
    elif verdict is not None and verdict.status == "skipped":
        result.skipped += 1
    sample = Sample(
        record["messages"], record["response"], reference_of(record), record.get("metadata") or {}
    )
    grader_scores = {grader.name: grader.score(sample) for _, grader in graders}
    from_user = feedback_score(record.get("feedback"))
    components = {"judge": verdict.score if verdict else None, "feedback": from_user, **grader_scores}
    return {
        **record,
        "judge": _verdict_json(verdict),
        "feedback_score": from_user,
        "graders": grader_scores,
        "reward": combine_scores(components, weights),
    }


def _verdict_json(verdict: JudgeResult | None) -> dict[str, Any] | None:
    if verdict is None:
        return None
    return {
        "score": verdict.score,
        "raw_score": verdict.raw_score,
        "rationale": verdict.rationale,
        "status": verdict.status,
        "error": verdict.error,
        "cached": verdict.cached,
    }


def _batches(records: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    iterator = iter(records)
    while batch := list(islice(iterator, size)):
        yield batch
