"""Judge benchmark against real vLLM CPU servers serving the tiny model.

Measured side by side in one run:
  - judged items/s at concurrency 1 vs 16 (ratio), on fresh items (no cache);
  - cache-hit items/s (the same items again, answered from the SQL cache);
  - prefix caching on vs off: the same items, greedy, on two servers that differ only in
    --enable-prefix-caching; the rubric-first prompt layout lets the shared system prompt be reused.

    .venv/bin/python bench/judge.py [--items 48]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import storage
from pipeline.demo_world.synthetic_traffic import generate_records
from pipeline.demo_world.tiny_model import build_tiny_model
from pipeline.deploy.vllm_process import ServerSpec, VllmServer, free_port
from pipeline.judge.client import JudgeSettings, LlmJudge, run_sync
from pipeline.judge.rubrics import load_rubric

RUBRIC = load_rubric("helpfulness")


def items(n: int, salt: str) -> tuple[list[list[dict[str, str]]], list[str]]:
    records = list(generate_records(n, seed=11, tracks=("support",)))
    conversations = [record["messages"] for record in records]
    responses = [f"{record['response']} ({salt}-{i})" for i, record in enumerate(records)]
    return conversations, responses


def throughput(judge: LlmJudge, conversations: list[Any], responses: list[str]) -> float:
    start = time.perf_counter()
    verdicts = run_sync(judge.score(RUBRIC, conversations, responses))
    seconds = time.perf_counter() - start
    failed = sum(v.status != "ok" for v in verdicts)
    assert failed == 0, f"{failed} judgments failed"
    return len(responses) / seconds


def judge_for(server: VllmServer, concurrency: int, engine: Any = None) -> LlmJudge:
    settings = JudgeSettings(base_url=server.base_url, model="tiny", concurrency=concurrency, max_tokens=512)
    return LlmJudge(settings, engine=engine)


def serve(model: Path, prefix_caching: bool, log: Path) -> VllmServer:
    spec = ServerSpec(
        model=str(model), served_name="tiny", port=free_port(), dtype="float32", max_model_len=4096,
        prefix_caching=prefix_caching, log_file=log,
    )  # fmt: skip
    return VllmServer(spec).start(timeout_seconds=600)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=48)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="overnight-bench-judge-"))
    model = build_tiny_model(work / "tiny-model")
    engine = storage.make_engine(f"sqlite:///{work / 'cache.db'}")
    storage.upgrade(engine)
    figures: dict[str, float] = {"items": args.items}
    shared = items(args.items, "shared")
    with serve(model, True, work / "on.log") as server:
        run_sync(judge_for(server, 4).score(RUBRIC, *items(8, "warmup")))
        figures["items_per_s_c1"] = throughput(judge_for(server, 1), *items(args.items, "c1"))
        figures["items_per_s_c16"] = throughput(judge_for(server, 16), *items(args.items, "c16"))
        throughput(judge_for(server, 16, engine), *shared)  # fills the cache
        figures["cache_hit_items_per_s"] = throughput(judge_for(server, 16, engine), *shared)
        figures["prefix_on_items_per_s"] = throughput(judge_for(server, 16), *items(args.items, "prefix"))
    with serve(model, False, work / "off.log") as server:
        run_sync(judge_for(server, 4).score(RUBRIC, *items(8, "warmup")))
        figures["prefix_off_items_per_s"] = throughput(judge_for(server, 16), *items(args.items, "prefix"))
    figures["concurrency_16_vs_1"] = figures["items_per_s_c16"] / figures["items_per_s_c1"]
    figures["prefix_caching_on_vs_off"] = figures["prefix_on_items_per_s"] / figures["prefix_off_items_per_s"]
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}, indent=2))
    print(
        f"\nconcurrency 16 vs 1: {figures['items_per_s_c16']:.2f} vs {figures['items_per_s_c1']:.2f} items/s "
        f"({figures['concurrency_16_vs_1']:.2f}x)\n"
        f"cache hits: {figures['cache_hit_items_per_s']:.0f} items/s\n"
        f"prefix caching on vs off: {figures['prefix_on_items_per_s']:.2f} vs {figures['prefix_off_items_per_s']:.2f} "
        f"items/s ({figures['prefix_caching_on_vs_off']:.2f}x)"
    )


if __name__ == "__main__":
    main()
