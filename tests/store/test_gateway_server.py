"""`GatewayServer`, as `overnight serve`, `overnight gateway` and the demo run the gateway: up before
it returns, a taken port a one-line error, stopped with its log flushed, and `serve` stops vLLM
when the gateway cannot start."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine

import storage
from pipeline.config import GatewayConfig
from pipeline.deploy.gateway import create_app
from pipeline.deploy.gateway.server import GatewayServer, check_port_free
from pipeline.deploy.vllm_process import free_port
from storage.routes import flip_route
from tests.fakes.openai_upstream import FakeUpstream
from tests.gateway_fixtures import stored

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Engine]:
    engine = storage.make_engine(f"sqlite:///{tmp_path / 'overnight.db'}")
    storage.upgrade(engine)
    flip_route(engine, "support", "3", "support@v3")
    yield engine
    engine.dispose()


def test_a_taken_port_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(storage.UserError) as caught:
            check_port_free("127.0.0.1", port)
    assert str(caught.value) == f"gateway.port: cannot listen on 127.0.0.1:{port}: already in use"


def test_the_gateway_serves_until_stopped_and_flushes_its_log(store: Engine, tmp_path: Path) -> None:
    settings = GatewayConfig(port=free_port(), spool_dir=str(tmp_path / "spool"), flush_seconds=30)
    with FakeUpstream("a") as upstream:
        app = create_app(
            store, endpoints=[upstream.base_url], base_name="base", tracks=["support"], settings=settings
        )
        gateway = GatewayServer(app, settings.host, settings.port).start()
        try:
            assert gateway.running()
            with httpx.Client(base_url=gateway.base_url, timeout=10) as http:
                assert http.get("/ready").status_code == 200
                reply = http.post(
                    "/v1/chat/completions",
                    json={"model": "support", "messages": [{"role": "user", "content": "hi"}]},
                )
            assert reply.status_code == 200 and reply.json()["model"] == "support@v3"
            # A second gateway on the same port fails at once, in one line.
            with pytest.raises(
                storage.UserError, match=r"^gateway\.port: cannot listen on .*already in use$"
            ):
                GatewayServer(app, settings.host, settings.port).start()
        finally:
            gateway.stop()
    assert not gateway.running()
    # The writer waits up to 30 s to batch; stopping flushed the exchange into the store.
    assert [(row.track, row.model) for row in stored(store)] == [("support", "support@v3")]


def test_serve_fails_before_starting_vllm_when_the_gateway_port_is_taken(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.deploy import serving
    from pipeline.deploy.vllm_process import ServerSpec

    started: list[str] = []
    monkeypatch.setattr(serving, "start_serving", lambda *args, **kwargs: started.append("vllm"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(storage.UserError, match=f"gateway.port: cannot listen on 127.0.0.1:{port}"):
            serving.serve(
                ServerSpec(model="tiny", served_name="base"),
                [],
                engine=store,
                gateway=GatewayConfig(port=port),
                endpoints=["http://127.0.0.1:9"],
                tracks=["support"],
            )
    assert started == []
