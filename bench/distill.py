"""Distillation benchmark: on-policy distillation against GRPO, side by side on the same prompts and
the same student, held-out accuracy against training steps and against CPU-seconds.

The student is the competent demo base (arithmetic partly learned: it forgets carries), the prompts
are 240 sums it never saw in pretraining, the held-out measure is greedy exact accuracy on 200 other
unseen sums. Both methods start from the base with the same LoRA (rank 8 on all linear layers),
learning rate and batch (8 prompts a step, `planted.HACK_SETTINGS`), each in a fresh process:
  - grpo: GRPO on the exact-answer reward (8 samples a prompt, the sparse signal: one number a reply);
  - distill: on-policy distillation from the demo's teacher (the base grown from 4 to 6 layers and
    trained on to full arithmetic competence, `base_model.build_teacher_model`), one sample a prompt, the teacher's whole
    distribution at every sampled token (reverse KL, TRL's `DistillationTrainer`).
  - distill-endpoint: the same teacher served by its own vLLM process (`ServerSpec(enable_lora=False)`)
    and asked over its OpenAI-compatible API (`train.teacher.base_url`): its log-probabilities of each
    sampled token and of its 20 likeliest there, the reverse KL on that support (`top_logprobs`). The student's CPU-seconds
    exclude the server's, as they would be on another machine; the server's are printed apart.
Every `--every` steps the adapter is saved with the process's CPU-seconds so far (user and system,
both cores; the teacher's forward passes included: it runs in-process here, where a deployment would
serve a bigger one elsewhere) and wall seconds; afterwards each checkpoint's held-out accuracy is
measured. Printed: one row per checkpoint, the accuracy each method reached at the end, and the
compute ratio: the CPU-seconds and steps each needed to first reach the best accuracy GRPO reached.
`--plot` writes the two curves (accuracy against steps and against CPU-seconds) as a PNG.

    .venv/bin/python bench/distill.py [--steps 30] [--every 3] [--plot docs/distill-vs-grpo.png]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.arithmetic import ArithmeticGrader  # noqa: E402
from evals.graders import Sample, as_reward_function  # noqa: E402
from pipeline.config import TeacherConfig  # noqa: E402
from pipeline.demo_world import planted  # noqa: E402

METHODS = ("grpo", "distill", "distill-endpoint")
TEACHER_URL_ENV = "BENCH_TEACHER_URL"  # where the parent serves the teacher for distill-endpoint
TRAIN, HELDOUT = planted.arithmetic_prompts(240, 200)
EXACT = ArithmeticGrader()
CACHE = Path(os.environ.get("OVERNIGHT_TEST_CACHE") or ROOT / ".overnight" / "test-cache")


def models() -> tuple[Path, Path]:
    """The demo base and its teacher, built once and cached (the test cache the integration tests share)."""
    from pipeline.demo_world.base_model import build_base_model, build_teacher_model

    base = build_base_model(CACHE / "base-model", on_progress=lambda line: print(f"  base: {line}"))
    teacher = build_teacher_model(
        CACHE / "teacher-model", base, on_progress=lambda line: print(f"  teacher: {line}")
    )
    return base, teacher


def train_one(
    method: str, base: Path, teacher: Path, out_dir: Path, steps: int, every: int
) -> list[dict[str, Any]]:
    """One method's night with checkpoints (run by the parent as a child): [{step, cpu, wall, adapter}]."""
    from transformers import TrainerCallback

    from pipeline.train.recipe import save_adapter
    from pipeline.train.stage import RECIPES

    teachers = {
        "distill": lambda: TeacherConfig(path=str(teacher)),
        "distill-endpoint": lambda: TeacherConfig(base_url=os.environ[TEACHER_URL_ENV], model="teacher"),
    }
    kind = "distill" if method in teachers else method
    settings = planted.HACK_SETTINGS.model_copy(
        update={"method": kind, "max_steps": steps, "max_completion_tokens": 16, "kl_budget": 1e6}
        | ({"teacher": teachers[method]()} if method in teachers else {})
    )
    recipe = RECIPES[kind](
        settings, base_model=str(base), out_dir=out_dir, champion=None, started=time.perf_counter()
    )
    checkpoints: list[dict[str, Any]] = []

    class Checkpoints(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.cpu, self.wall = _cpu_seconds(), time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step % every and state.global_step != steps:
                return
            cpu, wall = _cpu_seconds() - self.cpu, time.perf_counter() - self.wall
            adapter = out_dir / f"step-{state.global_step}"
            save_adapter(recipe.policy(), adapter, str(base))
            checkpoints.append({"step": state.global_step, "cpu": cpu, "wall": wall, "adapter": str(adapter)})
            self.cpu += _cpu_seconds() - self.cpu - cpu  # saving is not training: take it out
            self.wall += time.perf_counter() - self.wall - wall

    try:
        recipe.setup(TRAIN, [as_reward_function(EXACT)], None, None)
        recipe.trainer.add_callback(Checkpoints())
        recipe.train()
        recipe.save()
    finally:
        recipe.cleanup()
    return checkpoints


@contextmanager
def served_teacher(teacher: Path, scratch: Path) -> Iterator[tuple[str, Callable[[], float]]]:
    """The teacher served by vLLM without LoRA: (its URL, the CPU-seconds its process tree has spent)."""
    import psutil

    from pipeline.deploy.vllm_process import ServerSpec, VllmServer, free_port

    spec = ServerSpec(model=str(teacher), served_name="teacher", port=free_port(), dtype="float32",
                      max_model_len=1024, enable_lora=False, log_file=scratch / "teacher-server.log")  # fmt: skip
    server = VllmServer(spec)
    server.start(timeout_seconds=600)
    pid = server.pid
    assert pid is not None

    def cpu_of_server() -> float:
        root = psutil.Process(pid)
        total = 0.0
        for process in [root, *root.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total

    try:
        yield server.base_url, cpu_of_server
    finally:
        server.stop()


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def accuracy(base: Path, adapters: list[str | None]) -> list[float]:
    from pipeline.gate.generation import Decoding, InProcessGenerator

    generator = InProcessGenerator(str(base), batch_size=64)
    scores = []
    for adapter in adapters:
        replies = generator.replies(
            Path(adapter) if adapter else None, [p.messages for p in HELDOUT], Decoding(max_new_tokens=16)
        )
        right = sum(EXACT.score(Sample(p.messages, r)) for p, r in zip(HELDOUT, replies, strict=True))
        scores.append(right / len(HELDOUT))
    return scores


def first_reaching(points: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((point for point in points if point["accuracy"] >= target - 1e-9), None)


def plot(curves: dict[str, list[dict[str, Any]]], base_accuracy: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_step, by_cpu) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for method, points in curves.items():
        steps = [0] + [p["step"] for p in points]
        cpu = [0.0] + [p["cpu"] for p in points]
        acc = [base_accuracy] + [p["accuracy"] for p in points]
        by_step.plot(steps, acc, marker="o", label=method)
        by_cpu.plot(cpu, acc, marker="o", label=method)
    by_step.set_xlabel("training steps (8 prompts each)")
    by_cpu.set_xlabel("CPU-seconds of training (2 cores)")
    by_step.set_ylabel("held-out exact accuracy (200 unseen sums, greedy)")
    for axis in (by_step, by_cpu):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("On-policy distillation vs GRPO on the demo base")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--plot", type=Path, help="write the curves as a PNG here")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "OUT_DIR", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, out_dir, result = args.child
        base, teacher = models()
        points = train_one(method, base, teacher, Path(out_dir), args.steps, args.every)
        Path(result).write_text(json.dumps(points))
        return
    base, teacher = models()
    methods = [m for m in args.methods.split(",") if m]
    curves: dict[str, list[dict[str, Any]]] = {}
    server_cpu: float | None = None
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as scratch:
        for method in methods:
            result = Path(scratch) / f"{method}.json"
            command = [sys.executable, __file__, "--steps", str(args.steps), "--every", str(args.every)]
            command += ["--child", method, str(Path(scratch) / method), str(result)]
            if method == "distill-endpoint":
                with served_teacher(teacher, Path(scratch)) as (url, cpu_of_server):
                    before = cpu_of_server()
                    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, TEACHER_URL_ENV: url})
                    server_cpu = cpu_of_server() - before
            else:
                subprocess.run(command, check=True, cwd=ROOT)
            curves[method] = json.loads(result.read_text())
        base_accuracy, *_ = accuracy(base, [None])
        for points in curves.values():
            for point, value in zip(points, accuracy(base, [p["adapter"] for p in points]), strict=True):
                point["accuracy"] = value
    print(f"\nheld-out exact accuracy of the base: {base_accuracy:.3f} (200 unseen sums, greedy)")
    print("| method | step | CPU-s | wall s | held-out accuracy |")
    print("|---|---|---|---|---|")
    for method, points in curves.items():
        for p in points:
            print(f"| {method} | {p['step']} | {p['cpu']:.1f} | {p['wall']:.1f} | {p['accuracy']:.3f} |")
    if "grpo" in curves:
        target = max(p["accuracy"] for p in curves["grpo"])
        grpo = first_reaching(curves["grpo"], target)
        print(f"\nbest GRPO accuracy: {target:.3f}")
        for name, points in curves.items():
            point = first_reaching(points, target)
            print(
                f"  {name} first reached it at "
                + (f"step {point['step']}, {point['cpu']:.1f} CPU-s" if point else "no checkpoint")
            )
            if grpo and point and name != "grpo":
                print(f"  compute ratio (GRPO / {name}): {grpo['cpu'] / point['cpu']:.1f}x CPU-seconds, "
                      f"{grpo['step'] / point['step']:.1f}x steps")  # fmt: skip
    if server_cpu is not None:
        print(f"the teacher's vLLM server spent {server_cpu:.1f} CPU-s during distill-endpoint's training")
        for name, points in curves.items():
            print(
                f"{name} at the end: {points[-1]['accuracy']:.3f} after {points[-1]['step']} steps, {points[-1]['cpu']:.1f} CPU-s"
            )
    if args.plot:
        plot(curves, base_accuracy, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
