"""Methods benchmark: GRPO (judge), GRPO (reward model), KTO, DPO and SFT side by side on one night of
users' feedback.

On the competent demo base (built and cached on first use), one night of the demo's support track:
the base answered support questions it never saw in pretraining (sampled at temperature 1, as a chat
application samples, so some replies are padded or give another question's steps) and the demo's
simulated users rated each reply by their hidden preference, the right steps in a short reply
(`pipeline.demo_world.users.verdict`: a thumb, and from half of them a rating). Two rewards are
built from that night: a reward model fitted to the thumbs and ratings (`pipeline.train.reward_model`,
its held-out agreement with the users printed), and the LLM judge, the base itself served by a
local vLLM server and asked in the compact judge prompt (`judge.prompt: compact`) on the
`concision` rubric (its agreement with the night's ratings printed too: a 3M-parameter base that
was never taught to judge scores near chance, which is what this row shows). Every method starts
from the base with the same LoRA, learning rate, batch and step budget (`planted.HACK_SETTINGS`,
replies up to the users' 48 tokens), each in a fresh process so that its peak memory is its own:
  - grpo-judge: GRPO on the LLM judge (RLAIF), the judge scoring each sampled reply;
  - grpo-rm: GRPO on the reward model alone;
  - kto, dpo, sft: the feedback methods on the users' thumbs plus the base's own samples ranked by
    the reward model (`train.on_policy`), as the demo's support track does.

Measured per method: wall seconds of the update (model loading included), peak resident memory of
its process, steps; then on questions held out of the night: the users' thumbs-up rate on sampled
replies (temperature 1, `SAMPLED_PER_QUESTION` per question), with the gate's paired interval of
its gain over the base (per question, 95%), and the change of every demo suite's score (greedy).
Gains are against the base, measured the same way in the same run.

    .venv/bin/python bench/methods.py [--methods grpo-judge,grpo-rm,kto,dpo,sft] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.calibration import spearman, thumb_accuracy  # noqa: E402
from evals.graders import feedback_score  # noqa: E402
from evals.statistics import paired_interval  # noqa: E402
from pipeline.demo_world import planted, skills, users  # noqa: E402
from pipeline.gate.generation import Decoding, InProcessGenerator  # noqa: E402
from pipeline.results import TrainPrompt  # noqa: E402

METHODS = ("grpo-judge", "grpo-rm", "kto", "dpo", "sft")
SAMPLED_PER_QUESTION = 4
REPLY = Decoding(max_new_tokens=users.REPLY_TOKENS, temperature=1.0)
NIGHT_SHARE = 0.6  # of the users' questions: the night's; the rest are held out


def questions() -> tuple[list[tuple[skills.Intent, str]], list[tuple[skills.Intent, str]]]:
    """The users' questions (never pretrained on, not in the suites), split into tonight's and held out."""
    pool = skills.support_questions()
    random.Random("methods-bench").shuffle(pool)
    cut = round(len(pool) * NIGHT_SHARE)
    return pool[:cut], pool[cut:]


NIGHT, HELDOUT = questions()


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def rated_night(generator: InProcessGenerator) -> tuple[list[TrainPrompt], list[dict[str, Any]]]:
    """Tonight's logged replies with the users' feedback, and the feedback itself (for calibration)."""
    rng = random.Random("methods-bench-users")
    replies = generator.replies(None, [chat(q) for _, q in NIGHT], replace(REPLY, seed=3))
    prompts, feedback = [], []
    for (intent, question), reply in zip(NIGHT, replies, strict=True):
        judged = users.verdict(intent, reply, rng)
        given: dict[str, Any] = {"thumb": judged.thumb}
        if rng.random() < users.RATING_RATE:
            given["rating"] = judged.rating
        prompts.append(
            TrainPrompt(chat(question), response=reply, score=feedback_score(given), score_source="feedback")
        )
        feedback.append(given)
    return prompts, feedback


def liked_per_question(generator: InProcessGenerator, adapter: Path | None) -> list[float]:
    """Per held-out question, the share of its sampled replies the users like."""
    chats = [chat(q) for _, q in HELDOUT]
    liked = [0] * len(HELDOUT)
    for seed in range(SAMPLED_PER_QUESTION):
        replies = generator.replies(adapter, chats, Decoding(REPLY.max_new_tokens, REPLY.temperature, seed))
        for index, ((intent, _), reply) in enumerate(zip(HELDOUT, replies, strict=True)):
            liked[index] += skills.preference(intent, reply) == "good"
    return [count / SAMPLED_PER_QUESTION for count in liked]


def measure(generator: InProcessGenerator, adapter: Path | None) -> dict[str, Any]:
    """The users' per-question thumbs-up rate on held-out questions, and every demo suite's score."""
    figures: dict[str, Any] = {"liked": liked_per_question(generator, adapter)}
    for suite in skills.demo_suites():
        replies = generator.replies(
            adapter, [list(c.messages) for c in suite.cases], Decoding(max_new_tokens=users.REPLY_TOKENS)
        )
        figures[suite.name] = sum(c.score(r) for c, r in zip(suite.cases, replies, strict=True)) / len(
            suite.cases
        )
    return figures


RUBRIC = "concision"


def judge_for(url: str) -> Any:
    from pipeline.judge.client import JudgeSettings, LlmJudge

    return LlmJudge(JudgeSettings(base_url=url, model="base", prompt="compact", max_tokens=16, concurrency=8))


def calibration(url: str, night: list[TrainPrompt], feedback: list[dict[str, Any]]) -> dict[str, Any]:
    """The judge's agreement with the night's users: Spearman with ratings, thumb accuracy."""
    from pipeline.judge.client import run_sync
    from pipeline.judge.rubrics import load_rubric

    judge = judge_for(url)
    verdicts = run_sync(
        judge.score(load_rubric(RUBRIC), [p.messages for p in night], [p.response or "" for p in night])
    )
    scored = [(v.score, f) for v, f in zip(verdicts, feedback, strict=True) if v.score is not None]
    rated = [(score, f["rating"]) for score, f in scored if "rating" in f]
    return {
        "judged": len(scored),
        "of": len(night),
        "spearman_rating": spearman([s for s, _ in rated], [r for _, r in rated]) if len(rated) > 2 else None,
        "n_rated": len(rated),
        "thumb_accuracy": thumb_accuracy([s for s, _ in scored], [f["thumb"] for _, f in scored]),
    }


def settings(steps: int) -> Any:
    return planted.HACK_SETTINGS.model_copy(
        update={"max_steps": steps, "max_completion_tokens": users.REPLY_TOKENS}
    )


def fit_one(base: str, night_file: Path, out_dir: Path) -> dict[str, Any]:
    """The night's reward model (run by the parent as a child): its adapter and agreement as JSON."""
    from pipeline.config import RewardModelConfig
    from pipeline.train.examples import logged_replies
    from pipeline.train.reward_model import fit_reward_model

    prompts = [TrainPrompt.from_json(json.loads(line)) for line in night_file.read_text().splitlines()]
    started = time.perf_counter()
    fitted = fit_reward_model(
        RewardModelConfig(epochs=50.0), settings(1), logged_replies(prompts), base_model=base, out_dir=out_dir
    )
    return {
        "adapter": str(fitted.adapter_dir) if fitted.adapter_dir else None,
        "agreement": fitted.agreement,
        "spearman": fitted.spearman,
        "usable": fitted.usable,
        "reason": fitted.reason,
        "seconds": time.perf_counter() - started,
    }


