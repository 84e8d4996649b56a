"""The teacher check of `train.method: distill`: a teacher that cannot teach the base model is a
one-line config error before anything runs."""

import json
import shutil
from pathlib import Path

import pytest

from pipeline.config import OvernightConfig, TeacherConfig
from pipeline.train.distill import TeacherMismatch, check_teacher, check_teachers


def copy_of(model: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(model, target)
    return target


def test_a_teacher_with_the_base_models_tokenizer_passes(tiny_model_dir: Path, tmp_path: Path) -> None:
    check_teacher(TeacherConfig(path=str(copy_of(tiny_model_dir, tmp_path, "teacher"))), str(tiny_model_dir))


def test_a_missing_teacher_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TeacherMismatch) as caught:
        check_teacher(TeacherConfig(path=str(tmp_path / "nowhere")), str(tiny_model_dir))
    message = str(caught.value)
    assert message.startswith(f"train.teacher.path '{tmp_path / 'nowhere'}': not a model directory")
    assert "\n" not in message


def test_a_teacher_with_another_tokenizer_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    teacher = copy_of(tiny_model_dir, tmp_path, "teacher")
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["<teacher-only>"])
    tokenizer.save_pretrained(teacher)
    with pytest.raises(TeacherMismatch) as caught:
        check_teacher(TeacherConfig(path=str(teacher)), str(tiny_model_dir))
    message = str(caught.value)
    assert "its tokenizer is not the base model's" in message and "'<teacher-only>'" in message
    assert "\n" not in message


def test_a_teacher_with_another_output_size_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    teacher = copy_of(tiny_model_dir, tmp_path, "teacher")
    config = json.loads((teacher / "config.json").read_text())
    config["vocab_size"] += 64
    (teacher / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherMismatch, match=r"its vocabulary has \d+ rows against the base model's \d+"):
        check_teacher(TeacherConfig(path=str(teacher)), str(tiny_model_dir))


def test_only_distilling_tracks_are_checked(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = OvernightConfig.model_validate(
        {
            "serving": {"base_model": str(tiny_model_dir)},
            "tracks": [
                {"name": "plain"},
                {
                    "name": "student",
                    "train": {"method": "distill", "teacher": {"path": str(tmp_path / "gone")}},
                },
            ],
        }
    )
    check_teachers(config, ["plain"])
    with pytest.raises(TeacherMismatch, match="not a model directory"):
        check_teachers(config, ["plain", "student"])
