"""The release commands' contract without a server: one-line errors, exit 2, nothing moved."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.schedule import nightly_schedule
from pipeline.config import ConfigError

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("OVERNIGHT_"):
            monkeypatch.delenv(name)
    # Nothing listens on port 9 (discard): every serving endpoint is down.
    monkeypatch.setenv("OVERNIGHT_SERVING__ENDPOINTS", '["http://127.0.0.1:9"]')
    assert runner.invoke(app, ["init"]).exit_code == 0
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    return tmp_path


def test_help_lists_the_release_commands() -> None:
    result = runner.invoke(app, ["--help"])
    for command in ("run", "status", "gate", "serve", "deploy", "rollback", "schedule"):
        assert command in result.output


def test_gate_refuses_a_directory_that_is_not_an_adapter(workdir: Path) -> None:
    (workdir / "not-an-adapter").mkdir()
    result = runner.invoke(app, ["gate", "support", "--candidate", "not-an-adapter"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: not-an-adapter: no adapter_config.json (not a PEFT adapter)"
    ]


def test_gate_names_an_unknown_track(workdir: Path) -> None:
    result = runner.invoke(app, ["gate", "nope", "--candidate", "x"])
    assert result.exit_code == 2 and "unknown track 'nope'" in result.output


def test_rollback_without_a_previous_version_moves_nothing(workdir: Path) -> None:
    result = runner.invoke(app, ["rollback", "support"])
    assert result.exit_code == 2
    assert "no `previous` version to roll back to" in result.output


def test_deploy_of_a_version_that_does_not_exist_is_a_one_line_error(workdir: Path) -> None:
    result = runner.invoke(app, ["deploy", "support", "3"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1


def test_status_reports_unreachable_endpoints_and_no_versions(workdir: Path) -> None:
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    import json

    tracks = json.loads(result.stdout)["tracks"]
    assert [t["track"] for t in tracks] == ["support", "math"]
    for entry in tracks:
        assert entry["champion"] is None and entry["last_run"] is None and entry["route"] is None
        assert entry["serving"] == {"http://127.0.0.1:9": "unreachable"}


def test_status_shows_the_gateways_route(workdir: Path) -> None:
    import json

    import storage
    from storage.routes import flip_route

    engine = storage.connect("sqlite:///.overnight/overnight.db")
    flip_route(engine, "support", "1", "support@v1")
    flip_route(engine, "support", "2", "support@v2")
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    route = json.loads(result.stdout)["tracks"][0]["route"]
    assert (route["version"], route["adapter"], route["previous"]) == (2, "support@v2", 1)
    table = runner.invoke(app, ["status"], terminal_width=200)
    assert table.exit_code == 0, table.output
    support, math = [line for line in table.stdout.splitlines() if "support" in line or "math" in line]
    assert "v2" in support and "base" in math


def test_serve_and_gateway_refuse_a_store_that_is_not_migrated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(__import__("os").environ):
        if name.startswith("OVERNIGHT_"):
            monkeypatch.delenv(name)
    for command in ("serve", "gateway"):
        result = runner.invoke(app, [command])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and "db upgrade" in result.output


def test_schedule_checks_cron_and_time_zone() -> None:
    schedule = nightly_schedule("0 2 * * *", "Europe/Paris")
    assert schedule.cron == "0 2 * * *" and schedule.timezone == "Europe/Paris"
    with pytest.raises(ConfigError, match=r"schedule\.cron: '61 2 \* \* \*' is not a valid cron"):
        nightly_schedule("61 2 * * *", "UTC")
    with pytest.raises(ConfigError, match="unknown time zone 'Mars/Olympus'"):
        nightly_schedule("0 2 * * *", "Mars/Olympus")
