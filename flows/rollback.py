"""`overnight-rollback`: the rollback as a Prefect flow, so it can be started from the Prefect UI.

The same procedure as `overnight rollback`: flip the route back to the `previous` version
(or `to_version`), then move the registry aliases; the vLLM calls retry like the nightly flow's.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

import storage
from pipeline.config import load_config
from pipeline.deploy.release import rollback as release_rollback


@task(name="rollback", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[5, 30])
def rollback_task(config_path: str | None, track: str, to_version: int | None) -> dict[str, Any]:
    config = load_config(config_path)
    engine = storage.connect(config.database.url)
    try:
        return release_rollback(config, engine, track, to_version)
    finally:
        engine.dispose()


@flow(name="overnight-rollback")
def rollback(track: str, to_version: int | None = None, config_path: str | None = None) -> dict[str, Any]:
    """Serve `to_version` (default: the `previous` alias) of `track` again on every endpoint."""
    return rollback_task(config_path, track, to_version)
