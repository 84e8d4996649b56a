"""The gate stage: a track's suites, its reward as a scorer, a reply generator, and a written report.

`pipeline.gate.evaluation` knows how to evaluate a candidate given suites, a scorer and a generator;
`evals.gate` knows how to decide. This module builds those inputs from a track's configuration
(the shipped or file suites it names plus its memory suite, the judge and graders of its reward,
the vLLM server when one answers, the thresholds and decoding of its `gate` section) and writes the
report where the night and `overnight gate` keep it: `gate.json`, `gate.md` and `gate_deltas.png`.
The memory suite (tonight's well-judged interactions, guarding the nights after) is in
`pipeline.gate.memory`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from evals.gate import GateThresholds, plot_deltas, report_markdown
from evals.graders import Sample, combine_scores, safe_score, weighted_grader
from evals.guard import GuardThresholds
from pipeline.config import GateConfig, OvernightConfig, RewardConfig, TrainConfig
from pipeline.deploy.vllm_client import VllmClient
from pipeline.gate.evaluation import Evaluation, Scorer, evaluate_candidate
from pipeline.gate.generation import Chat, Decoding, InProcessGenerator, ReplyGenerator, ServerGenerator
from pipeline.gate.memory import track_suites
from pipeline.judge.client import Judge, run_sync
from pipeline.judge.rubrics import Rubric, load_rubric
from pipeline.judge.stage import read_judged
from pipeline.results import CASES_FILE, GateDecision, TrainPrompt
from pipeline.select import select as select_prompts
from storage.errors import UserError
from storage.models import Snapshot

__all__ = [
    "decoding_from",
    "gate_track",
    "latest_heldout",
    "reward_scorer",
    "server_generator",
    "thresholds_from",
    "write_report",
]

logger = logging.getLogger(__name__)


def thresholds_from(gate: GateConfig) -> GateThresholds:
    """The gate section as the pure gate's thresholds (noise margins only for sampled replies)."""
    return GateThresholds(
        tolerance=gate.tolerance,
        safety_tolerance=gate.safety_tolerance,
        min_gain=gate.min_gain,
        max_kl_to_base=gate.max_kl_to_base,
        confidence=gate.confidence,
        bootstrap_samples=gate.bootstrap_samples,
        seed=gate.seed,
        false_alarm_rate=gate.false_alarm_rate if gate.temperature > 0 else None,
        guard=GuardThresholds(
            confirm=gate.confirm_with != [],
            confirm_confidence=gate.confirm_confidence,
            max_repetition=gate.max_repetition,
            min_distinct_ratio=gate.min_distinct_ratio,
            max_identical_share=gate.max_identical_share,
            max_length_ratio=gate.max_length_ratio,
        ),
    )


def decoding_from(gate: GateConfig) -> Decoding:
    return Decoding(
        max_new_tokens=gate.max_new_tokens, temperature=gate.temperature, seed=gate.seed, samples=gate.samples
    )


def reward_scorer(
    reward: RewardConfig, judge: Judge | None, rubric: Rubric, reward_model: Callable[..., Any] | None = None
) -> Scorer:
    """The track's reward on fresh replies: its judge (pointwise, on the case's rubric or the track's),
    its reward model (tonight's, when it agrees with users) and graders, blended with the track's
    weights; user feedback has no part in a fresh reply."""
    graders = [weighted_grader(spec) for spec in reward.graders]
    weights = {"judge": reward.judge if judge is not None else 0.0}
    weights["reward_model"] = reward.reward_model if reward_model is not None else 0.0
    weights |= {f"grader{index}": weight for index, (weight, _) in enumerate(graders)}
    if not any(weights.values()):
        raise ValueError(
            "the track's reward has no judge, no usable reward model and no graders to score replies with"
        )

    def score(
        conversations: Sequence[Chat],
        replies: Sequence[str],
        references: Sequence[str | None],
        rubrics: Sequence[str | None],
    ) -> list[float | None]:
        judged = (
            _judge_scores(judge, rubric, conversations, replies, references, rubrics)
            if weights["judge"]
            else None
        )
        modelled = (
            reward_model(prompts=list(conversations), completions=list(replies))
            if reward_model is not None
            else None
        )
        scores: list[float | None] = []
        for index, (conversation, reply, reference) in enumerate(
            zip(conversations, replies, references, strict=True)
        ):
            sample = Sample(messages=list(conversation), response=reply, reference=reference)
            components: dict[str, float | None] = {
                "judge": judged[index] if judged else None,
                "reward_model": modelled[index] if modelled else None,
            }
            components |= {f"grader{i}": safe_score(grader, sample) for i, (_, grader) in enumerate(graders)}
            scores.append(combine_scores(components, weights))
        return scores

    return score


