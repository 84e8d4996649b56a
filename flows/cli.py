"""`overnight`: the command line. Thin by design: parse, call a stage, print.

Human output is a rich table on stdout and progress bars on stderr; `--json` prints exactly one JSON
object on stdout. Exit codes: 0 success, 2 bad input or config (one line on stderr), 1 internal
failure.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from typer.core import TyperGroup

from pipeline.config import DEFAULT_CONFIG, OvernightConfig, load_config, starter_config_text
from storage.errors import UserError

stdout = Console()
stderr = Console(stderr=True)


class _Group(TyperGroup):
    """Turns a user's mistake into one line and exit 2, and a bug into exit 1."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except Exception as error:
            if (ctx.obj or {}).get("verbose"):
                traceback.print_exc()
            typer.echo(
                f"internal error: {type(error).__name__}: {error} (rerun with -v for details)", err=True
            )
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="[b]overnight[/b]: make a served LLM better every night from its own traffic, safely.\n\n"
    "Each night, per track (a LoRA adapter line on a shared base model): harvest the day's interactions, "
    "judge them with an LLM (RLAIF), run a bounded LoRA RL update, refuse candidates that forget, register "
    "the rest in MLflow and hot-swap them into vLLM.\n\n"
    "Start with [b]overnight init[/b], then [b]overnight db upgrade[/b]. Exit codes: 0 ok, 2 bad input or "
    "config, 1 internal error.",
)
db_app = typer.Typer(
    cls=_Group, no_args_is_help=True, help="Create or migrate the interaction store's schema."
)
app.add_typer(db_app, name="db")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of tables.")]


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"overnight {version('overnight')}")
        raise typer.Exit()


@app.callback()
def _global(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help=f"Config file (default: ./{DEFAULT_CONFIG} when present, else built-in defaults).",
        ),
    ] = None,
    json_output: JsonFlag = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress and show tracebacks.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_show_version, help="Print the version and exit."),
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # Prefect reads these when first imported (by `run`, `schedule`, `demo`): quiet unless -v, no telemetry.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not verbose:  # model-loading bars on every evaluation are noise next to the CLI's own progress
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    ctx.obj = {"config": config, "json": json_output, "verbose": verbose}


def _config(ctx: typer.Context) -> OvernightConfig:
    return load_config(ctx.obj["config"])


def _wants_json(ctx: typer.Context, local: bool) -> bool:
    return local or bool(ctx.obj.get("json"))


def _print_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, ensure_ascii=False, default=str) + "\n")


@contextmanager
def _progress(description: str, total: int | None, *, unit_bytes: bool = False) -> Iterator[Any]:
    """A progress bar on stderr; yields `advance(n)`."""
    speed = TransferSpeedColumn() if unit_bytes else TextColumn("")
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        speed,
        TimeElapsedColumn(),
    ]
    if unit_bytes:
        columns[2] = TextColumn("{task.percentage:>3.0f}%")
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


# -- commands ------------------------------------------------------------------------------------------


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write overnight.yaml.")] = Path(),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing overnight.yaml.")] = False,
) -> None:
    """Write a commented starter [b]overnight.yaml[/b] with two example tracks."""
    target = directory / DEFAULT_CONFIG
    if target.exists() and not force:
        raise UserError(f"{target} already exists (use --force to overwrite)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        target.write_text(starter_config_text(), encoding="utf-8")
    except OSError as error:
        raise UserError(f"{target}: cannot write: {error.strerror or error}") from None
    load_config(target)
    stderr.print(f"wrote {target}; next: [b]overnight db upgrade[/b]")


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context, json_output: JsonFlag = False) -> None:
    """Create the schema or migrate it to this version (safe to run again)."""
    import storage

    cfg = _config(ctx)
    engine = storage.make_engine(cfg.database.url)
    before, after = storage.upgrade(engine)
    payload = {"database": storage.safe_url(cfg.database.url), "from": before, "to": after}
    if _wants_json(ctx, json_output):
        _print_json(payload)
    else:
        state = "already at" if before == after else f"migrated from {before or 'empty'} to"
        stdout.print(f"{payload['database']}: {state} schema {after}")


