"""`overnight serve` end to end, as a user runs it: the loop closes through the gateway.

A champion is registered in a local MLflow registry; `overnight keys create` makes a key;
`overnight serve` (its own process) starts vLLM with the champion under its pinned name and the
gateway in front; the `openai` SDK calls the stable name through the gateway and rates the answer;
`overnight harvest` then finds the exchange with its feedback, answered by the champion's version.
Ctrl-C (SIGINT) stops both, and nothing is left listening.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from pipeline.deploy.vllm_process import free_port, vllm_installed
from pipeline.register.registry import MlflowRegistry
from tests.serving_fixtures import make_adapter

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "-c", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_overnight_serve_takes_sdk_traffic_and_feedback_that_the_next_harvest_finds(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    if not vllm_installed():
        pytest.skip("vLLM is not installed (pip install -e '.[cpu]')")
    vllm_port, gateway_port = free_port(), free_port()
    settings: dict[str, Any] = {
        "home": str(tmp_path / "home"),
        "database": {"url": f"sqlite:///{tmp_path / 'overnight.db'}"},
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "artifact_location": str(tmp_path / "mlartifacts"),
        },
        "serving": {
            "base_model": str(tiny_model_dir),
            "base_name": "tiny",
            "port": vllm_port,
            "endpoints": [f"http://127.0.0.1:{vllm_port}"],
            "dtype": "float32",
        },
        "gateway": {"port": gateway_port, "require_keys": True},
        "tracks": [{"name": "support"}],
    }
    config = tmp_path / "overnight.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    assert cli(config, "db", "upgrade").returncode == 0
    registry = MlflowRegistry(
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        cache_dir=tmp_path / "home" / "adapters",
        artifact_location=str(tmp_path / "mlartifacts"),
    )
    version = registry.register(
        "support", make_adapter(tiny_model_dir, tmp_path / "v1", seed=5), run_id=None, tags={}
    )
    registry.promote("support", version)
    created = cli(config, "keys", "create", "web", "--tracks", "support", "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["key"]

    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "-c", str(config), "serve"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{gateway_port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "overnight serve did not become ready"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key=key, max_retries=0)
        answer = client.chat.completions.create(
            model="support",
            messages=[{"role": "user", "content": "My printer is missing a part."}],
            max_tokens=12,
            user="u-1729",
        )
        assert answer.model == f"support@v{version}" and answer.choices[0].message.content
        client.post("/feedback", body={"interaction_id": answer.id, "thumb": -1}, cast_to=object)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="ovn-wrong", max_retries=0
            ).models.list()
        status = cli(config, "status", "--json")
        assert status.returncode == 0, status.stderr
        (track,) = json.loads(status.stdout)["tracks"]
        assert track["route"]["adapter"] == f"support@v{version}"
    finally:
        serve.send_signal(signal.SIGINT)
        code = serve.wait(timeout=120)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert not listening(gateway_port) and not listening(vllm_port)

    preview = tmp_path / "tonight.jsonl"
    harvested = cli(config, "harvest", "support", "--out", str(preview), "--json")
    assert harvested.returncode == 0, harvested.stderr
    (record,) = [json.loads(line) for line in preview.read_text().splitlines()]
    assert record["id"] == answer.id and record["model"] == f"support@v{version}"
    assert record["feedback"] == {"thumb": -1} and record["response"] == answer.choices[0].message.content
    assert record["user"] != "u-1729" and os.path.exists(tmp_path / "home" / "vllm.log")
