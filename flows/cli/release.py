"""`overnight status | deploy | rollback | serve`: what serves, moving versions, the server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.cli.app import JsonFlag, app, fmt, load, print_json, stderr, stdout, wants_json
from flows.cli.tables import (
    host,
    version_name,
)


@app.command()
def status(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Per track: the champion, previous and challenger versions, what each endpoint serves, the last night."""
    import storage
    from pipeline.deploy.release import status as release_status

    cfg = load(ctx)
    engine = storage.connect(cfg.database.url)
    payload = release_status(cfg, engine)
    if wants_json(ctx, json_output):
        print_json(payload)
        return
    table = Table(
        "track", "champion", "previous", "challenger", "serving", "last night", title="overnight status"
    )
    for entry in payload["tracks"]:
        serving = ", ".join(f"{host(url)} {version_name(v)}" for url, v in entry["serving"].items()) or "-"
        last = entry["last_run"]
        night = f"{last['night']} {last['status']}" if last else "-"
        table.add_row(
            entry["track"],
            fmt(entry["champion"]),
            fmt(entry["previous"]),
            fmt(entry["challenger"]),
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
    """Hot-swap a registered version onto every endpoint, then make it the champion.

    The adapter is verified against its recorded sha256 first; every endpoint switches or none does;
    the registry aliases move only after every endpoint serves the version.
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
    """Serve the previous version (or --to VERSION) again, then move `champion` and `previous` back."""
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
    """Start the vLLM server for the base model with every track's champion loaded; Ctrl-C stops it.

    Each champion is served under its stable name `<track>` and its pinned name `<track>@v<N>`.
    Settings come from the `serving` section (port, max_loras, max_lora_rank, api_key, extra_args).
    """
    from pipeline.deploy.serving import serve as serve_forever
    from pipeline.deploy.vllm_process import ServerSpec
    from pipeline.services import open_registry

    cfg = load(ctx)
    serving = cfg.serving
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

    def ready(server: Any) -> None:
        names = ", ".join(f"{c.track} (v{c.version})" for c in champions) or "no champions yet"
        stdout.print(
            f"vLLM listening on {server.base_url}/v1: base model as {serving.base_name!r}; tracks: {names}"
        )
        stdout.print("Ctrl-C stops it.")

    stderr.print(f"starting vLLM on {spec.base_url} (about a minute on CPU)")
    raise typer.Exit(
        serve_forever(spec, champions, on_ready=ready, timeout_seconds=serving.startup_timeout_seconds)
    )
