"""`overnight run | gate | demo | schedule`: the nightly loop, its guard on any adapter, the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.app import JsonFlag, app, load, print_json, stderr, stdout, wants_json
from flows.cli.tables import (
    gate_table,
    night_table,
    trend_table,
    users_table,
)


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
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="If another runner holds a track's night, wait for it instead of reporting it."
        ),
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """Run the nightly flow now: harvest → judge → select → train → gate → register → deploy → commit.

    A night that died part-way is resumed after its last finished stage (state is kept in SQL);
    a night that finished is reported, not repeated, unless --force; a night another runner holds
    (a schedule, say) is reported as [i]running[/i] with who and since when, or waited for with
    --wait. Prefect starts a temporary local API when no PREFECT_API_URL is set.
    """
    from flows.nightly import nightly
    from pipeline.train.distill import check_teachers

    cfg = load(ctx)
    for name in track or []:
        cfg.track(name)
    check_teachers(cfg, track or [t.name for t in cfg.tracks])  # one line, before the flow starts
    with stderr.status("running the nightly flow"):
        summary = nightly(
            config_path=str(ctx.obj["config"]) if ctx.obj["config"] else None,
            tracks=track,
            night=night,
            force=force,
            wait_if_running=wait,
        )
    if wants_json(ctx, json_output):
        print_json(summary)
        return
    stdout.print(night_table(summary["tracks"], f"night {summary['night']}"))
    for entry in summary["tracks"]:
        if entry.get("gate") and entry["gate"].get("gates"):
            stdout.print(gate_table(entry["gate"], f"{entry['track']}: gate"))
    if any(entry["status"] == "failed" for entry in summary["tracks"]):
        raise typer.Exit(1)


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
    from pipeline.gate import stage as gate_stage
    from pipeline.services import api_key, night_judge, open_registry

    cfg = load(ctx)
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
        gate_stage.server_generator(
            cfg.serving.endpoints[0], cfg.serving.base_name, api_key(cfg), cfg.serving.request_timeout_seconds
        )
        if cfg.serving.endpoints
        else None
    )
    report_dir = out or Path(cfg.home) / "gates" / f"{track}-{candidate.resolve().name}"
    with stderr.status(f"gating {candidate} against {'the base' if champion is None else champion}"):
        decision = gate_stage.gate_track(
            cfg,
            track,
            candidate=candidate,
            champion=champion,
            heldout=gate_stage.latest_heldout(engine, track, cfg.train_for(track)),
            judge=night_judge(cfg, engine) if spec.reward.judge > 0 else None,
            generator=generator,
            report_dir=report_dir,
        )
    payload = decision.report_json()
    if wants_json(ctx, json_output):
        print_json(payload)
        return
    verdict = "[green]passed[/green]" if payload["passed"] else "[red]refused[/red]"
    stdout.print(gate_table(payload, f"{track}: {candidate} {verdict} ({payload['backend']})"))
    stdout.print(f"why: {payload['reason']}")
    stdout.print(
        f"report: {report_dir}/gate.md, plot: {report_dir}/gate_deltas.png, replies: {report_dir}/cases.jsonl"
    )


@app.command()
def demo(
    ctx: typer.Context,
    nights: Annotated[int, typer.Option("--nights", min=1, max=30, help="Nights to simulate.")] = 3,
    rows: Annotated[int, typer.Option("--rows", min=10, help="Synthetic interactions per night.")] = 800,
    users_per_day: Annotated[
        int | None,
        typer.Option(
            "--users",
            min=1,
            help="Simulated users who chat with the support track and rate it, per day [default: 256].",
            show_default=False,
        ),
    ] = None,
    distill: Annotated[
        bool,
        typer.Option(
            "--distill",
            help="The math track learns by on-policy distillation from the demo's teacher (a larger model, built once, "
            "about 2 minutes) instead of GRPO.",
        ),
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """Run the whole loop on embedded defaults: a small local model that knows some arithmetic,
    support answers, JSON and refusals (built once, about 10 minutes, then cached), served by a local
    vLLM server, with synthetic traffic, SQLite, local MLflow and an ephemeral Prefect API, all under
    [b].overnight/demo/[/b].

    Each night: generate the day's traffic, ingest it, let simulated users chat with the served
    [i]support[/i] track through the gateway and rate its replies, and run the nightly flow: harvest,
    judge, select, bounded LoRA update, forgetting guard, MLflow registration, deploy (the version
    loaded into vLLM, the track's route flipped in the gateway in front of it). [i]math[/i] learns by
    GRPO on the exact answer, its gain confirmed by the arithmetic suite; [i]support[/i] learns from
    its users' thumbs (SFT on its own best samples, ranked by a reward model fitted to the thumbs
    of every night so far), its gain confirmed by the
    concise-support suite, and its users' thumbs-up rate is shown day by day. Then ask each track's
    stable name a question through the gateway, which logs those exchanges into the demo's store.
    The gateway and the server are stopped on the way out, Ctrl-C included.
    """
    from flows.demo import run_demo

    with stderr.status("starting") as status:
        summary = run_demo(
            nights,
            rows,
            users_per_night=users_per_day,
            distill=distill,
            on_stage=lambda text: status.update(text),
        )
    if wants_json(ctx, json_output):
        print_json(summary)
        return
    stdout.print(f"[dim]{summary['note']}[/dim]")
    skills = ", ".join(f"{name} {value:.0%}" for name, value in summary["base_skills"].items())
    stdout.print(f"base model's skills (held-out suites, greedy; @T1: sampled): {skills}")
    for night in summary["nights"]:
        ingest = night["ingest"]
        stdout.print(
            f"[b]night {night['night']} ({night['label']})[/b]: ingested {ingest['accepted']}, "
            f"{ingest['duplicates']} duplicates, {ingest['quarantined']} quarantined"
        )
        users = night.get("users")
        if users:
            rate = users["thumbs_up_rate"]
            stdout.print(
                f"simulated users asked the support track {users['asked']} questions through the gateway "
                f"(answered by {', '.join(sorted(users['served_by'])) or '-'}): thumbs-up rate "
                f"[b]{'-' if rate is None else f'{rate:.0%}'}[/b] ({users['feedback_sent']} verdicts sent)"
            )
        stdout.print(night_table(night["tracks"], f"night {night['night']}"))
        for entry in night["tracks"]:
            if entry.get("gate") and entry["gate"].get("gates"):
                stdout.print(gate_table(entry["gate"], f"night {night['night']}, {entry['track']}: gate"))
    stdout.print(trend_table(summary["nights"]))
    stdout.print(users_table(summary["nights"], summary.get("users_after")))
    answers = Table(
        "track", "served by", "question", "answer", title="asked through the gateway after the last night"
    )
    for answer in summary["answers"]:
        answers.add_row(answer["track"], answer["served_by"], answer["question"], repr(answer["answer"]))
    stdout.print(answers)
    for answer in summary["answers"]:
        if "asked" in answer:
            stdout.print(
                f"{answer['track']} through the gateway, {answer['asked']} unseen sums (the arithmetic suite): "
                f"[b]{answer['right']}[/b] right as {answer['served_by']}, {answer['base_right']} as the base"
            )
    if "gateway" in summary:
        gateway = summary["gateway"]
        stdout.print(f"the gateway logged {gateway['captured']} of those exchanges into the demo's store")
    browse = summary["browse"]
    stdout.print(f"browse the runs and versions: [b]{browse['mlflow']}[/b]")
    stdout.print(f"status of every track: [b]{browse['status']}[/b]")
    stdout.print(f"Prefect UI: [b]{browse['prefect']}[/b]")


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

    cfg = load(ctx)
    register_schedule(cfg, cron=cron, config_path=ctx.obj["config"])
