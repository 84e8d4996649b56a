"""Which adapter answers a requested model name, from the route table every gateway process shares.

Clients call a track's stable name `<track>`; the gateway sends the request to the pinned adapter the
track's route points at (`<track>@v<N>`), so a deploy or rollback is a flip of one database row and no
adapter is ever reloaded in place. A pinned name is passed through as it is, the base model's name
too, and a configured track without a route yet (no version promoted) is answered by the base model,
which is what such a track's champion is. Anything else is the OpenAI 404 `model_not_found`.

Each process keeps the table in memory and re-reads it every `route_refresh_seconds` in the
background, so the request path never waits on the database and several processes see a flip within
a second; while the database is unreachable the last table read keeps serving (and before any table
was read, stable names are a 503 rather than silently answered by the base). Hand-written because
the resolution rules are the project's own (stable, pinned, base) and a flip must go through SQL.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline.deploy.gateway.openai_wire import GatewayError
from pipeline.deploy.hotswap import pinned_version
from storage.models import Route
from storage.routes import read_routes

__all__ = ["Resolved", "RouteTable", "listed_models", "resolve_model"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resolved:
    """Where a request for `requested` goes."""

    requested: str  # the name the client called
    track: str  # the track the exchange is logged under (the base model's name for base traffic)
    upstream: str  # the name vLLM serves it under: a pinned `<track>@v<N>` or the base model's name
    version: str | None  # the registry version that answers; None: the base model


def resolve_model(
    name: str, routes: Mapping[str, Route], *, base_name: str, tracks: Collection[str]
) -> Resolved:
    """Resolve a requested model name (see the module doc); raises a 404 `GatewayError` when unknown."""
    if name == base_name:
        return Resolved(name, base_name, base_name, None)
    route = routes.get(name)
    if route is not None:
        return Resolved(name, name, route.adapter_name, route.version)
    track = name.rpartition("@v")[0]
    version = pinned_version(name, track) if track else None
    if version is not None and (track in routes or track in tracks):
        return Resolved(name, track, name, str(version))
    if name in tracks:
        return Resolved(name, name, base_name, None)
    raise GatewayError(404, f"The model `{name}` does not exist.", code="model_not_found", param="model")


def listed_models(
    routes: Mapping[str, Route], *, base_name: str, tracks: Collection[str], allows: Callable[[str], bool]
) -> list[dict[str, Any]]:
    """`/v1/models` entries: each allowed track's stable name, its pinned versions, and the base model."""
    entries: list[dict[str, Any]] = []
    for track in sorted(set(tracks) | set(routes)):
        if not allows(track):
            continue
        route = routes.get(track)
        serves = route.adapter_name if route else base_name
        created = int(route.updated_at.timestamp()) if route and route.updated_at else 0
        entries.append(_model(track, created, serves=serves, version=route.version if route else None))
        if route is not None:
            entries.append(_model(route.adapter_name, created, parent=track))
            if route.previous_version is not None:
                entries.append(_model(f"{track}@v{route.previous_version}", created, parent=track))
    if allows(base_name):
        entries.append(_model(base_name, 0))
    return entries


def _model(name: str, created: int, **extra: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "overnight", **extra}


class RouteTable:
    """The route table as this process last read it; `refresh` re-reads it (the app does, periodically)."""

    def __init__(self, engine: Engine, *, base_name: str, tracks: Collection[str]) -> None:
        self.engine = engine
        self.base_name = base_name
        self.tracks = frozenset(tracks)
        self.routes: dict[str, Route] = {}
        self.read_at: float | None = None  # time.monotonic() of the last successful read
        self._failing = False

    def refresh(self) -> bool:
        """Re-read the routes; on a database error keep the last table (logged once per outage)."""
        try:
            routes = read_routes(self.engine)
        except SQLAlchemyError as error:
            if not self._failing:
                logger.warning(
                    "cannot read routes, serving the last ones read: %s", str(error).splitlines()[0]
                )
            self._failing = True
            return False
        if self._failing:
            logger.info("routes readable again")
        self.routes, self.read_at, self._failing = routes, time.monotonic(), False
        return True

    def resolve(self, name: str) -> Resolved:
        """As `resolve_model`; a stable name is a 503 until the table has been read once (the base model
        must not silently answer for a track whose route could not be read)."""
        resolved = resolve_model(name, self.routes, base_name=self.base_name, tracks=self.tracks)
        if self.read_at is None and name in self.tracks:
            raise GatewayError(
                503, "The route table could not be read yet (is the store up?); try again shortly."
            )
        return resolved

    def state(self) -> str:
        """`ok`, `stale` (the last refresh failed: serving the last table read) or `never read`."""
        if self.read_at is None:
            return "never read"
        return "stale" if self._failing else "ok"

    def models(self, allows: Callable[[str], bool]) -> list[dict[str, Any]]:
        return listed_models(self.routes, base_name=self.base_name, tracks=self.tracks, allows=allows)
