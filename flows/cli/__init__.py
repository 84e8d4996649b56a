"""`overnight`: the command line, one module per group of commands on one typer app.

`app` holds the global options and error handling; `data` the store and tonight's data (init, db
upgrade, ingest, harvest, judge); `night` the nightly loop (run, gate, demo, schedule); `release` what
serves (status, deploy, rollback, serve, gateway); `keys` the gateway's API keys. Importing this package registers every command.
"""

import signal

from flows.cli import data, keys, night, release
from flows.cli.app import app, exit_on_sigterm

__all__ = ["app", "data", "keys", "main", "night", "release"]


def main() -> None:
    """The `overnight` console script: every command registered, SIGTERM unwinding like Ctrl-C.

    SIGINT is made Ctrl-C again even when it arrives ignored: a shell without job control (a script,
    `nohup ... &`, a CI runner) starts background commands with SIGINT ignored, and `kill -INT` would
    then leave `overnight serve` and its vLLM server running (seen in a CI run started that way).
    """
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    app()
