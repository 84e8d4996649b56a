"""`overnight demo`: the loop on embedded defaults, night after night, with nothing to set up.

It keeps everything under `.overnight/demo/` (its own SQLite store, snapshots and tiny model), so it
never touches a user's configured store. Each night it generates that day's synthetic traffic for
the two example tracks (with PII, duplicates, heavy users and malformed lines), ingests it, and
harvests each track into a committed snapshot. Later stages of the loop join here as they land.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import storage
from pipeline import harvest as harvest_stage
from pipeline import synthetic_traffic
from pipeline.config import OvernightConfig, load_config, starter_config_text

DEMO_HOME = Path(".overnight/demo")
MALFORMED_EVERY = 50  # one malformed line per this many records, as real logs have


@dataclass
class DemoNight:
    night: int
    traffic_file: str
    ingest: dict[str, Any]
    tracks: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "night": self.night,
            "traffic_file": self.traffic_file,
            "ingest": self.ingest,
            "tracks": self.tracks,
        }


def demo_config(home: Path) -> OvernightConfig:
    """The starter config's two tracks on a store of the demo's own."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "overnight.yaml"
    if not path.exists():
        path.write_text(starter_config_text(), encoding="utf-8")
    config = load_config(path, environ={})
    return config.model_copy(
        update={
            "home": str(home),
            "database": config.database.model_copy(update={"url": f"sqlite:///{home / 'overnight.db'}"}),
            "serving": config.serving.model_copy(update={"base_model": str(home / "tiny-model")}),
        }
    )


def run_demo(
    nights: int,
    rows_per_night: int,
    *,
    home: Path = DEMO_HOME,
    on_stage: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run `nights` nights of the loop; returns the JSON summary."""
    from pipeline.tiny_model import build_tiny_model

    config = demo_config(home)
    on_stage("building the tiny base model")
    model_dir = build_tiny_model(config.serving.base_model)
    engine = storage.make_engine(config.database.url)
    storage.upgrade(engine)
    start = synthetic_traffic.DEFAULT_START
    done = [
        _night(engine, config, n, rows_per_night, start + timedelta(days=n - 1), on_stage)
        for n in range(1, nights + 1)
    ]
    engine.dispose()
    return {"home": str(home), "base_model": str(model_dir), "nights": [night.as_json() for night in done]}


def _night(
    engine: Any, config: OvernightConfig, night: int, rows: int, day: Any, on_stage: Callable[[str], None]
) -> DemoNight:
    traffic = Path(config.home) / "traffic" / f"night-{night}.jsonl"
    traffic.parent.mkdir(parents=True, exist_ok=True)
    on_stage(f"night {night}: generating {rows} interactions")
    records = synthetic_traffic.generate_records(rows, seed=night, start=day)
    synthetic_traffic.write_jsonl(traffic, records, malformed_every=MALFORMED_EVERY, seed=night)
    on_stage(f"night {night}: ingest")
    report = storage.ingest_jsonl(engine, traffic, batch_size=config.database.batch_size)
    result = DemoNight(night, str(traffic), report.as_json())
    for track in config.tracks:
        on_stage(f"night {night}: harvest {track.name}")
        snapshot = harvest_stage.harvest(
            engine,
            track.name,
            track.harvest,
            track.filter,
            batch_size=config.database.batch_size,
            snapshot_dir=config.snapshot_dir(),
        )
        assert snapshot.snapshot_id is not None
        harvest_stage.commit(engine, snapshot.snapshot_id)
        result.tracks.append({"track": track.name, "harvest": snapshot.as_json()})
    return result
