"""Tests for pipeline.judge.rubrics: the shipped rubrics load, keys and scales work, bad files fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.judge.rubrics import RUBRICS_DIR, Rubric, load_rubric, shipped_rubrics
from storage.errors import UserError

SHIPPED = ["concision", "correctness", "helpfulness", "safety"]
BODY = "Score how well the response answers.\n\n- 1: useless\n- 10: perfect\n"


def write_rubric(tmp_path: Path, content: str | bytes, name: str = "custom.md") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_shipped_rubrics_are_listed() -> None:
    assert shipped_rubrics() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_rubric_loads(name: str) -> None:
    rubric = load_rubric(name)

    assert rubric.id == name
    assert rubric.key == f"{name}@v{rubric.version}"
    assert (rubric.scale_min, rubric.scale_max) == (1, 10)
    assert rubric.title and rubric.title != name
    assert 10 <= len(rubric.text.splitlines()) <= 25
    assert all(anchor in rubric.text for anchor in ("1-2", "5-6", "9-10"))
    assert load_rubric(str(RUBRICS_DIR / f"{name}.md")) == rubric


def test_correctness_checks_the_reference() -> None:
    assert "reference" in load_rubric("correctness").text.lower()


def test_key_and_normalize() -> None:
    rubric = Rubric("tone", "3", "Tone", 1, 5, "criteria")

    assert rubric.key == "tone@v3"
    assert rubric.normalize(1) == 0.0
    assert rubric.normalize(5) == 1.0
    assert rubric.normalize(3) == 0.5
    assert rubric.normalize(2.5) == pytest.approx(0.375)
    for outside in (0, 5.01, -1, float("nan")):
        with pytest.raises(ValueError, match="outside the scale 1-5"):
            rubric.normalize(outside)


def test_load_rubric_from_a_path(tmp_path: Path) -> None:
    path = write_rubric(
        tmp_path,
        f"---\nid: tone\nversion: '2024-11'\nscale: 0 - 4\n# a comment\n\ntitle: \"Tone of voice\"\n---\n{BODY}",
    )
    rubric = load_rubric(str(path))

    assert rubric == Rubric("tone", "2024-11", "Tone of voice", 0, 4, BODY.strip())
    assert rubric.key == "tone@v2024-11"


def test_title_defaults_to_the_id_and_a_bom_is_ignored(tmp_path: Path) -> None:
    path = write_rubric(tmp_path, f"\ufeff---\nid: plain\nversion: 7\nscale: 1-3\n---\n{BODY}")
    rubric = load_rubric(str(path))
    assert (rubric.title, rubric.version, rubric.key) == ("plain", "7", "plain@v7")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (f"id: x\nversion: 1\nscale: 1-10\n{BODY}", "must start with a '---' front matter block"),
        (f"---\nid: x\nversion: 1\nscale: 1-10\n{BODY}", "front matter is not closed"),
        (f"---\nversion: 1\nscale: 1-10\n---\n{BODY}", "front matter key 'id' is missing"),
        (f"---\nid: x\nscale: 1-10\n---\n{BODY}", "front matter key 'version' is missing"),
        (f"---\nid: x\nversion: 1\n---\n{BODY}", "front matter key 'scale' is missing"),
        (f"---\nid: x\nversion:\nscale: 1-10\n---\n{BODY}", "front matter key 'version' is missing"),
        (f"---\nid: x\nversion: 1\nscale: 1-10\nweight: 2\n---\n{BODY}", "unknown front matter key 'weight'"),
        (f"---\nid: x\nid: y\nversion: 1\nscale: 1-10\n---\n{BODY}", "front matter key 'id' is given twice"),
        (f"---\nid: x\nversion 1\nscale: 1-10\n---\n{BODY}", "is not 'key: value'"),
        (f"---\nid: Bad Id\nversion: 1\nscale: 1-10\n---\n{BODY}", "id 'Bad Id' must be lower-case"),
        (f"---\nid: x\nversion: 1 beta\nscale: 1-10\n---\n{BODY}", "version '1 beta' must be"),
        (f"---\nid: x\nversion: 1\nscale: 10-1\n---\n{BODY}", "scale '10-1' must be 'MIN-MAX'"),
        (f"---\nid: x\nversion: 1\nscale: 5-5\n---\n{BODY}", "scale '5-5' must be 'MIN-MAX'"),
        (f"---\nid: x\nversion: 1\nscale: 1 to 10\n---\n{BODY}", "scale '1 to 10' must be 'MIN-MAX'"),
        (f"---\nid: x\nversion: 1\nscale: ten\n---\n{BODY}", "scale 'ten' must be 'MIN-MAX'"),
        (f"---\nid: x\nversion: 1\nscale: 1.5-10\n---\n{BODY}", "scale '1.5-10' must be 'MIN-MAX'"),
        ("---\nid: x\nversion: 1\nscale: 1-10\n---\n\n  \n", "no criteria text"),
        ("", "must start with a '---' front matter block"),
        (b"---\nid: x\nversion: 1\nscale: 1-10\n---\n\xff\xfe bad bytes", "not UTF-8"),
    ],
)
def test_invalid_rubric_file_fails_in_one_line_naming_it(
    tmp_path: Path, content: str | bytes, problem: str
) -> None:
    path = write_rubric(tmp_path, content)
    with pytest.raises(UserError) as error:
        load_rubric(str(path))
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert problem in message
    assert "\n" not in message


def test_missing_rubric_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.md"
    with pytest.raises(UserError, match="rubric file not found") as error:
        load_rubric(str(path))
    assert str(error.value) == f"{path}: rubric file not found"


def test_directory_is_not_a_rubric(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read rubric file") as error:
        load_rubric(str(tmp_path))
    assert str(error.value).startswith(f"{tmp_path}: ") and "\n" not in str(error.value)


def test_unknown_shipped_id_lists_the_known_ones() -> None:
    with pytest.raises(UserError) as error:
        load_rubric("helpfullness")
    assert str(error.value) == (
        "helpfullness: no such rubric file, and not a shipped rubric "
        "(concision, correctness, helpfulness, safety)"
    )
