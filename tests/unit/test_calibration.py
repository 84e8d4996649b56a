"""Tests for evals.calibration: Spearman against its definition, thumb accuracy, and planted agreeing and
anti-correlated judges caught by `calibrate`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from evals.calibration import CalibrationReport, calibrate, spearman, thumb_accuracy

# ---- spearman ---------------------------------------------------------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Rank 1..n by definition: values below, plus the middle of the tied group (O(n**2), no sorting)."""
    below = (values[None, :] < values[:, None]).sum(axis=1)
    tied = (values[None, :] == values[:, None]).sum(axis=1)
    return below + (tied + 1) / 2


def spearman_by_definition(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's correlation of the average ranks."""
    return float(np.corrcoef(average_ranks(x), average_ranks(y))[0, 1])


@pytest.mark.parametrize("seed", range(20))
def test_spearman_matches_its_definition_on_random_data_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 60))
    x = rng.integers(1, 6, size=n).astype(float)  # ratings-like: many ties
    y = np.round(0.5 * x + rng.normal(0, 1.5, size=n), 1)  # judge-like: some ties
    if len(set(x)) == 1 or len(set(y)) == 1:
        pytest.skip("constant side drawn")
    assert spearman(x.tolist(), y.tolist()) == pytest.approx(spearman_by_definition(x, y), abs=1e-12)


def test_spearman_matches_its_definition_on_continuous_data() -> None:
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=500), rng.normal(size=500)
    assert spearman(list(x), list(y)) == pytest.approx(spearman_by_definition(x, y), abs=1e-12)


def test_spearman_with_ties_worked_by_hand() -> None:
    # Ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4); centred: (-1.5, 0, 0, 1.5) and (-1.5, 0.5, -0.5, 1.5),
    # so rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
    assert spearman([1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(3 / math.sqrt(10))


def test_spearman_perfect_and_inverse_agreement() -> None:
    x = [0.1, 0.4, 0.2, 0.9, 0.5]
    monotone = [math.exp(value) for value in x]  # not linear: ranks only matter
    assert spearman(x, monotone) == pytest.approx(1.0)
    assert spearman(x, [-value for value in monotone]) == pytest.approx(-1.0)


def test_spearman_none_when_too_few_or_constant() -> None:
    assert spearman([], []) is None
    assert spearman([1.0, 2.0], [2.0, 1.0]) is None
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) is None


def test_spearman_rejects_mismatched_lengths_and_nan() -> None:
    with pytest.raises(ValueError, match="length"):
        spearman([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        spearman([1.0, math.nan, 3.0], [1.0, 2.0, 3.0])


# ---- thumb_accuracy ---------------------------------------------------------------------------


def test_thumb_accuracy() -> None:
    scores = [0.9, 0.5, 0.49, 0.1]
    assert thumb_accuracy(scores, [1, 1, -1, -1]) == 1.0
    assert thumb_accuracy(scores, [-1, -1, 1, 1]) == 0.0
    assert thumb_accuracy(scores, [1, -1, -1, 1]) == 0.5
    assert thumb_accuracy(scores, [1, 1, 1, -1], threshold=0.3) == 1.0
    assert thumb_accuracy([], []) is None


def test_thumb_accuracy_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="length"):
        thumb_accuracy([0.5], [1, -1])
    with pytest.raises(ValueError, match="thumbs"):
        thumb_accuracy([0.5], [0])


# ---- calibrate --------------------------------------------------------------------------------


def planted_pairs(
    agreeing: bool, n: int = 200, seed: int = 0
) -> list[tuple[float | None, dict[str, Any] | None]]:
    """Users rate 1..5; the judge tracks the rating (or its mirror) with a little noise.

    Every 10th judgment failed; every 3rd row also has a thumb (up for ratings >= 4), every 7th has
    no feedback at all.
    """
    rng = np.random.default_rng(seed)
    pairs: list[tuple[float | None, dict[str, Any] | None]] = []
    for index in range(n):
        rating = int(rng.integers(1, 6))
        quality = (rating - 1) / 4 if agreeing else (5 - rating) / 4
        score = float(np.clip(quality + rng.normal(0, 0.05), 0.0, 1.0))
        feedback: dict[str, Any] | None = {"rating": rating}
        if index % 3 == 0:
            feedback = {"rating": rating, "thumb": 1 if rating >= 4 else -1}
        if index % 7 == 0:
            feedback = None
        pairs.append((None if index % 10 == 0 else score, feedback))
    return pairs


def test_calibrate_judge_that_agrees_with_users() -> None:
    report = calibrate(planted_pairs(agreeing=True))
    assert report.n_judged == 180
    assert report.spearman_rating is not None and report.spearman_rating > 0.8
    assert report.thumb_accuracy is not None and report.thumb_accuracy > 0.9
    assert 0 < report.n_with_thumb < report.n_with_rating < report.n_judged


def test_calibrate_judge_that_is_anti_correlated() -> None:
    report = calibrate(planted_pairs(agreeing=False))
    assert report.spearman_rating is not None and report.spearman_rating < -0.8
    assert report.thumb_accuracy is not None and report.thumb_accuracy < 0.2


def test_calibrate_counts_and_means_on_a_small_set() -> None:
    pairs: list[tuple[float | None, dict[str, Any] | None]] = [
        (0.9, {"rating": 5, "thumb": 1}),  # feedback 1.0
        (0.2, {"rating": 1}),  # feedback 0.0
        (0.6, {"thumb": -1}),  # feedback 0.0; judge says up, user says down
        (None, {"thumb": 1}),  # failed judgment: counts for the feedback mean only
        (0.5, None),
    ]
    report = calibrate(pairs)
    assert report == CalibrationReport(
        n_judged=4,
        n_with_rating=2,
        spearman_rating=None,  # two rated rows are too few
        n_with_thumb=2,
        thumb_accuracy=0.5,
        mean_judge_score=pytest.approx((0.9 + 0.2 + 0.6 + 0.5) / 4),  # type: ignore[arg-type]
        mean_feedback_score=pytest.approx(0.5),  # type: ignore[arg-type]
    )


def test_calibrate_empty_and_metrics_skip_none() -> None:
    empty = calibrate([])
    assert empty.n_judged == 0 and empty.mean_judge_score is None and empty.spearman_rating is None
    assert empty.as_metrics() == {
        "calibration/n_judged": 0.0,
        "calibration/n_with_rating": 0.0,
        "calibration/n_with_thumb": 0.0,
    }
    metrics = calibrate(planted_pairs(agreeing=True)).as_metrics()
    assert set(metrics) == {
        "calibration/n_judged",
        "calibration/n_with_rating",
        "calibration/spearman_rating",
        "calibration/n_with_thumb",
        "calibration/thumb_accuracy",
        "calibration/mean_judge_score",
        "calibration/mean_feedback_score",
    }
    assert all(isinstance(value, float) for value in metrics.values())
    assert "judge/n_judged" in calibrate([]).as_metrics(prefix="judge/")


def test_calibrate_rejects_out_of_range_judge_score() -> None:
    with pytest.raises(ValueError, match="judge score"):
        calibrate([(1.5, None)])
