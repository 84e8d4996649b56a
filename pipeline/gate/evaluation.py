"""The evaluation half of the forgetting guard: score replies, measure drift, ask the gate.

`evals.gate.decide` is pure: it judges scores it is given. This module produces those scores: the
base, the champion and the candidate answer every suite case and every held-out prompt through a
`ReplyGenerator` (`pipeline.gate.generation`); programmatic cases are scored by their graders, judge
cases and held-out prompts by a `Scorer` the caller builds from the track's reward
(`pipeline.gate.stage`); the candidate's KL to the base comes from `probe_kl`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from evals.gate import GateReport, GateThresholds, SuiteScores, decide
from evals.guard import ReplyStats
from evals.suites import Suite, SuiteCase
from pipeline.gate.generation import (
    KL_PROBE_PROMPTS,
    Chat,
    Decoding,
    InProcessGenerator,
    ReplyGenerator,
    ServerGenerator,
    probe_kl,
)
from pipeline.results import TrainPrompt

__all__ = ["Evaluation", "Scorer", "evaluate_candidate", "programmatic_cases", "score_suite"]

logger = logging.getLogger(__name__)


# Scores of replies: (conversations, replies, references, rubrics) -> one score or None per reply;
# a rubric of None means the track's own. Built from the track's reward by `pipeline.gate.stage`.
Scorer = Callable[
    [Sequence[Chat], Sequence[str], Sequence[str | None], Sequence[str | None]], list[float | None]
]


def programmatic_cases(suite: Suite) -> list[SuiteCase]:
    """The suite's cases a programmatic grader scores."""
    return [case for case in suite.cases if not case.is_judge]


def score_suite(suite: Suite, responses: Sequence[str]) -> list[float]:
    """Scores of `responses`, one per programmatic case of `suite` in order; judge cases are left out."""
    cases = programmatic_cases(suite)
    if len(responses) != len(cases):
        raise ValueError(
            f"suite {suite.name!r}: {len(responses)} responses for {len(cases)} programmatic cases"
        )
    return [case.score(response) for case, response in zip(cases, responses, strict=True)]


def _case_scores(
    cases: Sequence[SuiteCase], replies: Sequence[str], scorer: Scorer | None
) -> list[float | None]:
    scores: list[float | None] = [
        None if case.is_judge else case.score(reply) for case, reply in zip(cases, replies, strict=True)
    ]
    judged = [index for index, case in enumerate(cases) if case.is_judge]
    if judged and scorer is not None:
        verdicts = scorer(
            [[dict(m) for m in cases[i].messages] for i in judged],
            [replies[i] for i in judged],
            [cases[i].reference for i in judged],
            [cases[i].rubric for i in judged],
        )
        for index, verdict in zip(judged, verdicts, strict=True):
            scores[index] = verdict
    return scores


def _mean_scores(draws: Sequence[Sequence[float | None]]) -> list[float | None]:
    """Per position, the mean of the draws' scores (a failed judgment left out; None if all failed)."""
    means: list[float | None] = []
    for position in zip(*draws, strict=True):
        scored = [score for score in position if score is not None]
        means.append(sum(scored) / len(scored) if scored else None)
    return means


def _paired(*columns: Sequence[float | None]) -> list[list[float]]:
    """Keep the positions where every column has a score (a failed judgment drops the pair)."""
    kept = [i for i in range(len(columns[0])) if all(column[i] is not None for column in columns)]
    return [[float(column[i]) for i in kept] for column in columns]  # type: ignore[arg-type]


@dataclass(frozen=True)
class Evaluation:
    """Everything the gate decided on, for the report and MLflow."""

    report: GateReport
    suites: list[SuiteScores]
    heldout_candidate: list[float]
    heldout_champion: list[float]
    kl_to_base: float
    generated: int  # replies generated (all three models)
    backend: str  # "vllm" or "in-process"
    # One row per suite case and held-out prompt: {suite, case, prompt, champion, candidate,
    # champion_score, candidate_score}, what a reviewer reads side by side.
    cases: list[dict[str, object]] = field(default_factory=list)


