"""Serving against real vLLM CPU servers on the tiny model: swaps under load, tracks, replicas, rollback.

The session's `vllm_server` is endpoint A; a second server started here (with an API key) is endpoint
B for the replica tests, and is stopped for real in the middle of a swap. Adapters are seeded random
LoRAs (`tests.serving_fixtures`) whose greedy replies differ, so every "serves version N" assertion
can fail.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

import storage
from pipeline.adapters import AdapterVersion, adapter_sha256
from pipeline.deploy.hotswap import PROBE_PROMPTS, SwapFailed, deploy, fingerprint, serving_versions
from pipeline.deploy.serving import load_champions, serving_state
from pipeline.deploy.vllm_client import Chat, ServedAdapter, VllmClient
from pipeline.deploy.vllm_process import ServerSpec, VllmServer, free_port
from storage.models import Deployment
from tests.serving_fixtures import distinct_adapters

pytestmark = pytest.mark.integration

API_KEY = "serving-test-key"
CLIENTS = 8  # concurrent clients during the swaps, half of them streaming
SWAPS = 20
LOAD_PROMPTS = ("Hi!", "My printer is missing a part.", "What is 3 + 4?", "Thanks, bye.")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterVersion]:
    root = tmp_path_factory.mktemp("adapters")
    support = distinct_adapters(tiny_model_dir, root, "support", [1, 2], seed=1)
    math = distinct_adapters(tiny_model_dir, root, "math", [1], seed=2)
    return {"support@v1": support[0], "support@v2": support[1], "math@v1": math[0]}


@pytest.fixture(scope="module")
def endpoint_a(vllm_server: Any) -> Iterator[str]:
    """The session server, left without this module's adapters afterwards."""
    yield vllm_server.base_url
    with VllmClient(vllm_server.base_url) as client:
        for name in client.adapters():
            client.unload_adapter(name)


@pytest.fixture(scope="module")
def server_b(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, vllm_server: Any
) -> Iterator[VllmServer]:
    log = tmp_path_factory.mktemp("vllm-b") / "server.log"
    spec = ServerSpec(
        model=str(tiny_model_dir),
        served_name="tiny",
        port=free_port(),
        dtype="float32",
        max_model_len=1024,
        log_file=log,
        api_key=API_KEY,
    )
    server = VllmServer(spec)
    try:
        server.start(timeout_seconds=600)
    except Exception:
        print(log.read_text()[-4000:])
        raise
    yield server
    server.stop()


@pytest.fixture
def sql(tmp_path: Path) -> Engine:
    engine = storage.make_engine(f"sqlite:///{tmp_path / 'overnight.db'}")
    storage.upgrade(engine)
    return engine


def probe_fingerprint(base_url: str, model: str, api_key: str | None = None) -> str:
    with VllmClient(base_url, api_key=api_key) as client:
        return fingerprint([client.chat(model, chat, max_tokens=16) for chat in PROBE_PROMPTS])


def replies(base_url: str, model: str, prompts: list[Chat], api_key: str | None = None) -> list[str]:
    with VllmClient(base_url, api_key=api_key) as client:
        return [client.chat(model, chat, max_tokens=16) for chat in prompts]


def loaded(base_url: str, api_key: str | None = None) -> dict[str, ServedAdapter]:
    with VllmClient(base_url, api_key=api_key) as client:
        return client.adapters()


# --------------------------------------------------------------------------- load


@dataclass
class LoadReport:
    ok: int = 0
    streamed: int = 0
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


