"""`overnight status | deploy | rollback | serve | gateway`: what serves, moving versions, the servers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.cli.app import JsonFlag, app, fmt, load, print_json, stderr, stdout, wants_json
from flows.cli.tables import (
    host,
    version_name,
)
from storage.errors import UserError


@app.command()
def status(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Per track: the champion, previous and challenger versions, the gateway's route (the version the
    stable name goes to), whether each endpoint has it loaded, and the last night."""
    import storage
    from pipeline.deploy.release import status as release_status

    cfg = load(ctx)
    engine = storage.connect(cfg.database.url)
    payload = release_status(cfg, engine)
    if wants_json(ctx, json_output):
        print_json(payload)
        return
    table = Table(
        "track",
        "champion",
        "previous",
        "challenger",
        "route",
        "serving",
        "last night",
        title="overnight status",
    )
    for entry in payload["tracks"]:
        route = entry["route"]
        routed = f"v{route['version']}" if route else "base"
        serving = (
            ", ".join(
                f"{host(url)} {'not loaded' if v is None and route else version_name(v)}"
                for url, v in entry["serving"].items()
            )
            or "-"
        )
        last = entry["last_run"]
        night = f"{last['night']} {last['status']}" if last else "-"
        table.add_row(
            entry["track"],
            fmt(entry["champion"]),
            fmt(entry["previous"]),
            fmt(entry["challenger"]),
            routed,
            serving,
            night,
        )
    stdout.print(table)


@app.command()
def deploy(
    ctx: typer.Context,
    track: Annotated[str, typer.Argument(help="Track name.")],
    version: Annotated[int, typer.Argument(help="Registered version to serve.", min=1)],
    registry_only: Annotated[
        bool, typer.Option("--registry-only", help="Move only the registry aliases; serve nothing.")
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """Serve a registered version: load it on every endpoint, flip the gateway's route, then make it
    the champion.

    The adapter is verified against its recorded sha256 first; every endpoint loads it or the route
    does not move; the registry aliases move only after the route serves the version.
    """
    import storage
    from pipeline.deploy.release import deploy_version

    cfg = load(ctx)
    engine = storage.connect(cfg.database.url)
    with stderr.status(f"deploying {track} v{version}"):
        payload = deploy_version(cfg, engine, track, version, registry_only=registry_only)
    _release_output(ctx, json_output, payload)


@app.command()
def rollback(
    ctx: typer.Context,
    track: Annotated[str, typer.Argument(help="Track name.")],
    to: Annotated[
        int | None, typer.Option("--to", help="Version to go back to (default: `previous`).", min=1)
    ] = None,
    registry_only: Annotated[
        bool, typer.Option("--registry-only", help="Move only the registry aliases; serve nothing.")
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """Flip the route back to the previous version (or --to VERSION), then move `champion` and `previous` back."""
    import storage
    from pipeline.deploy.release import rollback as release_rollback

    cfg = load(ctx)
    engine = storage.connect(cfg.database.url)
    with stderr.status(f"rolling back {track}"):
        payload = release_rollback(cfg, engine, track, to, registry_only=registry_only)
    _release_output(ctx, json_output, payload)


def _release_output(ctx: typer.Context, json_output: bool, payload: dict[str, Any]) -> None:
    if wants_json(ctx, json_output):
        print_json(payload)
        return
    where = (
        "registry only (nothing served changed)"
        if payload["registry_only"]
        else (f"{len(payload['swap']['endpoints'])} endpoint(s) in {payload['swap']['seconds']:.2f}s")
    )
    stdout.print(
        f"{payload['track']}: {payload['action']} to v{payload['version']} (was v{fmt(payload['previous'])}); {where}"
    )


@app.command()
def serve(ctx: typer.Context) -> None:
    """Start the vLLM server with every track's champion loaded and the gateway in front; Ctrl-C stops both.

    vLLM serves each champion under its pinned name `<track>@v<N>`; clients call the gateway
    (`gateway.host`:`gateway.port`, OpenAI-compatible) with the stable name `<track>`, routed to the
    champion, and every exchange is logged into the store. Settings come from the `serving` section
    (port, max_loras, max_lora_rank, api_key, extra_args) and the `gateway` section.
    """
    import storage
    from pipeline.deploy.serving import Serving
    from pipeline.deploy.serving import serve as serve_forever
    from pipeline.deploy.vllm_process import ServerSpec
    from pipeline.services import open_registry

    cfg = load(ctx)
    serving = cfg.serving
    engine = storage.connect(cfg.database.url)
    registry = open_registry(cfg)
    champions = [
        registry.fetch(track.name, "champion")
        for track in cfg.tracks
        if registry.version_for(track.name, "champion") is not None
    ]
    spec = ServerSpec(
        model=serving.base_model,
        served_name=serving.base_name,
        host=serving.host,
        port=serving.port,
        max_loras=serving.max_loras,
        max_lora_rank=serving.max_lora_rank,
        max_model_len=serving.max_model_len,
        dtype=serving.dtype,
        extra_args=tuple(serving.extra_args),
        api_key=serving.api_key.get_secret_value() if serving.api_key else None,
        log_file=Path(cfg.home) / "vllm.log",
    )
    Path(cfg.home).mkdir(parents=True, exist_ok=True)
    endpoints = serving.endpoints or [spec.base_url]
    if spec.base_url not in endpoints:
        stderr.print(
            f"note: serving.endpoints does not list {spec.base_url}: the gateway sends traffic to "
            f"{', '.join(endpoints)} only"
        )

    def ready(running: Serving) -> None:
        names = ", ".join(f"{c.track} -> {c.pinned_name}" for c in champions) or "no champions yet"
        stdout.print(
            f"vLLM on {running.server.base_url}/v1 (base model {serving.base_name!r}); {names}",
            soft_wrap=True,
        )
        stdout.print(
            f"Point clients at {running.gateway.base_url}/v1 (model: a track name, `<track>@v<N>` "
            f"or {serving.base_name!r}). Ctrl-C stops both.",
            soft_wrap=True,
        )

    stderr.print(f"starting vLLM on {spec.base_url} (about a minute on CPU)")
    raise typer.Exit(
        serve_forever(
            spec,
            champions,
            engine=engine,
            gateway=cfg.gateway,
            endpoints=endpoints,
            tracks=[track.name for track in cfg.tracks],
            on_ready=ready,
            timeout_seconds=serving.startup_timeout_seconds,
        )
    )


@app.command()
def gateway(ctx: typer.Context) -> None:
    """Run only the gateway, in front of the vLLM servers in `serving.endpoints` (e.g. in a container).

    Stateless: routes, keys and the interaction log are in the store (`database.url`), so several
    gateways can share one store; each keeps its own spool (`gateway.spool_dir`). Ctrl-C or SIGTERM
    stops it after the requests in flight and the log queue are done.
    """
    import storage
    from pipeline.deploy.gateway.server import GatewayServer
    from pipeline.services import gateway_app

    cfg = load(ctx)
    if not cfg.serving.endpoints:
        raise UserError("serving.endpoints: no vLLM endpoint for the gateway to send requests to")
    engine = storage.connect(cfg.database.url)
    app_ = gateway_app(cfg, engine)
    front = GatewayServer(app_, cfg.gateway.host, cfg.gateway.port).start()
    try:
        stdout.print(
            f"gateway on {front.base_url}/v1 in front of {', '.join(cfg.serving.endpoints)}; Ctrl-C stops it.",
            soft_wrap=True,
        )
        while front.running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        return
    finally:
        front.stop()
    raise UserError(f"the gateway on {front.base_url} stopped (see the log above)")
