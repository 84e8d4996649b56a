"""The `overnight` typer app: global options, error handling, and the helpers every command shares.

Thin by design: commands parse, call a stage or release function, print. Human output is a rich table
on stdout and progress bars on stderr; `--json` prints exactly one JSON object on stdout. Exit codes:
0 success, 2 bad input or config (one line on stderr), 1 internal failure.
"""

from __future__ import annotations

import json
import logging
import os
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
from typer.core import TyperGroup

from pipeline.config import DEFAULT_CONFIG, OvernightConfig, load_config
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
    "the rest in MLflow and serve them through the gateway in front of vLLM.\n\n"
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
    # MLflow installs its own INFO handler ("Creating initial MLflow database tables..."): quiet unless -v.
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)
    # Prefect reads these when first imported (by `run`, `schedule`, `demo`): quiet unless -v, no telemetry.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not verbose:  # model-loading bars on every evaluation are noise next to the CLI's own progress
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    ctx.obj = {"config": config, "json": json_output, "verbose": verbose}


def load(ctx: typer.Context) -> OvernightConfig:
    return load_config(ctx.obj["config"])


def wants_json(ctx: typer.Context, local: bool) -> bool:
    return local or bool(ctx.obj.get("json"))


def print_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, ensure_ascii=False, default=str) + "\n")


@contextmanager
def progress(description: str, total: int | None, *, unit_bytes: bool = False) -> Iterator[Any]:
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


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:.3f}" if isinstance(value, float) and not value.is_integer() else str(int(value))


def exit_on_sigterm(signum: int, _frame: Any) -> None:
    """SIGTERM unwinds like Ctrl-C, so `with` blocks stop what they started (e.g. a vLLM server)."""
    raise SystemExit(128 + signum)
