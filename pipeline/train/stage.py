"""The training stage: one night's update of a track's adapter with the track's method.

`train.method` picks the recipe (`grpo`, `kto`, `dpo`, `sft`, `distill`); every recipe takes the same prompts,
reward functions and bounds and returns the same `TrainResult`, so the night, the gate and the
registry do not care which one ran. `python -m pipeline.train JOB.yaml` runs one from a job file
(also under `accelerate launch`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.results import TrainPrompt
from pipeline.train.distill import DistillRecipe
from pipeline.train.dpo import DpoRecipe
from pipeline.train.grpo import GrpoRecipe
from pipeline.train.job import load_job
from pipeline.train.kto import KtoRecipe
from pipeline.train.recipe import Progress, Recipe, RewardFunction, TrainResult, process_state
from pipeline.train.sft import SftRecipe
from storage.errors import UserError

RECIPES: dict[str, type[Recipe]] = {
    "grpo": GrpoRecipe,
    "kto": KtoRecipe,
    "dpo": DpoRecipe,
    "sft": SftRecipe,
    "distill": DistillRecipe,
}


def train(
    settings: TrainConfig,
    prompts: Sequence[TrainPrompt],
    reward_funcs: Sequence[RewardFunction],
    *,
    base_model: str,
    out_dir: Path,
    champion: Path | None = None,
    reward_weights: Sequence[float] | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Tonight's candidate adapter by `settings.method`, from `champion` (or a fresh LoRA), within the bounds.

    Writes into `out_dir`: `adapter/` (unless nothing was trained), `metrics.jsonl` and
    `train_result.json`. GRPO needs reward functions; KTO, DPO and SFT use them, when there are any
    and `train.on_policy` is on, to rank the champion's own samples next to the logged replies;
    distillation learns from its teacher alone (the rewards are the gate's).
    """
    recipe = RECIPES[settings.method](
        settings, base_model=base_model, out_dir=out_dir, champion=champion, started=time.perf_counter()
    )
    return recipe.run(prompts, reward_funcs, reward_weights, progress)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.train JOB.yaml` (see `TrainJob`); prints the result JSON from the main process.

    Every process of an `accelerate launch` runs this; exit 2 with one line on stderr for a bad job.
    """
    parser = argparse.ArgumentParser(description="Run one bounded update (a night's training).")
    parser.add_argument(
        "job", type=Path, help="YAML or JSON job file: base_model, out_dir, train, prompts, graders"
    )
    args = parser.parse_args(argv)
    state = process_state()
    logging.basicConfig(
        level=logging.INFO if state.is_main_process else logging.WARNING,
        format=f"%(levelname)s [rank {state.process_index}] %(name)s: %(message)s",
    )
    from evals.graders import as_reward_function, weighted_grader

    try:
        job = load_job(args.job)
        graders = [weighted_grader(spec)[1] for spec in job.graders]
    except UserError as error:
        sys.stderr.write(f"{error}\n")
        return 2
    result = train(
        job.train,
        [TrainPrompt.from_json(p.model_dump()) for p in job.prompts],
        [as_reward_function(grader) for grader in graders],
        base_model=job.base_model,
        out_dir=job.out_dir,
        champion=job.champion,
        reward_weights=job.reward_weights(),
    )
    if state.is_main_process:
        sys.stdout.write(json.dumps(result.as_json(), sort_keys=True) + "\n")
    return 0
