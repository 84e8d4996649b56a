"""The demo's world: the tiny base model and synthetic traffic, for the demo, benchmarks and tests.

Not pipeline code: nothing under `pipeline/` but this package imports it."""