def evaluate_candidate(
    base_model: str,
    candidate: Path,
    champion: Path | None,
    suites: Sequence[Suite],
    *,
    thresholds: GateThresholds,
    generator: ReplyGenerator | None = None,
    scorer: Scorer | None = None,
    heldout: Sequence[TrainPrompt] = (),
    heldout_candidate: Sequence[float] = (),
    heldout_champion: Sequence[float] = (),
    decoding: Decoding = Decoding(),
    score_base: bool = True,
    confirm_with: Sequence[str] | None = None,
) -> Evaluation:
    """The gate's evaluation of `candidate` against `champion` (the base when None).

    Every suite case and every `heldout` prompt is answered by the candidate, the champion and (for
    context, when `score_base`) the base through `generator` (in-process by default). Programmatic
    cases are scored by their graders; judge cases and held-out replies by `scorer` (without one,
    judge cases are not scored and held-out scores must be given as `heldout_candidate` /
    `heldout_champion`). The KL gate gets the candidate's KL to the base on the first
    `KL_PROBE_PROMPTS` suite prompts. A held-out gain must be confirmed by the suites named in
    `confirm_with` (None: every suite), and the candidate's replies must not degenerate
    (`evals.guard`).
    """
    generator = generator or InProcessGenerator(base_model)
    per_suite = [
        [case for case in suite.cases if scorer is not None or not case.is_judge] for suite in suites
    ]
    cases = [case for suite_cases in per_suite for case in suite_cases]
    prompts = [[dict(m) for m in case.messages] for case in cases] + [list(p.messages) for p in heldout]
    models: dict[str, Path | None] = {"candidate": candidate, "champion": champion}
    if score_base:
        models["base"] = None
    # The base is the champion until a first promotion: ask once. Sampled decoding draws
    # `decoding.samples` replies per prompt (one seed each); greedy decoding one.
    draws = decoding.samples if decoding.temperature > 0 else 1
    asked: dict[Path | None, list[list[str]]] = {}
    for adapter in models.values():
        if adapter not in asked:
            asked[adapter] = [
                generator.replies(adapter, prompts, replace(decoding, seed=decoding.seed + draw))
                for draw in range(draws)
            ]
    drawn = {name: asked[adapter] for name, adapter in models.items()}
    replies = {name: draws_of[0] for name, draws_of in drawn.items()}  # what the report shows
    n_cases = len(cases)
    case_scores = {
        name: _mean_scores([_case_scores(cases, reply[:n_cases], scorer) for reply in draws_of])
        for name, draws_of in drawn.items()
    }
    scores = _suite_scores(suites, [len(suite_cases) for suite_cases in per_suite], case_scores)
    judged: dict[str, list[float | None]] = {}
    if heldout and scorer is not None:
        conversations = [list(p.messages) for p in heldout]
        references = [p.reference for p in heldout]
        rubrics = [None] * len(heldout)
        judged = {
            name: _mean_scores(
                [scorer(conversations, reply[n_cases:], references, rubrics) for reply in draws_of]
            )
            for name, draws_of in drawn.items()
            if name != "base"
        }
        heldout_candidate, heldout_champion = _paired(judged["candidate"], judged["champion"])
    # Suite prompts first; the held-out prompts when the suites have none.
    kl_prompts = prompts[: min(n_cases, KL_PROBE_PROMPTS)] or prompts[n_cases : n_cases + KL_PROBE_PROMPTS]
    kl = probe_kl(base_model, candidate, None, kl_prompts)
    questions = [_last_user_text(prompt) for prompt in prompts]
    stats = (
        ReplyStats.of(questions, replies["candidate"], thresholds.guard.ngram),
        ReplyStats.of(questions, replies["champion"], thresholds.guard.ngram),
    )
    report = decide(
        scores,
        heldout_candidate=list(heldout_candidate),
        heldout_champion=list(heldout_champion),
        kl_to_base=kl,
        thresholds=thresholds,
        confirm_with=confirm_with,
        replies=stats,
    )
    names = [suite.name for suite, suite_cases in zip(suites, per_suite, strict=True) for _ in suite_cases]
    names += ["held-out"] * len(heldout)
    ids = [case.id for case in cases] + [f"heldout-{index}" for index in range(len(heldout))]
    score_columns = {
        name: case_scores[name] + judged.get(name, [None] * len(heldout))
        for name in ("candidate", "champion")
    }
    rows: list[dict[str, object]] = [
        {
            "suite": names[index],
            "case": ids[index],
            "prompt": questions[index],
            "champion": replies["champion"][index],
            "candidate": replies["candidate"][index],
            "champion_score": score_columns["champion"][index],
            "candidate_score": score_columns["candidate"][index],
        }
        for index in range(len(prompts))
    ]
    return Evaluation(
        report=report,
        suites=scores,
        heldout_candidate=list(heldout_candidate),
        heldout_champion=list(heldout_champion),
        kl_to_base=kl,
        generated=sum(len(reply) for draws_of in asked.values() for reply in draws_of),
        backend="vllm" if isinstance(generator, ServerGenerator) else "in-process",
        cases=rows,
    )


def _last_user_text(messages: Sequence[dict[str, str]]) -> str:
    users = [message for message in messages if message.get("role") == "user"]
    return str((users or list(messages) or [{"content": ""}])[-1].get("content", ""))


def _suite_scores(
    suites: Sequence[Suite], sizes: Sequence[int], case_scores: dict[str, list[float | None]]
) -> list[SuiteScores]:
    """Per-suite paired scores from the flat per-case scores (suites' cases are consecutive)."""
    scores: list[SuiteScores] = []
    start = 0
    for suite, size in zip(suites, sizes, strict=True):
        end = start + size
        columns = [case_scores["candidate"][start:end], case_scores["champion"][start:end]]
        if "base" in case_scores:
            columns.append(case_scores["base"][start:end])
        paired = _paired(*columns)
        scores.append(
            SuiteScores(
                suite=suite.name,
                candidate=paired[0],
                champion=paired[1],
                base=paired[2] if len(paired) > 2 else None,
                safety=suite.is_safety,
            )
        )
        start = end
    return scores
