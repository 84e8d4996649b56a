"""How well the LLM judge agrees with the users, measured every night.

The judge's scores become the training reward, so a judge that drifts, or that the policy learns
to game, silently steers every night's update the wrong way. Users' thumbs and ratings are sparse
and noisy but independent of the judge; comparing the two on the rows that have both makes that
failure visible: the rank correlation with ratings, how often the judge's verdict predicts the
thumb, and the mean level of each. These figures are logged to MLflow with each night's run.

The rank correlation is `scipy.stats.spearmanr` (average ranks for ties, which ratings have many
of). Kept by hand around it: NaN and shape checks (scipy would propagate a NaN into the report),
and None instead of scipy's NaN and `ConstantInputWarning` when there is nothing to correlate
(fewer than three rated rows, or a side that never varies), so the metric is left out of MLflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from evals.graders import feedback_score

__all__ = ["CalibrationReport", "calibrate", "spearman", "thumb_accuracy"]


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds a NaN or infinite value")
    return array


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get average ranks); None when n < 3 or a side is constant."""
    xs, ys = _as_array(x, "x"), _as_array(y, "y")
    if len(xs) != len(ys):
        raise ValueError(f"x and y differ in length: {len(xs)} != {len(ys)}")
    if len(xs) < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return None
    result: Any = stats.spearmanr(xs, ys)  # scipy's stubs do not type the result
    return float(result.statistic)


def thumb_accuracy(scores: Sequence[float], thumbs: Sequence[int], threshold: float = 0.5) -> float | None:
    """Share of rows where the judge's verdict (score >= threshold means up) matches the user's thumb."""
    if len(scores) != len(thumbs):
        raise ValueError(f"scores and thumbs differ in length: {len(scores)} != {len(thumbs)}")
    if not scores:
        return None
    if any(thumb not in (1, -1) for thumb in thumbs):
        raise ValueError("thumbs must be 1 or -1")
    hits = sum((score >= threshold) == (thumb == 1) for score, thumb in zip(scores, thumbs, strict=True))
    return hits / len(scores)


@dataclass(frozen=True)
class CalibrationReport:
    """Judge-versus-user agreement over one night's judged rows; None where there was nothing to measure."""

    n_judged: int  # rows with a judge score (failed judgments excluded)
    n_with_rating: int  # judged rows that also have a user rating
    spearman_rating: float | None  # rank correlation of judge score and rating
    n_with_thumb: int  # judged rows that also have a thumb
    thumb_accuracy: float | None  # how often score >= 0.5 predicts thumb up
    mean_judge_score: float | None  # over judged rows
    mean_feedback_score: float | None  # `feedback_score` averaged over all rows with feedback

    def as_metrics(self, prefix: str = "calibration/") -> dict[str, float]:
        """Flat metric names for MLflow, e.g. `calibration/spearman_rating`; absent values are left out."""
        return {f"{prefix}{key}": float(value) for key, value in asdict(self).items() if value is not None}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def calibrate(pairs: Iterable[tuple[float | None, Mapping[str, Any] | None]]) -> CalibrationReport:
    """Compare judge scores with user feedback; each pair is (judge score or None, feedback or None)."""
    judged: list[float] = []
    rated: list[tuple[float, float]] = []
    thumbed: list[tuple[float, int]] = []
    feedback_scores: list[float] = []
    for score, feedback in pairs:
        from_user = feedback_score(feedback)
        if from_user is not None:
            feedback_scores.append(from_user)
        if score is None:
            continue
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"judge score must be in [0, 1], got {score!r}")
        judged.append(score)
        if feedback and feedback.get("rating") is not None:
            rated.append((score, float(feedback["rating"])))
        if feedback and feedback.get("thumb") is not None:
            thumbed.append((score, int(feedback["thumb"])))
    return CalibrationReport(
        n_judged=len(judged),
        n_with_rating=len(rated),
        spearman_rating=spearman([score for score, _ in rated], [rating for _, rating in rated]),
        n_with_thumb=len(thumbed),
        thumb_accuracy=thumb_accuracy([score for score, _ in thumbed], [thumb for _, thumb in thumbed]),
        mean_judge_score=_mean(judged),
        mean_feedback_score=_mean(feedback_scores),
    )
