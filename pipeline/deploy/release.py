"""Releasing versions: the registry and what serves moved together, serving first.

`deploy_version` and `rollback` load the version on every endpoint and flip the track's route
(`pipeline.deploy.hotswap.deploy`, all-or-nothing; a rollback is the same flip toward an older
version) and only then move the registry's aliases, so the registry never claims something that is
not serving. Without a reachable server they move nothing and say why, unless `registry_only` is asked
for explicitly.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Engine

from pipeline.config import OvernightConfig
from pipeline.deploy.serving import serving_state
from pipeline.register.registry import Registry, RegistryError
from pipeline.services import api_key, open_registry, reachable_endpoints, swap
from storage.errors import UserError
from storage.models import Route
from storage.routes import read_routes

__all__ = ["NoServer", "deploy_version", "rollback", "status"]

logger = logging.getLogger(__name__)


class NoServer(UserError):
    """No configured serving endpoint answers."""


def _require_servers(config: OvernightConfig) -> None:
    up = reachable_endpoints(config)
    down = [url for url in config.serving.endpoints if url not in up]
    if down or not config.serving.endpoints:
        raise NoServer(
            f"serving endpoint {down[0] if down else '(none configured)'} does not answer: nothing was moved "
            "(start it with `overnight serve`, or pass --registry-only to move only the registry aliases)"
        )


def deploy_version(
    config: OvernightConfig,
    engine: Engine,
    track: str,
    version: int,
    *,
    registry: Registry | None = None,
    registry_only: bool = False,
    action: str = "deploy",
) -> dict[str, Any]:
    """Serve `version` of `track` on every endpoint, then make it the `champion` (old one: `previous`)."""
    config.track(track)
    registry = registry or open_registry(config)
    current = registry.version_for(track, "champion")
    adapter = registry.fetch(track, version)  # verified against its recorded sha256 before any server sees it
    swapped: dict[str, Any] | None = None
    if not registry_only:
        _require_servers(config)
        swapped = swap(config, engine, adapter, action).as_json()
    try:
        if action == "rollback":
            registry.rollback_aliases(track, version)
        else:
            registry.promote(track, version)
    except RegistryError as error:
        if swapped is None:
            raise
        raise RegistryError(
            f"{track}: the route serves v{version} now, but moving the registry aliases failed: {error}; "
            f"run `overnight {action} {track}{'' if action == 'deploy' else ' --to'} {version}` again "
            "once the registry is reachable (nothing is loaded twice)"
        ) from None
    return {
        "track": track,
        "version": version,
        "previous": current,
        "action": action,
        "registry_only": registry_only,
        "swap": swapped,
    }


def rollback(
    config: OvernightConfig,
    engine: Engine,
    track: str,
    to_version: int | None = None,
    *,
    registry: Registry | None = None,
    registry_only: bool = False,
) -> dict[str, Any]:
    """Serve `to_version` (default: the `previous` alias) again, then move the aliases back."""
    registry = registry or open_registry(config)
    target = to_version if to_version is not None else registry.version_for(track, "previous")
    if target is None:
        raise RegistryError(f"{track}: no `previous` version to roll back to (name one with --to)")
    return deploy_version(
        config, engine, track, target, registry=registry, registry_only=registry_only, action="rollback"
    )


def status(config: OvernightConfig, engine: Engine, registry: Registry | None = None) -> dict[str, Any]:
    """Per track: champion, previous, challenger, the gateway's route, what each endpoint serves (the
    routed version where it is loaded), and the last night."""
    from storage import runs as ledger

    registry = registry or open_registry(config)
    names = [track.name for track in config.tracks]
    routes = read_routes(engine)
    endpoints = serving_state(config.serving.endpoints, routes, names, api_key(config))
    last = ledger.last_runs(engine)
    tracks = []
    for name in names:
        run = last.get(name)
        tracks.append(
            {
                "track": name,
                "champion": registry.version_for(name, "champion"),
                "previous": registry.version_for(name, "previous"),
                "challenger": registry.version_for(name, "challenger"),
                "route": _route_json(routes.get(name)),
                "serving": {
                    state.endpoint: (state.serving.get(name) if state.reachable else "unreachable")
                    for state in endpoints
                },
                "last_run": (
                    {
                        "night": run.night,
                        "status": run.status,
                        "attempt": run.attempt,
                        "version": run.candidate_version,
                        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
                    }
                    if run
                    else None
                ),
            }
        )
    return {"tracks": tracks}


def _route_json(route: Route | None) -> dict[str, Any] | None:
    if route is None:
        return None
    return {
        "version": int(route.version) if route.version.isdigit() else route.version,
        "adapter": route.adapter_name,
        "previous": int(route.previous_version)
        if route.previous_version and route.previous_version.isdigit()
        else route.previous_version,
        "updated_at": route.updated_at.isoformat() if route.updated_at else None,
    }
