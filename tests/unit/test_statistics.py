"""Tests for evals.statistics: interval coverage on simulated paired data, the bootstrap against the
normal-theory interval, degenerate and planted cases, the exact sign-flip interval against
brute-force enumeration."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import pytest

import evals.statistics as statistics
from evals.statistics import (
    Interval,
    paired_bootstrap_ci,
    paired_interval,
    sign_flip_ci,
)


def coverage(
    method: Callable[..., Interval], n: int, ternary: bool, seed: int, simulations: int = 400
) -> float:
    """Share of `simulations` intervals containing the true mean difference 0.05."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(simulations):
        baseline = rng.uniform(0.3, 0.9, size=n)
        if ternary:  # 0/1 grader scores: a case is lost, unchanged or won; mean 0.15 - 0.10 = 0.05
            shift = rng.choice([-1.0, 0.0, 1.0], p=[0.10, 0.75, 0.15], size=n)
        else:
            shift = rng.normal(0.05, 0.15, size=n)
        interval = method(baseline + shift, baseline)
        hits += interval.low <= 0.05 <= interval.high
    return hits / simulations


# ---- coverage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ternary", [False, True], ids=["continuous", "ternary"])
def test_bootstrap_95_percent_interval_covers_close_to_nominal(ternary: bool) -> None:
    observed = coverage(lambda c, b: paired_bootstrap_ci(c, b, samples=1000), n=80, ternary=ternary, seed=11)
    assert 0.93 <= observed <= 0.97


def test_exact_sign_flip_interval_covers_nominal_on_symmetric_differences() -> None:
    # Exact, so more simulations cost little and pin the rate closer (standard error 0.005).
    observed = coverage(sign_flip_ci, n=12, ternary=False, seed=12, simulations=2000)
    assert 0.94 <= observed <= 0.96


@pytest.mark.parametrize("confidence", [0.90, 0.95])
def test_bootstrap_agrees_with_the_normal_interval_on_a_large_sample(confidence: float) -> None:
    # For n = 2000 the mean is close to normal, so the percentile bootstrap bounds must sit at
    # mean -/+ z * sd / sqrt(n); 4000 resamples put the tail quantiles within about 0.05 se.
    differences = np.random.default_rng(6).normal(0.05, 0.3, size=2000)
    interval = paired_bootstrap_ci(differences, np.zeros(2000), confidence=confidence, samples=4000)
    standard_error = differences.std() / math.sqrt(len(differences))
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    assert interval.low == pytest.approx(differences.mean() - z * standard_error, abs=0.2 * standard_error)
    assert interval.high == pytest.approx(differences.mean() + z * standard_error, abs=0.2 * standard_error)


def test_paired_interval_picks_the_exact_method_below_small_n() -> None:
    rng = np.random.default_rng(0)
    baseline = rng.uniform(size=40)
    assert paired_interval(baseline[:19] + 0.1, baseline[:19]).method == "sign_flip"
    assert paired_interval(baseline[:20] + 0.1, baseline[:20]).method == "bootstrap"
    assert paired_interval(baseline + 0.1, baseline, small_n=23).method == "bootstrap"
    with pytest.raises(ValueError, match="small_n"):
        paired_interval(baseline, baseline, small_n=24)


# ---- degenerate and planted cases ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "n"),
    [
        *((method, n) for method in (paired_bootstrap_ci, sign_flip_ci, paired_interval) for n in (8, 19)),
        *((method, 50) for method in (paired_bootstrap_ci, paired_interval)),
    ],
)
def test_identical_inputs_give_a_degenerate_interval_at_zero(method: Callable[..., Interval], n: int) -> None:
    scores = np.random.default_rng(n).integers(0, 2, size=n).astype(float).tolist()
    interval = method(scores, scores)
    assert (interval.mean_delta, interval.low, interval.high, interval.n) == (0.0, 0.0, 0.0, n)


def test_a_single_pair_has_no_exact_bound_and_a_point_bootstrap_interval() -> None:
    exact = paired_interval([0.75], [0.5])
    assert (exact.method, exact.mean_delta, exact.low, exact.high) == ("sign_flip", 0.25, -math.inf, math.inf)
    bootstrap = paired_bootstrap_ci([0.75], [0.5])
    assert (bootstrap.mean_delta, bootstrap.low, bootstrap.high, bootstrap.n) == (0.25, 0.25, 0.25, 1)


