"""Serving against real vLLM CPU servers on the tiny model, through the real gateway and the `openai` SDK:
deploys as route flips under load, rollback, pinned names, tracks side by side, replicas.

The session's `vllm_server` is endpoint A, fronted by a gateway started here (`GatewayServer`, as
`overnight serve` runs it) on a SQLite store that also holds the routes and the captured traffic. A
second server started here (with an API key) is endpoint B for the replica test, and is stopped for
real in the middle of a deploy. Adapters are seeded random LoRAs (`tests.serving_fixtures`) whose
greedy replies differ, so every "serves version N" assertion can fail.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

import storage
from pipeline.adapters import AdapterVersion, adapter_sha256
from pipeline.config import GatewayConfig
from pipeline.deploy.gateway import Gateway, create_app
from pipeline.deploy.gateway.server import GatewayServer
from pipeline.deploy.hotswap import PROBE_MAX_TOKENS, PROBE_PROMPTS, SwapFailed, deploy, fingerprint
from pipeline.deploy.serving import load_champions, serving_state
from pipeline.deploy.vllm_client import Chat, ServedAdapter, VllmClient
from pipeline.deploy.vllm_process import ServerSpec, VllmServer, free_port
from storage.models import Deployment, Interaction
from storage.routes import read_routes
from tests.gateway_fixtures import wait_until
from tests.serving_fixtures import distinct_adapters

pytestmark = pytest.mark.integration

API_KEY = "serving-test-key"
CLIENTS = 8  # concurrent clients during the deploys, half of them streaming
SWAPS = 20
ROUTE_REFRESH_SECONDS = 0.1  # how often the gateway re-reads the routes (production default: 0.5)
FLIP_VISIBLE_SECONDS = 2.0  # a flip must reach the gateway within this, even on 2 loaded cores
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


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The store the gateway in front of A reads its routes from and logs its traffic into."""
    engine = storage.make_engine(f"sqlite:///{tmp_path_factory.mktemp('store') / 'overnight.db'}")
    storage.upgrade(engine)
    yield engine
    engine.dispose()


@dataclass
class Front:
    """The gateway in front of endpoint A, as `overnight serve` runs it."""

    server: GatewayServer
    gateway: Gateway

    @property
    def base_url(self) -> str:
        return f"{self.server.base_url}/v1"

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key="EMPTY", max_retries=0, timeout=60)

    def settle(self) -> None:
        """Wait until the gateway has re-read the routes (a flip is visible within this)."""
        time.sleep(3 * ROUTE_REFRESH_SECONDS)

    def sees(self, track: str, adapter: str, *, within: float = FLIP_VISIBLE_SECONDS) -> float:
        """Seconds until the gateway's route table sends `track` to `adapter`; fails past `within`."""
        start = time.perf_counter()

        def routed() -> bool:
            route = self.gateway.routes.routes.get(track)
            return route is not None and route.adapter_name == adapter

        wait_until(routed, timeout=within, what=f"the gateway to route {track} to {adapter}")
        return time.perf_counter() - start


