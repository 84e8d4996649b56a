"""Gateway benchmark: what the gateway costs in front of vLLM, and a store outage under load.

One real vLLM server on the tiny model (CPU build where there is no GPU) with one track's champion
loaded under its pinned name, and the gateway in front of it as its own process (`overnight gateway`,
as docker-compose runs it), logging into PostgreSQL (a scratch database, dropped afterwards; SQLite
with `--sqlite`). On a CPU machine vLLM's engine is pinned to the first core and this script and
the gateway to the others (`--no-pin` to share them all): the engine's OpenMP threads spin, so on
shared cores any other process's work shows up as the engine's lost time (measured: 0.55-0.86x
throughput through a gateway using 3 ms of CPU a request), while on a GPU server the gateway never
competes with the model. Measured side by side in one run:

  - latency p50/p99 and throughput at 1, 8 and 16 concurrent clients, in interleaved rounds (the
    order rotates each round), non-streamed chats of exactly 16 tokens (`ignore_eos`):
      direct   the pinned name `support@v1` straight to vLLM
      pinned   the same pinned name through the gateway (the gateway's own cost)
      stable   the stable name `support` through the gateway (routed to `support@v1`)
    overhead = gateway p50 (p99) − direct p50 (p99); ratio = gateway throughput ÷ direct; and the
    CPU time per request of the gateway process and of vLLM's processes (from /proc);
  - capture: every answer the gateway gave is an interaction in the store, once, with the version
    that served it (`model` = `support@v1`) and the id the client was given;
  - a store outage under load: 16 clients through the gateway while the store refuses every
    connection for `--outage` seconds (PostgreSQL: `ALLOW_CONNECTIONS false` and its sessions
    terminated; SQLite: the database's directory moved away): requests answered and failed,
    records lost (answered but not stored, or stored twice), and the replay time from the store's
    return to the last spooled record stored.

    .venv/bin/python bench/gateway.py [--rounds 3] [--requests 12] [--outage 10] [--sqlite] [--no-pin]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import yaml
from serve import Cores, hardware, proc_stat  # bench/serve.py: this script's folder is first on sys.path
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import Session

import storage
from pipeline.adapters import AdapterVersion, adapter_sha256
from pipeline.demo_world.planted import damaged_adapter
from pipeline.demo_world.tiny_model import build_tiny_model
from pipeline.deploy.serving import seed_routes, start_serving
from pipeline.deploy.vllm_process import ServerSpec, free_port
from storage.models import Interaction

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "OVERNIGHT_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TRACK = "support"
TOKENS = 16
PROMPTS = ("Hi!", "My printer is missing a part.", "What is 3 + 4?", "Thanks, bye.")


# --------------------------------------------------------------------------- load


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    ids: list[str] = field(default_factory=list)  # interaction ids the gateway handed out
    served_by: dict[str, int] = field(default_factory=dict)  # X-Overnight-Model -> answers
    seconds: float = 0.0
    gateway_cpu: float = 0.0  # CPU seconds the gateway process used during this load
    vllm_cpu: float = 0.0  # CPU seconds vLLM's processes used during this load

    def cpu_ms(self, seconds: float) -> float:
        return 1000 * seconds / self.answered if self.answered else 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies)

    def per_second(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0


async def _ask(http: httpx.AsyncClient, model: str, n: int, load: Load) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}],
        "max_tokens": TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "user": f"bench-user-{n % 50}",
    }
    start = time.perf_counter()
    try:
        response = await http.post("/v1/chat/completions", json=body)
    except httpx.HTTPError:
        load.failures += 1
        return
    if response.status_code != 200:
        load.failures += 1
        return
    load.latencies.append(time.perf_counter() - start)
    served = response.headers.get("x-overnight-model")
    if served is not None:
        load.served_by[served] = load.served_by.get(served, 0) + 1
        load.ids.append(response.headers["x-overnight-interaction-id"])


async def _clients(
    base_url: str, model: str, clients: int, keep_going: Callable[[int], bool], load: Load
) -> None:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=120.0, limits=limits) as http:

        async def client(index: int) -> None:
            sent = 0
            while keep_going(sent):
                await _ask(http, model, index * 1000 + sent, load)
                sent += 1

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        load.seconds += time.perf_counter() - start


def fixed_load(base_url: str, model: str, clients: int, requests: int, load: Load) -> None:
    """`clients` concurrent clients, `requests` each, one after another."""
    asyncio.run(_clients(base_url, model, clients, lambda sent: sent < requests, load))


def cpu_seconds(pid: int, *, group: bool = False) -> float:
    """CPU seconds used so far by `pid`, or by every live process of its process group."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pgid, ticks = proc_stat(stat.read_text())
        except (OSError, IndexError, ValueError):
            continue
        if (group and pgid == pid) or stat.parent.name == str(pid):
            total += ticks
    return total / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- the store