def train_one(
    method: str, base: str, night_file: Path, out_dir: Path, steps: int, url: str, reward_model: str
) -> dict[str, Any]:
    """One method's update in this process (run by the parent as a child): the result as JSON."""
    from pipeline.judge.rubrics import load_rubric
    from pipeline.train.reward_model import RewardModelScorer
    from pipeline.train.rewards import judge_reward
    from pipeline.train.stage import train

    prompts = [TrainPrompt.from_json(json.loads(line)) for line in night_file.read_text().splitlines()]
    started = time.perf_counter()
    if method == "grpo-judge":
        rewards: list[Any] = [judge_reward(judge_for(url), load_rubric(RUBRIC))]
    else:
        rewards = [RewardModelScorer(base, Path(reward_model))]
    name = "grpo" if method.startswith("grpo") else method
    result = train(
        settings(steps).model_copy(update={"method": name}),
        prompts,
        rewards,
        base_model=base,
        out_dir=out_dir,
    )
    return {
        "method": method,
        "seconds": time.perf_counter() - started,
        "steps": result.steps,
        "stop_reason": result.stop_reason,
        "adapter": str(result.adapter_dir) if result.adapter_dir else None,
        "data": result.data,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def child(arguments: list[str], steps: int) -> dict[str, Any] | None:
    """Run this script as a child with `arguments`; its last stdout line as JSON, None if it failed."""
    command = [sys.executable, __file__, "--steps", str(steps), "--child", *arguments]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        check=False,
    )
    if done.returncode != 0:
        print(f"{arguments[0]}: failed\n{done.stderr[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def start_judge_server(base: str, work: Path) -> Any:
    """The base served by vLLM: the LLM judge (as in the demo)."""
    from pipeline.deploy.serving import start_serving
    from pipeline.deploy.vllm_process import ServerSpec, free_port

    spec = ServerSpec(
        model=base,
        served_name="base",
        port=free_port(),
        dtype="float32",
        max_model_len=1024,
        max_loras=1,
        max_lora_rank=8,
        log_file=work / "vllm.log",
    )
    return start_serving(spec, [], timeout_seconds=300)


def gain(after: list[float], before: list[float]) -> str:
    interval = paired_interval(after, before, confidence=0.95)
    return f"{interval.mean_delta:+.3f} [{interval.low:+.3f}, {interval.high:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=30, help="step budget of every method")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from pipeline.demo_world.base_model import build_base_model

    base = str(build_base_model(ROOT / ".overnight" / "test-cache" / "base-model"))
    if args.child:
        method, night, out, *rest = args.child
        if method == "fit-rm":
            print(json.dumps(fit_one(base, Path(night), Path(out))))
        else:
            print(json.dumps(train_one(method, base, Path(night), Path(out), args.steps, *rest)))
        return
    generator = InProcessGenerator(base, batch_size=64)
    work = Path(tempfile.mkdtemp(prefix="overnight-methods-"))
    night_file = work / "night.jsonl"
    night, feedback = rated_night(generator)
    night_file.write_text("".join(json.dumps(p.as_json()) + "\n" for p in night))
    ups = sum(1 for f in feedback if f["thumb"] == 1)
    print(
        f"night: {len(night)} replies, {ups} thumbs up, {len(night) - ups} down; "
        f"held out: {len(HELDOUT)} questions x {SAMPLED_PER_QUESTION} sampled replies"
    )
    fitted = child(["fit-rm", str(night_file), str(work / "reward-model")], args.steps)
    print(f"reward model vs the night's users (held out): {json.dumps(fitted)}")
    if fitted is None or fitted["adapter"] is None:
        raise SystemExit("no reward model: the methods that rank by it cannot run")
    server = start_judge_server(base, work)
    try:
        url = server.base_url
        print("LLM judge vs the night's users: " + json.dumps(calibration(url, night, feedback)))
        before = measure(generator, None)
        base_rate = sum(before["liked"]) / len(before["liked"])
        print(
            f"base: thumbs up {base_rate:.3f}, "
            + ", ".join(f"{k} {v:.3f}" for k, v in before.items() if k != "liked")
        )
        rows = []
        for method in args.methods.split(","):
            out = work / method
            result = child([method, str(night_file), str(out), url, fitted["adapter"]], args.steps)
            if result is None:
                continue
            if result.get("adapter"):
                result["after"] = measure(generator, Path(result["adapter"]))
            rows.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "after"}))
    finally:
        server.stop()
    print()
    suites = [suite.name for suite in skills.demo_suites()]
    header = ["method", "wall s", "peak MiB", "steps", "thumbs up (gain, 95% interval)"]
    header += [s.removeprefix("demo-") for s in suites]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    base_row = ["base", "", "", "", f"{base_rate:.3f}"]
    print("| " + " | ".join(base_row + [f"{before[s]:.3f}" for s in suites]) + " |")
    for row in rows:
        after = row.get("after")
        if after is None:
            print(f"| {row['method']} | {row.get('error') or row.get('stop_reason')} |")
            continue
        rate = sum(after["liked"]) / len(after["liked"])
        cells = [
            row["method"],
            f"{row['seconds']:.1f}",
            f"{row['peak_rss_mib']:.0f}",
            str(row["steps"]),
            f"{rate:.3f} ({gain(after['liked'], before['liked'])})",
        ] + [f"{after[s] - before[s]:+.3f}" for s in suites]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
