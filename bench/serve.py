"""Serving benchmark: deploy (route flip) vs restart, latency during deploys, multi-adapter throughput.

One real vLLM server on the tiny model (CPU build on a machine without a GPU) with the gateway in
front of it (as `overnight serve` runs them), measured side by side in one run:
  - swap latency (`pipeline.deploy.hotswap.deploy`: checksum, route read, load, probe, prune, route
    flip; start to flipped) p50/max over `--swaps` deploys, vs a full restart (stop, start, load
    the champion, first answer), as a ratio;
  - request latency p50/p99 of 8 concurrent clients (half streaming) calling the stable name through
    the gateway in steady state vs during the deploys, and the number of failed requests;
  - which version answered: every request sent a second or more after a flip must be answered by
    the new version (`X-Overnight-Model`), and every answer must be in the store with that version;
  - completion throughput (8 concurrent clients, 32 tokens each, `ignore_eos`) with the base model
    alone vs 1, 2 and 4 adapters active, in interleaved rounds, direct to vLLM; and the stable name
    through the gateway (routed to a pinned name) against the same pinned name direct.

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
from pipeline.config import GatewayConfig
from pipeline.demo_world.tiny_model import build_tiny_model
from pipeline.deploy.gateway import create_app
from pipeline.deploy.gateway.server import GatewayServer
from pipeline.deploy.hotswap import PROBE_PROMPTS, deploy
from pipeline.deploy.serving import load_champions, seed_routes, start_serving
from pipeline.deploy.vllm_client import VllmClient
from pipeline.deploy.vllm_process import ServerSpec, VllmServer, free_port
from storage.models import Deployment, Interaction

CLIENTS = 8
FLIP_SECONDS = 1.0  # a flip reaches every gateway within this (the route is re-read every 0.5 s)
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
    # (sent at, perf_counter; the adapter that answered, X-Overnight-Model; the interaction id)
    answers: list[tuple[float, str, str]] = field(default_factory=list)


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
        served = response.headers.get("x-overnight-model")
        if served is not None:
            load.answers.append((start, served, response.headers["x-overnight-interaction-id"]))
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
        client.chat(champion.pinned_name, PROBE_PROMPTS[0], max_tokens=16)
    return time.perf_counter() - start


@dataclass(frozen=True)
class SwapFigures:
    steady: Load  # chat load before any swap
    during: Load  # the same load while swapping
    swap_seconds: list[float]
    steps: list[tuple[str, float]]  # median ms per deploy step
    flips: list[tuple[float, str]]  # (perf_counter when the deploy returned, route flipped; pinned name)


@dataclass(frozen=True)
class Versions:
    """Which version answered the requests sent after each flip, and what the store logged."""

    after_refresh: int  # requests sent later than `refresh` after a flip (and before the next)
    stale_after_refresh: int  # of those, answered by another version than the flip's: must be 0
    stale_in_window: int  # sent within `refresh` of a flip and answered by the version before it
    logged: int  # answers found in the store
    logged_other_version: int  # stored with another adapter than the one the answer named: must be 0
    not_logged: int  # answered but not stored: must be 0


def check_versions(figures: SwapFigures, engine: Engine, refresh: float) -> Versions:
    answers = sorted(figures.during.answers)
    flips = figures.flips
    after = stale_after = stale_window = 0
    for sent, served, _ in answers:
        earlier = [(at, name) for at, name in flips if at <= sent]
        if not earlier:
            continue
        at, name = earlier[-1]
        if sent - at >= refresh:
            after += 1
            stale_after += served != name
        else:
            stale_window += served != name
    want = {interaction: served for _, served, interaction in [*figures.steady.answers, *answers]}
    with Session(engine) as session:
        rows = session.execute(
            select(Interaction.client_id, Interaction.model).where(Interaction.client_id.in_(list(want)))
        ).all()
    stored = {str(client_id): model for client_id, model in rows}
    return Versions(
        after_refresh=after,
        stale_after_refresh=stale_after,
        stale_in_window=stale_window,
        logged=len(stored),
        logged_other_version=sum(stored[i] != want[i] for i in stored),
        not_logged=len(set(want) - set(stored)),
    )


def swaps_under_load(
    server: VllmServer,
    gateway_url: str,
    versions: list[AdapterVersion],
    swaps: int,
    engine: Engine,
    steady_seconds: float,
) -> SwapFigures:
    steady, during = Load(), Load()
    stop = threading.Event()
    thread = chat_load(gateway_url, versions[0].track, stop, steady)
    time.sleep(steady_seconds)
    stop.set()
    thread.join()
    stop = threading.Event()
    thread = chat_load(gateway_url, versions[0].track, stop, during)
    seconds, flips = [], []
    try:
        time.sleep(1.0)  # every client has a request in flight before the first swap
        for i in range(swaps):
            target = versions[(i + 1) % 2]
            result = deploy(target, [server.base_url], engine=engine, unload_grace_seconds=0)
            flips.append((time.perf_counter(), target.pinned_name))
            seconds.append(result.seconds)
            time.sleep(FLIP_SECONDS + 1.0)  # requests past the flip's visibility before the next one
    finally:
        stop.set()
        thread.join()
    return SwapFigures(steady, during, seconds, step_breakdown(engine), flips)


def step_breakdown(engine: Engine) -> list[tuple[str, float]]:
    with Session(engine) as session:
        details = [row.detail for row in session.scalars(select(Deployment).where(Deployment.status == "ok"))]
    names = list(details[-1]["step_ms"])
    return [(name, statistics.median(d["step_ms"].get(name, 0.0) for d in details)) for name in names]


def throughputs(
    base_url: str, gateway_url: str, adapters: list[AdapterVersion], rounds: int, requests: int
) -> dict[str, float]:
    scenarios = {
        "base only": (base_url, ["tiny"]),
        "1 adapter": (base_url, [adapters[0].pinned_name]),
        "2 adapters": (base_url, [a.pinned_name for a in adapters[:2]]),
        "4 adapters": (base_url, [a.pinned_name for a in adapters[:4]]),
        "stable name through the gateway": (gateway_url, [adapters[0].track]),
    }
    totals: dict[str, list[float]] = {name: [] for name in scenarios}
    for url, models in scenarios.values():  # warm-up round, not counted
        asyncio.run(_throughput(url, models, CLIENTS))
    for _ in range(rounds):
        for name, (url, models) in scenarios.items():
            totals[name].append(asyncio.run(_throughput(url, models, requests)))
    return {name: statistics.median(values) for name, values in totals.items()}


def proc_stat(stat: str) -> tuple[int, int]:
    """(process group, utime + stime in clock ticks) from a /proc/<pid>/stat line."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[2]), int(fields[11]) + int(fields[12])