@dataclass
class Store:
    url: str
    engine: Engine
    cut: Callable[[], None]
    restore: Callable[[], None]
    label: str


@contextmanager
def postgres_store() -> Iterator[Store]:
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"overnight_bench_gateway_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    engine = storage.make_engine(url)

    def allow(allowed: bool) -> None:
        with admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(allowed).lower()}'))
            if not allowed:
                connection.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                    {"name": name},
                )

    try:
        storage.upgrade(engine)
        version = admin.connect().execute(text("SHOW server_version")).scalar()
        yield Store(url, engine, lambda: allow(False), lambda: allow(True), f"PostgreSQL {version}")
    finally:
        allow(True)
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def sqlite_store(work: Path) -> Iterator[Store]:
    folder, away = work / "db", work / "db-away"
    folder.mkdir()
    url = f"sqlite:///{folder / 'overnight.db'}"
    engine = storage.make_engine(url)
    storage.upgrade(engine)
    try:
        yield Store(url, engine, lambda: folder.rename(away), lambda: away.rename(folder), "SQLite")
    finally:
        engine.dispose()


def _count_by(engine: Engine, column: Any) -> dict[str, int]:
    with Session(engine) as session:
        rows = session.execute(
            select(column, func.count()).where(Interaction.track == TRACK).group_by(column)
        )
        return {str(value): count for value, count in rows}


def stored(engine: Engine) -> dict[str, int]:
    """Stored gateway interactions: client id -> how many rows carry it."""
    return _count_by(engine, Interaction.client_id)


def stored_models(engine: Engine) -> dict[str, int]:
    """Stored gateway interactions: the adapter that answered -> how many."""
    return _count_by(engine, Interaction.model)


