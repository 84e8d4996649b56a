"""`overnight serve`: one vLLM server for the base model with every track's champion loaded, the
gateway in front of it, and a read-only view of what each endpoint serves.

vLLM serves each champion under its pinned name `<track>@v<N>` only; clients call the gateway, which
sends the stable name `<track>` to the version the track's route points at (`storage.routes`). So
the routes are seeded from the registry's champions before the gateway takes traffic: a fresh
store, or one whose champion moved with `--registry-only`, then routes `<track>` to what vLLM was
just given. A deploy (`pipeline.deploy.hotswap.deploy`) later loads the next version beside it and
flips the route. Every adapter is checked against its recorded sha256 before the server starts, so
a corrupt champion fails in a second, not after the minute vLLM takes to start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Engine

from pipeline.adapters import AdapterVersion, verify_adapter
from pipeline.config import GatewayConfig
from pipeline.deploy.gateway.app import create_app
from pipeline.deploy.gateway.server import GatewayServer, check_port_free
from pipeline.deploy.hotswap import EndpointClient, pinned_version
from pipeline.deploy.vllm_client import VllmClient
from pipeline.deploy.vllm_process import ServerSpec, VllmServer
from storage.errors import UserError
from storage.models import Route
from storage.routes import flip_route, read_routes

__all__ = [
    "EndpointState",
    "Serving",
    "load_champions",
    "seed_routes",
    "serve",
    "serving_state",
    "start_serving",
]

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often `serve` checks that vLLM and the gateway still run


@dataclass(frozen=True)
class EndpointState:
    """What one endpoint serves, as it reports it."""

    endpoint: str
    reachable: bool
    serving: dict[str, int | None] = field(default_factory=dict)  # track -> routed version, if loaded here
    adapters: list[str] = field(default_factory=list)  # every loaded adapter name
    error: str | None = None  # why the endpoint could not be read


@dataclass(frozen=True)
class Serving:
    """A running `overnight serve`: the vLLM server and the gateway in front of it."""

    server: VllmServer
    gateway: GatewayServer


def _check_one_per_track(champions: Sequence[AdapterVersion]) -> None:
    tracks = [champion.track for champion in champions]
    duplicates = sorted({track for track in tracks if tracks.count(track) > 1})
    if duplicates:
        raise UserError(f"serving: more than one champion for track(s) {', '.join(duplicates)}")


def load_champions(client: EndpointClient, champions: Sequence[AdapterVersion]) -> None:
    """Load each champion under its pinned name `<track>@v<N>` (the gateway routes `<track>` to it)."""
    _check_one_per_track(champions)
    loaded = client.adapters()
    for champion in champions:
        path = str(champion.path)
        if champion.pinned_name in loaded:
            if loaded[champion.pinned_name].path != path:
                raise UserError(
                    f"{client.base_url}: {champion.pinned_name} is already loaded from "
                    f"{loaded[champion.pinned_name].path}, not {path}"
                )
            continue
        client.load_adapter(champion.pinned_name, path)
        logger.info("serving %s as %s", path, champion.pinned_name)


def seed_routes(engine: Engine, champions: Sequence[AdapterVersion]) -> dict[str, Route]:
    """Point each champion's track at its pinned name unless it already is; every route, after."""
    _check_one_per_track(champions)
    routes = read_routes(engine)
    for champion in champions:
        route = routes.get(champion.track)
        if route is None:
            flip_route(engine, champion.track, str(champion.version), champion.pinned_name)
            logger.info("route %s -> %s", champion.track, champion.pinned_name)
        elif route.adapter_name != champion.pinned_name:
            logger.warning(
                "route %s pointed at %s but the registry's champion is %s: routing to the champion "
                "(`overnight deploy %s %s` routes it back)",
                champion.track,
                route.adapter_name,
                champion.pinned_name,
                champion.track,
                route.version,
            )
            flip_route(engine, champion.track, str(champion.version), champion.pinned_name)
    return read_routes(engine)