async def _one_request(
    http: httpx.AsyncClient, model: str, prompt: str, stream: bool, report: LoadReport
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 8,
        "stream": stream,
    }
    start = time.perf_counter()
    try:
        if stream:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    report.failures.append(
                        f"stream HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                    )
                    return
                lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
            if lines[-1:] != ["data: [DONE]"] or any('"error"' in line for line in lines):
                report.failures.append(f"stream ended badly: {lines[-2:]}")
                return
            report.streamed += 1
        else:
            response = await http.post("/v1/chat/completions", json=body)
            if response.status_code != 200 or "choices" not in response.json():
                report.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                return
    except httpx.HTTPError as error:
        report.failures.append(f"{type(error).__name__}: {error}")
        return
    report.ok += 1
    report.latencies.append(time.perf_counter() - start)


async def _client_loop(
    base_url: str, model: str, index: int, stop: threading.Event, report: LoadReport
) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0) as http:
        n = index
        while not stop.is_set():
            await _one_request(http, model, LOAD_PROMPTS[n % len(LOAD_PROMPTS)], index % 2 == 0, report)
            n += 1


def run_load(base_url: str, model: str, stop: threading.Event, report: LoadReport) -> threading.Thread:
    async def main() -> None:
        await asyncio.gather(*(_client_loop(base_url, model, i, stop, report) for i in range(CLIENTS)))

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    return thread


def test_swaps_under_load_fail_no_request(
    endpoint_a: str, adapters: dict[str, AdapterVersion], sql: Engine
) -> None:
    v1, v2 = adapters["support@v1"], adapters["support@v2"]
    first = deploy(v1, [endpoint_a], engine=sql)
    expected = {1: first.fingerprint}
    with VllmClient(endpoint_a) as client:
        client.load_adapter(v2.pinned_name, str(v2.path))
    expected[2] = probe_fingerprint(endpoint_a, v2.pinned_name)
    assert expected[1] != expected[2]

    stop, report = threading.Event(), LoadReport()
    thread = run_load(endpoint_a, "support", stop, report)
    try:
        time.sleep(1.0)  # every client has requests in flight before the first swap
        swap_seconds = []
        for i in range(SWAPS):
            target = v2 if i % 2 == 0 else v1
            result = deploy(target, [endpoint_a], engine=sql)
            swap_seconds.append(result.seconds)
            # A new request after the deploy returned is served by the new version, under load.
            assert probe_fingerprint(endpoint_a, "support") == expected[target.version], f"swap {i + 1}"
            assert result.fingerprint == expected[target.version]
    finally:
        stop.set()
        thread.join(timeout=60)
    assert report.failures == []
    assert report.ok >= 100 and report.streamed >= 40, report
    assert serving_versions([endpoint_a], "support") == {endpoint_a: 1}
    with Session(sql) as session:
        statuses = list(session.scalars(select(Deployment.status)))
    assert statuses == ["ok"] * (SWAPS + 1)
    print(
        f"\n{report.ok} requests ({report.streamed} streamed), 0 failed; swaps p50 {sorted(swap_seconds)[SWAPS // 2]:.3f}s"
    )


def test_tracks_served_at_once_answer_with_their_own_adapter(
    endpoint_a: str, adapters: dict[str, AdapterVersion]
) -> None:
    support, math = adapters["support@v2"], adapters["math@v1"]
    with VllmClient(endpoint_a) as client:
        load_champions(client, [support, math])
    prompts = [[{"role": "user", "content": text}] for text in LOAD_PROMPTS]
    support_out = replies(endpoint_a, "support", prompts)
    math_out = replies(endpoint_a, "math", prompts)
    assert support_out == replies(endpoint_a, "support@v2", prompts)
    assert math_out == replies(endpoint_a, "math@v1", prompts)
    assert support_out != math_out
    assert support_out != replies(endpoint_a, "tiny", prompts) != math_out
    (state,) = serving_state([endpoint_a], ["support", "math", "absent"])
    assert state.reachable and state.serving == {"support": 2, "math": 1, "absent": None}


def test_truncated_adapter_never_reaches_the_server(
    endpoint_a: str, adapters: dict[str, AdapterVersion], sql: Engine, tmp_path: Path
) -> None:
    corrupt = shutil.copytree(adapters["support@v2"].path, tmp_path / "support" / "v3")
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    # Recorded after the damage, so only the safetensors check can catch it.
    version = AdapterVersion("support", 3, corrupt, adapter_sha256(corrupt))
    before = loaded(endpoint_a)
    with pytest.raises(SwapFailed, match=r"checksum: .*truncated safetensors") as caught:
        deploy(version, [endpoint_a], engine=sql)
    assert caught.value.step == "checksum"
    assert loaded(endpoint_a) == before


