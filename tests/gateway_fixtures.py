"""Running the real gateway for tests: uvicorn on a loopback port, the `openai` SDK as its client.

`running_gateway` builds the app with `create_app` exactly as a deployment would (its own spool
directory, the given store and fake vLLM endpoints), starts it, and stops it, which flushes its log
writer. `stored` reads back what reached the interaction store; `wait_until` polls for what is
eventually true (a record written by the background writer, an endpoint back in the pool).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pipeline.config import GatewayConfig
from pipeline.deploy.gateway import Gateway, create_app
from storage.models import FeedbackEvent, Interaction
from tests.fakes.openai_upstream import LoopbackServer

TRACKS = ("support", "math")
BASE = "base"


@dataclass
class RunningGateway:
    server: LoopbackServer
    gateway: Gateway

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def openai(self, key: str = "EMPTY") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=20)

    def async_openai(self, key: str = "EMPTY") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=60)

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=20)


@contextmanager
def running_gateway(
    engine: Engine, endpoints: Sequence[str], spool_dir: Path, *, base_name: str = BASE, **settings: Any
) -> Iterator[RunningGateway]:
    """A started gateway in front of `endpoints`; settings override `GatewayConfig` fields."""
    defaults: dict[str, Any] = {"flush_seconds": 0.05, "health_interval_seconds": 0.2}
    config = GatewayConfig(spool_dir=str(spool_dir), **{**defaults, **settings})
    app = create_app(engine, endpoints=endpoints, base_name=base_name, tracks=TRACKS, settings=config)
    server = LoopbackServer(app).start()
    try:
        yield RunningGateway(server, app.state.gateway)
    finally:
        server.stop()


def wait_until(condition: Callable[[], Any], *, timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def stored(engine: Engine) -> list[Interaction]:
    """Every stored interaction, in log order."""
    with Session(engine, expire_on_commit=False) as session:
        rows = list(session.scalars(select(Interaction).order_by(Interaction.id)))
        session.expunge_all()
    return rows


def stored_feedback(engine: Engine) -> list[tuple[str, int | None, int | None, str | None, str]]:
    """(interaction client id, thumb, rating, comment, source) of every feedback event, in order."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                Interaction.client_id,
                FeedbackEvent.thumb,
                FeedbackEvent.rating,
                FeedbackEvent.comment,
                FeedbackEvent.source,
            )
            .join(Interaction, Interaction.id == FeedbackEvent.interaction_id)
            .order_by(FeedbackEvent.id)
        ).all()
    return [tuple(row) for row in rows]  # type: ignore[misc]