@pytest.fixture(scope="module")
def front(endpoint_a: str, store: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    settings = GatewayConfig(
        port=free_port(),
        spool_dir=str(tmp_path_factory.mktemp("spool")),
        route_refresh_seconds=ROUTE_REFRESH_SECONDS,
        flush_seconds=0.05,
    )
    app = create_app(
        store, endpoints=[endpoint_a], base_name="tiny", tracks=("support", "math"), settings=settings
    )
    with GatewayServer(app, settings.host, settings.port) as server:
        yield Front(server, app.state.gateway)


def as_messages(chat: Chat) -> Any:
    """A `Chat` as the SDK's message params (the same dicts; the SDK types them as TypedDicts)."""
    return list(chat)


def gateway_replies(front: Front, model: str, prompts: list[Chat]) -> list[tuple[str, str]]:
    """(reply, model that answered) of greedy chats through the gateway."""
    client = front.openai()
    out = []
    for chat in prompts:
        completion = client.chat.completions.create(
            model=model,
            messages=as_messages(chat),
            max_tokens=PROBE_MAX_TOKENS,
            temperature=0.0,
        )
        out.append((completion.choices[0].message.content or "", completion.model))
    return out


def gateway_fingerprint(front: Front, model: str) -> tuple[str, set[str]]:
    """The greedy probe fingerprint of `model` through the gateway, and the names that answered."""
    replies = gateway_replies(front, model, list(PROBE_PROMPTS))
    return fingerprint([reply for reply, _ in replies]), {name for _, name in replies}


def records(engine: Engine, ids: set[str]) -> dict[str, Interaction]:
    with Session(engine, expire_on_commit=False) as session:
        rows = list(session.scalars(select(Interaction).where(Interaction.client_id.in_(ids))))
        session.expunge_all()
    return {row.client_id: row for row in rows if row.client_id is not None}


def probe_fingerprint(base_url: str, model: str, api_key: str | None = None) -> str:
    with VllmClient(base_url, api_key=api_key) as client:
        return fingerprint([client.chat(model, chat, max_tokens=PROBE_MAX_TOKENS) for chat in PROBE_PROMPTS])


def replies(base_url: str, model: str, prompts: list[Chat], api_key: str | None = None) -> list[str]:
    with VllmClient(base_url, api_key=api_key) as client:
        return [client.chat(model, chat, max_tokens=PROBE_MAX_TOKENS) for chat in prompts]


def loaded(base_url: str, api_key: str | None = None) -> dict[str, ServedAdapter]:
    with VllmClient(base_url, api_key=api_key) as client:
        return client.adapters()


# --------------------------------------------------------------------------- load through the gateway


@dataclass
class LoadReport:
    ok: int = 0
    streamed: int = 0
    failures: list[str] = field(default_factory=list)
    answered_by: dict[str, str] = field(default_factory=dict)  # interaction id -> model that answered


async def _one_request(
    client: openai.AsyncOpenAI, model: str, prompt: str, stream: bool, report: LoadReport
) -> None:
    messages: Any = [{"role": "user", "content": prompt}]
    try:
        if stream:
            chunks = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=8, stream=True
            )
            seen = [chunk async for chunk in chunks]
            if not seen or (seen[-1].choices and seen[-1].choices[0].finish_reason is None):
                report.failures.append(f"stream ended without a finish reason: {seen[-1:]}")
                return
            ids, models = {chunk.id for chunk in seen}, {chunk.model for chunk in seen}
            if len(ids) != 1 or len(models) != 1:
                report.failures.append(f"one stream, several ids or models: {ids} {models}")
                return
            report.answered_by[ids.pop()] = models.pop()
            report.streamed += 1
        else:
            completion = await client.chat.completions.create(model=model, messages=messages, max_tokens=8)
            if not completion.choices:
                report.failures.append(f"no choices: {completion}")
                return
            report.answered_by[completion.id] = completion.model
    except openai.OpenAIError as error:
        report.failures.append(f"{type(error).__name__}: {error}")
        return
    report.ok += 1


async def _client_loop(
    base_url: str, model: str, index: int, stop: threading.Event, report: LoadReport
) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=60) as client:
        n = index
        while not stop.is_set():
            await _one_request(client, model, LOAD_PROMPTS[n % len(LOAD_PROMPTS)], index % 2 == 0, report)
            n += 1


def run_load(base_url: str, model: str, stop: threading.Event, report: LoadReport) -> threading.Thread:
    async def main() -> None:
        await asyncio.gather(*(_client_loop(base_url, model, i, stop, report) for i in range(CLIENTS)))

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    return thread


