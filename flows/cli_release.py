"""`overnight run | status | gate | serve | deploy | rollback | schedule`: the nightly loop and releases.

Registered on the same typer app as `flows.cli`; thin like it: parse, call the flow or a
`pipeline.deploy.release` function, print a table (or one JSON object with --json).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from flows.cli import JsonFlag, _config, _fmt, _print_json, _wants_json, app, stderr, stdout


@app.command()
def run(
    ctx: typer.Context,
    track: Annotated[
        list[str] | None, typer.Option("--track", "-t", help="Only this track (repeatable).")
    ] = None,
    night: Annotated[
        str | None, typer.Option("--night", help="Night label YYYY-MM-DD (default: today).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Run again a night that already finished.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Run the nightly flow now: harvest → judge → select → train → gate → register → deploy → commit.

    A night that died part-way is resumed after its last finished stage (state is kept in SQL);
    a night that finished is reported, not repeated, unless --force. Prefect starts a temporary
    local API when no PREFECT_API_URL is set.
    """
    from flows.nightly import nightly

    cfg = _config(ctx)
    for name in track or []:
        cfg.track(name)
    with stderr.status("running the nightly flow"):
        summary = nightly(
            config_path=str(ctx.obj["config"]) if ctx.obj["config"] else None,
            tracks=track,
            night=night,
            force=force,
        )
    if _wants_json(ctx, json_output):
        _print_json(summary)
        return
    stdout.print(night_table(summary["tracks"], f"night {summary['night']}"))
    for entry in summary["tracks"]:
        if entry.get("gate") and entry["gate"].get("gates"):
            stdout.print(gate_table(entry["gate"], f"{entry['track']}: gate"))
    if any(entry["status"] == "failed" for entry in summary["tracks"]):
        raise typer.Exit(1)


def night_table(entries: list[dict[str, Any]], title: str) -> Table:
    table = Table(
        "track", "status", "version", "rows", "reward", "steps", "stop", "KL", "deployed", "note", title=title
    )
    for entry in entries:
        trained = entry.get("train") or {}
        table.add_row(
            entry["track"],
            entry["status"],
            _fmt(entry.get("version")),
            _fmt(entry.get("rows")),
            _fmt(entry.get("mean_reward")),
            _fmt(trained.get("steps")),
            _fmt(trained.get("stop_reason")),
            _fmt(trained.get("kl")),
            "yes" if entry.get("deployed") else "no",
            entry.get("error") or ("already done" if entry.get("already_done") else ""),
        )
    return table


def gate_table(report: dict[str, Any], title: str) -> Table:
    table = Table("gate", "passed", "metric", "Δ vs champion", "CI", "threshold", "n", title=title)
    for gate in report["gates"]:
        low, high = gate.get("ci_low"), gate.get("ci_high")
        interval = "-" if gate.get("delta") is None else f"[{_fmt(low)}, {_fmt(high)}]"
        table.add_row(
            gate["name"],
            "[green]yes[/green]" if gate["passed"] else "[red]no[/red]",
            _fmt(gate.get("metric")),
            _fmt(gate.get("delta")),
            interval,
            _fmt(gate.get("threshold")),
            _fmt(gate.get("n")),
        )
    return table


