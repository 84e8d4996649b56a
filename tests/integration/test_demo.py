"""`overnight demo` end to end: its own vLLM server, two nights of traffic, harvest and judge."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.vllm_process import vllm_installed

pytestmark = pytest.mark.integration


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    if not vllm_installed():
        if os.environ.get("OVERNIGHT_REQUIRE_VLLM") == "1":
            pytest.fail("vLLM is not installed (OVERNIGHT_REQUIRE_VLLM=1)")
        pytest.skip("vLLM is not installed")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_demo_runs_two_nights_harvests_and_judges(workdir: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--nights", "2", "--rows", "120", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [night["night"] for night in summary["nights"]] == [1, 2]
    second = summary["nights"][1]
    assert second["ingest"]["accepted"] == 120 and second["ingest"]["quarantined"] > 0
    for track in second["tracks"]:
        assert track["harvest"]["window"]["after_id"] > 0  # night 2 starts where night 1 committed
        assert Path(track["harvest"]["path"]).exists()
        judged = track["judge"]
        assert judged["rows"] == track["harvest"]["rows"] > 0
        assert judged["scored"] + judged["failed"] + judged["skipped"] == judged["rows"]
        assert judged["scored"] > 0 and judged["judge"]["judge_calls"] > 0
    assert (workdir / ".overnight/demo/tiny-model/config.json").exists()
