"""`overnight init | db upgrade | ingest | harvest | judge`: the store and tonight's data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.app import JsonFlag, app, db_app, fmt, load, print_json, progress, stderr, stdout, wants_json
from flows.cli.tables import (
    harvest_table,
)
from pipeline.config import DEFAULT_CONFIG, load_config, starter_config_text
from storage.errors import UserError


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

    cfg = load(ctx)
    engine = storage.make_engine(cfg.database.url)
    before, after = storage.upgrade(engine)
    payload = {"database": storage.safe_url(cfg.database.url), "from": before, "to": after}
    if wants_json(ctx, json_output):
        print_json(payload)
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

    cfg = load(ctx)
    if not file.is_file():
        raise UserError(f"{file}: no such file" if not file.exists() else f"{file}: not a regular file")
    engine = storage.connect(cfg.database.url)
    with progress(f"ingest {file.name}", file.stat().st_size, unit_bytes=True) as advance:
        report = storage.ingest_jsonl(engine, file, batch_size=cfg.database.batch_size, progress=advance)
    if wants_json(ctx, json_output):
        print_json(report.as_json())
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
    from pipeline.harvest.pseudonyms import pseudonym_key

    cfg = load(ctx)
    spec = cfg.track(track)
    engine = storage.connect(cfg.database.url)
    with progress(f"harvest {track}", None) as advance:
        result = harvest_stage.harvest(
            engine,
            track,
            spec.harvest,
            spec.filter,
            batch_size=cfg.database.batch_size,
            out=out,
            progress=advance,
            pseudonym_key=pseudonym_key(cfg.pseudonym_key_text(), cfg.home),
        )
    if wants_json(ctx, json_output):
        print_json(result.as_json())
    else:
        stdout.print(
            harvest_table([result.as_json()], title=f"harvest preview: {track} (watermark not moved)")
        )
        if out is not None:
            stdout.print(f"wrote {result.rows_kept} redacted records to {out}")


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
    from pipeline.harvest.pseudonyms import pseudonym_key
    from pipeline.judge.stage import judge_snapshot
    from pipeline.services import night_judge

    cfg = load(ctx)
    spec = cfg.track(track)
    engine = storage.connect(cfg.database.url)
    with tempfile.TemporaryDirectory() as scratch:
        snapshot = Path(scratch) / "snapshot.jsonl"
        harvest_stage.harvest(
            engine,
            track,
            spec.harvest,
            spec.filter,
            batch_size=cfg.database.batch_size,
            out=snapshot,
            pseudonym_key=pseudonym_key(cfg.pseudonym_key_text(), cfg.home),
        )
        records = list(islice(harvest_stage.read_snapshot(snapshot), limit))
    scored_path = out or Path(cfg.home) / "judged" / f"{track}-preview.jsonl"
    llm_judge = night_judge(cfg, engine)
    with progress(f"judge {track} ({spec.rubric})", len(records)) as advance:
        judged = judge_snapshot(records, spec=spec, judge=llm_judge, out=scored_path, progress=advance)
    payload = {"track": track, **judged.as_json()}
    if wants_json(ctx, json_output):
        print_json(payload)
        return
    table = Table(
        "metric", "value", title=f"judge preview: {track} with {judged.rubric} by {llm_judge.model}"
    )
    for name in ("rows", "scored", "failed", "skipped", "mean_reward"):
        table.add_row(name, fmt(payload[name]))
    for name, value in payload["calibration"].items():
        table.add_row(f"calibration {name}", fmt(value))
    for name in ("judge_calls", "judge_cache_hits", "judge_prompt_tokens", "judge_completion_tokens"):
        table.add_row(name.replace("_", " "), fmt(payload["judge"][name]))
    stdout.print(table)
    stdout.print(f"scored records: {scored_path}")
