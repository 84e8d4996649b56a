"""The nightly loop's stages as plain functions: config, harvest, judge, select, train, registry, serving.

Each stage takes typed inputs and returns typed results, callable without Prefect (see `flows/`).
"""
