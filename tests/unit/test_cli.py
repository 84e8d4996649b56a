"""The CLI contract: JSON shapes, exit codes (0 ok, 2 user error with one line), help that explains."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.demo_world.synthetic_traffic import generate_records, write_jsonl

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("OVERNIGHT_"):
            monkeypatch.delenv(name)
    return tmp_path


def invoke(*args: str):
    return runner.invoke(app, list(args))


def ready(workdir: Path) -> Path:
    assert invoke("init").exit_code == 0
    assert invoke("db", "upgrade").exit_code == 0
    traffic = workdir / "traffic.jsonl"
    write_jsonl(traffic, generate_records(300, seed=3), malformed_every=30)
    return traffic


def test_help_explains_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("init", "db", "ingest", "harvest", "demo"):
        assert command in result.output
    assert "Exit codes" in result.output
    assert "quarantine" in invoke("ingest", "--help").output


def test_init_then_refuses_to_overwrite(workdir: Path) -> None:
    assert invoke("init").exit_code == 0
    assert "tracks:" in (workdir / "overnight.yaml").read_text()
    again = invoke("init")
    assert again.exit_code == 2 and "already exists" in again.stderr
    assert invoke("init", "--force").exit_code == 0


def test_db_upgrade_is_idempotent(workdir: Path) -> None:
    first = json.loads(invoke("--json", "db", "upgrade").stdout)
    second = json.loads(invoke("db", "upgrade", "--json").stdout)
    assert first["from"] is None and first["to"] == second["from"] == second["to"]


def test_ingest_reports_counts_as_json(workdir: Path) -> None:
    traffic = ready(workdir)
    result = invoke("ingest", str(traffic), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["accepted"] == 300 and report["duplicates"] == 0 and report["quarantined"] == 10
    assert sum(report["reasons"].values()) == 10
    assert json.loads(invoke("--json", "ingest", str(traffic)).stdout)["duplicates"] == 300


def test_harvest_preview_json_and_out(workdir: Path) -> None:
    traffic = ready(workdir)
    invoke("ingest", str(traffic))
    result = invoke("harvest", "support", "--json", "--out", "support.jsonl")
    assert result.exit_code == 0, result.output
    preview = json.loads(result.stdout)
    assert set(preview) >= {"track", "rows", "dropped", "sha256"}
    assert preview["rows"] == len((workdir / "support.jsonl").read_text().splitlines()) > 0
    assert json.loads(invoke("--json", "harvest", "support").stdout)["sha256"] == preview["sha256"]


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ("--config", "missing.yaml", "ingest", "x.jsonl"), "missing.yaml: config file not found"),
        ("database: {urll: x}", ("ingest", "x.jsonl"), "overnight.yaml: database.urll: unknown key"),
        ("", ("ingest", "nowhere.jsonl"), "nowhere.jsonl: no such file"),
        ("", ("harvest", "support"), "unknown track 'support'"),
        ("", ("ingest", "."), "not a regular file"),
    ],
)
def test_user_errors_exit_2_with_one_line(
    workdir: Path, setup: str | None, args: tuple, message: str
) -> None:
    if setup is not None:
        (workdir / "overnight.yaml").write_text(setup)
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_unmigrated_store_tells_what_to_run(workdir: Path) -> None:
    (workdir / "t.jsonl").write_text("")
    result = invoke("ingest", "t.jsonl")
    assert result.exit_code == 2 and "run `overnight db upgrade`" in result.stderr


def test_environment_overrides_database(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERNIGHT_DATABASE__URL", f"sqlite:///{workdir / 'elsewhere.db'}")
    assert invoke("db", "upgrade").exit_code == 0
    assert (workdir / "elsewhere.db").exists() and not (workdir / ".overnight").exists()


def test_unreachable_database_is_exit_2(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERNIGHT_DATABASE__URL", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    result = invoke("db", "upgrade")
    assert result.exit_code == 2 and "cannot connect to database" in result.stderr


def test_unwritable_out_is_a_user_error(workdir: Path) -> None:
    traffic = ready(workdir)
    invoke("ingest", str(traffic))
    (workdir / "blocked").write_text("a file, not a directory")
    result = invoke("harvest", "support", "--out", "blocked/x.jsonl")
    assert result.exit_code == 2 and "cannot write the snapshot" in result.stderr


def test_demo_prints_what_the_math_track_answers_through_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.demo

    summary = {
        "note": "a note",
        "base_skills": {"demo-arithmetic": 0.36},
        "nights": [],
        "answers": [
            {"track": "support", "served_by": "base", "question": "Hi?", "answer": "Hello."},
            {
                "track": "math",
                "served_by": "math",
                "question": "What is 12 + 30?",
                "answer": "12 + 30 = 42.",
                "asked": 200,
                "right": 91,
                "base_right": 82,
            },
        ],
        "browse": {"mlflow": "mlflow ui", "status": "overnight status", "prefect": "prefect server start"},
    }
    calls = []

    def run_demo(
        nights: int, rows: int, users_per_night: int | None, distill: bool, on_stage: object
    ) -> dict[str, object]:
        calls.append((nights, rows, users_per_night, distill))
        return summary

    monkeypatch.setattr(flows.demo, "run_demo", run_demo)
    result = invoke("demo", "--nights", "1", "--users", "64", "--distill")
    assert result.exit_code == 0, result.output
    assert calls == [(1, 800, 64, True)]
    output = " ".join(result.stdout.split())
    assert "200 unseen sums" in output and "91 right as math, 82 as the base" in output


def test_run_refuses_a_teacher_that_cannot_teach_before_anything_runs(workdir: Path) -> None:
    from pipeline.demo_world.tiny_model import build_tiny_model

    model = build_tiny_model(workdir / "tiny-model")
    (workdir / "overnight.yaml").write_text(
        f"serving: {{base_model: {model}, endpoints: []}}\n"
        "tracks:\n"
        "  - {name: math, train: {method: distill, teacher: {path: ./no-teacher}}}\n"
    )
    assert invoke("db", "upgrade").exit_code == 0
    result = invoke("run")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().count("\n") == 0
    assert "train.teacher.path" in result.stderr and "not a model directory" in result.stderr
    assert not (workdir / "runs").exists()  # no night was opened
