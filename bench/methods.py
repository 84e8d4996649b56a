"""Methods benchmark: GRPO, GRPO on a reward model, KTO, DPO and SFT side by side on one night's data.

On the competent demo base (built and cached on first use), one night of arithmetic traffic: the
base answered 240 sums it never saw (sampled at temperature 1, so it forgot some carries) and
simulated users gave each answer a thumb (up for the right sum). Every method starts from the base
with the same LoRA, learning rate, batch and step budget (`planted.HACK_SETTINGS`), each in a fresh
process so that its peak memory is its own:
  - grpo (exact): GRPO on the exact-answer grader, the verifiable reward (the demo's LLM judge
    cannot judge yet: a 3M-parameter base scores at random, so "GRPO (judge)" would measure noise);
  - grpo (reward model): a reward model fitted to tonight's thumbs (`pipeline.train.reward_model`),
    then GRPO on it alone;
  - kto, dpo, sft: the feedback methods on the thumbs plus the base's own samples ranked by the
    exact answer (`train.on_policy`).

Measured per method: wall seconds of the update (model loading included), peak resident memory of
its process, steps, then on 200 other held-out sums: greedy accuracy, and the simulated users'
thumbs-up rate on sampled answers (temperature 1, 4 per question); and the change of every demo
suite's score (greedy). Gains are against the base, measured the same way in the same run.

    .venv/bin/python bench/methods.py [--methods grpo,grpo-rm,kto,dpo,sft] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.arithmetic import ArithmeticGrader  # noqa: E402
from evals.graders import Sample, as_reward_function  # noqa: E402
from pipeline.demo_world import planted, skills  # noqa: E402
from pipeline.gate.generation import Decoding, InProcessGenerator  # noqa: E402
from pipeline.results import TrainPrompt  # noqa: E402

METHODS = ("grpo", "grpo-rm", "kto", "dpo", "sft")
TRAIN, HELDOUT = planted.arithmetic_prompts(240, 200)
EXACT = ArithmeticGrader()
SAMPLED_PER_QUESTION = 4


def rated_night(generator: InProcessGenerator) -> list[TrainPrompt]:
    """The night's logged answers with the simulated users' thumbs (up: the right sum)."""
    replies = generator.replies(
        None, [p.messages for p in TRAIN], Decoding(max_new_tokens=16, temperature=1.0, seed=3)
    )
    return [
        TrainPrompt(p.messages, response=r, score=EXACT.score(Sample(p.messages, r)), score_source="feedback")
        for p, r in zip(TRAIN, replies, strict=True)
    ]


def measure(generator: InProcessGenerator, adapter: Path | None) -> dict[str, float]:
    """Held-out greedy accuracy, the users' sampled thumbs-up rate, and every demo suite's score."""
    chats = [p.messages for p in HELDOUT]
    greedy = generator.replies(adapter, chats, Decoding(max_new_tokens=16))
    figures = {"accuracy": _rate(chats, greedy)}
    sampled = []
    for seed in range(SAMPLED_PER_QUESTION):
        sampled += generator.replies(adapter, chats, Decoding(max_new_tokens=16, temperature=1.0, seed=seed))
    figures["thumbs_up"] = _rate(chats * SAMPLED_PER_QUESTION, sampled)
    for suite in skills.demo_suites():
        replies = generator.replies(
            adapter, [list(c.messages) for c in suite.cases], Decoding(max_new_tokens=32)
        )
        figures[suite.name] = sum(c.score(r) for c, r in zip(suite.cases, replies, strict=True)) / len(
            suite.cases
        )
    return figures


def _rate(chats: list[Any], replies: list[str]) -> float:
    return sum(EXACT.score(Sample(chat, reply)) for chat, reply in zip(chats, replies, strict=True)) / len(
        replies
    )


def train_one(method: str, base: str, night_file: Path, out_dir: Path, steps: int) -> dict[str, Any]:
    """One method's update in this process (run by the parent as a child): the result as JSON."""
    from pipeline.train.examples import logged_replies
    from pipeline.train.reward_model import RewardModelScorer, fit_reward_model
    from pipeline.train.stage import train

    prompts = [TrainPrompt.from_json(json.loads(line)) for line in night_file.read_text().splitlines()]
    settings = planted.HACK_SETTINGS.model_copy(update={"max_steps": steps})
    started = time.perf_counter()
    rewards: list[Any] = [as_reward_function(EXACT)]
    extra: dict[str, Any] = {}
    if method == "grpo-rm":
        from pipeline.config import RewardModelConfig

        fitted = fit_reward_model(
            RewardModelConfig(min_examples=32),
            settings,
            logged_replies(prompts),
            base_model=base,
            out_dir=out_dir,
        )
        extra["reward_model"] = {
            "agreement": fitted.agreement,
            "spearman": fitted.spearman,
            "usable": fitted.usable,
        }
        if fitted.adapter_dir is None:
            return {"method": method, "error": fitted.reason, **extra}
        rewards = [RewardModelScorer(base, fitted.adapter_dir)]
    name = "grpo" if method.startswith("grpo") else method
    result = train(
        settings.model_copy(update={"method": name}), prompts, rewards, base_model=base, out_dir=out_dir
    )
    return {
        "method": method,
        "seconds": time.perf_counter() - started,
        "steps": result.steps,
        "stop_reason": result.stop_reason,
        "adapter": str(result.adapter_dir) if result.adapter_dir else None,
        "data": result.data,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=30, help="step budget of every method")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "NIGHT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from pipeline.demo_world.base_model import build_base_model

    base = str(build_base_model(ROOT / ".overnight" / "test-cache" / "base-model"))
    if args.child:
        method, night, out = args.child
        print(json.dumps(train_one(method, base, Path(night), Path(out), args.steps)))
        return
    generator = InProcessGenerator(base, batch_size=64)
    work = Path(tempfile.mkdtemp(prefix="overnight-methods-"))
    night = work / "night.jsonl"
    rated = rated_night(generator)
    night.write_text("".join(json.dumps(p.as_json()) + "\n" for p in rated))
    ups = sum(1 for p in rated if p.score == 1.0)
    print(
        f"night: {len(rated)} answers, {ups} thumbs up, {len(rated) - ups} down; held out: {len(HELDOUT)} sums"
    )
    before = measure(generator, None)
    print("base: " + ", ".join(f"{k} {v:.3f}" for k, v in before.items()))
    rows = []
    for method in args.methods.split(","):
        out = work / method
        child = subprocess.run(
            [sys.executable, __file__, "--steps", str(args.steps), "--child", method, str(night), str(out)],
            capture_output=True,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            check=False,
        )
        if child.returncode != 0:
            print(f"{method}: failed\n{child.stderr[-2000:]}")
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        if result.get("adapter"):
            result["after"] = measure(generator, Path(result["adapter"]))
        rows.append(result)
        print(json.dumps(result))
    print()
    suites = [suite.name for suite in skills.demo_suites()]
    header = ["method", "wall s", "peak MiB", "steps", "accuracy", "thumbs up"] + [
        s.removeprefix("demo-") for s in suites
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    base_row = ["base", "", "", "", f"{before['accuracy']:.3f}", f"{before['thumbs_up']:.3f}"]
    print("| " + " | ".join(base_row + [f"{before[s]:.3f}" for s in suites]) + " |")
    for row in rows:
        after = row.get("after")
        if after is None:
            print(f"| {row['method']} | {row.get('error') or row.get('stop_reason')} |")
            continue
        cells = [
            row["method"],
            f"{row['seconds']:.1f}",
            f"{row['peak_rss_mib']:.0f}",
            str(row["steps"]),
            f"{after['accuracy']:.3f} ({after['accuracy'] - before['accuracy']:+.3f})",
            f"{after['thumbs_up']:.3f} ({after['thumbs_up'] - before['thumbs_up']:+.3f})",
        ] + [f"{after[s] - before[s]:+.3f}" for s in suites]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