@app.command()
def ingest(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="JSONL file, one interaction record per line.")],
    json_output: JsonFlag = False,
) -> None:
    """Import interaction records; bad lines go to quarantine with their line number and reason.

    Idempotent: a record already stored (same [i]id[/i], or same content when it has none) counts as a
    duplicate. Prints [i]{accepted, duplicates, quarantined, reasons}[/i].
    """
    import storage

    cfg = _config(ctx)
    if not file.is_file():
        raise UserError(f"{file}: no such file" if not file.exists() else f"{file}: not a regular file")
    engine = storage.connect(cfg.database.url)
    with _progress(f"ingest {file.name}", file.stat().st_size, unit_bytes=True) as advance:
        report = storage.ingest_jsonl(engine, file, batch_size=cfg.database.batch_size, progress=advance)
    if _wants_json(ctx, json_output):
        _print_json(report.as_json())
        return
    stdout.print(
        f"{file}: [green]{report.accepted} accepted[/], {report.duplicates} duplicates, "
        f"[yellow]{report.quarantined} quarantined[/]"
    )
    if report.reasons:
        table = Table("quarantine reason", "rows", title="quarantined (see the quarantine table)")
        for reason, count in report.reasons.most_common():
            table.add_row(reason, str(count))
        stdout.print(table)


