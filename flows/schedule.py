"""`overnight schedule`: the nightly flow as a Prefect deployment on a cron, in the configured time zone.

Served by this process (`flow.serve`, the default: keep it running) or registered for a work pool's
workers (`schedule.work_pool`), from the project directory as its source. The flow's parameters
carry the config path, so the worker runs the same config the schedule was made with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.schedules import Cron

from flows.nightly import nightly
from pipeline.config import ConfigError, OvernightConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def nightly_schedule(cron: str, timezone: str) -> Any:
    """The cron schedule, checked: a bad expression or time zone is a one-line config error."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"schedule.timezone: unknown time zone {timezone!r}") from None
    try:
        return Cron(cron, timezone=timezone)
    except ValueError:
        raise ConfigError(f"schedule.cron: {cron!r} is not a valid cron expression") from None


def deployment_parameters(config_path: Path | None) -> dict[str, Any]:
    return {"config_path": str(Path(config_path).resolve()) if config_path else None}


def register_schedule(config: OvernightConfig, *, cron: str | None, config_path: Path | None) -> None:
    """Serve the nightly deployment from this process, or register it for `schedule.work_pool`."""
    schedule = nightly_schedule(cron or config.schedule.cron, config.schedule.timezone)
    name = config.schedule.deployment_name
    parameters = deployment_parameters(config_path)
    if config.schedule.work_pool:
        source: Any = nightly.from_source(source=str(PROJECT_ROOT), entrypoint="flows/nightly.py:nightly")
        source.deploy(
            name=name, work_pool_name=config.schedule.work_pool, schedules=[schedule], parameters=parameters
        )
        return
    nightly.serve(name=name, schedules=[schedule], parameters=parameters)
