"""Prefect flows that wire the pipeline's stages into the nightly loop, and the `overnight` CLI.

Nothing imports `flows`; Prefect is imported here and nowhere else.
"""
