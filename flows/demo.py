"""`overnight demo`: the loop on embedded defaults, night after night, with nothing to set up.

It keeps everything under `.overnight/demo/` (its own SQLite store, snapshots, tiny model, server
log), so it never touches a user's configured store. It builds the tiny model, starts a local vLLM
server on it, and each night generates that day's synthetic traffic for the two example tracks
(with PII, duplicates, heavy users and malformed lines), ingests it, harvests each track into a
committed snapshot and judges the snapshot with the track's rubric (within a small budget, so a
night takes about a minute on two cores). Later stages of the loop join here as they land.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

import storage
from pipeline import harvest as harvest_stage
from pipeline import synthetic_traffic
from pipeline.config import OvernightConfig, TrackConfig, load_config, starter_config_text
from pipeline.judge import LlmJudge
from pipeline.judging import judge_records, judge_settings
from pipeline.rubrics import load_rubric
from pipeline.vllm_process import ServerSpec, VllmServer, free_port

DEMO_HOME = Path(".overnight/demo")
MALFORMED_EVERY = 50  # one malformed line per this many records, as real logs have
JUDGE_BUDGET = 96  # judged rows per track per night in the demo; the rest are counted as skipped


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


def demo_config(home: Path, endpoint: str = "http://127.0.0.1:8000") -> OvernightConfig:
    """The starter config's two tracks on a store, model and server of the demo's own."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "overnight.yaml"
    if not path.exists():
        path.write_text(starter_config_text(), encoding="utf-8")
    config = load_config(path, environ={})
    # The tiny model's context is 4096 tokens of a small vocabulary: keep prompts that fit the judge.
    tracks = [
        track.model_copy(update={"harvest": track.harvest.model_copy(update={"max_chars": 2500})})
        for track in config.tracks
    ]
    return config.model_copy(
        update={
            "home": str(home),
            "tracks": tracks,
            "database": config.database.model_copy(update={"url": f"sqlite:///{home / 'overnight.db'}"}),
            "serving": config.serving.model_copy(
                update={"base_model": str(home / "tiny-model"), "endpoints": [endpoint], "dtype": "float32"}
            ),
            "judge": config.judge.model_copy(update={"budget_items": JUDGE_BUDGET}),
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

    port = free_port()
    config = demo_config(home, f"http://127.0.0.1:{port}")
    on_stage("building the tiny base model")
    model_dir = build_tiny_model(config.serving.base_model)
    engine = storage.make_engine(config.database.url)
    storage.upgrade(engine)
    on_stage("starting the local vLLM server (about a minute on CPU)")
    spec = ServerSpec(
        model=str(model_dir),
        served_name=config.serving.base_name,
        port=port,
        dtype=config.serving.dtype,
        max_model_len=config.serving.max_model_len,
        log_file=home / "vllm.log",
    )
    with VllmServer(spec).start(timeout_seconds=config.serving.startup_timeout_seconds):
        start = synthetic_traffic.DEFAULT_START
        done = [
            _night(engine, config, n, rows_per_night, start + timedelta(days=n - 1), on_stage)
            for n in range(1, nights + 1)
        ]
    engine.dispose()
    return {"home": str(home), "base_model": str(model_dir), "nights": [night.as_json() for night in done]}


def _night(
    engine: Engine,
    config: OvernightConfig,
    night: int,
    rows: int,
    day: datetime,
    on_stage: Callable[[str], None],
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
        result.tracks.append(_track_night(engine, config, track, night, on_stage))
    return result


def _track_night(
    engine: Engine, config: OvernightConfig, track: TrackConfig, night: int, on_stage: Callable[[str], None]
) -> dict[str, Any]:
    on_stage(f"night {night}: harvest {track.name}")
    snapshot = harvest_stage.harvest(
        engine,
        track.name,
        track.harvest,
        track.filter,
        batch_size=config.database.batch_size,
        snapshot_dir=config.snapshot_dir(),
    )
    assert snapshot.snapshot_id is not None and snapshot.path is not None
    rubric = load_rubric(track.rubric)
    on_stage(f"night {night}: judge {track.name} with {rubric.key} (up to {JUDGE_BUDGET} rows)")
    judged = judge_records(
        harvest_stage.read_snapshot(snapshot.path),
        rubric=rubric,
        judge=LlmJudge(judge_settings(config.judge, config.serving), engine=engine),
        reward=track.reward,
        out=snapshot.path.with_suffix(".judged.jsonl"),
    )
    harvest_stage.commit(engine, snapshot.snapshot_id)
    return {"track": track.name, "harvest": snapshot.as_json(), "judge": judged.as_json()}
