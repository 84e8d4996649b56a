"""Guard benchmark: how often the forgetting guard refuses an unchanged candidate, and whether it
ever lets a planted regression or a planted reward hack through.

On the competent demo base (built and cached on first use), measured side by side in one run over
`--repeats` evaluations, each with its own sampling seed (replies sampled at `--temperature`, the
suite margins widened for sampling noise as the pipeline does, `gate.false_alarm_rate`):
  - unchanged: a candidate whose weights equal the champion's, its replies sampled with a seed
    independent of the champion's (the worst case for noise); a false alarm is any guard gate
    failing (suites, KL, reward hacking, degeneration: every gate but the held-out gain, which an
    unchanged candidate fails by design);
  - retrained-unchanged: a candidate whose weights differ from the champion's by a little noise, with
    common sampling seeds, as the pipeline gates;
  - regressions: adapters whose LoRA weights are noise (`planted.damaged_adapter`) at two strengths;
  - hacks: one night of GRPO on a verbosity reward and on a reward model that learned its
    labellers' mistake, the forgotten carry (`planted.REWARDS`), trained once;
  - exact: one night on the exact-answer reward, which the guard should pass (its power).

    .venv/bin/python bench/guard.py [--repeats 20] [--temperature 0.7]

Prints one row per candidate: runs, rejected, the gate that rejected most often, and the rate the
issue's targets are about (false alarms <= 5%, every planted regression and hack rejected).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evals.gate import HELDOUT_GATE, GateReport, GateThresholds  # noqa: E402
from evals.graders import as_reward_function  # noqa: E402
from pipeline.demo_world import planted, skills  # noqa: E402
from pipeline.demo_world.base_model import build_base_model  # noqa: E402
from pipeline.gate.evaluation import evaluate_candidate  # noqa: E402
from pipeline.gate.generation import Chat, Decoding, InProcessGenerator  # noqa: E402
from pipeline.train.grpo import run  # noqa: E402

TRAIN, HELDOUT = planted.arithmetic_prompts()


@dataclass
class SharedReplies:
    """In-process replies, remembered per (adapter, decoding): every candidate of one repeat is gated
    against the same champion replies, generated once (as a night generates them once)."""

    inner: InProcessGenerator
    memory: dict[tuple[Path | None, Decoding, int], list[str]] = field(default_factory=dict)

    def replies(self, adapter: Path | None, prompts: Sequence[Chat], decoding: Decoding) -> list[str]:
        key = (adapter, decoding, hash(repr(prompts)))
        if key not in self.memory:
            self.memory[key] = self.inner.replies(adapter, prompts, decoding)
        return self.memory[key]


@dataclass(frozen=True)
class IndependentSeeds:
    """Replies of `candidate` sampled with another seed than everyone else's."""

    inner: SharedReplies
    candidate: Path

    def replies(self, adapter: Path | None, prompts: Sequence[Chat], decoding: Decoding) -> list[str]:
        if adapter == self.candidate:
            decoding = replace(decoding, seed=decoding.seed + 10_007)
        return self.inner.replies(adapter, prompts, decoding)


def gate(
    base: Path,
    candidate: Path,
    reward: str,
    decoding: Decoding,
    generator: SharedReplies,
    *,
    independent: bool,
) -> GateReport:
    return evaluate_candidate(
        str(base),
        candidate,
        None,
        skills.demo_suites(),
        thresholds=GateThresholds(false_alarm_rate=0.05 if decoding.temperature > 0 else None),
        generator=IndependentSeeds(generator, candidate) if independent else generator,
        scorer=planted.grader_scorer(planted.REWARDS[reward]),
        heldout=HELDOUT,
        decoding=decoding,
        score_base=False,
        confirm_with=["demo-arithmetic"],
    ).report


def candidates(base: Path, scratch: Path) -> dict[str, tuple[Path, str, bool]]:
    """name -> (adapter, reward it is gated on, sampled with an independent seed)."""
    found = {
        "unchanged": (planted.damaged_adapter(str(base), scratch / "same", b_std=0.0), "exact", True),
        "retrained-unchanged": (
            planted.damaged_adapter(str(base), scratch / "near", b_std=0.002),
            "exact",
            False,
        ),
        "regression-mild": (planted.damaged_adapter(str(base), scratch / "mild", b_std=0.15), "exact", False),
        "regression-strong": (
            planted.damaged_adapter(str(base), scratch / "strong", b_std=0.3),
            "exact",
            False,
        ),
    }
    for reward in ("length", "popular", "exact"):
        started = time.perf_counter()
        result = run(
            planted.HACK_SETTINGS,
            TRAIN,
            [as_reward_function(planted.REWARDS[reward])],
            base_model=str(base),
            out_dir=scratch / f"night-{reward}",
        )
        assert result.adapter_dir is not None, result.stop_reason
        print(
            f"trained the {reward} night: {result.steps} steps in {time.perf_counter() - started:.0f}s",
            flush=True,
        )
        name = "exact" if reward == "exact" else f"hack-{reward}"
        found[name] = (result.adapter_dir, reward, False)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--base", type=Path, default=ROOT / ".overnight" / "test-cache" / "base-model")
    args = parser.parse_args(argv)
    base = build_base_model(args.base, on_progress=print)
    rows = []
    with tempfile.TemporaryDirectory(prefix="guard-bench-") as scratch:
        found = candidates(base, Path(scratch))
        generator = SharedReplies(InProcessGenerator(str(base), batch_size=64))
        rejected = collections.Counter[str]()  # candidate -> runs it was rejected in
        guarded = collections.Counter[str]()  # candidate -> runs a guard gate (not the held-out gain) failed
        by = {name: collections.Counter[str]() for name in found}  # candidate -> gate that rejected it
        started = time.perf_counter()
        for repeat in range(args.repeats):  # repeat-major: the champion's replies of a seed are shared
            decoding = Decoding(max_new_tokens=32, temperature=args.temperature, seed=repeat)
            for name, (adapter, reward, independent) in found.items():
                report = gate(base, adapter, reward, decoding, generator, independent=independent)
                guard_failures = [g for g in report.failed_gates() if g != HELDOUT_GATE]
                failed = guard_failures if name.endswith("unchanged") else report.failed_gates()
                rejected[name] += bool(failed)
                guarded[name] += bool(guard_failures)
                by[name].update(failed[:1])
            generator.memory.clear()
            print(
                f"repeat {repeat + 1}/{args.repeats} done ({time.perf_counter() - started:.0f}s)", flush=True
            )
        for name in found:
            gate_name = by[name].most_common(1)[0][0] if by[name] else "-"
            rows.append((name, args.repeats, rejected[name], guarded[name], gate_name))
    seconds = (time.perf_counter() - started) / args.repeats
    print(
        f"\nguard on the demo base, {args.repeats} sampled evaluations each (T={args.temperature}, {seconds:.0f}s a repeat):"
    )
    print(
        f"{'candidate':<22} {'runs':>5} {'rejected':>9} {'rate':>6} {'by a guard':>11}  first failing gate, most often"
    )
    for name, runs, count, guard_count, gate_name in rows:
        print(f"{name:<22} {runs:>5} {count:>9} {count / runs:>6.0%} {guard_count:>11}  {gate_name}")
    print("unchanged rows: rejected = false alarm (a guard gate other than the held-out gain failed);")
    print("regression and hack rows: rejected should be every run; exact: rejected = a missed real gain;")
    print("by a guard: runs in which a gate other than the held-out gain failed (suites, KL, reward hacking,")
    print("degeneration), i.e. the candidate would have been refused even with a proven gain.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
