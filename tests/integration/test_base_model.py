"""The competent demo base model: what it knows, and how its build is cached, staged and checked.

The real base (`base_model_dir`, built once per run and cached) must know its skills the way the
demo needs: arithmetic partly (room for RL, but right often enough when sampling that GRPO groups
carry signal), support, JSON and refusals well (so that forgetting is measurable). The build
mechanics are tested on a miniature spec that builds in seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.demo_world.base_model import STAMP_FILE, BaseModelSpec, Recipe, build_base_model, read_stamp

# The first test to ask for the base pays its build (about 7 minutes on 2 cores, more when busy; `.ci/run`
# builds it before pytest starts): longer than the per-test timeout.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(3000)]

MINI = BaseModelSpec(
    hidden_size=64, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=1, intermediate_size=64
)
MINI_RECIPE = Recipe(steps=2, batch_size=4, threads=1, finetune_steps=2)


def test_the_base_knows_its_skills_as_the_demo_needs(base_model_dir: Path) -> None:
    stamp = read_stamp(base_model_dir)
    assert stamp is not None
    skills = stamp["skills"]
    print(
        f"\nbase model skills (held-out suites, greedy): {json.dumps(skills)}; built in {stamp['build_seconds']}s"
    )
    assert 0.2 <= skills["demo-arithmetic"] <= 0.7  # partly: headroom for RL
    assert skills["demo-arithmetic@T1"] >= 0.2  # sampled answers are right often enough to learn from
    for suite in ("demo-support", "demo-concise-support", "demo-json", "demo-refusals"):
        assert skills[suite] >= 0.8, suite  # known well, greedily: forgetting shows
    # Sampled support replies are what the users want only some of the time: their thumbs can teach.
    assert 0.3 <= skills["demo-concise-support@T1"] <= 0.75
    assert 2.5e6 < stamp["parameters"] < 4e6
    config = json.loads((base_model_dir / "config.json").read_text(encoding="utf-8"))
    assert config["head_dim"] == 64  # vLLM's CPU attention kernels need it


def test_digits_are_tokenized_one_by_one(base_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    tokens = tokenizer.tokenize("38 + 45 = 83.")
    assert [token.lstrip("Ġ") for token in tokens if token.lstrip("Ġ").isdigit()] == [
        "3",
        "8",
        "4",
        "5",
        "8",
        "3",
    ]


def test_packed_examples_train_exactly_as_if_each_had_its_own_row() -> None:
    """Packing is only a speed-up: the loss of a packed batch equals that of the padded batch."""
    import torch

    from pipeline.demo_world import skills
    from pipeline.demo_world.base_model import PAD, _encode, _model, _pack, _tokenizer, token_id

    tokenizer = _tokenizer(MINI)
    model = _model(MINI, tokenizer, seed=0).eval()
    stream = skills.pretraining_examples(seed=0)
    encoded = _encode(tokenizer, [next(stream) for _ in range(24)])
    pad = token_id(tokenizer, PAD)
    inputs, positions, mask, labels = _pack(encoded, pad, width=128)
    assert inputs.shape[0] < len(encoded) and inputs.shape[1] <= 128  # several examples a row
    assert int((labels != -100).sum()) == sum(len(ids) - prompt for ids, prompt in encoded)
    width = max(len(ids) for ids, _ in encoded)
    padded = torch.full((len(encoded), width), pad)
    padded_labels = torch.full((len(encoded), width), -100)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, prompt) in enumerate(encoded):
        padded[row, : len(ids)] = torch.tensor(ids)
        padded_labels[row, prompt : len(ids)] = torch.tensor(ids[prompt:])
        attention[row, : len(ids)] = 1
    with torch.no_grad():
        packed_loss = model(
            input_ids=inputs, position_ids=positions, attention_mask=mask, labels=labels, use_cache=False
        ).loss
        padded_loss = model(input_ids=padded, attention_mask=attention, labels=padded_labels).loss
    assert float(packed_loss) == pytest.approx(float(padded_loss), abs=1e-5)


def test_a_second_build_reuses_the_first(tmp_path: Path) -> None:
    target = build_base_model(tmp_path / "base", spec=MINI, recipe=MINI_RECIPE)
    before = (target / STAMP_FILE).stat().st_mtime_ns
    assert build_base_model(tmp_path / "base", spec=MINI, recipe=MINI_RECIPE) == target
    assert (target / STAMP_FILE).stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".base.building-")]


def test_a_corrupt_build_is_detected_by_its_stamp_and_rebuilt(tmp_path: Path) -> None:
    target = build_base_model(tmp_path / "base", spec=MINI, recipe=MINI_RECIPE)
    weights = target / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # a truncated copy, as a full disk leaves it
    build_base_model(tmp_path / "base", spec=MINI, recipe=MINI_RECIPE)
    assert weights.read_bytes() == good  # rebuilt: the same recipe and seed give the same weights


def test_an_interrupted_build_leaves_nothing_a_later_run_would_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.demo_world.base_model as base_model

    def interrupted(*args: object, **kwargs: object) -> float:
        raise KeyboardInterrupt

    monkeypatch.setattr(base_model, "pretrain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_base_model(tmp_path / "base", spec=MINI, recipe=MINI_RECIPE, isolated=False)
    assert list(tmp_path.iterdir()) == []  # no target, no staging directory left behind


def test_the_build_runs_with_pinned_cpu_kernels_and_a_failed_build_says_why(tmp_path: Path) -> None:
    import torch

    target = build_base_model(tmp_path / "base", spec=MINI, recipe=MINI_RECIPE)
    stamp = read_stamp(target)
    assert stamp is not None
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # x86-64 with AVX2 at least
        assert stamp["cpu_capability"] == "AVX2"  # the same kernels, so the same weights, on every machine
    with pytest.raises(RuntimeError, match=r"failed \(exit 1\): .*total_steps"):
        build_base_model(tmp_path / "broken", spec=MINI, recipe=Recipe(steps=0, batch_size=4, threads=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # nothing half-built left behind


def test_a_directory_it_did_not_build_is_never_touched(tmp_path: Path) -> None:
    foreign = tmp_path / "base"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError, match="not a demo base-model build"):
        build_base_model(foreign, spec=MINI, recipe=MINI_RECIPE)
    assert os.listdir(foreign) == ["notes.txt"]


def test_a_planted_regression_of_the_base_is_refused_naming_the_suites(
    base_model_dir: Path, tmp_path: Path
) -> None:
    """A candidate that forgot (LoRA weights of noise, `planted.damaged_adapter`) is refused on the
    very suites that measure the base's skills, each named; measured: every suite fell by 0.2-0.3."""
    from evals.gate import GateThresholds
    from pipeline.demo_world import planted, skills
    from pipeline.gate.evaluation import evaluate_candidate
    from pipeline.gate.generation import Decoding, InProcessGenerator

    damaged = planted.damaged_adapter(str(base_model_dir), tmp_path / "damaged", b_std=0.3)
    _, heldout = planted.arithmetic_prompts(train=0, heldout=40)
    report = evaluate_candidate(
        str(base_model_dir),
        damaged,
        None,
        skills.demo_suites(),
        thresholds=GateThresholds(tolerance=0.05),
        generator=InProcessGenerator(str(base_model_dir), batch_size=64),
        scorer=planted.grader_scorer(planted.REWARDS["exact"]),
        heldout=heldout,
        decoding=Decoding(max_new_tokens=32),
        score_base=False,
        confirm_with=["demo-arithmetic"],
    ).report
    assert not report.passed
    assert {"suite/demo-arithmetic", "suite/demo-support", "suite/demo-json"} <= set(report.failed_gates())
    assert report.reason().startswith("suite/")


def test_the_command_line_builds_as_the_test_script_runs_it(tmp_path: Path) -> None:
    """`python -m pipeline.demo_world.base_model DIR` (how scripts/test.sh builds the cache) starts
    its pinned child by the module's name, not `__main__`."""
    import subprocess
    import sys
    from dataclasses import asdict

    command = [sys.executable, "-m", "pipeline.demo_world.base_model", str(tmp_path / "base")]
    command += ["--spec", json.dumps(asdict(MINI)), "--recipe", json.dumps(asdict(MINI_RECIPE))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pretraining step 2/4" in done.stdout and "fine-tuning step 4/4" in done.stdout
    stamp = read_stamp(tmp_path / "base")
    assert stamp is not None and stamp["recipe"]["steps"] == 2
