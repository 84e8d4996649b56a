"""The job file of `python -m pipeline.train JOB.yaml`: what one training run is asked to do.

Why its own module: the file is the contract between the night (or an operator launching several
processes under `accelerate launch`) and the recipe, validated by pydantic so a typo is one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config import TrainConfig
from storage.errors import UserError


class JobPrompt(BaseModel):
    """One prompt of a job file: the fields of `pipeline.results.TrainPrompt`."""

    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, str]]
    reference: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    response: str | None = None  # a logged reply (KTO, DPO, SFT)
    score: float | None = None  # its score in [0, 1]
    score_source: str | None = None


class TrainJob(BaseModel):
    """What `python -m pipeline.train JOB.yaml` runs (JSON is YAML too)."""

    model_config = ConfigDict(extra="forbid")

    base_model: str  # Hugging Face model name or directory
    out_dir: Path  # where the adapter, metrics.jsonl and train_result.json go
    champion: Path | None = None  # the adapter to continue from; None trains a fresh LoRA
    train: TrainConfig = TrainConfig()
    prompts: list[JobPrompt] = Field(min_length=1)
    # evals.graders specs, each with an optional `weight`: GRPO's reward, DPO's and SFT's ranking of samples
    graders: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _grpo_has_a_reward(self) -> TrainJob:
        if self.train.method == "grpo" and not self.graders:
            raise ValueError("GRPO needs at least one grader")
        return self

    def reward_weights(self) -> list[float]:
        return [float(spec.get("weight", 1.0)) for spec in self.graders]


def load_job(path: Path) -> TrainJob:
    """The job file, validated; a problem is a one-line UserError naming the file and key."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return TrainJob.model_validate(data)
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"{path}: cannot read the job: {str(error).splitlines()[0]}") from None
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"{path}: {where}: {first['msg']}") from None