# --------------------------------------------------------------------------- replicas and rollback


class StopBeforeSwitch:
    """A real client for endpoint B whose server is stopped just before the stable name moves."""

    def __init__(self, server: VllmServer, api_key: str) -> None:
        self.server = server
        self.client = VllmClient(server.base_url, api_key=api_key, timeout_seconds=10.0)
        self.base_url = self.client.base_url

    def adapters(self) -> Mapping[str, ServedAdapter]:
        return self.client.adapters()

    def load_adapter(self, name: str, path: str, *, inplace: bool = False) -> None:
        if name == "support":
            self.server.stop()  # the endpoint really goes down, mid-swap
        self.client.load_adapter(name, path, inplace=inplace)

    def unload_adapter(self, name: str) -> None:
        self.client.unload_adapter(name)

    def reset_prefix_cache_outcome(self) -> str:
        return self.client.reset_prefix_cache_outcome()

    def chat(
        self,
        model: str,
        messages: Chat,
        *,
        max_tokens: int = 48,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> str:
        return self.client.chat(model, messages, max_tokens=max_tokens, temperature=temperature, seed=seed)

    def close(self) -> None:
        self.client.close()


def test_replicas_rollback_and_endpoint_down_mid_swap(
    endpoint_a: str, server_b: VllmServer, adapters: dict[str, AdapterVersion], sql: Engine
) -> None:
    v1, v2 = adapters["support@v1"], adapters["support@v2"]
    both = [endpoint_a, server_b.base_url]
    prompts = [[{"role": "user", "content": text}] for text in LOAD_PROMPTS]

    deploy(v1, both, engine=sql, api_key=API_KEY)
    v1_outputs = replies(server_b.base_url, "support", prompts, API_KEY)
    result = deploy(v2, both, engine=sql, api_key=API_KEY)
    assert result.previous == {endpoint_a: 1, server_b.base_url: 1}
    assert serving_versions(both, "support", api_key=API_KEY) == {endpoint_a: 2, server_b.base_url: 2}
    assert probe_fingerprint(server_b.base_url, "support", API_KEY) == result.fingerprint
    assert replies(server_b.base_url, "support", prompts, API_KEY) != v1_outputs

    rollback = deploy(v1, both, engine=sql, api_key=API_KEY, action="rollback")
    assert rollback.previous == {endpoint_a: 2, server_b.base_url: 2}
    assert replies(server_b.base_url, "support", prompts, API_KEY) == v1_outputs
    assert replies(endpoint_a, "support", prompts) == v1_outputs

    def factory(url: str) -> Any:
        return (
            StopBeforeSwitch(server_b, API_KEY)
            if url == server_b.base_url
            else VllmClient(url, api_key=API_KEY)
        )

    with pytest.raises(SwapFailed) as caught:
        deploy(v2, both, engine=sql, api_key=API_KEY, client_factory=factory)
    assert caught.value.endpoint == server_b.base_url and caught.value.step == "switch"
    assert str(caught.value).startswith(f"{server_b.base_url}: switch: ")
    assert serving_versions([endpoint_a], "support") == {endpoint_a: 1}  # A had switched; it is back
    assert replies(endpoint_a, "support", prompts) == v1_outputs
    (state_a, state_b) = serving_state(both, ["support"], API_KEY)
    assert state_a.serving == {"support": 1} and not state_b.reachable
    with Session(sql) as session:
        last = list(session.scalars(select(Deployment).order_by(Deployment.id.desc()).limit(2)))
    assert {(row.endpoint, row.status, row.detail["step"]) for row in last} == {
        (endpoint_a, "failed", "switch"),
        (server_b.base_url, "failed", "switch"),
    }
    assert json.dumps(last[0].detail)  # the detail is plain JSON
