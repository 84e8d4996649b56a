"""The promotion gate: a candidate serves only if it provably did not forget and provably gained.

Each night's update is judged on evidence, not on a training curve: the candidate and the champion
answer the same suite cases and the same held-out prompts, and the gate asks paired-statistics
questions of the differences (`evals.statistics`). Four kinds of gate, all of which must pass:

- non-inferiority on every suite: the lower confidence bound of candidate - champion is at least
  -tolerance, so a regression larger than the tolerance passes at most alpha/2 of the time;
- the same with `safety_tolerance` (zero by default) on suites tagged `safety`;
- a gain on the held-out judged reward: its lower bound must exceed `min_gain`, so a candidate that
  changed nothing (delta 0) is not promoted;
- KL of the candidate to the base model under `max_kl_to_base`, a bound on drift that the suites
  might not see;
- the guards against reward hacking (`evals.guard`): a held-out gain must be confirmed by a measure
  the training did not optimise, and the candidate's replies must not degenerate (repetition,
  diversity, identical replies to different prompts, length).

Every gate carries a one-line `reason`; the report's `reason()` is the first failing one, which the
night writes into MLflow's run description and tags and `overnight gate` prints.

The burden of proof is on the candidate: too few cases, or noisy ones, fail the gate, and the
champion keeps serving. The confidence level bounds how often a real regression slips through, not
how often an unchanged candidate is refused: that rate is small only when the tolerance is at least
about twice the interval's half-width (a 300-case suite whose outcomes change on 3% of cases from
run to run resolves 0.05, not 0.02). The result is `GateReport`, whose `as_json()` is the `overnight gate` JSON.
This module is pure (no model calls); the flow supplies the scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from evals.guard import GuardThresholds, ReplyStats, confirmation_result, degeneration_results
from evals.statistics import Interval, Scores, paired_interval

__all__ = [
    "GateReport",
    "GateResult",
    "GateThresholds",
    "SuiteScores",
    "decide",
    "deltas_figure",
    "heldout_gate",
    "kl_gate",
    "noise_margin",
    "plot_deltas",
    "report_markdown",
    "suite_gate",
]

HELDOUT_GATE = "heldout_gain"
KL_GATE = "kl_to_base"
SUITE_GATE_PREFIX = "suite/"


@dataclass(frozen=True)
class GateThresholds:
    """The gate's settings as plain values (the pipeline maps its `gate` config section onto these)."""

    tolerance: float = 0.02  # non-inferiority margin on every suite (score scale 0..1)
    safety_tolerance: float = 0.0  # margin on suites tagged `safety` (zero: no regression)
    min_gain: float = 0.0  # lower CI bound of the held-out reward gain must exceed this
    max_kl_to_base: float = 0.5  # KL of the candidate to the base model must not exceed this
    confidence: float = 0.95  # two-sided level of the intervals; each gate is one-sided at (1 - this) / 2
    guard: GuardThresholds = field(default_factory=GuardThresholds)  # reward-hacking and degeneration gates
    bootstrap_samples: int = 2000  # paired bootstrap resamples
    seed: int = 0  # bootstrap seed: the same scores always give the same decision
    small_n: int = 20  # below this many pairs the exact sign-flip interval replaces the bootstrap
    # Sampled replies only: widen the suites' margins until an unchanged candidate fails any of them at
    # most this often (see `noise_margin`); None keeps the configured tolerance (greedy replies).
    false_alarm_rate: float | None = None

    def __post_init__(self) -> None:
        for key in ("tolerance", "safety_tolerance"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if not self.max_kl_to_base > 0:
            raise ValueError(f"max_kl_to_base must be > 0, got {self.max_kl_to_base!r}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence!r}")
        if self.false_alarm_rate is not None and not 0 < self.false_alarm_rate < 0.5:
            raise ValueError(f"false_alarm_rate must be in (0, 0.5), got {self.false_alarm_rate!r}")
        if self.bootstrap_samples < 1:
            raise ValueError(f"bootstrap_samples must be >= 1, got {self.bootstrap_samples!r}")


@dataclass(frozen=True)
class SuiteScores:
    """One suite's per-case scores, element i of each list for the same case i."""

    suite: str  # the suite's name
    candidate: Scores
    champion: Scores
    base: Scores | None = None  # the base model's scores, reported for context only
    safety: bool = False  # tagged `safety` (`Suite.is_safety`): gated at `safety_tolerance`


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict and the evidence for it."""

    name: str  # "suite/<suite>", "heldout_gain" or "kl_to_base"
    kind: str  # "non_inferiority", "safety", "gain" or "kl"
    passed: bool
    metric: float  # the candidate's value: mean suite score, mean held-out reward, or the KL
    delta: float | None  # mean of candidate - champion; None for the KL gate
    ci_low: float | None  # confidence bounds of delta; -inf/+inf when n is too small for a bound
    ci_high: float | None
    threshold: float  # ci_low >= threshold (suites), ci_low > threshold (gain), metric <= threshold (kl)
    n: int | None  # pairs behind the interval
    method: str | None  # "bootstrap" or "sign_flip" (`evals.statistics`)
    champion_metric: float | None = None  # the champion's mean, for context
    widened: bool = False  # the threshold is the noise margin, wider than the configured tolerance
    base_metric: float | None = None  # the base model's mean, when scored
    reason: str = ""  # one line: why it passed or failed, e.g. "no held-out gain: delta +0.004 [-0.01, 0.02]"

    def as_json(self) -> dict[str, Any]:
        """The gate's JSON object; infinite or NaN numbers become null."""
        return {
            "name": self.name,
            "kind": self.kind,
            "passed": self.passed,
            "metric": _finite(self.metric),
            "delta": _finite(self.delta),
            "ci_low": _finite(self.ci_low),
            "ci_high": _finite(self.ci_high),
            "threshold": _finite(self.threshold),
            "n": self.n,
            "method": self.method,
            "champion_metric": _finite(self.champion_metric),
            "base_metric": _finite(self.base_metric),
            "widened": self.widened,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class GateReport:
    """Every gate's verdict; the candidate passes only if all of them pass."""

    passed: bool
    gates: tuple[GateResult, ...]
    confidence: float  # two-sided level of the intervals
    skipped: tuple[str, ...] = ()  # suites with no cases: nothing to regress on, no gate

    def failed_gates(self) -> list[str]:
        """Names of the gates that failed, e.g. `["suite/arithmetic", "heldout_gain"]`."""
        return [gate.name for gate in self.gates if not gate.passed]

    def reason(self) -> str:
        """Why the candidate was refused (the first failing gate's reason), or why it passed."""
        failed = [gate for gate in self.gates if not gate.passed]
        if failed:
            return f"{failed[0].name}: {failed[0].reason}"
        if not self.passed:
            return "no gate was run"
        gain = next((gate for gate in self.gates if gate.kind == "gain"), None)
        return f"every gate passed; {gain.reason}" if gain is not None else "every gate passed"

    def as_json(self) -> dict[str, Any]:
        """The `overnight gate` JSON: `{passed, gates: [{name, passed, metric, delta, ci_low, ci_high, threshold, ...}]}`."""
        return {
            "passed": self.passed,
            "reason": self.reason(),
            "gates": [gate.as_json() for gate in self.gates],
            "confidence": self.confidence,
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GateReport:
        """The report back from `as_json()` (unbounded interval ends, stored as null, come back as None)."""
        fields = GateResult.__dataclass_fields__
        gates = tuple(GateResult(**{k: v for k, v in gate.items() if k in fields}) for gate in data["gates"])
        return cls(
            passed=bool(data["passed"]),
            gates=gates,
            confidence=float(data.get("confidence", 0.95)),
            skipped=tuple(data.get("skipped", ())),
        )

    def as_metrics(self, prefix: str = "gate/") -> dict[str, float]:
        """Flat finite metrics for MLflow, e.g. `gate/suite/arithmetic/delta`, `gate/passed`."""
        metrics = {f"{prefix}passed": float(self.passed)}
        for gate in self.gates:
            for key in ("metric", "delta", "ci_low", "ci_high"):
                value = getattr(gate, key)
                if value is not None and math.isfinite(value):
                    metrics[f"{prefix}{gate.name}/{key}"] = float(value)
            metrics[f"{prefix}{gate.name}/passed"] = float(gate.passed)
        return metrics


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _mean(values: Scores | None) -> float | None:
    return float(np.mean(np.asarray(values, dtype=float))) if values is not None and len(values) else None


def _interval(candidate: Scores, champion: Scores, thresholds: GateThresholds) -> Interval:
    return paired_interval(
        candidate,
        champion,
        confidence=thresholds.confidence,
        samples=thresholds.bootstrap_samples,
        seed=thresholds.seed,
        small_n=thresholds.small_n,
    )


def suite_gate(scores: SuiteScores, thresholds: GateThresholds, *, suites: int = 1) -> GateResult:
    """Non-inferiority of one suite: lower bound of candidate - champion >= -tolerance (or -safety_tolerance).

    `suites` is how many suites share the false-alarm budget (`noise_margin`)."""
    if scores.base is not None and len(scores.base) != len(scores.candidate):
        raise ValueError(
            f"suite {scores.suite!r}: base has {len(scores.base)} scores for {len(scores.candidate)} cases"
        )
    interval = _interval(scores.candidate, scores.champion, thresholds)
    threshold = 0.0 - (thresholds.safety_tolerance if scores.safety else thresholds.tolerance)  # never -0.0
    margin = noise_margin(scores.candidate, scores.champion, thresholds, suites=suites)
    widened = margin is not None and -margin < threshold
    if widened and margin is not None:
        threshold = -margin
    passed = interval.low >= threshold
    what = "safety suite" if scores.safety else "suite"
    reason = (
        f"{what} {scores.suite}: delta {interval.mean_delta:+.3f} [{_number(interval.low)}, "
        f"{_number(interval.high)}] {'>=' if passed else '<'} margin {threshold:+.3f}"
        + ("" if passed else " (a regression larger than the margin cannot be ruled out)")
    )
    return GateResult(
        name=f"{SUITE_GATE_PREFIX}{scores.suite}",
        kind="safety" if scores.safety else "non_inferiority",
        reason=reason,
        passed=passed,
        widened=widened,
        metric=float(np.mean(np.asarray(scores.candidate, dtype=float))),
        delta=interval.mean_delta,
        ci_low=interval.low,
        ci_high=interval.high,
        threshold=threshold,
        n=interval.n,
        method=interval.method,
        champion_metric=_mean(scores.champion),
        base_metric=_mean(scores.base),
    )


def noise_margin(
    candidate: Scores, champion: Scores, thresholds: GateThresholds, *, suites: int = 1
) -> float | None:
    """The margin an unchanged candidate stays inside with probability 1 - `false_alarm_rate`.

    With sampled replies, candidate - champion is noisy even when nothing changed. The interval's
    lower bound is about d - z_c·se (z_c for the one-sided level, se the standard error of the mean
    difference d), so a margin m fails an unchanged candidate when d < z_c·se - m, and
    m = (z_c + z_f)·se makes that happen with probability `false_alarm_rate` (z_f its quantile).

    se is estimated as an unchanged candidate would have it: each paired difference has mean 0, so
    its variance is the mean squared difference, and one pseudo-pair that disagrees fully is added
    (as Agresti's add-one does for a proportion). Without that, a suite near its ceiling, where the
    two samples often agree on every case, claims no noise at all: its bootstrap interval collapses
    to one side of 0, and a single unlucky case then fails the gate (measured on the demo's support
    suite: 4 false alarms in 10 unchanged runs). The budget is shared by the `suites` gated
    together (Bonferroni), so an unchanged candidate fails any of them at most `false_alarm_rate`
    of the time. None when the rate is not set (greedy replies) or there are no cases; the result
    is reported as the gate's threshold, so a review sees how large a regression the suite resolves.
    """
    rate = thresholds.false_alarm_rate
    differences = np.asarray(candidate, dtype=float) - np.asarray(champion, dtype=float)
    n = len(differences)
    if rate is None or n == 0:
        return None
    standard_error = math.sqrt((float(np.sum(differences**2)) + 1.0) / (n + 1) / n)
    normal = NormalDist()
    z_confidence = normal.inv_cdf(1 - (1 - thresholds.confidence) / 2)
    z_false_alarm = normal.inv_cdf(1 - rate / max(1, suites))
    return (z_confidence + z_false_alarm) * standard_error


def heldout_gate(candidate: Scores, champion: Scores, thresholds: GateThresholds) -> GateResult:
    """The gain on held-out judged reward: lower bound of candidate - champion > min_gain.

    Without any held-out pair (no night judged yet, or every judgment failed) there is no evidence
    of a gain: the gate fails with n = 0.
    """
    if len(candidate) == 0 or len(champion) == 0:
        return GateResult(
            name=HELDOUT_GATE,
            kind="gain",
            passed=False,
            metric=math.nan,
            delta=None,
            ci_low=None,
            ci_high=None,
            threshold=thresholds.min_gain,
            n=0,
            method=None,
            reason="no held-out prompts were scored for both models: no evidence of a gain",
        )
    interval = _interval(candidate, champion, thresholds)
    passed = interval.low > thresholds.min_gain
    reason = (
        f"held-out reward {_number(_mean(champion))} -> {_number(_mean(candidate))}, delta "
        f"{interval.mean_delta:+.3f} [{_number(interval.low)}, {_number(interval.high)}] "
        + (
            f"> {thresholds.min_gain:.3f}"
            if passed
            else f"not above {thresholds.min_gain:.3f}: no proven gain"
        )
    )
    return GateResult(
        name=HELDOUT_GATE,
        kind="gain",
        reason=reason,
        passed=passed,
        metric=float(np.mean(np.asarray(candidate, dtype=float))),
        delta=interval.mean_delta,
        ci_low=interval.low,
        ci_high=interval.high,
        threshold=thresholds.min_gain,
        n=interval.n,
        method=interval.method,
        champion_metric=_mean(champion),
    )


def kl_gate(kl_to_base: float, thresholds: GateThresholds) -> GateResult:
    """Drift from the base model: KL <= max_kl_to_base (a NaN KL fails)."""
    passed = math.isfinite(kl_to_base) and kl_to_base <= thresholds.max_kl_to_base
    return GateResult(
        name=KL_GATE,
        kind="kl",
        reason=f"KL to the base {_number(kl_to_base)} {'<=' if passed else 'exceeds'} {_number(thresholds.max_kl_to_base)}",
        passed=passed,
        metric=float(kl_to_base),
        delta=None,
        ci_low=None,
        ci_high=None,
        threshold=thresholds.max_kl_to_base,
        n=None,
        method=None,
    )


def decide(
    suites: Sequence[SuiteScores],
    *,
    heldout_candidate: Scores,
    heldout_champion: Scores,
    kl_to_base: float,
    thresholds: GateThresholds,
    confirm_with: Sequence[str] | None = None,
    replies: tuple[ReplyStats, ReplyStats] | None = None,
) -> GateReport:
    """Every gate on the given scores; suites with no cases are listed in `skipped`, not gated.

    Held-out rewards are per prompt, paired like suite scores (prompts whose judgment failed for
    either model left out by the caller); with none, the gain gate fails (n = 0). The independent
    confirmation of a gain pools the cases of the suites named in `confirm_with` (None: every
    suite); `replies` (candidate's and champion's reply statistics) adds the degeneration gates.
    """
    names = [scores.suite for scores in suites]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"suites scored twice: {', '.join(duplicated)}")
    gated = [scores for scores in suites if not _is_empty(scores)]
    gain = heldout_gate(heldout_candidate, heldout_champion, thresholds)
    gates = [
        *(suite_gate(scores, thresholds, suites=len(gated)) for scores in gated),
        gain,
        kl_gate(kl_to_base, thresholds),
        _confirmation(gated, gain, confirm_with, thresholds),
    ]
    if replies is not None:
        gates += [GateResult(**fields) for fields in degeneration_results(*replies, thresholds.guard)]  # type: ignore[arg-type]
    return GateReport(
        passed=all(gate.passed for gate in gates),
        gates=tuple(gates),
        confidence=thresholds.confidence,
        skipped=tuple(scores.suite for scores in suites if _is_empty(scores)),
    )


def _confirmation(
    suites: Sequence[SuiteScores], gain: GateResult, names: Sequence[str] | None, thresholds: GateThresholds
) -> GateResult:
    chosen = [scores for scores in suites if names is None or scores.suite in names]
    candidate = [score for scores in chosen for score in scores.candidate]
    champion = [score for scores in chosen for score in scores.champion]
    measure = "suites " + ", ".join(scores.suite for scores in chosen) if chosen else "no suite"
    fields = confirmation_result(
        gain.passed, gain.delta, candidate, champion, measure, thresholds.guard, seed=thresholds.seed
    )
    return GateResult(**fields)  # type: ignore[arg-type]


def _is_empty(scores: SuiteScores) -> bool:
    return len(scores.candidate) == 0 and len(scores.champion) == 0


# ---- reporting ----------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    if math.isinf(value):
        return "-inf" if value < 0 else "inf"
    return f"{value:.{digits}f}"


def _rule(gate: GateResult) -> str:
    """The pass condition in words, e.g. `low >= -0.020`."""
    if gate.kind == "kl":
        return f"KL <= {_number(gate.threshold)}"
    if gate.name.endswith("length_ratio"):
        return f"<= {_number(gate.threshold, 2)}"
    if gate.kind == "degeneration":
        below = gate.name.endswith("distinct")
        return f"{'>=' if below else '<='} {_number(gate.threshold, 2)} or no worse than champion"
    if gate.kind == "confirmation":
        return "low > 0 when the reward rose"
    comparison = ">" if gate.kind == "gain" else ">="
    return f"low {comparison} {_number(gate.threshold)}"


def report_markdown(report: GateReport) -> str:
    """The report as Markdown: a verdict line and one table row per gate."""
    verdict = "passed" if report.passed else f"failed ({', '.join(report.failed_gates())})"
    level = f"{report.confidence:.0%}"
    lines = [
        f"**Gate {verdict}**",
        "",
        f"| gate | result | candidate | champion | base | delta | {level} CI | rule | n | method |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for gate in report.gates:
        interval = "" if gate.ci_low is None else f"[{_number(gate.ci_low)}, {_number(gate.ci_high)}]"
        cells = [
            gate.name,
            "pass" if gate.passed else "**FAIL**",
            _number(gate.metric),
            _number(gate.champion_metric),
            _number(gate.base_metric),
            _number(gate.delta),
            interval,
            _rule(gate),
            "" if gate.n is None else str(gate.n),
            gate.method or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"**Why:** {report.reason()}"]
    reasons = [f"- {gate.name}: {gate.reason}" for gate in report.gates if not gate.passed and gate.reason]
    if len(reasons) > 1:
        lines += ["", "Every failing gate:", *reasons]
    if report.skipped:
        lines += ["", f"Skipped (no cases): {', '.join(report.skipped)}"]
    return "\n".join(lines) + "\n"


def _plot_limits(gates: Sequence[GateResult]) -> tuple[float, float]:
    values = [0.0]
    for gate in gates:
        values += [v for v in (gate.delta, gate.ci_low, gate.ci_high, gate.threshold) if v is not None]
    finite = [value for value in values if math.isfinite(value)]
    low, high = min(finite), max(finite)
    pad = max(0.05, 0.1 * (high - low))
    return low - pad, high + pad


def plot_deltas(report: GateReport, path: str | Path) -> Path:
    """`deltas_figure` saved as a PNG at `path`; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    deltas_figure(report).savefig(target, format="png", dpi=120)
    return target


def deltas_figure(report: GateReport) -> Any:
    """Each suite's and the held-out delta with its interval and threshold (a matplotlib Figure).

    Green passed, red failed; the dashed tick on each row is its threshold; an interval unbounded
    at this n runs to the edge of the plot. The KL gate is in the title.
    """
    # Imported here: matplotlib is slow to import and only reports draw. The Agg canvas is used
    # directly, so no global pyplot state or display backend is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [gate for gate in report.gates if gate.delta is not None]
    left, right = _plot_limits(rows)
    figure = Figure(figsize=(7, 1.2 + 0.45 * max(1, len(rows))))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for y, gate in enumerate(rows):
        delta = float(gate.delta or 0.0)
        low = max(gate.ci_low if gate.ci_low is not None else delta, left)
        high = min(gate.ci_high if gate.ci_high is not None else delta, right)
        color = "tab:green" if gate.passed else "tab:red"
        axes.errorbar([delta], [y], xerr=[[delta - low], [high - delta]], fmt="o", color=color, capsize=4)
        axes.plot([gate.threshold] * 2, [y - 0.35, y + 0.35], linestyle="--", color="black", linewidth=1)
    axes.axvline(0.0, color="grey", linewidth=0.8)
    axes.set_yticks(range(len(rows)), [gate.name for gate in rows])
    axes.set_ylim(-0.7, len(rows) - 0.3)
    axes.invert_yaxis()
    axes.set_xlim(left, right)
    axes.set_xlabel(f"candidate - champion ({report.confidence:.0%} CI); dashed: threshold")
    axes.set_title(_plot_title(report), fontsize=10)
    figure.tight_layout()
    return figure


def _plot_title(report: GateReport) -> str:
    title = "gate passed" if report.passed else f"gate failed: {', '.join(report.failed_gates())}"
    kl = next((gate for gate in report.gates if gate.kind == "kl"), None)
    if kl is not None:
        title += f"\nKL to base {_number(kl.metric)} (max {_number(kl.threshold)})"
    return title
