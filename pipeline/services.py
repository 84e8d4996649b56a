"""The external systems a night uses, built once per night and shared by every stage and retry.

Why one object: the judge's budget (`judge.budget_items`), its statistics and its circuit breaker
belong to a track's night, not to a stage; a judge built anew by the judge, train and gate stages
(and by every retry) made the budget per stage. `judge_for(track)` builds one judge per track and
hands the same one to every stage and retry of that track's night. The registry, the deployer (load on every endpoint, flip the route)
and the gate's reply generator are likewise built from config once, after checking which serving
endpoints answer. Tests build `NightServices` from fakes (`tests/fakes/`) and hand it in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from pipeline.adapters import AdapterVersion
from pipeline.config import OvernightConfig
from pipeline.deploy import hotswap
from pipeline.deploy.vllm_client import VllmClient
from pipeline.gate.generation import ReplyGenerator, ServerGenerator
from pipeline.judge.client import Judge, LlmJudge
from pipeline.judge.stage import judge_settings
from pipeline.register.night_log import MlflowNightLog, NightLog, NightLogContext
from pipeline.register.registry import MlflowRegistry, Registry
from pipeline.results import Swap

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "Deployer",
    "NightLogFactory",
    "NightServices",
    "api_key",
    "gateway_app",
    "night_judge",
    "night_services",
    "open_registry",
    "reachable_endpoints",
    "swap",
]

logger = logging.getLogger(__name__)

Deployer = Callable[[AdapterVersion], Swap]  # load everywhere, flip the route; raises on failure
NightLogFactory = Callable[[NightLogContext], NightLog]


@dataclass
class NightServices:
    """What a night calls outside its own process. `judge_factory` is called once per track."""

    registry: Registry
    deploy: Deployer | None  # None: no serving configured or reachable; promotion waits as `challenger`
    generator: ReplyGenerator | None = None  # gate replies through vLLM; None: in-process
    judge_factory: Callable[[], Judge] | None = (
        None  # None: no judge can be built (a track needing one fails)
    )
    night_log: NightLogFactory = MlflowNightLog
    _judges: dict[str, Judge] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def judge_for(self, track: str) -> Judge:
        """The track's judge for tonight, built on first use, then shared by every stage and retry."""
        with self._lock:
            if track not in self._judges:
                if self.judge_factory is None:
                    raise RuntimeError("no judge configured for this night")
                self._judges[track] = self.judge_factory()
            return self._judges[track]


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


def api_key(config: OvernightConfig) -> str | None:
    key = config.serving.api_key
    return key.get_secret_value() if key else None


def gateway_app(config: OvernightConfig, engine: Engine) -> FastAPI:
    """The gateway in front of `serving.endpoints`, as the config describes it (`overnight gateway`, the demo)."""
    from pipeline.deploy.gateway.app import create_app  # FastAPI only where a gateway runs

    return create_app(
        engine,
        endpoints=config.serving.endpoints,
        base_name=config.serving.base_name,
        tracks=[track.name for track in config.tracks],
        settings=config.gateway,
        upstream_api_key=api_key(config),
    )


def reachable_endpoints(config: OvernightConfig) -> list[str]:
    reachable = []
    for url in config.serving.endpoints:
        with VllmClient(url, api_key=api_key(config), timeout_seconds=5.0) as client:
            if client.healthy():
                reachable.append(url)
    return reachable


def swap(config: OvernightConfig, engine: Engine, adapter: AdapterVersion, action: str) -> Swap:
    """Load `adapter` on every configured endpoint and flip its route (all or none); the deploy's record."""
    return hotswap.deploy(
        adapter,
        config.serving.endpoints,
        engine=engine,
        api_key=api_key(config),
        keep_versions=config.serving.keep_versions,
        unload_grace_seconds=config.serving.unload_grace_seconds,
        action=action,
    )


def night_services(config: OvernightConfig, engine: Engine) -> NightServices:
    """The registry, the judge, a deployer and the gate's vLLM generator when every endpoint answers."""
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

    def deploy(adapter: AdapterVersion) -> Swap:
        return swap(config, engine, adapter, "deploy")

    generator = (
        ServerGenerator(
            VllmClient(
                up[0], api_key=api_key(config), timeout_seconds=config.serving.request_timeout_seconds
            ),
            base_name=config.serving.base_name,
        )
        if up
        else None
    )
    return NightServices(
        registry=open_registry(config),
        deploy=deploy if serving else None,
        generator=generator,
        judge_factory=lambda: night_judge(config, engine),
    )


def night_judge(config: OvernightConfig, engine: Engine) -> Judge:
    """The configured LLM judge (its own endpoint, or the first serving endpoint's base model)."""
    return LlmJudge(judge_settings(config.judge, config.serving), engine=engine)