@app.command()
def harvest(
    ctx: typer.Context,
    track: Annotated[str, typer.Argument(help="Track name from the config.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the redacted records to this JSONL file.")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """Preview tonight's snapshot of a track without committing its watermark.

    Prints [i]{track, rows, dropped: {reason: count}, sha256}[/i]; nothing is stored.
    """
    import storage
    from pipeline.harvest import stage as harvest_stage

    cfg = _config(ctx)
    spec = cfg.track(track)
    engine = storage.connect(cfg.database.url)
    with _progress(f"harvest {track}", None) as advance:
        result = harvest_stage.harvest(
            engine,
            track,
            spec.harvest,
            spec.filter,
            batch_size=cfg.database.batch_size,
            out=out,
            progress=advance,
        )
    if _wants_json(ctx, json_output):
        _print_json(result.as_json())
    else:
        stdout.print(
            harvest_table([result.as_json()], title=f"harvest preview: {track} (watermark not moved)")
        )
        if out is not None:
            stdout.print(f"wrote {result.rows_kept} redacted records to {out}")


@app.command()
def demo(
    ctx: typer.Context,
    nights: Annotated[int, typer.Option("--nights", min=1, max=30, help="Nights to simulate.")] = 1,
    rows: Annotated[int, typer.Option("--rows", min=10, help="Synthetic interactions per night.")] = 600,
    json_output: JsonFlag = False,
) -> None:
    """Run the whole loop on embedded defaults: a tiny local model served by a local vLLM server,
    synthetic traffic, SQLite, local MLflow, an ephemeral Prefect API, all under [b].overnight/demo/[/b].

    Each night: generate the day's traffic for the tracks [i]support[/i] (LLM judge) and [i]math[/i]
    (a programmatic grader the tiny model can learn), ingest it, and run the nightly flow: harvest,
    judge, select, bounded GRPO LoRA update, forgetting guard, MLflow registration, hot-swap into
    the server. Then ask each track's stable name a question. The server is stopped on the way out,
    Ctrl-C included.
    """
    from flows.demo import run_demo

    with stderr.status("starting") as status:
        summary = run_demo(nights, rows, on_stage=lambda text: status.update(text))
    if _wants_json(ctx, json_output):
        _print_json(summary)
        return
    from flows.cli_release import gate_table, night_table

    stdout.print(f"[dim]{summary['note']}[/dim]")
    for night in summary["nights"]:
        ingest = night["ingest"]
        stdout.print(
            f"[b]night {night['night']} ({night['label']})[/b]: ingested {ingest['accepted']}, "
            f"{ingest['duplicates']} duplicates, {ingest['quarantined']} quarantined"
        )
        stdout.print(night_table(night["tracks"], f"night {night['night']}"))
        for entry in night["tracks"]:
            if entry.get("gate") and entry["gate"].get("gates"):
                stdout.print(gate_table(entry["gate"], f"night {night['night']}, {entry['track']}: gate"))
    stdout.print(trend_table(summary["nights"]))
    answers = Table(
        "track", "served by", "question", "answer", title="asked through the server after the last night"
    )
    for answer in summary["answers"]:
        answers.add_row(answer["track"], answer["served_by"], answer["question"], repr(answer["answer"]))
    stdout.print(answers)
    browse = summary["browse"]
    stdout.print(f"browse the runs and versions: [b]{browse['mlflow']}[/b]")
    stdout.print(f"status of every track: [b]{browse['status']}[/b]")
    stdout.print(f"Prefect UI: [b]{browse['prefect']}[/b]")


def trend_table(nights: list[dict[str, Any]]) -> Table:
    """Held-out reward of champion and candidate per night and track: the loop's learning curve."""
    table = Table(
        "night", "track", "champion", "candidate", "gain CI", "status", title="held-out reward by night"
    )
    for night in nights:
        for entry in night["tracks"]:
            gates = {g["name"]: g for g in ((entry.get("gate") or {}).get("gates") or [])}
            gain = gates.get("heldout_gain")
            if gain is None:
                table.add_row(str(night["night"]), entry["track"], "-", "-", "-", entry["status"])
                continue
            interval = f"[{_fmt(gain['ci_low'])}, {_fmt(gain['ci_high'])}]"
            table.add_row(
                str(night["night"]),
                entry["track"],
                _fmt(gain.get("champion_metric")),
                _fmt(gain.get("metric")),
                interval,
                entry["status"],
            )
    return table


@app.command()
def judge(
    ctx: typer.Context,
    track: Annotated[str, typer.Argument(help="Track name from the config.")],
    limit: Annotated[int, typer.Option("--limit", min=1, help="Judge at most this many records.")] = 200,
    out: Annotated[Path | None, typer.Option("--out", help="Write scored records (JSONL) here.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Judge tonight's harvest preview with the track's rubric and report how the judge agrees with users.

    Uses the configured judge endpoint (default: the local vLLM server's base model); judgments are
    cached in the store, so running it again costs nothing. The watermark does not move.
    """
    import tempfile
    from itertools import islice

    import storage
    from pipeline.harvest import stage as harvest_stage
    from pipeline.judge.client import LlmJudge
    from pipeline.judge.rubrics import load_rubric
    from pipeline.judge.stage import judge_records, judge_settings

    cfg = _config(ctx)
    spec = cfg.track(track)
    rubric = load_rubric(spec.rubric)
    engine = storage.connect(cfg.database.url)
    with tempfile.TemporaryDirectory() as scratch:
        snapshot = Path(scratch) / "snapshot.jsonl"
        harvest_stage.harvest(
            engine, track, spec.harvest, spec.filter, batch_size=cfg.database.batch_size, out=snapshot
        )
        records = list(islice(harvest_stage.read_snapshot(snapshot), limit))
    scored_path = out or Path(cfg.home) / "judged" / f"{track}-preview.jsonl"
    llm_judge = LlmJudge(judge_settings(cfg.judge, cfg.serving), engine=engine)
    with _progress(f"judge {track} ({rubric.key})", len(records)) as advance:
        result = judge_records(
            records, rubric=rubric, judge=llm_judge, reward=spec.reward, out=scored_path, progress=advance
        )
    payload = {"track": track, "rubric": rubric.key, "judge_model": llm_judge.model, **result.as_json()}
    if _wants_json(ctx, json_output):
        _print_json(payload)
        return
    table = Table("metric", "value", title=f"judge preview: {track} with {rubric.key} by {llm_judge.model}")
    for name in ("rows", "scored", "failed", "skipped", "mean_reward"):
        table.add_row(name, _fmt(payload[name]))
    for name, value in payload["calibration"].items():
        table.add_row(f"calibration {name}", _fmt(value))
    for name in ("judge_calls", "judge_cache_hits", "judge_prompt_tokens", "judge_completion_tokens"):
        table.add_row(name.replace("_", " "), _fmt(payload["judge"][name]))
    stdout.print(table)
    stdout.print(f"scored records: {scored_path}")


def _judge_table(tracks: list[dict[str, Any]], title: str) -> Table:
    table = Table("track", "judged", "failed", "skipped", "reward", "ρ rating", "thumb acc", "calls", "hits",
                  title=title)  # fmt: skip
    for track in tracks:
        judged, calibration = track["judge"], track["judge"]["calibration"]
        table.add_row(
            track["track"],
            str(judged["scored"]),
            str(judged["failed"]),
            str(judged["skipped"]),
            _fmt(judged["mean_reward"]),
            _fmt(calibration.get("spearman_rating")),
            _fmt(calibration.get("thumb_accuracy")),
            _fmt(judged["judge"]["judge_calls"]),
            _fmt(judged["judge"]["judge_cache_hits"]),
        )
    return table


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.3f}" if isinstance(value, float) and not value.is_integer() else str(int(value))


def harvest_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table("track", "read", "kept", "dropped", "redacted", "sha256", title=title)
    for row in rows:
        dropped = ", ".join(f"{k} {v}" for k, v in row["dropped"].items()) or "-"
        redacted = ", ".join(f"{k} {v}" for k, v in row["redactions"].items()) or "-"
        table.add_row(row["track"], str(row["read"]), str(row["rows"]), dropped, redacted, row["sha256"][:12])
    return table


import flows.cli_release  # noqa: E402, F401  (registers run, status, gate, serve, deploy, rollback, schedule)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, so `with` blocks stop what they started (e.g. a vLLM server)."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    app()


if __name__ == "__main__":
    # `python -m flows.cli`: run the app of the imported module, where the release commands registered.
    from flows.cli import main as cli_main

    cli_main()
