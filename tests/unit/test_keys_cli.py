"""`overnight keys`: a key shown once and stored hashed, listed without it, revoked by name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

import storage
from flows.cli import app
from storage.keys import find_api_key, key_sha256

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("OVERNIGHT_"):
            monkeypatch.delenv(name)
    assert runner.invoke(app, ["init"]).exit_code == 0
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    return tmp_path


def store() -> Engine:
    return storage.connect("sqlite:///.overnight/overnight.db")


def test_create_prints_the_key_once_and_stores_only_its_hash(workdir: Path) -> None:
    result = runner.invoke(app, ["keys", "create", "web", "--tracks", "support,math", "--json"])
    assert result.exit_code == 0, result.output
    created = json.loads(result.stdout)
    key = created.pop("key")
    assert key.startswith("ovn-")
    assert created["name"] == "web" and created["tracks"] == ["support", "math"]
    assert created["consent_default"] is True and created["store_traffic"] is True
    row = find_api_key(store(), key)
    assert row is not None and row.key_sha256 == key_sha256(key)
    assert key not in (workdir / ".overnight" / "overnight.db").read_bytes().decode("latin-1")
    listed = runner.invoke(app, ["keys", "list", "--json"])
    assert key not in listed.stdout
    assert json.loads(listed.stdout)["keys"] == [{**created, "revoked_at": None}]


def test_create_plain_prints_the_bare_key_on_stdout(workdir: Path) -> None:
    result = runner.invoke(
        app, ["keys", "create", "batch", "--tracks", "*", "--no-consent-default", "--no-store"]
    )
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    row = find_api_key(store(), key)
    assert row is not None and row.tracks == ["*"]
    assert row.consent_default is False and row.store_traffic is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["keys", "create", "x", "--tracks", "nope"], "error: --tracks: unknown track 'nope'"),
        (["keys", "create", "x", "--tracks", " , "], "error: --tracks: give at least one track"),
        (["keys", "revoke", "ghost"], "error: no live api key named 'ghost'"),
    ],
)
def test_mistakes_are_one_line_errors(workdir: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.output


def test_a_second_key_with_the_same_name_is_refused(workdir: Path) -> None:
    assert runner.invoke(app, ["keys", "create", "web"]).exit_code == 0
    again = runner.invoke(app, ["keys", "create", "web"])
    assert again.exit_code == 2 and "already exists" in again.output


def test_revoke_makes_the_key_unknown_and_hides_it_from_the_list(workdir: Path) -> None:
    key = json.loads(runner.invoke(app, ["keys", "create", "web", "--json"]).stdout)["key"]
    result = runner.invoke(app, ["keys", "revoke", "web", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == {"name": "web", "revoked": True}
    assert find_api_key(store(), key) is None
    assert json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)["keys"] == []
    every = json.loads(runner.invoke(app, ["keys", "list", "--revoked", "--json"]).stdout)["keys"]
    assert [entry["name"] for entry in every] == ["web"] and every[0]["revoked_at"]
    table = runner.invoke(app, ["keys", "list", "--revoked"])
    assert table.exit_code == 0 and "web" in table.stdout