@app.command()
def gate(
    ctx: typer.Context,
    track: Annotated[str, typer.Argument(help="Track name from the config.")],
    candidate: Annotated[Path, typer.Option("--candidate", help="Adapter directory to evaluate.")],
    champion: Annotated[
        Path | None,
        typer.Option(
            "--champion", help="Compare with this adapter directory instead of the registry's champion."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Where to write gate.json, gate.md, gate_deltas.png.")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Run the forgetting guard on any adapter directory against the champion.

    Base, champion and candidate answer the track's suites (and its memory suite) and the held-out
    prompts of the latest judged night; paired confidence intervals decide each gate. Generation
    goes through the first serving endpoint when it answers (the candidate under a temporary
    adapter name), in-process otherwise. Exit 0 whether or not the candidate passes.
    """
    import storage
    from pipeline.adapters import check_adapter_dir
    from pipeline.deploy.release import _api_key, open_registry
    from pipeline.gate import stage as gating
    from pipeline.judge.client import LlmJudge
    from pipeline.judge.rubrics import load_rubric
    from pipeline.judge.stage import judge_settings

    cfg = _config(ctx)
    spec = cfg.track(track)
    check_adapter_dir(candidate)
    engine = storage.connect(cfg.database.url)
    if champion is None:
        registry = open_registry(cfg)
        if registry.version_for(track, "champion") is not None:
            champion = registry.fetch(track, "champion").path
    else:
        check_adapter_dir(champion)
    generator = (
        gating.server_generator(
            cfg.serving.endpoints[0],
            cfg.serving.base_name,
            _api_key(cfg),
            cfg.serving.request_timeout_seconds,
        )
        if cfg.serving.endpoints
        else None
    )
    judge = LlmJudge(judge_settings(cfg.judge, cfg.serving), engine=engine) if spec.reward.judge > 0 else None
    report_dir = out or Path(cfg.home) / "gates" / f"{track}-{candidate.resolve().name}"
    with stderr.status(f"gating {candidate} against {'the base' if champion is None else champion}"):
        outcome = gating.gate_candidate(
            base_model=cfg.base_model_for(track),
            candidate=candidate,
            champion=champion,
            suites=gating.track_suites(cfg, track),
            gate=cfg.gate_for(track),
            scorer=gating.reward_scorer(spec.reward, judge, load_rubric(spec.rubric)),
            heldout=gating.latest_heldout(engine, track, cfg.train_for(track)),
            generator=generator,
            report_dir=report_dir,
        )
    payload = outcome.as_json()
    if _wants_json(ctx, json_output):
        _print_json(payload)
        return
    verdict = "[green]passed[/green]" if payload["passed"] else "[red]refused[/red]"
    stdout.print(gate_table(payload, f"{track}: {candidate} {verdict} ({payload['backend']})"))
    stdout.print(f"report: {report_dir}/gate.md, plot: {report_dir}/gate_deltas.png")


@app.command()
def status(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Per track: the champion, previous and challenger versions, what each endpoint serves, the last night."""
    import storage
    from pipeline.deploy.release import status as release_status

    cfg = _config(ctx)
    engine = storage.connect(cfg.database.url)
    payload = release_status(cfg, engine)
    if _wants_json(ctx, json_output):
        _print_json(payload)
        return
    table = Table(
        "track", "champion", "previous", "challenger", "serving", "last night", title="overnight status"
    )
    for entry in payload["tracks"]:
        serving = ", ".join(f"{_host(url)} {_version(v)}" for url, v in entry["serving"].items()) or "-"
        last = entry["last_run"]
        night = f"{last['night']} {last['status']}" if last else "-"
        table.add_row(
            entry["track"],
            _fmt(entry["champion"]),
            _fmt(entry["previous"]),
            _fmt(entry["challenger"]),
            serving,
            night,
        )
    stdout.print(table)


def _host(url: str) -> str:
    return url.split("://", 1)[-1].rstrip("/")


def _version(value: Any) -> str:
    return f"v{value}" if isinstance(value, int) else ("-" if value is None else str(value))


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

    cfg = _config(ctx)
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

    cfg = _config(ctx)
    engine = storage.connect(cfg.database.url)
    with stderr.status(f"rolling back {track}"):
        payload = release_rollback(cfg, engine, track, to, registry_only=registry_only)
    _release_output(ctx, json_output, payload)


def _release_output(ctx: typer.Context, json_output: bool, payload: dict[str, Any]) -> None:
    if _wants_json(ctx, json_output):
        _print_json(payload)
        return
    where = (
        "registry only (nothing served changed)"
        if payload["registry_only"]
        else (f"{len(payload['swap']['endpoints'])} endpoint(s) in {payload['swap']['seconds']:.2f}s")
    )
    stdout.print(
        f"{payload['track']}: {payload['action']} to v{payload['version']} (was v{_fmt(payload['previous'])}); {where}"
    )


@app.command()
def serve(ctx: typer.Context) -> None:
    """Start the vLLM server for the base model with every track's champion loaded; Ctrl-C stops it.

    Each champion is served under its stable name `<track>` and its pinned name `<track>@v<N>`.
    Settings come from the `serving` section (port, max_loras, max_lora_rank, api_key, extra_args).
    """
    from pipeline.deploy.release import open_registry
    from pipeline.deploy.serving import serve as serve_forever
    from pipeline.deploy.vllm_process import ServerSpec

    cfg = _config(ctx)
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


@app.command()
def schedule(
    ctx: typer.Context,
    cron: Annotated[
        str | None, typer.Option("--cron", help="Cron expression (default: schedule.cron).")
    ] = None,
) -> None:
    """Register the nightly Prefect deployment (time zone from schedule.timezone) and serve it.

    Without a work pool in the config, this process serves the deployment (keep it running, e.g.
    under systemd or the docker-compose worker); with `schedule.work_pool`, the deployment is
    registered for that pool's workers. Uses the Prefect server at PREFECT_API_URL.
    """
    from flows.schedule import register_schedule

    cfg = _config(ctx)
    register_schedule(cfg, cron=cron, config_path=ctx.obj["config"])