def test_deploys_under_load_flip_the_route_and_fail_no_request(
    endpoint_a: str, adapters: dict[str, AdapterVersion], store: Engine, front: Front
) -> None:
    v1, v2 = adapters["support@v1"], adapters["support@v2"]
    first = deploy(v1, [endpoint_a], engine=store, in_flight=front.gateway.in_flight)
    with VllmClient(endpoint_a) as client:
        client.load_adapter(v2.pinned_name, str(v2.path))
    expected = {1: first.fingerprint, 2: probe_fingerprint(endpoint_a, v2.pinned_name)}
    assert expected[1] != expected[2]
    front.settle()
    assert gateway_fingerprint(front, "support") == (expected[1], {"support@v1"})

    stop, report = threading.Event(), LoadReport()
    thread = run_load(front.base_url, "support", stop, report)
    probes: dict[str, str] = {}  # interaction id of a probe -> the version it must have been served by
    try:
        time.sleep(1.0)  # every client has requests in flight before the first deploy
        swap_seconds, lags = [], []
        for i in range(SWAPS):
            target = v2 if i % 2 == 0 else v1
            result = deploy(target, [endpoint_a], engine=store, in_flight=front.gateway.in_flight)
            swap_seconds.append(result.seconds)
            assert result.fingerprint == expected[target.version]
            # Once the gateway has seen the flip, the stable name is answered by the new version.
            lags.append(front.sees("support", target.pinned_name))
            completion = front.openai().chat.completions.create(
                model="support",
                messages=as_messages(PROBE_PROMPTS[1]),
                max_tokens=16,
                temperature=0.0,
            )
            assert completion.model == target.pinned_name, f"deploy {i + 1}"
            probes[completion.id] = target.pinned_name
            assert gateway_fingerprint(front, "support") == (expected[target.version], {target.pinned_name})
    finally:
        stop.set()
        thread.join(timeout=60)
    assert report.failures == []
    assert report.ok >= 100 and report.streamed >= 40, report
    # Every request, streamed or not, was logged with the version that answered it, exactly once.
    wanted = {**report.answered_by, **probes}

    def all_logged() -> dict[str, Interaction] | None:
        found = records(store, set(wanted))
        return found if len(found) == len(wanted) else None

    logged = wait_until(all_logged, timeout=30, what="every request logged")
    assert {iid: row.model for iid, row in logged.items()} == wanted
    assert {row.track for row in logged.values()} == {"support"}
    assert {row.metadata_["gateway"]["version"] for row in logged.values()} == {"1", "2"}
    assert set(wanted.values()) == {"support@v1", "support@v2"}
    route = read_routes(store)["support"]
    assert (route.adapter_name, route.previous_version) == ("support@v1", "2")
    with Session(store) as session:
        statuses = list(session.scalars(select(Deployment.status)))
    assert statuses == ["ok"] * (SWAPS + 1)
    print(
        f"\n{report.ok} requests through the gateway ({report.streamed} streamed), 0 failed; "
        f"deploy p50 {sorted(swap_seconds)[SWAPS // 2]:.3f}s; flip seen by the gateway after at most "
        f"{max(lags):.3f}s"
    )


def test_rollback_flips_back_and_pinned_names_still_pin(
    endpoint_a: str, adapters: dict[str, AdapterVersion], store: Engine, front: Front
) -> None:
    v1, v2 = adapters["support@v1"], adapters["support@v2"]
    prompts = [[{"role": "user", "content": text}] for text in LOAD_PROMPTS]
    deploy(v1, [endpoint_a], engine=store)
    deploy(v2, [endpoint_a], engine=store)
    front.settle()
    v1_replies = gateway_replies(front, "support@v1", prompts)
    v2_replies = gateway_replies(front, "support@v2", prompts)
    assert {name for _, name in v1_replies} == {"support@v1"}
    assert [r for r, _ in v1_replies] != [r for r, _ in v2_replies]
    assert gateway_replies(front, "support", prompts) == v2_replies

    rollback = deploy(v1, [endpoint_a], engine=store, action="rollback")
    assert rollback.previous == {endpoint_a: 2}
    front.settle()
    assert gateway_replies(front, "support", prompts) == v1_replies
    assert gateway_replies(front, "support@v2", prompts) == v2_replies  # still loaded, still pinned
    route = read_routes(store)["support"]
    assert (route.adapter_name, route.previous_version) == ("support@v1", "2")
    # The base model's name passes through; an unknown name is the OpenAI 404.
    assert {name for _, name in gateway_replies(front, "tiny", prompts[:1])} == {"tiny"}
    with pytest.raises(openai.NotFoundError):
        gateway_replies(front, "support@v9", prompts[:1])


