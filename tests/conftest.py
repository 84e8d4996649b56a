"""Shared fixtures: a migrated store on SQLite and on PostgreSQL, and small record factories.

PostgreSQL tests run against OVERNIGHT_TEST_POSTGRES_URL (default: the local server with trust auth)
in a database created for the session. They skip with the reason when no server answers, except
under OVERNIGHT_REQUIRE_POSTGRES=1 (CI), where that is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

import storage
from storage.models import Base

POSTGRES_ADMIN_URL = os.environ.get(
    "OVERNIGHT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as error:
        reason = f"PostgreSQL not reachable at {storage.safe_url(POSTGRES_ADMIN_URL)}: {str(error).splitlines()[0]}"
        if os.environ.get("OVERNIGHT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason} (OVERNIGHT_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)
    name = f"overnight_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def empty_postgres_url(postgres_url: str) -> Iterator[str]:
    """A second, schema-less PostgreSQL database, dropped after the test."""
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"overnight_empty_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield admin.url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def _migrated_postgres(postgres_url: str) -> Iterator[Engine]:
    engine = storage.make_engine(postgres_url)
    storage.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """A migrated, empty store: a new SQLite file, or the session's PostgreSQL database truncated."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'overnight.db'}"
        engine = storage.make_engine(url)
        storage.upgrade(engine)
        engine.dispose()
        return url
    engine: Engine = request.getfixturevalue("_migrated_postgres")
    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    return str(engine.url.render_as_string(hide_password=False))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = storage.connect(database_url)
    yield engine
    engine.dispose()


T0 = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)


def make_record(n: int = 0, **overrides: Any) -> dict[str, Any]:
    """A valid interaction record; `n` varies its content so records differ."""
    record: dict[str, Any] = {
        "id": f"req-{n}",
        "ts": (T0 + timedelta(minutes=n)).isoformat(),
        "track": "support",
        "user_id": f"user-{n % 7}",
        "session_id": f"s-{n}",
        "messages": [
            {"role": "system", "content": "You are a helpful support agent."},
            {"role": "user", "content": f"Question number {n}: how do I reset my password?"},
        ],
        "response": f"Answer {n}: open Settings, then Security, then Reset password.",
        "model": "support",
        "feedback": {"thumb": 1, "rating": 5},
        "metadata": {"client": "web"},
        "consent": True,
    }
    record.update(overrides)
    return record


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.demo_world.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The competent demo base model (`pipeline.demo_world.base_model`): built once (about 10 minutes on
    2 cores) and cached under `.overnight/test-cache/` (or OVERNIGHT_TEST_CACHE) across runs; its stamp
    makes a changed recipe or a corrupt file rebuild it."""
    from pipeline.demo_world.base_model import build_base_model

    return build_base_model(model_cache() / "base-model", on_progress=print)


@pytest.fixture(scope="session")
def teacher_model_dir(base_model_dir: Path) -> Path:
    """The demo's teacher (`base_model.build_teacher_model`: the base grown to 6 layers and trained on
    to full arithmetic competence, about 2 minutes on 2 cores), cached next to the base it continues."""
    from pipeline.demo_world.base_model import build_teacher_model

    return build_teacher_model(model_cache() / "teacher-model", base_model_dir, on_progress=print)


def model_cache() -> Path:
    """Where built models are cached across test runs: OVERNIGHT_TEST_CACHE or `.overnight/test-cache/`."""
    return Path(
        os.environ.get("OVERNIGHT_TEST_CACHE") or Path(__file__).parents[1] / ".overnight" / "test-cache"
    )


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real vLLM CPU server on the tiny model, started once per session (about a minute).

    Skips with the reason when vLLM is not installed, except under OVERNIGHT_REQUIRE_VLLM=1 (CI).
    """
    yield from serve_vllm(
        tmp_path_factory, "vllm", model=str(tiny_model_dir), served_name="tiny", max_model_len=4096
    )


def serve_vllm(tmp_path_factory: pytest.TempPathFactory, name: str, **spec: Any) -> Iterator[Any]:
    """A real vLLM CPU server on `ServerSpec(**spec)` (float32, a free port, its log in a temporary
    directory `name`) for a fixture to yield, stopped after; skips without vLLM unless
    OVERNIGHT_REQUIRE_VLLM=1 (CI), and prints the log's tail when it does not start."""
    from pipeline.deploy.vllm_process import ServerSpec, VllmServer, free_port, vllm_installed

    if not vllm_installed():
        reason = "vLLM is not installed (pip install -e '.[cpu]')"
        if os.environ.get("OVERNIGHT_REQUIRE_VLLM") == "1":
            pytest.fail(f"{reason} (OVERNIGHT_REQUIRE_VLLM=1)")
        pytest.skip(reason)
    log = tmp_path_factory.mktemp(name) / "server.log"
    server = VllmServer(ServerSpec(**{"port": free_port(), "dtype": "float32", "log_file": log, **spec}))
    try:
        server.start(timeout_seconds=600)
    except Exception:
        print(log.read_text()[-4000:])
        raise
    yield server
    server.stop()
