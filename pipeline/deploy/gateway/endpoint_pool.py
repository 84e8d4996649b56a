"""The vLLM endpoints behind the gateway: which are healthy, which to use next, what is in flight.

Requests go to the healthy endpoint with the fewest requests in flight (ties taken in turn), so a slow
endpoint gets less. A background check (`check`, `GET /health` every `health_interval_seconds`) takes an
endpoint out when it fails and puts it back when it answers again; a request that cannot connect
takes its endpoint out at once, without waiting for the next check. In-flight requests are counted per
(endpoint, adapter name): a later deploy unloads an old pinned version only once `in_flight(name)` is
zero. Hand-written: the state is a few counters read on every request in the event loop, and the
policy (least in flight, health from vLLM's own `/health`) fits in a page.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

__all__ = ["Endpoint", "EndpointPool"]

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_SECONDS = 2.0


@dataclass
class Endpoint:
    url: str
    healthy: bool = True
    reason: str | None = None  # why it is out of the pool
    in_flight: Counter[str] = field(default_factory=Counter)  # adapter name -> requests in flight

    def load(self) -> int:
        return sum(self.in_flight.values())


class EndpointPool:
    """Endpoints by URL; all methods run in the event loop (no locks)."""

    def __init__(self, urls: Sequence[str], *, client: httpx.AsyncClient) -> None:
        if not urls:
            raise ValueError("an endpoint pool needs at least one endpoint")
        self.endpoints = [Endpoint(url.rstrip("/")) for url in urls]
        self._client = client
        self._turn = 0

    def pick(self, exclude: Sequence[str] = ()) -> Endpoint | None:
        """The healthy endpoint (not in `exclude`) with the fewest requests in flight; None if none."""
        candidates = [e for e in self.endpoints if e.healthy and e.url not in exclude]
        if not candidates:
            return None
        self._turn += 1
        count = len(self.endpoints)
        return min(candidates, key=lambda e: (e.load(), (self.endpoints.index(e) - self._turn) % count))

    def begin(self, endpoint: Endpoint, adapter: str) -> None:
        """A request to `adapter` on `endpoint` is in flight until `end`."""
        endpoint.in_flight[adapter] += 1

    def end(self, endpoint: Endpoint, adapter: str) -> None:
        endpoint.in_flight[adapter] -= 1
        if endpoint.in_flight[adapter] <= 0:
            del endpoint.in_flight[adapter]

    def in_flight(self, adapter: str, endpoint: str | None = None) -> int:
        """Requests to `adapter` in flight, on one endpoint or on all."""
        return sum(e.in_flight[adapter] for e in self.endpoints if endpoint in (None, e.url))

    def take_out(self, endpoint: Endpoint, reason: str) -> None:
        if endpoint.healthy:
            logger.warning("endpoint %s out of the pool: %s", endpoint.url, reason)
        endpoint.healthy, endpoint.reason = False, reason

    def put_back(self, endpoint: Endpoint) -> None:
        if not endpoint.healthy:
            logger.info("endpoint %s back in the pool", endpoint.url)
        endpoint.healthy, endpoint.reason = True, None

    def healthy_count(self) -> int:
        return sum(e.healthy for e in self.endpoints)

    def states(self) -> dict[str, str]:
        return {e.url: "healthy" if e.healthy else f"out: {e.reason}" for e in self.endpoints}

    async def check(self) -> None:
        """One health check of every endpoint, concurrently."""
        await asyncio.gather(*(self._check(endpoint) for endpoint in self.endpoints))

    async def _check(self, endpoint: Endpoint) -> None:
        try:
            response = await self._client.get(f"{endpoint.url}/health", timeout=HEALTH_TIMEOUT_SECONDS)
        except httpx.HTTPError as error:
            self.take_out(endpoint, f"/health: {type(error).__name__}")
            return
        if response.status_code == 200:
            self.put_back(endpoint)
        else:
            self.take_out(endpoint, f"/health: HTTP {response.status_code}")