def test_tracks_served_at_once_answer_with_their_own_adapter(
    endpoint_a: str, adapters: dict[str, AdapterVersion], store: Engine, front: Front
) -> None:
    from pipeline.deploy.serving import seed_routes

    support, math = adapters["support@v2"], adapters["math@v1"]
    with VllmClient(endpoint_a) as client:
        load_champions(client, [support, math])
    routes = seed_routes(store, [support, math])
    front.settle()
    prompts = [[{"role": "user", "content": text}] for text in LOAD_PROMPTS]
    support_out = gateway_replies(front, "support", prompts)
    math_out = gateway_replies(front, "math", prompts)
    assert support_out == gateway_replies(front, "support@v2", prompts)
    assert math_out == gateway_replies(front, "math@v1", prompts)
    assert [r for r, _ in support_out] != [r for r, _ in math_out]
    assert replies(endpoint_a, "support@v2", prompts) == [r for r, _ in support_out]  # what vLLM says
    (state,) = serving_state([endpoint_a], routes, ["support", "math", "absent"])
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


# --------------------------------------------------------------------------- replicas


class StopBeforeLoad:
    """A real client for endpoint B whose server is stopped just before the new version loads there."""

    def __init__(self, server: VllmServer, api_key: str, name: str) -> None:
        self.server = server
        self.name = name
        self.client = VllmClient(server.base_url, api_key=api_key, timeout_seconds=10.0)
        self.base_url = self.client.base_url

    def adapters(self) -> Mapping[str, ServedAdapter]:
        return self.client.adapters()

    def load_adapter(self, name: str, path: str) -> None:
        if name == self.name:
            self.server.stop()  # the endpoint really goes down, mid-deploy
        self.client.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.client.unload_adapter(name)

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


def test_replicas_rollback_and_endpoint_down_mid_deploy(
    endpoint_a: str, server_b: VllmServer, adapters: dict[str, AdapterVersion], sql: Engine
) -> None:
    v1, v2 = adapters["support@v1"], adapters["support@v2"]
    both = [endpoint_a, server_b.base_url]
    prompts = [[{"role": "user", "content": text}] for text in LOAD_PROMPTS]

    deploy(v1, both, engine=sql, api_key=API_KEY)
    v1_outputs = replies(server_b.base_url, "support@v1", prompts, API_KEY)
    result = deploy(v2, both, engine=sql, api_key=API_KEY)
    assert result.previous == {endpoint_a: 1, server_b.base_url: 1}
    states = serving_state(both, read_routes(sql), ["support"], API_KEY)
    assert [state.serving for state in states] == [{"support": 2}, {"support": 2}]
    assert probe_fingerprint(server_b.base_url, "support@v2", API_KEY) == result.fingerprint
    assert replies(server_b.base_url, "support@v2", prompts, API_KEY) != v1_outputs

    rollback = deploy(v1, both, engine=sql, api_key=API_KEY, action="rollback")
    assert rollback.previous == {endpoint_a: 2, server_b.base_url: 2}
    assert read_routes(sql)["support"].adapter_name == "support@v1"
    assert replies(endpoint_a, "support@v1", prompts) == v1_outputs

    # Unload v2 so the next deploy loads it again, and B goes down right then.
    for url in both:
        with VllmClient(url, api_key=API_KEY) as client:
            client.unload_adapter(v2.pinned_name)

    def factory(url: str) -> Any:
        return (
            StopBeforeLoad(server_b, API_KEY, v2.pinned_name)
            if url == server_b.base_url
            else VllmClient(url, api_key=API_KEY)
        )

    with pytest.raises(SwapFailed) as caught:
        deploy(v2, both, engine=sql, api_key=API_KEY, client_factory=factory)
    assert caught.value.endpoint == server_b.base_url and caught.value.step == "load"
    assert str(caught.value).startswith(f"{server_b.base_url}: load: ")
    # The route never moved; A, which had loaded v2, unloaded it again.
    assert read_routes(sql)["support"].adapter_name == "support@v1"
    assert v2.pinned_name not in loaded(endpoint_a)
    (state_a, state_b) = serving_state(both, read_routes(sql), ["support"], API_KEY)
    assert state_a.serving == {"support": 1} and not state_b.reachable
    with Session(sql) as session:
        last = list(session.scalars(select(Deployment).order_by(Deployment.id.desc()).limit(2)))
    assert {(row.endpoint, row.status, row.detail["step"]) for row in last} == {
        (endpoint_a, "failed", "load"),
        (server_b.base_url, "failed", "load"),
    }
    withdrawn = {row.endpoint: row.detail["withdrawn"] for row in last}
    assert withdrawn[endpoint_a] is True  # A unloaded the v2 it had loaded