def _judge_scores(
    judge: Judge | None,
    default: Rubric,
    conversations: Sequence[Chat],
    replies: Sequence[str],
    references: Sequence[str | None],
    rubrics: Sequence[str | None],
) -> list[float | None]:
    assert judge is not None
    scores: list[float | None] = [None] * len(replies)
    by_rubric: dict[str | None, list[int]] = {}
    for index, name in enumerate(rubrics):
        by_rubric.setdefault(name, []).append(index)
    for name, indices in by_rubric.items():
        rubric = default if name is None else load_rubric(name)
        verdicts = run_sync(
            judge.score(
                rubric,
                [conversations[i] for i in indices],
                [replies[i] for i in indices],
                [references[i] for i in indices],
            )
        )
        for index, verdict in zip(indices, verdicts, strict=True):
            scores[index] = verdict.score
    return scores


def server_generator(
    endpoint: str, base_name: str, api_key: str | None, timeout: float
) -> ServerGenerator | None:
    """A generator on `endpoint` when it answers, None otherwise (the gate then runs in-process)."""
    client = VllmClient(endpoint, api_key=api_key, timeout_seconds=timeout)
    if client.healthy():
        return ServerGenerator(client, base_name=base_name)
    client.close()
    logger.warning("no vLLM server answers at %s: evaluating in-process", endpoint)
    return None


def gate_track(
    config: OvernightConfig,
    track: str,
    *,
    candidate: Path,
    champion: Path | None,
    heldout: Sequence[TrainPrompt],
    judge: Judge | None,
    generator: ReplyGenerator | None,
    report_dir: Path,
    reward_model: Callable[..., Any] | None = None,
) -> GateDecision:
    """The gate stage for one track: evaluate `candidate` against `champion` (None: the base) on the
    track's suites and `heldout` prompts, decide, and write the report. The night and `overnight
    gate` both call this; `judge` may be None when the track's reward gives it no weight."""
    spec = config.track(track)
    base_model = config.base_model_for(track)
    gate = config.gate_for(track)
    suites = track_suites(config, track)
    unknown = sorted(set(gate.confirm_with or ()) - {suite.name for suite in suites})
    if unknown:
        raise UserError(
            f"track {track!r}: gate.confirm_with names {', '.join(unknown)}, which are not among its suites "
            f"({', '.join(suite.name for suite in suites)})"
        )
    evaluation = evaluate_candidate(
        base_model,
        candidate,
        champion,
        suites,
        # None: the suites the track names (its memory suite holds judge-scored cases: not independent)
        confirm_with=gate.confirm_with
        if gate.confirm_with is not None
        else [suite.name for suite in suites if suite.name != f"memory-{track}"],
        thresholds=thresholds_from(gate),
        generator=generator or InProcessGenerator(base_model),
        scorer=reward_scorer(spec.reward, judge, load_rubric(spec.rubric), reward_model),
        heldout=heldout,
        decoding=decoding_from(gate),
    )
    write_report(evaluation, report_dir)
    return GateDecision.of(
        evaluation.report,
        backend=evaluation.backend,
        generated=evaluation.generated,
        report_dir=report_dir,
        kl_to_base=evaluation.kl_to_base,
    )


def write_report(evaluation: Evaluation, report_dir: Path) -> None:
    """`gate.json`, `gate.md`, `gate_deltas.png` and the per-case replies (`cases.jsonl`) in `report_dir`."""
    report_dir.mkdir(parents=True, exist_ok=True)
    data = {**evaluation.report.as_json(), "backend": evaluation.backend, "kl_to_base": evaluation.kl_to_base}
    (report_dir / "gate.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (report_dir / "gate.md").write_text(report_markdown(evaluation.report), encoding="utf-8")
    with (report_dir / CASES_FILE).open("w", encoding="utf-8") as cases:
        for row in evaluation.cases:
            cases.write(json.dumps(row, ensure_ascii=False) + "\n")
    plot_deltas(evaluation.report, report_dir / "gate_deltas.png")


def latest_heldout(engine: Engine, track: str, train: TrainConfig) -> list[TrainPrompt]:
    """The held-out prompts of the track's latest judged snapshot (empty when none was judged yet)."""
    with Session(engine) as session:
        paths = session.scalars(
            select(Snapshot.path).where(Snapshot.track == track).order_by(Snapshot.id.desc())
        ).all()
    for path in paths:
        judged = Path(path).with_suffix(".judged.jsonl")
        if judged.exists():
            chosen = select_prompts(
                read_judged(judged),
                max_prompts=train.max_prompts,
                heldout_fraction=train.heldout_fraction,
                seed=train.seed,
            )
            return chosen.heldout
    return []
