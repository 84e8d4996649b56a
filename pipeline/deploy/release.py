"""Releasing versions: the registry and the serving endpoints moved together, serving first.

`deploy_version` and `rollback` hot-swap every endpoint (`pipeline.deploy.hotswap.deploy`, all-or-nothing)
and only then move the registry's aliases, so the registry never claims something that is not
serving. Without a reachable server they move nothing and say why, unless `registry_only` is asked
for explicitly. `night_services` builds what a night needs from config: the MLflow registry, the
deployer when an endpoint answers, and the vLLM reply generator for the gate.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from pipeline.adapters import AdapterVersion
from pipeline.config import OvernightConfig
from pipeline.deploy import hotswap as hotswap
from pipeline.deploy.serving import serving_state
from pipeline.deploy.vllm_client import VllmClient
from pipeline.gate.evaluation import ServerGenerator
from pipeline.night import NightServices
from pipeline.register.registry import MlflowRegistry, Registry, RegistryError
from storage.errors import UserError

__all__ = [
    "NoServer",
    "deploy_version",
    "night_services",
    "open_registry",
    "rollback",
    "status",
]

logger = logging.getLogger(__name__)


class NoServer(UserError):
    """No configured serving endpoint answers."""


def open_registry(config: OvernightConfig) -> MlflowRegistry:
    mlflow = config.mlflow
    return MlflowRegistry(
        mlflow.tracking_uri,
        registry_uri=mlflow.registry_uri,
        model_prefix=mlflow.model_prefix,
        cache_dir=Path(config.home) / "adapters",
        experiment_prefix=mlflow.experiment_prefix,
        artifact_location=mlflow.artifact_location,
    )


def _api_key(config: OvernightConfig) -> str | None:
    key = config.serving.api_key
    return key.get_secret_value() if key else None


def reachable_endpoints(config: OvernightConfig) -> list[str]:
    reachable = []
    for url in config.serving.endpoints:
        with VllmClient(url, api_key=_api_key(config), timeout_seconds=5.0) as client:
            if client.healthy():
                reachable.append(url)
    return reachable


def night_services(config: OvernightConfig, engine: Engine) -> NightServices:
    """The registry, a deployer and the gate's vLLM generator when every endpoint answers."""
    endpoints = config.serving.endpoints
    up = reachable_endpoints(config)
    serving = bool(endpoints) and len(up) == len(endpoints)
    if not serving:
        logger.warning(
            "serving endpoints not all reachable (%s of %s): candidates that pass are registered as "
            "challenger, not deployed; the gate runs in-process",
            len(up),
            len(endpoints),
        )

    def deploy(adapter: AdapterVersion) -> dict[str, Any]:
        return _swap(config, engine, adapter, "deploy")

    generator = (
        ServerGenerator(
            VllmClient(
                up[0], api_key=_api_key(config), timeout_seconds=config.serving.request_timeout_seconds
            ),
            base_name=config.serving.base_name,
        )
        if up
        else None
    )
    return NightServices(
        registry=open_registry(config), deploy=deploy if serving else None, generator=generator
    )


def _swap(config: OvernightConfig, engine: Engine, adapter: AdapterVersion, action: str) -> dict[str, Any]:
    """Hot-swap `adapter` onto every configured endpoint (all or none); the swap's record as JSON."""
    result = hotswap.deploy(
        adapter,
        config.serving.endpoints,
        engine=engine,
        api_key=_api_key(config),
        keep_versions=config.serving.keep_versions,
        action=action,
    )
    return asdict(result)


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
    swap: dict[str, Any] | None = None
    if not registry_only:
        _require_servers(config)
        swap = _swap(config, engine, adapter, action)
    if action == "rollback":
        registry.rollback_aliases(track, version)
    else:
        registry.promote(track, version)
    return {
        "track": track,
        "version": version,
        "previous": current,
        "action": action,
        "registry_only": registry_only,
        "swap": swap,
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
    """Per track: champion, previous, challenger, what each endpoint serves, and the last night."""
    from storage import runs as ledger

    registry = registry or open_registry(config)
    names = [track.name for track in config.tracks]
    endpoints = serving_state(config.serving.endpoints, names, _api_key(config))
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
