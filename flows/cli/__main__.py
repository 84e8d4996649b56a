"""`python -m flows.cli`: the `overnight` command."""

from flows.cli import main

main()
