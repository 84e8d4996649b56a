"""`overnight`: the command line, one module per group of commands on one typer app.

`app` holds the global options and error handling; `data` the store and tonight's data (init, db
upgrade, ingest, harvest, judge); `night` the nightly loop (run, gate, demo, schedule); `release` what
serves (status, deploy, rollback, serve). Importing this package registers every command.
"""

from flows.cli import data, night, release
from flows.cli.app import app, main

__all__ = ["app", "data", "main", "night", "release"]