def group_pids(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (vLLM's server, engine core and workers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if proc_stat(stat.read_text())[0] == pgid:
                pids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


@dataclass(frozen=True)
class Cores:
    """Where vLLM runs and where the rest does. vLLM's CPU engine spins its OpenMP threads on every
    core it is given, so on a shared core any other process's work (the gateway, the clients) is lost
    engine time; pinned apart, each side gets its own, as on a GPU server."""

    vllm: int | None  # the core vLLM is pinned to; None: not pinned
    rest: frozenset[int]

    @classmethod
    def split(cls, *, pin: bool) -> Cores:
        cores = sorted(os.sched_getaffinity(0))
        if not pin or len(cores) < 2:
            return cls(None, frozenset(cores))
        return cls(cores[0], frozenset(cores[1:]))

    def vllm_env(self) -> dict[str, str]:
        return {} if self.vllm is None else {"VLLM_CPU_OMP_THREADS_BIND": str(self.vllm)}

    def apply(self, server: VllmServer) -> str:
        """Pin a started server's processes and this one (children inherit it); what was done, in words."""
        if self.vllm is None:
            return "not pinned"
        for pid in group_pids(server.pid or 0):
            os.sched_setaffinity(pid, {self.vllm})
        os.sched_setaffinity(0, set(self.rest))
        return f"vLLM pinned to core {self.vllm}, the rest to {sorted(self.rest)}"


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
    parser.add_argument("--no-pin", action="store_true", help="vLLM and the rest share every core")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="overnight-bench-serve-"))
    model = build_tiny_model(work / "tiny-model")
    support = [version(model, work / "adapters", "support", n, seed=n) for n in (1, 2)]
    others = [version(model, work / "adapters", f"track{n}", 1, seed=10 + n) for n in (2, 3, 4)]
    engine = storage.make_engine(f"sqlite:///{work / 'overnight.db'}")
    storage.upgrade(engine)
    cores = Cores.split(pin=not args.no_pin)
    spec = ServerSpec(
        model=str(model), served_name="tiny", port=free_port(), dtype="float32", max_model_len=1024,
        max_loras=4, log_file=work / "server.log", env=cores.vllm_env(),
    )  # fmt: skip
    first_start = time.perf_counter()
    server = start_serving(spec, [support[0], *others], timeout_seconds=600)
    startup = time.perf_counter() - first_start
    layout = cores.apply(server)  # the gateway runs in this process: on the cores vLLM is not on
    seed_routes(engine, [support[0], *others])
    settings = GatewayConfig(port=free_port(), spool_dir=str(work / "spool"))
    tracks = [a.track for a in (support[0], *others)]
    app = create_app(engine, endpoints=[server.base_url], base_name="tiny", tracks=tracks, settings=settings)
    try:
        with GatewayServer(app, settings.host, settings.port) as gateway:
            with VllmClient(server.base_url) as client:
                client.load_adapter(support[1].pinned_name, str(support[1].path))
            swapped = swaps_under_load(server, gateway.base_url, support, args.swaps, engine, args.seconds)
            rates = throughputs(
                server.base_url, gateway.base_url, [support[0], *others], args.rounds, args.requests
            )
        versions = check_versions(swapped, engine, FLIP_SECONDS)  # the gateway stopped: its log flushed
        restart = restart_seconds(server, support[0])
    finally:
        server.stop()
    report(startup, restart, swapped, rates, args.swaps, versions, layout)