def start_serving(
    spec: ServerSpec, champions: Sequence[AdapterVersion], *, timeout_seconds: float = 300.0
) -> VllmServer:
    """A started vLLM server with every champion loaded; stops it again if loading fails."""
    for champion in champions:
        verify_adapter(champion.path, champion.sha256)
    if len(champions) > spec.max_loras:
        logger.warning(
            "%d tracks but serving.max_loras=%d: batches mixing more tracks than that wait for a slot",
            len(champions),
            spec.max_loras,
        )
    server = VllmServer(spec).start(timeout_seconds)
    try:
        with VllmClient(spec.base_url, api_key=spec.api_key) as client:
            load_champions(client, champions)
    except BaseException:
        server.stop()
        raise
    return server


def serve(
    spec: ServerSpec,
    champions: Sequence[AdapterVersion],
    *,
    engine: Engine,
    gateway: GatewayConfig,
    endpoints: Sequence[str],
    tracks: Sequence[str],
    on_ready: Callable[[Serving], None] | None = None,
    timeout_seconds: float = 300.0,
) -> int:
    """Start vLLM, load the champions, seed the routes, start the gateway on `gateway.port` in front
    of `endpoints`, call `on_ready`, then block until vLLM or the gateway exits, or Ctrl-C.

    Returns 0 after Ctrl-C (SIGTERM unwinds as `SystemExit` through the same cleanup); both are
    stopped on every way out, the gateway first so its log queue is flushed while vLLM still answers.
    """
    check_port_free(gateway.host, gateway.port)  # before the minute vLLM takes, not after
    check_port_free(spec.host, spec.port, what="serving.port")
    server = start_serving(spec, champions, timeout_seconds=timeout_seconds)
    front: GatewayServer | None = None
    try:
        seed_routes(engine, champions)  # once the champions serve: a failed start changes no route
        app = create_app(
            engine,
            endpoints=endpoints,
            base_name=spec.served_name,
            tracks=tracks,
            settings=gateway,
            upstream_api_key=spec.api_key,
        )
        front = GatewayServer(app, gateway.host, gateway.port).start()
        if on_ready is not None:
            on_ready(Serving(server, front))
        code = _wait(server, front)
    except KeyboardInterrupt:
        logger.info("stopping the gateway and vLLM")
        return 0
    finally:
        try:  # a second Ctrl-C while the gateway drains must still stop vLLM (its own session)
            if front is not None:
                front.stop()
        finally:
            server.stop()
    if code:
        raise UserError(f"vLLM on {spec.base_url} exited with code {code}")
    return 0


def _wait(server: VllmServer, front: GatewayServer) -> int:
    while True:
        code = server.wait(POLL_SECONDS)
        if code is not None:
            return code
        if not front.running():
            raise UserError(f"the gateway on {front.base_url} stopped (see the log above)")


def serving_state(
    endpoints: Sequence[str],
    routes: Mapping[str, Route],
    tracks: Sequence[str],
    api_key: str | None = None,
    *,
    client_factory: Callable[[str], EndpointClient] | None = None,
) -> list[EndpointState]:
    """Per endpoint, the version each track's route points at when that endpoint has it loaded (None:
    no route, or the routed version is not loaded there); never raises for a down endpoint."""
    factory = client_factory or (lambda url: VllmClient(url, api_key=api_key, timeout_seconds=10.0))
    states = []
    for url in endpoints:
        client = factory(url)
        try:
            adapters = client.adapters()
        except UserError as error:
            states.append(EndpointState(url, reachable=False, error=str(error)))
            continue
        finally:
            client.close()
        serving = {track: _routed_version(routes.get(track), track, adapters) for track in tracks}
        states.append(EndpointState(url, reachable=True, serving=serving, adapters=sorted(adapters)))
    return states


def _routed_version(route: Route | None, track: str, loaded: Mapping[str, object]) -> int | None:
    if route is None or route.adapter_name not in loaded:
        return None
    return pinned_version(route.adapter_name, track)