@pytest.mark.parametrize("n", [15, 200])
def test_a_planted_gain_is_detected_and_a_planted_loss_too(n: int) -> None:
    rng = np.random.default_rng(n)
    baseline = rng.uniform(0.2, 0.8, size=n)
    better = baseline + rng.normal(0.15, 0.1, size=n)
    gain = paired_interval(better, baseline)
    loss = paired_interval(baseline, better)
    assert gain.low > 0 and gain.mean_delta == pytest.approx(-loss.mean_delta)
    assert loss.high < 0


def test_bootstrap_is_deterministic_for_a_seed_and_varies_with_it() -> None:
    rng = np.random.default_rng(3)
    candidate, baseline = rng.uniform(size=60), rng.uniform(size=60)
    first = paired_bootstrap_ci(candidate, baseline, seed=7)
    assert paired_bootstrap_ci(candidate, baseline, seed=7) == first
    assert paired_bootstrap_ci(candidate, baseline, seed=8) != first
    assert first.low < first.mean_delta < first.high


def test_bootstrap_does_not_depend_on_how_resamples_are_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    candidate, baseline = rng.uniform(size=37), rng.uniform(size=37)
    whole = paired_bootstrap_ci(candidate, baseline, samples=500, seed=1)
    monkeypatch.setattr(statistics, "_BOOTSTRAP_CHUNK", 37 * 3)  # three resamples at a time
    assert paired_bootstrap_ci(candidate, baseline, samples=500, seed=1) == whole


def test_bootstrap_handles_a_large_suite_in_bounded_memory() -> None:
    rng = np.random.default_rng(5)
    baseline = rng.uniform(size=50_000)
    interval = paired_bootstrap_ci(baseline + 0.01, baseline, samples=200)
    assert interval.low == pytest.approx(0.01) and interval.high == pytest.approx(0.01)


# ---- the exact sign-flip interval ---------------------------------------------------------------


def brute_force_sign_flip(differences: list[float], alpha: float) -> tuple[float, float, float]:
    """Invert the sign-flip test by enumerating every sign vector on a fine grid of shifts."""
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=len(differences))))
    d = np.array(differences)

    def tails(shift: float) -> tuple[float, float]:
        centred = d - shift
        flipped = signs @ np.abs(centred)
        observed = centred.sum()
        return float(np.mean(flipped >= observed - 1e-12)), float(np.mean(flipped <= observed + 1e-12))

    grid = np.round(np.arange(-2.0, 2.0, 0.001), 3)
    accepted = [shift for shift in grid if min(tails(shift)) > alpha / 2]
    upper_tail, lower_tail = tails(0.0)
    return min(accepted), max(accepted), min(1.0, 2 * min(upper_tail, lower_tail))


def test_sign_flip_interval_matches_brute_force_test_inversion() -> None:
    differences = [0.4, -0.1, 0.25, 0.7, -0.3, 0.05, 0.55, 0.1]  # multiples of 0.05: subset means on the grid
    low, high, p_value = brute_force_sign_flip(differences, alpha=0.05)
    interval = sign_flip_ci(differences, [0.0] * len(differences))
    assert interval.low == pytest.approx(low, abs=1e-3)
    assert interval.high == pytest.approx(high, abs=1e-3)
    assert interval.p_value == pytest.approx(p_value)
    assert interval.method == "sign_flip"


def test_sign_flip_has_no_bound_with_five_pairs_and_the_extremes_with_six() -> None:
    five = sign_flip_ci([0.1, 0.2, 0.3, 0.4, 0.5], [0.0] * 5)
    assert (five.low, five.high) == (-math.inf, math.inf)
    six = sign_flip_ci([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.0] * 6)
    assert (six.low, six.high) == (pytest.approx(0.1), pytest.approx(0.6))
    assert six.p_value == pytest.approx(2 / 64)


def test_sign_flip_refuses_more_pairs_than_it_can_enumerate() -> None:
    n = statistics.MAX_EXACT_PAIRS + 1
    with pytest.raises(ValueError, match="exceeds"):
        sign_flip_ci([1.0] * n, [0.0] * n)


# ---- input checks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "baseline", "message"),
    [
        ([1.0, 2.0], [1.0], "differ in length"),
        ([], [], "at least one pair"),
        ([1.0, math.nan], [1.0, 1.0], "NaN"),
        ([[1.0]], [[1.0]], "one-dimensional"),
    ],
)
def test_bad_inputs_are_refused(candidate: list, baseline: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        paired_interval(candidate, baseline)


def test_confidence_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_ci([1.0], [0.0], confidence=1.5)
