"""`overnight demo`: the whole loop on embedded defaults, night after night, with nothing to set up.

Everything lives under `.overnight/demo/` (its own SQLite store, local MLflow store, snapshots,
adapters, the tiny model, the server log), so it never touches a user's configured store; each run
starts from a clean store and reuses only the cached tiny model. It builds the tiny base model,
starts a local vLLM CPU server on it, and then, night after night: generates that day's synthetic
traffic for two tracks (with PII, duplicates, heavy users and malformed lines), ingests it, and runs
the real nightly flow (harvest, judge, select, train, gate, register, hot-swap, commit). After the
last night it asks each track's stable name a question through the server.

The tiny random model cannot make an LLM judge meaningful, so the `math` track is rewarded by a
programmatic grader (the reply contains a number), which the tiny model can learn in a few steps;
the `support` track exercises the LLM judge through the vLLM server, whatever its gate decides.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

import storage
from pipeline.config import OvernightConfig, load_config
from pipeline.demo_world import synthetic_traffic as synthetic_traffic
from pipeline.deploy.vllm_client import VllmClient
from pipeline.deploy.vllm_process import ServerSpec, free_port

DEMO_HOME = Path(".overnight/demo")
MALFORMED_EVERY = 50  # one malformed line per this many records, as real logs have
# LLM-judged items per track per night: the judge stage's rows (JUDGE_STAGE_ITEMS), the training
# rewards (4 steps x 4 prompts x 4 completions) and the gate's judge cases and held-out replies.
JUDGE_STAGE_ITEMS = 64
JUDGE_BUDGET = 400
KEEP = ("tiny-model",)  # what survives between demo runs (a cache); everything else starts clean
MATH_REWARD_NOTE = (
    "math is rewarded by a programmatic grader (the reply contains a number): the tiny random model "
    "cannot make an LLM judge meaningful; support uses the LLM judge through vLLM"
)
QUESTIONS = {
    "support": "How do I reset my password?",
    "math": "What is 12 + 30?",
}


def demo_settings(port: int) -> dict[str, Any]:
    """The demo's overnight.yaml as data: two tracks sized for a tiny model on two CPU cores.

    Paths are relative to the file, which lives in the demo's home: `overnight -c
    .overnight/demo/overnight.yaml status` works from any directory, and the home can be moved.
    """
    tiny_train = {
        "learning_rate": 5e-3,
        "temperature": 0.3,  # the tiny model's logits move little: sample near its mode
        "kl_budget": 5.0,
        "max_completion_tokens": 16,
        "num_generations": 4,
        "prompts_per_step": 4,
        "heldout_fraction": 0.4,
        "max_wall_seconds": 240,
    }
    sampled_gate = {"temperature": 0.3, "max_new_tokens": 16, "max_kl_to_base": 20.0}
    return {
        "home": ".",
        "database": {"url": "sqlite:///overnight.db"},
        "mlflow": {"tracking_uri": "sqlite:///mlflow.db", "artifact_location": "mlartifacts"},
        "serving": {
            "base_model": "./tiny-model",  # "./": a local directory even before it is built
            "endpoints": [f"http://127.0.0.1:{port}"],
            "port": port,
            "dtype": "float32",
        },
        "judge": {"budget_items": JUDGE_BUDGET, "stage_items": JUDGE_STAGE_ITEMS, "max_tokens": 256},
        "train": tiny_train,
        "gate": sampled_gate,
        "tracks": [
            {
                "name": "support",
                "description": "Customer-support answers, judged by the LLM judge (helpfulness).",
                "rubric": "helpfulness",
                "suites": ["instruction-following", "refusals"],
                "harvest": {"max_chars": 2500},
                "train": {"max_steps": 4, "max_prompts": 24},
                # The tiny judge rarely scores high: keep a small memory of its better-judged rows.
                "gate": {"memory_min_reward": 0.3, "memory_cap": 24},
            },
            {
                "name": "math",
                "description": "Arithmetic answers; the demo rewards replies that contain a number.",
                "rubric": "correctness",
                "suites": ["arithmetic", "json-output"],
                "reward": {
                    "judge": 0.0,
                    "graders": [{"type": "regex", "pattern": r"\d", "name": "has_number", "weight": 1.0}],
                },
                "harvest": {"max_chars": 2500, "max_rows_per_user": 100},
                # The tiny model learns "answer with a number" in short replies (seen: 0.35 -> 0.9).
                "train": {
                    "max_steps": 30,
                    "max_prompts": 160,
                    "max_completion_tokens": 4,
                    "prompts_per_step": 8,
                    "num_generations": 8,
                },
                "gate": {"max_new_tokens": 4},
            },
        ],
    }


def prepare_home(home: Path, port: int) -> tuple[Path, OvernightConfig]:
    """A clean demo home (the cached tiny model kept) with its overnight.yaml; returns (path, config)."""
    home.mkdir(parents=True, exist_ok=True)
    for entry in home.iterdir():
        if entry.name in KEEP:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    path = home / "overnight.yaml"
    header = "# Written by `overnight demo`; rewritten on every demo run.\n"
    path.write_text(header + yaml.safe_dump(demo_settings(port), sort_keys=False), encoding="utf-8")
    return path, load_config(path, environ={})


def run_demo(
    nights: int,
    rows_per_night: int,
    *,
    home: Path = DEMO_HOME,
    on_stage: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run `nights` nights of the loop; returns the JSON summary (one entry per night)."""
    from flows.nightly import nightly
    from pipeline.demo_world.tiny_model import build_tiny_model
    from pipeline.deploy.serving import start_serving

    port = free_port()
    config_path, config = prepare_home(home, port)
    on_stage("building the tiny base model (cached after the first run)")
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
        max_loras=config.serving.max_loras,
        max_lora_rank=config.serving.max_lora_rank,
        log_file=home / "vllm.log",
    )
    server = start_serving(spec, [], timeout_seconds=config.serving.startup_timeout_seconds)
    try:
        done = []
        for night in range(1, nights + 1):
            day = synthetic_traffic.DEFAULT_START + timedelta(days=night - 1)
            ingest = _ingest_night(engine, config, night, rows_per_night, day, on_stage)
            on_stage(f"night {night}: nightly flow (harvest, judge, select, train, gate, register, deploy)")
            result = nightly(config_path=str(config_path), night=day.date().isoformat())
            done.append(
                {"night": night, "label": result["night"], "ingest": ingest, "tracks": result["tracks"]}
            )
        on_stage("asking each track's stable name through the server")
        answers = _ask_tracks(config, spec.base_url)
    finally:
        server.stop()
        engine.dispose()
    return {
        "home": str(home),
        "config": str(config_path),
        "base_model": str(model_dir),
        "note": MATH_REWARD_NOTE,
        "nights": done,
        "answers": answers,
        "browse": {
            "mlflow": f"mlflow ui --backend-store-uri {config.mlflow.tracking_uri}",
            "prefect": "prefect server start  (then run the demo again with PREFECT_API_URL set to see its flow runs)",
            "status": f"overnight -c {config_path} status",
        },
    }


def _ingest_night(
    engine: Any, config: OvernightConfig, night: int, rows: int, day: Any, on_stage: Callable[[str], None]
) -> dict[str, Any]:
    traffic = Path(config.home) / "traffic" / f"night-{night}.jsonl"
    traffic.parent.mkdir(parents=True, exist_ok=True)
    on_stage(f"night {night}: generating and ingesting {rows} interactions")
    records = synthetic_traffic.generate_records(rows, seed=night, start=day)
    synthetic_traffic.write_jsonl(traffic, records, malformed_every=MALFORMED_EVERY, seed=night)
    return storage.ingest_jsonl(engine, traffic, batch_size=config.database.batch_size).as_json()


def _ask_tracks(config: OvernightConfig, base_url: str) -> list[dict[str, Any]]:
    """One greedy request to every stable name the server knows (tracks without a champion: the base)."""
    answers = []
    with VllmClient(base_url) as client:
        served = set(client.adapters())
        for track in config.tracks:
            name = track.name if track.name in served else config.serving.base_name
            question = QUESTIONS.get(track.name, "Hello!")
            reply = client.chat(name, [{"role": "user", "content": question}], max_tokens=24)
            answers.append({"track": track.name, "served_by": name, "question": question, "answer": reply})
    return answers
