"""Serving benchmark: hot-swap vs restart, latency during swaps, multi-adapter throughput.

One real vLLM server on the tiny model (CPU build on a machine without a GPU), measured side by side
in one run:
  - swap latency (`pipeline.deploy.hotswap.deploy`: checksum, load, probe, switch, reset, verify, prune,
    record; start to verified) p50/max over `--swaps` swaps, vs a full restart (stop, start, load
    the champion, first answer), as a ratio;
  - request latency p50/p99 of 8 concurrent clients (half streaming) in steady state vs during the
    swaps, and the number of failed requests;
  - completion throughput (8 concurrent clients, 32 tokens each, `ignore_eos`) with the base model
    alone vs 1, 2 and 4 adapters active, in interleaved rounds; and the stable name after an in-place
    swap vs a pinned name (vLLM keeps `load_inplace` on the stored request, which reloads the adapter
    every engine step).

    .venv/bin/python bench/serve.py [--swaps 20] [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from peft import LoraConfig, get_peft_model
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session
from transformers import AutoModelForCausalLM

import storage
from pipeline.adapters import AdapterVersion, adapter_sha256
from pipeline.demo_world.tiny_model import build_tiny_model
from pipeline.deploy.hotswap import PROBE_PROMPTS, deploy
from pipeline.deploy.serving import load_champions, start_serving
from pipeline.deploy.vllm_client import VllmClient
from pipeline.deploy.vllm_process import ServerSpec, VllmServer, free_port
from storage.models import Deployment

CLIENTS = 8
PROMPTS = ("Hi!", "My printer is missing a part.", "What is 3 + 4?", "Thanks, bye.")


def make_adapter(model_dir: Path, out_dir: Path, seed: int) -> Path:
    """A rank-8 LoRA with seeded random A/B (PEFT's zero B would change nothing)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.35)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def version(model_dir: Path, root: Path, track: str, number: int, seed: int) -> AdapterVersion:
    path = make_adapter(model_dir, root / track / f"v{number}", seed)
    return AdapterVersion(track, number, path, adapter_sha256(path))


# --------------------------------------------------------------------------- load


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    tokens: int = 0


async def _chat(http: httpx.AsyncClient, model: str, prompt: str, stream: bool, load: Load) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 8,
        "stream": stream,
    }
    start = time.perf_counter()
    try:
        if stream:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = [line async for line in response.aiter_lines()]
                ok = response.status_code == 200 and "data: [DONE]" in lines
        else:
            response = await http.post("/v1/chat/completions", json=body)
            ok = response.status_code == 200
    except httpx.HTTPError:
        ok = False
    if ok:
        load.latencies.append(time.perf_counter() - start)
    else:
        load.failures += 1


def chat_load(base_url: str, model: str, stop: threading.Event, load: Load) -> threading.Thread:
    """8 clients in a background thread until `stop`; even-numbered clients stream."""

    async def client(index: int) -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=60.0) as http:
            n = index
            while not stop.is_set():
                await _chat(http, model, PROMPTS[n % len(PROMPTS)], index % 2 == 0, load)
                n += 1

    async def main() -> None:
        await asyncio.gather(*(client(i) for i in range(CLIENTS)))

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    return thread