def report(
    startup: float,
    restart: float,
    swapped: SwapFigures,
    rates: dict[str, float],
    swaps: int,
    versions: Versions,
    layout: str,
) -> None:
    swap_p50 = statistics.median(swapped.swap_seconds)
    steady, during = swapped.steady, swapped.during
    print(
        f"\nhardware: {hardware()}; torch {torch.__version__}; tiny Llama (0.56M params), float32; {layout}"
    )
    print("\n| figure | value |\n|---|---|")
    print(
        f"| swap latency, {swaps} deploys under load (deploy start to route flipped) | p50 {swap_p50 * 1000:.0f} ms, "
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
    stable, pinned = rates["stable name through the gateway"], rates["1 adapter"]
    print(f"| stable name through the gateway / the pinned name direct | **{stable / pinned:.2f}x** |")
    print(
        f"| requests sent {FLIP_SECONDS:.0f} s or more after a flip answered by another version | "
        f"{versions.stale_after_refresh} of {versions.after_refresh} |"
    )
    print(
        f"| requests sent within {FLIP_SECONDS:.0f} s of a flip answered by the version before | {versions.stale_in_window} |"
    )
    print(
        f"| answers logged with the version that served them | {versions.logged - versions.logged_other_version} of "
        f"{versions.logged + versions.not_logged} ({versions.not_logged} not logged) |"
    )
    if steady.failures or during.failures:
        raise SystemExit(f"{steady.failures + during.failures} requests failed")
    if versions.stale_after_refresh or versions.logged_other_version or versions.not_logged:
        raise SystemExit(
            "a request after a flip was answered by the old version, or an answer was not logged"
        )


if __name__ == "__main__":
    main()
