"""`overnight serve`: one vLLM server for the base model with every track's champion loaded, and
a read-only view of what each endpoint serves.

A champion is loaded under two names: `<track>@v<N>` (pinned: always that version) and `<track>` (the
stable name clients call, later moved in place by `pipeline.deploy.hotswap.deploy`). Loading the pinned name
as well is what lets a hot-swap know which version the stable name serves (same directory) and what
makes a rollback instant (the previous champion stays resident). Every adapter is checked against its
recorded sha256 before the server starts, so a corrupt champion fails in a second, not after the
minute vLLM takes to start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline.adapters import AdapterVersion, verify_adapter
from pipeline.deploy.hotswap import EndpointClient, version_serving
from pipeline.deploy.vllm_client import VllmClient
from pipeline.deploy.vllm_process import ServerSpec, VllmServer
from storage.errors import UserError

__all__ = ["EndpointState", "load_champions", "serve", "serving_state", "start_serving"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndpointState:
    """What one endpoint serves, as it reports it."""

    endpoint: str
    reachable: bool
    serving: dict[str, int | None] = field(default_factory=dict)  # track -> version its stable name serves
    adapters: list[str] = field(default_factory=list)  # every loaded adapter name
    error: str | None = None  # why the endpoint could not be read


def load_champions(client: EndpointClient, champions: Sequence[AdapterVersion]) -> None:
    """Load each champion under its pinned and its stable name (in place when the name exists)."""
    tracks = [champion.track for champion in champions]
    duplicates = sorted({track for track in tracks if tracks.count(track) > 1})
    if duplicates:
        raise UserError(f"serving: more than one champion for track(s) {', '.join(duplicates)}")
    loaded = client.adapters()
    for champion in champions:
        path = str(champion.path)
        if champion.pinned_name not in loaded:
            client.load_adapter(champion.pinned_name, path)
        if champion.track not in loaded or loaded[champion.track].path != path:
            client.load_adapter(champion.track, path, inplace=champion.track in loaded)
        logger.info("serving %s as %s and %s", path, champion.track, champion.pinned_name)


def start_serving(
    spec: ServerSpec, champions: Sequence[AdapterVersion], *, timeout_seconds: float = 300.0
) -> VllmServer:
    """A started server with every champion loaded; stops it again if loading fails."""
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
    on_ready: Callable[[VllmServer], None] | None = None,
    timeout_seconds: float = 300.0,
) -> int:
    """Start, load the champions, call `on_ready`, then block until the server exits or Ctrl-C.

    Returns the server's exit code (0 after Ctrl-C or SIGTERM turned into KeyboardInterrupt); the
    server is stopped on every way out.
    """
    server = start_serving(spec, champions, timeout_seconds=timeout_seconds)
    try:
        if on_ready is not None:
            on_ready(server)
        code = server.wait()
    except KeyboardInterrupt:
        logger.info("stopping vLLM on %s", spec.base_url)
        return 0
    finally:
        server.stop()
    if code:
        raise UserError(f"vLLM on {spec.base_url} exited with code {code}")
    return 0


def serving_state(
    endpoints: Sequence[str],
    tracks: Sequence[str],
    api_key: str | None = None,
    *,
    client_factory: Callable[[str], EndpointClient] | None = None,
) -> list[EndpointState]:
    """Per endpoint, the version each track's stable name serves; never raises for a down endpoint."""
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
        serving = {track: version_serving(adapters, track) for track in tracks}
        states.append(EndpointState(url, reachable=True, serving=serving, adapters=sorted(adapters)))
    return states
