"""The typed values stages hand each other: one per stage, stored as JSON in the run ledger.

Each stage of a night (`pipeline.night`) takes the results of the stages before it and returns one of
these. The ledger keeps `model_dump(mode="json")` of every finished stage; a resumed night reads them
back with `model_validate`, so what a stage receives after a crash has the same type as what it
would have received in one go. Frozen pydantic models rather than dataclasses because the ledger's
JSON round trip (paths, nested models, validation of what was read back) is what pydantic does.

Also here: `TrainPrompt`, the prompt that crosses select → train → gate, so that selecting prompts
does not import the trainer (and torch) for a three-field type.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from evals.gate import GateReport, GateResult

__all__ = [
    "Committed",
    "Deployed",
    "GateDecision",
    "GateVerdict",
    "Harvested",
    "Judged",
    "Registered",
    "Selected",
    "StageResult",
    "Swap",
    "TrainPrompt",
    "Trained",
]


@dataclass(frozen=True)
class TrainPrompt:
    """One training prompt: a chat that ends with a user turn, and what reward functions may use."""

    messages: list[dict[str, str]]  # chat prompt (ends with a user turn)
    reference: str | None = None  # passed to reward functions as the `reference` column
    metadata: dict[str, Any] = field(default_factory=dict)  # each key becomes a column for the rewards
    response: str | None = None  # the logged reply (KTO, DPO and SFT learn from it; GRPO samples its own)
    score: float | None = None  # the reply's score in [0, 1]: the user's feedback, else the judged reward
    score_source: str | None = None  # "feedback" or "reward"

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "messages": self.messages,
            "reference": self.reference,
            "metadata": self.metadata,
        }
        if self.response is not None:
            data |= {"response": self.response, "score": self.score, "score_source": self.score_source}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainPrompt:
        return cls(
            data["messages"],
            data.get("reference"),
            data.get("metadata") or {},
            data.get("response"),
            data.get("score"),
            data.get("score_source"),
        )


class StageResult(BaseModel):
    """A stage's result: frozen, JSON in the ledger, validated when read back.

    Infinite floats (an interval unbounded at small n) are written as the strings "Infinity" and
    "-Infinity", which every JSON store keeps (PostgreSQL's JSONB refuses bare Infinity) and pydantic
    reads back as floats.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")

    def as_json(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


class Harvested(StageResult):
    """The night's snapshot: what was read, kept and dropped, and where the redacted rows are."""

    track: str
    rows: int  # rows kept in the snapshot
    read: int  # rows read in the window
    dropped: dict[str, int] = Field(default_factory=dict)  # reason -> rows
    redactions: dict[str, int] = Field(default_factory=dict)  # PII kind -> replacements
    sha256: str  # of the snapshot's content
    window: dict[str, int | str] = Field(default_factory=dict)  # after_id/until_id or since_ts/until_ts
    source: str  # store | external
    snapshot_id: int | None = None  # the stored manifest; None for a preview
    path: Path | None = None  # the snapshot JSONL
    reused: bool = False  # the snapshot of a run that died after harvesting


class Judged(StageResult):
    """The snapshot scored: rewards per row in `path`, with the judge's figures and calibration."""

    rubric: str  # the rubric's versioned key
    judge_model: str | None  # None when the track's reward has no judge term
    rows: int
    scored: int  # rows with a reward
    failed: int  # judgments that failed (the row keeps its other reward parts)
    skipped: int  # over the judge budget
    mean_reward: float | None
    calibration: dict[str, float | None] = Field(default_factory=dict)  # agreement with user feedback
    judge: dict[str, float] = Field(default_factory=dict)  # judge_calls, judge_cache_hits, ...
    path: Path | None  # the judged JSONL (one scored record per line)


class Selected(StageResult):
    """Training and held-out prompts, written as JSONL under the run directory."""

    train: int
    heldout: int
    considered: int  # judged rows read
    unscored: int  # rows without a reward, still eligible, ranked last
    train_path: Path
    heldout_path: Path


class Trained(StageResult):
    """The bounded update's outcome; `adapter_dir` is None when nothing was trained."""

    steps: int
    stop_reason: str  # max_steps | wall_clock | kl_budget | no_signal | completed | no_prompts | too_little_data | no_reward
    adapter_dir: Path | None = None
    kl: float | None = None  # last rolling KL to the reference (the champion, or the base)
    kl_to_champion: float | None = None
    kl_to_base: float | None = None
    adapter_sha256: dict[str, str] = Field(default_factory=dict)  # file -> sha256
    adapter_digest: str | None = None
    metrics_path: Path | None = None  # metrics.jsonl, one line per step
    wall_seconds: float = 0.0
    trainable_parameters: int = 0
    bounds: dict[str, float] = Field(default_factory=dict)
    method: str = "grpo"
    detail: str | None = None  # why nothing was trained (too little data for the method), in words
    data: dict[str, int] = Field(default_factory=dict)  # examples trained on, by kind
    # tonight's reward model (`pipeline.train.reward_model.RewardModelResult` and its registered version)
    reward_model: dict[str, Any] | None = None
    champion_version: int | None = None  # the version training continued from
    reused: bool = False  # the result of a run that died after training


class GateVerdict(StageResult):
    """One gate of the decision: the fields of `evals.gate.GateResult`, infinite bounds kept."""

    name: str
    kind: str
    passed: bool
    metric: float | None
    delta: float | None
    ci_low: float | None
    ci_high: float | None
    threshold: float | None
    n: int | None
    method: str | None
    champion_metric: float | None = None
    widened: bool = False
    base_metric: float | None = None
    reason: str = ""


CASES_FILE = "cases.jsonl"  # per-case replies of champion and candidate, next to gate.json


class GateDecision(StageResult):
    """The forgetting guard's verdict on the candidate; `skipped` when there was no candidate."""

    passed: bool
    gates: list[GateVerdict] = Field(default_factory=list)
    confidence: float = 0.95
    skipped_suites: list[str] = Field(default_factory=list)  # suites with no cases
    skipped: bool = False  # no candidate to judge
    reason: str | None = None  # why skipped
    backend: str | None = None  # vllm | in-process
    generated: int = 0  # replies generated
    report_dir: Path | None = None
    kl_to_base: float | None = None

    @classmethod
    def of(cls, report: GateReport, **fields: Any) -> GateDecision:
        return cls(
            passed=report.passed,
            gates=[GateVerdict(**asdict(gate)) for gate in report.gates],
            confidence=report.confidence,
            skipped_suites=list(report.skipped),
            **fields,
        )

    def report(self) -> GateReport:
        gates = tuple(GateResult(**gate.model_dump()) for gate in self.gates)
        return GateReport(self.passed, gates, self.confidence, tuple(self.skipped_suites))

    def summary(self) -> dict[str, Any]:
        """`{passed, reason, gates, backend}` as `overnight run --json` prints it (unbounded ends as null)."""
        report = self.report().as_json()
        return {
            "passed": self.passed,
            "reason": report["reason"],
            "gates": report["gates"],
            "backend": self.backend,
        }

    def cases(self) -> list[dict[str, Any]]:
        """The per-case replies the gate wrote (`cases.jsonl` in its report directory); [] when none."""
        path = self.report_dir / CASES_FILE if self.report_dir is not None else None
        if path is None or not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def report_json(self) -> dict[str, Any]:
        """What `overnight gate --json` prints: the report (`{passed, gates, confidence, skipped}`) and
        where it came from."""
        where = {"backend": self.backend, "generated": self.generated, "kl_to_base": self.kl_to_base}
        return {**self.report().as_json(), **where, "report_dir": str(self.report_dir)}


class Registered(StageResult):
    """The registry version the candidate became; None when the gate refused it."""

    version: int | None = None
    reused: bool = False  # registered before a crash, found by the run's tag


class Swap(StageResult):
    """A deploy (`pipeline.deploy.hotswap.deploy`): the version loaded everywhere, the route flipped."""

    track: str
    version: int
    action: str  # deploy | rollback
    endpoints: list[str]  # every endpoint now serving `version` under its pinned name
    seconds: float  # start of the deploy to the route flipped and recorded
    fingerprint: str  # sha256 of the pinned name's greedy probe replies (first endpoint)
    previous: dict[str, int | None]  # per endpoint, the version the route served before
    unloaded: list[str] = []  # pinned versions pruned past `keep_versions`
    prune: str = "done"  # done | deferred (the last flip is younger than `unload_grace_seconds`)


class Deployed(StageResult):
    """Whether the version serves; the deploy's record when it was loaded and its route flipped."""

    deployed: bool
    version: int | None = None
    already: bool = False  # it was already the champion (a resumed night)
    reason: str | None = None  # why not deployed
    swap: Swap | None = None


class Committed(StageResult):
    """The night's end: its status, the new watermark and the memory suite's size and version."""

    status: str  # promoted | registered | rejected | skipped
    watermark: int | None = None
    memory_cases: int | None = None
    memory_version: str | None = None