def wait_for(condition: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until `condition` held, None if it did not within `timeout`."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        try:
            if condition():
                return time.perf_counter() - start
        except Exception:  # the store may still be coming back
            pass
        time.sleep(0.05)
    return None


# --------------------------------------------------------------------------- the gateway process


@contextmanager
def gateway_process(work: Path, store: Store, model_dir: Path, vllm_url: str) -> Iterator[tuple[str, int]]:
    """`overnight gateway` in its own process; yields its base URL and pid once it answers /health."""
    port = free_port()
    config = {
        "home": str(work / "home"),
        "database": {"url": store.url},
        "tracks": [{"name": TRACK}],
        "serving": {"base_model": str(model_dir), "base_name": "tiny", "endpoints": [vllm_url]},
        "gateway": {"port": port, "spool_dir": str(work / "spool")},
    }
    path = work / "overnight.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (work / "gateway.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "-c", str(path), "gateway"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise SystemExit(f"the gateway exited with {process.returncode}; see {work / 'gateway.log'}")
            return httpx.get(f"{url}/health", timeout=1.0).status_code == 200

        if wait_for(up, 60.0) is None:
            raise SystemExit(f"the gateway did not start; see {work / 'gateway.log'}")
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


# --------------------------------------------------------------------------- measurements


SCENARIOS = ("direct", "pinned", "stable")
CLIENTS = (1, 8, 16)


@dataclass(frozen=True)
class Pids:
    gateway: int
    vllm: int  # vLLM's process group: the API server, its engine core and workers


def measured(pids: Pids, load: Load, run: Callable[[], None]) -> None:
    gateway, vllm = cpu_seconds(pids.gateway), cpu_seconds(pids.vllm, group=True)
    run()
    load.gateway_cpu += cpu_seconds(pids.gateway) - gateway
    load.vllm_cpu += cpu_seconds(pids.vllm, group=True) - vllm


def overhead(
    vllm_url: str, gateway_url: str, pinned: str, clients: int, rounds: int, requests: int, pids: Pids
) -> dict[str, Load]:
    targets = {"direct": (vllm_url, pinned), "pinned": (gateway_url, pinned), "stable": (gateway_url, TRACK)}
    loads = {name: Load() for name in SCENARIOS}
    for url, model in targets.values():  # warm-up, not counted
        fixed_load(url, model, clients, 1, Load())
    for round_ in range(rounds):
        order = SCENARIOS[round_ % 3 :] + SCENARIOS[: round_ % 3]
        for name in order:
            url, model = targets[name]
            measured(pids, loads[name], partial(fixed_load, url, model, clients, requests, loads[name]))
    return loads


@dataclass
class OutageFigures:
    load: Load
    answered_during: int  # requests answered while the store refused every connection
    replay_seconds: float | None  # store back -> every record answered until then stored
    stored: dict[str, int]
    store: str


def outage(gateway_url: str, store: Store, seconds: float, clients: int) -> OutageFigures:
    """`clients` clients for `seconds` before, `seconds` during and `seconds` after an outage."""
    load = Load()
    stop = threading.Event()
    thread = threading.Thread(
        target=lambda: asyncio.run(_clients(gateway_url, TRACK, clients, lambda _: not stop.is_set(), load)),
        daemon=True,
    )
    before = set(stored(store.engine))
    thread.start()
    time.sleep(seconds)
    store.cut()
    answered_at_cut = load.answered
    time.sleep(seconds)
    answered_during = load.answered - answered_at_cut
    store.restore()
    restored = time.perf_counter()
    owed = set(load.ids)  # every answer so far, the spooled ones included
    replay = wait_for(lambda: owed <= set(stored(store.engine)), timeout=120.0)
    time.sleep(max(0.0, seconds - (time.perf_counter() - restored)))
    stop.set()
    thread.join()
    answered = set(load.ids)
    wait_for(lambda: answered <= set(stored(store.engine)), timeout=120.0)
    figures = {k: v for k, v in stored(store.engine).items() if k not in before}
    return OutageFigures(load, answered_during, replay, figures, store.label)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per concurrency")
    parser.add_argument("--requests", type=int, default=12, help="requests per client per round")
    parser.add_argument(
        "--outage", type=float, default=10.0, help="seconds before, during and after the outage"
    )
    parser.add_argument("--sqlite", action="store_true", help="log into SQLite instead of PostgreSQL")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let every process use every core (default: vLLM on the first core, the rest elsewhere)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="overnight-bench-gateway-"))
    model = build_tiny_model(work / "tiny-model")
    path = damaged_adapter(str(model), work / "adapters" / TRACK / "v1", b_std=0.35, seed=1)
    champion = AdapterVersion(TRACK, 1, path, adapter_sha256(path))
    cores = Cores.split(pin=not args.no_pin)
    spec = ServerSpec(
        model=str(model), served_name="tiny", port=free_port(), dtype="float32", max_model_len=1024,
        max_loras=2, log_file=work / "server.log", env=cores.vllm_env(),
    )  # fmt: skip
    with sqlite_store(work) if args.sqlite else postgres_store() as store:
        seed_routes(store.engine, [champion])
        server = start_serving(spec, [champion], timeout_seconds=600)
        layout = cores.apply(server)  # the gateway, started below, inherits this process's cores
        try:
            with gateway_process(work, store, model, server.base_url) as (gateway_url, gateway_pid):
                pids = Pids(gateway_pid, server.pid or 0)
                by_clients = {
                    clients: overhead(
                        server.base_url,
                        gateway_url,
                        champion.pinned_name,
                        clients,
                        args.rounds,
                        max(args.requests, 96 // clients),  # one client: 96 requests a round
                        pids,
                    )
                    for clients in CLIENTS
                }
                gateway_ids = [
                    i
                    for loads in by_clients.values()
                    for name in ("pinned", "stable")
                    for i in loads[name].ids
                ]
                captured = wait_for(lambda: set(gateway_ids) <= set(stored(store.engine)), timeout=60.0)
                capture = (stored(store.engine), stored_models(store.engine))
                down = outage(gateway_url, store, args.outage, 16)
        finally:
            server.stop()
    report(by_clients, gateway_ids, captured, capture, down, champion.pinned_name, layout)


def report(
    by_clients: dict[int, dict[str, Load]],
    gateway_ids: list[str],
    captured: float | None,
    capture: tuple[dict[str, int], dict[str, int]],
    down: OutageFigures,
    pinned: str,
    layout: str,
) -> None:
    import torch

    print(
        f"\nhardware: {hardware()}; torch {torch.__version__}; tiny Llama, float32; store: {down.store}; {layout}"
    )
    print(
        "\n| clients | route | requests | failed | p50 ms | p99 ms | overhead p50 / p99 ms | req/s | ratio "
        "| CPU ms/request: gateway, vLLM |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for clients, loads in by_clients.items():
        direct = loads["direct"]
        d50, d99 = percentile(direct.latencies, 0.5), percentile(direct.latencies, 0.99)
        for name in SCENARIOS:
            load = loads[name]
            p50, p99 = percentile(load.latencies, 0.5), percentile(load.latencies, 0.99)
            extra = "" if name == "direct" else f"{(p50 - d50) * 1000:+.1f} / {(p99 - d99) * 1000:+.1f}"
            ratio = load.per_second() / direct.per_second()
            print(
                f"| {clients} | {name} | {load.answered} | {load.failures} | {p50 * 1000:.1f} | {p99 * 1000:.1f} | "
                f"{extra} | {load.per_second():.1f} | {ratio:.2f} | "
                f"{load.cpu_ms(load.gateway_cpu):.2f}, {load.cpu_ms(load.vllm_cpu):.1f} |"
            )
    rows, models = capture
    missing = [i for i in gateway_ids if i not in rows]
    twice = sum(1 for i in gateway_ids if rows.get(i, 0) > 1)
    wrong = sum(count for model, count in models.items() if model != pinned)
    print(
        f"\ncapture: {len(gateway_ids)} answers through the gateway; {len(gateway_ids) - len(missing)} stored "
        f"(within {captured if captured is None else round(captured, 2)} s of the last answer), {twice} twice, "
        f"{len(missing)} missing; stored with model {models} ({wrong} not {pinned})"
    )
    load = down.load
    lost = [i for i in set(load.ids) if i not in down.stored]
    doubled = sum(1 for i in set(load.ids) if down.stored.get(i, 0) > 1)
    replay = "not within 120 s" if down.replay_seconds is None else f"{down.replay_seconds:.2f} s"
    print(
        f"outage: {load.answered + load.failures} requests from 16 clients, {load.answered} answered, "
        f"{load.failures} failed; {down.answered_during} of them answered while the store refused connections; "
        f"records lost {len(lost)}, stored twice {doubled}; replay: every record answered before the store came "
        f"back was stored {replay} after it did"
    )
    failed = sum(x.failures for loads in by_clients.values() for x in loads.values()) + load.failures
    if failed or missing or twice or wrong or lost or doubled:
        raise SystemExit("the gateway failed a request or lost a record (see above)")


if __name__ == "__main__":
    main()
