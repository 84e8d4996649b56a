"""The judge stage: rewards blended from judge, feedback and graders; calibration against users."""

from pathlib import Path

import pytest

from pipeline.config import JudgeConfig, RewardConfig, ServingConfig
from pipeline.judge.rubrics import load_rubric
from pipeline.judge.stage import judge_records, judge_settings, read_judged
from tests.fakes.judge import FakeJudge

RUBRIC = load_rubric("helpfulness")


def record(n: int, response: str, feedback: dict | None = None, answer: int | None = None) -> dict:
    return {
        "interaction_id": n,
        "messages": [{"role": "user", "content": f"question {n}"}],
        "response": response,
        "feedback": feedback,
        "metadata": {} if answer is None else {"answer": answer},
    }


def test_rewards_blend_judge_feedback_and_graders(tmp_path: Path) -> None:
    reward = RewardConfig(
        judge=1.0, feedback=1.0, graders=[{"type": "numeric", "weight": 2.0, "name": "answer_ok"}]
    )
    records = [
        record(1, "42", {"thumb": 1}, answer=42),  # judge 0.5, feedback 1, grader 1 -> (0.5+1+2)/4
        record(2, "41", None, answer=42),  # judge 0.5, grader 0 -> 0.5/3
    ]
    judge = FakeJudge(lambda _: 0.5)
    result = judge_records(
        records, rubric=RUBRIC, judge=judge, reward=reward, out=tmp_path / "j.jsonl", batch_size=1
    )
    lines = list(read_judged(tmp_path / "j.jsonl"))
    assert [line["reward"] for line in lines] == pytest.approx([3.5 / 4, 0.5 / 3])
    assert lines[0]["graders"] == {"answer_ok": 1.0} and lines[0]["feedback_score"] == 1.0
    assert lines[0]["interaction_id"] == 1 and lines[0]["judge"]["score"] == 0.5
    assert result.rows == result.scored == 2


def test_failed_judgments_are_counted_never_scored_as_zero(tmp_path: Path) -> None:
    judge = FakeJudge(lambda response: None if "fail" in response else 0.8)
    records = [record(1, "ok"), record(2, "fail"), record(3, "fail", {"rating": 5})]
    reward = RewardConfig(judge=1.0, feedback=0.5)
    result = judge_records(records, rubric=RUBRIC, judge=judge, reward=reward, out=tmp_path / "j.jsonl")
    lines = list(read_judged(tmp_path / "j.jsonl"))
    assert [line["reward"] for line in lines] == [0.8, None, 1.0]  # the third keeps its feedback
    assert (result.failed, result.scored) == (2, 2)
    assert lines[1]["judge"]["status"] == "failed" and lines[1]["judge"]["score"] is None


def test_calibration_shows_a_judge_that_disagrees_with_users(tmp_path: Path) -> None:
    ratings = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    records = [
        record(i, f"answer {r}", {"rating": r, "thumb": 1 if r >= 3 else -1}) for i, r in enumerate(ratings)
    ]
    agreeing = judge_records(
        records, rubric=RUBRIC, judge=FakeJudge(lambda text: int(text[-1]) / 5), reward=RewardConfig(),
        out=tmp_path / "a.jsonl",
    )  # fmt: skip
    gamed = judge_records(
        records, rubric=RUBRIC, judge=FakeJudge(lambda text: 1 - int(text[-1]) / 5), reward=RewardConfig(),
        out=tmp_path / "b.jsonl",
    )  # fmt: skip
    assert agreeing.calibration.spearman_rating > 0.9 and agreeing.calibration.thumb_accuracy == 1.0
    assert gamed.calibration.spearman_rating < -0.9 and gamed.calibration.thumb_accuracy < 0.5
    assert "spearman_rating" in agreeing.as_json()["calibration"]


def test_judge_defaults_to_the_local_server() -> None:
    settings = judge_settings(JudgeConfig(), ServingConfig(endpoints=["http://10.0.0.5:8000"]))
    assert (settings.base_url, settings.model) == ("http://10.0.0.5:8000", "base")


def test_judge_prompt_style_reaches_the_settings(tmp_path: Path) -> None:
    from pipeline.config import load_config

    assert judge_settings(JudgeConfig(), ServingConfig()).prompt == "full"
    path = tmp_path / "overnight.yaml"
    path.write_text("judge: {prompt: compact}")
    config = load_config(path, environ={})
    assert config.judge.prompt == "compact"
    assert judge_settings(config.judge, config.serving).prompt == "compact"


def test_bad_grader_in_config_names_the_key(tmp_path: Path) -> None:
    from pipeline.config import ConfigError, load_config

    path = tmp_path / "overnight.yaml"
    path.write_text("tracks: [{name: a, reward: {graders: [{type: regex, pattern: '(', weight: 1}]}}]")
    with pytest.raises(ConfigError, match=r"overnight.yaml: tracks.0.reward.graders: graders.0: .*regex"):
        load_config(path, environ={})
