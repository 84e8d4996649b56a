"""The demo's embedded config: valid, file-relative, and wired to the suites and rewards it writes."""

from __future__ import annotations

from pathlib import Path

from flows.demo import SUITE_FILES, prepare_home
from pipeline.demo_world import skills


def test_the_demo_home_holds_its_suites_and_a_config_that_names_them(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    (home / "base-model").mkdir(parents=True)
    (home / "stale.txt").write_text("from an earlier run", encoding="utf-8")
    _, config = prepare_home(home, port=8123)
    assert sorted(p.name for p in home.iterdir()) == ["base-model", "overnight.yaml", "suites"]
    assert {p.name for p in (home / "suites").iterdir()} == {Path(f).name for f in SUITE_FILES.values()}
    math = config.track("math")
    assert math.reward.judge == 0.0 and math.reward.graders == [{"type": "arithmetic", "weight": 1.0}]
    assert config.gate_for("math").confirm_with == ["demo-arithmetic"]
    assert all(Path(suite).is_file() for suite in math.suites)  # resolved against the file's directory
    assert config.serving.base_model == str(home / "base-model")
    # The suites written are the world's, case for case.
    from evals.suites import load_suite

    written = load_suite(home / SUITE_FILES["demo-arithmetic"])
    assert [case.id for case in written.cases] == [case.id for case in skills.demo_suites()[0].cases]


def test_the_support_track_learns_from_its_users(tmp_path: Path) -> None:
    _, config = prepare_home(tmp_path / "demo", port=8123)
    support = config.track("support")
    assert support.filter.metadata == {"app": "nimbus-chat"}  # the users' app, as the gateway logs it
    train, gate = config.train_for("support"), config.gate_for("support")
    assert train.method == "sft" and train.on_policy  # the best of its own samples, ranked by the reward
    assert config.reward_model.history_nights > 0  # the users' feedback of the nights before counts too
    assert support.reward.judge == 0.0 and support.reward.reward_model == 1.0
    assert gate.temperature > 0 and gate.samples > 1 and gate.confirm_with == ["demo-concise-support"]
    assert {Path(suite).stem for suite in support.suites} == {
        "demo-support",
        "demo-concise-support",
        "demo-refusals",
    }


def test_with_distill_the_math_track_learns_from_the_demo_teacher(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    _, config = prepare_home(home, port=8123, distill=True)
    math = config.train_for("math")
    assert math.method == "distill" and math.teacher is not None
    assert math.teacher.path == str((home / "teacher-model").resolve())
    assert config.track("math").reward.graders  # the exact answer still scores the gate's held-out replies
    _, plain = prepare_home(home, port=8123)
    assert plain.train_for("math").method == "grpo"
