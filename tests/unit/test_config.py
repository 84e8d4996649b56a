"""Config: defaults, the starter file, environment overrides and one-line errors naming file and key."""

from pathlib import Path

import pytest

from pipeline.config import (
    ConfigError,
    OvernightConfig,
    TeacherConfig,
    load_config,
    resolve_relative_paths,
    starter_config_text,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "overnight.yaml"
    path.write_text(text)
    return path


def test_every_key_has_a_default() -> None:
    config = OvernightConfig()
    assert config.database.url == "sqlite:///.overnight/overnight.db"
    assert config.tracks == [] and config.train.max_steps > 0


def test_empty_file_is_the_defaults_relative_to_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), environ={})
    assert config == resolve_relative_paths(OvernightConfig(), tmp_path.resolve())
    assert config.home == str(tmp_path.resolve() / ".overnight")


def test_starter_config_is_valid_with_two_tracks(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, starter_config_text()), environ={})
    assert [t.name for t in config.tracks] == ["support", "math"]
    assert config.train_for("math").max_steps == 30
    assert config.train_for("math").learning_rate == config.train.learning_rate


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, "database: {url: 'sqlite:///a.db'}\ntracks: [{name: a}]\n")
    config = load_config(
        path,
        environ={
            "OVERNIGHT_DATABASE__URL": "postgresql+psycopg://u@h/db",
            "OVERNIGHT_TRAIN__MAX_STEPS": "7",
            "OVERNIGHT_TRAIN__LORA__RANK": "4",
            "OVERNIGHT_TRACKS__0__RUBRIC": "safety",
            "OVERNIGHT_JUDGE__API_KEY": "sk-secret",
            "UNRELATED": "1",
        },
    )
    assert config.database.url == "postgresql+psycopg://u@h/db"
    assert config.train.max_steps == 7 and config.train.lora.rank == 4
    assert config.tracks[0].rubric == "safety"
    assert config.judge.api_key is not None and "sk-secret" not in repr(config.judge)


def test_track_overrides_merge_over_sections(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "train: {max_steps: 10, seed: 3}\ntracks: [{name: a, train: {max_steps: 2, lora: {rank: 2}}}]",
    )
    train = load_config(path, environ={}).train_for("a")
    assert (train.max_steps, train.seed, train.lora.rank, train.lora.alpha) == (2, 3, 2, 16)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("database: {urll: x}", "overnight.yaml: database.urll: unknown key"),
        ("trian: {}", "overnight.yaml: trian: unknown key"),
        ("judge: {prompt: tiny}", "overnight.yaml: judge.prompt: Input should be 'full' or 'compact'"),
        ("train: {max_steps: lots}", "overnight.yaml: train.max_steps: Input should be a valid integer"),
        (
            "train: {max_steps: 0}",
            "overnight.yaml: train.max_steps: Input should be greater than or equal to 1",
        ),
        (
            "tracks: [{name: a, train: {max_stepz: 1}}]",
            "overnight.yaml: tracks.0.train.max_stepz: unknown key",
        ),
        ("tracks: [{rubric: x}]", "overnight.yaml: tracks.0.name: required key is missing"),
        ("tracks: [{name: a}, {name: a}]", "names must be unique, repeated: a"),
        ("tracks: [{name: 'Bad Name'}]", "overnight.yaml: tracks.0.name: must be"),
        ("- a\n- b", "overnight.yaml: top level must be a mapping"),
        ("train: {max_steps: [", "overnight.yaml: invalid YAML at line 1"),
        (
            "tracks: [{name: a, harvest: {source: {url: 'sqlite://', query: 'select 1'}}}]",
            "query must use both :since and :until",
        ),
    ],
)
def test_errors_are_one_line_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), environ={})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_bad_environment_override_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.max_step: unknown key \(from OVERNIGHT_TRAIN__MAX_STEP\)"):
        load_config(write(tmp_path, ""), environ={"OVERNIGHT_TRAIN__MAX_STEP": "3"})


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", environ={})


def test_missing_default_file_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(environ={}) == OvernightConfig()


def test_unknown_track_lists_known_ones() -> None:
    config = OvernightConfig.model_validate({"tracks": [{"name": "a"}, {"name": "b"}]})
    with pytest.raises(ConfigError, match=r"unknown track 'c' \(tracks: a, b\)"):
        config.track("c")


def test_relative_paths_in_a_config_file_resolve_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "models" / "local-model").mkdir(parents=True)
    (project / "overnight.yaml").write_text(
        "home: state\n"
        "database: {url: 'sqlite:///state/overnight.db'}\n"
        "mlflow: {tracking_uri: 'sqlite:///state/mlflow.db', artifact_location: artifacts}\n"
        "serving: {base_model: models/local-model}\n"
        "tracks:\n"
        "  - {name: a, suites: [arithmetic, suites/mine.jsonl], rubric: rubrics/mine.md, base_model: Qwen/Qwen2.5-0.5B}\n",
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(
        project / "overnight.yaml", environ={"OVERNIGHT_MLFLOW__ARTIFACT_LOCATION": "from-env"}
    )

    assert config.home == str(project / "state")
    assert config.database.url == f"sqlite:///{project / 'state' / 'overnight.db'}"
    assert config.mlflow.tracking_uri == f"sqlite:///{project / 'state' / 'mlflow.db'}"
    assert (
        config.mlflow.artifact_location == "from-env"
    )  # set in the environment: left to the working directory
    assert config.serving.base_model == str(project / "models" / "local-model")
    track = config.track("a")
    assert track.suites == ["arithmetic", str(project / "suites" / "mine.jsonl")]  # shipped names stay names
    assert track.rubric == str(project / "rubrics" / "mine.md")
    assert track.base_model == "Qwen/Qwen2.5-0.5B"  # a hub id, not a local directory


def test_absolute_paths_and_server_urls_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "overnight.yaml").write_text(
        "home: /var/lib/overnight\n"
        "database: {url: 'postgresql+psycopg://db/overnight'}\n"
        "mlflow: {tracking_uri: 'http://mlflow:5000'}\n",
        encoding="utf-8",
    )

    config = load_config(tmp_path / "overnight.yaml", environ={})

    assert config.home == "/var/lib/overnight"
    assert config.database.url == "postgresql+psycopg://db/overnight"
    assert config.mlflow.tracking_uri == "http://mlflow:5000"


def test_distill_needs_a_teacher_whose_path_resolves_against_the_config_file(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"train\.method distill needs train\.teacher \(a path, or a base_url and model"
    ):
        load_config(write(tmp_path, "train: {method: distill}\n"), environ={})
    path = write(
        tmp_path,
        "train: {teacher: {path: ./teacher}}\n"
        "tracks:\n"
        "  - {name: math, train: {method: distill}}\n"
        "  - {name: other, train: {method: distill, teacher: {path: ./other-teacher}}}\n"
        "  - {name: hub, train: {method: distill, teacher: {path: org/big-model}}}\n",
    )
    config = load_config(path, environ={})
    root = tmp_path.resolve()
    assert config.train_for("math").method == "distill"
    assert config.train_for("math").teacher == TeacherConfig(path=str(root / "teacher"))
    assert config.train_for("other").teacher == TeacherConfig(path=str(root / "other-teacher"))
    assert config.train_for("hub").teacher == TeacherConfig(path="org/big-model")  # a hub id stays one
    assert config.train_for("math").distill_beta == 1.0  # reverse KL: on-policy distillation
