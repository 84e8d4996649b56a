"""The registry through a real `mlflow server` (HTTP, proxied artifacts), as in production.

The server gets its own SQLite backend and artifact directory on a free local port, is started
once for the module and stopped after. Runs, versions, aliases and fetches go through `http://`
only; the test reaches into the server's artifact directory just to tamper with a stored adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from evals.gate import GateThresholds, SuiteScores, decide
from pipeline.adapters import adapter_sha256
from pipeline.demo_world.adapters import make_adapter_dir
from pipeline.deploy.vllm_process import free_port
from pipeline.register.mlflow_run import NightRun, mlflow_client, server_healthy
from pipeline.register.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    AdapterRefused,
    MlflowRegistry,
    RegistryError,
)

pytestmark = pytest.mark.integration

START_TIMEOUT_SECONDS = 120


@dataclass(frozen=True)
class Server:
    url: str
    artifacts: Path  # the server's --artifacts-destination


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    log = (root / "server.log").open("wb")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not server_healthy(url, timeout_seconds=1.0):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield Server(url, root / "artifacts")
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_register_alias_fetch_and_refuse_through_the_server(
    mlflow_server: Server, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    track = f"srv-{uuid.uuid4().hex[:6]}"
    registry = MlflowRegistry(mlflow_server.url, cache_dir=tmp_path / "cache")
    report = decide(
        [SuiteScores("arithmetic", candidate=[1.0, 0.0] * 15, champion=[1.0, 0.0] * 15)],
        heldout_candidate=[0.9] * 20,
        heldout_champion=[0.5] * 20,
        kl_to_base=0.1,
        thresholds=GateThresholds(bootstrap_samples=200),
    )
    versions = []
    for night in (1, 2):
        adapter = make_adapter_dir(tmp_path / f"adapter{night}", seed=night)
        with NightRun(mlflow_server.url, f"overnight-{track}", f"night-{night}") as run:
            run.log_params({"judge": {"api_key": "sk-secret", "model": "judge"}, "night": night})
            run.log_gate(report)
            source = run.log_adapter(adapter)
            assert source.startswith("mlflow-artifacts:/")  # proxied through the server, not a local path
            versions.append(registry.register(track, adapter, run_id=run.run_id, tags={"gate": "passed"}))
        assert registry.version_for(track, CHALLENGER) == versions[-1]
        registry.promote(track, versions[-1])
    assert versions == [1, 2]
    assert (registry.version_for(track, CHAMPION), registry.version_for(track, PREVIOUS)) == (2, 1)
    assert [info.tags["parent_version"] for info in registry.versions(track)] == ["none", "1"]
    params = mlflow_client(mlflow_server.url).get_run(run.run_id).data.params
    assert "sk-secret" not in json.dumps(params) and params["judge.model"] == "judge"

    fetched = registry.fetch(track, CHAMPION)
    assert fetched.version == 2
    assert adapter_sha256(fetched.path) == adapter_sha256(tmp_path / "adapter2")

    registry.rollback_aliases(track, 1)
    assert (registry.version_for(track, CHAMPION), registry.version_for(track, PREVIOUS)) == (1, 2)

    # Tamper with version 1's weights in the server's own artifact store: the fetch must refuse it.
    (stored,) = [
        path
        for path in mlflow_server.artifacts.rglob("adapter_model.safetensors")
        if run.run_id not in str(path)
    ]
    data = bytearray(stored.read_bytes())
    data[-3] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(AdapterRefused, match="refused the registry's copy"):
        registry.fetch(track, CHAMPION)
    assert not (tmp_path / "cache" / track / "v1").exists()
    assert "View run" not in capfd.readouterr().out  # stdout stays free for the CLI's --json


def test_unreachable_server_is_a_one_line_error_at_once(tmp_path: Path) -> None:
    registry = MlflowRegistry(f"http://127.0.0.1:{free_port()}", cache_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(RegistryError, match=r"MLflow server at http://127\.0\.0\.1:\d+ is not reachable"):
        registry.versions("support")
    assert time.monotonic() - started < 10