async def _throughput(base_url: str, models: list[str], requests: int) -> float:
    """Completion tokens/s: `requests` completions of 32 tokens, 8 in flight, models round-robin."""
    queue = list(range(requests))
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while queue:
            n = queue.pop()
            body = {
                "model": models[n % len(models)],
                "prompt": f"Order {n}: {PROMPTS[n % len(PROMPTS)]}",
                "max_tokens": 32,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            response = await http.post("/v1/completions", json=body)
            response.raise_for_status()
            tokens += response.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
    return tokens / (time.perf_counter() - start)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- measurements


def restart_seconds(server: VllmServer, champion: AdapterVersion) -> float:
    start = time.perf_counter()
    server.stop()
    server.start(timeout_seconds=600)
    with VllmClient(server.base_url) as client:
        load_champions(client, [champion])
        client.chat(champion.track, PROBE_PROMPTS[0], max_tokens=16)
    return time.perf_counter() - start


@dataclass(frozen=True)
class SwapFigures:
    steady: Load  # chat load before any swap
    during: Load  # the same load while swapping
    swap_seconds: list[float]
    steps: list[tuple[str, float]]  # median ms per deploy step


def swaps_under_load(
    server: VllmServer, versions: list[AdapterVersion], swaps: int, engine: Engine, steady_seconds: float
) -> SwapFigures:
    steady, during = Load(), Load()
    stop = threading.Event()
    thread = chat_load(server.base_url, versions[0].track, stop, steady)
    time.sleep(steady_seconds)
    stop.set()
    thread.join()
    stop = threading.Event()
    thread = chat_load(server.base_url, versions[0].track, stop, during)
    seconds = []
    try:
        time.sleep(1.0)  # every client has a request in flight before the first swap
        for i in range(swaps):
            result = deploy(versions[(i + 1) % 2], [server.base_url], engine=engine)
            seconds.append(result.seconds)
    finally:
        stop.set()
        thread.join()
    return SwapFigures(steady, during, seconds, step_breakdown(engine))


def step_breakdown(engine: Engine) -> list[tuple[str, float]]:
    with Session(engine) as session:
        details = [row.detail for row in session.scalars(select(Deployment).where(Deployment.status == "ok"))]
    names = list(details[-1]["step_ms"])
    return [(name, statistics.median(d["step_ms"].get(name, 0.0) for d in details)) for name in names]


def throughputs(
    base_url: str, adapters: list[AdapterVersion], rounds: int, requests: int
) -> dict[str, float]:
    scenarios = {
        "base only": ["tiny"],
        "1 adapter": [adapters[0].pinned_name],
        "2 adapters": [a.pinned_name for a in adapters[:2]],
        "4 adapters": [a.pinned_name for a in adapters[:4]],
        "stable name after in-place swap": [adapters[0].track],
    }
    totals: dict[str, list[float]] = {name: [] for name in scenarios}
    for models in scenarios.values():  # warm-up round, not counted
        asyncio.run(_throughput(base_url, models, CLIENTS))
    for _ in range(rounds):
        for name, models in scenarios.items():
            totals[name].append(asyncio.run(_throughput(base_url, models, requests)))
    return {name: statistics.median(values) for name, values in totals.items()}


def hardware() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (vLLM CPU build)"
    return f"{os.cpu_count()} CPU cores ({model}), {gpu}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=8.0, help="steady-state load before the swaps")
    parser.add_argument("--requests", type=int, default=48, help="completions per throughput measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="overnight-bench-serve-"))
    model = build_tiny_model(work / "tiny-model")
    support = [version(model, work / "adapters", "support", n, seed=n) for n in (1, 2)]
    others = [version(model, work / "adapters", f"track{n}", 1, seed=10 + n) for n in (2, 3, 4)]
    engine = storage.make_engine(f"sqlite:///{work / 'overnight.db'}")
    storage.upgrade(engine)
    spec = ServerSpec(
        model=str(model), served_name="tiny", port=free_port(), dtype="float32", max_model_len=1024,
        max_loras=4, log_file=work / "server.log",
    )  # fmt: skip
    first_start = time.perf_counter()
    server = start_serving(spec, [support[0], *others], timeout_seconds=600)
    try:
        startup = time.perf_counter() - first_start
        with VllmClient(server.base_url) as client:
            client.load_adapter(support[1].pinned_name, str(support[1].path))
        swapped = swaps_under_load(server, support, args.swaps, engine, args.seconds)
        rates = throughputs(server.base_url, [support[0], *others], args.rounds, args.requests)
        restart = restart_seconds(server, support[0])
    finally:
        server.stop()
    report(startup, restart, swapped, rates, args.swaps)


def report(startup: float, restart: float, swapped: SwapFigures, rates: dict[str, float], swaps: int) -> None:
    swap_p50 = statistics.median(swapped.swap_seconds)
    steady, during = swapped.steady, swapped.during
    print(f"\nhardware: {hardware()}; torch {torch.__version__}; tiny Llama (0.56M params), float32")
    print("\n| figure | value |\n|---|---|")
    print(
        f"| swap latency, {swaps} swaps under load (deploy start to verified) | p50 {swap_p50 * 1000:.0f} ms, "
        f"max {max(swapped.swap_seconds) * 1000:.0f} ms |"
    )
    print(
        f"| full restart (stop, start, load champion, first answer) | {restart:.1f} s (first start {startup:.1f} s) |"
    )
    print(f"| restart / swap p50 | **{restart / swap_p50:.0f}x** |")
    print(f"| swap steps, median ms | {', '.join(f'{name} {ms:.0f}' for name, ms in swapped.steps)} |")
    for name, load in (("steady state", steady), ("during swaps", during)):
        print(
            f"| request latency {name} ({len(load.latencies)} requests, {load.failures} failed) | "
            f"p50 {percentile(load.latencies, 0.5) * 1000:.0f} ms, p99 {percentile(load.latencies, 0.99) * 1000:.0f} ms |"
        )
    base = rates["base only"]
    for name, rate in rates.items():
        print(f"| throughput, {name} | {rate:,.0f} tok/s ({rate / base:.2f}x base) |")
    if steady.failures or during.failures:
        raise SystemExit(f"{steady.failures + during.failures} requests failed")


if __name__ == "__main__":
    main()
